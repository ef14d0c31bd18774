"""Which values a task gets (pure rules of runtime/inputs.py), as tables."""
from __future__ import annotations

import itertools

import pytest

from flowmagic.flow.graph import build_flow
from flowmagic.runtime.orchestrator import inputs as plan
from flowmagic.runtime.orchestrator.tasks import TaskInfo
from flowmagic.store.serializers import ArtifactRef

GRAPH = build_flow([
    "%%step start\nouter = [1, 2]\nconst = 3",
    "%%step rows --foreach outer\nrow = input\ncols = list(range(row))",
    "%%step cells --foreach cols\ncell = (row, input, const)",
    "%%step join\ngrid = cell\nrow_list = row",
    "%%step side --foreach outer\nother = input",
    "%%step both\npairs = list(zip(row, other))",
], name="Plan")


def ref(label: str) -> str:
    """What the tests compare of a ref: its hash, made from the label of the value."""
    return f"hash-{label}"


_ids = itertools.count(1)


def task(step: str, index: tuple, **artifacts) -> TaskInfo:
    return TaskInfo(next(_ids), step, index, "done",
                    tuple(ArtifactRef(name, "str", 1, ref(label), "inline", f'"{label}"') for name, label in artifacts.items()))


TASKS = {
    "start": [task("start", (), outer="outer", const="const")],
    "rows": [task("rows", (0,), row="r0", cols="c0"), task("rows", (1,), row="r1", cols="c1")],
    "cells": [task("cells", (0, 0), cell="x00"), task("cells", (1, 0), cell="x10"),
              task("cells", (1, 1), cell="x11")],
    "side": [task("side", (0,), other="o0"), task("side", (1,), other="o1")],
}


def test_chains():
    assert plan.chains(GRAPH) == {"start": (), "rows": ("rows",), "cells": ("rows", "cells"), "join": (),
                                  "side": ("side",), "both": ()}


@pytest.mark.parametrize("reader, index, var, producer, expected", [
    ("rows", (1,), "const", "start", {"ref": ref("const")}),                    # ordinary value
    ("cells", (1, 0), "row", "rows", {"ref": ref("r1")}),                       # nested: the enclosing task's own
    ("cells", (1, 1), "const", "start", {"ref": ref("const")}),
    ("join", (), "row", "rows", {"list": [{"ref": ref("r0")}, {"ref": ref("r1")}]}),   # gathered
    ("join", (), "cell", "cells", {"list": [{"list": [{"ref": ref("x00")}]},          # list of lists
                                             {"list": [{"ref": ref("x10")}, {"ref": ref("x11")}]}]}),
    ("both", (), "other", "side", {"list": [{"ref": ref("o0")}, {"ref": ref("o1")}]}),
])
def test_binding_for(reader, index, var, producer, expected):
    chain = plan.chains(GRAPH)
    binding = plan.binding_for(var, producer, chain[reader], index, chain, TASKS[producer])
    assert refs_only(binding) == expected


def refs_only(binding: dict) -> dict:
    """The binding without the writer step names (kept for error messages)."""
    if "list" in binding:
        return {"list": [refs_only(b) for b in binding["list"]]}
    return {k: v["hash"] if k == "ref" else v for k, v in binding.items() if k != "step"}


def test_missing_name_is_a_clear_message():
    chain = plan.chains(GRAPH)
    binding = plan.binding_for("nope", "start", (), (), chain, TASKS["start"])
    assert "'nope'" in binding["missing"] and "start" in binding["missing"]


def test_foreach_indices_follow_the_producers_tasks():
    producer_tasks = [TaskInfo(1, "rows", (0,), "done", (), {"cols": {"length": 1, "items": ["0"]}}),
                      TaskInfo(2, "rows", (1,), "done", (), {"cols": {"length": 2, "items": ["0", "1"]}})]
    assert list(plan.foreach_indices("cols", producer_tasks)) == [((0, 0), "0"), ((1, 0), "0"), ((1, 1), "1")]
    empty = [TaskInfo(1, "start", (), "done", (), {"outer": {"length": 0, "items": []}})]
    assert list(plan.foreach_indices("outer", empty)) == []


def test_inputs_are_one_namespace_per_foreach_task():
    chain = plan.chains(GRAPH)
    got = plan.inputs_for("side", (), (), chain, TASKS["side"])
    assert [{n: refs_only(b) for n, b in ns.items()} for ns in got] == [{"other": {"ref": ref("o0")}},
                                                                        {"other": {"ref": ref("o1")}}]


def test_required_names_and_foreach_vars():
    assert plan.required_names(GRAPH, "start") >= {"outer", "const"}
    assert plan.foreach_vars(GRAPH, "start") == ["outer"]
    assert plan.foreach_vars(GRAPH, "rows") == ["cols"]
