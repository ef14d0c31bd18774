"""Python side of the widgets: live state folding, throttling, fallbacks."""
from __future__ import annotations

import re
import shutil
import threading
import time

import pytest

from flowmagic.runtime.events import Event
from flowmagic.widgets import DagView, StepStates, Throttle, graph_svg, graph_text
from flowmagic.widgets.dagview import check_graph
from flowmagic.widgets.static import format_duration, status_text


def movie_graph() -> dict:
    return {
        "flow": "MovieFlow",
        "parameters": [{"name": "alpha", "default": 0.01, "type": "float", "help": "Learning rate"}],
        "steps": [
            {"name": "start", "cell": 1, "reads": [], "writes": ["movies"], "options": {}, "next": ["split"]},
            {"name": "split", "cell": 2, "reads": ["alpha", "movies"], "writes": ["params"],
             "options": {"retry": 2}, "next": ["compute"]},
            {"name": "compute", "cell": 3, "reads": ["params"], "writes": ["x"],
             "options": {"foreach": "params", "catch": "compute_failed"}, "next": ["join"]},
            {"name": "join", "cell": 4, "reads": ["x"], "writes": ["failed"], "options": {}, "next": []},
        ],
        "edges": [
            {"from": "start", "to": "split", "variables": ["movies"]},
            {"from": "split", "to": "compute", "variables": ["params"]},
            {"from": "compute", "to": "join", "variables": ["x"]},
        ],
    }


def task(step, state, task_id=1, attempt=1, t=0.0, data=None) -> Event:
    return Event("task", run_id=7, step=step, task_id=task_id, state=state, attempt=attempt,
                 time=t or time.time(), data=data)


# -- folding task events into step states ----------------------------------------------
FOLD_CASES = [
    # (task states in order of events per task id, expected step state)
    ({1: ["running"]}, "running"),
    ({1: ["running", "done"]}, "done"),
    ({1: ["running", "retrying"]}, "retrying"),
    ({1: ["running", "failed"]}, "failed"),
    ({1: ["running", "caught"]}, "caught"),
    ({1: ["cloned"]}, "cloned"),
    ({1: ["cached"]}, "cached"),
    ({1: ["cloned"], 2: ["running", "done"]}, "done"),
    ({1: ["running", "done"], 2: ["running"]}, "running"),
    ({1: ["running", "done"], 2: ["running", "failed"]}, "failed"),
    ({1: ["running", "caught"], 2: ["running", "done"]}, "caught"),
    ({1: ["running", "interrupted"]}, "interrupted"),
]


@pytest.mark.parametrize("tasks,expected", FOLD_CASES)
def test_task_states_fold_into_one_step_state(tasks, expected):
    live = StepStates(["compute"])
    for task_id, states in tasks.items():
        for state in states:
            live.apply(task("compute", state, task_id=task_id))
    assert live.snapshot()["compute"]["state"] == expected


def test_foreach_progress_counts_done_failed_and_announced_total():
    live = StepStates(["compute"])
    live.apply(task("compute", "pending", task_id=1, data={"total": 5}))
    for i in range(1, 4):
        live.apply(task("compute", "running", task_id=i))
    live.apply(task("compute", "done", task_id=1))
    live.apply(task("compute", "done", task_id=2))
    live.apply(task("compute", "caught", task_id=3))
    record = live.snapshot()["compute"]
    assert (record["done"], record["failed"], record["total"]) == (2, 1, 5)
    assert record["state"] == "running"  # 2 of 5 tasks not even started


def test_duration_spans_first_start_to_last_end_and_started_while_running():
    live = StepStates(["start"])
    live.apply(task("start", "running", t=100.0))
    assert live.snapshot()["start"]["started"] == 100.0
    assert live.snapshot()["start"]["duration"] is None
    live.apply(task("start", "done", t=102.5))
    assert live.snapshot()["start"]["duration"] == 2.5


def test_retrying_keeps_the_attempt_number():
    live = StepStates(["split"])
    live.apply(task("split", "running", attempt=1))
    live.apply(task("split", "retrying", attempt=2))
    record = live.snapshot()["split"]
    assert (record["state"], record["attempt"]) == ("retrying", 2)
    assert status_text({"options": {}}, record) == "retrying #2"


def test_explicit_state_holds_until_the_next_task_event():
    live = StepStates(["join"])
    live.set("join", {"state": "stale"})
    assert live.snapshot()["join"]["state"] == "stale"
    live.apply(task("join", "running"))
    assert live.snapshot()["join"]["state"] == "running"


def test_run_events_set_the_run_record_and_other_events_change_nothing():
    live = StepStates(["start"])
    assert live.apply(Event("run", run_id=3, state="running"))
    assert live.run == {"run_id": 3, "status": "running"}
    assert not live.apply(Event("output", run_id=3, step="start", stream="stdout", text="hi"))


# -- throttling ---------------------------------------------------------------------------
def test_throttle_coalesces_a_burst_and_delivers_the_last_request():
    delivered = []
    throttle = Throttle(lambda: delivered.append(time.monotonic()), interval=0.05)
    for _ in range(1000):
        throttle.request()
    assert len(delivered) == 1  # the first one goes at once, the rest wait for the timer
    time.sleep(0.2)
    assert len(delivered) == 2  # the trailing push came without any new request


def test_throttle_flush_delivers_immediately_and_cancels_the_timer():
    delivered = []
    throttle = Throttle(lambda: delivered.append(1), interval=10)
    throttle.request()
    throttle.request()
    throttle.flush()
    assert len(delivered) == 2
    time.sleep(0.05)
    assert len(delivered) == 2


