"""The magics in real kernels: Run All, failures, resume, streaming, interrupts.

Each example notebook runs in its own nbclient kernel (a notebook is one
kernel's flow); the other tests share one module kernel and start with
``%flow reset`` so each defines its own flow.
"""
from __future__ import annotations

import os
import shutil
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import nbformat
import numpy as np
import pandas as pd
import psutil
import pytest

from conftest import EXAMPLES, LiveKernel, execute_notebook, kernel_env
from flowmagic.store import open_store, load_artifact
from plain_kernel import run_plainly

pytestmark = pytest.mark.slow


# -- reading the store --------------------------------------------------------------
def runs(root: Path, flow: str) -> list:
    return open_store(root).meta.list_runs(flow)


def latest_tasks(store, flow: str, run_id: int, step: str) -> list:
    from flowmagic.runtime.orchestrator.scheduler import latest_generation

    return sorted(latest_generation(store.meta.tasks(flow, run_id, step)), key=lambda t: t.index or ())


def step_values(root: Path, flow: str, run_id: int, step: str, gathered: bool) -> dict[str, Any]:
    """The artifacts of a step in a run: per name, one value (or the foreach list)."""
    store = open_store(root)
    per_task = [{ref.name: load_artifact(store.objects, ref) for ref in store.meta.artifacts(t.task_id)}
                for t in latest_tasks(store, flow, run_id, step)]
    if not gathered:
        return per_task[0]
    names = {n for values in per_task for n in values}
    return {n: [values.get(n) for values in per_task] for n in names}


def final_values(root: Path, flow: str, run_id: int, graph) -> dict[str, Any]:
    """What Run All leaves in a plain kernel, read from the run's artifacts:
    each name from the last step (notebook order) that writes it."""
    values: dict[str, Any] = {}
    for spec in graph.steps:
        step = step_values(root, flow, run_id, spec.name, gathered=bool(spec.options.foreach))
        values.update({name: step.get(name) for name in spec.writes})
    return values


