"""The executor seam without a cluster: option parsing, which executor a step gets, and bad values."""
from __future__ import annotations

import pytest

from flowmagic.errors import FlowDefinitionError, UsageError
from flowmagic.flow.cells import parse_step_header
from flowmagic.flow.graph import build_flow
from flowmagic.runtime.orchestrator.executors.base import Executors, chosen_executor, run_executor
from flowmagic.runtime.orchestrator.executors.dask import connect_timeout


def test_step_executor_option_parses_and_rejects_bad_values():
    assert parse_step_header("fit --executor dask")[1].executor == "dask"
    assert parse_step_header("fit --executor dask://10.0.0.1:8786")[1].executor == "dask://10.0.0.1:8786"
    assert parse_step_header("fit")[1].executor is None
    for bad in ("yarn", "dask://", "Dask"):
        with pytest.raises(FlowDefinitionError, match="--executor") as info:
            parse_step_header(f"fit --executor {bad}", cell=2)
        assert info.value.step == "fit" and info.value.cell == 2
    graph = build_flow(["%%step fit --executor dask\nx = 1"])
    assert graph.to_json()["steps"][0]["options"] == {"executor": "dask"}


def test_the_run_and_each_step_choose_where_tasks_run(monkeypatch):
    monkeypatch.delenv("FLOWMAGIC_EXECUTOR", raising=False)
    monkeypatch.delenv("FLOWMAGIC_DASK_SCHEDULER", raising=False)
    graph = build_flow(["%%step a\nx = 1", "%%step b --executor dask\ny = x", "%%step c --executor local\nz = y"])
    a, b, c = graph.steps
    assert run_executor(None) == "local"
    monkeypatch.setenv("FLOWMAGIC_EXECUTOR", "dask://h:1")
    assert run_executor(None) == "dask://h:1" and run_executor("local") == "local"
    assert [chosen_executor(s, "dask://h:1") for s in (a, b, c)] == ["dask://h:1", "dask://h:1", "local"]
    with pytest.raises(UsageError, match="step 'b' \\(cell 2\\) has --executor dask but no scheduler"):
        chosen_executor(b, "local")
    monkeypatch.setenv("FLOWMAGIC_DASK_SCHEDULER", "tcp://h:2")
    assert chosen_executor(b, "local") == "dask://h:2"
    monkeypatch.setenv("FLOWMAGIC_EXECUTOR", "k8s")
    with pytest.raises(UsageError, match="FLOWMAGIC_EXECUTOR='k8s'"):
        run_executor(None)


def test_a_local_run_connects_nothing_and_bad_settings_are_usage_errors(monkeypatch):
    monkeypatch.delenv("FLOWMAGIC_EXECUTOR", raising=False)
    graph = build_flow(["%%step a\nx = 1", "%%step b --conda 'six' --executor dask://127.0.0.1:1\ny = x"])
    assert not Executors.for_run(graph, None, {"a"}).remote()   # b is not run: never connected
    # --pypi is built on the workers (tests/test_dask_pypi.py); --conda is refused before anything connects
    with pytest.raises(UsageError, match="step 'b' \\(cell 2\\): --conda environments are not built on Dask"):
        Executors.for_run(graph, None, {"a", "b"})
    monkeypatch.setenv("FLOWMAGIC_DASK_CONNECT_TIMEOUT", "soon")
    with pytest.raises(UsageError, match="FLOWMAGIC_DASK_CONNECT_TIMEOUT='soon'"):
        connect_timeout()
