"""Resume clones the finished tasks of a partly done foreach (as Metaflow
does) and runs only the rest: after a failing task, and after the
orchestrator was SIGKILLed mid-foreach. The join sees all 20 in order, and
the artifacts equal a clean run's."""
from __future__ import annotations

import re
import time

import pytest

from runtime_helpers import (artifacts, flowmagic, flowmagic_json, reaped, sigkill, start_flowmagic, tasks,
                             write_notebook)

pytestmark = pytest.mark.slow   # real foreach runs that fail or are killed, then resumed: not in the quick loop

N = 20


def _notebook(tmp_path, flag):
    # Task 13 fails, and tasks from 10 on wait, until the flag file exists.
    return write_notebook(tmp_path / "partial.ipynb", [
        "import os, time",
        f"%%params\nflag = {str(flag)!r}  # the file that fixes the flow\nwait = 0  # tasks >= 10 wait for the flag",
        f"%%step start\nitems = list(range({N}))",
        "%%step work --foreach items\n"
        "if wait and input >= 10:\n    while not os.path.exists(flag):\n        time.sleep(0.05)\n"
        "if input == 13 and not os.path.exists(flag):\n    raise ValueError('task 13 is broken')\n"
        "square = input * input\nprint('ran', input)",
        "%%step join\nsquares = [t.square for t in inputs]",
        "%%step end\ntotal = sum(squares)",
    ])


def _clean_run(tmp_path, nb, store, flag):
    flag.touch()
    doc = flowmagic_json("run", nb, "--flag", str(flag), store=store)
    return artifacts(store, "Partial", doc["run_id"], "join"), artifacts(store, "Partial", doc["run_id"], "end")


def _cloned_in_summary(stdout: str) -> int:
    found = re.search(r"(\d+) cloned", stdout)
    assert found, stdout
    return int(found.group(1))


def test_resume_after_a_failed_foreach_task_clones_the_finished_ones(tmp_path):
    store, flag = tmp_path / "store", tmp_path / "fixed"
    nb = _notebook(tmp_path, flag)
    first = flowmagic("run", nb, "--max-workers", "2", store=store)
    assert first.returncode == 1 and "task 13 is broken" in first.stdout
    finished = [t for t in tasks(store, "Partial", 1, "work") if t.state == "done"]
    assert 13 <= len(finished) < N

    flag.touch()
    resumed = flowmagic("resume", nb, store=store)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    work = tasks(store, "Partial", 2, "work")
    assert [t.index for t in work] == [(i,) for i in range(N)]
    cloned = [t for t in work if t.state == "cloned"]
    assert sorted(t.origin_task_id for t in cloned) == sorted(t.task_id for t in finished)
    assert _cloned_in_summary(resumed.stdout) == len(finished) + 1  # and start
    assert resumed.stdout.count("ran ") == N - len(finished)        # only the rest executed

    join, end = _clean_run(tmp_path, nb, store, flag)
    assert artifacts(store, "Partial", 2, "join") == join
    assert artifacts(store, "Partial", 2, "end") == end == [{"total": sum(i * i for i in range(N))}]


def test_resume_after_the_orchestrator_died_mid_foreach_clones_the_finished_ones(tmp_path):
    store, flag = tmp_path / "store", tmp_path / "fixed"
    nb = _notebook(tmp_path, flag)
    proc = start_flowmagic("run", nb, "--wait", "1", "--max-workers", "2", store=store)
    with reaped(proc):
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            work = tasks(store, "Partial", 1, "work") if (store / "metadata.sqlite").exists() else []
            if sum(t.state == "done" for t in work) == 10:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("the first 10 tasks never finished")
        sigkill(proc)
    states = [t.state for t in tasks(store, "Partial", 1, "work")]
    assert states.count("done") == 10 and "crashed" in states

    flag.touch()
    resumed = flowmagic("resume", nb, store=store)   # the crashed run, with --wait 1
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    work = tasks(store, "Partial", 2, "work")
    assert [t.state for t in work] == ["cloned"] * 10 + ["done"] * (N - 10)
    assert _cloned_in_summary(resumed.stdout) == 11

    join, end = _clean_run(tmp_path, nb, store, flag)
    assert artifacts(store, "Partial", 2, "join") == join
    assert artifacts(store, "Partial", 2, "end") == end