def test_thousand_foreach_tasks_reach_the_view_in_a_few_pushes():
    view = DagView(movie_graph(), interval=0.1)
    base = view.pushes
    started = time.monotonic()
    for i in range(1000):
        view.on_event(task("compute", "running", task_id=i, data={"total": 1000}))
        view.on_event(task("compute", "done", task_id=i))
    view.flush()
    elapsed = time.monotonic() - started
    assert view.states["compute"]["done"] == 1000
    assert view.states["compute"]["total"] == 1000
    assert view.states["compute"]["state"] == "done"
    # at most one push per interval, plus the first and the final flush
    assert view.pushes - base <= elapsed / 0.1 + 3


def test_events_from_another_thread_land_in_the_states_trait():
    view = DagView(movie_graph(), interval=0.02)
    worker = threading.Thread(target=lambda: [view.on_event(task("start", s)) for s in ("running", "done")])
    worker.start()
    worker.join()
    deadline = time.monotonic() + 2
    while view.states["start"]["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert view.states["start"]["state"] == "done"  # delivered by the trailing timer


def test_run_event_is_pushed_at_once_and_start_run_resets_the_steps():
    view = DagView(movie_graph(), interval=60)
    view.on_event(task("start", "running"))
    view.on_event(Event("run", run_id=9, state="failed"))
    assert view.run == {"run_id": 9, "status": "failed"}
    assert view.states["start"]["state"] == "running"
    view.start_run(10)
    assert view.run == {"run_id": 10, "status": "running"}
    assert {r["state"] for r in view.states.values()} == {"pending"}


def test_set_states_and_set_graph_keep_what_still_applies():
    view = DagView(movie_graph(), {"start": {"state": "done", "duration": 1.0}})
    view.selected_step = "join"
    view.set_states({"split": {"state": "stale"}})
    assert view.states["start"]["state"] == "done"
    assert view.states["split"]["state"] == "stale"
    smaller = movie_graph()
    smaller["steps"] = smaller["steps"][:3]
    smaller["edges"] = smaller["edges"][:2]
    view.set_graph(smaller)
    assert set(view.states) == {"start", "split", "compute"}
    assert view.selected_step == ""  # the selected step is gone
    view.set_states({"start": {"state": "done"}}, replace=True)
    assert view.states["split"]["state"] == "pending"


# -- bad input --------------------------------------------------------------------------
@pytest.mark.parametrize("graph,message", [
    ([], "needs FlowGraph.to_json"),
    ({"flow": "F"}, "no 'steps' list"),
    ({"steps": [{"cell": 1}]}, r"steps\[0\]"),
    ({"steps": [{"name": "a"}], "edges": [{"from": "a", "to": "b"}]}, "'b' is not a step"),
])
def test_bad_graph_documents_are_refused_with_a_clear_message(graph, message):
    with pytest.raises((TypeError, ValueError), match=message):
        DagView(graph)


def test_check_graph_keeps_the_show_keys():
    graph = check_graph(movie_graph())
    assert set(graph) == {"flow", "parameters", "steps", "edges"}


# -- the fallback without a widget front end -------------------------------------------
def test_mimebundle_has_widget_text_and_svg():
    view = DagView(movie_graph(), {"start": {"state": "done", "duration": 0.4},
                                   "compute": {"state": "running", "done": 3, "total": 10, "failed": 1}})
    data, _ = view._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == view.model_id
    text = data["text/plain"]
    assert "MovieFlow" in text
    assert re.search(r"start\s+done · 0.4 s\s+-> split \[movies\]", text)
    assert "running · 3/10 (1 failed)" in text
    assert "alpha = 0.01" in text
    if shutil.which("dot"):
        svg = data["image/svg+xml"]
        assert svg.startswith("<svg")
        for name in ("start", "split", "compute", "join", "movies", "params"):
            assert f">{name}<" in svg or f">{name} <" in svg or name in svg


def test_static_svgs_have_ids_unique_across_renderings():
    if not shutil.which("dot"):
        pytest.skip("Graphviz's dot is not installed")  # the text fallback is tested above
    first, second = graph_svg(movie_graph()), graph_svg(movie_graph())
    ids_first = set(re.findall(r'id="([^"]+)"', first))
    ids_second = set(re.findall(r'id="([^"]+)"', second))
    assert ids_first and not ids_first & ids_second


def test_text_fallback_is_used_when_dot_is_missing(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    view = DagView(movie_graph())
    data, _ = view._repr_mimebundle_()
    assert "image/svg+xml" not in data
    assert "compute" in data["text/plain"]


def test_text_for_an_empty_flow_says_what_to_do():
    assert "%%step" in graph_text({"flow": "Empty", "steps": [], "edges": []})


@pytest.mark.parametrize("seconds,text", [
    (None, ""), (0.42, "0.4 s"), (12.4, "12 s"), (125, "2 min 05 s"), (3725, "1 h 02 min"),
])
def test_durations_read_like_the_live_view(seconds, text):
    assert format_duration(seconds) == text


def test_thirty_step_flow_renders_in_both_fallbacks():
    steps = [{"name": f"step_{i:02d}", "cell": i, "reads": [f"v{i-1}"] if i else [],
              "writes": [f"v{i}"], "options": {}, "next": [f"step_{i+1:02d}"] if i < 29 else []}
             for i in range(30)]
    edges = [{"from": f"step_{i:02d}", "to": f"step_{i+1:02d}", "variables": [f"v{i}"]} for i in range(29)]
    graph = {"flow": "Long", "parameters": [], "steps": steps, "edges": edges}
    view = DagView(graph)
    assert view.fallback_text().count("\n") >= 30
    if shutil.which("dot"):
        assert view.fallback_svg().count('class="node"') == 30
