"""flow/scopes.py against the compiler's own scope tables (stdlib ``symtable``).

Every function, lambda and class scope of a corpus (tricky snippets and every
code cell of the example notebooks) must get the same locals, ``global`` and
``nonlocal`` declarations and free names from ``nested_scope`` as from
``symtable``. Comprehension scopes are left out of the comparison: Python 3.12
inlines them into their enclosing table (PEP 709), so ``symtable`` answers
differently across the versions flowmagic supports.
"""
from __future__ import annotations

import ast
import symtable
from pathlib import Path

import nbformat
import pytest

from flowmagic.flow.scopes import COMPREHENSIONS, FUNCTIONS, nested_scope, top_level_bindings

SNIPPETS = {
    "arguments": "def f(a, /, b, *c, d=x, **e):\n    return a + b + y\n",
    "global and nonlocal": (
        "def f(a):\n    global G\n    G = a\n    def g():\n        nonlocal a\n        a = a + 1\n"
        "        return z\n    return g\n"),
    "class body and methods": (
        "class K(Base, metaclass=Meta):\n    r = r0\n    def m(self):\n        return r + self.q\n"
        "    n = lambda s: s + w\n"),
    "class reads a global before binding it": "class K:\n    rate = rate * 2\n",
    "walrus in a comprehension binds outside": (
        "def f(rows):\n    kept = [y := r for r in rows if r]\n    return y, kept\n"),
    "nested comprehensions": "def f(m):\n    return [[c * k for c in row] for row in m]\n",
    "except as, with as, for": (
        "def f(path):\n    try:\n        pass\n    except OSError as err:\n        print(err)\n"
        "    with open(path) as fh:\n        for i, line in enumerate(fh):\n            pass\n    return i\n"),
    "imports inside a function": "def f():\n    import os.path\n    from json import dumps as d\n    return os, d\n",
    "match statement": (
        "def f(cmd):\n    match cmd:\n        case [verb, *rest]:\n            return verb, rest\n"
        "        case {'k': v, **others}:\n            return v, others\n        case Point(x=px) as p:\n"
        "            return px, p\n"),
    "decorators and annotations": (
        "@deco(cfg)\ndef f(a: A = default) -> R:\n    b: B = a\n    return b\n"),
    "augmented assignment and del": "def f():\n    total += 1\n    del gone\n    return total\n",
    "lambda defaults": "f = lambda a, b=bias: a * scale + b\n",
    "closure over a loop variable": "def f(items):\n    return [lambda: item for item in items]\n",
    "deep nesting": (
        "def a():\n    x = 1\n    def b():\n        def c():\n            return x + outer\n        return c\n    return b\n"),
}


def _example_cells() -> dict[str, str]:
    cells = {}
    folders = [Path(__file__).parent.parent / "example_notebooks", Path(__file__).parent / "browser" / "notebooks"]
    for path in sorted(p for folder in folders for p in folder.glob("*.ipynb")):
        for number, cell in enumerate(nbformat.read(path, as_version=4).cells, 1):
            if cell.cell_type != "code":
                continue
            lines = cell.source.splitlines()
            body = "\n".join(lines[1:] if lines and lines[0].startswith("%%") else lines)
            try:
                ast.parse(body)
            except SyntaxError:
                continue  # line magics: not plain Python
            cells[f"{path.stem} cell {number}"] = body + "\n"
    return cells


CORPUS = {**SNIPPETS, **_example_cells()}


def _tables(table: symtable.SymbolTable) -> list[symtable.SymbolTable]:
    found = [table]
    for child in table.get_children():
        found += _tables(child)
    return found


def _compared_nodes(tree: ast.AST) -> list[ast.AST]:
    return [n for n in ast.walk(tree) if isinstance(n, (*FUNCTIONS, ast.ClassDef))]


def _table_for(node: ast.AST, tables: list[symtable.SymbolTable]) -> symtable.SymbolTable:
    name = "lambda" if isinstance(node, ast.Lambda) else node.name
    lineno = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    found = [t for t in tables if t.get_name() == name and t.get_lineno() in (node.lineno, lineno)]
    assert len(found) == 1, (name, node.lineno, [(t.get_name(), t.get_lineno()) for t in tables])
    return found[0]


def _comprehension_targets(node: ast.AST) -> set[str]:
    return {n.id for c in ast.walk(node) if isinstance(c, COMPREHENSIONS)
            for g in c.generators for n in ast.walk(g.target) if isinstance(n, ast.Name)}


def _expected_free(table: symtable.SymbolTable) -> set[str]:
    """Names a scope and the scopes inside it read from outside it, per the compiler."""
    free = {s.get_name() for s in table.get_symbols()
            if s.is_referenced() and (s.is_global() or s.is_free())}
    for child in table.get_children():
        free |= _expected_free(child)
    if table.get_type() != "class":   # a class's names are not visible inside its methods
        free -= {s.get_name() for s in table.get_symbols() if s.is_local() and not s.is_free()}
    return free


@pytest.mark.parametrize("label", sorted(CORPUS))
def test_nested_scopes_agree_with_symtable(label: str) -> None:
    code = CORPUS[label]
    tree = ast.parse(code)
    tables = _tables(symtable.symtable(code, label, "exec"))
    nodes = _compared_nodes(tree)
    for node in nodes:
        ours = nested_scope(node)
        table = _table_for(node, tables)
        symbols = table.get_symbols()
        # Python 3.12+ lists an inlined comprehension's targets among the enclosing scope's locals.
        inlined = _comprehension_targets(node)
        local = {s.get_name() for s in symbols if s.is_local() and not s.is_free()
                 and (s.is_assigned() or s.is_imported() or s.is_parameter() or s.is_namespace())}
        assert ours.local - inlined == local - inlined, (label, node.lineno)
        assert ours.declared_global == {s.get_name() for s in symbols if s.is_declared_global()}
        assert ours.declared_nonlocal == {s.get_name() for s in symbols if s.is_nonlocal()}
        expected = _expected_free(table)
        assert expected <= set(ours.free), (label, node.lineno, expected - set(ours.free))
        extra = set(ours.free) - expected
        if isinstance(node, ast.ClassDef):
            # A class body reading a name before binding it reads the global: the compiler calls it local.
            extra -= {s.get_name() for s in symbols if s.is_local() and s.is_referenced()}
        assert not extra, (label, node.lineno, extra)
    assert nodes or label not in SNIPPETS, "a snippet with no nested scope tests nothing"


def test_top_level_bindings_agree_with_symtable() -> None:
    for label, code in CORPUS.items():
        module = symtable.symtable(code, label, "exec")
        bound = {s.get_name() for s in module.get_symbols()
                 if s.is_assigned() or s.is_imported() or s.is_namespace()}
        # A walrus in a comprehension, or a `global` statement in a function, binds the cell's name;
        # the compiler marks such names declared global in the cell's table.
        declared = {s.get_name() for s in module.get_symbols() if s.is_declared_global()}
        ours = top_level_bindings(ast.parse(code).body)
        inlined = _comprehension_targets(ast.parse(code))
        assert bound - inlined <= ours - inlined <= bound | declared, label


def test_what_statements_leave_bound() -> None:
    code = ("try:\n    import fast as impl\nexcept ImportError as err:\n    impl = None\n"
            "def setup():\n    global CONFIG\n    CONFIG = 1\n")
    body = ast.parse(code).body
    assert top_level_bindings(body) == {"impl", "err", "setup", "CONFIG"}
    assert top_level_bindings(body, through_globals=False) == {"impl", "setup"}
