"""Where objects and published run metadata live when the store is remote.

``FLOWMAGIC_STORE=s3://bucket/prefix`` (or any fsspec URL: ``gs://``,
``az://``, ``file://``) names a shared store; the local ``FLOWMAGIC_HOME``
stays the fast index and read cache. An :class:`ObjectBackend` moves whole
named blobs: content objects under ``objects/ab/cdef...`` and metadata
documents under ``meta/``. Credentials come from the usual environment
(``AWS_ACCESS_KEY_ID``, ``AWS_PROFILE``, instance roles...), never stored;
the S3 endpoint from ``FLOWMAGIC_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``.

Content objects are written once: an existence check first, then a
conditional PUT (``If-None-Match: *``) where the service supports it. S3
makes an object visible only when its PUT (or multipart upload) completes,
so a failed or killed upload never shows a half-written object; other
file systems get a temporary name and a rename.
"""
from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypeVar

from flowmagic.errors import StoreError

STORE_ENV = "FLOWMAGIC_STORE"
ENDPOINT_ENVS = ("FLOWMAGIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL")
PART_SIZE_ENV = "FLOWMAGIC_STORE_PART_SIZE"
RETRIES_ENV = "FLOWMAGIC_STORE_RETRIES"
DEFAULT_PART_SIZE = 64 * 1024 * 1024
DEFAULT_RETRIES = 5
_MIN_PART_SIZE = 5 * 1024 * 1024  # S3's smallest multipart part
T = TypeVar("T")


def store_url(env: Mapping[str, str] | None = None) -> str | None:
    """``$FLOWMAGIC_STORE`` (stripped, without a trailing slash), or None for a local-only store."""
    url = (os.environ if env is None else env).get(STORE_ENV, "").strip().rstrip("/")
    return url or None


class ObjectBackend(Protocol):
    """Named, immutable blobs in a remote store (names are relative to the store URL)."""

    url: str

    def check(self) -> None: ...
    def exists(self, name: str) -> bool: ...
    def put_file(self, name: str, path: str) -> None: ...
    def get_file(self, name: str, path: str) -> None: ...
    def put_bytes(self, name: str, data: bytes) -> None: ...
    def get_bytes(self, name: str) -> bytes: ...
    def get_many(self, names: list[str]) -> dict[str, bytes]: ...
    def put_many(self, docs: dict[str, bytes]) -> None: ...
    def listing(self, prefix: str) -> dict[str, str]: ...


def _int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    try:
        return int(raw) if raw else default
    except ValueError:
        raise StoreError(f"{name}={raw!r} is not a whole number") from None


_fork_hook_registered = False


def _forget_fsspec_loop_after_fork() -> None:
    """fsspec runs its I/O on an event loop in a thread of the process that started it: a
    forked child (a task from the fork server) has the loop object but not the thread, and
    every call would wait for it forever. fsspec 2025 and later reset it at fork themselves;
    the older versions our floor allows do not."""
    global _fork_hook_registered
    if _fork_hook_registered or not hasattr(os, "register_at_fork"):
        return
    import fsspec.asyn

    os.register_at_fork(after_in_child=fsspec.asyn.reset_lock)
    _fork_hook_registered = True


