"""Flows ported from Metaflow behave as a Metaflow user expects (issue 16), end
to end through the real `flowmagic` console command."""
from __future__ import annotations

from pathlib import Path

import pytest

from runtime_helpers import artifacts, flowmagic, flowmagic_json, write_notebook


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


# --- sibling writers (item 1) ------------------------------------------------------

SIBLINGS = [
    "%%step start\nitems = [1, 2, 3, 4]",
    "%%step pick_even\nresult = [x for x in items if x % 2 == 0]",
    "%%step pick_odd\nresult = [x for x in items if x % 2]\nfirst_odd = result[0]",
    "%%step join\nevens = result",
]


@pytest.mark.parametrize("command", ["run", "show"])
def test_sibling_writers_are_refused_and_nothing_is_recorded(tmp_path, store, command):
    nb = write_notebook(tmp_path / "siblings.ipynb", SIBLINGS)
    proc = flowmagic(command, nb, store=store)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    message = proc.stderr.strip()
    assert len(message.splitlines()) == 1, message
    for words in ("step 'join'", "'result'", "'pick_even' (cell 1, line 2)", "'pick_odd' (cell 2, line 2)",
                  "Rename it", "--after pick_even"):
        assert words in message
    assert flowmagic_json("status", nb, store=store)["runs"] == []


def test_show_warns_about_an_output_a_sibling_shadows(tmp_path, store):
    nb = write_notebook(tmp_path / "shadow.ipynb", SIBLINGS[:3] + ["%%step join\nodd = first_odd"])
    proc = flowmagic("show", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    assert "warning: step 'pick_even' (cell 1, line 2) writes 'result', which no step reads" in proc.stdout
    assert flowmagic_json("run", nb, store=store)["status"] == "succeeded"
    assert artifacts(store, "Shadow", 1, "join")[0]["odd"] == 1


# --- ordering without data (item 2) ----------------------------------------------

# Metaflow's HelloFlow (tutorials/00-helloworld/helloworld.py), ported.
HELLO = [
    "%%step start\n# This is the 'start' step.\nimport time\ntime.sleep(0.5)\nprint('HelloFlow is starting.')",
    "%%step hello --after start\n# A step for metaflow to introduce itself.\nprint('Metaflow says: Hi!')",
    "%%step end --after hello\n# This is the 'end' step.\nprint('HelloFlow is all done.')",
]


def test_hello_flow_with_after_runs_start_hello_end_in_order(tmp_path, store):
    nb = write_notebook(tmp_path / "hello_flow.ipynb", HELLO)
    shown = flowmagic_json("show", nb, store=store)
    assert [(e["from"], e["to"], e["variables"]) for e in shown["edges"]] == \
        [("start", "hello", []), ("hello", "end", [])]
    assert "warning" not in flowmagic("show", nb, store=store).stdout
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    said = [proc.stdout.index(w) for w in ("HelloFlow is starting.", "Metaflow says: Hi!", "HelloFlow is all done.")]
    assert said == sorted(said), proc.stdout


def test_hello_flow_without_after_is_warned_about(tmp_path, store):
    unordered = [c.replace(" --after start", "").replace(" --after hello", "") for c in HELLO]
    nb = write_notebook(tmp_path / "hello_flow.ipynb", unordered)
    proc = flowmagic("show", nb, store=store)
    assert proc.returncode == 0
    assert "share no data with any other step" in proc.stdout and "--after" in proc.stdout
