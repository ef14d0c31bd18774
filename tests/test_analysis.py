"""One small case per syntax form: what a cell reads and writes (DESIGN section 2)."""
from __future__ import annotations

import builtins
import textwrap

import pytest

from flowmagic.flow.analysis import analyze_cell, parse_code, split_prelude, transform_ipython

_BUILTINS = set(dir(builtins)) | {"get_ipython"}


def analyse(code: str, prelude_reads=None):
    plain = transform_ipython(textwrap.dedent(code).strip("\n") + "\n")
    return analyze_cell(parse_code(plain), prelude_reads)


def names(mapping) -> set[str]:
    return {n for n in mapping if n not in _BUILTINS}


# (id, code, reads, maybe_reads, writes); builtins are left out of reads.
CASES = [
    ("assign", "x = 1", set(), set(), {"x"}),
    ("read upstream", "y = x + 1", {"x"}, set(), {"y"}),
    ("self update", "x = x + 1", {"x"}, set(), {"x"}),
    ("augmented assignment", "x += 1", {"x"}, set(), {"x"}),
    ("read own output before binding", "print(x)\nx = 2", {"x"}, set(), {"x"}),
    ("bound before read", "x = 1\nprint(x)", set(), set(), {"x"}),
    ("chained targets", "a = b = c", {"c"}, set(), {"a", "b"}),
    ("star unpacking", "first, *rest = items", {"items"}, set(), {"first", "rest"}),
    ("nested unpacking", "(a, [b, c]), d = pairs", {"pairs"}, set(), {"a", "b", "c", "d"}),
    ("list comprehension scope", "ys = [i * k for i in items]", {"items", "k"}, set(), {"ys"}),
    ("comprehension variable does not leak", "sq = [n * n for n in range(3)]\nprint(n)", {"n"}, set(), {"sq"}),
    ("comprehension over a same-named upstream", "x = [x for x in x]", {"x"}, set(), {"x"}),
    ("nested comprehension", "m = [[a * b for b in cols] for a in rows]", {"cols", "rows"}, set(), {"m"}),
    ("generator expression", "t = sum(v for v in vals if v > lim)", {"vals", "lim"}, set(), {"t"}),
    ("dict and set comprehensions", "d = {k: w for k in keys}\ns = {e for e in es}", {"keys", "w", "es"}, set(), {"d", "s"}),
    ("walrus at top level", "if (n := len(data)) > 3:\n    pass\nm = n", {"data"}, set(), {"n", "m"}),
    ("walrus in a comprehension binds the cell", "vals = [(y := f(x)) for x in data]\nlast = y",
     {"f", "data"}, set(), {"vals", "y", "last"}),
    ("function free names", "def f(a):\n    return a + scale\nout = f(1)", {"scale"}, set(), {"f", "out"}),
    ("function local names are not reads", "def f():\n    tmp = 1\n    return tmp\n", set(), set(), {"f"}),
    ("function reads a name the cell binds later", "def f():\n    return k\nk = 1\nv = f()", set(), {"k"}, {"f", "k", "v"}),
    ("nested functions", "def outer():\n    z = 1\n    def inner():\n        return z + w\n    return inner",
     {"w"}, set(), {"outer"}),
    ("nonlocal", "def outer():\n    n = 0\n    def inc():\n        nonlocal n\n        n += 1\n    return inc",
     set(), set(), {"outer"}),
    ("global in a function", "def bump():\n    global counter\n    counter += 1\nbump()", set(), {"counter"}, {"bump", "counter"}),
    ("global at top level", "global g\ng = 1", set(), set(), {"g"}),
    ("lambda", "g = lambda a, b=dflt: a + b + c", {"dflt", "c"}, set(), {"g"}),
    ("lambda in a comprehension sees the loop variable", "fs = [lambda: i for i in r]", {"r"}, set(), {"fs"}),
    ("class body and methods", "class M:\n    size = base\n    def go(self):\n        return size + other",
     {"base", "size", "other"}, set(), {"M"}),
    ("class attribute used in the class body", "class A:\n    k = 1\n    j = k + 1", set(), set(), {"A"}),
    ("class body reads a name before binding it", "class Cfg:\n    rate = rate * 2", {"rate"}, set(), {"Cfg"}),
    ("class body reads an outer def above its own",
     "class A:\n    early = method\n    def method(self):\n        return 1", {"method"}, set(), {"A"}),
    ("class body: augmented assignment of an outer name", "class A:\n    n += 1", {"n"}, set(), {"A"}),
    ("class body: compound statement binding first", "class A:\n    if True:\n        k = 1\n        j = k",
     set(), set(), {"A"}),
    ("method does not see the class body", "class A:\n    k = 1\n    def f(self):\n        return k",
     {"k"}, set(), {"A"}),
    ("comprehension in a class body", "class A:\n    k = 1\n    l = [k for _ in range(2)]", {"k"}, set(), {"A"}),
    ("decorators, defaults, annotations", "@deco(opt)\ndef f(a: T = dflt) -> Ret:\n    pass",
     {"deco", "opt", "T", "dflt", "Ret"}, set(), {"f"}),
    ("del of an upstream name", "del tmp", {"tmp"}, set(), set()),
    ("del of a local name", "x = 1\ndel x", set(), set(), set()),
    ("del of an item mutates", "del df['c']", {"df"}, set(), {"df"}),
    ("conditional binding", "if flag:\n    x = 1\nprint(x)", {"flag"}, {"x"}, {"x"}),
    ("both branches bind", "if flag:\n    x = 1\nelse:\n    x = 2\nprint(x)", {"flag"}, set(), {"x"}),
    ("try/except, both bind", "try:\n    v = risky()\nexcept ValueError as err:\n    v = None\nprint(v)",
     {"risky"}, set(), {"v"}),
    ("try/except, handler does not bind", "try:\n    v = risky()\nexcept Exception:\n    pass\nuse(v)",
     {"risky", "use"}, {"v"}, {"v"}),
    ("try/finally", "try:\n    a = 1\nfinally:\n    b = 2\nc = a + b", set(), set(), {"a", "b", "c"}),
    ("for targets (a loop is taken to run at least once)", "for i, row in enumerate(rows):\n    last = row\nprint(last)", {"rows"}, set(), {"i", "row", "last"}),
    ("while loop bindings", "while todo():\n    got = 1\nprint(got)", {"todo"}, set(), {"got"}),
    ("a loop whose body always raises", "for v in vs:\n    raise E(v)\nprint(v)", {"vs", "E"}, {"v"}, {"v"}),
    ("unreachable code reads nothing", "raise E()\nprint(never)", {"E"}, set(), set()),
    ("for body reads before binding", "for _ in range(2):\n    print(acc)\n    acc = 1", {"acc"}, set(), {"_", "acc"}),
    ("for/else: break and else both bind", "for v in vs:\n    break\nelse:\n    v = 0\nprint(v)", {"vs"}, set(), {"v"}),
    ("for/else: else may be skipped", "for v in vs:\n    if v:\n        break\nelse:\n    w = 0\nprint(w)", {"vs"}, {"w"}, {"v", "w"}),
    ("while True with break", "while True:\n    x = step()\n    if x:\n        break\nprint(x)", {"step"}, set(), {"x"}),
    ("with target", "with open(p) as fh:\n    text = fh.read()", {"p"}, set(), {"fh", "text"}),
    ("match targets", textwrap.dedent("""\
        match cmd:
            case ["go", target]:
                dest = target
            case {"k": v, **rest}:
                dest = v
            case Point(x=px) | Point(y=px):
                dest = px
            case _:
                dest = None
        print(dest)"""), {"cmd", "Point"}, {"target", "v", "rest", "px"}, {"target", "dest", "v", "rest", "px"}),
    ("match without a wildcard", "match c:\n    case 1:\n        d = 1\nprint(d)", {"c"}, {"d"}, {"d"}),
    ("import forms", "import os.path as osp\nimport a.b\nfrom x import y as z\nfrom . import w",
     set(), set(), {"osp", "a", "z", "w"}),
    ("name shadowing a builtin", "list = [1]\nn = list[0]", set(), set(), {"list", "n"}),
    ("private names are analysed like others", "_tmp = 1\ny = _tmp + _up", {"_up"}, set(), {"_tmp", "y"}),
    ("subscript assignment mutates", "df['c'] = 1", {"df"}, set(), {"df"}),
    ("attribute assignment mutates", "obj.a.b = v", {"obj", "v"}, set(), {"obj"}),
    ("augmented subscript", "counts[k] += 1", {"counts", "k"}, set(), {"counts"}),
    ("annotated assignment", "n: int = 5\nm: SomeType", {"SomeType"}, set(), {"n"}),
    ("top-level await", "data = await fetch()", {"fetch"}, set(), {"data"}),
    ("except name is unbound after the handler", "try:\n    pass\nexcept E as e:\n    pass", {"E"}, set(), set()),
    ("IPython %time runs its statement here", "%time x = f(y)", {"f", "y"}, set(), {"x"}),
    ("IPython %timeit only reads", "%timeit g(z)", {"g", "z"}, set(), set()),
    ("IPython shell capture expands names", "files = !ls {folder}", {"folder"}, set(), {"files"}),
    ("IPython shell expansions", "!echo $name {a + 1} $$HOME {{literal}}", {"name", "a"}, set(), set()),
    ("IPython help", "x?", set(), set(), set()),
    ("raise ends a path", "if bad:\n    raise ValueError()\nelse:\n    r = 1\nprint(r)", {"bad"}, set(), {"r"}),
]


