"""The datastore: content-addressed objects plus SQLite metadata.

Layout of a store root (``$FLOWMAGIC_HOME`` or ``.flowmagic/``)::

    metadata.sqlite     runs, tasks, attempts, artifacts, logs (metadata.py)
    objects/ab/cdef...  immutable objects named by content hash (objects.py)
    objects/tmp/        objects being written; never read

Tasks open only the objects (``remote.open_objects``); the orchestrator
opens the whole :class:`Store`. With ``FLOWMAGIC_STORE`` set (an ``s3://``
or other fsspec URL), objects live there and ``objects/`` is their read
cache, runs are published there (replica.py), and opening a store imports
the runs another home published.
"""
from __future__ import annotations

import time
from pathlib import Path

from flowmagic.errors import StoreError
from .metadata import AttemptRecord, Metadata, RunRecord, TaskRecord
from .objects import ObjectStore
from .paths import store_root
from .backends import backend_for, store_url
from .remote import open_objects
from .serializers import ArtifactRef, load_artifact, save_artifact, value_hash

__all__ = [
    "ArtifactRef", "AttemptRecord", "Metadata", "ObjectStore", "RunRecord", "Store", "TaskRecord",
    "load_artifact", "open_store", "save_artifact", "store_root", "value_hash",
]

METADATA_FILE = "metadata.sqlite"
OBJECTS_DIR = "objects"


class Store:
    """One store root: ``objects`` (any process) and ``meta`` (orchestrator)."""

    _refreshed = 0.0   # when the runs of a shared store were last imported (time.monotonic)

    def __init__(self, root: Path | str, url: str | None = None) -> None:
        self.root = Path(root).absolute()
        self.url = url or store_url()
        backend = backend_for(self.url) if self.url else None
        if backend is not None:
            backend.check()   # no bucket, bad credentials: one clear error before anything is recorded
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.objects = open_objects(self.root / OBJECTS_DIR, self.url)
        except OSError as exc:  # a file in the way, no permission, read-only disk
            raise StoreError(f"cannot use {self.root} as a flowmagic store ({exc}); "
                             "set FLOWMAGIC_HOME to a writable directory") from exc
        self._backend = backend
        if backend is None:
            self.meta = Metadata(self.root / METADATA_FILE)
            return
        from .replica import PublishingMetadata, safe_refresh

        self.meta = PublishingMetadata(self.root / METADATA_FILE, backend)
        safe_refresh(self.meta, backend)
        self._refreshed = time.monotonic()

    def refresh(self, max_age: float = 1.0) -> None:
        """Import the runs other homes published to the shared store since the last look
        (not again within ``max_age`` seconds: opening the store just did). Local store: nothing."""
        if self._backend is None or time.monotonic() - self._refreshed < max_age:
            return
        from .replica import safe_refresh

        safe_refresh(self.meta, self._backend)
        self._refreshed = time.monotonic()

    def close(self) -> None:
        self.meta.close()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


def open_store(root: Path | str | None = None) -> Store:
    """Open (creating if needed) the store at ``root`` or :func:`store_root`."""
    return Store(root if root is not None else store_root())
