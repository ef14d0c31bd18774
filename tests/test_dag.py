"""DAG inference from notebook cells: wiring, foreach/join semantics, errors.

Cases are data (cells in, edges or an error out), in the style of marimo's
tests/_runtime/test_dataflow_cases.py.
"""
from __future__ import annotations

import json
import random
import textwrap

import pytest

from flowmagic.flow.cells import StepOptions
from flowmagic.flow.graph import Edge, FlowGraph, build_flow, flow_name_from_cells
from flowmagic.errors import FlowDefinitionError
from flowmagic.report.text import render_show


def cells(*sources: str) -> list[str]:
    return [textwrap.dedent(s).strip("\n") + "\n" if s else "" for s in sources]


def edges_of(graph: FlowGraph) -> set[tuple[str, str, tuple[str, ...]]]:
    return {(e.source, e.target, e.variables) for e in graph.edges}


# --- wiring --------------------------------------------------------------------

GRAPH_CASES = [
    ("linear", cells("%%step start\nx = 1", "%%step end\nx += 1"),
     {("start", "end", ("x",))}),
    ("nearest preceding writer wins", cells("%%step a\nx = 1", "%%step b\nx = x + 1", "%%step c\ny = x"),
     {("a", "b", ("x",)), ("b", "c", ("x",))}),
    ("a writer ordered after the other by other data may rebind",
     cells("%%step a\nx = 1\nd = 2", "%%step b\nx = d", "%%step c\ny = x"),
     {("a", "b", ("d",)), ("b", "c", ("x",))}),
    ("a step reading its own output before binding reads upstream",
     cells("%%step a\nx = 1", "%%step b\nprint(x)\nx = 3", "%%step c\nz = x"),
     {("a", "b", ("x",)), ("b", "c", ("x",))}),
    ("static branch and join",
     cells("%%step a\nd = 1", "%%step b\ne = d", "%%step c\nf = d", "%%step j\ng = e + f"),
     {("a", "b", ("d",)), ("a", "c", ("d",)), ("b", "j", ("e",)), ("c", "j", ("f",))}),
    ("independent steps are parallel roots", cells("%%step a\nx = 1", "%%step b\ny = 2"), set()),
    ("name shadowing a builtin is wired", cells("%%step a\nlist = [1, 2]", "%%step b\nn = len(list)"),
     {("a", "b", ("list",))}),
    ("builtins are not reads", cells("%%step a\nn = list(range(3))"), set()),
    ("private names are never wired",
     cells("%%step a\n_tmp = 1\nx = _tmp", "%%step b\n_tmp = 5\ny = x + _tmp"),
     {("a", "b", ("x",))}),
    ("subscript and attribute assignment are writes",
     cells("%%step a\ndf = {}", "%%step b\ndf['c'] = 1", "%%step c\nz = df"),
     {("a", "b", ("df",)), ("b", "c", ("df",))}),
    ("a conditional write also reads the upstream value",
     cells("%%params\nflag = False", "%%step a\nx = 1", "%%step b\nif flag:\n    x = 2",
           "%%step c\ny = x"),
     {("a", "b", ("x",)), ("b", "c", ("x",))}),
    ("a name bound in one branch of an if never wires to a parallel sibling",
     cells("%%params\ngenre = 'x'", "%%step start\ndata = [1, 2]", "%%step genre_movies\ndf = list(data)\nmovies = df[::-1]",
           "%%step bonus_movie\nif genre:\n    df = data[:1]\n    bonus = df[0]\nelse:\n    bonus = None",
           "%%step join\nout = (movies, bonus)"),
     {("start", "genre_movies", ("data",)), ("start", "bonus_movie", ("data",)),
      ("genre_movies", "join", ("movies",)), ("bonus_movie", "join", ("bonus",))}),
    ("a reader of the conditional name keeps the pass-through edge (Run All's value)",
     cells("%%params\ngenre = 'x'", "%%step start\ndata = [1, 2]", "%%step genre_movies\ndf = list(data)",
           "%%step bonus_movie\nif genre:\n    df = data[:1]", "%%step join\nout = df"),
     {("start", "genre_movies", ("data",)), ("start", "bonus_movie", ("data",)),
      ("genre_movies", "bonus_movie", ("df",)), ("bonus_movie", "join", ("df",))}),
    ("a conditional write read later passes the upstream value through, along a chain",
     cells("%%params\nflag = False", "%%step a\nx = 1", "%%step b\nif flag:\n    x = 2",
           "%%step c\nif not flag:\n    x = 3", "%%step d\ny = x"),
     {("a", "b", ("x",)), ("b", "c", ("x",)), ("c", "d", ("x",))}),
    ("a maybe-unbound name with no upstream is fine",
     cells("%%step a\nfor i in range(3):\n    last = i\nprint(last)"), set()),
    ("loop variables reused by later steps are not wired",
     cells("%%step a\nfor i in range(3):\n    total = i", "%%step b\nfor i in range(2):\n    print(i)"), set()),
    ("IPython syntax in a step", cells("%%step a\n%time x = 1\n!echo hi", "%%step b\ny = x"),
     {("a", "b", ("x",))}),
    ("catch variable is a write",
     cells("%%step a\nitems = [1, 0]", "%%step f --foreach items --catch failed\nr = 1 / input",
           "%%step j\nbad = [i for i, f in zip(items, failed) if f]"),
     {("a", "f", ("items",)), ("a", "j", ("items",)), ("f", "j", ("failed",))}),
    ("prelude function reading a step-written global",
     cells("def clean():\n    return movies * 2", "%%step a\nmovies = 1", "%%step b\nz = clean()"),
     {("a", "b", ("movies",))}),
    ("prelude reads are transitive",
     cells("def clean():\n    return movies * 2\ndef outer():\n    return clean()",
           "%%step a\nmovies = 1", "%%step b\nz = outer()"),
     {("a", "b", ("movies",))}),
    ("prelude class whose method reads a step-written global",
     cells("class Model:\n    def fit(self):\n        return movies", "%%step a\nmovies = 1",
           "%%step b\nm = Model().fit()"),
     {("a", "b", ("movies",))}),
    ("a step binding the global before calling needs no edge",
     cells("def clean():\n    return movies * 2", "%%step a\nmovies = 1", "%%step b\nmovies = 3\nz = clean()"),
     set()),
]


