"""Export to a Metaflow FlowSpec script: the pure parts (no metaflow run here).

The runs with the real metaflow package are in tests/test_export_metaflow.py.
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from flowmagic.flow.graph import build_flow
from flowmagic.errors import FlowDefinitionError
from flowmagic.export import export_flow, export_notebook, plan_export
from flowmagic.export.rewrite import StepNames, Where, rewrite_step_code
from flowmagic.export.structure import Parallel, Series, Step, decompose

EXAMPLES = Path(__file__).resolve().parent.parent / "example_notebooks"


def cells(*sources: str) -> list[str]:
    return [textwrap.dedent(s).strip("\n") + "\n" for s in sources]


def flow(*sources: str, name: str = "TestFlow"):
    return build_flow(cells(*sources), name)


def transitions(graph, class_name=None) -> dict[str, tuple[list[str], str | None, str | None]]:
    plan = plan_export(graph, class_name)
    return {s.name: (s.next, s.foreach, s.join) for s in plan.structure.steps.values()}


def method_source(script: str, name: str) -> str:
    tree = ast.parse(script)
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef))
    method = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    return ast.get_source_segment(script, method)


# --- rewriting one step's code ----------------------------------------------------

REWRITES = [
    ("assignment and read", "y = x + 1\n", {"x", "y"}, False, "self.y = self.x + 1\n"),
    ("augmented", "x += 1\n", {"x"}, False, "self.x += 1\n"),
    ("annotated", "x: int = 3\n", {"x"}, False, "self.x: int = 3\n"),
    ("tuple and star targets", "a, *b = x\n", {"a", "b", "x"}, False, "self.a, *self.b = self.x\n"),
    ("subscript mutation", "df['c'] = 1\n", {"df"}, False, "self.df['c'] = 1\n"),
    ("for and with targets", "for i in xs:\n    pass\nwith f() as h:\n    pass\n", {"i", "xs", "h"},
     False, "for self.i in self.xs:\n    pass\nwith f() as self.h:\n    pass\n"),
    ("del", "del x\n", {"x"}, False, "del self.x\n"),
    ("private names stay locals", "_t = x\ny = _t\n", {"x", "y"}, False, "_t = self.x\nself.y = _t\n"),
    ("comprehension variables are its own",
     "y = [x for x in z if x > k]\n", {"x", "y", "z", "k"}, False,
     "self.y = [x for x in self.z if x > self.k]\n"),
    ("the first iterable is evaluated outside",
     "y = [v for v in x for w in v]\n", {"x", "v", "y"}, False, "self.y = [v for v in self.x for w in v]\n"),
    ("function parameters and locals shadow",
     "def f(x, n=k):\n    m = x + k\n    return m\n", {"x", "k", "m"}, False,
     "def f(x, n=self.k):\n    m = x + self.k\n    return m\n"),
    ("lambda", "g = lambda v: v + k\n", {"g", "k", "v"}, False, "self.g = lambda v: v + self.k\n"),
    ("global in a nested function", "def f():\n    global total\n    total = 1\n", {"total"}, False,
     "def f():\n    pass\n    self.total = 1\n"),
    ("class body names are not visible in methods",
     "class K:\n    k = 1\n    def m(s):\n        return k\n", {"k"}, False,
     "class K:\n    k = 1\n    def m(s):\n        return self.k\n"),
    ("input in a foreach step", "d = input\n", {"d"}, True, "self.d = self.input\n"),
    ("input elsewhere is the builtin", "d = input\n", {"d"}, False, "self.d = input\n"),
    ("comments and layout are kept", "# note\ny = (x  # why\n     + 1)\n", {"x", "y"}, False,
     "# note\nself.y = (self.x  # why\n     + 1)\n"),
    ("attributes and keywords are not names", "y = o.x + f(x=1)\n", {"x", "y", "o"}, False,
     "self.y = self.o.x + f(x=1)\n"),
    ("f-strings", "s = f'{x!r} {y:>{w}}'\n", {"s", "x", "y", "w"}, False,
     "self.s = f'{self.x!r} {self.y:>{self.w}}'\n"),
]


@pytest.mark.parametrize("code, attributes, foreach, expected",
                         [case[1:] for case in REWRITES], ids=[case[0] for case in REWRITES])
def test_rewrite_cases(code, attributes, foreach, expected):
    result = rewrite_step_code(code, StepNames(frozenset(attributes), foreach), Where("s", 0))
    assert result == expected
    compile(result, "<rewritten>", "exec")


def test_helper_calls_get_the_notebook_names_they_read():
    names = StepNames(frozenset({"y"}), helper_args={"scale": ("factor",)})
    code = "y = scale(1) + scale()\n"
    assert rewrite_step_code(code, names, Where("s", 0)) == \
        "self.y = scale(1, factor=self.factor) + scale(factor=self.factor)\n"


REWRITE_ERRORS = [
    ("walrus on an artifact", "if (n := 3):\n    pass\n", {"n"}, "walrus"),
    ("walrus in a comprehension", "y = [(n := v) for v in z]\n", {"n", "y", "z"}, "walrus"),
    ("except binding an artifact", "try:\n    pass\nexcept Exception as e:\n    pass\n", {"e"}, "except"),
    ("a nested self parameter", "def f(self):\n    return x\n", {"x"}, "own `self`"),
    ("a helper passed as a value", "y = list(map(scale, z))\n", {"y", "z"}, "as a value"),
]


@pytest.mark.parametrize("code, attributes, message", [c[1:] for c in REWRITE_ERRORS],
                         ids=[c[0] for c in REWRITE_ERRORS])
def test_rewrite_errors_name_the_step_and_line(code, attributes, message):
    names = StepNames(frozenset(attributes), helper_args={"scale": ("factor",)})
    with pytest.raises(FlowDefinitionError, match=message) as info:
        rewrite_step_code(code, names, Where("train", 4, body_line=2))
    assert info.value.step == "train" and info.value.cell == 4 and info.value.line is not None


def test_rewrite_falls_back_to_unparse_when_text_edits_cannot_be_exact():
    # A trailing comma makes the inserted keyword a syntax error: the tree is unparsed instead.
    names = StepNames(frozenset({"y"}), helper_args={"scale": ("factor",)})
    result = rewrite_step_code("y = scale(1,)  # c\n", names, Where("s", 0))
    assert result == "self.y = scale(1, factor=self.factor)\n"


# --- the Metaflow structure ---------------------------------------------------------

def test_decompose_series_parallel_and_non_series_parallel():
    reach = {"a": {"b", "c", "d"}, "b": {"d"}, "c": {"d"}, "d": set()}
    assert decompose(["a", "b", "c", "d"], reach) == Series((Step("a"), Parallel((Step("b"), Step("c"))), Step("d")))
    # The "N" shape (a->c, a->d, b->d) is not series-parallel: a runs first.
    reach = {"a": {"c", "d"}, "b": {"d"}, "c": set(), "d": set()}
    assert decompose(["a", "b", "c", "d"], reach) == \
        Series((Step("a"), Parallel((Series((Step("b"), Step("d"))), Step("c")))))


STRUCTURES = [
    ("linear start/end",
     ("%%step start\nx = 1", "%%step end\ny = x"),
     {"start": (["end"], None, None), "end": ([], None, None)}),
    ("start and end added",
     ("%%step load\nx = 1", "%%step train\ny = x"),
     {"start": (["load"], None, None), "load": (["train"], None, None), "train": (["end"], None, None),
      "end": ([], None, None)}),
    ("several roots: start splits, the reader joins",
     ("%%step a\nx = 1", "%%step b\ny = 2", "%%step c\nz = x + y"),
     {"start": (["a", "b"], None, None), "a": (["c"], None, None), "b": (["c"], None, None),
      "c": (["end"], None, "static"), "end": ([], None, None)}),
    ("several leaves get a join before end",
     ("%%step a\nx = 1", "%%step b\ny = x", "%%step c\nz = x"),
     {"start": (["a"], None, None), "a": (["b", "c"], None, None), "b": (["join_b_c"], None, None),
      "c": (["join_b_c"], None, None), "join_b_c": (["end"], None, "static"), "end": ([], None, None)}),
    ("foreach and its join",
     ("%%step start\nitems = [1, 2]", "%%step sq --foreach items\nv = input ** 2", "%%step total\nt = sum(v)"),
     {"start": (["sq"], "items", None), "sq": (["total"], None, None), "total": (["end"], None, "foreach"),
      "end": ([], None, None)}),
    ("a foreach after parallel steps: a join, then a linear step (a join may not fan out)",
     ("%%step a\nx = [1]", "%%step b\ny = [2]", "%%step f --foreach x\nv = input + y[0]",
      "%%step j\nw = v"),
     {"start": (["a", "b"], None, None), "a": (["join_a_b"], None, None), "b": (["join_a_b"], None, None),
      "join_a_b": (["split_f"], None, "static"), "split_f": (["f"], "x", None), "f": (["j"], None, None),
      "j": (["end"], None, "foreach"), "end": ([], None, None)}),
    ("a foreach that ends the flow gets its join",
     ("%%step start\nitems = [1, 2]", "%%step sq --foreach items\nv = input ** 2"),
     {"start": (["sq"], "items", None), "sq": (["join_sq"], None, None),
      "join_sq": (["end"], None, "foreach"), "end": ([], None, None)}),
    ("a @catch step does not fan out a foreach itself",
     ("%%step start --catch oops\nitems = [1, 2]", "%%step sq --foreach items\nv = input",
      "%%step j\nw = v"),
     {"start": (["split_sq"], None, None), "split_sq": (["sq"], "items", None), "sq": (["j"], None, None),
      "j": (["end"], None, "foreach"), "end": ([], None, None)}),
    ("nested foreach: two joins",
     ("%%step start\nouter = [[1, 2], [3]]", "%%step row --foreach outer\ncells = input",
      "%%step cell --foreach cells\nv = input * 10", "%%step j\nw = v"),
     {"start": (["row"], "outer", None), "row": (["cell"], "cells", None), "cell": (["join_cell"], None, None),
      "join_cell": (["j"], None, "foreach"), "j": (["end"], None, "foreach"), "end": ([], None, None)}),
]


@pytest.mark.parametrize("sources, expected", [c[1:] for c in STRUCTURES], ids=[c[0] for c in STRUCTURES])
def test_structure_cases(sources, expected):
    assert transitions(flow(*sources)) == expected


def test_a_foreach_inside_a_static_branch():
    graph = flow("%%step load\nitems = [1, 2]\nbase = 10",
                 "%%step describe\nn = len(items)",
                 "%%step fit --foreach items\nscore = input * base",
                 "%%step pick\nbest = max(score)",
                 "%%step report\nout = (n, best)")
    assert transitions(graph) == {
        "start": (["load"], None, None), "load": (["describe", "split_fit"], None, None),
        "describe": (["report"], None, None), "split_fit": (["fit"], "items", None),
        "fit": (["pick"], None, None), "pick": (["report"], None, "foreach"),
        "report": (["end"], None, "static"), "end": ([], None, None)}


# --- joins carry what the notebook would see ---------------------------------------------

def test_static_join_takes_a_rebound_name_from_the_latest_writer_and_merges_the_rest():
    graph = flow("%%step start\nx = 1\nkeep = 'same'", "%%step b\ny = x + 1", "%%step c\nx = x * 2",
                 "%%step j\nz = (x, y, keep)")
    plan = plan_export(graph)
    join = plan.joins["j"]
    assert join.explicit == [("x", "c")]
    assert set(join.merged) == {"keep", "y"}
    body = method_source(export_flow(graph), "j")
    assert "self.x = inputs.c.x" in body and "self.merge_artifacts(inputs)" in body
    assert body.index("self.x = inputs.c.x") < body.index("self.merge_artifacts(inputs)")


def test_foreach_join_gathers_every_name_the_tasks_wrote():
    graph = flow("%%step start\nitems = [1, 2]\nscale = 3", "%%step f --foreach items --catch bad\nv = input * scale",
                 "%%step j\nw = v")
    join = plan_export(graph).joins["j"]
    assert join.gathered == ["bad", "v"] and join.merged == ["items", "scale"]
    # The @catch step starts with what it writes as None (failed tasks keep None there).
    body = method_source(export_flow(graph), "f")
    assert "self.v = None" in body and "self.bad" not in body


def test_a_variable_named_like_a_step_is_refused_when_read_back():
    with pytest.raises(FlowDefinitionError, match="same name") as info:
        export_flow(flow("%%step start\nx = 1", "%%step count\ncount = x", "%%step end\ny = count"))
    assert info.value.variable == "count"
    # Written only (as in the model-selection example), it is fine.
    export_flow(flow("%%step start\nx = 1", "%%step report\nreport = x"))


# --- names that are artifacts, and locals ------------------------------------------------

def test_throwaway_names_stay_locals_and_artifacts_do_not():
    graph = flow("%%step start\nitems = [1, 2]", "%%step f --foreach items\nv = input",
                 "%%step j\nfor inp in inputs:\n    print(inp.v)\nimport math\ntotal = math.fsum(v)",
                 "%%step end\nprint(total)")
    plan = plan_export(graph)
    assert plan.locals["j"] == {"inp", "math"}
    assert "total" in plan.attributes["j"]
    body = method_source(export_flow(graph), "j")
    assert "for inp in inputs:" in body and "import math" in body


DEFINITION_ERRORS = [
    ("a def read by a later step", ("%%step a\ndef f():\n    return 1", "%%step b\ny = f()"), "a", "defines"),
    ("an import read by a later step", ("%%step a\nimport math", "%%step b\ny = math.pi"), "a", "imports"),
    ("IPython syntax", ("%%step a\n%time x = 1",), "a", "IPython syntax"),
    ("top-level await", ("import asyncio", "%%step a\nawait asyncio.sleep(0)\nx = 1"), "a", "await"),
    ("a nested foreach with a step in between",
     ("%%step start\nouter = [[1], [2]]", "%%step row --foreach outer\ncells = input",
      "%%step cell --foreach cells\nv = input", "%%step j\nw = cells", "%%step k\nz = v"), "cell", "straight to it"),
    ("a lambda read by a later step", ("%%step a\nf = lambda v: v", "%%step b\ny = f(1)"), "a", "defines"),
    ("start not first", ("%%step a\nx = 1", "%%step start\ny = x"), "start", "first step"),
    ("end not last", ("%%step end\nx = 1", "%%step b\ny = x"), "end", "last step"),
    ("a reserved Metaflow attribute another step reads", ("%%step a\nx = 1\nindex = 1", "%%step b\ny = index"),
     "a", "reserves"),
    ("an uppercase step name", ("%%step Train\nx = 1",), "Train", "lowercase"),
    ("a step Metaflow reserves", ("%%step cmd\nx = 1",), "cmd", "lowercase"),
]


@pytest.mark.parametrize("sources, step, message", [c[1:] for c in DEFINITION_ERRORS],
                         ids=[c[0] for c in DEFINITION_ERRORS])
def test_what_has_no_metaflow_equivalent_is_an_error_naming_the_step(sources, step, message):
    with pytest.raises(FlowDefinitionError, match=message) as info:
        export_flow(flow(*sources))
    assert info.value.step == step


def test_a_reserved_name_read_downstream_is_refused_with_its_line():
    with pytest.raises(FlowDefinitionError, match="'index' would be self.index") as info:
        export_flow(flow("%%step a\nx = 1\nindex = 1", "%%step b\ny = index"))
    assert (info.value.cell, info.value.line, info.value.variable) == (0, 3, "index")


def test_a_reserved_name_used_only_inside_a_step_stays_local():
    graph = flow("%%step start\nitems = ['a', 'b']\nindex = {v: i for i, v in enumerate(items)}\n"
                 "name = 'x'\nfirst = index['a']", "%%step end\nout = first")
    plan = plan_export(graph)
    assert {"index", "name"} <= plan.locals["start"] and "first" in plan.attributes["start"]
    body = method_source(export_flow(graph), "start")
    assert "self.index" not in body and "index = {" in body and "self.first = index['a']" in body


def test_parameter_named_like_a_metaflow_option_is_refused():
    with pytest.raises(FlowDefinitionError, match="command-line option"):
        export_flow(flow("%%params\ntags = 'x'", "%%step start\ny = tags"))


# --- the prelude -------------------------------------------------------------------------------

def test_prelude_keeps_only_what_steps_use_transitively():
    graph = flow("import json, os\nimport math\nUNUSED = 1\nBASE = 2\n"
                 "def area(r):\n    return math.pi * r ** BASE\n",
                 "%%step start\ny = area(3)\ns = json.dumps(y)")
    script = export_flow(graph)
    module = ast.parse(script)
    top = {n.name if isinstance(n, ast.FunctionDef) else ast.unparse(n).split("=")[0].strip()
           for n in module.body if not isinstance(n, (ast.ClassDef, ast.If, ast.Expr))}
    assert "import json" in script and "import os" not in script and "UNUSED" not in script
    assert {"import math", "BASE", "area"} <= top


def test_prelude_helper_reading_step_outputs_gets_them_as_arguments():
    graph = flow("def scale(v):\n    return v * factor\n\ndef twice(v):\n    return 2 * scale(v)\n",
                 "%%params\nfactor = 3", "%%step start\noffset = 1",
                 "%%step end\ny = twice(offset)")
    script = export_flow(graph)
    assert "def scale(v, *, factor):" in script
    assert "return 2 * scale(v, factor=factor)" in script
    assert "self.y = twice(self.offset, factor=self.factor)" in script
    namespace: dict = {}
    exec(compile(script.split("class TestFlow")[0].split("from metaflow")[1].split("\n", 1)[1], "<p>", "exec"),
         namespace)
    assert namespace["twice"](1, factor=3) == 6


def test_class_in_prelude_reading_step_outputs_is_refused():
    graph = flow("class Model:\n    def fit(self):\n        return alpha\n",
                 "%%step start\nalpha = 1", "%%step end\nm = Model().fit()")
    with pytest.raises(FlowDefinitionError, match="class Model"):
        export_flow(graph)


# --- the script as a whole -----------------------------------------------------------------------

def test_decorators_parameters_and_docstrings():
    graph = flow("%%params\nalpha = 0.5  # Learning rate\nconfig = Parameter('config', default={'k': [1]}, "
                 "help='Settings')\ndebug = False",
                 "%%step start --retry 2 --timeout 1.5\n# Load things\nx = alpha",
                 "%%step end --pypi 'pandas==2.2.3 pyarrow>=15' --catch failed\ny = x")
    script = export_flow(graph)
    assert "alpha = Parameter('alpha', default=0.5, type=float, help='Learning rate')" in script
    assert "config = Parameter('config', default='{\"k\": [1]}', type=JSONType, help='Settings')" in script
    assert "debug = Parameter('debug', default=False, type=bool)" in script
    assert "@retry(times=2)\n    @timeout(seconds=2)\n    @step\n    def start(self):" in script
    assert "@pypi(packages={'pandas': '2.2.3', 'pyarrow': '>=15'})" in script
    assert "@catch(var='failed')" in script and "--environment=pypi" in script
    assert '"""Load things"""' in script and "# Load things" not in script
    assert "from metaflow import FlowSpec, JSONType, Parameter, catch, pypi, retry, step, timeout" in script


def test_multiline_strings_keep_their_text_when_indented():
    graph = flow('%%step start\nq = """a\n  b\nc"""\nr = 1')
    script = export_flow(graph)
    namespace: dict = {}
    body = method_source(script, "start")
    assert 'self.q = """a\n  b\nc"""' in body
    tree = ast.parse(script)
    assigned = [n for n in ast.walk(tree) if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "self.q"]
    assert assigned[0].value.value == "a\n  b\nc"
    del namespace


@pytest.mark.parametrize("notebook", sorted(p.name for p in EXAMPLES.glob("*.ipynb")))
def test_every_example_exports_to_a_script_that_compiles(notebook, tmp_path):
    target = tmp_path / "flow.py"
    source = export_notebook(EXAMPLES / notebook, target)
    assert target.read_text() == source
    compile(source, str(target), "exec")
    assert source.rstrip().endswith("()")
    # Readable: one blank line between methods, nothing over-indented.
    assert "\n\n\n    @step" not in source


def test_export_command_writes_the_script_and_reports_json(tmp_path, capsys):
    import json

    from flowmagic.cli.main import main

    target = tmp_path / "flow.py"
    assert main(["export", str(EXAMPLES / "catch_flow.ipynb"), "-o", str(target), "--name", "Catch",
                 "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["class"] == "Catch" and document["output"] == str(target)
    assert [s["name"] for s in document["steps"]] == ["start", "compute", "join", "end"]
    assert "class Catch(FlowSpec):" in target.read_text()
    assert main(["export", str(tmp_path / "missing.ipynb")]) == 2


def test_catch_step_that_rebinds_an_upstream_name_says_what_differs():
    graph = flow("%%step start\nx = 1", "%%step end --catch oops\nx = x + 1\ny = 2")
    body = method_source(export_flow(graph), "end")
    assert "self.y = None" in body and "self.x = None" not in body
    assert "fails before it rebinds x" in body


def test_display_in_a_step_is_imported_from_ipython():
    script = export_flow(flow("%%step start\nx = 1\ndisplay(x)"))
    assert "from IPython.display import display" in script and "display = print" in script
    assert "from IPython" not in export_flow(flow("%%step start\nx = 1"))


def test_a_notebook_without_steps_cannot_be_exported():
    with pytest.raises(FlowDefinitionError, match="no %%step cell"):
        export_flow(flow("x = 1"))


def test_class_name_must_not_clash_with_the_prelude():
    with pytest.raises(FlowDefinitionError, match="class name"):
        export_flow(flow("def Model():\n    return 1\n", "%%step start\nm = Model()"), "Model")
