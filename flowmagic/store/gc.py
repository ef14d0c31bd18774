"""Garbage collection: drop old runs, then the objects nothing refers to.

Safety rules, because tasks write objects before the orchestrator records
them (and may re-use an existing object by touching it):

- a run whose status is ``running`` is never removed, nor the origin of a
  running resume (a run whose orchestrator died reads as ``crashed``: finished);
- an object no remaining run refers to is removed only if it is older
  (mtime) than the start of every running run, so objects a live run wrote
  or re-used but has not recorded yet survive; an object no run ever
  recorded (a task that crashed) also waits for the grace period;
- temporary files (writers that died) are removed under the same rule as
  unrecorded objects: older than the grace period and every running run.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from . import Store

DEFAULT_GRACE_S = 3600.0


@dataclass
class GCResult:
    runs_removed: list[tuple[str, int]] = field(default_factory=list)
    objects_removed: int = 0
    bytes_freed: int = 0
    objects_kept: int = 0
    temp_files_removed: int = 0
    dry_run: bool = False

    def to_json(self) -> dict:
        return {"runs_removed": [{"flow": f, "run_id": r} for f, r in self.runs_removed],
                "objects_removed": self.objects_removed, "bytes_freed": self.bytes_freed,
                "objects_kept": self.objects_kept, "temp_files_removed": self.temp_files_removed,
                "dry_run": self.dry_run}

    def summary(self) -> str:
        verb = "would remove" if self.dry_run else "removed"
        return (f"gc {verb} {len(self.runs_removed)} run(s) and {self.objects_removed} object(s), "
                f"{self.bytes_freed / 1e6:.1f} MB; {self.objects_kept} object(s) kept")


def gc(store: Store, keep: int | None = None, *, dry_run: bool = False,
       grace_seconds: float = DEFAULT_GRACE_S) -> GCResult:
    """Keep the newest ``keep`` runs of each flow (all runs when None) plus
    every running run; remove the other runs and unreferenced objects."""
    if keep is not None and keep < 0:
        raise ValueError(f"keep must be 0 or more, not {keep}")
    result = GCResult(dry_run=dry_run)
    started = time.time()
    running_starts: list[float] = []
    doomed: list[tuple[str, int]] = []
    for flow in store.meta.list_flows():
        runs = store.meta.list_runs(flow)
        running_starts += [r.started_at for r in runs if r.status == "running"]
        if keep is not None:
            doomed += [(flow, r.run_id) for r in runs[keep:] if r.status != "running"]
    result.runs_removed = doomed

    referenced_before = store.meta.referenced_objects()
    if doomed and not dry_run:
        # the store has the last word: it spares runs that became live (or the
        # origin of a live resume) since they were listed
        doomed = [(flow, r) for flow in sorted({f for f, _ in doomed})
                  for r in store.meta.delete_runs(flow, [r for f, r in doomed if f == flow])]
        result.runs_removed = doomed
    referenced = store.meta.referenced_objects(exclude_runs=doomed if dry_run else ())
    released = referenced_before - referenced  # recorded by a removed run only

    live_since = min(running_starts, default=float("inf"))
    orphan_cutoff = min(started - grace_seconds, live_since)
    for key in list(store.objects.keys()):
        if key in referenced:
            result.objects_kept += 1
            continue
        # a live run may have written or re-used (touched) it without recording it yet
        cutoff = live_since if key in released else orphan_cutoff
        size = _size_if_older(store, key, min(cutoff, started))
        if size is None:
            result.objects_kept += 1
            continue
        result.objects_removed += 1
        result.bytes_freed += size if dry_run else store.objects.delete(key)
    result.temp_files_removed = _remove_stale_temps(store, orphan_cutoff, dry_run)  # live writers' too
    return result


def _size_if_older(store: Store, key: str, cutoff: float) -> int | None:
    """The object's size if its mtime is before ``cutoff``, else None. Checked
    right before deleting: a writer that re-uses an object touches it first."""
    try:
        st = store.objects.path(key).stat()
    except FileNotFoundError:
        return None
    return st.st_size if st.st_mtime < cutoff else None


def _remove_stale_temps(store: Store, cutoff: float, dry_run: bool) -> int:
    removed = 0
    for tmp in store.objects.tmp_dir.iterdir():
        try:
            if tmp.stat().st_mtime < cutoff:
                if not dry_run:
                    os.unlink(tmp)
                removed += 1
        except FileNotFoundError:
            continue
    return removed
