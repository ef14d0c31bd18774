"""The widgets as users meet them: a flowmagic notebook in JupyterLab.

Run All executes the notebook's steps as the session run; the DAG that
`%flow show` displayed follows them live. Then `%flow dump` shows the run
with its inspector, a click on a node selects that step, and `%flow run`
shows a whole run live.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from labpage import open_notebook, run_all, run_cell, save, screenshot, wait_attribute, wait_idle

NOTEBOOK = Path(__file__).parent / "notebooks" / "widget_tour.ipynb"
NODE = 'g.fm-step[data-step="{}"]'


def wait_state(scope, step: str, state: str, timeout: float = 60_000) -> None:
    scope.locator(f'{NODE.format(step)}[data-state="{state}"]').first.wait_for(state="attached", timeout=timeout)


def flow_show_json(notebook: Path) -> dict:
    """The console command's reading of the notebook: what the DAG must show."""
    done = subprocess.run([sys.executable, "-m", "flowmagic.cli", "show", str(notebook), "--json"],
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def drawn_edges(dag) -> list[list[str]]:
    return sorted(dag.locator("g.fm-edge").evaluate_all(
        "els => els.map(e => [e.dataset.edgeFrom, e.dataset.edgeTo, e.dataset.variables])"))


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

    # dark theme, after a reload: the views come back from the kernel with their states
    save(page)
    lab.set_theme("JupyterLab Dark")
    try:
        page.reload()
        page.locator(".fm-run-dag .fm-dag").nth(1).wait_for(timeout=60_000)
        wait_state(page.locator(".fm-run-dag .fm-dag").nth(1), "broken", "failed")
        wait_state(page.locator(".fm-dag").first, "compute", "caught")
        last = page.locator(".fm-root").last
        last.scroll_into_view_if_needed()
        screenshot(page, "run-view-dark", last)
        page.locator(".fm-root").first.scroll_into_view_if_needed()
        screenshot(page, "session-dark-page")
    finally:
        lab.set_theme("JupyterLab Light")
