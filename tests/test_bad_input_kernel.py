"""Bad input in a notebook: the magics' catalogue, in a real kernel (jupyter_client).

The console command's catalogue is tests/test_bad_input.py; this is the
smaller table for the magics. Each row executes its setup cells, then one bad
cell, and checks: the cell fails (or warns) with a message naming the step,
cell or variable and no flowmagic frames, the kernel keeps running (the same
process executes a following ordinary cell), and the runs recorded before
(KCat/1, a session run, and KCat/2, a %flow run) still read back through the
Client API. Cases covered elsewhere: a step whose producer has not run
(test_magics_kernel.py::test_a_step_whose_producer_has_not_run_names_it),
malformed %%step lines and definition errors without a kernel
(test_magics.py::test_bad_usage_is_one_message_without_a_traceback),
interrupts and a killed kernel (test_magics_kernel.py).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import LiveKernel, kernel_env

pytestmark = pytest.mark.slow

FLOW = "KCat"
PARAMS = "%%params\nalpha = 0.5  # Learning rate"
START = "%%step start\nx = 41"
END = "%%step end\ny = x + 1"
LEAK = ("import time\nblocks = []\nfor _round in range(200):\n    blocks.append(bytearray(b'x' * 50_000_000))\n"
        "    time.sleep(0.05)")
IGNORES_SIGTERM = ("import signal, subprocess, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                   "child = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)'])\ntime.sleep(60)")


@dataclass(frozen=True)
class KernelCase:
    id: str
    code: str                                # the bad cell
    names: tuple[str, ...]                   # the cell's error (or warning) text must contain each
    setup: tuple[str, ...] = ()              # cells that must succeed first (after %flow reset)
    status: str = "error"                    # "ok": a warning only
    within: float | None = None              # seconds the bad cell may take
    absent: tuple[str, ...] = field(default=("Traceback (most recent call last)", "flowmagic/"))


CASES = [
    KernelCase("unknown %%step option", "%%step start --retries 2\nx = 1",
               ("step 'start'", "--retries", "did you mean --retry")),
    KernelCase("bad %%step option value", "%%step start --memory lots\nx = 1", ("step 'start'", "--memory", "'lots'")),
    KernelCase("syntax error in a step", "%%step start\nx = 1\ny = (2,\nz = 3",
               ("step 'start'", "the cell '%%step start' (In [", "line 3", "syntax error")),
    KernelCase("unresolved name", "%%step total\nn = missing_name + x",
               ("step 'total'", "'missing_name'"), setup=(START,)),
    KernelCase("unknown %flow option", "%flow run --bogus 1", ("--bogus", "%flow run --help"), setup=(START,)),
    KernelCase("unknown %flow command", "%flow frobnicate", ("frobnicate",)),
    KernelCase("bad parameter value", "%flow run --alpha fast", ("parameter 'alpha'", "'fast'"),
               setup=(PARAMS, START)),
    KernelCase("missing run id: dump", "%flow dump 99", ("KCat/99", "runs of KCat")),
    KernelCase("23-digit run id: dump", "%flow dump 12345678901234567890123",
               ("KCat/12345678901234567890123 does not exist", "runs of KCat")),
    KernelCase("a 5,000-term expression", "%%step long\nx = " + "+".join(["1"] * 5000),
               ("step 'long'", "nested too deeply", "split it")),
    KernelCase("a step that closes sys.stdout", "%%step closer\nimport sys\nsys.stdout.close()\nz = 1",
               (), status="ok", absent=("exited before reporting", "Traceback (most recent call last)")),
    KernelCase("a SIGKILL from outside", "%%step victim\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
               ("step 'victim' failed", "SIGKILL from outside flowmagic"), absent=("out of memory?",)),
    KernelCase("unknown artifact: dump --include", "%flow dump 2 --include xx", ("no artifact 'xx'", "x, y")),
    KernelCase("missing run id: resume", "%flow resume 99", ("KCat/99", "runs of KCat"), setup=(START, END)),
    KernelCase("missing run id: tag", "%flow tag add 99 best", ("KCat/99", "runs of KCat")),
    KernelCase("missing run id: logs", "%flow logs 99/start", ("KCat/99", "runs of KCat")),
    KernelCase("unserialisable value nobody reads yet", "%%step opener\nf = open('/dev/null')\nz = 1",
               ("step 'opener'", "'f'", "TextIOWrapper", "not persisted"), status="ok"),
    KernelCase("unserialisable value read by a later cell (open file)", "%%step reader\ntext = f.read()",
               ("'f' was not saved", "step 'opener'", "TextIOWrapper", "step 'reader' failed"),
               setup=("%%step opener\nf = open('/dev/null')\nz = 1",)),
    KernelCase("unserialisable value read by a later cell (generator)", "%%step total\nn = sum(g)",
               ("'g' was not saved", "step 'gen'", "generator"), setup=("%%step gen\ng = (i for i in range(3))",)),
    KernelCase("segfault in a step", "%%step boom\nimport ctypes\nctypes.string_at(0)",
               ("step 'boom' failed", "SIGSEGV")),
    KernelCase("os._exit in a step", "%%step bye\nimport os\nos._exit(3)", ("step 'bye' failed", "status 3")),
    KernelCase("memory leak in a step", f"%%step hog --memory 300\n{LEAK}",
               ("step 'hog' failed", "out of memory: step 'hog' used", "--memory 300"), within=8),
    KernelCase("a step and its child ignoring SIGTERM, --timeout", f"%%step stubborn --timeout 1\n{IGNORES_SIGTERM}",
               ("step 'stubborn' failed", "timeout of 1 s"), within=8),
]


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One kernel for the table, holding two earlier runs: KCat/1 (session) and KCat/2 (%flow run)."""
    folder = tmp_path_factory.mktemp("bad-input-kernel")
    live = LiveKernel(folder, kernel_env(folder / "store"))
    try:
        live.ok("%load_ext flowmagic")
        live.ok(f"%flow reset\n%flow name {FLOW}")
        for cell in (PARAMS, START, END):
            live.ok(cell)
        live.ok("%flow run")
        live.ok("from flowmagic import Run")
        live.first_pid = live.pid
        yield live
    finally:
        live.shutdown()


