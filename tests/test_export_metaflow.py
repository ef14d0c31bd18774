"""Exported scripts run with the real metaflow package and give the notebook's artifacts.

Each comparison runs the notebook as a flowmagic flow (scheduler + client) and
the exported script as a user would (`python flow.py --no-pylint run`, local
datastore in a temporary directory), then compares every artifact of every
task. Metaflow runs take seconds each: there are four.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from flowmagic.export import export_notebook, plan_export
from flowmagic.notebook import load_flow

pytestmark = [pytest.mark.metaflow, pytest.mark.slow]

EXAMPLES = Path(__file__).resolve().parent.parent / "example_notebooks"
TIMEOUT = 240


# --- running both sides ---------------------------------------------------------------

def metaflow_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(METAFLOW_HOME=str(tmp_path / "mf_home"),
               METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path / "mf_store"),
               METAFLOW_DEFAULT_DATASTORE="local", METAFLOW_DEFAULT_METADATA="local",
               USERNAME="tester", FLOWMAGIC_HOME=str(tmp_path / "fm_store"))
    return env


def metaflow(script: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    environment = ["--environment=pypi"] if "@pypi(" in script.read_text() else []
    return subprocess.run([sys.executable, str(script), "--no-pylint", *environment, *args],
                          cwd=script.parent, env=env, capture_output=True, text=True, timeout=TIMEOUT)


# Runs in a subprocess: metaflow reads its datastore location when it is imported.
_READ_METAFLOW = """
import pickle, sys
import metaflow
from metaflow.exception import MetaflowExceptionWrapper
metaflow.namespace(None)
run = metaflow.Flow(sys.argv[1]).latest_run
assert run.successful, run
def plain(value):
    if isinstance(value, MetaflowExceptionWrapper):
        return {"caught": value.type.rsplit(".", 1)[-1], "message": value.exception}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value
tasks = {}
for step in run:
    for task in step:
        stack = task["_foreach_stack"].data if "_foreach_stack" in task else []
        index = tuple(frame.index for frame in stack) or None
        tasks[(step.id, index)] = {a.id: plain(a.data) for a in task if not a.id.startswith("_") and a.id != "name"}
with open(sys.argv[2], "wb") as out:
    pickle.dump(tasks, out)
"""


def metaflow_artifacts(class_name: str, env: dict[str, str], tmp_path: Path) -> dict:
    target = tmp_path / "metaflow_artifacts.pickle"
    done = subprocess.run([sys.executable, "-c", _READ_METAFLOW, class_name, str(target)], env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    return pickle.loads(target.read_bytes())


def flowmagic_artifacts(graph, tmp_path: Path) -> dict:
    from flowmagic.client import Run
    from flowmagic.runtime.orchestrator.scheduler import run_flow
    from flowmagic.store import open_store

    root = tmp_path / "fm_store"
    store = open_store(root)
    try:
        result = run_flow(graph, store, max_workers=2, workdir=str(tmp_path))
    finally:
        store.close()
    assert result.status == "succeeded", result.failed
    run = Run(f"{graph.name}/{result.run_id}", root=root)
    tasks = {}
    for step in run:
        for task in step:
            tasks[(step.id, task.index)] = {name: _plain_catch(task.data[name]) for name in task.data}
    return tasks


def _plain_catch(value):
    """flowmagic's --catch record, in the shape the Metaflow side is read in."""
    if isinstance(value, dict) and {"type", "message", "traceback"} <= value.keys():
        return {"caught": value["type"].rsplit(".", 1)[-1], "message": value["message"]}
    if isinstance(value, list):
        return [_plain_catch(v) for v in value]
    return value


