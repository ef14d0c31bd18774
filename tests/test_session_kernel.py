"""The notebook session in real kernels: flow identity across renames, restarts,
partial session runs, cells tracked by id, and a saved file that goes bad.

Each test writes a real notebook (nbformat 4.5, with cell ids) to disk and
starts real kernels on it with ``JPY_SESSION_NAME`` set as Jupyter Server sets
it (the path relative to the server's root, the kernel started in the
notebook's folder), executing its cells with their ids as JupyterLab sends them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nbformat
import pytest

from conftest import LiveKernel, execute_notebook, kernel_env
from flowmagic.store import open_store
from runtime_helpers import flowmagic

pytestmark = pytest.mark.slow

CELLS = {
    "load": "%load_ext flowmagic",
    "start": "%%step start\nrows = list(range(10))",
    "settings": "%%step choose_settings\nsettings = [1, 2]",
    "total": "%%step total\nn = sum(rows) * len(settings)",
}


def write_notebook(path: Path, cells: dict[str, str]) -> Path:
    """A notebook whose cell ids are the keys of ``cells``."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, id=cell_id) for cell_id, source in cells.items()]
    nbformat.write(nb, path)
    return path


class NotebookKernel(LiveKernel):
    """A kernel Jupyter Server would start for ``notebook``."""

    def __init__(self, notebook: Path, store: Path) -> None:
        super().__init__(notebook.parent, kernel_env(store, JPY_SESSION_NAME=notebook.name))

    def cell(self, cells: dict[str, str], cell_id: str):
        execution = self.execute(cells[cell_id], cell_id=cell_id)
        assert execution.status == "ok", execution.error_text + execution.stderr
        return execution

    def restart(self) -> None:
        self.km.restart_kernel(now=True)
        self.kc.wait_for_ready(timeout=60)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return tmp_path


def open_kernel(request, notebook: Path, store: Path) -> NotebookKernel:
    kernel = NotebookKernel(notebook, store)
    request.addfinalizer(kernel.shutdown)
    return kernel


def test_a_renamed_notebook_continues_its_flow_in_a_new_kernel_and_in_the_console(request, folder):
    store = folder / "store"
    untitled = write_notebook(folder / "Untitled.ipynb", CELLS)
    first = open_kernel(request, untitled, store)
    for cell_id in CELLS:
        first.cell(CELLS, cell_id)
    first.shutdown()
    renamed = folder / "sales_models.ipynb"
    shutil.move(untitled, renamed)

    second = open_kernel(request, renamed, store)
    loaded = second.cell(CELLS, "load")
    assert "Flow SalesModels: continuing flow Untitled (notebook renamed from Untitled.ipynb)" in loaded.stdout
    status = second.value("%flow status --json")
    assert status["flow"] == "Untitled" and [r["status"] for r in status["runs"]] == ["succeeded"]
    second.cell(CELLS, "start")   # its runs join the old flow, now recorded at the new path
    assert [r.run_id for r in open_store(store).meta.list_runs("Untitled")] == [2, 1]

    proc = flowmagic("status", str(renamed), "--json", store=store)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["flow"] == "Untitled"
    assert "continuing flow Untitled" in proc.stderr
    second.ok("%flow name Renamed")            # %flow name still overrides
    assert second.ok("%flow name").stdout.strip() == "Renamed"


def test_a_copy_is_a_new_flow_not_the_original(request, folder):
    store = folder / "store"
    original = write_notebook(folder / "original.ipynb", CELLS)
    kernel = open_kernel(request, original, store)
    kernel.cell(CELLS, "load")
    kernel.cell(CELLS, "start")
    kernel.shutdown()
    copy = folder / "original-Copy1.ipynb"
    shutil.copy(original, copy)               # JupyterLab's Duplicate keeps the cell ids
    other = open_kernel(request, copy, store)
    loaded = other.cell(CELLS, "load")
    assert "continuing" not in loaded.stdout
    assert other.ok("%flow name").stdout.strip() == "OriginalCopy1"


