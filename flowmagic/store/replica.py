"""Run metadata shared through a remote store, so another machine can read the runs.

The orchestrator alone writes metadata, into its local SQLite (the fast
index). With ``FLOWMAGIC_STORE`` set, :class:`PublishingMetadata` also
publishes each run it changes as JSON documents in the remote store, every
``PUBLISH_INTERVAL_S`` and when the run finishes::

    meta/<flow>/runs/<run_id>.json            the run row, its tags, {task id: updated_at}
    meta/<flow>/<run_id>/tasks/<task_id>.json  a task with its attempts and artifacts

Task documents are written before the run document that lists them, so a
reader never sees a run naming a task it cannot read. :func:`refresh`, run
when a store is opened, imports the runs whose run document changed into the
local SQLite of another ``FLOWMAGIC_HOME`` (:meth:`Metadata.import_run`).
One home writes to a shared store; the others read it.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from flowmagic.errors import StoreError
from .backends import ObjectBackend
from .metadata import DELETED_REPLICA, Metadata

PUBLISH_INTERVAL_S = 2.0
META_PREFIX = "meta"


def run_doc_name(flow: str, run_id: int) -> str:
    return f"{META_PREFIX}/{flow}/runs/{run_id}.json"


def task_doc_name(flow: str, run_id: int, task_id: int | str) -> str:
    return f"{META_PREFIX}/{flow}/{run_id}/tasks/{task_id}.json"


class PublishingMetadata(Metadata):
    """:class:`Metadata` that also publishes the runs it changes to ``backend``."""

    def __init__(self, path: Path | str, backend: ObjectBackend) -> None:
        super().__init__(path)
        self.backend = backend
        self._owner_pid = os.getpid()
        self._dirty_runs: set[tuple[str, int]] = set()
        self._dirty_tasks: dict[tuple[str, int], set[int]] = {}
        self._task_runs: dict[int, tuple[str, int]] = {}
        self._publish_lock = threading.Lock()
        self._dirty_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopped = False
        self._thread: threading.Thread | None = None

    # -- what changed ------------------------------------------------------------
    def _touch(self, flow: str, run_id: int, task_ids: Sequence[int] = ()) -> None:
        with self._dirty_lock:
            self._dirty_runs.add((flow, run_id))
            self._dirty_tasks.setdefault((flow, run_id), set()).update(task_ids)
            for t in task_ids:
                self._task_runs[t] = (flow, run_id)
        self._start_thread()

    def _touch_task(self, task_id: int) -> None:
        run = self._task_runs.get(task_id)
        if run is None:
            task = self.get_task(task_id)
            run = (task.flow, task.run_id)
        self._touch(*run, [task_id])

    def new_run(self, flow: str, **kwargs) -> int:  # type: ignore[override]
        run_id = super().new_run(flow, **kwargs)
        self._touch(flow, run_id)
        return run_id

    def finish_run(self, flow: str, run_id: int, status) -> None:  # type: ignore[override]
        super().finish_run(flow, run_id, status)
        self._touch(flow, run_id)
        self.publish()  # at the end, at once: a reader must not wait for the next round

    def set_run_graph(self, flow: str, run_id: int, **kwargs) -> None:  # type: ignore[override]
        super().set_run_graph(flow, run_id, **kwargs)
        self._touch(flow, run_id)

    def add_tags(self, flow: str, run_id: int, tags) -> None:  # type: ignore[override]
        super().add_tags(flow, run_id, tags)
        self._touch(flow, run_id)
        self.publish()

    def remove_tags(self, flow: str, run_id: int, tags) -> None:  # type: ignore[override]
        super().remove_tags(flow, run_id, tags)
        self._touch(flow, run_id)
        self.publish()

    def new_tasks(self, flow: str, run_id: int, step: str, items) -> list[int]:  # type: ignore[override]
        ids = super().new_tasks(flow, run_id, step, items)
        self._touch(flow, run_id, ids)
        return ids

    def set_task_state(self, task_id: int, state) -> None:  # type: ignore[override]
        super().set_task_state(task_id, state)
        self._touch_task(task_id)

    def start_attempt(self, task_id: int, attempt: int, started_at: float | None = None) -> None:
        super().start_attempt(task_id, attempt, started_at)   # sets the task running, as set_task_state does
        self._touch_task(task_id)

    def record_attempt(self, task_id: int, attempt: int, **kwargs) -> None:  # type: ignore[override]
        super().record_attempt(task_id, attempt, **kwargs)
        self._touch_task(task_id)

    def clone_task(self, task_id: int, run_id: int, state="cloned") -> int:  # type: ignore[override]
        new_id = super().clone_task(task_id, run_id, state)
        self._touch_task(new_id)
        return new_id

    # -- publishing --------------------------------------------------------------
    def publish(self) -> None:
        """Publish every changed run now (task documents first, then the run's)."""
        with self._publish_lock:
            with self._dirty_lock:
                runs, self._dirty_runs = self._dirty_runs, set()
                tasks = {r: self._dirty_tasks.pop(r, set()) for r in runs}
            for run in sorted(runs):
                try:
                    self._publish_run(*run, sorted(tasks[run]))
                except Exception as exc:  # noqa: BLE001 - the run is recorded locally; try again later
                    with self._dirty_lock:
                        self._dirty_runs.add(run)
                        self._dirty_tasks.setdefault(run, set()).update(tasks[run])
                    print(f"[flowmagic] warning: could not publish run {run[0]}/{run[1]} to "
                          f"{self.backend.url}: {exc}", file=sys.stderr)

    def _publish_run(self, flow: str, run_id: int, task_ids: list[int]) -> None:
        if self.replica_version(flow, run_id):   # imported from the shared store: its writer publishes it
            return
        run_doc, task_docs = self.export_run(flow, run_id, task_ids)
        self.backend.put_many({task_doc_name(flow, run_id, doc["task"]["task_id"]): _dumps(doc) for doc in task_docs})
        self.backend.put_bytes(run_doc_name(flow, run_id), _dumps(run_doc))

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            if self._stopped:
                return
            if self._thread is None:   # a kernel that exits publishes what changed last
                atexit.register(self._publish_at_exit)
            self._thread = threading.Thread(target=self._loop, name="flowmagic-publish", daemon=True)
            self._thread.start()

    def _publish_at_exit(self) -> None:
        if self._owner_pid == os.getpid():   # never from a forked child (it writes no metadata)
            self.publish()

    def _loop(self) -> None:
        while not self._stopped:
            self._wake.wait(PUBLISH_INTERVAL_S)
            self.publish()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        self.publish()
        super().close()


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def refresh(meta: Metadata, backend: ObjectBackend) -> list[tuple[str, int]]:
    """Import the runs published in ``backend`` that are new or changed since the
    last refresh into ``meta``; return them. Runs recorded here are left alone."""
    listing = backend.listing(META_PREFIX)
    imported = []
    for name, version in sorted(listing.items()):
        run = _run_of(name)
        if run is None:
            continue
        known = meta.replica_version(*run)
        if known in ("", version, DELETED_REPLICA):   # our own run, unchanged since imported, or gc'd here
            continue
        run_doc = json.loads(backend.get_bytes(name))
        have = meta.replica_task_versions(*run) if known is not None else {}
        changed = [t for t, updated in run_doc["tasks"].items() if have.get(t) != updated]
        got = backend.get_many([task_doc_name(*run, t) for t in changed])
        meta.import_run(run_doc, [json.loads(d) for d in got.values()], version)
        imported.append(run)
    return imported


def _run_of(name: str) -> tuple[str, int] | None:
    """``meta/<flow>/runs/<id>.json`` -> (flow, id)."""
    parts = name.split("/")
    if len(parts) == 4 and parts[0] == META_PREFIX and parts[2] == "runs" and parts[3].endswith(".json"):
        try:
            return parts[1], int(parts[3][:-5])
        except ValueError:
            return None
    return None


def safe_refresh(meta: Metadata, backend: ObjectBackend) -> None:
    """:func:`refresh`, reporting a failure as one warning line (the local index still answers)."""
    try:
        refresh(meta, backend)
    except StoreError as exc:
        print(f"[flowmagic] warning: could not read runs from {backend.url}: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - a damaged document must not stop reading the local runs
        print(f"[flowmagic] warning: could not read runs from {backend.url}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