def assert_same(name: str, ours, theirs) -> None:
    if isinstance(ours, pd.DataFrame):
        pd.testing.assert_frame_equal(ours, theirs, obj=name)
    elif isinstance(ours, pd.Series):
        pd.testing.assert_series_equal(ours, theirs, obj=name)
    elif isinstance(ours, np.ndarray):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    elif isinstance(ours, (list, tuple)) and any(isinstance(v, (np.ndarray, pd.DataFrame, list)) for v in ours):
        assert type(ours) is type(theirs) and len(ours) == len(theirs), name
        for i, (a, b) in enumerate(zip(ours, theirs)):
            assert_same(f"{name}[{i}]", a, b)
    else:
        assert ours == theirs, f"{name}: flowmagic {ours!r} != metaflow {theirs!r}"


def export_run_and_compare(notebook: Path, tmp_path: Path) -> tuple[dict, dict]:
    """Run both sides; every artifact of every flowmagic task equals Metaflow's."""
    graph = load_flow(notebook)
    plan = plan_export(graph)
    script = tmp_path / "flow.py"
    export_notebook(notebook, script)
    env = metaflow_env(tmp_path)
    done = metaflow(script, env, "run", "--max-workers", "2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    theirs = metaflow_artifacts(plan.class_name, env, tmp_path)
    ours = flowmagic_artifacts(graph, tmp_path)
    assert {key for key in ours} <= set(theirs), "tasks missing in the Metaflow run"
    for (step, index), artifacts in ours.items():
        expected = set(graph.step(step).writes) - plan.locals[step]
        assert set(artifacts) - plan.locals[step] == expected, (step, index)
        for name in expected:
            assert_same(f"{step}{list(index or [])}.{name}", artifacts[name], theirs[(step, index)][name])
    return ours, theirs


# --- the comparisons ---------------------------------------------------------------------

def test_hello_flow_gives_the_same_artifacts(tmp_path):
    ours, theirs = export_run_and_compare(EXAMPLES / "hello_flow.ipynb", tmp_path)
    assert ours[("end", None)]["x"] == theirs[("end", None)]["x"] == 2


def test_catch_flow_foreach_catch_and_join(tmp_path):
    ours, theirs = export_run_and_compare(EXAMPLES / "catch_flow.ipynb", tmp_path)
    failed = theirs[("compute", (0,))]["compute_failed"]
    assert failed == {"caught": "ZeroDivisionError", "message": "division by zero"}
    assert theirs[("compute", (0,))]["x"] is None and theirs[("compute", (0,))]["div"] == 0
    assert theirs[("join", None)]["failed"] == ours[("join", None)]["failed"] == [0]
    assert theirs[("join", None)]["x"] == [None, 5.0, 2.5]


def test_model_selection_static_branch_and_foreach(tmp_path):
    ours, theirs = export_run_and_compare(EXAMPLES / "model_selection.ipynb", tmp_path)
    assert isinstance(theirs[("load", None)]["houses"], pd.DataFrame)
    assert theirs[("report", None)]["report"] == ours[("report", None)]["report"]
    assert len(theirs[("pick", None)]["weights"]) == 5


BRANCHES = [
    "%load_ext flowmagic",
    "import math\n\nSCALE = 10\n\ndef scaled(v):\n    return v * SCALE * factor\n",
    "%%params\nfactor = 2  # Multiplier\nlabel = 'run'  # A label\nverbose = False\n"
    "weights = Parameter('weights', default={'a': 1.5}, help='Weights')",
    "%%step numbers\n# Two roots: numbers and words\nnums = [1, 2, 3]\ntag = 'numbers'\n"
    "text = '''multi\n  line'''",
    "%%step vocabulary\nwords = ['x', 'yy']\nword_tag = 'words'",
    "%%step grid\n# Pairs for a nested foreach\nrows = [[n, n + 1] for n in nums]",
    "%%step row --foreach rows\ncells = input\nrow_sum = sum(cells)",
    "%%step cell --foreach cells --retry 1\nvalue = scaled(input)",
    "%%step collect\n# Joins both foreach levels\nflat = [v for vs in value for v in vs]\ntotals = row_sum",
    "%%step merge\nsummary = {'flat': flat, 'words': words, 'tag': (tag, word_tag), 'label': label,\n"
    "           'w': weights['a'], 'text': text, 'root': math.sqrt(16)}\n"
    "for w in words:\n    last = w\nif verbose:\n    print(summary)",
]


def write_notebook(path: Path, sources: list[str]) -> Path:
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(textwrap.dedent(s)) for s in sources]
    nbformat.write(notebook, path)
    return path


