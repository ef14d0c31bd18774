"""Content-addressed, immutable objects on disk.

An object's key is the xxh3-128 hash (32 hex digits) of its bytes; it lives
at ``objects/<first 2 hex>/<remaining 30 hex>``. Objects are written to a
temporary file in the same file system and renamed into place with
``os.replace``, so a reader never sees a partial object and a writer killed
mid-way leaves at most a stray temporary file (removed by ``gc``).

Objects are verified: loading one (:meth:`ObjectStore.map`, :meth:`get_bytes`)
hashes it again (xxh3 runs at memory speed, ~5 ms per 100 MB) and so does
de-duplication before it re-uses an existing object. A damaged object is
moved to ``objects/quarantine/`` (kept as evidence, never read) and the next
writer of the same content stores it anew. ``FLOWMAGIC_VERIFY_OBJECTS=0``
skips the check on load (pure mmap laziness); de-duplication always checks.

Any process may write objects (tasks do); nothing here touches metadata.
"""
from __future__ import annotations

import io
import mmap
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO
from collections.abc import Callable, Iterator

import xxhash

from flowmagic.errors import NotFoundError, StoreError

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_SHARD = 2
# Big writes go straight to the file; the hash is fed the same memoryview.
_COPY_CHUNK = 64 * 1024 * 1024
_PARALLEL_HASH_MIN = 8 * 1024 * 1024
QUARANTINE_DIR = "quarantine"
VERIFY_ENV = "FLOWMAGIC_VERIFY_OBJECTS"


class DamagedObjectError(StoreError):
    """An object's bytes no longer match its key (a flipped bit, a truncated
    or overwritten file). The object has been quarantined."""

    def __init__(self, message: str, *, key: str, quarantined: Path | None) -> None:
        super().__init__(message)
        self.key = key
        self.quarantined = quarantined


