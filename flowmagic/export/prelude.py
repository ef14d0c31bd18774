"""The module-level code of the exported script: the prelude steps use (pure).

Only the prelude statements that steps use (directly or through other prelude
definitions) are kept. A prelude function that reads notebook-level names
(a step's output or a parameter) as globals cannot see them at module level
in Metaflow, where they are ``self.`` attributes: it gets them as keyword-only
arguments, and every call passes them (``helper(a, x=self.x)``).
"""
from __future__ import annotations

import ast
from dataclasses import dataclass

from flowmagic.flow.scopes import free_names, top_level_bindings
from flowmagic.flow.graph import FlowGraph
from flowmagic.errors import FlowDefinitionError

# Names the script imports from metaflow; the prelude must not redefine them.
METAFLOW_NAMES = frozenset({"FlowSpec", "Parameter", "JSONType", "step", "retry", "catch", "timeout",
                            "pypi", "conda", "resources"})


@dataclass(frozen=True)
class Prelude:
    source: str                                  # module-level code, "" if none
    defines: frozenset[str]                      # every name the notebook's prelude defines
    helper_needs: dict[str, tuple[str, ...]]     # def -> notebook names passed as keyword args


@dataclass(frozen=True)
class _Statement:
    node: ast.stmt
    text: str
    binds: frozenset[str]


def plan_prelude(graph: FlowGraph) -> Prelude:
    statements = _statements(graph.prelude)
    defines = frozenset(n for s in statements for n in s.binds)
    notebook = {w for spec in graph.steps for w in spec.writes} | {p.name for p in graph.params}
    external = notebook - defines
    used = _used_by_steps(graph, defines)
    kept = [s for s in statements if s.binds & used and not _is_future(s.node)]
    needs = _helper_needs(kept, external)
    for name in sorted(used & METAFLOW_NAMES):
        raise FlowDefinitionError(
            f"the notebook defines {name!r}, which the exported script imports from metaflow; rename it",
            variable=name)
    source = _layout([(s.node, _render(s, used, needs)) for s in kept])
    return Prelude(source, defines, needs)


def _layout(parts: list[tuple[ast.stmt, str]]) -> str:
    """PEP 8 spacing: two blank lines around defs and classes, one after the imports."""
    lines: list[str] = []
    previous: ast.stmt | None = None
    for node, text in parts:
        definition = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if previous is not None:
            was_definition = isinstance(previous, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            was_import = isinstance(previous, (ast.Import, ast.ImportFrom))
            is_import = isinstance(node, (ast.Import, ast.ImportFrom))
            if definition or was_definition:
                lines += ["", ""]
            elif was_import and not is_import:
                lines.append("")
        lines.append(text.strip("\n"))
        previous = node
    return "\n".join(lines) + "\n" if lines else ""


def _statements(prelude: str) -> list[_Statement]:
    try:
        tree = ast.parse(prelude)
    except SyntaxError as exc:  # the dag parsed every part already; keep the message if not
        raise FlowDefinitionError(f"the notebook's prelude does not parse: {exc.msg}") from None
    lines = prelude.splitlines()
    result = []
    for node in tree.body:
        first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        text = "\n".join(lines[first - 1:node.end_lineno])
        result.append(_Statement(node, text, frozenset(top_level_bindings([node], through_globals=False))))
    return result


def _is_future(node: ast.stmt) -> bool:
    return isinstance(node, ast.ImportFrom) and node.module == "__future__"


def _used_by_steps(graph: FlowGraph, defines: frozenset[str]) -> set[str]:
    """Prelude names the steps read, closed over what kept statements load."""
    used: set[str] = set()
    for spec in graph.steps:
        produced = graph.producers(spec.name)
        used |= {r for r in spec.reads if r in defines and r not in produced}
        # Names only bound inside the step (it re-imports them) are not reads; loads are.
        used |= {n.id for n in ast.walk(ast.parse(spec.code)) if isinstance(n, ast.Name)
                 and n.id in defines and n.id not in spec.writes and n.id not in produced}
    statements = _statements(graph.prelude)
    changed = True
    while changed:
        changed = False
        for statement in statements:
            if statement.binds & used:
                loads = {n.id for n in ast.walk(statement.node) if isinstance(n, ast.Name)} & defines
                if not loads <= used:
                    used |= loads
                    changed = True
    return used


def _helper_needs(kept: list[_Statement], external: set[str]) -> dict[str, tuple[str, ...]]:
    functions = {s.node.name: s.node for s in kept
                 if isinstance(s.node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    direct = {name: free_names(node) for name, node in functions.items()}
    needs = {name: set(reads & external) for name, reads in direct.items()}
    changed = True
    while changed:
        changed = False
        for name, reads in direct.items():
            for callee in reads & needs.keys():
                if not needs[callee] <= needs[name]:
                    needs[name] |= needs[callee]
                    changed = True
    for name, node in functions.items():
        if needs[name] and isinstance(node, ast.ClassDef):
            raise FlowDefinitionError(
                f"class {name} reads notebook variables as globals ({', '.join(sorted(needs[name]))}); "
                "in the Metaflow script they are artifacts of the flow: pass them to it explicitly",
                variable=name)
    return {name: tuple(sorted(found)) for name, found in needs.items() if found}


def _render(statement: _Statement, used: set[str], needs: dict[str, tuple[str, ...]]) -> str:
    node = statement.node
    if isinstance(node, ast.Import) and not statement.binds <= used:
        node = ast.Import(names=[a for a in node.names if (a.asname or a.name.split(".")[0]) in used])
        return ast.unparse(node)
    if isinstance(node, ast.ImportFrom) and not statement.binds <= used:
        node = ast.ImportFrom(module=node.module, level=node.level,
                              names=[a for a in node.names if (a.asname or a.name) in used])
        return ast.unparse(node)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _touches_needy(node, needs):
        return ast.unparse(_with_arguments(node, needs))
    return statement.text


def _touches_needy(node: ast.AST, needs: dict[str, tuple[str, ...]]) -> bool:
    return node.name in needs or any(isinstance(n, ast.Name) and n.id in needs for n in ast.walk(node))


def _with_arguments(node: ast.FunctionDef, needs: dict[str, tuple[str, ...]]) -> ast.FunctionDef:
    """The def with its notebook names as keyword-only arguments, passed on to helpers it calls."""
    node = ast.parse(ast.unparse(node)).body[0]   # a private copy
    own = needs.get(node.name, ())
    node.args.kwonlyargs += [ast.arg(arg=name) for name in own]
    node.args.kw_defaults += [None] * len(own)
    calls = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and sub.func.id in needs:
            sub.keywords += [ast.keyword(arg=n, value=ast.Name(id=n, ctx=ast.Load()))
                             for n in needs[sub.func.id]]
        elif isinstance(sub, ast.Name) and sub.id in needs and id(sub) not in calls and sub.id != node.name:
            raise FlowDefinitionError(
                f"{node.name}() uses {sub.id} as a value, but {sub.id}() reads notebook variables "
                f"({', '.join(needs[sub.id])}) that the export must pass to it as arguments",
                variable=sub.id)
    return ast.fix_missing_locations(node)