@pytest.mark.parametrize("sources, expected", [c[1:] for c in GRAPH_CASES], ids=[c[0] for c in GRAPH_CASES])
def test_edges(sources, expected):
    assert edges_of(build_flow(sources)) == expected


def test_prelude_function_reading_a_parameter_makes_the_caller_read_it():
    graph = build_flow(cells("def scaled(v):\n    return v * alpha", "%%params\nalpha = 2", "%%step a\ny = scaled(3)"))
    assert graph.step("a").reads == ("alpha", "scaled")


def test_star_import_in_an_ordinary_cell_may_provide_any_name():
    graph = build_flow(cells("from math import *", "%%step a\ny = floor(pi)"))
    assert graph.step("a").reads == ("floor", "pi")
    assert "from math import *" in graph.prelude
    with pytest.raises(FlowDefinitionError, match="ordinary cell 2 computes"):
        build_flow(cells("from math import *", "z = floor(2.5)", "%%step a\ny = z"))


def test_reads_include_prelude_and_parameters_writes_exclude_private():
    graph = build_flow(cells(
        "import math\nK = 3\ndef f(v):\n    return v * K",
        "%%params\nalpha = 0.5",
        "%%step a\n_scratch = 2\ny = f(math.pi) * alpha + _scratch",
    ))
    step = graph.step("a")
    assert step.reads == ("alpha", "f", "math")
    assert step.writes == ("y",)
    assert graph.edges == ()


# --- foreach, join, inputs, nesting (docs/ARCHITECTURE.md) --------------------

def test_foreach_and_join():
    graph = build_flow(cells(
        "%%step start\nparams = [1, 2, 0]",
        "%%step compute --foreach params --catch compute_failed\ndiv = input\nx = 5 / div",
        "%%step join\nfailed = [d for d, f in zip(div, compute_failed) if f]\nfor i in inputs:\n    print(i.x)",
    ))
    assert edges_of(graph) == {("start", "compute", ("params",)),
                               ("compute", "join", ("compute_failed", "div", "inputs"))}
    assert "input" not in graph.step("compute").reads
    assert graph.step("compute").writes == ("compute_failed", "div", "x")
    assert graph.foreach_producer("join") == "compute"
    assert graph.foreach_producer("compute") is None
    assert graph.nested_in("compute") is None


def test_inputs_alone_is_wired_to_the_nearest_preceding_foreach_step():
    graph = build_flow(cells(
        "%%step start\nitems = [1, 2]\nother = [3]",
        "%%step f --foreach items\nv = input",
        "%%step g --foreach other\nw = input",
        "%%step j\ntotal = sum(i.w for i in inputs)",
    ))
    assert graph.producers("j") == {"inputs": "g"}
    assert graph.foreach_producer("j") == "g"


def test_inputs_follow_the_foreach_step_the_join_reads():
    graph = build_flow(cells(
        "%%step start\nitems = [1, 2]\nother = [3]",
        "%%step f --foreach items\nv = input",
        "%%step g --foreach other\nw = input",
        "%%step j\ntotal = sum(i.v for i in inputs) + len(v)",
    ))
    assert graph.producers("j") == {"inputs": "f", "v": "f"}


