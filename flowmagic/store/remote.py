"""Objects in a remote store (``FLOWMAGIC_STORE``), read through a local cache.

:class:`CachedObjectStore` is an :class:`~flowmagic.store.objects.ObjectStore`
whose local directory is a read cache: a write stores the object locally
(hashed as it passes, as always) and uploads it once to the remote store; a
read of an object the cache lacks downloads it, verifies its hash and
publishes it into the cache, so memory-mapped reads work unchanged. Tasks
(worker/task.py) read their inputs and write their outputs straight through
it; they never touch metadata.

The cache is the store root's ``objects/`` unless ``FLOWMAGIC_STORE_CACHE``
names another directory. A Dask worker has no store root of its own: its
tasks use :func:`worker_cache_root`.
"""
from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO

from flowmagic.errors import NotFoundError, StoreError
from .backends import ObjectBackend, backend_for, store_url
from .objects import KEY_RE, ObjectStore, _SHARD, _TempFile, _hash_file

CACHE_ENV = "FLOWMAGIC_STORE_CACHE"
HOME_ENV = "FLOWMAGIC_HOME"
OBJECTS_PREFIX = "objects"


def object_name(key: str) -> str:
    """The remote name of object ``key`` (the same sharding as on disk)."""
    return f"{OBJECTS_PREFIX}/{key[:_SHARD]}/{key[_SHARD:]}"


class CachedObjectStore(ObjectStore):
    """Content-addressed objects in ``backend``, cached under ``cache_root``."""

    # The remote copy is the durable one (a task is done only once it is uploaded), so the
    # cache skips the fsync: on a 1 GB artifact that is most of the local cost.
    durable = False

    def __init__(self, cache_root: Path | str, backend: ObjectBackend) -> None:
        super().__init__(cache_root)
        self.backend = backend
        self.url = backend.url
        self._uploaded: set[str] = set()   # keys this process knows are stored remotely
        self._fetched: set[str] = set()    # keys this process downloaded and verified just now

    # -- writing: locally first (the hash, the cache), then once remotely
    def put_bytes(self, data: bytes | memoryview) -> str:
        key = super().put_bytes(data)
        self._upload(key)
        return key

    def put_stream(self, write: Callable[[BinaryIO], None]) -> tuple[str, int]:
        key, size = super().put_stream(write)
        self._upload(key)
        return key, size

    def _upload(self, key: str) -> None:
        if key in self._uploaded:
            return
        name = object_name(key)
        if not self.backend.exists(name):   # written once: an object already there is not sent again
            self.backend.put_file(name, str(super().path(key)))
        self._uploaded.add(key)

    # -- reading: from the cache, fetched on a miss
    def exists(self, key: str) -> bool:
        return super().exists(key) or (KEY_RE.match(key) is not None and self.backend.exists(object_name(key)))

    def open_path(self, key: str) -> Path:
        if KEY_RE.match(key) and not super().path(key).is_file():
            self._fetch(key)
        return super().open_path(key)

    def map(self, key: str) -> mmap.mmap:
        path = self.open_path(key)
        if key not in self._fetched:
            return super().map(key)
        with open(path, "rb") as f:   # verified as it arrived: not hashed a second time
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def _fetch(self, key: str) -> None:
        """Download ``key`` into the cache: verified, then renamed into place (never half visible)."""
        tmp = _TempFile(self.tmp_dir)
        with tmp:
            tmp.fh.close()
            try:
                self.backend.get_file(object_name(key), str(tmp.path))
            except FileNotFoundError:
                raise NotFoundError(f"object {key} is missing from the store {self.url} (and from the local "
                                    f"cache {self.root}): it was deleted there, or the run that wrote it did "
                                    "not finish uploading") from None
            with open(tmp.path, "rb") as downloaded:
                got = _hash_file(downloaded)
                if got != key:
                    raise StoreError(f"object {key} downloaded from {self.url} does not match its hash "
                                     f"(got {got}); the remote copy is damaged")
                self._publish(downloaded, tmp.path, key)   # read-only, renamed into place (no fsync: a cache)
        self._uploaded.add(key)
        self._fetched.add(key)

    def __repr__(self) -> str:
        return f"CachedObjectStore({self.url!r}, cache={str(self.root)!r})"


def worker_cache_root(env: Mapping[str, str] | None = None) -> Path:
    """Where a process with no store of its own (a Dask worker's task) caches a remote store's objects:
    ``$FLOWMAGIC_STORE_CACHE``, else ``$FLOWMAGIC_HOME/objects``, else ``$XDG_CACHE_HOME/flowmagic/objects``
    (``~/.cache/flowmagic/objects``). Objects are content-addressed, so one cache serves every store."""
    env = os.environ if env is None else env
    if env.get(CACHE_ENV, "").strip():
        return Path(env[CACHE_ENV].strip()).expanduser().absolute()
    if env.get(HOME_ENV, "").strip():
        return Path(env[HOME_ENV].strip()).expanduser().absolute() / OBJECTS_PREFIX
    base = env.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "flowmagic" / OBJECTS_PREFIX


def open_objects(root: Path | str, url: str | None = None) -> ObjectStore:
    """The objects of a store: local at ``root``, or the remote ``url`` (default
    ``$FLOWMAGIC_STORE``) cached at ``$FLOWMAGIC_STORE_CACHE`` or ``root``."""
    url = url or store_url()
    if url is None:
        return ObjectStore(root)
    cache = os.environ.get(CACHE_ENV, "").strip()
    return CachedObjectStore(Path(cache).expanduser() if cache else root, backend_for(url))