def earlier_runs_intact(kernel: LiveKernel) -> None:
    assert kernel.value(f"(Run('{FLOW}/1')['start'].task.data.x, Run('{FLOW}/1')['end'].task.data.y)") == (41, 42)
    assert kernel.value(f"(Run('{FLOW}/2').successful, Run('{FLOW}/2')['end'].task.data.y)") == (True, 42)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_cell(kernel: LiveKernel, case: KernelCase):
    kernel.ok(f"%flow reset\n%flow name {FLOW}")
    for cell in case.setup:
        kernel.ok(cell)
    execution = kernel.execute(case.code, timeout=60)
    assert execution.status == case.status, execution.error_text + execution.stderr
    text = " ".join((execution.error_text + "\n" + execution.stderr + "\n" + execution.stdout).split())
    for name in case.names:
        assert name in text, f"{name!r} not in:\n{text}"
    for bad in case.absent:
        assert bad not in text, f"{bad!r} in:\n{text}"
    if case.within is not None:
        assert execution.finished - execution.started < case.within
    assert kernel.value("1 + 1") == 2 and kernel.pid == kernel.first_pid   # the kernel keeps running
    earlier_runs_intact(kernel)


@pytest.mark.parametrize("damage, expected", [
    ("garbage", "metadata.sqlite cannot be used"),
    ("newer", "newer flowmagic"),
], ids=["garbage over the SQLite header", "store written by a newer schema"])
def test_a_damaged_store_is_a_clear_error_and_the_kernel_goes_on(tmp_path: Path, damage: str, expected: str):
    """A kernel started on a store damaged (or upgraded) since it was written."""
    import sqlite3

    from flowmagic.store.metadata import Metadata

    db = tmp_path / "store" / "metadata.sqlite"
    Metadata(db).close()
    if damage == "garbage":
        with open(db, "r+b") as f:
            f.write(os.urandom(4096))
    else:
        with sqlite3.connect(db) as conn:
            conn.execute("UPDATE schema_info SET value = '99' WHERE key = 'version'")
    live = LiveKernel(tmp_path, kernel_env(tmp_path / "store"))
    try:
        live.ok("%load_ext flowmagic")
        live.ok(f"%flow name {FLOW}")
        for cell in (START, "%flow status", "%flow run"):
            execution = live.execute(cell, timeout=60)
            text = execution.error_text + execution.stderr
            assert execution.status == "error" and expected in text, (cell, text)
            assert "Traceback (most recent call last)" not in text
        assert live.value("1 + 1") == 2
    finally:
        live.shutdown()