class FsspecBackend:
    """An :class:`ObjectBackend` over an fsspec file system (s3fs for ``s3://``)."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with the s3 extra
            raise StoreError(f"{STORE_ENV}={url}: install flowmagic[s3] (fsspec and s3fs)") from None
        _forget_fsspec_loop_after_fork()
        self.url = url.rstrip("/")
        self.protocol, self.root = fsspec.core.split_protocol(self.url)
        self.protocol = self.protocol or "file"
        self.root = (self.root or "").rstrip("/")
        self.part_size = max(_int_env(PART_SIZE_ENV, DEFAULT_PART_SIZE), _MIN_PART_SIZE)
        self.retries = max(_int_env(RETRIES_ENV, DEFAULT_RETRIES), 0)
        self._fs: Any = None
        self._pid = -1
        self._lock = threading.Lock()

    # -- the file system, one per process (fsspec's event loop does not survive a fork)
    @property
    def fs(self) -> Any:
        if self._fs is None or self._pid != os.getpid():
            with self._lock:
                self._fs, self._pid = self._make_fs(), os.getpid()
        return self._fs

    def _make_fs(self) -> Any:
        import fsspec

        options: dict[str, Any] = {}
        if self._is_s3():
            endpoint = next((os.environ[e] for e in ENDPOINT_ENVS if os.environ.get(e)), None)
            if endpoint:
                options["endpoint_url"] = endpoint
            # botocore retries 5xx, throttling and dropped connections with backoff
            options["config_kwargs"] = {"retries": {"max_attempts": self.retries + 1, "mode": "standard"}}
            options["skip_instance_cache"] = True
            options["use_listings_cache"] = False   # other homes write to the bucket: never trust a stale listing
        try:
            return fsspec.filesystem(self.protocol, **options)
        except ImportError as exc:
            raise StoreError(f"{STORE_ENV}={self.url} needs a package that is not installed ({exc}); "
                             "for s3:// install flowmagic[s3]") from None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}" if self.root else name

    def _is_s3(self) -> bool:
        return self.protocol in ("s3", "s3a")

    # -- operations ---------------------------------------------------------
    def check(self) -> None:
        """Fail with one clear line when the store cannot be used (no bucket, bad credentials, no network)."""
        try:
            if self._is_s3():
                bucket = self.root.split("/", 1)[0]
                self.fs.call_s3("head_bucket", Bucket=bucket)
            else:
                self.fs.makedirs(self.root, exist_ok=True)
                self.fs.ls(self.root)
        except FileNotFoundError:
            raise StoreError(f"{STORE_ENV}={self.url}: the bucket does not exist (or is not visible with "
                             "these credentials); create it first") from None
        except PermissionError as exc:
            raise StoreError(f"{STORE_ENV}={self.url}: access denied ({_first_line(exc)}); check the "
                             "credentials in the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, ...)") from None
        except StoreError:
            raise
        except Exception as exc:  # noqa: BLE001 - endpoint unreachable, bad URL, no credentials at all
            raise StoreError(f"{STORE_ENV}={self.url}: cannot use the store ({type(exc).__name__}: "
                             f"{_first_line(exc)})") from None

    def exists(self, name: str) -> bool:
        return self._retry(lambda: self.fs.exists(self._path(name)), f"check {name}")

    def put_file(self, name: str, path: str) -> None:
        """Upload a local file as ``name``, once: an existing object is left as it is."""
        def upload() -> None:
            if self._is_s3():
                self._put_s3(name, path)
            else:
                self._put_renamed(name, lambda tmp: self.fs.put_file(path, tmp))
        self._retry(upload, f"upload {name}")

    def _put_s3(self, name: str, path: str) -> None:
        target = self._path(name)
        try:
            # multipart above 2 parts' worth; S3 shows the object only once it is complete
            self.fs.put_file(path, target, chunksize=self.part_size, mode="create")
        except FileExistsError:
            pass   # another writer stored the same content first: content-addressed, so the same bytes
        except (OSError, ValueError) as exc:
            if "NotImplemented" not in str(exc) and "not supported" not in str(exc).lower():
                raise
            self.fs.put_file(path, target, chunksize=self.part_size)  # no conditional PUT: same bytes anyway

    def _put_renamed(self, name: str, write: Callable[[str], None]) -> None:
        target = self._path(name)
        tmp = f"{target}.tmp-{uuid.uuid4().hex}"
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        write(tmp)
        self.fs.mv(tmp, target)

    def get_file(self, name: str, path: str) -> None:
        self._retry(lambda: self.fs.get_file(self._path(name), path), f"download {name}")

    def put_bytes(self, name: str, data: bytes) -> None:
        """Write (or replace) a small document."""
        if self._is_s3():
            self._retry(lambda: self.fs.pipe_file(self._path(name), data), f"write {name}")
        else:
            self._retry(lambda: self._put_renamed(name, lambda tmp: self.fs.pipe_file(tmp, data)), f"write {name}")

    def put_many(self, docs: dict[str, bytes]) -> None:
        """Write (or replace) several small documents (concurrent requests on S3)."""
        if not docs:
            return
        if not self._is_s3():
            for name, data in docs.items():
                self.put_bytes(name, data)
            return
        self._retry(lambda: self.fs.pipe({self._path(n): d for n, d in docs.items()}), f"write {len(docs)} documents")

    def get_bytes(self, name: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self._path(name)), f"read {name}")

    def get_many(self, names: list[str]) -> dict[str, bytes]:
        """Several small documents at once (concurrent requests on S3)."""
        if not names:
            return {}
        paths = {self._path(n): n for n in names}
        got = self._retry(lambda: self.fs.cat(list(paths), on_error="raise"), f"read {len(names)} documents")
        return {paths[_strip(p, self.protocol)]: data for p, data in got.items()}

    def listing(self, prefix: str) -> dict[str, str]:
        """Every name under ``prefix`` with a version tag (ETag or mtime+size); {} when none."""
        base = self._path(prefix).rstrip("/")

        def find() -> dict[str, str]:
            try:
                found = self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}
            return {_relative(_strip(p, self.protocol), self.root): _version(info) for p, info in found.items()}
        self.fs.invalidate_cache()   # (fsspec's other file systems keep listings too)
        return self._retry(find, f"list {prefix}")

    def _retry(self, op: Callable[[], T], what: str) -> T:
        """Our own retries on top of the client's, for transient errors it gave up on."""
        delay = 0.2
        for attempt in range(self.retries + 1):
            try:
                return op()
            except (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, StoreError):
                raise
            except Exception as exc:  # noqa: BLE001 - a 5xx, a reset connection, a timeout
                if attempt == self.retries:
                    raise StoreError(f"{STORE_ENV}={self.url}: could not {what} after {attempt + 1} tries "
                                     f"({type(exc).__name__}: {_first_line(exc)})") from exc
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")


