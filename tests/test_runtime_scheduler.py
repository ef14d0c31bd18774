"""The scheduler's Python API (what the magics call): real fork server, real store."""
from __future__ import annotations

import pytest

from flowmagic.flow.graph import build_flow
from flowmagic.errors import RunError, UsageError
from flowmagic.runtime.worker.forkserver import PreludeError
from flowmagic.runtime.orchestrator.scheduler import new_session_run, resume_flow, run_flow, run_step
from flowmagic.store import load_artifact, open_store


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    yield s
    s.close()


def values(store, refs):
    if isinstance(refs, list):
        return [values(store, r) for r in refs]
    return load_artifact(store.objects, refs)


def collect():
    events = []
    return events, events.append


def test_run_flow_emits_ordered_events_and_labels(store, tmp_path):
    graph = build_flow(["%%step start\nitems = [1, 2]\nprint('hi')",
                        "%%step each --foreach items\nsq = input ** 2\nprint('sq', sq)",
                        "%%step end\ntotal = sum(sq)"], name="Events")
    events, on_event = collect()
    result = run_flow(graph, store, on_event=on_event, workdir=str(tmp_path))
    assert result.status == "succeeded" and result.tasks == 4
    kinds = [e.kind for e in events]
    assert kinds[0] == "run" and events[0].state == "running"
    assert kinds[-1] == "run" and events[-1].state == "succeeded"
    outputs = {(e.label, e.text) for e in events if e.kind == "output"}
    assert ("each/0", "sq 1\n") in outputs and ("each/1", "sq 4\n") in outputs
    done = [e.step for e in events if e.kind == "task" and e.state == "done"]
    assert done.index("start") < done.index("each") and done[-1] == "end"


def test_session_run_step_by_step(store, tmp_path):
    cells = ["%%params\nscale = 2  # Multiplier",
             "%%step start\nitems = [1, 2, 3]",
             "%%step each --foreach items\ny = input * scale",
             "%%step end\ntotal = sum(y)"]
    graph = build_flow(cells, name="Session")
    run_id = new_session_run(graph, store)
    with pytest.raises(RunError, match=r"'each'.*cell 3.*execute that cell first"):
        run_step(graph, store, run_id, "end", workdir=str(tmp_path))
    first = run_step(graph, store, run_id, "start", workdir=str(tmp_path))
    assert first.status == "succeeded" and values(store, first.artifacts["items"]) == [1, 2, 3]
    each = run_step(graph, store, run_id, "each", workdir=str(tmp_path))
    assert len(each.task_ids) == 3 and values(store, each.artifacts["y"]) == [2, 4, 6]
    # Re-executing a cell adds a generation; readers use the latest one.
    graph2 = build_flow(cells[:1] + ["%%step start\nitems = [10]"] + cells[2:], name="Session")
    run_step(graph2, store, run_id, "start", workdir=str(tmp_path))
    run_step(graph2, store, run_id, "each", workdir=str(tmp_path))
    end = run_step(graph2, store, run_id, "end", workdir=str(tmp_path))
    assert values(store, end.artifacts["total"]) == 20
    assert store.meta.get_run("Session", run_id).interactive


def test_failed_step_reports_its_exception(store, tmp_path):
    graph = build_flow(["%%step start\nx = 1\nraise ValueError('nope')"], name="Fails")
    run_id = new_session_run(graph, store)
    result = run_step(graph, store, run_id, "start", workdir=str(tmp_path))
    assert result.status == "failed"
    assert result.exception["type"] == "ValueError" and "nope" in result.exception["message"]


def test_in_place_mutation_is_reported(store, tmp_path):
    graph = build_flow(["%%step start\nlst = [1]\ncfg = {'a': 1}",
                        "%%step grow\nlst.append(2)\ncfg.update(b=2)\nn = len(lst)"], name="Mutates")
    events, on_event = collect()
    result = run_flow(graph, store, on_event=on_event, workdir=str(tmp_path))
    assert result.status == "succeeded"
    warnings = [e.text for e in events if e.kind == "warning"]
    assert any("'lst' in place" in w and "assign the result" in w for w in warnings), warnings
    assert any("'cfg' in place" in w for w in warnings), warnings


