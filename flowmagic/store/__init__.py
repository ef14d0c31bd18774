"""The datastore: content-addressed objects plus SQLite metadata.

Layout of a store root (``$FLOWMAGIC_HOME`` or ``.flowmagic/``)::

    metadata.sqlite     runs, tasks, attempts, artifacts, logs (metadata.py)
    objects/ab/cdef...  immutable objects named by content hash (objects.py)
    objects/tmp/        objects being written; never read

Tasks open only ``ObjectStore(store_root / "objects")``; the orchestrator
opens the whole :class:`Store`.
"""
from __future__ import annotations

from pathlib import Path

from flowmagic.errors import StoreError
from .metadata import AttemptRecord, Metadata, RunRecord, TaskRecord
from .objects import ObjectStore
from .paths import store_root
from .serializers import ArtifactRef, load_artifact, save_artifact, value_hash

__all__ = [
    "ArtifactRef", "AttemptRecord", "Metadata", "ObjectStore", "RunRecord", "Store", "TaskRecord",
    "load_artifact", "open_store", "save_artifact", "store_root", "value_hash",
]

METADATA_FILE = "metadata.sqlite"
OBJECTS_DIR = "objects"


class Store:
    """One store root: ``objects`` (any process) and ``meta`` (orchestrator)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).absolute()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self.objects = ObjectStore(self.root / OBJECTS_DIR)
        except OSError as exc:  # a file in the way, no permission, read-only disk
            raise StoreError(f"cannot use {self.root} as a flowmagic store ({exc}); "
                             "set FLOWMAGIC_HOME to a writable directory") from exc
        self.meta = Metadata(self.root / METADATA_FILE)

    def close(self) -> None:
        self.meta.close()

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"


def open_store(root: Path | str | None = None) -> Store:
    """Open (creating if needed) the store at ``root`` or :func:`store_root`."""
    return Store(root if root is not None else store_root())
