"""What counts as an edit of a prelude name, which names a step uses, and the
marker's bundle (pure; the kernel side is tests/test_staleness_kernel.py)."""
from __future__ import annotations

from flowmagic.flow.graph import build_flow, prelude_definitions
from flowmagic.magics.markers import MIME, bundle
from flowmagic.magics.session import SessionRun
from flowmagic.magics.staleness import inputs_of

PRELUDE = "import math\nK = 2\ndef scale(x):\n    return x * K\ndef other():\n    return 1"
STEPS = ["%%params\nalpha = 1", "%%step start\nrows = [scale(i) for i in range(3)]",
         "%%step total\nn = sum(rows) * alpha + math.pi"]


def graph(prelude: str = PRELUDE, params: str = STEPS[0]):
    return build_flow([prelude, params, *STEPS[1:]], name="F")


def test_a_step_uses_the_prelude_names_it_reads_and_what_its_defs_read():
    g = graph()
    assert sorted(prelude_definitions(g, "start")) == ["K", "scale"]
    assert sorted(prelude_definitions(g, "total")) == ["math"]
    assert prelude_definitions(g, "start")["K"].cell == 0
    again = build_flow([PRELUDE, *STEPS, "K = 3"], name="F")   # defined above and again below
    assert again.prelude_defs["K"].cells == (0, 4) and again.prelude_defs["K"].cell == 4


def test_whitespace_and_comments_are_not_edits_a_changed_value_is():
    before = inputs_of(graph(), "start")
    reformatted = PRELUDE.replace("return x * K", "# the scale\n    return x*K")
    assert inputs_of(graph(reformatted), "start") == before
    assert inputs_of(graph(PRELUDE.replace("K = 2", "K = 3")), "start") != before
    assert inputs_of(graph(PRELUDE.replace("return 1", "return 2")), "start") == before   # unused def


def test_a_parameter_value_is_an_input_of_the_steps_reading_it():
    assert inputs_of(graph(), "total")["param:alpha"] == "1"
    assert inputs_of(graph(params="%%params\nalpha = 2"), "total")["param:alpha"] == "2"
    assert "param:alpha" not in inputs_of(graph(), "start")


def test_the_marker_is_empty_while_fresh_and_says_why_when_stale():
    assert bundle(None) == {MIME: {}}
    stale = bundle("it used the previous 'x' from cell 3")
    assert stale["text/plain"] == "stale: re-run this cell (it used the previous 'x' from cell 3)"
    assert "&#x27;x&#x27;" in stale["text/html"] and stale[MIME]["stale"] is True


def test_stale_because_follows_the_steps_state():
    g = graph()
    session = SessionRun(flow="F", root=None)  # type: ignore[arg-type]
    session.record(g, "start", "done")
    session.record(g, "total", "done")
    assert session.stale_because("total") is None
    assert session.mark_stale("total", "it used the previous 'alpha' from cell 2")
    assert session.stale_because("total") == "it used the previous 'alpha' from cell 2"
    session.record(g, "total", "done")
    assert session.stale_because("total") is None
    assert not session.mark_stale("missing", "never ran")


def test_messages_name_cells_by_their_saved_number_and_in_n():
    import pytest

    from flowmagic.errors import FlowDefinitionError
    from flowmagic.magics.session import KernelFlowDefinition

    d = KernelFlowDefinition()
    # cell ids and their numbers in the saved notebook (a markdown cell at 2, another at 5)
    d.sync_saved([("a", "%load_ext flowmagic"), ("p1", "%%params\nx = 1"), ("s", "%%step start\ny = x"),
                  ("p2", "%%params\nx = 2")], 0, [1, 3, 4, 6])
    d.record("%%params\nx = 1", cell_id="p1", execution_count=2)
    assert d.step_cell("start").label() == "the cell '%%step start' (cell 4, saved, not executed in this kernel yet)"
    d.record("%%params\nx = 2", cell_id="p2", execution_count=3)
    with pytest.raises(FlowDefinitionError) as raised:
        d.build("F")
    assert str(raised.value) == ("the '%%params' cell (cell 6, In [3]), line 2: parameter 'x' is declared twice "
                                 "(the '%%params' cell (cell 3, In [2]) and the '%%params' cell (cell 6, In [3]))")
    d.record("q = 1", cell_id="new", execution_count=4)    # not saved yet: In [n] only
    assert d.cells[-1].label() == "the cell 'q = 1' (In [4])"
