"""A store written by the previous release (0.1, commit 356d1ae) opens and works unchanged.

tests/data/store_0_1/ was written by that release's console command
(`flowmagic run store_0_1_flow.ipynb --tag v0.1`, then `--scale 3`): its schema
has no orchestrator columns, its --catch records are plain dicts. Each test
works on a copy, so the fixture stays as the old release left it.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from runtime_helpers import flowmagic_json

DATA = Path(__file__).resolve().parent / "data"


@pytest.fixture
def old_store(tmp_path: Path) -> tuple[Path, Path]:
    store = tmp_path / "store"
    shutil.copytree(DATA / "store_0_1", store)
    notebook = tmp_path / "old_flow.ipynb"
    shutil.copy(DATA / "store_0_1_flow.ipynb", notebook)
    return store, notebook


def test_status_and_dump_read_the_old_runs(old_store):
    store, notebook = old_store
    status = flowmagic_json("status", notebook, store=store)
    assert [(r["run_id"], r["status"], r["tags"]) for r in status["runs"]] == [
        (2, "succeeded", []), (1, "succeeded", ["v0.1"])]
    dump = flowmagic_json("dump", notebook, "1/join", store=store)
    assert sorted(a["name"] for a in dump["artifacts"]) == ["failed", "rows", "total"]


def test_the_client_loads_old_artifacts(old_store):
    from flowmagic.client import Flow, namespace_root

    store, _ = old_store
    namespace_root(store)
    try:
        first = Flow("OldFlow")[1]
        join = first["join"].task.data
        assert (join.total, join.failed, join.rows) == (2 * 12 + 2 * 12 // 4, [0], 3)
        frame = first["start"].task.data.frame
        pd.testing.assert_frame_equal(frame, pd.DataFrame({"a": [1, 2, 3]}))
        caught = [t.data.oops for t in first["divide"].tasks()]
        assert [c is not None for c in caught] == [False, True, False]
        assert caught[1]["type"] == "ZeroDivisionError"
        assert Flow("OldFlow").latest_successful_run.run_id == 2
    finally:
        namespace_root(None)


def test_resume_and_fsck_work_on_the_old_store(old_store):
    store, notebook = old_store
    resumed = flowmagic_json("resume", notebook, "1", "--from", "join", store=store)
    assert resumed["status"] == "succeeded" and resumed["origin_run_id"] == 1
    dump = flowmagic_json("dump", notebook, f"{resumed['run_id']}/join", store=store)
    assert sorted(a["name"] for a in dump["artifacts"]) == ["failed", "rows", "total"]
    report = flowmagic_json("fsck", store, store=store)
    assert report["ok"] is True, report