def same(a: Any, b: Any) -> bool:
    if isinstance(a, pd.DataFrame) or isinstance(b, pd.DataFrame):
        try:
            pd.testing.assert_frame_equal(a, b)
            return True
        except AssertionError:
            return False
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return bool(np.array_equal(a, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(b, dict) and set(b) == {"type", "message"} and isinstance(a, dict):
        return a.get("type") == b["type"] and a.get("message") == b["message"]  # a --catch record
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def errors_of(nb) -> list[tuple[int, dict]]:
    return [(i, o) for i, c in enumerate(nb.cells) if c.cell_type == "code"
            for o in c.get("outputs", []) if o.output_type == "error"]


def plain_text(lines) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(lines))


# -- every example notebook, top to bottom ------------------------------------------
EXAMPLE_OUTCOMES = {
    # notebook: (flow, cell that fails on purpose and its error, or None)
    "hello_flow": ("HelloFlow", None),
    "catch_flow": ("CatchFlow", None),
    "retry_flow": ("RetryFlow", None),
    "model_selection": ("ModelSelection", None),
    "parameter_flow": ("ParameterFlow", (4, "ZeroDivisionError")),
    "timeout_flow": ("TimeoutFlow", (3, None)),
}


@pytest.mark.parametrize("name", sorted(EXAMPLE_OUTCOMES))
def test_example_notebook_run_all_is_one_recorded_session_run(name: str, tmp_path: Path):
    from flowmagic.notebook import load_flow

    flow, failure = EXAMPLE_OUTCOMES[name]
    for attempt in range(6 if name == "retry_flow" else 1):
        # RetryFlow fails on even seconds, and its retries follow each other
        # within the same second: a run of Run All is lucky or not. Retry it.
        workdir = tmp_path / f"try{attempt}"
        workdir.mkdir()
        notebook = workdir / f"{name}.ipynb"
        shutil.copy(EXAMPLES / notebook.name, notebook)
        store_root = workdir / "store"
        env = kernel_env(store_root, JPY_SESSION_NAME=str(notebook))
        nb, error = execute_notebook(notebook, workdir, env, may_fail=True, timeout=180)
        if not (name == "retry_flow" and error is not None and "Bad luck!" in str(error)):
            break

    recorded = runs(store_root, flow)
    assert len(recorded) == 1, [r.status for r in recorded]
    session = recorded[0]
    assert session.interactive
    if failure is not None:
        cell, ename = failure
        errors = errors_of(nb)
        assert [i for i, _ in errors] == [cell], errors     # the failing step's own cell stops Run All
        if ename:
            assert errors[0][1]["ename"] == ename
        assert session.status == "failed"
        return
    assert error is None, str(error)
    assert session.status == "succeeded"
    graph = load_flow(notebook)
    names = sorted({w for s in graph.steps for w in s.writes})
    plain = plain_values(notebook, names, workdir)
    ours = final_values(store_root, flow, session.run_id, graph)
    different = [n for n in names if not same(ours[n], plain[n])]
    assert not different, {n: (ours[n], plain[n]) for n in different}


def plain_values(notebook: Path, names: list[str], workdir: Path) -> dict[str, Any]:
    """The values Run All leaves in a plain kernel. RetryFlow fails on even
    seconds and a plain kernel has no --retry: try again, as the step would."""
    from nbclient.exceptions import CellExecutionError

    for _attempt in range(8):
        try:
            return run_plainly(notebook, names, workdir)
        except CellExecutionError as error:
            if "Bad luck!" not in str(error):
                raise
            time.sleep(0.5)
    raise AssertionError("the plain kernel was unlucky 8 times in a row")


def test_parameter_flow_fails_in_its_cell_then_fixed_cell_and_resume_succeed(tmp_path: Path):
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = tmp_path / "parameter_flow.ipynb"
    shutil.copy(EXAMPLES / notebook.name, notebook)
    store_root = tmp_path / "store"
    nb = nbformat.read(notebook, as_version=4)
    client = NotebookClient(nb, km=KernelManager(kernel_name="python3"), timeout=120,
                            resources={"metadata": {"path": str(tmp_path)}})
    end = 4
    with client.setup_kernel(cwd=str(tmp_path), env=kernel_env(store_root, JPY_SESSION_NAME=str(notebook))):
        for index in range(end):
            client.execute_cell(nb.cells[index], index)
        with pytest.raises(CellExecutionError):
            client.execute_cell(nb.cells[end], end)
        (error,) = [o for o in nb.cells[end].outputs if o.output_type == "error"]
        assert error.ename == "ZeroDivisionError"
        shown = plain_text(error.traceback)
        assert "print('alpha is still %f' % (alpha / 0))" in shown
        assert "line 3" in shown                                 # the cell's own line number
        assert "flowmagic/" not in shown and "scheduler" not in shown

        # a fresh whole run fails the same way: that run is the one to resume
        failing_run = nbformat.v4.new_code_cell("%flow run")
        nb.cells.append(failing_run)
        with pytest.raises(CellExecutionError):
            client.execute_cell(failing_run, len(nb.cells) - 1)

        nb.cells[end].source = nb.cells[end].source.replace("(alpha / 0)", "(alpha / 1)")
        client.execute_cell(nb.cells[end], end)
        assert "alpha is still 0.010000" in "".join(
            o.get("text", "") for o in nb.cells[end].outputs if o.output_type == "stream")

        resume = nbformat.v4.new_code_cell("r = %flow resume --json\nr")
        nb.cells.append(resume)
        client.execute_cell(resume, len(nb.cells) - 1)
    statuses = {r.run_id: r for r in runs(store_root, "ParameterFlow")}
    assert statuses[1].interactive and statuses[1].status == "succeeded"   # the fixed session run
    assert statuses[2].status == "failed"
    assert statuses[3].status == "succeeded" and statuses[3].origin_run_id == 2
    store = open_store(store_root)
    assert [t.state for t in latest_tasks(store, "ParameterFlow", 3, "start")] == ["cloned"]
    assert [t.state for t in latest_tasks(store, "ParameterFlow", 3, "end")] == ["done"]


# -- one kernel for the rest ----------------------------------------------------------
@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("magics-kernel")
    # FLOWMAGIC_WIDGETS=on: this kernel stands for a JupyterLab one (widget views sent)
    live = LiveKernel(folder, kernel_env(folder / "store", FLOWMAGIC_WIDGETS="on"))
    live.store_root = folder / "store"
    live.ok("%load_ext flowmagic")
    try:
        yield live
    finally:
        live.shutdown()


def fresh_flow(kernel: LiveKernel, name: str) -> None:
    kernel.ok(f"%flow reset\n%flow name {name}")


def test_output_streams_into_the_cell_while_the_step_runs(kernel):
    fresh_flow(kernel, "Ticker")
    execution = kernel.ok(textwrap.dedent("""\
        %%step ticker
        import time
        for i in range(5):
            print("tick", i, flush=True)
            time.sleep(0.5)
        """))
    ticks = [m for m in execution.messages if m.msg_type == "stream" and "tick" in m.content["text"]]
    assert "tick 0" in ticks[0].content["text"] and "tick 4" in execution.stdout
    # the first line reached the notebook while the step still had ~2 s to go
    assert execution.finished - ticks[0].received > 1.5


def test_run_overrides_a_parameter_and_returns_the_run(kernel):
    fresh_flow(kernel, "Params")
    kernel.ok("%%params\nalpha = 0.01  # Learning rate")
    kernel.ok("%%step start\nprint('alpha is %f' % alpha)\nscaled = alpha * 10")
    execution = kernel.ok("r = %flow run --alpha 0.5 --tag fast")
    assert "alpha is 0.500000" in execution.stdout
    assert "[start/" in execution.stdout                     # a whole run labels its tasks
    assert kernel.value("alpha") == 0.5
    (run,) = [r for r in runs(kernel.store_root, "Params") if not r.interactive]
    assert run.params == {"alpha": 0.5} and run.status == "succeeded" and "fast" in run.tags
    assert kernel.value("type(r).__name__") == "Run"
    assert kernel.value("r['start'].task.data.scaled") == 5.0
    help_text = kernel.ok("%flow run --help").stdout
    assert "--alpha" in help_text and "Learning rate" in help_text


def test_a_front_end_cell_id_follows_a_renamed_step(kernel):
    fresh_flow(kernel, "Renamed")
    assert kernel.execute("%%step a\nx = 1", cell_id="cell-1").status == "ok"
    assert kernel.execute("%%step b\ny = x * 2", cell_id="cell-2").status == "ok"
    assert kernel.execute("%%step first\nx = 1", cell_id="cell-1").status == "ok"   # renamed in place
    document = kernel.value("%flow show --json")
    assert [s["name"] for s in document["steps"]] == ["first", "b"]
    assert document["edges"] == [{"from": "first", "to": "b", "variables": ["x"], "maybe": []}]


def test_a_step_after_an_edited_prelude_cell_sees_only_the_new_prelude(kernel):
    fresh_flow(kernel, "EditedPrelude")
    step = "%%step start\nseen = rate\nhas_old = 'old' in globals()"
    assert kernel.execute("rate = 1\nold = 5", cell_id="prelude").status == "ok"   # an ordinary cell
    assert kernel.execute(step, cell_id="start").status == "ok"
    assert kernel.value("(seen, has_old)") == (1, True)
    assert kernel.execute("rate = 2", cell_id="prelude").status == "ok"   # edited in place: old removed
    assert kernel.execute(step, cell_id="start").status == "ok"
    assert kernel.value("(seen, has_old)") == (2, False)


def test_reading_commands_mirror_the_console(kernel, tmp_path):
    fresh_flow(kernel, "Reading")
    kernel.ok("%%step start\nimport numpy as np\nvalues = np.arange(6)\nprint('made', len(values))")
    kernel.ok("%%step end\ntotal = int(values.sum())")
    run_id = kernel.value("%flow run --json")["run_id"]
    status = kernel.value("%flow status --json")
    assert [r["run_id"] for r in status["runs"]] == [run_id, run_id - 1]     # newest first
    assert status["runs"][1]["interactive"] and status["runs"][1]["status"] == "succeeded"
    dumped = kernel.value(f"%flow dump {run_id}/end --json")
    assert [(a["step"], a["name"], a["type"]) for a in dumped["artifacts"]] == [("end", "total", "int")]
    shown = kernel.ok(f"%flow dump {run_id}")
    assert "values" in "".join(d.get("text/plain", "") for d in shown.displays()) + shown.stdout
    assert kernel.value(f"%flow tag add {run_id} best --json")["tags"] == ["best"]
    logs = kernel.ok(f"%flow logs {run_id}/start").stdout
    assert "made 6" in logs
    script = tmp_path / "reading.py"
    kernel.ok(f"%flow export -o {script}")
    assert "class Reading(FlowSpec)" in script.read_text()
    shown = kernel.ok("%flow show")
    bundle, twin = shown.displays()  # the widget, then its static twin (for a reopened notebook)
    assert "application/vnd.jupyter.widget-view+json" in bundle and "start" in bundle["text/plain"]
    assert twin["text/html"].startswith('<div class="fm-twin" data-fm-twin="dag">')
    assert kernel.value("%flow show --json")["edges"] == [{"from": "start", "to": "end", "variables": ["values"], "maybe": []}]
    failing = kernel.execute("%flow dump 999")
    assert failing.status == "error" and "999" in failing.error_text and "Traceback" not in failing.error_text


def test_flow_dump_and_the_console_build_the_same_document(kernel, tmp_path):
    """One service layer: `%flow dump --json` is `flowmagic dump --json`, environments included."""
    from runtime_helpers import flowmagic, flowmagic_json, write_notebook

    fresh_flow(kernel, "SameDump")
    kernel.ok("%%step start\nvalues = [1, 2, 3]")
    kernel.ok("%%step end\ntotal = sum(values)")
    run_id = kernel.value("%flow run --json")["run_id"]
    store = open_store(kernel.store_root)   # an --pypi step's record, as the runtime keeps it
    record = {"kind": "pypi", "requested": ["six==1.16.0"], "key": "k1", "python": "3.11", "packages": ["six==1.16.0"]}
    graph = dict(store.meta.get_run("SameDump", run_id).graph or {})
    store.meta.set_run_graph("SameDump", run_id, graph={**graph, "environments": {"end": record}})
    notebook = write_notebook(tmp_path / "same_dump.ipynb", ["%flow name SameDump"])
    for spec in (f"{run_id}", f"{run_id}/start"):
        ours = kernel.value(f"%flow dump {spec} --json")
        assert ours == flowmagic_json("dump", notebook, spec, store=kernel.store_root)
    assert kernel.value(f"%flow dump {run_id} --json")["environments"] == {"end": record}
    assert flowmagic("status", notebook, store=kernel.store_root).stdout.splitlines()[0] == "Flow SameDump"


def test_rich_output_reaches_the_cell_and_foreach_tasks_are_labelled(kernel):
    fresh_flow(kernel, "Rich")
    execution = kernel.ok(textwrap.dedent("""\
        %%step table
        import pandas as pd
        from IPython.display import display
        display(pd.DataFrame({"a": [1, 2]}))
        41 + 1
        """))
    assert any("<table" in b.get("text/html", "") for b in execution.displays())
    assert execution.result == {"text/plain": "42"}              # the cell's own Out[n], as in a plain cell
    kernel.ok("%%step items\nitems = [1, 2, 3]")
    execution = kernel.ok("%%step square --foreach items\nsq = input * input\nprint('squared', sq)")
    assert sorted(line.split("] ", 1)[0] + "]" for line in execution.stdout.splitlines()) == [
        "[square/0]", "[square/1]", "[square/2]"]
    assert kernel.value("sq") == [1, 4, 9]                       # the gathered list, in item order


def test_the_view_of_flow_show_follows_the_session_run(kernel):
    fresh_flow(kernel, "Viewed")
    kernel.ok("%%step a\nx = 1")
    kernel.ok("%%step b\ny = x + 1")
    kernel.ok("%flow show")
    states = "{k: v['state'] for k, v in get_ipython()._flowmagic.view.states.items()}"
    assert kernel.value(states) == {"a": "done", "b": "done"}
    kernel.ok("%%step a\nx = 5")
    assert kernel.value(states) == {"a": "done", "b": "stale"}
    kernel.ok("%%step b\ny = x + 1")
    assert kernel.value(states) == {"a": "done", "b": "done"}


def test_the_extension_loads_from_the_kernel_config(tmp_path):
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(tmp_path), env=kernel_env(tmp_path / "store"),
                    extra_arguments=["--InteractiveShellApp.extensions=flowmagic"])
    kernel = LiveKernel.__new__(LiveKernel)
    kernel.cwd, kernel.km = tmp_path, km
    kernel.kc = km.client()
    kernel.kc.start_channels()
    kernel.kc.wait_for_ready(timeout=60)
    try:
        kernel.ok("import math")
        kernel.ok("%%step start\nroot = math.sqrt(16)")
        assert kernel.value("root") == 4.0
    finally:
        kernel.shutdown()


