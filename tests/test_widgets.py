"""Python side of the widgets: live state folding, throttling, fallbacks."""
from __future__ import annotations

import re
import shutil
import threading
import time

import pytest

from flowmagic.runtime.orchestrator.events import Event
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
    ({1: ["pending", "cancelled"], 2: ["pending", "cancelled"]}, "cancelled"),
    ({1: ["running", "done"], 2: ["pending", "cancelled"]}, "cancelled"),
    ({1: ["running", "failed"], 2: ["pending", "cancelled"]}, "failed"),
]


def test_a_cancelled_step_is_grey_and_counts_neither_done_nor_failed():
    live = StepStates(["fit"])
    for task_id in (1, 2):
        live.apply(task("fit", "pending", task_id=task_id))
        live.apply(task("fit", "cancelled", task_id=task_id))
    record = live.snapshot()["fit"]
    assert (record["state"], record["done"], record["failed"], record["total"]) == ("cancelled", 0, 0, 2)
    from flowmagic.widgets.static import _COLOURS

    assert _COLOURS["cancelled"][0] not in (_COLOURS["failed"][0], _COLOURS["done"][0])  # grey, not red


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


def test_a_bare_agreeing_state_keeps_the_detail_of_the_task_events():
    live = StepStates(["compute"])
    live.apply(task("compute", "running", task_id=1, t=10.0))
    live.apply(task("compute", "caught", task_id=1, t=11.0))
    live.set("compute", {"state": "done"})      # what the session knows: the step succeeded
    assert live.snapshot()["compute"]["state"] == "caught"
    assert live.snapshot()["compute"]["duration"] == 1.0
    live.set("compute", {"state": "stale"})     # a different story wins
    assert live.snapshot()["compute"]["state"] == "stale"


def test_a_step_executed_again_starts_from_fresh_tasks():
    live = StepStates(["compute"])
    live.apply(task("compute", "running", task_id=1))
    live.apply(task("compute", "failed", task_id=1))
    live.set("compute", {"state": "running"})           # the cell was fixed and runs again
    assert live.snapshot()["compute"]["state"] == "running"
    live.apply(task("compute", "running", task_id=2))
    live.apply(task("compute", "done", task_id=2))
    record = live.snapshot()["compute"]
    assert (record["state"], record["total"], record["failed"]) == ("done", 1, 0)


def test_run_events_set_the_run_record_and_other_events_change_nothing():
    live = StepStates(["start"])
    assert live.apply(Event("run", run_id=3, state="running"))
    assert live.run == {"run_id": 3, "status": "running"}
    assert not live.apply(Event("output", run_id=3, step="start", stream="stdout", text="hi"))
    session = StepStates(["start"])
    session.apply(task("start", "running"))   # a %%step cell: task events only
    assert session.run["run_id"] == 7


# -- throttling ---------------------------------------------------------------------------
def test_throttle_coalesces_a_burst_and_delivers_the_last_request():
    delivered = []
    # the interval outlasts the burst even on busy cores (0.05 s did not: the timer fired mid-burst)
    throttle = Throttle(lambda: delivered.append(time.monotonic()), interval=0.5)
    for _ in range(1000):
        throttle.request()
    assert len(delivered) == 1  # the first one goes at once, the rest wait for the timer
    time.sleep(1.0)
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
def test_mimebundle_has_widget_and_text_and_the_twin_has_the_svg(monkeypatch):
    monkeypatch.setenv("FLOWMAGIC_WIDGETS", "on")
    view = DagView(movie_graph(), {"start": {"state": "done", "duration": 0.4},
                                   "compute": {"state": "running", "done": 3, "total": 10, "failed": 1}})
    assert view._viz is None  # Graphviz goes to the front end only with a view
    data, _ = view._repr_mimebundle_()
    assert data["application/vnd.jupyter.widget-view+json"]["model_id"] == view.model_id
    assert view._viz is not None and len(view._viz.source) > 100_000
    text = data["text/plain"]
    assert "MovieFlow" in text
    assert re.search(r"start\s+done · 0.4 s\s+-> split \[movies\]", text)
    assert "running · 3/10 (1 failed)" in text
    assert "alpha = 0.01" in text
    assert "image/svg+xml" not in data  # left to the static twin, so it never shows twice
    twin = view.twin_bundle()["text/html"]
    assert twin.startswith('<div class="fm-twin" data-fm-twin="dag"><style>')
    if shutil.which("dot"):
        svg = twin_svg(twin)
        for name in ("start", "split", "compute", "join", "movies", "params"):
            assert f">{name}<" in svg or f">{name} <" in svg or name in svg
        assert "done · 0.4 s" in svg


