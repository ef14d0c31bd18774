"""The stale marker shows in the stale step cell's own output area in a real
JupyterLab, and shows nothing while the step is fresh (issue 15)."""
from __future__ import annotations

import pytest
from labfixtures import chromium, lab, lab_page  # noqa: F401  (fixtures)
from labpage import open_notebook, run_all, run_cell, screenshot, wait_idle, write_notebook

pytestmark = pytest.mark.browser


def test_a_stale_step_cell_says_so_in_its_own_output(lab, lab_page):
    page = lab_page
    notebook = write_notebook(lab.root / "stale_marker.ipynb", [
        "%load_ext flowmagic\n%flow name StaleMarker",
        ("markdown", "# rows"),
        "%%step start\nrows = list(range(4))",
        "%%step total\nn = sum(rows)\nprint('total', n)",
    ])
    open_notebook(page, lab, notebook.name)
    run_all(page)
    wait_idle(page)
    total = page.locator(".jp-CodeCell", has_text="%%step total").last
    total.locator(".jp-OutputArea-output", has_text="total 6").wait_for(timeout=60_000)
    assert total.locator(".flowmagic-stale").count() == 0
    assert "No renderer" not in (total.locator(".jp-OutputArea").text_content() or "")
    screenshot(page, "stale_marker_fresh", total)

    run_cell(page, "rows = list(range(4))")
    marker = total.locator(".flowmagic-stale")
    marker.wait_for(timeout=60_000)
    assert marker.text_content().strip() == \
        "\u26a0 stale: re-run this cell (it used the previous 'rows' from cell 3)"
    assert "total 6" in (total.locator(".jp-OutputArea").text_content() or "")   # its output stays
    screenshot(page, "stale_marker_stale", total)
    wait_idle(page)
    run_cell(page, "n = sum(rows)")
    marker.wait_for(state="detached", timeout=60_000)
    assert page.js_errors == []