def verify_on_load() -> bool:
    """False when the user opted out with FLOWMAGIC_VERIFY_OBJECTS=0."""
    return os.environ.get(VERIFY_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def hash_bytes(data: bytes | memoryview) -> str:
    """The object key of ``data``."""
    return xxhash.xxh3_128_hexdigest(data)


class _HashingWriter(io.RawIOBase):
    """A write-only file that hashes everything written through it."""

    def __init__(self, raw: BinaryIO) -> None:
        super().__init__()
        self._raw = raw
        self._hash = xxhash.xxh3_128()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        if len(view) < _PARALLEL_HASH_MIN:
            self._hash.update(view)
            self._write_all(view)
        else:
            # hash while the kernel copies: os.write releases the GIL, so the
            # hash costs (almost) no extra time on big buffers
            hasher = threading.Thread(target=self._hash.update, args=(view,))
            hasher.start()
            try:
                self._write_all(view)
            finally:
                hasher.join()
        self.size += len(view)
        return len(view)

    def _write_all(self, view: memoryview) -> None:
        written = 0
        while written < len(view):  # os-level writes may be short for huge buffers
            chunk = view[written:written + _COPY_CHUNK]
            n = self._raw.write(chunk)
            written += n if n is not None else len(chunk)

    def tell(self) -> int:
        return self.size

    def seekable(self) -> bool:
        return False

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class ObjectStore:
    """Immutable objects keyed by their content hash, under ``root``."""

    url: str | None = None   # the remote store these are cached from (remote.CachedObjectStore)
    durable = True           # fsync before publishing (a cache of a remote store need not)

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / QUARANTINE_DIR
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)

    # -- writing -----------------------------------------------------------
    def put_bytes(self, data: bytes | memoryview) -> str:
        """Store ``data``; return its key. Existing keys are not rewritten."""
        key = hash_bytes(data)
        if self._claim_existing(key):
            return key
        with self._temp_file() as (fh, tmp):
            _HashingWriter(fh).write(data)
            self._publish(fh, tmp, key)
        return key

    def put_stream(self, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
        """Store what ``write(fh)`` writes to ``fh``; return ``(key, size)``.

        ``fh`` is write-only and not seekable; hashing happens as bytes pass,
        so the data is read once. If ``write`` raises, nothing is stored.
        """
        with self._temp_file() as (fh, tmp):
            sink = _HashingWriter(fh)
            write(sink)  # type: ignore[arg-type]
            fh.flush()
            key = sink.hexdigest()
            if not self._claim_existing(key):
                self._publish(fh, tmp, key)
            return key, sink.size

    # -- reading -----------------------------------------------------------
    def path(self, key: str) -> Path:
        """Where the object ``key`` lives (whether or not it exists)."""
        if not KEY_RE.match(key):
            raise NotFoundError(f"'{key}' is not an object key (32 hex digits expected)")
        return self.root / key[:_SHARD] / key[_SHARD:]

    def exists(self, key: str) -> bool:
        return KEY_RE.match(key) is not None and self.path(key).is_file()

    def get_bytes(self, key: str) -> bytes:
        """The object's bytes, verified against its key."""
        p = self.open_path(key)
        with open(p, "rb") as f:
            data = f.read()
            if verify_on_load() and hash_bytes(data) != key:
                raise self._damaged(key, os.fstat(f.fileno()))
        return data

    def map(self, key: str) -> mmap.mmap:
        """A private (copy-on-write) mapping of the object, verified against its
        key unless FLOWMAGIC_VERIFY_OBJECTS=0. Raises DamagedObjectError."""
        p = self.open_path(key)
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            # hashed through a mapping of its own, unmapped at once: the caller's
            # mapping stays lazy (its pages come in when the data is used)
            if st.st_size == 0 or (verify_on_load() and _hash_file(f) != key):
                raise self._damaged(key, st)  # (no codec writes an empty object)
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def verify(self, key: str) -> bool:
        """True if the object's bytes match its key (always checks)."""
        try:
            with open(self.path(key), "rb") as f:
                return _hash_file(f) == key
        except FileNotFoundError:
            return False

    def open_path(self, key: str) -> Path:
        """The path of an existing object, or NotFoundError."""
        p = self.path(key)
        if not p.is_file():
            moved = self.quarantined(key)
            if moved:
                raise NotFoundError(f"object {key} was found damaged and moved to {moved[-1]}; "
                                    "run the step that writes it again to store it anew")
            # gc removes only objects no recorded run references, so it is not the likely cause
            raise NotFoundError(f"object {key} is missing from the store at {self.root} (the store was "
                                "copied partially, files were deleted by hand, or the recorded hash is "
                                "damaged; `flowmagic fsck` checks every reference)")
        return p

    def quarantined(self, key: str | None = None) -> list[Path]:
        """Quarantined copies (of ``key``, or all), oldest first."""
        try:
            found = [p for p in self.quarantine_dir.iterdir() if key is None or p.name.startswith(key)]
        except FileNotFoundError:
            return []
        return sorted(found, key=lambda p: p.name)

    def quarantine(self, key: str, expected: os.stat_result | None = None) -> Path | None:
        """Move a damaged object aside; return where it went (None if it was
        already gone). With ``expected`` (the stat of the file found damaged),
        a good copy another writer published meanwhile is left in place."""
        p = self.path(key)
        try:
            if expected is not None:
                now = p.stat()
                if (now.st_ino, now.st_dev) != (expected.st_ino, expected.st_dev):
                    return None
            self.quarantine_dir.mkdir(exist_ok=True)
            target = self.quarantine_dir / f"{key}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
            os.replace(p, target)
            return target
        except FileNotFoundError:
            return None

    def size(self, key: str) -> int:
        return self.open_path(key).stat().st_size

    def keys(self) -> Iterator[str]:
        """Every stored key (temporary files excluded)."""
        for shard in sorted(self.root.iterdir()):
            if len(shard.name) != _SHARD or not shard.is_dir():
                continue
            for f in shard.iterdir():
                key = shard.name + f.name
                if KEY_RE.match(key):
                    yield key

    def delete(self, key: str) -> int:
        """Remove an object (gc only); return the bytes freed."""
        p = self.path(key)
        try:
            n = p.stat().st_size
            p.unlink()
            return n
        except FileNotFoundError:
            return 0

    # -- internals ---------------------------------------------------------
    def _claim_existing(self, key: str) -> bool:
        """True if ``key`` is stored intact; refresh its mtime so a concurrent gc,
        which spares recently touched objects, does not remove it under us.
        A damaged copy is quarantined (False: the caller writes it anew)."""
        p = self.path(key)
        try:
            os.utime(p, None)
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's object in a shared store: check it all the same
            pass
        try:
            with open(p, "rb") as f:
                st = os.fstat(f.fileno())
                intact = _hash_file(f) == key
        except FileNotFoundError:
            return False
        except PermissionError:
            return True  # unreadable to us, so never loaded by us either: keep it
        if not intact:
            self.quarantine(key, st)
        return intact

    def _damaged(self, key: str, st: os.stat_result) -> DamagedObjectError:
        moved = self.quarantine(key, st)
        where = f"moved to {moved}" if moved else "already moved aside"
        return DamagedObjectError(
            f"object {key} is damaged: its bytes no longer match their hash ({where}); "
            "run the step that writes it again to store it anew", key=key, quarantined=moved)

    def _publish(self, fh: BinaryIO, tmp: Path, key: str) -> None:
        # on disk before it is visible: a task is recorded as done only after
        # its objects are published, so a power cut cannot leave a recorded,
        # empty object; write errors (ENOSPC at writeback) surface here too
        if self.durable:
            os.fsync(fh.fileno())
        final = self.path(key)
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)  # immutable by convention: read-only once published
        os.replace(tmp, final)

    def _temp_file(self) -> _TempFile:
        return _TempFile(self.tmp_dir)


def _hash_file(f: BinaryIO) -> str:
    """The key of an open file's content (mapped: no copy, no Python loop)."""
    if os.fstat(f.fileno()).st_size == 0:
        return hash_bytes(b"")
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        return hash_bytes(mm)


class _TempFile:
    """A temporary file in the store's tmp dir, removed unless published."""

    def __init__(self, directory: Path) -> None:
        prefix = f"w{os.getpid()}-{int(time.time())}-"
        try:
            fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
        except FileNotFoundError:  # someone removed tmp/ (or the whole store) under us
            directory.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=directory, prefix=prefix)
        self.path = Path(name)
        self.fh = os.fdopen(fd, "wb", buffering=0)

    def __enter__(self) -> tuple[BinaryIO, Path]:
        return self.fh, self.path  # type: ignore[return-value]

    def __exit__(self, *exc) -> None:
        self.fh.close()
        try:
            self.path.unlink()  # still there only if it was not published
        except FileNotFoundError:
            pass
