"""Issue 15 in real kernels: the stale marker in a step cell's own output,
edited prelude cells and parameters marking steps stale, the Run All order
warning, and one cell numbering (``cell N``, ``In [n]``) in messages.

Each test writes a real notebook (with a markdown cell, so that cell numbers
and code-cell positions differ) and drives a kernel started as Jupyter Server
starts it (``JPY_SESSION_NAME``), sending cell ids as JupyterLab does.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import execute_notebook, kernel_env
from flowmagic.magics.markers import MIME
from runtime_helpers import flowmagic
from test_session_kernel import NotebookKernel

pytestmark = pytest.mark.slow


def write_notebook(path: Path, cells: dict[str, str | None]) -> Path:
    """Cell ids are the keys; a None source is a markdown cell."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# notes", id=key) if source is None
                else nbformat.v4.new_code_cell(source, id=key) for key, source in cells.items()]
    nbformat.write(nb, path)
    return path


def open_kernel(request, notebook: Path) -> NotebookKernel:
    kernel = NotebookKernel(notebook, notebook.parent / "store")
    request.addfinalizer(kernel.shutdown)
    return kernel


def displays(execution, kind: str) -> list[dict]:
    return [m.content for m in execution.messages if m.msg_type == kind]


def marker_of(execution) -> str:
    """The display id of the stale marker a step cell opened its output with."""
    outputs = [m for m in execution.messages if m.msg_type in ("display_data", "stream", "execute_result")]
    assert outputs and outputs[0].msg_type == "display_data" and MIME in outputs[0].content["data"]
    assert outputs[0].content["data"] == {MIME: {}}    # fresh: nothing shows
    return outputs[0].content["transient"]["display_id"]


def updates_of(execution, display_id: str) -> list[dict]:
    return [c["data"] for c in displays(execution, "update_display_data")
            if c["transient"]["display_id"] == display_id]


CELLS: dict[str, str | None] = {
    "load": "%load_ext flowmagic",
    "notes": None,
    "helpers": "import math\nK = 2\ndef scale(x):\n    return x * K\ndef unused():\n    return 0",
    "start": "%%step start\nrows = [scale(i) for i in range(4)]\nprint('rows made')",
    "total": "%%step total\nn = sum(rows) * alpha",
    "other": "%%step other\nm = len(rows) + math.floor(1.5)",
    "params": "%%params\nalpha = 1",
}


def test_a_stale_step_cell_shows_a_marker_in_its_own_output_updated_in_place(request, tmp_path):
    kernel = open_kernel(request, write_notebook(tmp_path / "marker.ipynb", CELLS))
    for key in ("load", "helpers", "params", "start"):
        kernel.cell(CELLS, key)
    total = kernel.cell(CELLS, "total")
    total_marker = marker_of(total)
    again = kernel.cell(CELLS, "start")
    assert "rows made" in again.stdout     # the cell's own output is there, after the marker
    marker_of(again)
    (update,) = updates_of(again, total_marker)
    assert update["text/plain"] == "stale: re-run this cell (it used the previous 'rows' from cell 4)"
    assert "flowmagic-stale" in update["text/html"] and update[MIME]["stale"] is True
    fresh = kernel.cell(CELLS, "total")
    new_marker = marker_of(fresh)
    assert new_marker != total_marker and not updates_of(fresh, new_marker)
    assert kernel.value("%flow show --json")["steps"]       # the session goes on


def test_an_edited_prelude_cell_or_parameter_marks_the_steps_using_it_stale(request, tmp_path):
    cells = dict(CELLS)
    kernel = open_kernel(request, write_notebook(tmp_path / "prelude.ipynb", cells))
    for key in ("load", "helpers", "params", "start", "total", "other"):
        kernel.cell(cells, key)
    # whitespace and comments are not edits; a def no step uses is not either
    cells["helpers"] = ("import math\nK = 2\ndef scale(x):\n    # doubled\n    return x*K\n"
                        "def unused():\n    return 1")
    assert "marked stale" not in kernel.cell(cells, "helpers").stdout
    start_marker = marker_of(kernel.cell(cells, "start"))
    other_marker = marker_of(kernel.cell(cells, "other"))   # fresh again after start re-ran
    # K is read by scale(), which start calls: start is stale, other (math only) is not
    cells["helpers"] = cells["helpers"].replace("K = 2", "K = 3")
    edited = kernel.cell(cells, "helpers")
    assert "[flowmagic] marked stale (they used the previous 'K' from cell 3): start" in edited.stdout
    assert updates_of(edited, start_marker)[0]["text/plain"] == \
        "stale: re-run this cell (it used the previous 'K' from cell 3)"
    assert not updates_of(edited, other_marker)
    assert kernel.value("%flow status --json")  # still a working kernel
    kernel.cell(cells, "start")
    total_marker = marker_of(kernel.cell(cells, "total"))
    cells["params"] = "%%params\nalpha = 5"
    changed = kernel.cell(cells, "params")
    assert "marked stale (they used the previous 'alpha' from cell 7): total" in changed.stdout
    assert "previous 'alpha'" in updates_of(changed, total_marker)[0]["text/plain"]
    assert kernel.value("n") == 18 * 1    # the old value stays bound until the step runs again
    kernel.cell(cells, "total")
    assert kernel.value("n") == 18 * 5


