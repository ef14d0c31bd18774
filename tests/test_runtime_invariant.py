"""DESIGN's invariant: a flow run yields the same values as Run All in a plain kernel.

Every example notebook that does not fail on purpose runs through the real
`flowmagic run` command; the final value of every name a step writes (the
last writer's, gathered into a list for a foreach step) must equal the value
the same name has after executing the notebook top to bottom in a kernel
that has never heard of flowmagic (tests/plain_kernel.py).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from nbclient.exceptions import CellExecutionError

from flowmagic.notebook import load_flow
from plain_kernel import run_plainly
from runtime_helpers import artifacts, flowmagic_json

pytestmark = pytest.mark.slow   # runs whole flows in subprocesses: not in the quick loop

EXAMPLES = Path(__file__).resolve().parent.parent / "example_notebooks"
FAIL_ON_PURPOSE = {"parameter_flow", "timeout_flow"}
# Builds a --pypi environment from PyPI: covered by tests/test_environments.py.
NEEDS_PACKAGE_INDEX = {"conda_example"}


def flow_values(store: Path, graph, run_id: int) -> dict:
    """Final value of every written name: the last writer's (gathered for foreach)."""
    found = {}
    for spec in graph.steps:  # notebook order: later writers win
        per_task = artifacts(store, graph.name, run_id, spec.name)
        for name in spec.writes:
            if spec.options.foreach:
                found[name] = [t.get(name) for t in per_task]
            elif per_task and name in per_task[0]:
                found[name] = per_task[0][name]
    return found


def same(a, b) -> bool:
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        return isinstance(a, pd.DataFrame) and isinstance(b, pd.DataFrame) and a.equals(b)
    if isinstance(a, (pd.Series, pd.Index)):
        return a.equals(b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return np.array_equal(np.asarray(a), np.asarray(b))
    if isinstance(a, dict) and isinstance(b, dict) and {"type", "message"} <= set(a) and {"type", "message"} <= set(b):
        return a["type"] == b["type"] and a["message"] == b["message"]  # an exception record
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and hasattr(b, "__dict__") and type(a).__name__ == type(b).__name__:
        return same(vars(a), vars(b))
    return a == b


def plain_values(path: Path, names: list[str], workdir: Path) -> dict:
    for _ in range(8):  # retry_flow fails on even seconds (the plain kernel has no --retry)
        try:
            return run_plainly(path, names, workdir)
        except CellExecutionError as exc:
            if "Bad luck!" not in str(exc):
                raise
    pytest.fail("eight unlucky plain runs in a row")


@pytest.mark.parametrize("stem", sorted(p.stem for p in EXAMPLES.glob("*.ipynb")
                                        if p.stem not in FAIL_ON_PURPOSE | NEEDS_PACKAGE_INDEX))
def test_flow_run_equals_plain_kernel(stem, tmp_path):
    nb = Path(shutil.copy(EXAMPLES / f"{stem}.ipynb", tmp_path / f"{stem}.ipynb"))
    store = tmp_path / "store"
    graph = load_flow(nb)
    doc = flowmagic_json("run", nb, store=store, cwd=tmp_path)
    assert doc["status"] == "succeeded"
    got = flow_values(store, graph, doc["run_id"])
    assert got, "the flow wrote nothing"
    expected = plain_values(nb, sorted(got), tmp_path)
    differ = [name for name in sorted(got) if not same(got[name], expected[name])]
    assert not differ, {name: (got[name], expected[name]) for name in differ}


def test_client_api_reads_the_run(tmp_path, monkeypatch):
    nb = Path(shutil.copy(EXAMPLES / "hello_flow.ipynb", tmp_path / "hello_flow.ipynb"))
    store = tmp_path / "store"
    flowmagic_json("run", nb, store=store, cwd=tmp_path)
    monkeypatch.setenv("FLOWMAGIC_HOME", str(store))
    from flowmagic import Flow

    run = Flow("HelloFlow").latest_run
    assert run["end"].task.data.x == 2
    assert run["start"].task.data.x == 1
    assert "x is 2" in run["end"].task.stdout