@pytest.mark.parametrize("code, reads, maybe, writes", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_reads_and_writes(code, reads, maybe, writes):
    result = analyse(code)
    assert names(result.reads) == reads
    assert names(result.maybe_reads) == maybe
    assert set(result.writes) == writes


def test_mutated_names_are_reported():
    assert analyse("df['c'] = 1\nobj.x = 2\ny = 3").mutated == {"df", "obj"}


def test_read_lines_are_the_first_load():
    result = analyse("a = 1\nb = up\nc = up + other")
    assert result.reads == {"up": 2, "other": 3}


def test_lines_survive_leading_blank_lines_and_magics():
    code = transform_ipython("\n\n%time a = 1\n!ls\nb = up\n")
    reads = analyze_cell(parse_code(code)).reads
    assert {n: line for n, line in reads.items() if n != "get_ipython"} == {"up": 5}


def test_star_import_is_flagged_with_its_line():
    assert analyse("import os\nfrom os.path import *").star_import_line == 2
    assert analyse("import os").star_import_line is None


def test_prelude_function_reads_count_where_it_is_called():
    via = {"clean": frozenset({"movies"})}
    result = analyse("z = clean(df)", via)
    assert names(result.reads) == {"clean", "df", "movies"}
    assert result.via == {"movies": "clean"}
    assert "movies" not in analyse("movies = load()\nz = clean()", via).reads


def test_a_cell_defining_the_function_itself_does_not_inherit_prelude_reads():
    via = {"clean": frozenset({"movies"})}
    assert "movies" not in analyse("def clean():\n    return 1\nz = clean()", via).reads


@pytest.mark.parametrize("code", ["return 1", "x = (", "break", "def f(:\n  pass", "nonlocal x"])
def test_syntax_errors(code):
    with pytest.raises(SyntaxError):
        parse_code(transform_ipython(code))


def test_transform_keeps_line_numbers():
    code = transform_ipython("\n\n  \n%time x = 1\n")
    assert code.splitlines()[3].startswith("get_ipython().run_line_magic")


# --- prelude -------------------------------------------------------------------

def prelude_of(code: str):
    plain = transform_ipython(textwrap.dedent(code).strip("\n") + "\n")
    return split_prelude(parse_code(plain), plain)


def test_prelude_keeps_imports_defs_classes_and_literal_constants():
    part = prelude_of("""
        %load_ext flowmagic
        %flow name Movies
        import numpy as np
        from os import path as p
        N = 10
        SIZE = 2 ** 10
        NAMES = ["a", "b"]
        df = np.zeros(N)
        print(df)
        @decorate
        def f(x):
            return x + g
        class K:
            pass
    """)
    assert set(part.defines) == {"np", "p", "N", "SIZE", "NAMES", "f", "K"}
    assert set(part.computes) == {"df"}
    assert "run_line_magic" not in part.source and "print" not in part.source
    assert "@decorate\ndef f(x):" in part.source
    assert part.global_reads["f"] == {"g"}


def test_prelude_try_import_fallback():
    part = prelude_of("try:\n    import polars\nexcept ImportError:\n    polars = None\n")
    assert set(part.defines) == {"polars"}


def test_prelude_statement_sharing_a_line_is_cut_out():
    part = prelude_of("import os; x = os.getcwd()")
    assert part.source.strip() == "import os"
    assert set(part.computes) == {"x"}