def test_foreach_task_mutating_its_list_is_reported(store, tmp_path):
    # the list is loaded once per task and hashed only when the code names it (issue 18)
    graph = build_flow(["%%step start\nitems = [[1], [2]]",
                        "%%step each --foreach items\ny = input[0] * 10\nif y == 20:\n    items.append(3)",
                        "%%step end\ntotal = sum(y)"], name="MutatesList")
    events, on_event = collect()
    result = run_flow(graph, store, on_event=on_event, workdir=str(tmp_path))
    assert result.status == "succeeded"
    warnings = [(e.index, e.text) for e in events if e.kind == "warning"]
    assert [index for index, text in warnings if "'items' in place" in text] == [(1,)], warnings
    end = store.meta.tasks("MutatesList", result.run_id, "end")[0]
    total = next(r for r in store.meta.artifacts(end.task_id) if r.name == "total")
    assert load_artifact(store.objects, total) == 30


def test_unserialisable_values_warn_when_unused_and_fail_when_read(store, tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    unused = build_flow([f"%%step start\nf = open({str(path)!r})\ntext = f.read()",
                         "%%step end\nn = len(text)"], name="Unused")
    events, on_event = collect()
    assert run_flow(unused, store, on_event=on_event, workdir=str(tmp_path)).status == "succeeded"
    assert any("'f'" in e.text and "not persisted" in e.text for e in events if e.kind == "warning")

    used = build_flow([f"%%step start\nf = open({str(path)!r})",
                       "%%step end\ntext = f.read()"], name="Used")
    result = run_flow(used, store, workdir=str(tmp_path))
    assert result.status == "failed"
    [(step, line)] = result.failed
    assert step == "start" and "SerializationError" in line
    [task] = store.meta.tasks("Used", result.run_id, "start")
    exception = store.meta.attempts(task.task_id)[-1].exception
    assert "'f'" in exception["message"] and "TextIOWrapper" in exception["message"]


def test_prelude_error_stops_before_the_run(store, tmp_path):
    graph = build_flow(["import nonexistent_module_xyz", "%%step start\nx = 1"], name="BadPrelude")
    with pytest.raises(PreludeError, match="nonexistent_module_xyz"):
        run_flow(graph, store, workdir=str(tmp_path))
    assert store.meta.list_runs("BadPrelude") == []


def test_parameters_are_validated(store, tmp_path):
    graph = build_flow(["%%params\nn = 3  # count", "%%step start\nx = n * 2"], name="P")
    with pytest.raises(UsageError, match="parameter 'n'"):
        run_flow(graph, store, params={"n": "three"})
    with pytest.raises(UsageError, match="unknown parameter 'm'"):
        run_flow(graph, store, params={"m": 1})
    result = run_flow(graph, store, params={"n": "5"}, workdir=str(tmp_path))
    [task] = store.meta.tasks("P", result.run_id, "start")
    assert [values(store, r) for r in store.meta.artifacts(task.task_id)] == [10]


def test_resume_from_a_step_reruns_it_and_downstream_only(store, tmp_path):
    graph = build_flow(["%%step a\nx = 1", "%%step b\ny = x + 1", "%%step c\nz = y + 1",
                        "%%step side\nw = 5"], name="Chain")
    first = run_flow(graph, store, workdir=str(tmp_path))
    resumed = resume_flow(graph, store, from_step="b", workdir=str(tmp_path))
    assert resumed.status == "succeeded" and resumed.origin_run_id == first.run_id
    states = {t.step: t.state for t in store.meta.tasks("Chain", resumed.run_id)}
    assert states == {"a": "cloned", "b": "done", "c": "done", "side": "cloned"}
    with pytest.raises(UsageError, match="no step 'nope'"):
        resume_flow(graph, store, from_step="nope")


def test_step_cache_reuses_identical_tasks_only(store, tmp_path):
    cells = ["%%params\nk = 1  # factor",
             "%%step start\nitems = [1, 2, 3]",
             "%%step square --foreach items --cache\nsq = input * input * k",
             "%%step end\ntotal = sum(sq)"]
    graph = build_flow(cells, name="Cached")
    first = run_flow(graph, store, workdir=str(tmp_path))
    second = run_flow(graph, store, workdir=str(tmp_path))
    assert second.cached == 3 and second.status == "succeeded"
    states = [t.state for t in store.meta.tasks("Cached", second.run_id, "square")]
    assert states == ["cached"] * 3
    [end] = store.meta.tasks("Cached", second.run_id, "end")
    assert [values(store, r) for r in store.meta.artifacts(end.task_id)] == [14]
    # Different inputs, a different parameter value or different code: executed again.
    changed = build_flow(cells[:1] + ["%%step start\nitems = [1, 2, 4]"] + cells[2:], name="Cached")
    third = run_flow(changed, store, workdir=str(tmp_path))
    assert third.cached == 0 and third.status == "succeeded"  # the list it iterates over changed
    assert run_flow(graph, store, params={"k": 2}, workdir=str(tmp_path)).cached == 0
    recoded = build_flow(cells[:2] + ["%%step square --foreach items --cache\nsq = input * k"] + cells[3:],
                         name="Cached")
    assert run_flow(recoded, store, workdir=str(tmp_path)).cached == 0
    # Without --cache on the step, only cache=True reuses.
    plain = build_flow(cells[:2] + ["%%step square --foreach items\nsq = input * input * k"] + cells[3:],
                       name="Plain")
    run_flow(plain, store, workdir=str(tmp_path))
    assert run_flow(plain, store, workdir=str(tmp_path)).cached == 0
    assert run_flow(plain, store, cache=True, workdir=str(tmp_path)).cached == 5
    assert first.cached == 0


def test_step_cache_of_a_join_compares_the_inputs_the_task_is_given(store, tmp_path):
    cells = ["%%step start\nitems = [1, 2]",
             "%%step double --foreach items\nd = input * 2",
             "%%step join --cache\ntotal = sum(i.d for i in inputs)"]
    graph = build_flow(cells, name="CachedJoin")
    assert run_flow(graph, store, workdir=str(tmp_path)).cached == 0
    assert run_flow(graph, store, workdir=str(tmp_path)).cached == 1          # same inputs: reused
    changed = build_flow(cells[:1] + ["%%step double --foreach items\nd = input * 3"] + cells[2:], name="CachedJoin")
    again = run_flow(changed, store, workdir=str(tmp_path))
    assert again.cached == 0 and again.status == "succeeded"                  # its inputs changed: run again
    [join] = store.meta.tasks("CachedJoin", again.run_id, "join")
    assert [values(store, r) for r in store.meta.artifacts(join.task_id)] == [9]


def test_catch_records_a_crashed_process_and_the_run_goes_on(store, tmp_path):
    graph = build_flow(["%%step start\nitems = [0, 1]",
                        "%%step risky --foreach items --catch err\nimport os\nv = input\nif v == 0:\n    os._exit(3)",
                        "%%step end\nerrors = [e['type'] if e else None for e in err]\nvs = v"], name="CrashCatch")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "succeeded"
    states = [t.state for t in sorted(store.meta.tasks("CrashCatch", result.run_id, "risky"), key=lambda t: t.index)]
    assert states == ["caught", "done"]
    [end] = store.meta.tasks("CrashCatch", result.run_id, "end")
    got = {r.name: values(store, r) for r in store.meta.artifacts(end.task_id)}
    assert got == {"errors": ["ProcessExited", None], "vs": [None, 1]}
