"""The example notebooks are valid notebooks: each one's code runs in a plain kernel.

`plain_kernel` rewrites the `%%step` cells as ordinary code (foreach as a
loop), so this proves the examples are real Python that does what the
README says, independently of flowmagic's engine.
"""
from __future__ import annotations

from pathlib import Path

import pytest
from nbclient.exceptions import CellExecutionError, CellTimeoutError

from flowmagic.notebook import load_flow
from plain_kernel import plain_cells, run_plainly

pytestmark = pytest.mark.slow   # runs whole flows in subprocesses: not in the quick loop

EXAMPLES = Path(__file__).resolve().parent.parent / "example_notebooks"


def test_every_example_is_listed_here():
    assert sorted(p.stem for p in EXAMPLES.glob("*.ipynb")) == sorted(
        ["hello_flow", "parameter_flow", "retry_flow", "catch_flow", "timeout_flow", "model_selection", "conda_example"]
    )


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.ipynb")), ids=lambda p: p.stem)
def test_example_builds_a_flow_and_compiles(path):
    graph = load_flow(path)
    assert graph.steps, f"{path.name} has no steps"
    for cell in plain_cells(path):
        compile(cell, path.name, "exec")


def test_hello_flow_plain(tmp_path):
    values = run_plainly(EXAMPLES / "hello_flow.ipynb", ["x"], tmp_path)
    assert values == {"x": 2}


def test_catch_flow_plain(tmp_path):
    values = run_plainly(EXAMPLES / "catch_flow.ipynb", ["div", "failed", "compute_failed", "x"], tmp_path)
    assert values["div"] == [0, 1, 2]
    assert values["failed"] == [0]
    assert values["x"] == [None, 5.0, 2.5]
    assert values["compute_failed"][0]["type"] == "ZeroDivisionError"


def test_retry_flow_plain_is_lucky_within_its_retries(tmp_path):
    # The tutorial's step fails on even seconds; the plain rewrite retries it
    # a second later, as `--retry` does, so it always ends lucky.
    values = run_plainly(EXAMPLES / "retry_flow.ipynb", ["luck"], tmp_path)
    assert values == {"luck": "good"}


def test_model_selection_plain(tmp_path):
    values = run_plainly(
        EXAMPLES / "model_selection.ipynb", ["houses", "results", "best_strength", "report"], tmp_path
    )
    assert values["houses"].shape == (2000, 6)
    assert len(values["results"]) == 5
    assert values["best_strength"] in [0.01, 0.1, 1.0, 10.0, 100.0]
    assert values["report"]["cities"] == ["east", "north", "south"]


def test_parameter_flow_plain_fails_on_purpose(tmp_path):
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        run_plainly(EXAMPLES / "parameter_flow.ipynb", [], tmp_path)


def test_timeout_flow_plain_runs_too_long(tmp_path):
    with pytest.raises(CellTimeoutError):
        run_plainly(EXAMPLES / "timeout_flow.ipynb", [], tmp_path, timeout=3)
