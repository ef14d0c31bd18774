"""The Metaflow control flow of a notebook's DAG (pure).

flowmagic's DAG is any DAG of data dependencies; a Metaflow flow is a
series-parallel graph with one ``start`` and one ``end``, where every static
split and every foreach is closed by its own join. This module finds that
structure:

1. *Decompose* the steps (in notebook order) into blocks: a series of blocks,
   or independent blocks in parallel (no data path between them). A DAG that is
   not series-parallel is made so by running some independent steps one after
   the other, in notebook order, which never changes a value: along any
   Metaflow path the steps stay in notebook order.
2. *Link* the blocks into Metaflow steps, adding a step only where Metaflow's
   rules require one: ``start``/``end`` when the notebook's first/last step is
   not so named or not alone, a join when what follows a split cannot be the
   join itself, a linear step before a split or a foreach when the step before
   it is a join (a join may not split in Metaflow) or has ``@catch``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from flowmagic.flow.graph import FlowGraph
from flowmagic.errors import FlowDefinitionError

JoinKind = Literal["static", "foreach"]
# Step names Metaflow's linter refuses (lint.check_reserved_words).
RESERVED_STEP_NAMES = frozenset({"name", "next", "input", "index", "cmd"})


def _check_step_name(name: str, cell: int) -> None:
    if re.search("[^a-z0-9_]", name) or name in RESERVED_STEP_NAMES:
        raise FlowDefinitionError(
            f"Metaflow step names are lowercase ASCII letters, digits and '_' and not one of "
            f"{', '.join(sorted(RESERVED_STEP_NAMES))}: rename the step", step=name, cell=cell)


@dataclass
class MfStep:
    """One step of the exported Metaflow flow."""

    name: str
    real: bool                          # a notebook step (False: added by the export)
    next: list[str] = field(default_factory=list)
    foreach: str | None = None          # the variable of `self.next(..., foreach=...)`
    join: JoinKind | None = None        # takes `inputs`
    inputs_from: list[str] = field(default_factory=list)
    closes: str | None = None           # foreach join: the foreach step whose tasks it gathers
    why: str = ""                       # docstring of an added step


# Blocks of the decomposition.
@dataclass(frozen=True)
class Step:
    name: str


@dataclass(frozen=True)
class Series:
    parts: tuple[Block, ...]


@dataclass(frozen=True)
class Parallel:
    parts: tuple[Block, ...]


Block = Step | Series | Parallel


def reachability(graph: FlowGraph) -> dict[str, set[str]]:
    """step -> every step downstream of it (notebook order is topological)."""
    reach: dict[str, set[str]] = {}
    for spec in reversed(graph.steps):
        below: set[str] = set()
        for child in graph.children(spec.name):
            below |= {child} | reach[child]
        reach[spec.name] = below
    return reach


def decompose(names: list[str], reach: dict[str, set[str]]) -> Block:
    """Series-parallel blocks of ``names`` (in notebook order)."""
    if len(names) == 1:
        return Step(names[0])
    groups = _independent_groups(names, reach)
    if len(groups) > 1:
        return Parallel(tuple(decompose(g, reach) for g in groups))
    cuts = _series_cuts(names, reach)
    if not cuts:
        cuts = [1]  # not series-parallel: run the first step before the rest
    bounds = [0] + cuts + [len(names)]
    parts: list[Block] = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = decompose(names[lo:hi], reach)
        parts.extend(part.parts if isinstance(part, Series) else [part])
    return Series(tuple(parts))


def _series_cuts(names: list[str], reach: dict[str, set[str]]) -> list[int]:
    """Positions k where every step before k reaches every step from k on."""
    cuts = []
    common = set(names)   # what every step of the prefix reaches
    for k in range(1, len(names)):
        common &= reach[names[k - 1]]
        if common.issuperset(names[k:]):
            cuts.append(k)
    return cuts


def _independent_groups(names: list[str], reach: dict[str, set[str]]) -> list[list[str]]:
    """Connected components of 'one reaches the other', each in notebook order."""
    members = set(names)
    linked = {n: (reach[n] & members) | {m for m in names if n in reach[m]} for n in names}
    seen: set[str] = set()
    groups: list[list[str]] = []
    for name in names:
        if name in seen:
            continue
        component, frontier = {name}, [name]
        while frontier:
            for other in linked[frontier.pop()] - component:
                component.add(other)
                frontier.append(other)
        seen |= component
        groups.append([n for n in names if n in component])
    return groups


# --- linking blocks into Metaflow steps ---------------------------------------

@dataclass(frozen=True)
class _Tail:
    """Where the flow built so far ends."""

    kind: Literal["free", "join", "static", "foreach", "branch"]
    nodes: tuple[str, ...]   # free/join: the step; static: branch exits; foreach: open
                             # foreach steps, outermost first; branch: the split step


class Structure:
    """Builds the Metaflow steps of ``graph``; ``steps`` in creation order."""

    def __init__(self, graph: FlowGraph) -> None:
        self.graph = graph
        self.steps: dict[str, MfStep] = {}
        self._taken = {s.name for s in graph.steps}
        names = [s.name for s in graph.steps]
        if not names:
            raise FlowDefinitionError("the notebook has no %%step cell: there is no flow to export")
        for spec in graph.steps:
            _check_step_name(spec.name, spec.cell)
        first = self._fixed_first(names)
        last = self._fixed_last(names, first)
        core = [n for n in names if n not in (first, last)]
        blocks: list[Block] = [Step(first)] if first else []
        if core:
            top = decompose(core, reachability(graph))
            blocks.extend(top.parts if isinstance(top, Series) else [top])
        if first:
            tail = _Tail("free", (self._add(first, real=True),))
            blocks = blocks[1:]
        else:
            tail = _Tail("free", (self._added("start", "Start of the flow (added by the export)."),))
        for block in blocks:
            tail = self._link(tail, block)
        if last:
            tail = self._link(tail, Step(last))
            if tail.kind != "free" or tail.nodes[0] != "end":
                raise FlowDefinitionError("the last step is named 'end' but cannot end the flow here",
                                          step="end", cell=graph.step("end").cell)
        else:
            end = self._added("end", "End of the flow (added by the export).")
            self._connect(self._close(tail), end)
        self._check_nested_foreach()

    # the fixed ends -----------------------------------------------------------------

    def _fixed_first(self, names: list[str]) -> str | None:
        if "start" not in names:
            return None
        spec = self.graph.step("start")
        if names[0] != "start":
            raise FlowDefinitionError(
                "a step named 'start' must be the notebook's first step: Metaflow starts every flow "
                "there; move it up or rename it", step="start", cell=spec.cell)
        if spec.options.foreach:
            raise FlowDefinitionError(
                "Metaflow's start step cannot run per item (--foreach): rename the step",
                step="start", cell=spec.cell)
        return "start"

    def _fixed_last(self, names: list[str], first: str | None) -> str | None:
        if "end" not in names:
            return None
        spec = self.graph.step("end")
        if names[-1] != "end" or self.graph.children("end") or first == "end":
            raise FlowDefinitionError(
                "a step named 'end' must be the notebook's last step and nothing may read from it: "
                "Metaflow ends every flow there; move it down or rename it", step="end", cell=spec.cell)
        if spec.options.foreach:
            raise FlowDefinitionError("Metaflow's end step cannot run per item (--foreach): rename the step",
                                      step="end", cell=spec.cell)
        return "end"

    # steps ---------------------------------------------------------------------------

    def _add(self, name: str, *, real: bool, why: str = "") -> str:
        self.steps[name] = MfStep(name, real, why=why)
        self._taken.add(name)
        return name

    def _added(self, base: str, why: str) -> str:
        name, number = base, 2
        while name in self._taken:
            name, number = f"{base}_{number}", number + 1
        return self._add(name, real=False, why=why)

    def _connect(self, source: str, target: str, foreach: str | None = None) -> None:
        self.steps[source].next.append(target)
        self.steps[source].foreach = foreach
        self.steps[target].inputs_from.append(source)

    def _can_fan_out(self, name: str) -> bool:
        """Metaflow: a join may not split, and @catch is not allowed on a foreach split."""
        node = self.steps[name]
        if node.join is not None:
            return False
        return not (node.real and self.graph.step(name).options.catch)

    # linking -------------------------------------------------------------------------

    def _link(self, tail: _Tail, block: Block) -> _Tail:
        if isinstance(block, Series):
            for part in block.parts:
                tail = self._link(tail, part)
            return tail
        spec = self.graph.step(block.name) if isinstance(block, Step) else None
        is_foreach = spec is not None and spec.options.foreach is not None
        if tail.kind in ("static", "foreach"):
            if tail.kind == "foreach" and is_foreach and self.graph.nested_in(block.name) == tail.nodes[-1]:
                return self._nested_foreach(tail, block.name)
            if spec is not None and not is_foreach and block.name != "end":
                return _Tail("join", (self._join_into(tail, self._add(block.name, real=True)),))
            tail = _Tail("join", (self._close(tail),))
        if tail.kind == "branch":
            split = tail.nodes[0]
            if spec is not None and not is_foreach:
                self._connect(split, self._add(block.name, real=True))
                return _Tail("free", (block.name,))
            entry = self._added(f"split_{self._label(block)}", "Fan out (added by the export).")
            self._connect(split, entry)
            return self._link(_Tail("free", (entry,)), block)
        source = tail.nodes[0]
        if spec is not None and not is_foreach:
            self._connect(source, self._add(block.name, real=True))
            return _Tail("free", (block.name,))
        if not self._can_fan_out(source):
            linear = self._added(f"split_{self._label(block)}", "Fan out (added by the export).")
            self._connect(source, linear)
            source = linear
        if is_foreach:
            self._connect(source, self._add(block.name, real=True), foreach=spec.options.foreach)
            return _Tail("foreach", (block.name,))
        exits = []
        for part in block.parts:
            branch = self._link(_Tail("branch", (source,)), part)
            exits.append(self._close(branch))
        return _Tail("static", tuple(exits))

    def _nested_foreach(self, tail: _Tail, name: str) -> _Tail:
        outer = tail.nodes[-1]
        if self.graph.step(outer).options.catch:
            raise FlowDefinitionError(
                f"--catch on a step that a nested foreach ({name}) runs inside has no Metaflow "
                "equivalent (@catch is not allowed on a foreach split)", step=outer,
                cell=self.graph.step(outer).cell)
        self._connect(outer, self._add(name, real=True), foreach=self.graph.step(name).options.foreach)
        return _Tail("foreach", tail.nodes + (name,))

    def _join_into(self, tail: _Tail, join: str) -> str:
        """Make ``join`` the join of ``tail`` (closing inner foreaches first)."""
        if tail.kind == "foreach":
            exit_ = tail.nodes[-1]
            for inner in reversed(tail.nodes[1:]):
                added = self._added(f"join_{inner}", f"Gather the results of {inner} (added by the export).")
                self.steps[added].join, self.steps[added].closes = "foreach", inner
                self._connect(exit_, added)
                exit_ = added
            self.steps[join].join, self.steps[join].closes = "foreach", tail.nodes[0]
            self._connect(exit_, join)
        else:
            self.steps[join].join = "static"
            for exit_ in tail.nodes:
                self._connect(exit_, join)
        return join

    def _close(self, tail: _Tail) -> str:
        """A single step where ``tail`` ends (adding its join if needed)."""
        if tail.kind in ("free", "join"):
            return tail.nodes[0]
        if tail.kind == "foreach":
            name = tail.nodes[0]
            join = self._added(f"join_{name}", f"Gather the results of {name} (added by the export).")
        else:
            join = self._added("join_" + "_".join(tail.nodes)[:60],
                               "Join the parallel branches (added by the export).")
        return self._join_into(tail, join)

    def _label(self, block: Block) -> str:
        if isinstance(block, Step):
            return block.name
        first = block.parts[0]
        return self._label(first)

    def _check_nested_foreach(self) -> None:
        for spec in self.graph.steps:
            outer = self.graph.nested_in(spec.name)
            if outer is not None and self.steps[outer].next != [spec.name]:
                raise FlowDefinitionError(
                    f"this foreach runs inside {outer}'s tasks, but other steps come between them "
                    f"in the flow; Metaflow needs {outer} to go straight to it", step=spec.name,
                    cell=spec.cell)
