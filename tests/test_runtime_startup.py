"""The console command's start-up: line magics are rewritten without importing IPython,
exactly as IPython would rewrite them."""
from __future__ import annotations

import subprocess
import sys

import pytest
from IPython.core.inputtransformer2 import TransformerManager

from flowmagic.flow.analysis import _line_magics_only, transform_ipython

SOURCES = [
    "%load_ext flowmagic",
    "%load_ext flowmagic\nimport numpy as np\n",
    "\n\n%matplotlib inline\nx = 1",
    "%flow name  Two  Spaces   ",
    "%time x = 1\ny = 2",
    "import os\n%env A=1\nprint(os.environ['A'])",
]
NOT_FAST = ["%timeit?", "!ls", "  %load_ext x", "%load_ext a \\\n b", "%%step s\nx = 1", "x = 1"]


@pytest.mark.parametrize("source", SOURCES)
def test_same_as_ipython(source):
    leading = source[: len(source) - len(source.lstrip("\n"))].count("\n")
    assert transform_ipython(source) == "\n" * leading + TransformerManager().transform_cell(source)


@pytest.mark.parametrize("source", NOT_FAST)
def test_left_to_ipython(source):
    assert _line_magics_only(source) is None


def test_reading_a_notebook_does_not_import_ipython(tmp_path):
    from runtime_helpers import write_notebook

    nb = write_notebook(tmp_path / "hello_flow.ipynb", ["%load_ext flowmagic", "%%step start\nx = 1",
                                                        "%%step end\ny = x + 1"])
    code = ("import sys; from flowmagic.notebook import load_flow; g = load_flow(%r); "
            "print(len(g.steps), 'IPython' in sys.modules)" % str(nb))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["2", "False"]


def test_the_console_forks_its_fork_server_instead_of_starting_an_interpreter(tmp_path):
    """The server is a child of the orchestrator with the orchestrator's command
    line (a fork, whose interpreter start-up is already paid), and the task is
    the server's child; the run still succeeds and leaves no process behind."""
    from runtime_helpers import flowmagic, write_notebook

    from flowmagic import Flow, namespace_root

    nb = write_notebook(tmp_path / "fork_flow.ipynb", [
        "%load_ext flowmagic",
        "import os",
        "%%step start\n"
        "server = os.getppid()\n"
        "server_cmdline = open(f'/proc/{server}/cmdline').read().split('\\0')\n"
        "orchestrator = int(open(f'/proc/{server}/stat').read().rsplit(')', 1)[1].split()[1])\n"
        "orchestrator_cmdline = open(f'/proc/{orchestrator}/cmdline').read().split('\\0')",
    ])
    proc = flowmagic("run", nb, store=tmp_path / "store")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    namespace_root(tmp_path / "store")
    try:
        data = Flow("ForkFlow").latest_run["start"].task.data
        assert data.server_cmdline == data.orchestrator_cmdline
        assert "run" in data.server_cmdline and "flowmagic.runtime.worker.forkserver" not in data.server_cmdline
    finally:
        namespace_root(None)