def test_a_step_whose_producer_has_not_run_names_it(kernel):
    fresh_flow(kernel, "Order")
    kernel.ok("%%step load\nrows = list(range(10))")
    kernel.ok("%%step total\nn = sum(rows)")
    kernel.ok("%flow new")                                    # a new session run: nothing has run
    execution = kernel.execute("%%step total\nn = sum(rows)")
    assert execution.status == "error"
    message = execution.error_text
    assert "step 'total' cannot run yet" in message
    assert "step 'load'" in message and "%%step load" in message and "rows" in message
    assert "Traceback" not in message
    kernel.ok("%%step load\nrows = list(range(10))")
    kernel.ok("%%step total\nn = sum(rows)")
    assert kernel.value("n") == 45


def test_the_saved_notebook_names_the_step_to_execute_first(kernel, tmp_path):
    fresh_flow(kernel, "HelloFlow")
    notebook = tmp_path / "hello_flow.ipynb"
    shutil.copy(EXAMPLES / notebook.name, notebook)
    kernel.ok(f"__session__ = {str(notebook)!r}")      # what Jupyter Server tells ipykernel
    try:
        execution = kernel.execute('%%step end\nx += 1\nprint("x is", x)')
        assert execution.status == "error"
        message = execution.error_text
        # the saved notebook's steps are part of the flow, not executed yet
        assert ("step 'start' (the cell '%%step start' (cell 3, saved, not executed in this kernel yet)) "
                "produces x but has not run in this session run") in message
        assert "Traceback" not in message
    finally:
        kernel.ok("del __session__")