def test_branches_nested_foreach_helpers_and_parameters(tmp_path):
    notebook = write_notebook(tmp_path / "branches.ipynb", BRANCHES)
    ours, theirs = export_run_and_compare(notebook, tmp_path)
    summary = theirs[("merge", None)]["summary"]
    assert summary["tag"] == ("numbers", "words")
    assert summary["w"] == 1.5 and summary["text"] == "multi\n  line"
    assert theirs[("collect", None)]["value"] == [[20, 40], [40, 60], [60, 80]]
    assert theirs[("cell", (1, 0))]["value"] == ours[("cell", (1, 0))]["value"] == 40
    assert theirs[("merge", None)]["last"] == "yy"


# Metaflow's HelloFlow (tutorials/00-helloworld): three steps that only print, ordered by --after.
HELLO = [
    "%load_ext flowmagic",
    "%%step start\n# This is the 'start' step.\nprint('HelloFlow is starting.')",
    "%%step hello --after start\n# A step for metaflow to introduce itself.\nprint('Metaflow says: Hi!')",
    "%%step end --after hello\n# This is the 'end' step.\nprint('HelloFlow is all done.')",
]


def test_ported_hello_flow_runs_in_order_in_metaflow_too(tmp_path):
    notebook = write_notebook(tmp_path / "hello_flow.ipynb", HELLO)
    plan = plan_export(load_flow(notebook))
    assert {s.name: s.next for s in plan.structure.steps.values()} == \
        {"start": ["hello"], "hello": ["end"], "end": []}
    script = tmp_path / "flow.py"
    export_notebook(notebook, script)
    done = metaflow(script, metaflow_env(tmp_path), "run")
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    said = [text.index(words) for words in ("HelloFlow is starting.", "Metaflow says: Hi!", "HelloFlow is all done.")]
    assert said == sorted(said), text


# --- show: same steps and transitions ----------------------------------------------------------

def metaflow_check(script: Path, env: dict[str, str]) -> None:
    """Metaflow's own graph linter (`show` does not run it)."""
    done = metaflow(script, env, "check")
    assert done.returncode == 0 and "Validity checker" not in done.stdout + done.stderr, \
        done.stdout + done.stderr


def metaflow_show(script: Path, env: dict[str, str]) -> dict[str, list[str]]:
    metaflow_check(script, env)
    done = metaflow(script, env, "show")
    assert done.returncode == 0, done.stderr
    transitions: dict[str, list[str]] = {}
    current = None
    for line in done.stdout.splitlines():
        if line.startswith("Step "):
            current = line.split()[1]
            transitions[current] = []
        elif line.strip().startswith("=>") and current:
            transitions[current] = [t.strip() for t in line.strip()[2:].split(",")]
    return transitions


def contracted(transitions: dict[str, list[str]], kept: set[str]) -> set[tuple[str, str]]:
    """Edges between kept steps, through steps the export added."""
    edges = set()
    for source in kept:
        frontier, seen = list(transitions[source]), set()
        while frontier:
            target = frontier.pop()
            if target in seen:
                continue
            seen.add(target)
            if target in kept:
                edges.add((source, target))
            else:
                frontier.extend(transitions[target])
    return edges


