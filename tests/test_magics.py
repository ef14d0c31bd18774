"""The magics' bookkeeping and usage errors, in a real in-process IPython shell.

Runs of steps need a kernel and subprocesses: see test_magics_kernel.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from IPython.core.interactiveshell import InteractiveShell

from flowmagic.flow.graph import build_flow
from flowmagic.errors import FlowDefinitionError
from flowmagic.magics.session import KernelFlowDefinition, SessionRun, notebook_path
from flowmagic.store.paths import store_root_for


# -- the kernel's flow definition ---------------------------------------------------
def test_cells_keep_their_first_execution_order_and_latest_source():
    d = KernelFlowDefinition()
    d.record("import math", execution_count=1)
    d.record("%%step start\nx = 1", execution_count=2)
    d.record("%%step end\ny = x + 1", execution_count=3)
    d.record("%%step start\nx = 2", execution_count=4)      # edited and re-executed
    assert [c.step for c in d.cells] == [None, "start", "end"]
    assert d.step_cell("start").source.endswith("x = 2")
    assert d.step_cell("start").execution_count == 4
    graph = build_flow(d.sources(), name="F")
    assert [s.name for s in graph.steps] == ["start", "end"]
    assert graph.producers("end") == {"x": "start"}


def test_a_cell_id_follows_a_renamed_step_and_a_moved_step_replaces_the_old_cell():
    d = KernelFlowDefinition()
    d.record("%%step a\nx = 1", cell_id="c1")
    d.record("%%step b\ny = x", cell_id="c2")
    d.record("%%step first\nx = 1", cell_id="c1")            # renamed in place
    assert [c.step for c in d.cells] == ["first", "b"]
    d.record("%%step b\ny = x * 2", cell_id="c3")            # step b now lives in a new cell
    assert [(c.key, c.step) for c in d.cells] == [("c1", "first"), ("c3", "b")]


def test_ordinary_cells_without_ids_are_kept_by_text_and_feed_the_prelude():
    d = KernelFlowDefinition()
    d.record("import math\nSCALE = 3", execution_count=1)
    d.record("import math\nSCALE = 3", execution_count=5)    # the same cell again
    d.record("%%step s\nv = math.sqrt(SCALE)", execution_count=6)
    assert len(d.cells) == 2
    assert "SCALE = 3" in build_flow(d.sources()).prelude


def test_forget_and_reset():
    d = KernelFlowDefinition()
    d.record("import os")
    d.record("%%params\nalpha = 1  # a")
    d.record("%%step s\nx = alpha")
    assert d.forget_step("s") and not d.forget_step("s")
    d.record("%%step s\nx = alpha")
    d.forget_flow_cells()
    assert [c.kind for c in d.cells] == ["ordinary"]


def test_a_malformed_step_line_is_an_error_without_a_bogus_cell_index():
    d = KernelFlowDefinition()
    with pytest.raises(FlowDefinitionError) as info:
        d.record("%%step start --retry many\nx = 1")
    assert "--retry" in str(info.value) and "cell" not in str(info.value)


def test_definition_errors_name_cells_as_the_user_sees_them():
    d = KernelFlowDefinition()
    d.record("import pandas as pd", execution_count=1)
    d.record("df = pd.DataFrame({'a': [1]})", execution_count=2)
    d.record("%%step s\nn = len(df)", execution_count=3)
    with pytest.raises(FlowDefinitionError) as info:
        d.build("F")
    message = str(info.value)
    assert "step 's'" in message and "In [3]" in message
    assert "In [2]" in message and "make that cell a step, or a parameter" in message


def test_flow_name_precedence(tmp_path: Path):
    d = KernelFlowDefinition()
    assert d.flow_name(None) == "NotebookFlow"
    assert d.flow_name(tmp_path / "hello_flow.ipynb") == "HelloFlow"
    d.record("%flow name MovieFlow")
    assert d.flow_name(tmp_path / "hello_flow.ipynb") == "MovieFlow"
    d.name_override = "Other"
    assert d.flow_name(None) == "Other"


def test_notebook_path_from_each_front_end(tmp_path: Path):
    nb = tmp_path / "sub" / "an_analysis.ipynb"
    nb.parent.mkdir()
    nb.write_text("{}")
    assert notebook_path({}, {"__vsc_ipynb_file__": str(nb)}) == nb
    assert notebook_path({"JPY_SESSION_NAME": str(nb)}, {}) == nb
    # Jupyter Server: relative to its root, kernel started in the notebook's folder
    assert notebook_path({"JPY_SESSION_NAME": "sub/an_analysis.ipynb"}, {}, cwd=nb.parent) == nb
    assert notebook_path({}, {"__session__": "sub/an_analysis.ipynb"}, cwd=tmp_path) == nb
    assert notebook_path({"JPY_SESSION_NAME": "a-console-session-id"}, {}) is None
    assert notebook_path({}, {}) is None


def test_store_root(tmp_path: Path):
    nb = tmp_path / "n.ipynb"
    assert store_root_for(nb, {"FLOWMAGIC_HOME": str(tmp_path / "home")}) == tmp_path / "home"
    assert store_root_for(nb, {}) == tmp_path / ".flowmagic"
    assert store_root_for(None, {}) == Path.cwd() / ".flowmagic"
    # a relative $FLOWMAGIC_HOME means the same folder to the console, %flow and the Client: absolute
    assert store_root_for(nb, {"FLOWMAGIC_HOME": "rel"}) == Path.cwd() / "rel"


def test_session_run_producers_staleness_and_status():
    graph = build_flow(["%%step a\nx = 1", "%%step b\ny = x", "%%step c\nz = y"])
    session = SessionRun("F", Path("."))
    assert session.missing_producers(graph, "b") == ["a"]
    session.record(graph, "a", "done")
    session.record(graph, "b", "done")
    session.record(graph, "c", "failed")
    assert session.status(graph) == "failed"
    assert session.record(graph, "a", "done") == ["b", "c"]      # re-run: below becomes stale
    assert session.missing_producers(graph, "c") == []
    assert session.stale_producers(graph, "c") == ["b"]
    session.record(graph, "b", "done")
    assert session.states["c"] == "stale"
    session.record(graph, "c", "caught")
    assert session.status(graph) == "succeeded"


# -- usage errors in a real shell ---------------------------------------------------
@pytest.fixture
def shell(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    ip = InteractiveShell.instance()
    ip.history_manager.reset(new_session=True)   # the shell is shared: forget other tests' cells
    ip.run_line_magic("load_ext", "flowmagic")
    yield ip
    ip.run_line_magic("unload_ext", "flowmagic")
    ip.user_ns.pop("alpha", None)


def run(shell, code: str, capsys) -> tuple[bool, str]:
    result = shell.run_cell(code, store_history=True)
    out = capsys.readouterr()
    return result.success, out.out + out.err


@pytest.mark.parametrize("code, expected", [
    ("%flow bogus", "unknown sub-command 'bogus'"),
    ("%flow run --nope 1", "unrecognized arguments: --nope"),
    ("%flow dump", "the following arguments are required: RUN[/STEP[/TASK]]"),
    ("%flow tag add 3", "give at least one TAG"),
    ("%flow tag frobnicate 3 x", "invalid choice: 'frobnicate'"),
    ("%flow resume abc", "invalid int value: 'abc'"),
    ("%flow status --tag", "expected one argument"),
    ("%flow export --frobnicate", "unrecognized arguments: --frobnicate"),
    ("%flow run --max-workers many", "invalid int value: 'many'"),
    ("%flow name 9lives", "not a valid flow name"),
    ("%flow forget nothing", "the kernel has no step 'nothing'"),
    ("%%step\nx = 1", "%%step needs a step name"),
    ("%%step s --timeout soon\nx = 1", "bad value for --timeout"),
    ("%%step s --frobnicate\nx = 1", "unrecognized arguments: --frobnicate"),
    ("%flow run 'unclosed", "cannot read the options"),
])
def test_bad_usage_is_one_message_without_a_traceback(shell, capsys, code, expected):
    success, text = run(shell, code, capsys)
    assert not success
    assert expected in text
    assert "Traceback" not in text and "flowmagic/" not in text


def test_params_bind_defaults_and_run_help_lists_them(shell, capsys):
    success, _ = run(shell, '%%params\nalpha = 0.01  # Learning rate\n'
                            'genre = Parameter("genre", default="Sci-Fi", help="Filter genre")', capsys)
    assert success, _
    assert shell.user_ns["alpha"] == 0.01 and shell.user_ns["genre"] == "Sci-Fi"
    success, text = run(shell, "%flow run --help", capsys)
    assert success
    assert "--alpha" in text and "Learning rate" in text and "0.01" in text
    assert "--genre" in text and "Filter genre" in text
    success, text = run(shell, "%flow run --alpha fast", capsys)
    assert not success and "parameter 'alpha' (float): cannot use 'fast'" in text
    assert "Traceback" not in text


def test_a_step_reading_what_an_ordinary_cell_computes_is_a_clear_error(shell, capsys):
    assert run(shell, "rows = list(range(3))", capsys)[0]
    success, text = run(shell, "%%step count\nn = len(rows)", capsys)
    assert not success
    assert "FlowDefinitionError" in text and "step 'count'" in text
    assert "make that cell a step, or a parameter" in text and "rows = list(range(3))" in text
    assert "Traceback" not in text


def test_cells_executed_before_load_ext_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "store"))
    ip = InteractiveShell.instance()
    ip.history_manager.reset(new_session=True)
    ip.run_cell("SCALE = 10", store_history=True)
    ip.run_cell("%flow name Early", store_history=True)   # fails: not loaded yet
    ip.run_cell("%load_ext flowmagic", store_history=True)
    try:
        magics = ip._flowmagic
        assert "SCALE = 10" in magics.graph().prelude
        assert magics.flow_name() == "NotebookFlow"
    finally:
        ip.run_line_magic("unload_ext", "flowmagic")


def test_a_step_cell_that_cannot_be_defined_is_not_kept(shell, capsys):
    assert run(shell, "%%params\nalpha = 1  # a", capsys)[0]
    success, text = run(shell, "%%step bad\nx = undefined_name + alpha", capsys)
    assert not success and "undefined_name" in text
    success, text = run(shell, "%%step worse\nx = (", capsys)
    assert not success and "syntax" in text.lower()
    document = shell.run_line_magic("flow", "show --json")
    assert document["steps"] == []                         # the flow is as it was
    assert [p["name"] for p in document["parameters"]] == ["alpha"]


def test_flow_name_and_show_json(shell, capsys):
    assert run(shell, "%flow name Tutorial", capsys)[0]
    assert run(shell, "%%params\nalpha = 2  # a", capsys)[0]
    document = shell.run_line_magic("flow", "show --json")
    assert document["flow"] == "Tutorial"
    assert document["parameters"][0]["name"] == "alpha"
    success, text = run(shell, "%flow name", capsys)
    assert success and text.strip() == "Tutorial"
