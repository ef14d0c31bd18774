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