def _strip(path: str, protocol: str) -> str:
    return path.split("://", 1)[1] if "://" in path else path


def _relative(path: str, root: str) -> str:
    return path[len(root) + 1:] if root and path.startswith(root + "/") else path


def _version(info: Mapping[str, Any]) -> str:
    tag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if tag:
        return str(tag).strip('"')
    return f"{info.get('mtime') or info.get('LastModified') or info.get('created')}:{info.get('size')}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


_backends: dict[tuple[int, str], FsspecBackend] = {}


def backend_for(url: str) -> FsspecBackend:
    """The backend of ``url``, one per process (its connection pool is reused)."""
    key = (os.getpid(), url)
    if key not in _backends:
        _backends[key] = FsspecBackend(url)
    return _backends[key]


def store_modules(url: str) -> tuple[str, ...]:
    """The modules that implement ``url``'s file system (``("s3fs",)`` for s3://), for a fork server
    to import before it forks tasks; empty when fsspec does not know the protocol."""
    try:
        import fsspec.core
        from fsspec.registry import known_implementations
    except ImportError:
        return ()
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    found = known_implementations.get(protocol, {}).get("class", "")
    return (found.rsplit(".", 1)[0],) if "." in found else ()


def warm_up(url: str | None = None) -> None:
    """Import the file system's modules now (a fork server calls this, so tasks do not pay for it)."""
    url = url or store_url()
    if url is None:
        return
    try:
        backend = backend_for(url)
        backend._make_fs()  # imports s3fs/botocore and reads their configuration
    except StoreError:
        pass  # the orchestrator reports it when it opens the store
