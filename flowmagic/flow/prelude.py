"""The prelude: what an ordinary cell contributes to every step (pure).

DESIGN 1b/2: ordinary cells give the flow their imports, defs, classes and
literal constants; magics (``%load_ext``, ``%flow ...``) and computations do
not. Names a computation binds are remembered, so that a step reading one can
be told to make that cell a step, or a parameter.
"""
from __future__ import annotations

import ast
from collections.abc import Mapping
from dataclasses import dataclass, field

from flowmagic.flow.scopes import free_names, top_level_bindings


@dataclass(frozen=True)
class PreludePart:
    """What one ordinary cell gives the prelude, and what it computes besides."""

    source: str                            # kept statements, in order (plain Python)
    defines: Mapping[str, int]             # name -> line: imports, defs, classes, constants
    computes: Mapping[str, int]            # name -> line: bound by anything else (not prelude)
    global_reads: Mapping[str, frozenset[str]]  # def/class name -> globals its body reads
    star_imports: tuple[str, ...] = ()     # modules of `from M import *`: names unknown until run
    # name -> `ast.unparse` of the statement defining it: what counts as an
    # edit of that name (whitespace and comments do not)
    texts: Mapping[str, str] = field(default_factory=dict)


_LITERAL_NODES = (ast.Constant, ast.UnaryOp, ast.BinOp, ast.BoolOp, ast.Compare, ast.Tuple,
                  ast.List, ast.Dict, ast.Set, ast.unaryop, ast.operator, ast.boolop, ast.cmpop,
                  ast.expr_context)


def split_prelude(tree: ast.Module, code: str) -> PreludePart:
    """Keep imports, defs, classes and literal constants of an ordinary cell.

    Magics (``%load_ext``, ``%flow ...``) arrive as ``get_ipython()`` calls and
    are dropped like any other computation.
    """
    lines = code.splitlines()
    spans = [_span(stmt) for stmt in tree.body]
    kept: list[str] = []
    defines: dict[str, int] = {}
    computes: dict[str, int] = {}
    global_reads: dict[str, frozenset[str]] = {}
    texts: dict[str, str] = {}
    for number, stmt in enumerate(tree.body):
        # The later binding of a name wins, as when the cell runs.
        if not _is_prelude_statement(stmt):
            for name in top_level_bindings([stmt]):
                computes[name] = stmt.lineno
                defines.pop(name, None)
                texts.pop(name, None)
            continue
        text = ast.unparse(stmt)
        for name in top_level_bindings([stmt], through_globals=False):
            defines[name] = stmt.lineno
            texts[name] = text
            computes.pop(name, None)
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            global_reads[stmt.name] = free_names(stmt)
        kept.append(_statement_text(stmt, number, spans, lines))
    source = "\n".join(kept) + "\n" if kept else ""
    stars = tuple("." * (stmt.level or 0) + (stmt.module or "") for stmt in tree.body
                  if isinstance(stmt, ast.ImportFrom) and any(a.name == "*" for a in stmt.names))
    return PreludePart(source, defines, computes, global_reads, stars, texts)


def _is_prelude_statement(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef, ast.Pass)):
        return True
    if isinstance(stmt, ast.Assign):
        return all(_is_name_target(t) for t in stmt.targets) and _is_literal(stmt.value)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.value is not None and _is_literal(stmt.value)
    if isinstance(stmt, ast.Try):  # `try: import x` / `except ImportError: x = None`
        bodies = stmt.body + stmt.orelse + stmt.finalbody + [s for h in stmt.handlers for s in h.body]
        types_ok = all(h.type is None or _is_dotted_names(h.type) for h in stmt.handlers)
        return types_ok and all(_is_prelude_statement(s) for s in bodies)
    return False


def _is_name_target(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return True
    return isinstance(node, (ast.Tuple, ast.List)) and all(_is_name_target(e) for e in node.elts)


def _is_literal(node: ast.AST) -> bool:
    """Literals and arithmetic on literals (``2 ** 10``), no names or calls."""
    return all(isinstance(sub, _LITERAL_NODES) for sub in ast.walk(node))


def _is_dotted_names(node: ast.AST) -> bool:
    if isinstance(node, ast.Tuple):
        return all(_is_dotted_names(e) for e in node.elts)
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _span(stmt: ast.stmt) -> tuple[int, int]:
    first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return first, stmt.end_lineno or stmt.lineno


def _statement_text(stmt: ast.stmt, number: int, spans: list[tuple[int, int]], lines: list[str]) -> str:
    first, last = spans[number]
    shares_line = (number > 0 and spans[number - 1][1] >= first) or (
        number + 1 < len(spans) and spans[number + 1][0] <= last)
    if shares_line:  # `import a; x = f()`: take only this statement
        return ast.unparse(stmt)
    return "\n".join(lines[first - 1:last])
