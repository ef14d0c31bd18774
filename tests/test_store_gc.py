"""gc: old runs go, objects no remaining run uses go, live runs are untouched."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from flowmagic.store import Store, open_store, save_artifact
from flowmagic.store.gc import gc
from flowmagic.store.serializers import load_artifact

OLD = time.time() - 7 * 86400


def _age(store: Store, key: str, when: float = OLD) -> None:
    os.utime(store.objects.path(key), (when, when))


def _run(store: Store, flow: str, values: dict, *, status: str = "succeeded", outputs=()) -> tuple[int, list]:
    run_id = store.meta.new_run(flow, params={}, code={})
    task = store.meta.new_task(flow, run_id, "start")
    refs = [save_artifact(store.objects, k, v) for k, v in values.items()]
    for ref in refs:
        if ref.serializer != "inline":
            _age(store, ref.hash)
    store.meta.record_attempt(task, 0, outcome="ok", started_at=0, finished_at=1, artifacts=refs,
                              outputs=list(outputs))
    if status != "running":
        store.meta.finish_run(flow, run_id, status)
    return run_id, refs


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return open_store(tmp_path / "store")


def _disk(store: Store) -> int:
    return sum(p.stat().st_size for p in store.objects.root.rglob("*") if p.is_file())


def test_keep_n_removes_old_runs_and_their_objects_only(store: Store) -> None:
    shared = np.arange(100_000, dtype=np.float64)
    runs = [_run(store, "F", {"shared": shared, "own": np.full(50_000, i, dtype=np.float64), "n": i})
            for i in range(4)]
    other_flow = _run(store, "G", {"own": np.full(10, 9.0)})
    before = _disk(store)

    result = gc(store, keep=2)

    assert result.runs_removed == [("F", 2), ("F", 1)]
    assert [r.run_id for r in store.meta.list_runs("F")] == [4, 3]
    assert [r.run_id for r in store.meta.list_runs("G")] == [other_flow[0]]
    assert result.objects_removed == 2 and result.bytes_freed >= 2 * 400_000
    assert before - _disk(store) == result.bytes_freed
    for run_id, refs in runs[2:] + [other_flow]:  # what remains still loads
        for ref in refs:
            load_artifact(store.objects, ref)
    assert not store.objects.exists(runs[0][1][1].hash)  # run 1's own array is gone
    assert store.objects.exists(runs[0][1][0].hash)  # the shared one is used by run 3 and 4
    assert store.meta.new_run("F", params={}, code={}) == 5  # ids are never reused


def test_running_runs_and_their_unrecorded_objects_survive(store: Store) -> None:
    for i in range(3):
        _, refs = _run(store, "F", {"v": np.full(1000, i)})
        _age(store, refs[0].hash, OLD - 100)  # written before the live run started
    live_id, live_refs = _run(store, "F", {"v": np.full(1000, 99)}, status="running")
    # the live run started long ago, and a task of it has written an object it has not recorded yet
    with store.meta._write() as conn:
        conn.execute("UPDATE runs SET started_at = ? WHERE run_id = ?", (OLD - 10, live_id))
    pending = save_artifact(store.objects, "late", np.full(1000, 7))
    _age(store, pending.hash, OLD)  # written after the live run started

    result = gc(store, keep=0, grace_seconds=0)

    assert [r.run_id for r in store.meta.list_runs("F")] == [live_id]
    assert result.runs_removed == [("F", 3), ("F", 2), ("F", 1)]
    assert store.objects.exists(live_refs[0].hash) and store.objects.exists(pending.hash)
    assert result.objects_removed == 3
    # an object written now, which the live run has not recorded yet, is kept too
    reused = save_artifact(store.objects, "again", np.full(1000, 0))
    assert gc(store, keep=0, grace_seconds=0).objects_removed == 0 and store.objects.exists(reused.hash)


def test_orphans_wait_for_the_grace_period(store: Store) -> None:
    fresh = store.objects.put_bytes(b"a task wrote me a moment ago")
    old = store.objects.put_bytes(b"a task that crashed last week wrote me")
    _age(store, old)
    stale_tmp = store.objects.tmp_dir / "w123-dead"
    stale_tmp.write_bytes(b"partial")
    os.utime(stale_tmp, (OLD, OLD))
    live_tmp = store.objects.tmp_dir / "w456-writing"
    live_tmp.write_bytes(b"partial")

    result = gc(store)

    assert result.runs_removed == [] and result.objects_removed == 1 and result.temp_files_removed == 1
    assert store.objects.exists(fresh) and not store.objects.exists(old)
    assert live_tmp.exists() and not stale_tmp.exists()


def test_objects_referenced_by_stored_outputs_are_kept(store: Store) -> None:
    png = store.objects.put_bytes(b"\x89PNG fake image")
    _age(store, png)
    outputs = [{"data": {"image/png": {"object": png, "size": 15, "encoding": "base64"}}}]
    _run(store, "F", {"x": 1}, outputs=outputs)
    result = gc(store, keep=1, grace_seconds=0)
    assert result.objects_removed == 0 and store.objects.exists(png)
    gc(store, keep=0, grace_seconds=0)
    assert not store.objects.exists(png)


def test_dry_run_reports_without_removing(store: Store) -> None:
    for i in range(3):
        _run(store, "F", {"v": np.full(1000, i)})
    before = (sorted(store.objects.keys()), len(store.meta.list_runs("F")))
    report = gc(store, keep=1, dry_run=True)
    assert report.runs_removed == [("F", 2), ("F", 1)] and report.objects_removed == 2
    assert report.bytes_freed > 0 and report.to_json()["dry_run"] is True
    assert (sorted(store.objects.keys()), len(store.meta.list_runs("F"))) == before
    real = gc(store, keep=1)
    assert (real.runs_removed, real.objects_removed, real.bytes_freed) == (
        report.runs_removed, report.objects_removed, report.bytes_freed)
    assert "removed 2 run(s) and 2 object(s)" in real.summary()


def test_bad_keep_is_refused(store: Store) -> None:
    with pytest.raises(ValueError, match="keep must be 0 or more"):
        gc(store, keep=-1)