def test_catch_binds_the_exception_record_and_what_was_bound_before(kernel):
    fresh_flow(kernel, "Catching")
    kernel.ok("%%step boom --catch oops\nfirst = 1\nraise ValueError('on purpose')\nsecond = 2")
    record = kernel.value("{k: oops[k] for k in ('type', 'message')}")
    assert record == {"type": "ValueError", "message": "on purpose"}
    assert kernel.value("(first, second)") == (1, None)
    kernel.ok("%%step after\nwas_caught = oops is not None")
    assert kernel.value("was_caught") is True


def test_a_caught_task_says_so_in_the_cell_and_the_run_summary_counts_it(kernel):
    fresh_flow(kernel, "CaughtCells")
    lone = kernel.ok("%%step start --catch oops\nprint('trying')\nraise ValueError('on purpose')")
    assert "[flowmagic] caught ValueError: on purpose -> oops" in lone.stderr.splitlines()
    kernel.ok("%%step settings\ndegrees = [1, 2, 3]")
    foreach = kernel.ok("%%step fit --foreach degrees --catch fit_error\n"
                        "if input == 2:\n    raise ValueError('bad degree')\nmodel = input")
    assert "[fit/1] caught ValueError: bad degree -> fit_error" in foreach.stderr.splitlines()
    assert "[fit/0] caught" not in foreach.stderr and "[fit/2] caught" not in foreach.stderr
    bundle, twin = kernel.ok("%flow show").displays()   # a view made afterwards: caught, with its counts
    text = bundle["text/plain"]
    assert "fm-twin" in twin["text/html"]
    assert "caught · 2/3 (1 failed)" in text and "done · 2/3" not in text, text
    whole = kernel.ok("%flow run")
    [summary] = [line for line in whole.stdout.splitlines() if " succeeded in " in line]
    assert summary.endswith("(5 tasks run, 0 cloned, 2 caught)"), summary
    assert "[fit/1] caught ValueError: bad degree -> fit_error" in whole.stderr.splitlines()


