"""Which flow a notebook belongs to (real SQLite, real files), and how the
kernel's flow definition follows the saved notebook (no kernel needed)."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from flowmagic.magics.session import KernelFlowDefinition
from flowmagic.notebook import flow_identity, known_flow, notebook_with_cells
from flowmagic.store import open_store


def write(path: Path, cells: dict[str, str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source, id=cell_id) for cell_id, source in cells.items()]
    nbformat.write(nb, path)
    return path


CELLS = {"a": "import math", "b": "%%step start\nx = 1", "c": "%%step end\ny = x + 1"}


@pytest.fixture
def meta(tmp_path: Path):
    store = open_store(tmp_path / "store")
    run = store.meta.new_run("Untitled", params={}, code={})
    store.meta.record_notebook("Untitled", run, str(tmp_path / "Untitled.ipynb"), ["a", "b", "c"])
    return store.meta


def test_the_same_path_finds_its_flow_without_a_note(tmp_path, meta):
    write(tmp_path / "Untitled.ipynb", CELLS)
    assert flow_identity(tmp_path / "Untitled.ipynb", meta) == ("Untitled", None)


def test_a_renamed_notebook_is_found_by_its_cell_ids(tmp_path, meta):
    renamed = write(tmp_path / "sales_models.ipynb", CELLS)
    name, note = flow_identity(renamed, meta)
    assert name == "Untitled"
    assert note == "Flow SalesModels: continuing flow Untitled (notebook renamed from Untitled.ipynb)"


def test_a_copy_next_to_its_original_is_a_new_flow(tmp_path, meta):
    write(tmp_path / "Untitled.ipynb", CELLS)
    copy = write(tmp_path / "Untitled-Copy1.ipynb", CELLS)
    assert flow_identity(copy, meta) == ("UntitledCopy1", None)


def test_flow_name_in_a_cell_wins(tmp_path, meta):
    renamed = write(tmp_path / "sales.ipynb", {**CELLS, "d": "%flow name Chosen"})
    assert flow_identity(renamed, meta) == ("Chosen", None)


def test_unrelated_cells_find_nothing(tmp_path, meta):
    assert known_flow(meta, tmp_path / "other.ipynb", {"x", "y"}) is None


def test_an_old_store_gets_the_table_when_opened(tmp_path):
    import sqlite3

    store = open_store(tmp_path / "store")
    store.meta.close()
    with sqlite3.connect(tmp_path / "store" / "metadata.sqlite") as conn:
        conn.execute("DROP TABLE notebook_runs")
    assert open_store(tmp_path / "store").meta.notebook_records() == []


def test_a_notebook_is_found_in_its_folder_by_ids_or_by_what_ran(tmp_path):
    write(tmp_path / "one.ipynb", CELLS)
    write(tmp_path / "two.ipynb", {"q": "%%step start\nx = 2"})
    assert notebook_with_cells(tmp_path, {"b"}) == tmp_path / "one.ipynb"
    assert notebook_with_cells(tmp_path, set(), {"%%step start\nx = 2"}) == tmp_path / "two.ipynb"
    write(tmp_path / "three.ipynb", {"r": "%%step start\nx = 2"})
    assert notebook_with_cells(tmp_path, set(), {"%%step start\nx = 2"}) is None   # ambiguous: ask


# -- the kernel's definition and the saved notebook ---------------------------------------
def saved(cells: dict[str, str]) -> list[tuple[str | None, str]]:
    return list(cells.items())


def steps(definition: KernelFlowDefinition) -> list[tuple[str, bool]]:
    return [(c.step, c.executed) for c in definition.cells if c.kind == "step"]


def test_the_saved_steps_join_the_flow_not_executed():
    d = KernelFlowDefinition()
    assert d.sync_saved(saved(CELLS), saved_at=0) == []
    assert steps(d) == [("start", False), ("end", False)]
    d.record(CELLS["b"], cell_id="b", execution_count=1)
    assert steps(d) == [("start", True), ("end", False)]


def test_an_executed_cell_keeps_its_source_and_a_saved_one_follows_the_file():
    d = KernelFlowDefinition()
    d.sync_saved(saved(CELLS), saved_at=0)
    d.record("%%step start\nx = 5", cell_id="b", execution_count=1)
    d.sync_saved(saved({**CELLS, "c": "%%step end\ny = x * 2"}), saved_at=1)
    assert [c.source for c in d.cells if c.kind == "step"] == ["%%step start\nx = 5", "%%step end\ny = x * 2"]


def test_a_deleted_cell_leaves_but_a_cell_executed_after_the_save_stays():
    d = KernelFlowDefinition()
    d.sync_saved(saved(CELLS), saved_at=0)
    d.record(CELLS["c"], cell_id="c", execution_count=1)
    new = d.record("%%step extra\nz = 1", cell_id="new", execution_count=2)
    without = {k: v for k, v in CELLS.items() if k != "c"}
    assert d.sync_saved(saved(without), saved_at=new.recorded_at - 1) == ["end"]
    assert steps(d) == [("start", False), ("extra", True)]   # not saved yet: kept


def test_a_header_renamed_in_its_cell_remembers_the_old_name():
    d = KernelFlowDefinition()
    d.record("%%step choose_settings\ns = 1", cell_id="k")
    cell = d.record("%%step pick_settings\ns = 1", cell_id="k")
    assert cell.renamed_from == "choose_settings" and steps(d) == [("pick_settings", True)]


def test_a_cell_executed_without_an_id_replaces_its_saved_twin():
    d = KernelFlowDefinition()
    d.sync_saved(saved(CELLS), saved_at=0)
    d.record(CELLS["a"], execution_count=1)
    d.record(CELLS["b"], execution_count=2)
    assert [c.source for c in d.cells] == list(CELLS.values())
    assert [c.executed for c in d.cells] == [True, True, False]


def test_gc_spares_a_partial_session_run_of_a_live_kernel(tmp_path):
    meta = open_store(tmp_path / "store").meta
    live = meta.new_run("F", params={}, code={}, interactive=True)   # this process stands for the kernel
    meta.finish_run("F", live, "partial")
    done = meta.new_run("F", params={}, code={})
    meta.finish_run("F", done, "succeeded")
    assert meta.delete_runs("F", [live, done]) == [done]


def test_dump_and_the_inspector_show_a_session_runs_current_execution(tmp_path):
    from flowmagic import services
    from flowmagic.flow.graph import build_flow
    from flowmagic.runtime.orchestrator.scheduler import new_session_run, run_step
    from flowmagic.widgets.inspector import Inspector

    store = open_store(tmp_path / "store")
    broken = build_flow(["%%step fit\nmodel = 1 / 0"], name="Fits")
    run_id = new_session_run(broken, store)
    assert run_step(broken, store, run_id, "fit", workdir=str(tmp_path)).status == "failed"
    fixed = build_flow(["%%step fit\nmodel = 1 / 2"], name="Fits")
    assert run_step(fixed, store, run_id, "fit", workdir=str(tmp_path)).status == "succeeded"

    current = services.dump_document(store, "Fits", str(run_id))
    every = services.dump_document(store, "Fits", f"{run_id}/fit", all_executions=True)
    assert len(current["artifacts"]) == 1 and len(store.meta.tasks("Fits", run_id)) == 2
    assert [a["task"] for a in every["artifacts"]] == [a["task"] for a in current["artifacts"]]  # failed: none
    view = Inspector(store, "Fits", run_id=run_id)
    assert [s["label"] for s in view.steps] == ["fit · done"]
    assert len(view.tasks) == 1


def test_a_saved_cell_that_does_not_build_is_left_out_not_the_whole_flow():
    cells = {**CELLS, "w": "%%step wip\nz = not_defined_anywhere"}
    d = KernelFlowDefinition()
    d.sync_saved(saved(cells), saved_at=0)
    assert [s.name for s in d.build("F").steps] == ["start", "end"]
    assert d.notes == ["the cell '%%step wip' (cell 4, saved, not executed in this kernel yet) is left out of the flow "
                       "until it is executed: reads 'not_defined_anywhere', which no step above it writes and "
                       "no parameter, import, def, class or constant defines"]
    d.sync_saved(saved(cells), saved_at=1)               # saved again unchanged: still out
    assert [s.name for s in d.build("F").steps] == ["start", "end"]


def test_executed_cells_keep_the_order_they_ran_in():
    """Interactive order is what the kernel executed; the saved order only places
    the cells not executed yet."""
    cells = {"s2": "%%step second\ny = x + 1", "s1": "%%step first\nx = 1"}
    d = KernelFlowDefinition()
    d.sync_saved(saved(cells), saved_at=0)
    d.record(cells["s1"], cell_id="s1", execution_count=1)
    d.record(cells["s2"], cell_id="s2", execution_count=2)
    assert [s.name for s in d.build("F").steps] == ["first", "second"]


def test_saved_cells_not_executed_sit_after_their_executed_neighbour():
    d = KernelFlowDefinition()
    d.sync_saved(saved(CELLS), saved_at=0)
    d.record(CELLS["b"], cell_id="b", execution_count=1)
    assert [c.key for c in d.cells] == ["a", "b", "c"]
    assert [s.name for s in d.build("F").steps] == ["start", "end"]