def reduced(edges: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Transitive reduction: Metaflow lists a step's successors, not every reader."""
    reach: dict[str, set[str]] = {}

    def below(node: str) -> set[str]:
        if node not in reach:
            reach[node] = set()
            for a, b in edges:
                if a == node:
                    reach[node] |= {b} | below(b)
        return reach[node]

    return {(a, b) for a, b in edges
            if not any(b in below(c) for x, c in edges if x == a and c != b)}


SHOW_NOTEBOOKS = sorted(p.name for p in EXAMPLES.glob("*.ipynb")) + ["branches"]


@pytest.mark.parametrize("notebook", SHOW_NOTEBOOKS)
def test_show_lists_the_same_steps_and_transitions(notebook, tmp_path):
    path = write_notebook(tmp_path / "branches.ipynb", BRANCHES) if notebook == "branches" \
        else EXAMPLES / notebook
    shown = subprocess.run([sys.executable, "-m", "flowmagic.cli.main", "show", str(path), "--json"],
                           capture_output=True, text=True, timeout=TIMEOUT, env=metaflow_env(tmp_path))
    assert shown.returncode == 0, shown.stderr
    document = json.loads(shown.stdout)
    steps = {s["name"] for s in document["steps"]}
    ours = reduced({(s["name"], n) for s in document["steps"] for n in s["next"]})
    script = tmp_path / "flow.py"
    export_notebook(path, script)
    theirs = metaflow_show(script, metaflow_env(tmp_path))
    assert steps <= set(theirs)
    assert set(theirs) - steps <= {"start", "end"} | {s for s in theirs if s.startswith(("join_", "split_"))}
    # Metaflow's fixed ends: a notebook step named start (end) runs first (last) even when
    # no variable links it to the others; nothing else may differ.
    exported = contracted(theirs, steps)
    assert ours <= exported
    assert all(a == "start" or b == "end" for a, b in exported - ours), exported - ours


# --- Metaflow's linter accepts every shape the export produces -------------------------------

SHAPES = {
    "not series-parallel": ["%%step a\nx = 1", "%%step b\ny = 2", "%%step c\nz = x", "%%step d\nw = x + y"],
    "foreach inside a branch": ["%%step load\nitems = [1, 2]\nbase = 10", "%%step describe\nn = len(items)",
                                "%%step fit --foreach items\nscore = input * base", "%%step pick\nbest = max(score)",
                                "%%step report\nout = (n, best)"],
    "foreach after parallel steps": ["%%step a\nx = [1]", "%%step b\ny = [2]",
                                     "%%step f --foreach x\nv = input + y[0]", "%%step j\nw = v"],
    "catch before a foreach, foreach at the end": ["%%step start --catch oops\nitems = [1, 2]",
                                                   "%%step sq --foreach items\nv = input"],
    "several leaves, end named": ["%%step start\nx = 1", "%%step b\ny = x", "%%step c\nz = x",
                                  "%%step end\nprint(x)"],
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_metaflow_accepts_the_exported_structure(shape, tmp_path):
    notebook = write_notebook(tmp_path / "shape.ipynb", SHAPES[shape])
    plan = plan_export(load_flow(notebook))
    script = tmp_path / "flow.py"
    export_notebook(notebook, script)
    shown = metaflow_show(script, metaflow_env(tmp_path))
    assert shown == {s.name: s.next for s in plan.structure.steps.values()}


# A set of strings pickles in an order that depends on the process's hash seed: each
# Metaflow foreach task, which saves again what it reads, saves different bytes.
READ_IN_FOREACH = [
    "%%step start\nwords = {f'word{i}' for i in range(40)}\nshards = [0, 1, 2, 3]",
    "%%step count --foreach shards\nmine = sorted(words)[input::4]\nn = len(mine)",
    "%%step join\ntotal = sum(n)\nvocabulary = len(words)",
]


def test_a_join_after_a_foreach_that_only_read_a_name_merges_in_metaflow(tmp_path):
    notebook = write_notebook(tmp_path / "read_in_foreach.ipynb", READ_IN_FOREACH)
    ours, theirs = export_run_and_compare(notebook, tmp_path)
    assert theirs[("join", None)]["total"] == ours[("join", None)]["total"] == 40
    assert theirs[("join", None)]["vocabulary"] == 40