def test_nested_foreach():
    graph = build_flow(cells(
        "%%step start\nouter = [1, 2]",
        "%%step a --foreach outer\ninner = [input, input * 10]\ntag = str(input)",
        "%%step b --foreach inner\ny = f'{tag}:{input}'",
        "%%step j\nflat = [v for row in y for v in row]",
    ))
    assert graph.nested_in("b") == "a"
    assert graph.nested_in("a") is None
    assert graph.producers("b") == {"inner": "a", "tag": "a"}
    assert graph.foreach_producer("b") is None          # nested, not a join of a
    assert graph.foreach_producer("j") == "b"


def test_foreach_over_a_name_rebound_after_the_foreach_step():
    graph = build_flow(cells(
        "%%step a\nitems = [1]", "%%step f --foreach items\nv = input",
        "%%step b\nitems = [x + 1 for x in items]", "%%step g --foreach items\nw = input"))
    assert graph.producers("g") == {"items": "b"}


# --- parameters ---------------------------------------------------------------

PARAM_CASES = [
    ("alpha = 0.01  # Learning rate", ("alpha", 0.01, "float", "Learning rate")),
    ('genre = Parameter("genre", default="Sci-Fi", help="Filter genre")', ("genre", "Sci-Fi", "str", "Filter genre")),
    ('n = Parameter("n", default=3, type=float)', ("n", 3.0, "float", "")),
    ("n = Parameter(default=3)  # how many", ("n", 3, "int", "how many")),
    ("flag = True", ("flag", True, "bool", "")),
    ("count = -5", ("count", -5, "int", "")),
    ("cfg = {'a': [1, 2]}  # JSON", ("cfg", {"a": [1, 2]}, "json", "JSON")),
    ("pair = (1, 2)", ("pair", [1, 2], "json", "")),
    ('p = Parameter("p", help="needed")', ("p", None, "str", "needed")),
    ('cfg = metaflow.Parameter("cfg", default={}, type=JSONType)', ("cfg", {}, "json", "")),
]


@pytest.mark.parametrize("line, expected", [c for c in PARAM_CASES], ids=[c[0] for c in PARAM_CASES])
def test_parameters(line, expected):
    (param,) = build_flow(cells("%%params\n" + line)).params
    assert (param.name, param.default, param.type, param.help) == expected
    assert type(param.default) is type(expected[1])
    assert param.cell == 0


def test_params_header_may_carry_a_comment():
    assert [p.name for p in build_flow(["%%params  # the knobs\na = 1\n"]).params] == ["a"]


def test_parameters_across_cells_keep_order():
    graph = build_flow(cells("%%params\nb = 1\na = 2", "x = 1", "%%params\nc = 'z'"))
    assert [(p.name, p.cell) for p in graph.params] == [("b", 0), ("a", 0), ("c", 2)]


# --- errors -------------------------------------------------------------------

