"""A foreach's progress on the console: ``work 3/12`` lines, never one line per
task unless --verbose; failures and caught tasks keep a line each."""
from __future__ import annotations

import io
import re

from runtime_helpers import flowmagic, write_notebook

from flowmagic.flow.graph import build_flow
from flowmagic.report.text import RunPrinter
from flowmagic.runtime.orchestrator.scheduler import run_flow
from flowmagic.store import open_store

FOREACH = ["%%step start\nitems = list(range(12))",
           "%%step work --foreach items --catch err\nif input == 5:\n    raise ValueError('five')\ny = input",
           "%%step join\ntotal = len(y)"]


def test_a_foreach_prints_progress_lines_not_a_line_per_task(tmp_path):
    store = open_store(tmp_path / "store")
    out = io.StringIO()
    # progress_every=0: a progress line at every finished task (the default waits 5 s between two)
    result = run_flow(build_flow(FOREACH, name="Progress"), store, max_workers=2, workdir=str(tmp_path),
                      on_event=RunPrinter(out, tty=False, progress_every=0))
    text = out.getvalue()
    assert result.status == "succeeded", text
    progress = re.findall(r"^work (\d+)/12$", text, flags=re.M)
    assert progress and [int(n) for n in progress] == sorted(int(n) for n in progress), text
    assert "work 12/12" not in text and "Step work done" in text   # the last count is the done line
    assert re.findall(r"^\[work/5\] caught ValueError: five -> err$", text, flags=re.M), text
    assert not re.search(r"^\[work/\d+\] (done|caught)$", text, flags=re.M), text


def test_on_a_terminal_the_progress_line_is_redrawn_in_place(monkeypatch):
    import flowmagic.report.text as text_module
    from flowmagic.runtime.orchestrator.events import Event

    monkeypatch.setattr(text_module, "_REDRAW_EVERY", 0.0)   # redraw at every task, not every 0.1 s
    out = io.StringIO()
    printer = RunPrinter(out, tty=True)
    printer(Event("run", 1, state="running", data={"flow": "F"}))
    for state in ("pending", "running", "done"):
        for i in range(3):
            printer(Event("task", 1, step="fit", task_id=i, index=(i,), state=state))
    value = out.getvalue()
    assert "\r\x1b[Kfit 1/3\r\x1b[Kfit 2/3\r\x1b[KStep fit done" in value, repr(value)


def test_the_console_shows_no_task_lines_by_default_and_one_per_task_with_verbose(tmp_path):
    nb = write_notebook(tmp_path / "progress.ipynb", ["%load_ext flowmagic", *FOREACH])
    store = tmp_path / "store"
    quiet = flowmagic("run", nb, store=store)
    assert quiet.returncode == 0, quiet.stderr
    assert "Step work started (12 tasks)" in quiet.stdout and "Step work done" in quiet.stdout
    assert "[work/5] caught ValueError: five -> err" in quiet.stdout
    assert not re.search(r"^\[work/\d+\] (done|caught)$", quiet.stdout, flags=re.M), quiet.stdout
    verbose = flowmagic("run", nb, "--verbose", store=store)
    assert verbose.returncode == 0, verbose.stderr
    done = re.findall(r"^\[work/(\d+)\] (done|caught)$", verbose.stdout, flags=re.M)
    assert sorted(int(i) for i, _state in done) == list(range(12)), verbose.stdout
