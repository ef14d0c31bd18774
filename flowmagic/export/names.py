"""Which of a step's names become ``self.`` artifacts in Metaflow (pure).

A step's reads from other steps and from parameters, and its writes, become
``self.<name>``. Names only bound by a loop, a ``with``, an ``except``, an
import, a def or a lambda, that no other step reads, stay locals of the step
method: they are throwaway names (a loop index over ``inputs``, an open file,
a module), and some of them are values Metaflow cannot pickle. A function or
module that a later step does read is an error: Metaflow cannot pass it.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping

from flowmagic.flow.graph import JOIN_INPUTS, FlowGraph, StepSpec, binding_line
from flowmagic.flow.scopes import nested_scope
from flowmagic.errors import FlowDefinitionError

# Attributes of Metaflow's FlowSpec that a notebook variable cannot shadow.
RESERVED_ATTRIBUTES = frozenset({"cmd", "foreach_stack", "index", "input", "merge_artifacts", "name",
                                 "next", "script_name"})
_THROWAWAY = frozenset({"loop", "with", "except", "import", "def"})


def binding_kinds(code: str) -> dict[str, set[str]]:
    """name -> how the cell's top level binds it ("assign", "mutate", "loop",
    "with", "except", "import", "def", "walrus", "match", "del")."""
    collector = _KindCollector()
    collector.visit(ast.parse(code))
    return collector.kinds


class _KindCollector(ast.NodeVisitor):
    def __init__(self) -> None:
        self.kinds: dict[str, set[str]] = {}

    def _add(self, name: str, kind: str) -> None:
        self.kinds.setdefault(name, set()).add(kind)

    def _targets(self, target: ast.AST, kind: str) -> None:
        for node in ast.walk(target):
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                self._add(node.id, kind)
            elif isinstance(node, (ast.Subscript, ast.Attribute)):
                root = node
                while isinstance(root, (ast.Subscript, ast.Attribute)):
                    root = root.value
                if isinstance(root, ast.Name):
                    self._add(root.id, "mutate")
        self.visit(target)

    def visit_Assign(self, node: ast.Assign) -> None:
        # `f = lambda ...` defines a function: Metaflow could not pickle it as an artifact.
        kind = "def" if isinstance(node.value, ast.Lambda) else "assign"
        for target in node.targets:
            self._targets(target, kind)
        self.visit(node.value)

    def visit_AugAssign(self, node: ast.AugAssign | ast.AnnAssign) -> None:
        if node.value is not None:
            self._targets(node.target, "assign")
            self.visit(node.value)

    visit_AnnAssign = visit_AugAssign

    def visit_Delete(self, node: ast.Delete) -> None:
        for target in node.targets:
            self._targets(target, "del")

    def visit_For(self, node: ast.For | ast.AsyncFor) -> None:
        self._targets(node.target, "loop")
        for part in [node.iter] + node.body + node.orelse:
            self.visit(part)

    visit_AsyncFor = visit_For

    def visit_withitem(self, node: ast.withitem) -> None:
        self.visit(node.context_expr)
        if node.optional_vars is not None:
            self._targets(node.optional_vars, "with")

    def visit_ExceptHandler(self, node: ast.ExceptHandler) -> None:
        if node.name:
            self._add(node.name, "except")
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import | ast.ImportFrom) -> None:
        for alias in node.names:
            self._add(alias.asname or alias.name.split(".")[0], "import")

    visit_ImportFrom = visit_Import

    def visit_NamedExpr(self, node: ast.NamedExpr) -> None:
        self._add(node.target.id, "walrus")
        self.visit(node.value)

    def visit_MatchAs(self, node: ast.MatchAs | ast.MatchStar) -> None:
        if node.name:
            self._add(node.name, "match")
        self.generic_visit(node)

    visit_MatchStar = visit_MatchAs

    def _definition(self, node: ast.AST) -> None:
        if not isinstance(node, ast.Lambda):
            self._add(node.name, "def")
        # A nested `global x` that assigns x binds the cell's x.
        for name in nested_scope(node).global_binds:
            self._add(name, "assign")

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = visit_Lambda = _definition


def read_downstream(graph: FlowGraph) -> dict[str, set[str]]:
    """step -> the names other steps read from it."""
    result: dict[str, set[str]] = {s.name: set() for s in graph.steps}
    for edge in graph.edges:
        result[edge.source].update(edge.variables)
    return result


def step_attributes(graph: FlowGraph, spec: StepSpec, downstream: set[str],
                    helper_needs: Mapping[str, frozenset[str]]) -> tuple[frozenset[str], frozenset[str]]:
    """(names that are self.<name> in the step, names that stay locals)."""
    params = {p.name for p in graph.params}
    producers = graph.producers(spec.name)
    kinds = binding_kinds(spec.code)
    needed_by_helpers = {n for helper in spec.reads if helper in helper_needs for n in helper_needs[helper]}
    reads = {r for r in spec.reads if (r in producers or r in params) and r != JOIN_INPUTS}
    attributes, local = set(reads), set()
    for name in spec.writes:
        how = kinds.get(name, {"assign"})
        if how & {"def", "import"} and name in downstream:
            what = "imports" if "import" in how else "defines"
            raise FlowDefinitionError(
                f"{what} {name!r}, which a later step reads; Metaflow pickles artifacts and cannot "
                f"pass a module or a function defined in a step: move it to an ordinary cell",
                step=spec.name, cell=spec.cell, variable=name)
        only_here = name not in downstream and name not in reads and name not in needed_by_helpers \
            and name != spec.options.catch
        # A reserved name (`index`, `name`) used only inside the step stays a plain local there.
        throwaway = only_here and (how <= _THROWAWAY or name in RESERVED_ATTRIBUTES)
        (local if throwaway else attributes).add(name)
    for name in sorted(attributes & RESERVED_ATTRIBUTES):
        line = binding_line(ast.parse(spec.code), name)
        raise FlowDefinitionError(
            f"the variable {name!r} would be self.{name}, which Metaflow's FlowSpec reserves "
            f"(another step reads it): rename it", step=spec.name, cell=spec.cell, variable=name,
            line=spec.body_line + line - 1 if line else None)
    return frozenset(attributes), frozenset(local)
