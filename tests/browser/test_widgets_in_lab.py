"""The widgets in a real JupyterLab, in headless Chromium (one server, one module).

1. The DAG view fed from Python with the `show` document and runtime events.
2. A flowmagic notebook as users meet it: Run All executes the steps as the
   session run and the DAG that `%flow show` displayed follows them live;
   `%flow dump 1` shows the run with its inspector, a click on a node selects
   that step, `%flow run` shows a whole run live; then reload, dark theme.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from labfixtures import chromium, lab, lab_page  # noqa: F401  (fixtures)
from labpage import (open_notebook, run_all, run_cell, save, screenshot, wait_attribute, wait_idle,
                     write_notebook)

pytestmark = pytest.mark.browser
NOTEBOOK = Path(__file__).parent / "notebooks" / "widget_tour.ipynb"
NODE = 'g.fm-step[data-step="{}"]'

def wait_state(scope, step: str, state: str, timeout: float = 60_000) -> None:
    scope.locator(f'{NODE.format(step)}[data-state="{state}"]').first.wait_for(state="attached", timeout=timeout)


def flow_show_json(notebook: Path) -> dict:
    """The console command's reading of the notebook: what the DAG must show."""
    done = subprocess.run([sys.executable, "-m", "flowmagic.cli.main", "show", str(notebook), "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def drawn_edges(dag) -> list[list[str]]:
    return sorted(dag.locator("g.fm-edge").evaluate_all(
        "els => els.map(e => [e.dataset.edgeFrom, e.dataset.edgeTo, e.dataset.variables])"))


# -- 1. the DAG view fed from Python ------------------------------------------------------
GRAPH = {
    "flow": "MovieFlow",
    "parameters": [{"name": "alpha", "default": 0.01, "type": "float", "help": "Learning rate"}],
    "steps": [
        {"name": "start", "cell": 1, "reads": [], "writes": ["movies"], "options": {}, "next": ["split"]},
        {"name": "split", "cell": 2, "reads": ["alpha", "movies"], "writes": ["genres", "params"],
         "options": {"retry": 2}, "next": ["compute", "report"]},
        {"name": "compute", "cell": 3, "reads": ["params"], "writes": ["x"],
         "options": {"foreach": "params", "catch": "compute_failed"}, "next": ["join"]},
        {"name": "report", "cell": 4, "reads": ["genres"], "writes": ["summary"], "options": {}, "next": ["join"]},
        {"name": "join", "cell": 5, "reads": ["compute_failed", "summary", "x"], "writes": ["failed"],
         "options": {}, "next": []},
    ],
    "edges": [
        {"from": "start", "to": "split", "variables": ["movies"]},
        {"from": "split", "to": "compute", "variables": ["params"]},
        {"from": "split", "to": "report", "variables": ["genres"]},
        {"from": "compute", "to": "join", "variables": ["compute_failed", "x"]},
        {"from": "report", "to": "join", "variables": ["summary"]},
    ],
}

LONG = {
    "flow": "ThirtySteps",
    "parameters": [],
    "steps": [{"name": f"preprocess_stage_{i:02d}", "cell": i, "reads": [f"v{i - 1}"] if i else [],
               "writes": [f"v{i}"], "options": {}, "next": []} for i in range(30)],
    "edges": [{"from": f"preprocess_stage_{i:02d}", "to": f"preprocess_stage_{i + 1:02d}",
               "variables": [f"v{i}", "model", "scores", "weights"]} for i in range(29)],
}

WIDE = {
    "flow": "WideFlow",
    "parameters": [],
    "steps": [{"name": "load", "cell": 0, "reads": [], "writes": ["data"], "options": {}, "next": []}]
    + [{"name": f"model_{i:02d}", "cell": i + 1, "reads": ["data"], "writes": [f"m{i}"], "options": {},
        "next": ["pick"]} for i in range(28)]
    + [{"name": "pick", "cell": 30, "reads": [f"m{i}" for i in range(28)], "writes": ["best"], "options": {},
        "next": []}],
    "edges": [{"from": "load", "to": f"model_{i:02d}", "variables": ["data"]} for i in range(28)]
    + [{"from": f"model_{i:02d}", "to": "pick", "variables": [f"m{i}"]} for i in range(28)],
}

SETUP = f"""
import json, pathlib, time
from flowmagic.runtime.orchestrator.events import Event
from flowmagic.widgets import DagView
view = DagView(json.loads({json.dumps(json.dumps(GRAPH))}), interval=0.1)
view.observe(lambda change: pathlib.Path("selected.txt").write_text(change["new"]), "selected_step")
def task(step, state, tid=1, **kw):
    view.on_event(Event("task", run_id=1, step=step, task_id=tid, state=state, **kw))
view
"""

DRIVE = """
view.on_event(Event("run", run_id=1, state="running"))
task("start", "running"); time.sleep(3); task("start", "done")
task("split", "running", attempt=1); time.sleep(0.3)
task("split", "retrying", attempt=2); time.sleep(1.5); task("split", "done", attempt=2)
task("report", "running", tid=2); task("report", "done", tid=2)
for i in range(1000):
    task("compute", "running", tid=100 + i, data={"total": 1000})
    task("compute", "caught" if i == 7 else "done", tid=100 + i)
task("join", "running", tid=3); time.sleep(0.3); task("join", "failed", tid=3)
view.on_event(Event("run", run_id=1, state="failed"))
view.flush()
print("pushes", view.pushes)
"""

SECOND_VIEW = f"""
long_view = DagView(json.loads({json.dumps(json.dumps(LONG))}))
wide_view = DagView(json.loads({json.dumps(json.dumps(WIDE))}))
display(long_view, wide_view)
"""



def test_dag_view_shows_steps_edges_and_live_states(lab, lab_page):
    page = lab_page
    write_notebook(lab.root / "dag_demo.ipynb", [SETUP, DRIVE, SECOND_VIEW])
    (lab.root / "selected.txt").unlink(missing_ok=True)
    open_notebook(page, lab, "dag_demo.ipynb")
    started = time.monotonic()
    run_all(page)

    # every step and every edge of the show document is drawn
    page.wait_for_selector('.fm-dag[data-layout="ready"]', timeout=30_000)
    first = page.locator(".fm-dag").first
    steps = first.locator("g.fm-step")
    assert sorted(steps.evaluate_all("els => els.map(e => e.dataset.step)")) == sorted(
        s["name"] for s in GRAPH["steps"])
    edges = first.locator("g.fm-edge").evaluate_all(
        "els => els.map(e => [e.dataset.edgeFrom, e.dataset.edgeTo, e.dataset.variables])")
    assert sorted(edges) == sorted([e["from"], e["to"], ",".join(e["variables"])] for e in GRAPH["edges"])
    assert first.locator('g.fm-param[data-param="alpha"]').count() == 1
    assert "compute_failed, x" in first.locator("g.fm-edge", has_text="compute_failed").text_content()

    # live: the sleeping step is seen running, then done; the retry shows its attempt
    wait_state(page, "start", "running")
    screenshot(page, "dag-live-running", first)
    wait_state(page, "start", "done")
    wait_state(page, "split", "retrying")
    assert "retrying #2" in page.locator(NODE.format("split")).first.text_content()
    wait_state(page, "join", "failed")
    wait_state(page, "compute", "caught")
    compute = page.locator(NODE.format("compute")).first
    assert (compute.get_attribute("data-done"), compute.get_attribute("data-total"),
            compute.get_attribute("data-failed")) == ("999", "1000", "1")
    page.wait_for_selector('.fm-dag[data-run-status="failed"]', state="attached")
    wait_idle(page)
    output = page.locator(".jp-OutputArea-output", has_text="pushes").first.inner_text()
    pushes = int(output.split()[-1])
    assert pushes < 80, f"{pushes} pushes for ~2,000 events: throttling is not working"
    assert time.monotonic() - started < 60

    # a 30-step flow fits the output area's width; ids are unique on the page
    page.wait_for_selector('.fm-dag[data-layout="ready"] >> nth=1')
    long_dag = page.locator(".fm-dag").nth(1)
    assert long_dag.locator("g.fm-step").count() == 30
    sizes = long_dag.evaluate(
        "el => [el.scrollWidth, el.clientWidth, el.querySelector('svg').getBoundingClientRect().width,"
        " el.getBoundingClientRect().width]")
    assert sizes[0] <= sizes[1] + 1 and sizes[2] <= sizes[3], sizes
    long_dag.scroll_into_view_if_needed()
    screenshot(page, "dag-30-steps", long_dag)
    page.wait_for_selector('.fm-dag[data-layout="ready"] >> nth=2')
    wide_dag = page.locator(".fm-dag").nth(2)
    assert wide_dag.locator("g.fm-step").count() == 30
    output_width = wide_dag.evaluate("el => el.closest('.jp-OutputArea-output').clientWidth")
    shown = wide_dag.evaluate("el => { const s = el.querySelector('svg');"
                              " return [el.getBoundingClientRect().width, s.getBoundingClientRect().width,"
                              " s.viewBox.baseVal.width]; }")
    assert shown[0] <= output_width + 1, (shown, output_width)   # the view stays inside the cell
    assert shown[1] >= 0.55 * shown[2] - 1, shown                # and its text stays readable (scrolls)
    wide_dag.scroll_into_view_if_needed()
    screenshot(page, "dag-30-wide", wide_dag)
    duplicates = page.evaluate(
        "() => { const ids = [...document.querySelectorAll('.fm-root [id]')].map(e => e.id);"
        " return ids.filter((id, i) => ids.indexOf(id) !== i); }")
    assert duplicates == []

    # a click on a node reaches Python as selected_step
    page.locator(NODE.format("split")).first.click()
    page.wait_for_selector(f'{NODE.format("split")}[data-selected="true"]', state="attached")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not (lab.root / "selected.txt").exists():
        time.sleep(0.1)
    assert (lab.root / "selected.txt").read_text() == "split"
    screenshot(page, "dag-light", first)
    assert page.js_errors == []
    # (reload and the dark theme: test_magics_in_lab.py)


# -- 2. the magics' views --------------------------------------------------------------
def test_run_all_shows_the_flow_live_then_dump_and_run_show_the_inspector(lab, lab_page):
    page = lab_page
    notebook = lab.root / "widget_tour.ipynb"
    shutil.copy(NOTEBOOK, notebook)
    expected = flow_show_json(notebook)
    open_notebook(page, lab, notebook.name)
    run_all(page)

    # the session view (displayed by %flow show) follows the step cells live
    session = page.locator(".fm-dag").first
    session.wait_for(timeout=60_000)
    wait_state(session, "slow", "running")
    screenshot(page, "session-slow-running", session)
    wait_state(session, "slow", "done")
    wait_state(session, "compute", "caught")
    wait_state(session, "broken", "failed")
    wait_idle(page)  # Run All stopped at the failing cell
    assert sorted(session.locator("g.fm-step").evaluate_all("els => els.map(e => e.dataset.step)")) == sorted(
        s["name"] for s in expected["steps"])
    assert drawn_edges(session) == sorted([e["from"], e["to"], ",".join(e["variables"])]
                                          for e in expected["edges"])
    assert session.locator(NODE.format("join")).get_attribute("data-state") == "done"

    # %flow dump: the run's DAG and the inspector, opened on the first step that did not succeed
    run_cell(page, "%flow dump 1")  # the session run
    inspector = page.locator(".fm-inspector").first
    inspector.wait_for(timeout=60_000)
    inspector.locator('.fm-exception[data-exception-type="ZeroDivisionError"]').wait_for(timeout=30_000)
    assert inspector.get_attribute("data-step") == "compute"
    assert "x = 10 / input" in inspector.locator(".fm-traceback").first.text_content()
    dump = page.locator(".fm-run-dag .fm-dag").first
    wait_state(dump, "broken", "failed")

    # a click on a node selects that step in the inspector: a frame preview, then a traceback
    wait_idle(page)
    dump.locator(NODE.format("start")).click()
    page.locator('.fm-inspector[data-step="start"] tr[data-artifact="movies"][data-kind="frame"]').wait_for(
        timeout=30_000)
    movies = inspector.locator('tr[data-artifact="movies"]')
    assert "50 rows × 2 columns" in movies.text_content()
    assert movies.locator("table.fm-frame tbody tr").count() == 8
    assert movies.locator("table.fm-frame thead th").all_text_contents()[1:] == ["title", "rating"]
    assert dump.locator(f'{NODE.format("start")}[data-selected="true"]').count() == 1
    screenshot(page, "inspector-frame-light", page.locator(".fm-run-inspector").first)
    dump.locator(NODE.format("broken")).click()
    failure = page.locator('.fm-inspector[data-step="broken"] .fm-exception[data-exception-type="ValueError"]')
    failure.wait_for(timeout=30_000)
    assert "broken after 50 movies" in failure.text_content()
    assert "about to fail" in inspector.locator('pre[data-stream="stdout"]').first.text_content()
    screenshot(page, "inspector-traceback-light", page.locator(".fm-run-inspector").first)

    # %flow run: a fresh run of the whole flow, shown live above its output
    run_cell(page, "%flow run")
    live = page.locator(".fm-run-dag .fm-dag").nth(1)
    live.wait_for(timeout=60_000)
    wait_state(live, "slow", "running")
    wait_attribute(live, "data-run-status", "failed")
    wait_state(live, "slow", "done")
    wait_state(live, "compute", "caught")
    wait_state(live, "broken", "failed")
    wait_idle(page)
    live.scroll_into_view_if_needed()
    screenshot(page, "run-view-light", page.locator(".fm-root").last)
    assert page.js_errors == []

    # executing a step cell again marks the steps below it stale in the session view
    run_cell(page, "%%step start")
    for step in ("slow", "compute", "join", "broken"):
        wait_state(session, step, "stale")
    wait_state(session, "start", "done")
    wait_idle(page)

    # dark theme, after a reload: the views come back from the kernel with their states
    save(page)
    lab.set_theme("JupyterLab Dark")
    try:
        page.reload()
        page.locator(".fm-run-dag .fm-dag").nth(1).wait_for(timeout=60_000)
        wait_state(page.locator(".fm-run-dag .fm-dag").nth(1), "broken", "failed")
        wait_state(page.locator(".fm-dag").first, "compute", "stale")
        last = page.locator(".fm-root").last
        last.scroll_into_view_if_needed()
        screenshot(page, "run-view-dark", last)
        page.locator(".fm-root").first.scroll_into_view_if_needed()
        screenshot(page, "session-dark-page")
    finally:
        lab.set_theme("JupyterLab Light")