def twin_svg(html: str) -> str:
    """The SVG a static twin carries (an <img> with a data URI)."""
    import base64

    found = re.search(r'<img src="data:image/svg\+xml;base64,([^"]+)"', html)
    assert found, html[:300]
    return base64.b64decode(found.group(1)).decode()


@pytest.mark.parametrize("env,expected", [
    ({"FLOWMAGIC_WIDGETS": "on"}, True),
    ({"JPY_SESSION_NAME": "nb.ipynb"}, True),   # JupyterLab, Notebook 7
    ({"FLOWMAGIC_WIDGETS": "off", "JPY_SESSION_NAME": "nb.ipynb"}, False),
    ({}, False),                                 # nbconvert: the SVG is in the bundle itself
])
def test_a_static_twin_follows_the_widget_only_under_a_jupyter_server(monkeypatch, env, expected):
    from flowmagic.widgets._base import static_twin_expected

    for name in ("FLOWMAGIC_WIDGETS", "JPY_SESSION_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert static_twin_expected() is expected
    data, _ = DagView(movie_graph())._repr_mimebundle_()
    assert ("image/svg+xml" in data) is (not expected and bool(shutil.which("dot")))


def test_the_twin_rules_ship_in_the_widget_css_too():
    """An untrusted notebook loses the twin's <style>; the widget's own CSS keeps the rules."""
    from flowmagic.widgets._base import CSS, TWIN_RULES, TWIN_STYLE

    css = CSS.read_text()
    for rule in TWIN_RULES.strip().splitlines():
        assert rule in css and rule in TWIN_STYLE


def test_the_inspector_twin_has_the_artifact_table_and_the_exception(recorded_run):
    from flowmagic.widgets import Inspector

    inspector = Inspector(recorded_run["root"], "MovieFlow")
    html = inspector.twin_bundle()["text/html"]  # opens on compute's caught task
    assert html.startswith('<div class="fm-twin" data-fm-twin="inspector">')
    assert "step compute" in html and "ZeroDivisionError: division by zero" in html
    inspector.select(step="start")
    html = inspector.twin_bundle()["text/html"]
    assert "<code>movies</code>" in html and "500 rows × 2 columns" in html
    assert "<th>title</th>" in html and "<td>film 0</td>" in html and "film 5" not in html


@pytest.mark.parametrize("env,expected", [
    ({"FLOWMAGIC_WIDGETS": "on"}, True),
    ({"FLOWMAGIC_WIDGETS": "off", "JPY_SESSION_NAME": "nb.ipynb"}, False),
    ({"JPY_SESSION_NAME": "nb.ipynb"}, True),   # a kernel started by JupyterLab / Notebook 7
    ({}, False),                                 # nbconvert, papermill, a terminal
])
def test_the_widget_view_is_sent_only_where_a_widget_front_end_is_expected(monkeypatch, env, expected):
    for name in ("FLOWMAGIC_WIDGETS", "JPY_SESSION_NAME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    data, _ = DagView(movie_graph())._repr_mimebundle_()
    assert ("application/vnd.jupyter.widget-view+json" in data) is expected
    assert "MovieFlow" in data["text/plain"]


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


# -- the inspector and the run view over a real store -------------------------------------
@pytest.fixture
def recorded_run(tmp_path):
    """A store with two runs of MovieFlow: the newer one failed in `join`."""
    import numpy as np
    import pandas as pd

    from flowmagic.store import open_store, save_artifact

    store = open_store(tmp_path / "store")
    meta = store.meta
    older = meta.new_run("MovieFlow", params={"alpha": 0.01}, code={}, tags=["baseline"])
    meta.finish_run("MovieFlow", older, "succeeded")
    run = meta.new_run("MovieFlow", params={"alpha": 0.5}, code={}, tags=["try"], graph=movie_graph())
    now = time.time()

    def task_with(step, artifacts=(), outcome="ok", state="done", index=None, item=None, **attempt):
        task_id = meta.new_task("MovieFlow", run, step, index=index, item=item)
        refs = [save_artifact(store.objects, name, value, step=step) for name, value in artifacts]
        meta.record_attempt(task_id, attempt.pop("attempt", 1), outcome=outcome, started_at=now - 2,
                            finished_at=now - 1, artifacts=refs, **attempt)
        meta.set_task_state(task_id, state)
        return task_id

    movies = pd.DataFrame({"title": [f"film {i}" for i in range(500)], "rating": np.linspace(1, 10, 500)})
    task_with("start", [("movies", movies)], stdout="loaded 500 movies\n")
    task_with("split", [("params", [0.1, 0.2, 0.0]), ("weights", np.arange(12.0).reshape(3, 4))])
    for i, div in enumerate([0.1, 0.2, 0.0]):
        task_with("compute", [("x", 5 / div if div else None)], index=(i,), item=repr(div),
                  outcome="ok" if div else "failed", state="done" if div else "caught",
                  exception=None if div else {"type": "ZeroDivisionError", "message": "division by zero",
                                              "traceback": "Traceback (most recent call last):\n"
                                                           "  Cell In[4], line 2\n    x = 5 / div\n"
                                                           "ZeroDivisionError: division by zero\n"})
    failed_join = task_with("join", outcome="failed", state="failed", stderr="about to fail\n",
                            exception={"type": "KeyError", "message": "'genre'",
                                       "traceback": "Traceback (most recent call last):\nKeyError: 'genre'\n"})
    meta.finish_run("MovieFlow", run, "failed")
    return {"store": store, "root": tmp_path / "store", "run": run, "older": older, "failed_join": failed_join}


def test_inspector_opens_on_the_newest_run_and_its_failed_step(recorded_run):
    from flowmagic.widgets import Inspector

    view = Inspector(recorded_run["root"], "MovieFlow")
    assert [r["value"] for r in view.runs] == [recorded_run["run"], recorded_run["older"]]
    assert "failed" in view.runs[0]["label"] and "tags: try" in view.runs[0]["label"]
    assert view.run_id == recorded_run["run"]
    assert [s["value"] for s in view.steps] == ["start", "split", "compute", "join"]
    assert view.step == "compute"  # the first step that did not simply succeed: caught here
    compute_tasks = view.tasks
    assert [t["state"] for t in compute_tasks] == ["done", "done", "caught"]
    assert view.task_id == compute_tasks[2]["value"]
    attempt = view.detail["attempts"][0]
    assert attempt["exception"]["type"] == "ZeroDivisionError"
    assert "x = 5 / div" in attempt["exception"]["traceback"]


def test_picking_a_step_shows_its_artifacts_with_previews(recorded_run):
    from flowmagic.widgets import Inspector

    view = Inspector(recorded_run["store"], "MovieFlow")
    view.step = "start"  # what the front end's picker does
    artifacts = {a["name"]: a for a in view.detail["artifacts"]}
    frame = artifacts["movies"]["preview"]
    assert frame["kind"] == "frame" and frame["shape"] == [500, 2]
    assert frame["columns"] == ["title", "rating"] and frame["rows"][0][0] == "film 0"
    assert len(frame["rows"]) == 8 and "of 500 rows" in frame["truncated"]
    assert view.detail["attempts"][0]["stdout"] == "loaded 500 movies\n"
    view.step = "split"
    artifacts = {a["name"]: a for a in view.detail["artifacts"]}
    assert artifacts["weights"]["preview"] == {"kind": "array", "shape": [3, 4], "dtype": "float64",
                                               "min": "0", "max": "11"}
    assert artifacts["params"]["preview"] == {"kind": "text", "text": "[0.1, 0.2, 0.0]"}
    view.run_id = recorded_run["older"]
    assert view.steps == [] and view.detail["artifacts"] == []


def test_inspector_text_fallback_lists_artifacts_and_exceptions(recorded_run):
    from flowmagic.widgets import Inspector

    view = Inspector(recorded_run["root"], "MovieFlow", step="join")
    data, _ = view._repr_mimebundle_()
    text = data["text/plain"]
    assert "run 2 · failed" in text and "KeyError: 'genre'" in text
    view.step = "start"
    assert re.search(r"movies\s+pandas.DataFrame\s+[\d.]+ KB\s+500 rows × 2 columns", view.fallback_text())


def test_inspector_on_a_flow_without_runs_says_so(tmp_path):
    from flowmagic.widgets import Inspector

    view = Inspector(tmp_path / "empty", "NoFlow")
    assert view.runs == [] and "has no runs" in view.message


def test_big_artifacts_are_previewed_without_loading_them(tmp_path):
    import numpy as np
    import pandas as pd

    from flowmagic.store import open_store, save_artifact
    from flowmagic.widgets.preview import preview_artifact

    store = open_store(tmp_path)
    big_array = save_artifact(store.objects, "big", np.zeros(10_000_000))
    preview = preview_artifact(store.objects, big_array)
    assert preview["shape"] == [10_000_000] and "min" not in preview and "too big" in preview["note"]
    frame = pd.DataFrame({"a": np.arange(2_000_000), "b": np.ones(2_000_000)})
    ref = save_artifact(store.objects, "frame", frame)
    started = time.perf_counter()
    preview = preview_artifact(store.objects, ref)
    assert preview["shape"] == [2_000_000, 2] and len(preview["rows"]) == 8
    assert time.perf_counter() - started < 0.5
    blob = save_artifact(store.objects, "blob", [bytes(3_000_000)])
    assert "not loaded" in preview_artifact(store.objects, blob)["text"]


def test_run_view_links_node_clicks_to_the_inspector(recorded_run):
    from flowmagic.widgets import RunView

    view = RunView(recorded_run["root"], "MovieFlow")
    assert view.graph["flow"] == "MovieFlow" and view.run["status"] == "failed"
    assert view.states["join"]["state"] == "failed"
    assert view.states["compute"] == {**view.states["compute"], "state": "caught", "done": 2, "failed": 1,
                                      "total": 3}
    assert view.selected_step == view.step == "compute"
    view.selected_step = "start"  # a click on the node
    assert view.step == "start" and view.detail["artifacts"][0]["name"] == "movies"
    view.step = "join"  # the inspector's picker
    assert view.selected_step == "join"
    data, _ = view._repr_mimebundle_()
    assert "join" in data["text/plain"] and "KeyError" in data["text/plain"]
    if shutil.which("dot"):
        assert "<svg" in data["image/svg+xml"]


def test_run_view_follows_a_live_run_from_its_events(recorded_run):
    from flowmagic.widgets import RunView

    store, run = recorded_run["store"], recorded_run["run"]
    view = RunView(store, "MovieFlow", movie_graph(), run_id=recorded_run["older"], interval=0.01)
    new_run = store.meta.new_run("MovieFlow", params={}, code={}, graph=movie_graph())
    view.start_run(None)
    view.on_event(Event("run", run_id=new_run, state="running"))
    assert view.run_id == new_run and view.run == {"run_id": new_run, "status": "running"}
    task_id = store.meta.new_task("MovieFlow", new_run, "start")
    view.on_event(Event("task", run_id=new_run, step="start", task_id=task_id, state="running"))
    store.meta.set_task_state(task_id, "done")
    view.on_event(Event("task", run_id=new_run, step="start", task_id=task_id, state="done"))
    view.finish()
    assert view.states["start"]["state"] == "done"
    assert [s["value"] for s in view.steps] == ["start", "split", "compute", "join"]
    assert run != new_run


def test_states_from_store_and_graph_of_a_run_without_graph(recorded_run):
    from flowmagic.widgets import graph_of_run, states_from_store

    states = states_from_store(recorded_run["store"], "MovieFlow", recorded_run["run"])
    assert states["start"]["state"] == "done" and states["join"]["state"] == "failed"
    store = recorded_run["store"]
    bare = store.meta.new_run("MovieFlow", params={}, code={})
    store.meta.new_task("MovieFlow", bare, "only")
    graph = graph_of_run(store, "MovieFlow", bare)
    assert [s["name"] for s in graph["steps"]] == ["only"] and graph["edges"] == []


# -- nbconvert: the static fallback in an exported page ----------------------------------
@pytest.mark.slow
def test_nbconvert_execute_to_html_shows_the_static_svg(tmp_path):
    """An example notebook with `%flow show` and `%flow run` added, executed by
    nbconvert: no widget front end there, so the page carries the SVGs."""
    import base64
    import os
    import subprocess
    import sys
    from pathlib import Path

    import nbformat

    source = Path(__file__).resolve().parent.parent / "example_notebooks" / "catch_flow.ipynb"
    nb = nbformat.read(source, as_version=4)
    nb.cells += [nbformat.v4.new_code_cell("%flow show"), nbformat.v4.new_code_cell("%flow run")]
    notebook = tmp_path / "catch_flow.ipynb"
    nbformat.write(nb, notebook)
    env = {k: v for k, v in os.environ.items() if k not in ("JPY_SESSION_NAME", "FLOWMAGIC_WIDGETS")}
    env["FLOWMAGIC_HOME"] = str(tmp_path / "store")
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "html",
                    "--ExecutePreprocessor.timeout=240", str(notebook)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    page = (tmp_path / "catch_flow.html").read_text()
    # nbconvert embeds SVG outputs as base64 data URIs in <img> tags
    svgs = [base64.b64decode(data).decode() for data in re.findall(r'src="data:image/svg\+xml;base64,([^"]+)"', page)]
    ours = [svg for svg in svgs if 'id="fm_static' in svg]
    assert len(ours) == 2, f"{len(svgs)} SVGs in the page, {len(ours)} of flowmagic"
    shown, run = ours
    for svg in ours:
        assert all(f">{name}</" in svg for name in ("start", "compute", "join"))
        assert "params" in svg and "x" in svg
    assert "caught · 2/3 (1 failed)" in run  # the final states of the run, not those of its first display
    assert '<script type="application/vnd.jupyter.widget-view+json">' not in page  # no dead widget


def test_a_step_with_caught_tasks_renders_as_caught_with_its_counts():
    from flowmagic.widgets.live import record_from_states
    from flowmagic.widgets.static import graph_svg, graph_text

    graph = {"name": "Fits", "params": [], "edges": [{"from": "start", "to": "fit", "variables": ["degrees"]}],
             "steps": [{"name": "start", "options": {}},
                       {"name": "fit", "options": {"foreach": "degrees", "catch": "fit_error"}}]}
    states = {"start": record_from_states(["done"]), "fit": record_from_states(["done", "caught", "done"])}
    assert states["fit"] | {"duration": None} == {"state": "caught", "attempt": 0, "done": 2, "total": 3,
                                                  "failed": 1, "duration": None}
    assert states["start"]["state"] == "done"
    text = graph_text(graph, states)
    assert "caught · 2/3 (1 failed)" in text, text
    view = DagView(graph, states)
    assert view.states["fit"]["state"] == "caught" and view.states["fit"]["total"] == 3
    svg = graph_svg(graph, states)
    if svg is not None:   # Graphviz present
        assert "caught · 2/3 (1 failed)" in svg


def test_a_wide_fan_out_is_laid_out_left_to_right():
    from flowmagic.widgets.static import rankdir

    steps = [{"name": "load"}] + [{"name": f"m{i}"} for i in range(10)] + [{"name": "pick"}]
    edges = [{"from": "load", "to": f"m{i}"} for i in range(10)] + [{"from": f"m{i}", "to": "pick"} for i in range(10)]
    assert rankdir({"steps": steps, "edges": edges}) == "LR"
    assert rankdir(movie_graph()) == "TB"


def test_the_built_front_end_ships_with_the_package_and_answers_need_viz(monkeypatch):
    from flowmagic.widgets._base import CSS, ESM, VIZ

    bundle = ESM.read_text()
    for needle in ("data-state", "data-step", "data-edge-from", "need-viz", "fm-inspector"):
        assert needle in bundle, f"{needle} missing: rebuild js/ (npm run build)"
    assert "--jp-layout-color1" in CSS.read_text()
    assert VIZ.read_bytes()[:2] == b"\x1f\x8b"  # gzip
    view = DagView(movie_graph())
    assert view._viz is None
    view._on_front_end_message(view, {"type": "need-viz"}, [])  # a view shown inside a container
    assert view._viz is not None


@pytest.mark.slow
def test_a_notebook_executed_under_a_jupyter_server_saves_each_widget_with_its_final_twin(tmp_path):
    """nbconvert --execute with JPY_SESSION_NAME set as JupyterLab sets it: every
    widget output is followed by its static twin, rewritten with the final states."""
    import os
    import subprocess
    import sys

    import nbformat

    cells = ["%load_ext flowmagic", "%flow show", "%%step start\nitems = [1, 2, 3]",
             "%%step total\nsquares = [i * i for i in items]", "%flow run"]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    notebook = tmp_path / "twin_flow.ipynb"
    nbformat.write(nb, notebook)
    env = {k: v for k, v in os.environ.items() if k != "FLOWMAGIC_WIDGETS"}
    env.update(JPY_SESSION_NAME=notebook.name, FLOWMAGIC_HOME=str(tmp_path / "store"))
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--execute", "--to", "notebook", "--inplace",
                    "--ExecutePreprocessor.timeout=240", str(notebook)],
                   cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    saved = nbformat.read(notebook, as_version=4)
    for index, kind, caption in ((1, "dag", "run 1 · 2/2 steps done"), (4, "run", "run 2 · succeeded")):
        outputs = [o for o in saved.cells[index].outputs if o.output_type == "display_data"]
        widget = next(i for i, o in enumerate(outputs) if "application/vnd.jupyter.widget-view+json" in o.data)
        assert "image/svg+xml" not in outputs[widget].data  # the picture is the twin's only
        twin = outputs[widget + 1].data["text/html"]       # right after the widget
        assert twin.startswith(f'<div class="fm-twin" data-fm-twin="{kind}"><style>') and caption in twin
        svg = twin_svg(twin)
        assert svg.count("done · ") == 2 and "pending" not in svg  # the final states, not the first
        assert len([o for o in outputs if "fm-twin" in o.data.get("text/html", "")]) == 1
    run_twin = next(o.data["text/html"] for o in saved.cells[4].outputs if "fm-twin" in o.get("data", {}).get(
        "text/html", ""))
    assert 'class="fm-twin-artifacts"' in run_twin and "<code>" in run_twin  # the inspector's table


def test_a_100000_task_step_folds_into_counts_not_an_object_a_task():
    """The live DAG of a wide foreach: exact counts at every push, a few MB for the step (was ~30 MB)."""
    import tracemalloc

    n = 100_000
    live = StepStates(["fit"])
    tracemalloc.start()
    try:
        for task_id in range(n):
            live.apply(task("fit", "pending", task_id))
        for task_id in range(n):
            live.apply(task("fit", "running", task_id))
            live.apply(task("fit", "done" if task_id % 1000 else "caught", task_id))
            if task_id == n // 2:
                half = live.snapshot()["fit"]
        used = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert (half["state"], half["done"] + half["failed"], half["total"]) == ("running", n // 2 + 1, n)
    final = live.snapshot()["fit"]
    assert (final["state"], final["done"], final["failed"], final["total"]) == ("caught", n - 100, 100, n)
    assert used < 12_000_000, used