def test_rerunning_a_step_marks_the_steps_below_stale(kernel):
    fresh_flow(kernel, "Stale")
    kernel.ok("%%step a\nx = 1")
    kernel.ok("%%step b\ny = x + 1")
    execution = kernel.ok("%%step a\nx = 2")
    assert "marked stale" in execution.stdout and "b" in execution.stdout
    execution = kernel.ok("%%step b\ny = x + 1")
    assert kernel.value("y") == 3


def _pid_files(folder: Path) -> list[int]:
    return [int(p.read_text()) for p in sorted(folder.glob("*.pid"))]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


SLEEPER = """\
%%step {name}
import os, subprocess, time
_child = subprocess.Popen(["sleep", "60"])
open(os.path.join({folder!r}, "{name}-task.pid"), "w").write(str(os.getpid()))
open(os.path.join({folder!r}, "{name}-child.pid"), "w").write(str(_child.pid))
print("started", flush=True)
time.sleep(60)
"""


def test_interrupting_a_step_ends_its_processes_and_keeps_the_kernel(kernel, tmp_path):
    fresh_flow(kernel, "Interrupted")
    started = {}

    def when_started(messages) -> bool:
        if any(m.msg_type == "stream" and "started" in m.content.get("text", "") for m in messages):
            started["at"] = time.time()
            return True
        return False

    execution = kernel.execute(SLEEPER.format(name="sleepy", folder=str(tmp_path)), timeout=90,
                               interrupt_when=when_started)
    assert execution.finished - started["at"] < 5
    assert execution.status == "error" and execution.error["ename"] == "KeyboardInterrupt"
    pids = _pid_files(tmp_path)
    assert len(pids) == 2
    deadline = time.time() + 2
    while any(_alive(p) for p in pids) and time.time() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
    (session,) = runs(kernel.store_root, "Interrupted")
    assert session.status == "interrupted"
    kernel.ok("%%step quick\nanswer = 42")                     # the kernel (and its session) still work
    assert kernel.value("answer") == 42


