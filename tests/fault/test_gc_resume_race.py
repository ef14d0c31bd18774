"""gc and resume never race: concurrent real processes, many interleavings.

A resume that starts while gc removes its origin either wins (gc spares the
origin of a live resume) or fails cleanly before running anything; it never
fails half-way ("task N does not exist, so it cannot be cloned") nor leaves
a stale running run."""
from __future__ import annotations

import multiprocessing as mp
import time
from pathlib import Path

import pytest

from runtime_helpers import command, env_for, flowmagic_json, write_notebook
from flowmagic.errors import NotFoundError
from flowmagic.store import open_store
from flowmagic.store.gc import gc

pytestmark = pytest.mark.slow   # hundreds of real resume/gc interleavings: not in the quick loop

FLOW = "Race"


def _seed(root: Path, runs: int) -> None:
    store = open_store(root)
    try:
        for _ in range(runs):
            run_id = store.meta.new_run(FLOW, params={}, code={})
            for step in ("start", "a", "b", "end"):
                task = store.meta.new_task(FLOW, run_id, step)
                store.meta.record_attempt(task, 0, outcome="ok", started_at=0, finished_at=0)
                store.meta.set_task_state(task, "done")
            store.meta.finish_run(FLOW, run_id, "succeeded")
    finally:
        store.close()


def _resumer(root: str, seconds: float, out) -> None:
    """What resume does with the store: read the origin, create the run, clone."""
    store = open_store(root)
    counts = {"resumed": 0, "refused": 0, "errors": []}
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        origin = next(r for r in store.meta.list_runs(FLOW) if r.status != "running")
        tasks = store.meta.tasks(FLOW, origin.run_id)
        try:
            run_id = store.meta.new_run(FLOW, params={}, code={}, origin_run_id=origin.run_id)
        except NotFoundError as exc:
            assert "removed (by gc)" in str(exc)
            counts["refused"] += 1
            continue
        try:
            for t in tasks:
                store.meta.clone_task(t.task_id, run_id)
            store.meta.finish_run(FLOW, run_id, "succeeded")
            counts["resumed"] += 1
        except Exception as exc:  # noqa: BLE001 - what the test counts
            counts["errors"].append(str(exc))
            store.meta.finish_run(FLOW, run_id, "failed")
    out.put(counts)


def _collector(root: str, seconds: float, out) -> None:
    store = open_store(root)
    passes = removed = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        removed += len(gc(store, keep=1, grace_seconds=0).runs_removed)
        passes += 1
    out.put({"gc_passes": passes, "runs_removed": removed})


def test_store_level_resume_and_gc_interleave_hundreds_of_times(tmp_path):
    root = tmp_path / "store"
    _seed(root, 3)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_resumer, args=(str(root), 8.0, out)) for _ in range(2)]
    procs.append(ctx.Process(target=_collector, args=(str(root), 8.0, out)))
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    resumes = [r for r in results if "resumed" in r]
    collected = next(r for r in results if "gc_passes" in r)
    tries = sum(r["resumed"] + r["refused"] for r in resumes)
    print(f"{tries} resumes ({sum(r['refused'] for r in resumes)} refused cleanly) beside "
          f"{collected['gc_passes']} gc passes that removed {collected['runs_removed']} runs")
    assert [e for r in resumes for e in r["errors"]] == []
    assert tries >= 100 and collected["runs_removed"] >= 50  # the interleavings did happen
    store = open_store(root)
    try:
        assert [r.run_id for r in store.meta.list_runs(FLOW) if r.status == "running"] == []
    finally:
        store.close()


NB = [
    "%%step start\nx = 1",
    "%%step middle\ny = x + 1",
    "%%step end\nz = y + 1",
]


def test_console_resume_beside_gc_keep_1(tmp_path):
    import subprocess

    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "race.ipynb", NB)
    flowmagic_json("run", nb, store=store)
    env = env_for(store)
    deadline = time.monotonic() + 15
    outcomes: list[tuple[int, str]] = []
    gcs = 0
    while time.monotonic() < deadline:
        # --from: a resume of a run that succeeded would run nothing, and is refused
        resume = subprocess.Popen([*command(), "resume", str(nb), "--from", "middle"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while resume.poll() is None:  # gc as often as it can while the resume runs
            subprocess.run([*command(), "gc", str(nb), "--keep", "1"], env=env, capture_output=True, check=True)
            gcs += 1
        outcomes.append((resume.returncode, resume.stderr.read()))
        resume.stderr.close()
    bad = [(code, err) for code, err in outcomes
           if not (code == 0 or (code == 2 and "removed (by gc)" in err))]
    print(f"{len(outcomes)} console resumes beside {gcs} gc runs; {sum(c == 0 for c, _ in outcomes)} succeeded")
    assert bad == [] and len(outcomes) >= 5
    status = flowmagic_json("status", nb, store=store)
    assert all(r["status"] != "running" for r in status["runs"])
    assert flowmagic_json("fsck", store, store=store)["ok"]
