"""Content-addressed, immutable objects on disk.

An object's key is the xxh3-128 hash (32 hex digits) of its bytes; it lives
at ``objects/<first 2 hex>/<remaining 30 hex>``. Objects are written to a
temporary file in the same file system and renamed into place with
``os.replace``, so a reader never sees a partial object and a writer killed
mid-way leaves at most a stray temporary file (removed by ``gc``).

Any process may write objects (tasks do); nothing here touches metadata.
"""
from __future__ import annotations

import io
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO
from collections.abc import Callable, Iterator

import xxhash

from flowmagic.errors import NotFoundError

KEY_RE = re.compile(r"^[0-9a-f]{32}$")
_SHARD = 2
# Big writes go straight to the file; the hash is fed the same memoryview.
_COPY_CHUNK = 64 * 1024 * 1024
_PARALLEL_HASH_MIN = 8 * 1024 * 1024


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

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
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
            self._publish(tmp, key)
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
                self._publish(tmp, key)
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
        return self.open_path(key).read_bytes()

    def open_path(self, key: str) -> Path:
        """The path of an existing object, or NotFoundError."""
        p = self.path(key)
        if not p.is_file():
            raise NotFoundError(f"object {key} is missing from the store at {self.root} "
                                "(removed by gc, or the store was copied partially)")
        return p

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
        """True if ``key`` is stored; refresh its mtime so a concurrent gc,
        which spares recently touched objects, does not remove it under us."""
        p = self.path(key)
        try:
            os.utime(p, None)
            return True
        except FileNotFoundError:
            return False
        except PermissionError:  # another user's object in a shared store: it exists, keep it
            return True

    def _publish(self, tmp: Path, key: str) -> None:
        final = self.path(key)
        final.parent.mkdir(exist_ok=True)
        os.chmod(tmp, 0o444)  # immutable by convention: read-only once published
        os.replace(tmp, final)

    def _temp_file(self) -> _TempFile:
        return _TempFile(self.tmp_dir)


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
