"""Metadata: runs, tasks, attempts, artifacts and logs in a real SQLite file."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from flowmagic.errors import NotFoundError, StoreError
from flowmagic.store import open_store, store_root
from flowmagic.store.metadata import SCHEMA_VERSION, Metadata
from flowmagic.store.serializers import ArtifactRef, save_artifact


@pytest.fixture
def meta(tmp_path: Path) -> Metadata:
    return Metadata(tmp_path / "metadata.sqlite")


def _ref(name: str, value: str = "1") -> ArtifactRef:
    return ArtifactRef(name, "int", len(value), "0" * 32, "inline", value)


def test_run_ids_increase_per_flow(meta: Metadata) -> None:
    assert [meta.new_run("A", params={}, code={}) for _ in range(3)] == [1, 2, 3]
    assert meta.new_run("B", params={}, code={}) == 1
    assert meta.new_run("A", params={}, code={}) == 4
    assert meta.list_flows() == ["A", "B"]


def test_a_run_records_what_design_asks(meta: Metadata) -> None:
    graph = {"flow": "F", "steps": [{"name": "start"}]}
    run_id = meta.new_run("F", params={"alpha": 0.5}, code={"start": "x = 1", "_prelude": "import os"},
                          tags=["b", "a"], user="ada", interactive=True, origin_run_id=None, graph=graph)
    run = meta.get_run("F", run_id)
    assert (run.status, run.params, run.code, run.tags, run.user, run.interactive) == (
        "running", {"alpha": 0.5}, {"start": "x = 1", "_prelude": "import os"}, ("a", "b"), "ada", True)
    assert run.graph == graph and run.finished_at is None and run.started_at <= time.time()
    assert run.pathspec == "F/1"
    meta.finish_run("F", run_id, "failed")
    run = meta.get_run("F", run_id)
    assert run.status == "failed" and run.finished_at >= run.started_at
    resumed = meta.new_run("F", params={}, code={}, origin_run_id=run_id)
    assert meta.get_run("F", resumed).origin_run_id == run_id
    assert meta.get_run("F", resumed).user  # defaults to the current user


def test_runs_newest_first_and_tag_filter(meta: Metadata) -> None:
    for i in range(4):
        meta.new_run("F", params={"i": i}, code={}, tags=["even"] if i % 2 == 0 else [])
    assert [r.run_id for r in meta.list_runs("F")] == [4, 3, 2, 1]
    assert [r.run_id for r in meta.list_runs("F", tag="even")] == [3, 1]
    meta.add_tags("F", 4, ["even", "x"])
    meta.remove_tags("F", 1, ["even"])
    assert [r.run_id for r in meta.list_runs("F", tag="even")] == [4, 3]
    assert meta.get_run("F", 4).tags == ("even", "x")
    assert meta.list_runs("nope") == []


def test_missing_runs_list_what_exists(meta: Metadata) -> None:
    meta.new_run("F", params={}, code={})
    meta.new_run("G", params={}, code={})
    with pytest.raises(NotFoundError, match=r"run F/7 does not exist; runs of F: 1"):
        meta.get_run("F", 7)
    with pytest.raises(NotFoundError, match=r"flow 'H' has no runs.*flows there: F, G"):
        meta.finish_run("H", 1, "succeeded")


def test_bad_states_are_rejected(meta: Metadata) -> None:
    run_id = meta.new_run("F", params={}, code={})
    task = meta.new_task("F", run_id, "start")
    with pytest.raises(ValueError, match="unknown run status 'done'"):
        meta.finish_run("F", run_id, "done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown task state"):
        meta.set_task_state(task, "exploded")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown attempt outcome"):
        meta.record_attempt(task, 0, outcome="meh", started_at=0, finished_at=1)  # type: ignore[arg-type]
    with pytest.raises(NotFoundError, match="task 999"):
        meta.set_task_state(999, "done")


def test_task_ids_are_unique_in_the_store(meta: Metadata) -> None:
    a = meta.new_run("A", params={}, code={})
    b = meta.new_run("B", params={}, code={})
    ids = [meta.new_task("A", a, "start"), meta.new_task("B", b, "start"),
           meta.new_task("A", a, "fan", index=(0,), item="0.1"), meta.new_task("A", a, "fan", index=(1, 2), item="x")]
    assert len(set(ids)) == 4 and ids == sorted(ids)
    fan = meta.tasks("A", a, "fan")
    assert [(t.index, t.item, t.state) for t in fan] == [((0,), "0.1", "pending"), ((1, 2), "x", "pending")]
    assert [t.step for t in meta.tasks("A", a)] == ["start", "fan", "fan"]
    assert meta.step_names("A", a) == ["start", "fan"] and meta.step_names("A", 99) == []
    assert fan[0].pathspec == f"A/{a}/fan/{ids[2]}"
    meta.set_task_state(ids[0], "running")
    assert meta.get_task(ids[0]).state == "running"


def test_attempts_keep_logs_exception_outputs_and_artifacts(meta: Metadata) -> None:
    run_id = meta.new_run("F", params={}, code={})
    task = meta.new_task("F", run_id, "start")
    exc = {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "Traceback ...\n"}
    meta.record_attempt(task, 0, outcome="failed", started_at=1.0, finished_at=2.0, exit_code=1, exception=exc,
                        stdout="trying\n", stderr="oops\n", artifacts=[_ref("x", "1"), _ref("partial")])
    meta.set_task_state(task, "retrying")
    outputs = [{"mime": {"text/plain": "<Figure>"}, "hash": "a" * 32}]
    meta.record_attempt(task, 1, outcome="ok", started_at=3.0, finished_at=4.0, exit_code=0, stdout="done\n",
                        artifacts=[_ref("x", "2").to_dict()], outputs=outputs)  # manifests carry dicts
    first, second = meta.attempts(task)
    assert (first.outcome, first.exit_code, first.exception, first.stdout, first.stderr) == (
        "failed", 1, exc, "trying\n", "oops\n")
    assert (second.outcome, second.exception, second.outputs, second.stdout) == ("ok", None, outputs, "done\n")
    assert meta.artifacts(task) == [_ref("x", "2")]  # only the last attempt is visible
    killed = meta.new_task("F", run_id, "slow")
    meta.record_attempt(killed, 0, outcome="timeout", started_at=1, finished_at=61, signal=9)
    assert meta.attempts(killed)[0].signal == 9 and meta.artifacts(killed) == []


def test_recording_an_attempt_again_replaces_it(meta: Metadata) -> None:
    run_id = meta.new_run("F", params={}, code={})
    task = meta.new_task("F", run_id, "start")
    meta.record_attempt(task, 0, outcome="failed", started_at=0, finished_at=1, artifacts=[_ref("a")])
    meta.record_attempt(task, 0, outcome="ok", started_at=0, finished_at=1, artifacts=[_ref("b")])
    assert [a.outcome for a in meta.attempts(task)] == ["ok"]
    assert [r.name for r in meta.artifacts(task)] == ["b"]


def test_clone_task_shares_artifacts_by_reference(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store")
    meta = store.meta
    origin = meta.new_run("F", params={}, code={})
    task = meta.new_task("F", origin, "fan", index=(2,), item="c")
    big = save_artifact(store.objects, "big", np.arange(100_000))
    meta.record_attempt(task, 0, outcome="failed", started_at=0, finished_at=1)
    meta.record_attempt(task, 1, outcome="ok", started_at=0, finished_at=1, stdout="hi", artifacts=[big])
    objects_before = list(store.objects.keys())
    resumed = meta.new_run("F", params={}, code={}, origin_run_id=origin)
    clone = meta.clone_task(task, resumed)
    record = meta.get_task(clone)
    assert (record.run_id, record.step, record.index, record.item, record.state, record.origin_task_id) == (
        resumed, "fan", (2,), "c", "cloned", task)
    assert meta.artifacts(clone) == [big]
    assert [a.stdout for a in meta.attempts(clone)] == ["hi"]
    assert list(store.objects.keys()) == objects_before  # nothing copied
    cached = meta.clone_task(task, resumed, state="cached")
    assert meta.get_task(cached).state == "cached"
    with pytest.raises(NotFoundError):
        meta.clone_task(12345, resumed)


def test_data_survives_reopening_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    first = Metadata(path)
    run_id = first.new_run("F", params={"a": [1, 2]}, code={"start": "pass"})
    first.close()
    again = Metadata(path)
    assert again.get_run("F", run_id).params == {"a": [1, 2]}
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_forked_child_reads_through_its_own_connection(meta: Metadata) -> None:
    run_id = meta.new_run("F", params={}, code={})
    pid = os.fork()
    if pid == 0:  # child: must not reuse the parent's SQLite connection
        try:
            ok = meta.get_run("F", run_id).run_id == run_id
            meta.new_run("F", params={}, code={})
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert [r.run_id for r in meta.list_runs("F")] == [2, 1]


def test_fork_while_another_thread_holds_the_lock(meta: Metadata) -> None:
    """The orchestrator has threads; a fork taken while one of them is inside
    a metadata call must not leave the child waiting for that lock forever."""
    import threading

    run_id = meta.new_run("F", params={}, code={})
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with meta._lock:
            holding.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    holding.wait(5)
    try:
        pid = os.fork()
        if pid == 0:
            try:
                os._exit(0 if meta.get_run("F", run_id).run_id == run_id else 1)
            except BaseException:
                os._exit(2)
        deadline = time.time() + 10
        while time.time() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child deadlocked on the metadata lock")
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        thread.join()


# -- damaged or foreign stores ---------------------------------------------------
def test_a_store_from_a_newer_flowmagic_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    Metadata(path).close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_info SET value = ? WHERE key = 'version'", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match=f"newer flowmagic.*schema version {SCHEMA_VERSION + 1}"):
        Metadata(path)


def test_a_garbage_file_is_a_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    path.write_bytes(os.urandom(8192))
    with pytest.raises(StoreError, match="cannot be used.*corrupted"):
        Metadata(path)


def test_a_truncated_database_is_a_clear_store_error(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    meta = Metadata(path)
    for i in range(300):  # enough rows for many pages
        run_id = meta.new_run("F", params={"blob": "x" * 500}, code={"start": "y" * 500})
        meta.new_task("F", run_id, "start")
    meta.close()  # checkpoints the WAL into the main file
    assert path.stat().st_size > 100_000
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 3)
    with pytest.raises(StoreError, match="cannot be used"):
        reopened = Metadata(path)
        reopened.list_runs("F")
        reopened.tasks("F", 300)


def test_another_applications_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "metadata.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(StoreError, match="not a flowmagic store.*invoices"):
        Metadata(path)


def test_store_root_follows_flowmagic_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWMAGIC_HOME", raising=False)
    assert store_root(tmp_path) == tmp_path / ".flowmagic"
    monkeypatch.chdir(tmp_path)
    assert store_root() == tmp_path / ".flowmagic"
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "elsewhere"))
    assert store_root(tmp_path) == tmp_path / "elsewhere"
    store = open_store()
    assert store.root == tmp_path / "elsewhere" and (store.root / "metadata.sqlite").exists()


def test_a_file_where_the_store_should_be_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "notadir").write_text("oops")
    with pytest.raises(StoreError, match="cannot use .*notadir as a flowmagic store.*FLOWMAGIC_HOME"):
        open_store(tmp_path / "notadir")


def test_latest_tasks_pages_through_the_latest_generation_as_latest_generation_picks_it(meta):
    from flowmagic.store.schema import latest_generation

    run = meta.new_run("Gen", params={}, code={}, interactive=True)
    meta.new_tasks("Gen", run, "fit", [((i,), None) for i in range(12)])        # a cell executed,
    meta.new_tasks("Gen", run, "fit", [((i,), None) for i in range(7)])         # and again
    meta.new_tasks("Gen", run, "nested", [((i, j), None) for i in range(3) for j in range(4)])
    meta.new_tasks("Gen", run, "start", [(None, None)])
    meta.new_tasks("Gen", run, "start", [(None, None)])
    for step in ("fit", "nested", "start", "nothing"):
        expected = [t.task_id for t in latest_generation(meta.tasks("Gen", run, step))]
        assert [t.task_id for t in meta.latest_tasks("Gen", run, step, page=5)] == expected, step
    assert [t.index for t in meta.latest_tasks("Gen", run, "fit", page=5)] == [(i,) for i in range(7)]
