"""End to end: the real `flowmagic` console command on notebooks written to disk."""
from __future__ import annotations

import json
import shutil
import signal
import time
from pathlib import Path

import pytest

from runtime_helpers import (
    artifacts, attempts, flowmagic, flowmagic_json, run_record, start_flowmagic, tasks, write_notebook,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "example_notebooks"


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def test_hello_flow_runs_and_exit_status_is_zero(tmp_path, store):
    nb = write_notebook(tmp_path / "hello_flow.ipynb", [
        "%load_ext flowmagic",
        "md:# Hello",
        "%%step start\nx = 1",
        "%%step end\nx += 1\nprint('x is', x)",
    ])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stderr
    assert "[end/" in proc.stdout and "x is 2" in proc.stdout
    assert "HelloFlow/1 succeeded" in proc.stdout
    assert artifacts(store, "HelloFlow", 1, "end") == [{"x": 2}]
    assert artifacts(store, "HelloFlow", 1, "start") == [{"x": 1}]
    assert run_record(store, "HelloFlow", 1).status == "succeeded"


PARAMS_NB = [
    "%%params\nalpha = 0.01  # Learning rate\ncount = 3  # How many\nname = 'x'  # A label",
    "%%step start\nprint('alpha is %f' % alpha)\nvalues = [alpha] * count",
    "%%step end\nlabel = f'{name}:{sum(values)}'",
]


@pytest.mark.slow
def test_parameters_defaults_overrides_and_help(tmp_path, store):
    nb = write_notebook(tmp_path / "params.ipynb", PARAMS_NB)
    doc = flowmagic_json("run", nb, store=store)
    assert doc == {"flow": "Params", "run_id": 1, "status": "succeeded", "origin_run_id": None}
    assert artifacts(store, "Params", 1, "end")[0]["label"] == "x:0.03"
    doc = flowmagic_json("run", nb, "--alpha", "0.5", "--count", "2", "--name", "y", store=store)
    assert doc["run_id"] == 2
    assert artifacts(store, "Params", 2, "end")[0]["label"] == "y:1.0"
    assert run_record(store, "Params", 2).params == {"alpha": 0.5, "count": 2, "name": "y"}

    help_ = flowmagic("run", nb, "--help", store=store)
    assert help_.returncode == 0
    assert "--alpha" in help_.stdout and "Learning rate" in help_.stdout and "0.01" in help_.stdout
    assert "--count" in help_.stdout and "int" in help_.stdout

    bad = flowmagic("run", nb, "--count", "many", store=store)
    assert bad.returncode == 2 and "count" in bad.stderr and "many" in bad.stderr
    unknown = flowmagic("run", nb, "--beta", "1", store=store)
    assert unknown.returncode == 2 and "--beta" in unknown.stderr


@pytest.mark.slow
def test_parameter_flow_fails_then_resume_with_fixed_cell_clones_and_succeeds(tmp_path, store):
    cells = [
        "%load_ext flowmagic",
        "%%params\nalpha = 0.01  # Learning rate",
        "%%step start\nprint('alpha is %f' % alpha)\nseen = alpha * 2",
        "%%step end\nresult = seen / 0\nprint('alpha is still %f' % result)",
    ]
    nb = write_notebook(tmp_path / "parameter_flow.ipynb", cells)
    proc = flowmagic("run", nb, "--alpha", "0.5", store=store)
    assert proc.returncode == 1
    assert "ZeroDivisionError" in proc.stdout and "flowmagic resume" in proc.stdout
    assert run_record(store, "ParameterFlow", 1).status == "failed"
    [failed] = tasks(store, "ParameterFlow", 1, "end")
    assert failed.state == "failed"
    assert attempts(store, failed.task_id)[-1].exception["type"] == "ZeroDivisionError"

    cells[3] = "%%step end\nresult = seen / 2\nprint('alpha is still %f' % result)"
    write_notebook(nb, cells)
    doc = flowmagic_json("resume", nb, store=store)
    assert doc == {"flow": "ParameterFlow", "run_id": 2, "status": "succeeded", "origin_run_id": 1}
    [start] = tasks(store, "ParameterFlow", 2, "start")
    assert start.state == "cloned"
    [origin_start] = tasks(store, "ParameterFlow", 1, "start")
    assert start.origin_task_id == origin_start.task_id
    assert artifacts(store, "ParameterFlow", 2, "end") == [{"result": 0.5}]
    assert run_record(store, "ParameterFlow", 2).params == {"alpha": 0.5}  # the origin's parameters

    doc = flowmagic_json("resume", nb, "2", "--from", "start", store=store)
    assert doc["origin_run_id"] == 2 and doc["status"] == "succeeded"
    assert [t.state for t in tasks(store, "ParameterFlow", 3)] == ["done", "done"]


def test_retry_keeps_every_attempt_and_only_the_last_artifacts(tmp_path, store):
    counter = tmp_path / "count.txt"
    nb = write_notebook(tmp_path / "retry_flow.ipynb", [
        f"from pathlib import Path\nCOUNTER_FILE = {str(counter)!r}",
        "%%step start --retry 3\n"
        "_counter = Path(COUNTER_FILE)\n"
        "_n = int(_counter.read_text()) + 1 if _counter.exists() else 1\n"
        "_counter.write_text(str(_n))\n"
        "attempt_seen = _n\n"
        "print('attempt', _n)\n"
        "if _n < 3:\n    raise RuntimeError(f'bad luck {_n}')",
        "%%step end\nfinal = attempt_seen",
    ])
    doc = flowmagic_json("run", nb, store=store)
    assert doc["status"] == "succeeded"
    [start] = tasks(store, "RetryFlow", 1, "start")
    history = attempts(store, start.task_id)
    assert [a.outcome for a in history] == ["failed", "failed", "ok"]
    assert [a.stdout for a in history] == ["attempt 1\n", "attempt 2\n", "attempt 3\n"]
    assert history[0].exception["message"] == "bad luck 1"
    assert artifacts(store, "RetryFlow", 1, "start") == [{"attempt_seen": 3}]
    assert artifacts(store, "RetryFlow", 1, "end") == [{"final": 3}]


@pytest.mark.parametrize("crash, outcome, detail", [
    ("import ctypes\nctypes.string_at(0)", "killed", "SIGSEGV"),
    ("import os\nos._exit(3)", "failed", "status 3"),
])
def test_crashing_steps_are_retried_and_reported(tmp_path, store, crash, outcome, detail):
    nb = write_notebook(tmp_path / "crash.ipynb", [
        "%%step start\nitems = [1, 2]",
        f"%%step boom --retry 1\nprint('about to crash', flush=True)\n{crash}\ny = 1",
    ])
    proc = flowmagic("run", nb, "--json", store=store)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"
    assert detail in proc.stderr
    [boom] = tasks(store, "Crash", 1, "boom")
    history = attempts(store, boom.task_id)
    assert [a.outcome for a in history] == [outcome, outcome]
    assert all("about to crash" in a.stdout for a in history)
    assert boom.state == "failed"
    assert artifacts(store, "Crash", 1, "start") == [{"items": [1, 2]}]


def test_catch_with_foreach_and_join_as_the_tutorials_catch_flow(tmp_path, store):
    nb = shutil.copy(EXAMPLES / "catch_flow.ipynb", tmp_path / "catch_flow.ipynb")
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "compute failed for parameter: 0" in proc.stdout
    compute = artifacts(store, "CatchFlow", 1, "compute")
    assert [c["div"] for c in compute] == [0, 1, 2]
    assert [c["x"] for c in compute] == [None, 5.0, 2.5]
    assert compute[0]["compute_failed"]["type"] == "ZeroDivisionError"
    assert compute[1]["compute_failed"] is None and compute[2]["compute_failed"] is None
    assert [t.state for t in tasks(store, "CatchFlow", 1, "compute")] == ["caught", "done", "done"]
    assert artifacts(store, "CatchFlow", 1, "join")[0]["failed"] == [0]


def test_tasks_a_failure_stopped_are_cancelled_and_say_why(tmp_path, store):
    # one worker: describe/0 fails at once while its siblings and fit's tasks wait for the worker
    nb = write_notebook(tmp_path / "cancel_flow.ipynb", [
        "%%step start\nitems = [0, 1, 2]",
        "%%step describe --foreach items\nif input == 0:\n    raise ValueError('no data for 0')\nd = input",
        "%%step fit --foreach items\nf = input",
        "%%step end\nn = len(d) + len(f)",
    ])
    proc = flowmagic("run", nb, "--max-workers", "1", store=store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[describe/0] failed: ValueError: no data for 0" in proc.stdout
    assert "[describe/1] cancelled: the run stopped because describe failed" in proc.stdout
    assert "[fit/1] cancelled: the run stopped because describe failed" in proc.stdout
    assert "failed: error" not in proc.stdout
    assert [t.state for t in tasks(store, "CancelFlow", 1, "describe")] == ["failed", "cancelled", "cancelled"]
    assert [t.state for t in tasks(store, "CancelFlow", 1, "fit")] == ["cancelled"] * 3
    assert run_record(store, "CancelFlow", 1).status == "failed"

    from flowmagic.client import Metaflow

    [flow] = Metaflow(root=store).flows
    run = flow["1"]
    fit = run["fit"].tasks()
    assert all(t.finished and not t.successful for t in fit)
    assert not run.successful and run.finished


def test_engine_client_widgets_and_report_agree_a_caught_task_is_successful(tmp_path, store):
    nb = shutil.copy(EXAMPLES / "catch_flow.ipynb", tmp_path / "catch_flow.ipynb")
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr                    # the engine: the run succeeds
    assert "[compute/0] caught ZeroDivisionError" in proc.stdout
    assert "Step compute done" in proc.stdout and "CatchFlow/1 succeeded" in proc.stdout   # the report

    from flowmagic.client import Metaflow
    from flowmagic.store import open_store
    from flowmagic.widgets.live import _outcome, states_from_tasks

    [flow] = Metaflow(root=store).flows
    run = flow["1"]
    caught = run["compute"].tasks()[0]
    assert caught.state == "caught" and caught.successful and run.successful   # the Client
    states = states_from_tasks(open_store(store).meta.tasks("CatchFlow", 1))
    assert states["compute"]["state"] == "caught" and _outcome(states["compute"]["state"]) == "ok"  # widgets
    assert _outcome(caught.state) == "ok"


def test_a_caught_task_prints_one_line_and_the_summary_counts_caught_tasks(tmp_path, store):
    nb = write_notebook(tmp_path / "caught.ipynb", [
        "%%step start\ndegrees = [1, 2, 3, 4]",
        "%%step fit --foreach degrees --catch fit_error\n"
        "print('fitting', input)\n"
        "if input % 2:\n    raise ValueError(f'bad degree {input}')\nmodel = input",
        "%%step report\nerrors = [e is not None for e in fit_error]",
    ])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert "[fit/0] caught ValueError: bad degree 1 -> fit_error" in lines
    assert "[fit/2] caught ValueError: bad degree 3 -> fit_error" in lines
    assert not any(line.startswith(("[fit/1] caught", "[fit/3] caught")) for line in lines)
    # the task's own output comes first, then its caught line
    assert lines.index("[fit/0] fitting 1") < lines.index("[fit/0] caught ValueError: bad degree 1 -> fit_error")
    [summary] = [line for line in lines if line.startswith("Run Caught/1 succeeded in")]
    assert summary.endswith("(6 tasks run, 0 cloned, 2 caught)")
    assert artifacts(store, "Caught", 1, "report")[0]["errors"] == [True, False, True, False]


def test_the_summary_says_nothing_of_caught_tasks_when_none_was(tmp_path, store):
    nb = write_notebook(tmp_path / "fine.ipynb", ["%%step start --catch oops\nx = 1"])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "caught" not in proc.stdout


def test_foreach_nested_and_empty(tmp_path, store):
    nb = write_notebook(tmp_path / "nested.ipynb", [
        "%%step start\nouter = [1, 2]\nnothing = []",
        "%%step rows --foreach outer\nrow = input\ncols = [row * 10 + k for k in range(row)]",
        "%%step cells --foreach cols\ncell = (row, input)",
        "%%step join\ngrid = cell\nrow_list = row",
        "%%step skip --foreach nothing\nz = input * 2",
        "%%step after\nzs = z\nsizes = [len(inputs)]",
    ])
    doc = flowmagic_json("run", nb, store=store)
    assert doc["status"] == "succeeded"
    assert [t.index for t in tasks(store, "Nested", 1, "cells")] == [(0, 0), (1, 0), (1, 1)]
    [join] = artifacts(store, "Nested", 1, "join")
    assert join["grid"] == [[(1, 10)], [(2, 20), (2, 21)]]
    assert join["row_list"] == [1, 2]
    assert tasks(store, "Nested", 1, "skip") == []
    assert artifacts(store, "Nested", 1, "after") == [{"zs": [], "sizes": [0]}]


def test_timeout_kills_the_step_and_its_child_ignoring_sigterm(tmp_path, store):
    pidfile = tmp_path / "pids.txt"
    nb = write_notebook(tmp_path / "timeout_flow.ipynb", [
        "%%step start --timeout 2\n"
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
        "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)'])\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}')\n"
        "for i in range(100):\n    print(i, flush=True)\n    time.sleep(1)",
        "%%step end\ndone = True",
    ])
    started = time.monotonic()
    proc = flowmagic("run", nb, store=store)
    elapsed = time.monotonic() - started
    assert proc.returncode == 1
    assert "timeout of 2 s" in proc.stdout
    task_pid, child_pid = map(int, pidfile.read_text().split())
    from runtime_helpers import wait_gone

    assert wait_gone([task_pid, child_pid], 0.5) == []
    assert elapsed < 2 + 5 + 10  # command start-up included; the kill itself is within the grace
    [start] = tasks(store, "TimeoutFlow", 1, "start")
    [attempt] = attempts(store, start.task_id)
    assert attempt.outcome == "timeout"
    assert attempt.finished_at - attempt.started_at < 2 + 5
    assert "0\n1\n" in attempt.stdout


def test_ctrl_c_interrupts_the_run_and_leaves_no_process(tmp_path, store):
    from runtime_helpers import descendants, wait_gone

    nb = write_notebook(tmp_path / "slow.ipynb", [
        "%%step start\nitems = list(range(4))",
        "%%step work --foreach items\nimport time\nprint('working', input, flush=True)\ntime.sleep(120)\nr = input",
    ])
    proc = start_flowmagic("run", nb, "--max-workers", "2", store=store)
    for line in proc.stdout:
        if "working" in line:
            break
    time.sleep(0.3)
    family = [p.pid for p in descendants(proc.pid)]
    assert len(family) >= 3  # the fork server and two tasks
    interrupted_at = time.monotonic()
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=30)[0]
    assert time.monotonic() - interrupted_at < 4
    assert proc.returncode == 1, rest
    assert "interrupted" in rest
    assert wait_gone(family, 2) == []
    assert run_record(store, "Slow", 1).status == "interrupted"
    states = {t.state for t in tasks(store, "Slow", 1, "work")}
    assert states == {"interrupted"}


def test_killing_the_orchestrator_leaves_no_task_behind(tmp_path, store):
    from runtime_helpers import descendants, wait_gone

    nb = write_notebook(tmp_path / "slow.ipynb", [
        "%%step start\nitems = list(range(2))",
        "%%step work --foreach items\nimport time\nprint('working', flush=True)\ntime.sleep(120)",
    ])
    proc = start_flowmagic("run", nb, store=store)
    for line in proc.stdout:
        if "working" in line:
            break
    family = [p.pid for p in descendants(proc.pid)]
    assert family
    proc.kill()
    proc.wait()
    assert wait_gone(family, 5) == []


def test_two_runs_at_the_same_time_get_distinct_ids(tmp_path, store):
    nb = write_notebook(tmp_path / "twice.ipynb", [
        "%%step start\nimport time\ntime.sleep(1)\nitems = [1, 2, 3]",
        "%%step each --foreach items\nsq = input * input",
        "%%step end\ntotal = sum(sq)",
    ])
    procs = [start_flowmagic("run", nb, "--json", store=store) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ids = sorted(json.loads(o[o.index("{"):])["run_id"] for o in outputs)
    assert ids == [1, 2]
    for run_id in ids:
        assert artifacts(store, "Twice", run_id, "end") == [{"total": 14}]


@pytest.mark.slow
def test_status_dump_tag_and_logs(tmp_path, store):
    nb = write_notebook(tmp_path / "hello_flow.ipynb", [
        "%%step start\nimport numpy as np\nx = 1\narr = np.arange(6).reshape(2, 3)",
        "%%step end\nx += 1\nprint('x is', x)",
    ])
    flowmagic_json("run", nb, "--tag", "first", store=store)
    flowmagic_json("run", nb, store=store)
    status = flowmagic_json("status", nb, store=store)
    assert status["flow"] == "HelloFlow"
    assert [r["run_id"] for r in status["runs"]] == [2, 1]
    assert status["runs"][1]["tags"] == ["first"] and status["runs"][0]["status"] == "succeeded"
    assert {"run_id", "status", "tags", "started_at", "finished_at"} <= set(status["runs"][0])

    dump = flowmagic_json("dump", nb, "1", store=store)
    names = {(a["step"], a["name"], a["type"]) for a in dump["artifacts"]}
    # `np` (a module) is listed too, saved or not (the store decides)
    assert names == {("start", "x", "int"), ("start", "arr", "numpy.ndarray"), ("start", "np", "module"),
                     ("end", "x", "int")}
    assert set(dump["artifacts"][0]) == {"step", "task", "name", "type", "size", "hash"}
    dump = flowmagic_json("dump", nb, "1/start", "--include", "arr", store=store)
    assert [(a["name"], a["type"]) for a in dump["artifacts"]] == [("arr", "numpy.ndarray")]
    text = flowmagic("dump", nb, "1/start", store=store)
    assert "(2, 3) int64" in text.stdout
    missing = flowmagic("dump", nb, "1/nope", store=store)
    assert missing.returncode == 2 and "start" in missing.stderr

    assert flowmagic_json("tag", "add", nb, "2", "best", "v1", store=store)["tags"] == ["best", "v1"]
    assert flowmagic_json("tag", "remove", nb, "2", "v1", store=store)["tags"] == ["best"]
    assert flowmagic_json("tag", "list", nb, "2", store=store)["tags"] == ["best"]
    assert [r["run_id"] for r in flowmagic_json("status", nb, "--tag", "best", store=store)["runs"]] == [2]

    logs = flowmagic_json("logs", nb, "1/end", store=store)
    assert logs["tasks"][0]["attempts"][0]["stdout"] == "x is 2\n"
    assert "x is 2" in flowmagic("logs", nb, "1/end", store=store).stdout


def test_a_flow_that_cannot_be_built_exits_2(tmp_path, store):
    nb = write_notebook(tmp_path / "broken.ipynb", ["%%step start\ny = undefined_name + 1"])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 2
    assert "undefined_name" in proc.stderr


@pytest.mark.slow
def test_gc_keeps_the_newest_runs(tmp_path, store):
    nb = write_notebook(tmp_path / "hello_flow.ipynb", ["%%step start\nimport numpy as np\narr = np.arange(10)"])
    for _ in range(2):
        flowmagic_json("run", nb, store=store)
    dry = flowmagic_json("gc", nb, "--keep", "1", "--dry-run", store=store)
    assert dry["dry_run"] and dry["runs_removed"] == [{"flow": "HelloFlow", "run_id": 1}]
    done = flowmagic_json("gc", nb, "--keep", "1", store=store)
    assert done["runs_removed"] == [{"flow": "HelloFlow", "run_id": 1}]
    assert [r["run_id"] for r in flowmagic_json("status", nb, store=store)["runs"]] == [2]
    assert artifacts(store, "HelloFlow", 2, "start")[0]["arr"].tolist() == list(range(10))


@pytest.mark.slow
def test_output_streams_live_with_task_prefixes(tmp_path, store):
    nb = write_notebook(tmp_path / "live.ipynb", [
        "%%step start\nimport time, sys\nprint('tick', flush=True)\nprint('to stderr', file=sys.stderr, flush=True)"
        "\ntime.sleep(4)\nprint('tock')\nx = 1",
    ])
    proc = start_flowmagic("run", nb, store=store)
    seen = {}
    for line in proc.stdout:
        seen.setdefault(line.strip(), time.monotonic())
    proc.wait(timeout=60)
    assert proc.returncode == 0
    tick = next(t for line, t in seen.items() if line.endswith("tick"))
    tock = next(t for line, t in seen.items() if line.endswith("tock"))
    assert tock - tick > 3  # `tick` was shown while the task was still sleeping
    assert any(line.startswith("[start/") and line.endswith("] tick") for line in seen)
    assert any(line.endswith("to stderr") for line in seen)
    [task] = tasks(store, "Live", 1, "start")
    [attempt] = attempts(store, task.task_id)
    assert attempt.stdout == "tick\ntock\n"
    assert attempt.stderr.startswith("to stderr\n")  # then warnings: `time`, `sys` (modules) are not saved
