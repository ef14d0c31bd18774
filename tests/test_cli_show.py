"""`flowmagic show NOTEBOOK [--json]`: the listing, the JSON document, exit codes."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from flowmagic.cli.main import main

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "example_notebooks").glob("*.ipynb"))

MOVIE_CELLS = [
    ("markdown", "# Movies"),
    ("code", "%load_ext flowmagic\n%flow name MovieFlow"),
    ("code", "import math\ndef clean(v):\n    return [x for x in v if x]"),
    ("code", '%%params\nalpha = 0.01  # Learning rate\ngenre = Parameter("genre", default="Sci-Fi", help="Filter genre")'),
    ("code", "%%step start\n# Load the movies\nmovies = [genre, None, 'Drama']"),
    ("code", "%%step split --retry 2 --timeout 60\n# Split them\nby_genre = clean(movies)\nparams = [0.1, 0.2, 0.0]"),
    ("code", "%%step compute --foreach params --catch compute_failed\ndiv = input\nx = 5 / div"),
    ("code", "%%step join\nfailed = [d for d, f in zip(div, compute_failed) if f]"),
]


def write_notebook(path: Path, cells) -> Path:
    notebook = nbformat.v4.new_notebook()
    makers = {"code": nbformat.v4.new_code_cell, "markdown": nbformat.v4.new_markdown_cell}
    notebook.cells = [makers[kind](source) for kind, source in cells]
    nbformat.write(notebook, path)
    return path


@pytest.fixture
def movie_notebook(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMAGIC_HOME", str(tmp_path / "store"))
    return write_notebook(tmp_path / "movie_flow.ipynb", MOVIE_CELLS)


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """The real console entry point, in a subprocess."""
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "flowmagic.cli.main", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=120)


def test_show_text_listing(movie_notebook, capsys):
    assert main(["show", str(movie_notebook)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Flow MovieFlow  (4 steps, starts at start)\n")
    assert "--alpha" in out and "default 0.01" in out and "Learning rate" in out
    assert '--genre' in out and '"Sci-Fi"' in out and "Filter genre" in out
    assert "Step start  (cell 5)" in out and "Load the movies" in out
    assert "Step split  (cell 6)  --retry 2 --timeout 60" in out
    assert "=> split  [movies]" in out
    assert "Step compute  (cell 7)  --foreach params --catch compute_failed" in out
    assert "=> join  [compute_failed, div]" in out
    assert "joins the foreach of compute" in out


def test_show_json_is_one_document(movie_notebook):
    result = run_cli("show", str(movie_notebook), "--json")
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) >= {"flow", "parameters", "steps", "edges"}
    assert document["flow"] == "MovieFlow"
    assert document["parameters"] == [
        {"name": "alpha", "default": 0.01, "type": "float", "help": "Learning rate"},
        {"name": "genre", "default": "Sci-Fi", "type": "str", "help": "Filter genre"}]
    steps = {s["name"]: s for s in document["steps"]}
    assert list(steps) == ["start", "split", "compute", "join"]
    assert steps["split"]["options"] == {"retry": 2, "timeout": 60.0}
    assert steps["compute"]["options"] == {"foreach": "params", "catch": "compute_failed"}
    assert steps["compute"]["cell"] == 6 and steps["compute"]["next"] == ["join"]
    assert steps["split"]["reads"] == ["clean", "movies"]
    assert {"from": "compute", "to": "join", "variables": ["compute_failed", "div"], "maybe": []} in document["edges"]


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_show_every_example(path, capsys):
    assert main(["show", str(path), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["steps"]
    assert main(["show", str(path)]) == 0


def test_console_script_is_installed(movie_notebook):
    exe = shutil.which("flowmagic")
    assert exe is not None
    result = subprocess.run([exe, "show", str(movie_notebook)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "Flow MovieFlow" in result.stdout


def assert_one_line_error(result: subprocess.CompletedProcess, words: str) -> None:
    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("flowmagic: error: ") and words in lines[0], lines[0]


def test_missing_notebook(tmp_path):
    assert_one_line_error(run_cli("show", str(tmp_path / "absent.ipynb"), "--json"), "no such notebook")


def test_messages_number_cells_as_jupyterlab_does_and_json_keeps_the_index(tmp_path):
    """1-based, markdown cells counted: the number JupyterLab shows; `show --json` keeps the 0-based index."""
    path = write_notebook(tmp_path / "numbered.ipynb", [
        ("markdown", "# Numbered"), ("code", "%%step start\nx = 1"), ("markdown", "between"),
        ("code", "%%step end\ny = x + 1")])
    text = run_cli("show", str(path))
    assert text.returncode == 0, text.stderr
    assert "Step start  (cell 2)" in text.stdout and "Step end  (cell 4)" in text.stdout
    document = json.loads(run_cli("show", str(path), "--json").stdout)
    assert [(s["name"], s["cell"]) for s in document["steps"]] == [("start", 1), ("end", 3)]
    bad = write_notebook(tmp_path / "bad_numbered.ipynb", [
        ("markdown", "# Numbered"), ("code", "%%step start\nx = 1"), ("code", "%%step start\ny = 2")])
    assert_one_line_error(run_cli("show", str(bad)), "two steps are named 'start' (cells 2 and 3)")
    late = write_notebook(tmp_path / "late.ipynb", [
        ("markdown", "# Late"), ("code", "%%step a\ny = z + 1"), ("markdown", "note"), ("code", "%%step b\nz = 1")])
    assert_one_line_error(run_cli("show", str(late)), "step 'a', cell 2, line 2: reads 'z'")
    assert_one_line_error(run_cli("show", str(late)), "step 'b' (cell 4) writes it further down")


def test_not_a_notebook(tmp_path):
    path = tmp_path / "notes.ipynb"
    path.write_text("these are\nnot JSON\n")
    assert_one_line_error(run_cli("show", str(path)), "is not a Jupyter notebook")


def test_flow_with_errors(tmp_path):
    path = write_notebook(tmp_path / "bad.ipynb", [
        ("code", "import pandas as pd\ndf = pd.DataFrame()"), ("code", "%%step a\ny = df.shape")])
    assert_one_line_error(run_cli("show", str(path), "--json"), "step 'a', cell 2, line 2")
    assert_one_line_error(run_cli("show", str(path)), "make that cell a step, or a parameter")


def test_bad_step_option(tmp_path):
    path = write_notebook(tmp_path / "bad.ipynb", [("code", "%%step a --retry many\nx = 1")])
    assert_one_line_error(run_cli("show", str(path)), "--retry")


def test_usage_errors(capsys):
    assert main([]) == 2
    assert main(["show"]) == 2
    assert "flowmagic: error:" in capsys.readouterr().err
    assert main(["show", "x.ipynb", "--bogus"]) == 2
    assert main(["frobnicate"]) == 2
    assert main(["--help"]) == 0
    assert main(["show", "--help"]) == 0


def test_render_show_nested_foreach_options_and_empty_flows():
    from flowmagic.flow.graph import build_flow
    from flowmagic.report.text import render_show

    text = render_show(build_flow([
        "%%step start\nouter = [1, 2]\n",
        '%%step a --foreach outer --pypi "pandas==2.2.3 pyarrow>=15" --cache\ninner = [input]\n',
        "%%step b --foreach inner --timeout 2.5\ny = input\n",
        "%%step j\nz = y\n",
    ], name="Nest"))
    assert "Step a  (cell 2)  --foreach outer --pypi 'pandas==2.2.3 pyarrow>=15' --cache" in text
    assert "Step b  (cell 3)  --timeout 2.5 --foreach inner" in text
    assert "nested in the foreach of a" in text
    assert "joins the foreach of b" in text
    assert "=> (end)" in text
    assert "No steps" in render_show(build_flow(["import os\n"]))