# (id, cells, step, cell, variable, line, words the message must contain)
ERROR_CASES = [
    ("name only an ordinary cell computes",
     cells("import pandas as pd\ndf = pd.DataFrame()", "%%step a\ny = df"),
     "a", 1, "df", 2, ["ordinary cell 1", "make that cell a step, or a parameter"]),
    ("name nothing defines", cells("%%step a\nx = 1\ny = nothing"),
     "a", 0, "nothing", 3, ["'nothing'", "no step above"]),
    ("name a later step writes", cells("%%step a\ny = x", "%%step b\nx = 1"),
     "a", 0, "x", 2, ["step 'b' (cell 2)", "move this step below"]),
    ("name read through a prelude function",
     cells("def clean():\n    return frame", "%%step a\nz = clean()"),
     "a", 1, "frame", 2, ["through clean()"]),
    ("private name from another step", cells("%%step a\n_x = 1", "%%step b\ny = _x"),
     "b", 1, "_x", 2, ["private"]),
    ("two steps with the same name", cells("%%step a\nx = 1", "", "%%step a\ny = 2"),
     "a", 2, None, None, ["cells 1 and 3"]),
    ("--foreach of a name no step writes", cells("%%step a --foreach items\nx = input"),
     "a", 0, "items", 1, ["--foreach items", "no step above", "items = [...]"]),
    ("--foreach of a parameter", cells("%%params\nitems = [1]", "%%step a --foreach items\nx = input"),
     "a", 1, "items", 1, ["no step above", "a parameter cannot be iterated over directly"]),
    ("--foreach of a name written below", cells("%%step a --foreach items\nx = input", "%%step b\nitems = [1]"),
     "a", 0, "items", 1, ["no step above", "step 'b' (cell 2) writes it further down"]),
    ("syntax error", cells("%%step a\nx = 1\ny = (\n"), "a", 0, None, 3, ["syntax error"]),
    ("syntax error below blank lines", ["\n%%step a\n\nx = = 1\n"], "a", 0, None, 4, ["syntax error"]),
    ("return outside a function", cells("%%step a\nreturn 1"), "a", 0, None, 2, ["syntax error"]),
    ("star import in a step", cells("%%step a\nimport os\nfrom os.path import *"),
     "a", 0, None, 3, ["import *"]),
    ("parameter written by a step", cells("%%params\nalpha = 1", "%%step a\nalpha = 2"),
     "a", 1, "alpha", None, ["parameter", "read-only"]),
    ("parameter mutated by a step", cells("%%params\ncfg = {}", "%%step a\ncfg['k'] = 2"),
     "a", 1, "cfg", None, ["parameter"]),
    ("parameter declared twice", cells("%%params\nalpha = 1", "%%params\nalpha = 2"),
     None, 1, "alpha", 2, ["declared twice"]),
    ("an ordinary cell rebinds a step's output before the reader",
     cells("%%step a\ndf = [1, None]", "df = [v for v in df if v]", "%%step b\nn = len(df)"),
     "b", 2, "df", 2, ["step 'a' (cell 1)", "ordinary cell 2 assigns it in between", "make that cell a step"]),
    ("an ordinary cell rebinds a parameter",
     cells("%%params\nalpha = 1", "alpha = alpha * 2", "%%step b\nn = alpha"),
     "b", 2, "alpha", 2, ["ordinary cell 2 assigns it in between"]),
    ("inputs without a foreach step", cells("%%step a\nx = 1", "%%step j\ny = [i.x for i in inputs]"),
     "j", 1, "inputs", None, ["join"]),
    ("ambiguous inputs", cells("%%step s\na = [1]\nb = [2]", "%%step f --foreach a\nu = input",
                               "%%step g --foreach b\nv = input", "%%step j\nz = (u, v, inputs)"),
     "j", 3, "inputs", None, ["ambiguous"]),
    # Sibling writers: the value a reader gets would depend on cell order alone (issue 16, item 1).
    ("two parallel steps write the name a join reads",
     cells("%%step start\nitems = [1, 2, 3, 4]",
           "%%step pick_even\nresult = [x for x in items if x % 2 == 0]",
           "%%step pick_odd\nresult = [x for x in items if x % 2]\nfirst_odd = result[0]",
           "%%step join\nevens = result"),
     "join", 3, "result", 2,
     ["'pick_even' (cell 2, line 2)", "'pick_odd' (cell 3, line 2)", "neither depends on the other",
      "Rename it", "--after pick_even"]),
    ("two roots write the name",
     cells("%%step a\nx = 1", "%%step b\n\nx = 2", "%%step c\ny = x"),
     "c", 2, "x", 2, ["'a' (cell 1, line 2)", "'b' (cell 2, line 3)"]),
    ("the sibling writer is further up than the nearest one",
     cells("%%step s\nd = 1", "%%step a\nx = d", "%%step b\nx = d + 1", "%%step c\nx += 1", "%%step e\ny = x"),
     "c", 3, "x", 2, ["'a' (cell 2", "'b' (cell 3"]),
    ("a conditional read of sibling writers",
     cells("%%params\nflag = True", "%%step a\nx = 1", "%%step b\nx = 2",
           "%%step c\nif flag:\n    x = 3\ny = x"),
     "c", 3, "x", 4, ["'a' (cell 2", "'b' (cell 3"]),
]


