"""Tasks run without IPython unless their flow needs it; the shell comes the
moment a task turns out to need it. Real console runs, a real fork server,
a fresh interpreter; results read back with the Client API."""
from __future__ import annotations

import subprocess
import sys

import pytest

from flowmagic import Flow, namespace_root
from flowmagic.runtime.worker.forkserver import ARROW_CODECS, IPYTHON, flow_preload
from runtime_helpers import flowmagic, write_notebook

pytestmark = pytest.mark.slow   # runs whole flows in subprocesses: not in the quick loop

# Built at run time so the step's own text does not name IPython (which would preload it).
LOADED = "loaded = ('IPy' + 'thon') in sys.modules\n"


@pytest.mark.parametrize("sources, expected", [
    (["import os\nx = 1", "y = x + 1"], ()),
    (["x = 1", "display(x)"], (IPYTHON,)),
    (["get_ipython().run_line_magic('time', 'x = 1')"], (IPYTHON,)),
    (["import matplotlib.pyplot as plt", "plt.plot([1, 2])"], (IPYTHON,)),
    (["import pandas as pd", "ax = df.plot()"], (IPYTHON, "pandas", ARROW_CODECS)),
    (["from IPython.display import HTML"], (IPYTHON,)),
    (["displayed = 1\nmy_plot_count = 2"], ()),
])
def test_flow_preload_asks_for_ipython_only_when_the_code_shows_it(sources, expected):
    assert flow_preload(sources) == expected


def _task(store, flow: str, step: str):
    namespace_root(store)
    return Flow(flow).latest_run[step].task


@pytest.fixture
def store(tmp_path):
    yield tmp_path / "store"
    namespace_root(None)


def test_a_plain_flow_runs_without_ipython_and_a_value_to_show_makes_the_shell_in_that_task(tmp_path, store):
    nb = write_notebook(tmp_path / "plain_flow.ipynb", [
        "%load_ext flowmagic",
        "import sys",
        "%%step start\n" + LOADED.replace("loaded", "start_loaded") + "x = 41",
        "%%step shown\ny = x + 1\n" + LOADED.replace("loaded", "before_value") + "{'answer': y}",
        "%%step end\n" + LOADED.replace("loaded", "end_loaded") + "z = y",
    ])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert _task(store, "PlainFlow", "start")["start_loaded"].data is False
    shown = _task(store, "PlainFlow", "shown")
    assert shown["before_value"].data is False
    # the value was formatted by IPython, exactly as a notebook shows it
    assert [o.data["text/plain"] for o in shown.outputs] == ["{'answer': 42}"]
    # the shell was made in that task only: the next task forks from a server without it
    assert _task(store, "PlainFlow", "end")["end_loaded"].data is False


def test_magics_and_display_get_a_server_with_the_shell_ready(tmp_path, store):
    nb = write_notebook(tmp_path / "magic_flow.ipynb", [
        "%load_ext flowmagic",
        "import sys",
        "%%step start\n%time x = 6 * 7\n" + LOADED,
        "%%step end\ndisplay({'x': x})\ny = x",
    ])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    start = _task(store, "MagicFlow", "start")
    assert start["x"].data == 42 and start["loaded"].data is True
    assert [o.data["text/plain"] for o in _task(store, "MagicFlow", "end").outputs] == ["{'x': 42}"]


def test_a_library_that_draws_with_pyplot_unnamed_in_the_flow_still_shows_its_figure(tmp_path, store):
    nb = write_notebook(tmp_path / "hist_flow.ipynb", [
        "%load_ext flowmagic",
        "import pandas as pd",
        "%%step start\nseries = pd.Series([1, 2, 2, 3])\naxes = series.hist()\nbins = 4",
    ])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    outputs = _task(store, "HistFlow", "start").outputs
    assert [o.type for o in outputs] == ["display"]
    assert outputs[0].data["image/png"]


def test_a_fresh_process_runs_plain_python_cells_without_importing_ipython():
    code = """
import sys
from flowmagic.runtime.worker.execute import execute_cell
out = []
ns = {}
plain = execute_cell("x = 1\\nfor i in range(3):\\n    x += i\\n", ns, filename="<c>", first_line=1, emit=out.append)
after_plain = "IPython" in sys.modules
valued = execute_cell("x * 10", ns, filename="<c>", first_line=1, emit=out.append)
print(plain.ok, ns["x"], after_plain, valued.ok, out[0]["data"]["text/plain"], "IPython" in sys.modules)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "4", "False", "True", "40", "True"]


def test_a_syntax_error_is_reported_the_same_with_or_without_the_shell():
    code = """
from flowmagic.runtime.worker.execute import execute_cell, prepare_shell
def error():
    r = execute_cell("x = 1\\ny = (2\\n", {}, filename="<c>", first_line=3, emit=lambda o: None)
    return r.error["type"], r.error["line"]
before = error()
prepare_shell()
print(before == error(), before)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("True ('SyntaxError'"), proc.stdout


def test_in_a_kernel_every_fork_server_has_the_shell_ready(live_kernel):
    """Notebook steps show values more often than not: a kernel's servers make the
    shell before forking, also the one started after the prelude changed."""
    live_kernel.ok("%load_ext flowmagic")
    live_kernel.ok("import sys")
    live_kernel.ok("%%step start\n" + LOADED + "x = 1")
    assert live_kernel.value("__import__('flowmagic').Flow('NotebookFlow').latest_run['start'].task.data.loaded") is True
    live_kernel.ok("import os  # a new prelude: a new fork server")
    live_kernel.ok("%%step start\n" + LOADED + "x = 2")
    data = "__import__('flowmagic').Flow('NotebookFlow').latest_run['start'].task.data"
    assert live_kernel.value(f"({data}.x, {data}.loaded)") == (2, True)