def test_after_a_restart_the_saved_steps_are_there_and_load_binds_the_last_run(request, folder):
    store = folder / "store"
    notebook = write_notebook(folder / "restart_me.ipynb", CELLS)
    kernel = open_kernel(request, notebook, store)
    for cell_id in CELLS:
        kernel.cell(CELLS, cell_id)
    kernel.restart()

    kernel.cell(CELLS, "load")
    shown = kernel.value("%flow show --json")
    assert [s["name"] for s in shown["steps"]] == ["start", "choose_settings", "total"]
    loaded = kernel.ok("%flow load")
    assert "bound 3 names from run RestartMe/1 (succeeded): n, rows, settings;" in loaded.stdout
    assert kernel.value("(n, len(rows), settings)") == (90, 10, [1, 2])
    assert kernel.value("type(rows).__name__") == "list"

    refused = kernel.execute("%flow resume")
    assert refused.status == "error" and "nothing to resume" in refused.error_text
    assert "Traceback" not in refused.error_text
    assert [r.run_id for r in open_store(store).meta.list_runs("RestartMe")] == [1]   # nothing recorded

    # the next step cell continues from the loaded run: its steps above count as run
    kernel.cell(dict(CELLS, total="%%step total\nn = sum(rows) * len(settings) + 1"), "total")
    assert kernel.value("n") == 91
    meta = open_store(store).meta
    assert [t.state for t in meta.tasks("RestartMe", 2)] == ["cloned", "cloned", "done"]
    assert meta.get_run("RestartMe", 2).status == "succeeded"

    # without a load, a step whose producer has not run in this kernel names the saved cell
    kernel.restart()
    kernel.cell(CELLS, "load")
    early = kernel.execute(CELLS["total"], cell_id="total")
    assert early.status == "error"
    assert "step 'start' (the cell '%%step start' (cell 2, saved, not executed in this kernel yet))" in early.error_text


def test_a_session_run_of_some_steps_is_partial_and_not_the_latest_success(request, folder):
    from flowmagic.client import Flow

    store = folder / "store"
    notebook = write_notebook(folder / "half_done.ipynb", CELLS)
    kernel = open_kernel(request, notebook, store)
    kernel.cell(CELLS, "load")
    kernel.cell(CELLS, "start")
    (run,) = open_store(store).meta.list_runs("HalfDone")
    assert run.status == "partial"
    assert Flow("HalfDone", root=store).latest_successful_run is None
    assert Flow("HalfDone", root=store).latest_run.run_id == run.run_id
    proc = flowmagic("status", str(notebook), store=store)
    assert proc.returncode == 0 and "partial (session)" in proc.stdout, proc.stdout + proc.stderr
    refused = flowmagic("resume", str(notebook), store=store)   # a plain resume skips partial runs
    assert refused.returncode != 0 and "no finished run to resume" in refused.stderr + refused.stdout
    kernel.cell(CELLS, "settings")
    kernel.cell(CELLS, "total")
    assert open_store(store).meta.get_run("HalfDone", run.run_id).status == "succeeded"
    kernel.shutdown()
    assert open_store(store).meta.get_run("HalfDone", run.run_id).status == "succeeded"


def test_a_deleted_step_cell_leaves_the_flow_once_the_notebook_is_saved(request, folder):
    store = folder / "store"
    notebook = write_notebook(folder / "deleting.ipynb", CELLS)
    kernel = open_kernel(request, notebook, store)
    for cell_id in CELLS:
        kernel.cell(CELLS, cell_id)
    without = {k: v for k, v in CELLS.items() if k != "total"}
    write_notebook(notebook, without)          # JupyterLab saves the notebook without the cell
    shown = kernel.execute("%flow show --json")
    assert "step 'total' left the flow: its cell is no longer in the saved notebook" in shown.stdout
    assert [s["name"] for s in kernel.value("%flow show --json")["steps"]] == ["start", "choose_settings"]


def test_renaming_a_step_header_names_the_old_step(request, folder):
    store = folder / "store"
    cells = dict(CELLS)
    notebook = write_notebook(folder / "renaming.ipynb", cells)
    kernel = open_kernel(request, notebook, store)
    for cell_id in cells:
        kernel.cell(cells, cell_id)
    cells["settings"] = "%%step pick_settings\nsettings = [1, 2, 3]"
    execution = kernel.cell(cells, "settings")
    assert "step 'choose_settings' renamed to 'pick_settings'" in execution.stdout
    assert "the previous 'pick_settings'" not in execution.stdout
    assert "marked stale (they used 'choose_settings' before its rename): total" in execution.stdout
    steps = [s["name"] for s in kernel.value("%flow show --json")["steps"]]
    assert steps == ["start", "pick_settings", "total"]