def test_a_step_reading_a_cell_below_warns_and_says_what_run_all_does(request, tmp_path):
    notebook = write_notebook(tmp_path / "order.ipynb", CELLS)
    kernel = open_kernel(request, notebook)
    for key in ("load", "helpers", "params", "start"):
        kernel.cell(CELLS, key)
    total = kernel.cell(CELLS, "total")
    warning = ("[flowmagic] warning: step 'total' (cell 5) reads 'alpha' from the '%%params' cell "
               "(cell 7, In [3]), below it: nbconvert --execute and papermill fail at this step")
    assert warning in total.stderr and "move cell 7 above cell 5" in total.stderr
    assert len([ln for ln in total.stderr.splitlines() if "warning" in ln]) == 1
    assert "below it" not in kernel.cell(CELLS, "other").stderr
    # What the warning says, checked: JupyterLab's Restart and Run All (a kernel
    # that knows the saved notebook, executing top to bottom) works ...
    kernel.restart()
    for key in ("load", "helpers", "start", "total", "other", "params"):
        kernel.cell(CELLS, key)
    assert kernel.value("n") == 12
    # ... and so does the console; nbconvert/papermill (no notebook path) fail at that step
    run = flowmagic("run", notebook, store=tmp_path / "store", cwd=tmp_path)
    assert run.returncode == 0, run.stdout + run.stderr
    _, error = execute_notebook(notebook, tmp_path, kernel_env(tmp_path / "store2"), may_fail=True)
    assert error is not None and "reads 'alpha'" in str(error)


def test_a_step_reading_a_step_output_below_warns_that_run_all_fails(request, tmp_path):
    cells: dict[str, str | None] = {"load": "%load_ext flowmagic",
                                    "use": "%%step use\ny = x + 1",
                                    "make": "%%step make\nx = 1"}
    notebook = write_notebook(tmp_path / "below.ipynb", cells)
    kernel = open_kernel(request, notebook)
    kernel.cell(cells, "load")
    kernel.cell(cells, "make")
    use = kernel.cell(cells, "use")
    assert ("step 'use' (cell 2) reads 'x' from the cell '%%step make' (cell 3, In [2]), below it: "
            "Run All") in use.stderr
    assert "move this cell below cell 3" in use.stderr
    # the DAG's cells are the notebook's, not the kernel's first-executed order
    shown = {s["name"]: s["cell"] for s in kernel.value("%flow show --json")["steps"]}
    assert shown == {"make": 2, "use": 1}
    kernel.restart()       # Restart and Run All fails there, as warned
    kernel.cell(cells, "load")
    failed = kernel.execute(cells["use"], cell_id="use")
    assert failed.status == "error" and "move this step below it" in failed.error_text


def test_messages_name_a_cell_by_its_place_and_in_n(request, tmp_path):
    cells: dict[str, str | None] = {"load": "%load_ext flowmagic", "notes": None,
                                    "start": "%%step start\nrows = [1, 2]",
                                    "fit": "%%step fit\ntotal = sum(rows)\nz = 1 / 0"}
    kernel = open_kernel(request, write_notebook(tmp_path / "numbers.ipynb", cells))
    kernel.cell(cells, "load")
    early = kernel.execute(cells["fit"], cell_id="fit")       # In [2]: start has not run
    assert "step 'start' (the cell '%%step start' (cell 3, saved, not executed in this kernel yet))" \
        in early.error_text
    kernel.cell(cells, "start")                               # In [3]
    failed = kernel.execute(cells["fit"], cell_id="fit")      # In [4]
    assert 'File "step fit (cell 4, In [4])", line 3' in failed.error_text
