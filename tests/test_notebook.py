"""Reading saved notebooks: cells, flow name, store root."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from flowmagic.errors import FlowDefinitionError, UsageError
from flowmagic.notebook import camel_case, flow_name_for, load_flow, read_cells
from flowmagic.store.paths import store_root_for

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_notebooks").glob("*.ipynb"))


def write_notebook(path: Path, cells: list[tuple[str, str]]) -> Path:
    notebook = nbformat.v4.new_notebook()
    makers = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell,
              "raw": nbformat.v4.new_raw_cell}
    notebook.cells = [makers[kind](source) for kind, source in cells]
    nbformat.write(notebook, path)
    return path


def test_read_cells_keeps_indices(tmp_path):
    path = write_notebook(tmp_path / "nb.ipynb", [
        ("markdown", "# Title"), ("code", "%%step a\nx = 1"), ("raw", "raw text"), ("code", "%%step b\ny = x")])
    assert read_cells(path) == ["", "%%step a\nx = 1", "", "%%step b\ny = x"]
    graph = load_flow(path)
    assert [(s.name, s.cell) for s in graph.steps] == [("a", 1), ("b", 3)]


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UsageError, match="no such notebook"):
        read_cells(tmp_path / "absent.ipynb")
    (tmp_path / "text.ipynb").write_text("not json")
    with pytest.raises(UsageError, match="is not a Jupyter notebook"):
        read_cells(tmp_path / "text.ipynb")
    (tmp_path / "other.ipynb").write_text('{"hello": 1}')
    with pytest.raises(UsageError, match="is not a Jupyter notebook"):
        read_cells(tmp_path / "other.ipynb")
    with pytest.raises(UsageError, match="no such notebook"):
        read_cells(tmp_path)  # a directory


@pytest.mark.parametrize("stem, name", [
    ("hello_flow", "HelloFlow"), ("model-selection v2", "ModelSelectionV2"), ("catchFlow", "CatchFlow"),
    ("01_intro", "Flow01Intro"), ("", "Flow"), ("___", "Flow"), ("données_flux", "DonnéesFlux"),
])
def test_camel_case(stem, name):
    assert camel_case(stem) == name
    assert name.isidentifier()


def test_flow_name_from_stem_or_flow_name_line(tmp_path):
    plain = write_notebook(tmp_path / "hello_flow.ipynb", [("code", "%%step a\nx = 1")])
    assert flow_name_for(plain) == "HelloFlow"
    assert load_flow(plain).name == "HelloFlow"
    named = write_notebook(tmp_path / "hello_flow2.ipynb", [("code", "%load_ext flowmagic\n%flow name Movies"),
                                                            ("code", "%%step a\nx = 1")])
    assert flow_name_for(named) == "Movies"
    assert load_flow(named).name == "Movies"


def test_store_root(tmp_path, monkeypatch):
    monkeypatch.delenv("FLOWMAGIC_HOME", raising=False)
    monkeypatch.chdir(tmp_path)
    assert store_root_for("sub/nb.ipynb") == tmp_path / "sub" / ".flowmagic"
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "home"))
    assert store_root_for("sub/nb.ipynb") == tmp_path / "home"


def test_load_flow_reports_definition_errors(tmp_path):
    path = write_notebook(tmp_path / "bad.ipynb", [("code", "df = load()"), ("code", "%%step a\ny = df")])
    with pytest.raises(FlowDefinitionError) as info:
        load_flow(path)
    assert (info.value.step, info.value.cell, info.value.variable) == ("a", 1, "df")


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_notebook_defines_a_flow(path):
    graph = load_flow(path)
    assert graph.steps
    assert graph.name.isidentifier()