def test_interrupting_flow_run_marks_the_run_interrupted(kernel, tmp_path):
    fresh_flow(kernel, "InterruptedRun")
    kernel.ok("%%step first\nn = 1")
    started = {}

    def when_started(messages) -> bool:
        if any(m.msg_type == "stream" and "started" in m.content.get("text", "") for m in messages):
            started.setdefault("at", time.time())
            return True
        return False

    # Running the cell defines the step (its own interactive run is stopped at once: not 60 s).
    slow = "%%step slow\nimport time\nprint('started', flush=True)\ntime.sleep(60)\nm = n"
    assert kernel.execute(slow, timeout=90, interrupt_when=when_started).error["ename"] == "KeyboardInterrupt"
    started.clear()
    execution = kernel.execute("%flow run", timeout=90, interrupt_when=when_started)
    assert execution.finished - started["at"] < 5
    assert execution.error["ename"] == "KeyboardInterrupt"
    whole = [r for r in runs(kernel.store_root, "InterruptedRun") if not r.interactive]
    assert [r.status for r in whole] == ["interrupted"]


def _kill_kernel_during_a_step(tmp_path: Path) -> tuple[int, int]:
    """Start a step that sleeps (and whose child sleeps), SIGKILL the kernel;
    returns (task pid, child pid) as the step wrote them."""
    kernel = LiveKernel(tmp_path, kernel_env(tmp_path / "store"))
    try:
        kernel.ok("%load_ext flowmagic")
        kernel.kc.execute(SLEEPER.format(name="orphan", folder=str(tmp_path)))
        deadline = time.time() + 60
        while len(_pid_files(tmp_path)) < 2 and time.time() < deadline:
            time.sleep(0.1)
        child, task = _pid_files(tmp_path)                    # orphan-child.pid, orphan-task.pid
        assert _alive(task) and _alive(child)
        os.kill(kernel.pid, signal.SIGKILL)
        return task, child
    finally:
        kernel.shutdown()


def _gone_within(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while _alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    return not _alive(pid)


def test_a_killed_kernel_leaves_no_task_process(tmp_path):
    task, child = _kill_kernel_during_a_step(tmp_path)
    try:
        assert _gone_within(task, 5)
        assert _gone_within(child, 5)      # the step's own subprocess too
    finally:
        _kill_quietly(child)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
