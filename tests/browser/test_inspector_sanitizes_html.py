"""Step HTML from the store is untrusted: the inspector sanitises it. The
store is written by the console (so the payload never passes through a cell's
own output), then `%flow dump` shows it in a real JupyterLab."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from labfixtures import chromium, lab, lab_page  # noqa: F401  (fixtures)
from labpage import open_notebook, run_cell, wait_idle, write_notebook

pytestmark = pytest.mark.browser

PAYLOAD = ("<b id='fm-kept'>kept</b>"
           "<img id='fm-img' src='x' onerror='window.__fm_pwned = (window.__fm_pwned || 0) + 1'>"
           "<script>window.__fm_pwned = (window.__fm_pwned || 0) + 10</script>"
           "<a id='fm-link' href='javascript:window.__fm_pwned = 100'>link</a>"
           "<svg><image href='x' onerror='window.__fm_pwned = 1000'></image></svg>"
           "<table><tr><td id='fm-cell'>1</td></tr></table>")


def test_the_inspector_drops_scripts_and_event_handlers_from_step_html(lab, lab_page):
    page = lab_page
    notebook = write_notebook(lab.root / "hostile_html.ipynb", [
        "%load_ext flowmagic\n%flow name HostileHtml",
        "from IPython.display import HTML, display",
        f"%%step start\ndisplay(HTML({PAYLOAD!r}))\nx = 1",
        "%flow dump 1",
    ])
    env = dict(os.environ, FLOWMAGIC_HOME=str(lab.root.parent / "home" / ".flowmagic"))  # the lab's store
    proc = subprocess.run([sys.executable, "-m", "flowmagic.cli.main", "run", str(notebook), "--json"],
                          capture_output=True, text=True, env=env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["run_id"] == 1

    open_notebook(page, lab, notebook.name)
    run_cell(page, "%load_ext flowmagic")
    wait_idle(page)
    run_cell(page, "%flow dump 1")
    html = page.locator(".fm-inspector .fm-output-html").first
    html.wait_for(timeout=60_000)
    time.sleep(1.0)  # give a broken image's onerror time to fire, were it there
    assert html.locator("#fm-kept").text_content() == "kept"
    assert html.locator("#fm-cell").text_content() == "1"   # tables survive
    assert html.locator("script").count() == 0
    assert html.locator("[onerror]").count() == 0
    assert (html.locator("#fm-link").get_attribute("href") or "").startswith("javascript:") is False
    assert page.evaluate("() => window.__fm_pwned === undefined")
    assert page.js_errors == []