@pytest.mark.parametrize("sources, step, cell, variable, line, words",
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(sources, step, cell, variable, line, words):
    with pytest.raises(FlowDefinitionError) as info:
        build_flow(sources)
    error = info.value
    assert (error.step, error.cell, error.variable, error.line) == (step, cell, variable, line)
    for word in words:
        assert word in str(error)


# (id, cells, words each warning must contain: one list per expected warning)
WARNING_CASES = [
    ("a sibling shadows an output nobody reads",
     cells("%%step start\nitems = [1, 2]", "%%step pick_even\nresult = [x for x in items if x % 2 == 0]",
           "%%step pick_odd\nresult = [x for x in items if x % 2]"),
     [["step 'pick_even' (cell 2, line 2) writes 'result'", "no step reads", "step 'pick_odd' (cell 3)"]]),
    ("a rewrite that depends on the first writer is no warning",
     cells("%%step a\nx = 1", "%%step b\nx = x + 1"), []),
    ("an output that is read is no warning",
     cells("%%step a\nx = 1", "%%step b\ny = x", "%%step c\nx = 2"), []),
    ("loop targets are scratch names", cells("%%step a\nfor i in range(3):\n    pass",
                                             "%%step b\nfor i in range(2):\n    pass"), []),
    ("the last writer is no warning", cells("%%step a\nx = 1"), []),
]


@pytest.mark.parametrize("sources, expected", [c[1:] for c in WARNING_CASES], ids=[c[0] for c in WARNING_CASES])
def test_warnings(sources, expected):
    warnings = build_flow(sources).warnings
    assert len(warnings) == len(expected), warnings
    for warning, words in zip(warnings, expected):
        for word in words:
            assert word in warning


BAD_HEADERS = [
    ("%%step", "needs a step name"),
    ("%%step --retry 2", "needs a step name"),
    ("%%step 1abc", "invalid step name"),
    ("%%step my-step", "invalid step name"),
    ("%%step _hidden", "cannot start with '_'"),
    ("%%step class", "invalid step name"),
    ("%%step inputs", "reserved"),
    ("%%step a b", "unrecognized arguments: b"),
    ("%%step a --retries 2", "unrecognized arguments"),
    ("%%step a --retr 2", "unrecognized arguments"),  # no abbreviations
    ("%%step a --retry -1", "--retry"),
    ("%%step a --retry two", "--retry"),
    ("%%step a --timeout 0", "--timeout"),
    ("%%step a --timeout abc", "--timeout"),
    ("%%step a --timeout", "expected one argument"),
    ("%%step a --foreach 1x", "--foreach"),
    ("%%step a --catch a-b", "--catch"),
    ("%%step a --catch _private", "--catch"),
    ("%%step a --pypi ''", "--pypi"),
    ('%%step a --pypi "unclosed', "cannot read"),
    ("%%params --x", "no options"),
    ("%%stpe a", "did you mean %%step?"),
    ("%%param", "did you mean %%params?"),
]


@pytest.mark.parametrize("header, words", BAD_HEADERS, ids=[h for h, _ in BAD_HEADERS])
def test_bad_headers(header, words):
    with pytest.raises(FlowDefinitionError) as info:
        build_flow(["x = 1\n", header + "\ny = 1\n"])
    assert info.value.cell == 1
    assert info.value.line == 1
    assert words in str(info.value)


BAD_PARAMS = [
    ("x = f()", "literal"),
    ("print(1)", "%%params cell holds only"),
    ("a, b = 1, 2", "%%params cell holds only"),
    ('x = Parameter("y", default=1)', "differs"),
    ('x = Parameter("x", default=1, colour="red")', "unknown keyword 'colour'"),
    ('x = Parameter("x", default=1, type=complex)', "unsupported type"),
    ('x = Parameter("x", default="a", type=int)', "not of type int"),
    ("x = {1, 2}", "set value cannot be a parameter"),
    ("x = 1e999", "finite"),
    ("_x = 1", "reserved"),
    ("input = 1", "reserved"),
    ("x = (", "syntax error"),
]


@pytest.mark.parametrize("body, words", BAD_PARAMS, ids=[b for b, _ in BAD_PARAMS])
def test_bad_params(body, words):
    with pytest.raises(FlowDefinitionError) as info:
        build_flow(["%%params\n" + body + "\n"])
    assert (info.value.cell, info.value.line) == (0, 2)
    assert words in str(info.value)


# --- options, names, records ----------------------------------------------------

def test_options_are_parsed_into_typed_records():
    graph = build_flow(cells(
        "%%step s\nitems = [1]",
        '%%step f --retry --timeout 60 --foreach items --catch err --pypi "pandas==2.2.3  pyarrow>=15" --cache\nv = input',
        "%%step g --retry 0 --timeout 1.5 --conda 'numpy=2'\nw = 1",
    ))
    assert graph.step("f").options == StepOptions(retry=3, timeout=60.0, foreach="items", catch="err",
                                                  pypi="pandas==2.2.3 pyarrow>=15", cache=True)
    assert graph.step("f").options.as_dict() == {"retry": 3, "timeout": 60.0, "foreach": "items", "catch": "err",
                                                 "pypi": "pandas==2.2.3 pyarrow>=15", "cache": True}
    assert graph.step("g").options.as_dict() == {"timeout": 1.5, "conda": "numpy=2"}
    assert graph.step("s").options.as_dict() == {}


def test_step_record_fields():
    graph = build_flow(["", "\n%%step load\n# Load the data\n%time x = 1\n"])
    step = graph.step("load")
    assert (step.name, step.cell, step.body_line, step.doc) == ("load", 1, 3, "Load the data")
    assert step.source == "# Load the data\n%time x = 1\n"
    assert "run_line_magic" in step.code and "%time" not in step.code
    # the code keeps the body's line numbers, so tracebacks can point at the cell
    assert step.code.splitlines()[1].startswith("get_ipython().run_line_magic")


def test_docstring_is_a_description_too():
    assert build_flow(['%%step a\n"""Fit the model.\n\nMore."""\nx = 1\n']).step("a").doc == "Fit the model."


def test_flow_name_from_the_argument_or_a_flow_name_line():
    sources = cells("%load_ext flowmagic\n%flow name MovieFlow", "%%step a\nx = 1")
    assert flow_name_from_cells(sources) == "MovieFlow"
    assert build_flow(sources).name == "MovieFlow"
    assert build_flow(sources, name="Other").name == "Other"  # the caller decided
    assert build_flow(cells("%%step a\nx = 1")).name == "Flow"
    assert flow_name_from_cells(cells("%%step a\n%flow name Inside\nx = 1")) is None
    with pytest.raises(FlowDefinitionError, match="invalid flow name"):
        build_flow(["%flow name 1bad\n"])


def test_prelude_excludes_magics_and_computations():
    graph = build_flow(cells(
        "%load_ext flowmagic\n%matplotlib inline\n%flow name F",
        "import os\nN = 3\nframe = os.listdir('.')\ndef f():\n    return N",
        "x = (",  # a broken exploratory cell defines nothing
        "%%step a\ny = f()",
    ))
    assert "import os" in graph.prelude and "N = 3" in graph.prelude and "def f" in graph.prelude
    assert "listdir" not in graph.prelude and "get_ipython" not in graph.prelude
    namespace: dict = {}
    exec(graph.prelude, namespace)
    assert namespace["f"]() == 3


def test_graph_queries():
    graph = build_flow(cells(
        "%%step a\nd = 1", "%%step b\ne = d", "%%step c\nf = d", "%%step j\ng = e + f", "%%step lone\nz = 0"))
    assert graph.roots() == ["a", "lone"]
    assert graph.parents("j") == ["b", "c"]
    assert graph.children("a") == ["b", "c"]
    assert graph.downstream("a") == {"b", "c", "j"}
    assert graph.downstream("j") == set()
    assert graph.topological_order() == ["a", "b", "c", "j", "lone"]
    assert graph.producers("j") == {"e": "b", "f": "c"}
    assert graph.edges[0] == Edge("a", "b", ("d",))
    with pytest.raises(KeyError, match="steps: a, b, c, j, lone"):
        graph.step("nope")


def test_to_json_is_the_show_document():
    graph = build_flow(cells(
        "%%params\nalpha = 0.01  # Learning rate",
        "%%step start --retry 2\n# Begin\nx = alpha",
        "%%step end\ny = x"))
    document = json.loads(json.dumps(graph.to_json(), allow_nan=False))
    assert document["flow"] == "Flow"
    assert document["parameters"] == [{"name": "alpha", "default": 0.01, "type": "float", "help": "Learning rate"}]
    start = document["steps"][0]
    assert {k: start[k] for k in ("name", "cell", "reads", "writes", "options", "next")} == {
        "name": "start", "cell": 1, "reads": ["alpha"], "writes": ["x"], "options": {"retry": 2}, "next": ["end"]}
    assert document["edges"] == [{"from": "start", "to": "end", "variables": ["x"], "maybe": []}]


def test_build_flow_is_deterministic_and_pure():
    sources = cells("import os", "%%step a\nx = 1", "%%step b\ny = x")
    assert build_flow(sources) == build_flow(list(sources))


# --- the invariant: a flow run gives what Run All gives --------------------------

def run_all(sources: list[str]) -> dict[int, dict]:
    """Execute every cell top to bottom in one namespace (plain Python cells only);
    a snapshot of the namespace after each cell."""
    namespace: dict = {}
    snapshots = {}
    for index, source in enumerate(sources):
        body = source.split("\n", 1)[1] if source.lstrip().startswith("%%") else source
        exec(body, namespace)
        snapshots[index] = dict(namespace)
    return snapshots


def run_flow_sequentially(graph: FlowGraph) -> dict[str, dict]:
    """Each step in a fresh namespace: prelude, parameters, then its producers' outputs."""
    outputs: dict[str, dict] = {}
    for name in graph.topological_order():
        step = graph.step(name)
        namespace: dict = {}
        exec(graph.prelude, namespace)
        namespace.update({p.name: p.default for p in graph.params})
        namespace.update({var: outputs[src][var] for var, src in graph.producers(name).items()})
        exec(step.code, namespace)
        outputs[name] = {var: namespace[var] for var in step.writes if var in namespace}
    return outputs


def assert_same_as_run_all(sources: list[str]) -> None:
    graph = build_flow(sources)
    outputs = run_flow_sequentially(graph)
    snapshots = run_all(sources)
    for step in graph.steps:
        after = snapshots[step.cell]
        assert set(outputs[step.name]) == {var for var in step.writes if var in after}, step.name
        for var, value in outputs[step.name].items():
            assert value == after[var], (step.name, var)


INVARIANT_NOTEBOOKS = [
    cells("BASE = 10\ndef scale(v):\n    return v * factor",
          "%%params\nfactor = 3",
          "%%step a\nx = BASE\nlist = [1, 2]",
          "%%step b\nif x > 5:\n    y = scale(x)\nelse:\n    y = 0\nx = x + len(list)",
          "%%step c\nprint(x)\ntry:\n    z = y / 0\nexcept ZeroDivisionError as err:\n    z = -1\nw = [x for x in range(y)]",
          "%%step d\nx += 1\n_t = 2\ndel list\nfinal = (x, y, z, len(w))"),
    cells("def total():\n    return sum(values)",
          "%%step a\nvalues = [1, 2]",
          "%%step b\nflag = True\nif flag:\n    values = values + [3]",
          "%%step c\nt = total()\nfor i in range(t):\n    last = i"),
]


@pytest.mark.parametrize("sources", INVARIANT_NOTEBOOKS)
def test_flow_run_matches_run_all(sources):
    assert_same_as_run_all(sources)


def random_notebook(seed: int) -> list[str]:
    """Steps that read earlier variables and (re)write a few, through many
    syntax forms, some conditionally; a prelude function reads a step global."""
    rng = random.Random(seed)
    variables = [f"v{i}" for i in range(6)]
    sources = ["%%params\np0 = 1", "K = 3\ndef twice():\n    return 2 * v0 + K"]
    forms = ["plain", "cond", "aug", "loop", "func", "comp", "lambda", "try", "walrus", "prelude", "del"]
    for number in range(12):
        lines = []
        readable = [v for v in variables if any(f"{v} =" in s for s in sources[2:])] + ["p0"]
        for target in rng.sample(variables, rng.randint(1, 3)):
            expr = " + ".join(rng.sample(readable, min(len(readable), rng.randint(1, 3)))) + f" + {number}"
            form = rng.choice(forms)
            known = target in readable
            if known and target not in expr.split(" + "):
                expr = f"{target} + {expr}"  # a rewrite follows the last writer: never a sibling writer
            if form == "cond" and known:
                lines.append(f"if ({expr}) % 2:\n    {target} = {expr}")
            elif form == "aug" and known:
                lines.append(f"{target} += {expr}")
            elif form == "loop":
                lines.append(f"for _k in range(2):\n    {target} = {expr} + _k")
            elif form == "func":
                lines.append(f"def _f():\n    return {expr}\n{target} = _f()")
            elif form == "comp":
                lines.append(f"{target} = [{expr} + _j for _j in range(2)][-1]")
            elif form == "lambda":
                lines.append(f"{target} = (lambda _a=1: {expr} + _a)()")
            elif form == "try" and known:
                lines.append(f"try:\n    {target} = ({expr}) // (number_{number} := {number % 2})\n"
                             f"except ZeroDivisionError:\n    pass")
            elif form == "walrus":
                lines.append(f"{target} = (_w := {expr}) + _w")
            elif form == "prelude" and "v0" in readable:
                lines.append(f"{target} = twice() + {expr}")
            elif form == "del":
                lines.append(f"_t = {expr}\n{target} = _t\ndel _t")
            else:
                lines.append(f"{target} = {expr}")
            readable.append(target)
        sources.append(f"%%step s{number}\n" + "\n".join(lines) + "\n")
    return sources


@pytest.mark.parametrize("seed", range(60))
def test_random_notebooks_match_run_all(seed):
    assert_same_as_run_all(random_notebook(seed))


# --- details --------------------------------------------------------------------

def test_input_and_inputs_are_never_artifacts():
    graph = build_flow(cells(
        "%%step s\nitems = [1, 2]",
        "%%step f --foreach items\nv = input",
        "%%step j\nfor input in inputs:\n    print(input.v)\nagain = list(items)",
        "%%step g --foreach again\nw = input",
    ))
    assert graph.step("j").writes == ("again",)
    assert "input" not in graph.producers("g")
    assert graph.producers("g") == {"again": "j"}


def test_ordinary_cells_rebinding_outside_the_producer_reader_span_are_fine():
    graph = build_flow(cells("df = make()", "%%step a\ndf = [1]", "%%step b\nn = len(df)", "df = df * 2"))
    assert graph.producers("b") == {"df": "a"}


def test_other_cell_magics_make_ordinary_cells():
    graph = build_flow(["%%time\nimport os\n", "%%capture\nx = 1\n", "%%step a\ny = 1\n"])
    assert [s.name for s in graph.steps] == ["a"]
    assert graph.prelude == ""


def test_step_header_may_end_with_a_comment():
    graph = build_flow(["%%step a --retry 1  # flaky network\nx = 1\n"])
    assert graph.step("a").options.retry == 1


def test_unknown_name_suggests_a_close_one():
    with pytest.raises(FlowDefinitionError, match="did you mean 'movies'"):
        build_flow(cells("%%step a\nmovies = 1", "%%step b\ny = movie"))


def test_a_name_a_later_ordinary_cell_computes_is_not_prelude():
    with pytest.raises(FlowDefinitionError, match="ordinary cell 2 computes"):
        build_flow(cells("def f():\n    return 1", "f = make_f()", "%%step a\ny = f()"))
    graph = build_flow(cells("f = make_f()", "def f():\n    return 1", "%%step a\ny = f()"))
    assert graph.step("a").reads == ("f",)


def test_dag_imports_and_builds_plain_python_without_ipython():
    import subprocess
    import sys
    code = ("import sys\nimport flowmagic.flow.graph as d\nassert 'IPython' not in sys.modules\n"
            "d.build_flow(['import os', '%%step a\\nx = 1', '%%step b\\ny = x'])\n"
            "assert 'IPython' not in sys.modules, 'plain Python needs no transformer'\n"
            "d.build_flow(['%%step a\\n!echo hi\\nx = 1'])\nassert 'IPython' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


# --- ordering without data (--after) ----------------------------------------------

AFTER_CASES = [
    ("an ordering edge has no variables",
     cells("%%step start\nprint('hi')", "%%step hello\nprint('hello')", "%%step end --after hello\npass"),
     {("hello", "end", ())}),
    ("--after is repeatable",
     cells("%%step a\nx = 1", "%%step b\ny = 2", "%%step c --after a --after b\nprint('c')"),
     {("a", "c", ()), ("b", "c", ())}),
    ("--after a step that is also a producer adds no second edge",
     cells("%%step a\nx = 1", "%%step b --after a\ny = x"),
     {("a", "b", ("x",))}),
    ("--after orders sibling writers: the nearest one wins",
     cells("%%step a\nx = 1", "%%step b --after a\nx = 2", "%%step c\ny = x"),
     {("a", "b", ()), ("b", "c", ("x",))}),
]


@pytest.mark.parametrize("sources, expected", [c[1:] for c in AFTER_CASES], ids=[c[0] for c in AFTER_CASES])
def test_after(sources, expected):
    graph = build_flow(sources)
    assert edges_of(graph) == expected


def test_after_shows_in_json_and_orders_steps():
    graph = build_flow(cells("%%step start\nprint(1)", "%%step hello --after start\nprint(2)",
                             "%%step end --after hello\nprint(3)"))
    doc = graph.to_json()
    assert {"from": "start", "to": "hello", "variables": [], "maybe": []} in doc["edges"]
    assert doc["steps"][2]["options"] == {"after": ["hello"]}
    assert graph.parents("end") == ["hello"] and graph.roots() == ["start"]
    assert graph.warnings == ()


AFTER_ERRORS = [
    ("--after a later step", cells("%%step a --after b\nx = 1", "%%step b\ny = 2"),
     "a", 0, 1, ["--after b", "step 'b' (cell 2) is further down", "move this step below"]),
    ("--after an unknown step", cells("%%step train\nx = 1", "%%step end --after trian\npass"),
     "end", 1, 1, ["--after trian", "no step is named 'trian'", "did you mean 'train'"]),
    ("--after itself", cells("%%step a --after a\nx = 1"), "a", 0, 1, ["names the step itself"]),
    ("--after a bad name", cells("%%step a --after 1x\nx = 1"), "a", 0, 1, ["'1x' is not a step name"]),
]


@pytest.mark.parametrize("sources, step, cell, line, words", [c[1:] for c in AFTER_ERRORS],
                         ids=[c[0] for c in AFTER_ERRORS])
def test_after_errors(sources, step, cell, line, words):
    with pytest.raises(FlowDefinitionError) as info:
        build_flow(sources)
    assert (info.value.step, info.value.cell, info.value.line) == (step, cell, line)
    for word in words:
        assert word in str(info.value)


def test_steps_that_share_no_data_are_warned_about():
    graph = build_flow(cells("%%step start\nprint(1)", "%%step hello\nprint(2)", "%%step end\npass"))
    (warning,) = graph.warnings
    assert "'start' (cell 1), 'hello' (cell 2), 'end' (cell 3) share no data" in warning
    assert "--after" in warning
    linked = build_flow(cells("%%step a\nx = 1", "%%step b\ny = x"))
    assert linked.warnings == ()


def test_show_explains_an_edge_kept_for_a_name_bound_only_in_some_branches():
    graph = build_flow(["%%step start\nflag = True", "%%step mid\ny = 0",
                        "%%step b\nif flag:\n    y = 5\nprint(y)\nz = 1"], name="Maybe")
    edges = graph.to_json()["edges"]
    assert {"from": "mid", "to": "b", "variables": ["y"], "maybe": ["y"]} in edges
    assert {"from": "start", "to": "b", "variables": ["flag"], "maybe": []} in edges
    shown = render_show(graph)
    assert "(b binds y only in some branches: where it does not, it reads mid's, so it runs after mid)" in shown
