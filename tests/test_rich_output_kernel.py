"""Rich output of steps, end to end: a real kernel (nbclient) runs a notebook
whose steps display a data frame, end with an expression, draw a figure, use
``%time``, run a foreach, and fail inside a helper. The cells show what a
notebook would show, and the Client API reads the same outputs back."""
from __future__ import annotations

import base64
import re
from pathlib import Path

import nbformat
import pytest
from jupyter_client import KernelManager
from nbclient import NotebookClient

import flowmagic
from conftest import kernel_env
from flowmagic.magics.markers import MIME

pytestmark = pytest.mark.slow

FLOW = "RichOutputs"
CELLS = {
    "load": "%load_ext flowmagic",
    "name": f"%flow name {FLOW}",
    "prelude": "import pandas as pd\nimport matplotlib.pyplot as plt\n\ndef answer():\n    return 41\n",
    "start": ("%%step start\n"
              "table = pd.DataFrame({'city': ['Oslo', 'Lima'], 'rain': [7, 2]})\n"
              "display(table)\n"
              "plt.figure()\n"
              "plt.bar(table['city'], table['rain'])\n"
              "int(table['rain'].sum()) * 100\n"),
    "timed": "%%step timed\n%time x = answer()\nsizes = [1, 2, 3]\n",
    "each": "%%step each --foreach sizes\nsquare = input * input\ndisplay(f'square {square}')\n",
    "after": "%%step after\ny = x + 1\nprint('y is', y)\n",
    "broken": ("%%step broken\n"
               "def ratio(a, b):\n"
               "    return a / b\n"
               "level = ratio(y, 0)\n"),
}
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> tuple[dict, Path]:
    """The notebook, run top to bottom in a real kernel; its cells' outputs by name and the store root."""
    workdir = tmp_path_factory.mktemp("rich")
    path = workdir / "rich_outputs.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source) for source in CELLS.values()])
    nbformat.write(nb, path)
    store_root = workdir / "store"
    client = NotebookClient(nb, km=KernelManager(kernel_name="python3"), timeout=180, allow_errors=True,
                            resources={"metadata": {"path": str(workdir)}})
    client.execute(cwd=str(workdir), env=kernel_env(store_root))
    return dict(zip(CELLS, (cell.outputs for cell in nb.cells))), store_root


def rich(outputs: list) -> list[dict]:
    """A step's rich outputs, without the stale marker that opens each step cell's output."""
    return [o["data"] for o in outputs if o["output_type"] in ("display_data", "execute_result")
            and MIME not in o["data"]]


def stdout(outputs: list) -> str:
    return "".join(o["text"] for o in outputs if o["output_type"] == "stream" and o["name"] == "stdout")


def test_a_steps_display_value_and_figure_reach_its_cell(executed):
    cells, _ = executed
    assert cells["start"][0]["data"] == {MIME: {}}   # the marker comes first, empty: the step is fresh
    outputs = rich(cells["start"])
    assert len(outputs) == 3
    (table,) = [o for o in outputs if "text/html" in o]
    (value,) = [o for o in outputs if o.get("text/plain") == "900"]
    (figure,) = [o for o in outputs if "image/png" in o]
    assert "<table" in table["text/html"] and "Oslo" in table["text/html"]
    assert value == {"text/plain": "900"}
    assert base64.b64decode(figure["image/png"]).startswith(b"\x89PNG")
    assert not [o for o in cells["start"] if o["output_type"] == "error"]


def test_time_magic_in_a_step_binds_its_name_for_the_steps_below(executed):
    cells, _ = executed
    assert "Wall time" in stdout(cells["timed"])
    assert "y is 42" in stdout(cells["after"])


def test_foreach_outputs_are_labelled_with_their_task(executed):
    cells, _ = executed
    label = None
    seen = {}
    for output in cells["each"]:
        if output["output_type"] == "stream":
            label = output["text"].strip().splitlines()[-1]
        elif output["output_type"] == "display_data" and MIME not in output["data"]:
            seen[label] = output["data"]["text/plain"]
    assert seen == {"[each/0]": "'square 1'", "[each/1]": "'square 4'", "[each/2]": "'square 9'"}


def test_an_error_in_a_helper_shows_the_cells_own_lines(executed):
    cells, _ = executed
    (error,) = [o for o in cells["broken"] if o["output_type"] == "error"]
    assert error["ename"] == "ZeroDivisionError"
    text = ANSI.sub("", "\n".join(error["traceback"]))
    assert re.search(r"line 4, in <module>\n\s+level = ratio\(y, 0\)", text), text
    assert re.search(r"line 3, in ratio\n\s+return a / b", text), text
    package_dir = str(Path(flowmagic.__file__).resolve().parent)
    assert package_dir not in text and "flowmagic/runtime" not in text and "site-packages/IPython" not in text


def test_the_client_api_reads_the_same_outputs_back(executed):
    from flowmagic.client import Flow

    _, store_root = executed
    run = Flow(FLOW, root=store_root).latest_run
    table, value, figure = run["start"].task.outputs
    assert [table.type, value.type, figure.type] == ["display", "execute_result", "display"]
    assert "<table" in table.data["text/html"] and "Oslo" in table.text
    assert value.text == "900"
    assert base64.b64decode(figure.data["image/png"]).startswith(b"\x89PNG")
    assert figure._repr_mimebundle_()[0]["image/png"] == figure.data["image/png"]  # shows again in a notebook
    assert run["after"].task.data.y == 42


def test_the_client_api_keeps_foreach_outputs_per_task(executed):
    from flowmagic.client import Flow

    _, store_root = executed
    tasks = Flow(FLOW, root=store_root).latest_run["each"].tasks()
    assert [(t.index, [o.text for o in t.outputs]) for t in tasks] == [
        ((0,), ["'square 1'"]), ((1,), ["'square 4'"]), ((2,), ["'square 9'"])]