def test_dump_of_a_session_run_shows_the_current_execution_of_each_cell(request, folder):
    store = folder / "store"
    cells = {"load": "%load_ext flowmagic", "fit": "%%step fit\nmodel = 1 / 0"}
    notebook = write_notebook(folder / "dumping.ipynb", cells)
    kernel = open_kernel(request, notebook, store)
    kernel.cell(cells, "load")
    assert kernel.execute(cells["fit"], cell_id="fit").status == "error"
    cells["fit"] = "%%step fit\nmodel = 1 / 2"
    kernel.cell(cells, "fit")
    current = kernel.value("%flow dump 1 --json")
    assert [(a["name"], a["step"]) for a in current["artifacts"]] == [("model", "fit")]
    proc = flowmagic("dump", str(notebook), "1/fit", "--all-executions", "--json", store=store)
    assert proc.returncode == 0, proc.stderr
    tasks = open_store(store).meta.tasks("Dumping", 1, "fit")
    assert len(tasks) == 2 and tasks[0].state == "failed"
    assert [a["task"] for a in json.loads(proc.stdout)["artifacts"]] == [tasks[1].task_id]


@pytest.mark.parametrize("damage", ["deleted", "not json"])
def test_a_saved_notebook_that_goes_bad_warns_once_and_the_session_goes_on(request, folder, damage):
    store = folder / "store"
    notebook = write_notebook(folder / "fragile.ipynb", CELLS)
    kernel = open_kernel(request, notebook, store)
    kernel.cell(CELLS, "load")
    kernel.cell(CELLS, "start")
    if damage == "deleted":
        notebook.unlink()
    else:
        notebook.write_text("{ this is not json", encoding="utf-8")
    execution = kernel.cell(CELLS, "settings")
    warnings = [ln for ln in execution.stderr.splitlines() if "warning" in ln]
    assert len(warnings) == 1, execution.stderr
    assert "fragile.ipynb" in warnings[0] and "the flow stays as this kernel executed it" in warnings[0]
    again = kernel.cell(CELLS, "total")
    assert "warning" not in again.stderr
    assert kernel.value("n") == 90


def test_kernels_without_a_notebook_path_do_not_share_a_flow(folder):
    """nbclient (as nbconvert --execute and papermill) does not tell the kernel its
    notebook: found by its cells' ids in the working folder, each notebook gets
    its own flow; where it cannot be found, a one-line warning asks for a name."""
    store = folder / "store"
    for name in ("first_analysis", "second_analysis"):
        cells = {f"{name}-{k}": v.replace("range(10)", f"range({len(name)})") for k, v in CELLS.items()}
        write_notebook(folder / f"{name}.ipynb", cells)
        execute_notebook(folder / f"{name}.ipynb", folder, kernel_env(store))
    flows = open_store(store).meta.list_flows()
    assert flows == ["FirstAnalysis", "SecondAnalysis"]

    elsewhere = folder / "elsewhere"
    elsewhere.mkdir()
    cells = {f"lost-{k}": v.replace("range(10)", "range(3)") for k, v in CELLS.items()}
    notebook = write_notebook(folder / "lost.ipynb", cells)
    nb, _ = execute_notebook(notebook, elsewhere, kernel_env(store))
    stderr = "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.get("name") == "stderr")
    warnings = [ln for ln in stderr.splitlines() if "does not know its notebook" in ln]
    assert len(warnings) == 1 and "%flow name NAME" in warnings[0]


def test_after_a_restart_resume_runs_the_saved_notebooks_code(request, folder):
    store = folder / "store"
    cells = dict(CELLS, total="%%step total\nn = sum(rows) / 0")
    notebook = write_notebook(folder / "fix_later.ipynb", cells)
    kernel = open_kernel(request, notebook, store)
    for cell_id in ("load", "start", "settings"):
        kernel.cell(cells, cell_id)
    assert kernel.execute(cells["total"], cell_id="total").status == "error"
    write_notebook(notebook, CELLS)            # the fix is saved, then the kernel restarted
    kernel.restart()
    kernel.cell(CELLS, "load")
    resumed = kernel.ok("r = %flow resume")
    assert kernel.value("r['total'].task.data.n") == 90
    assert kernel.value("r.id") == "2"
    first, = [r for r in open_store(store).meta.list_runs("FixLater") if r.run_id == 1]
    assert first.status == "failed" and "cloned" in resumed.stdout
