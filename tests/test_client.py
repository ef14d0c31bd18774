"""Client API over a real store written the way the orchestrator writes it."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import flowmagic
from flowmagic import DataArtifact, Flow, Metaflow, Run, Step, Task, namespace_root
from flowmagic.client import TaskException
from flowmagic.errors import NotFoundError, UsageError
from flowmagic.store import Store, open_store, save_artifact

GRAPH = {"flow": "MovieFlow", "steps": [
    {"name": "start", "next": ["compute"]}, {"name": "compute", "next": ["join"]},
    {"name": "join", "next": []}]}


def _task(store: Store, flow: str, run_id: int, step: str, values: dict, *, state: str = "done",
          index: tuple[int, ...] | None = None, item: str | None = None, stdout: str = "",
          exception: dict | None = None) -> int:
    task = store.meta.new_task(flow, run_id, step, index=index, item=item)
    refs = [save_artifact(store.objects, k, v, step=step) for k, v in values.items()]
    outcome = "ok" if exception is None else "failed"
    now = time.time()
    store.meta.record_attempt(task, 0, outcome=outcome, started_at=now - 1, finished_at=now, stdout=stdout,
                              stderr="warn\n" if exception else "", exception=exception, artifacts=refs,
                              exit_code=0 if exception is None else 1)
    store.meta.set_task_state(task, state)
    return task


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Store:
    """MovieFlow with three runs: 1 succeeded, 2 failed (a caught foreach
    item), 3 still running; HelloFlow with one run."""
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "store"))
    namespace_root(None)
    store = open_store()
    meta = store.meta
    movies = pd.DataFrame({"title": ["Alien", "Heat"], "genre": ["Sci-Fi", "Crime"]})
    for run_no, status in ((1, "succeeded"), (2, "failed"), (3, "running")):
        run_id = meta.new_run("MovieFlow", params={"genre": "Sci-Fi", "alpha": 0.01},
                              code={"start": "movies = load()", "_prelude": "import pandas as pd"},
                              tags=["nightly"] if run_no != 2 else ["adhoc"], graph=GRAPH)
        assert run_id == run_no
        _task(store, "MovieFlow", run_id, "start", {"movies": movies, "params": [0.1, 0.2, 0.0]},
              stdout="loaded 2 movies\n")
        if run_no == 3:
            continue
        for i, div in enumerate([0.1, 0.2, 0.0]):
            failed = run_no == 2 and div == 0.0
            _task(store, "MovieFlow", run_id, "compute",
                  {"x": None if div == 0 else 5 / div, "weights": np.full(4, i, dtype=np.float64)},
                  index=(i,), item=repr(div), state="caught" if failed else "done",
                  exception={"type": "ZeroDivisionError", "message": "float division by zero",
                             "traceback": "Traceback...\nZeroDivisionError: float division by zero\n"}
                  if failed else None)
        _task(store, "MovieFlow", run_id, "join", {"failed": [False, False, run_no == 2]})
        meta.finish_run("MovieFlow", run_id, status)
    hello = meta.new_run("HelloFlow", params={}, code={})
    _task(store, "HelloFlow", hello, "start", {"x": 1})
    meta.finish_run("HelloFlow", hello, "succeeded")
    return store


def test_the_design_example_works(store: Store) -> None:
    with pytest.raises(NotFoundError, match="steps with tasks: start"):
        Flow("MovieFlow").latest_run["join"]  # run 3 is still running
    assert Flow("MovieFlow").latest_successful_run["join"].task.data.failed == [False, False, False]
    assert Run("MovieFlow/2")["join"].task.data.failed == [False, False, True]
    df = Run("MovieFlow/1")["start"].task["movies"].data
    pd.testing.assert_frame_equal(df, pd.DataFrame({"title": ["Alien", "Heat"], "genre": ["Sci-Fi", "Crime"]}))


def test_flow_runs_newest_first_and_by_tags(store: Store) -> None:
    flow = Flow("MovieFlow")
    assert [r.id for r in flow.runs()] == ["3", "2", "1"]
    assert [r.run_id for r in flow] == [3, 2, 1]
    assert [r.id for r in flow.runs("nightly")] == ["3", "1"]
    assert flow.runs("nightly", "adhoc") == []
    assert flow.latest_run == Run("MovieFlow/3")
    assert flow.latest_successful_run.pathspec == "MovieFlow/1"
    assert flow[2].status == "failed" and 2 in flow and 9 not in flow
    assert [f.name for f in Metaflow().flows] == ["HelloFlow", "MovieFlow"]


def test_run_properties(store: Store) -> None:
    run = Run("MovieFlow/1")
    assert (run.status, run.successful, run.finished) == ("succeeded", True, True)
    assert run.finished_at >= run.created_at and run.finished_at.tzinfo is not None
    assert run.parameters == {"genre": "Sci-Fi", "alpha": 0.01}
    assert run.code["start"] == "movies = load()" and "_prelude" in run.code
    assert run.tags == frozenset({"nightly"})
    assert [s.name for s in run] == ["start", "compute", "join"]
    assert "compute" in run and "end" not in run
    assert run.data.failed == [False, False, False]  # run.data is the end task's
    running = Run("MovieFlow/3")
    assert (running.finished, running.successful, running.finished_at) == (False, False, None)
    assert running.end_task.step.name == "start"
    assert Run("MovieFlow/latest") == running


def test_tags_are_added_and_removed(store: Store) -> None:
    run = Run("MovieFlow/2")
    run.add_tag("reviewed")
    run.add_tags(["a", "b"])
    run.remove_tag("adhoc")
    assert Run("MovieFlow/2").tags == {"reviewed", "a", "b"}
    assert [r.id for r in Flow("MovieFlow").runs("reviewed")] == ["2"]
    assert store.meta.get_run("MovieFlow", 2).tags == ("a", "b", "reviewed")


def test_steps_and_foreach_tasks(store: Store) -> None:
    step = Run("MovieFlow/2")["compute"]
    tasks = step.tasks()
    assert [t.index for t in tasks] == [(0,), (1,), (2,)]
    assert [t.item for t in tasks] == ["0.1", "0.2", "0.0"]
    assert step.task == tasks[0] and list(step) == tasks
    assert [t.data.x for t in tasks] == [50.0, 25.0, None]
    assert step[tasks[1].id] == tasks[1] and step[tasks[1].task_id].pathspec == tasks[1].pathspec
    np.testing.assert_array_equal(tasks[2].data.weights, np.full(4, 2.0))
    assert Step(step.pathspec) == step and step.run == Run("MovieFlow/2")


def test_task_logs_exception_and_state(store: Store) -> None:
    caught = Run("MovieFlow/2")["compute"].tasks()[2]
    # a caught task is a successful task whose --catch artifact holds the exception (as in Metaflow)
    assert caught.state == "caught" and caught.successful and caught.finished
    exc = caught.exception
    assert isinstance(exc, TaskException) and exc.type == "ZeroDivisionError"
    assert str(exc) == "ZeroDivisionError: float division by zero" and "Traceback" in exc.traceback
    assert caught.stderr == "warn\n" and caught.current_attempt == 0
    start = Run("MovieFlow/1")["start"].task
    assert start.stdout == "loaded 2 movies\n" and start.exception is None and start.successful
    assert start.finished_at is not None and start.outputs == []
    assert [a.outcome for a in start.attempts] == ["ok"]


def test_artifacts_and_data_artifact(store: Store) -> None:
    task = Run("MovieFlow/1")["start"].task
    names = [a.name for a in task]
    assert names == ["movies", "params"] and sorted(dir(task.data)) == names
    art = task.artifacts.movies
    assert isinstance(art, DataArtifact) and art is task["movies"]
    assert (art.type, art.serializer) == ("pandas.DataFrame", "arrow-pandas")
    assert art.size > 0 and len(art.hash) == 32 and art.sha == art.hash
    assert task["params"].data == [0.1, 0.2, 0.0] and "params" in task.data and "nope" not in task
    direct = DataArtifact(f"{task.pathspec}/params")
    assert direct.data == [0.1, 0.2, 0.0] and direct.task == task
    assert Task(task.pathspec) == task


def test_data_is_loaded_lazily_one_artifact_at_a_time(store: Store) -> None:
    task = Run("MovieFlow/1")["start"].task
    # remove the frame's object: reading another artifact still works
    os.unlink(store.objects.path(task["movies"].hash))
    assert task.data.params == [0.1, 0.2, 0.0]
    with pytest.raises(NotFoundError, match="missing"):
        task.data.movies


def test_clear_errors_list_what_exists(store: Store) -> None:
    with pytest.raises(NotFoundError, match="flow 'NoFlow' does not exist.*flows there: HelloFlow, MovieFlow"):
        Flow("NoFlow")
    with pytest.raises(NotFoundError, match=r"run MovieFlow/42 does not exist; runs of MovieFlow: 3, 2, 1"):
        Run("MovieFlow/42")
    with pytest.raises(NotFoundError, match="step 'end' has no task in run MovieFlow/1; steps with tasks: "
                                            "start, compute, join"):
        Run("MovieFlow/1")["end"]
    task = Run("MovieFlow/1")["start"].task
    with pytest.raises(NotFoundError, match="has no artifact 'film'; its artifacts: movies, params"):
        task["film"]
    with pytest.raises(AttributeError, match="its artifacts: movies, params"):
        task.data.film
    with pytest.raises(NotFoundError, match="is not a task of MovieFlow/1/start; its tasks: "):
        Run("MovieFlow/1")["start"][999999]
    with pytest.raises(NotFoundError, match="not a run id"):
        Run("MovieFlow/abc")
    with pytest.raises(UsageError, match="pathspec like 'HelloFlow/3'"):
        Run("MovieFlow")
    with pytest.raises(AttributeError, match="immutable"):
        task.data.movies = None


def test_namespace_root_and_missing_store(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    elsewhere = open_store(tmp_path / "other")
    run_id = elsewhere.meta.new_run("OtherFlow", params={}, code={})
    try:
        assert namespace_root(tmp_path / "other") == tmp_path / "other"
        assert Flow("OtherFlow").latest_run.run_id == run_id
        with pytest.raises(NotFoundError, match="flows there: OtherFlow"):
            Flow("MovieFlow")
        namespace_root(tmp_path / "empty")
        with pytest.raises(NotFoundError, match="no flowmagic store at .*empty.*namespace_root"):
            Flow("MovieFlow")
    finally:
        namespace_root(None)
    assert Flow("MovieFlow").latest_run.id == "3"
    monkeypatch.delenv("FLOWMAGIC_HOME")
    monkeypatch.chdir(tmp_path / "store")  # ./.flowmagic does not exist there
    with pytest.raises(NotFoundError, match=r"no flowmagic store at .*\.flowmagic"):
        Flow("MovieFlow")
    assert Flow("OtherFlow", root=tmp_path / "other").name == "OtherFlow"


def test_session_run_shows_the_latest_execution_of_a_step(store: Store) -> None:
    meta = store.meta
    run_id = meta.new_run("MovieFlow", params={}, code={}, interactive=True)
    _task(store, "MovieFlow", run_id, "start", {"x": 1})
    _task(store, "MovieFlow", run_id, "start", {"x": 2})  # the cell was executed again
    step = Run(f"MovieFlow/{run_id}")["start"]
    assert step.task.data.x == 2 and len(step.tasks()) == 1 and len(step.all_tasks()) == 2
    assert Run(f"MovieFlow/{run_id}").interactive


def test_cloned_tasks_point_to_their_origin(store: Store) -> None:
    origin = Run("MovieFlow/2")["start"].task
    resumed = store.meta.new_run("MovieFlow", params={}, code={}, origin_run_id=2)
    store.meta.clone_task(origin.task_id, resumed)
    clone = Run(f"MovieFlow/{resumed}")["start"].task
    assert clone.state == "cloned" and clone.successful and clone.origin == origin
    assert clone.data.params == origin.data.params and clone["movies"].hash == origin["movies"].hash
    assert Run(f"MovieFlow/{resumed}").origin_run == Run("MovieFlow/2")


def test_reprs_for_notebooks(store: Store) -> None:
    run = Run("MovieFlow/2")
    assert repr(run) == "Run('MovieFlow/2')" and repr(Flow("MovieFlow")) == "Flow('MovieFlow')"
    html = run._repr_html_()
    assert "MovieFlow/2: failed" in html and "compute" in html and "caught" in html
    flow_html = Flow("MovieFlow")._repr_html_()
    assert flow_html.count("<tr>") == 4 and "nightly" in flow_html
    task = run["compute"].tasks()[2]
    assert "ZeroDivisionError" in task._repr_html_() and "weights" in task._repr_html_()
    assert "numpy.ndarray" in repr(task["weights"]) and "Artifact" in task["weights"]._repr_html_()
    assert "shape (4,), dtype float64" in task["weights"]._repr_html_()
    movies = Run("MovieFlow/1")["start"].task["movies"]._repr_html_()
    assert "shape (2, 2)" in movies and "Alien" in movies and "<table" in movies
    assert "<TaskData" in repr(task.data) and "x" in repr(task.data)
    assert "[0]" in run["compute"]._repr_html_()
    assert "<script" not in Flow("MovieFlow")._repr_html_()


def test_client_names_are_lazy_in_the_package() -> None:
    code = "import sys, flowmagic; assert 'flowmagic.client' not in sys.modules; " \
           "from flowmagic import Flow; assert 'flowmagic.client' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert {"Flow", "Run", "namespace_root"} <= set(dir(flowmagic))


def test_a_client_in_another_process_reads_a_run_being_written(store: Store) -> None:
    reader = textwrap.dedent("""
        import sys, time
        from flowmagic import Flow
        seen = set()
        deadline = time.time() + 20
        while time.time() < deadline:
            run = Flow("MovieFlow").latest_run
            seen.add((run.id, run.status))
            if run.status == "succeeded" and run.id == "5":
                print(run["start"].task.data.x, sorted(seen))
                break
            time.sleep(0.02)
    """)
    proc = subprocess.Popen([sys.executable, "-c", reader], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "FLOWMAGIC_HOME": str(store.root)})
    time.sleep(1.5)
    run_id = store.meta.new_run("MovieFlow", params={}, code={})
    assert run_id == 4
    time.sleep(0.3)
    run_id = store.meta.new_run("MovieFlow", params={}, code={})
    _task(store, "MovieFlow", run_id, "start", {"x": "written"})
    store.meta.finish_run("MovieFlow", run_id, "succeeded")
    out, _ = proc.communicate(timeout=30)
    assert out.startswith("written ") and "('5', 'succeeded')" in out


@pytest.mark.slow
def test_two_identical_runs_through_the_real_cli_share_their_objects(tmp_path: Path) -> None:
    """End to end: `flowmagic run` twice on a notebook, read back with the
    client; the second run adds almost no bytes to the store."""
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import numpy as np\nimport pandas as pd"),
                nbformat.v4.new_code_cell("%%step start\narr = np.arange(2_500_000, dtype=np.float64)\n"
                                          "df = pd.DataFrame({'a': arr[:100_000], 'b': ['x'] * 100_000})"),
                nbformat.v4.new_code_cell("%%step end\ntotal = float(arr.sum()) + len(df)")]
    path = tmp_path / "dedup_flow.ipynb"
    nbformat.write(nb, path)
    env = {**os.environ, "FLOWMAGIC_HOME": str(tmp_path / "store")}

    def run_and_measure() -> int:
        subprocess.run(["flowmagic", "run", str(path), "--json"], check=True, env=env, cwd=tmp_path,
                       capture_output=True, timeout=120)
        return sum(p.stat().st_size for p in (tmp_path / "store").rglob("*") if p.is_file())

    first = run_and_measure()
    second = run_and_measure()
    assert first > 20_000_000  # the array is stored once...
    assert second - first < 0.01 * first  # ...and the identical run adds under 1%

    runs = Flow("DedupFlow", root=tmp_path / "store").runs()
    assert [r.status for r in runs] == ["succeeded", "succeeded"]
    arrays = [r["start"].task["arr"] for r in runs]
    assert arrays[0].hash == arrays[1].hash and arrays[0].serializer == "arrow-numpy"
    assert runs[0]["end"].task.data.total == float(np.arange(2_500_000).sum()) + 100_000
    assert runs[0].data.total == runs[1].data.total


def test_a_store_deleted_and_recreated_is_read_afresh(store: Store) -> None:
    import shutil

    assert Flow("MovieFlow").latest_run.id == "3"
    root = store.root
    store.close()
    shutil.rmtree(root)
    fresh = open_store(root)
    fresh.meta.new_run("NewFlow", params={}, code={})
    assert [f.name for f in Metaflow().flows] == ["NewFlow"]
    with pytest.raises(NotFoundError, match="flows there: NewFlow"):
        Flow("MovieFlow")


def test_the_default_root_is_dot_flowmagic_in_the_current_directory(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FLOWMAGIC_HOME", raising=False)
    namespace_root(None)
    store = open_store(tmp_path / ".flowmagic")
    store.meta.new_run("HereFlow", params={"a": 1}, code={})
    monkeypatch.chdir(tmp_path)
    assert namespace_root() == tmp_path / ".flowmagic"
    assert Flow("HereFlow").latest_run.parameters == {"a": 1}
