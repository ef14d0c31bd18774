"""The fork server: real processes, real signals, psutil to check nothing is left."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from runtime_helpers import wait_gone   # a pid that exits between two psutil calls is gone, not an error

from flowmagic.runtime.worker import forkpool
from flowmagic.runtime.worker.forkpool import ForkServer, close_all, get_server
from flowmagic.runtime.worker.forkserver import PreludeError
from flowmagic.runtime.worker.processes import describe_wait_status

ENTRY = "flowmagic.runtime.worker.forkserver:run_source"


def run_source(server: ForkServer, source: str):
    proc = server.spawn(ENTRY)
    proc.channel.sendall(source.encode())
    proc.channel.shutdown(1)
    return proc


def read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    return b"".join(chunks)


def exit_status(proc) -> tuple[int | None, int | None]:
    line = read_all(proc.status).decode().strip()
    assert line.startswith("exit "), line
    return describe_wait_status(int(line.split()[1]))


@pytest.fixture
def server():
    srv = ForkServer("import math\nBASE = 40\ndef twice(x):\n    return 2 * x\n", preload=("numpy",)).start()
    yield srv
    srv.close()


def test_task_sees_prelude_and_streams_output(server):
    proc = run_source(server, "import sys\nprint(twice(BASE) + 2)\nprint('oops', file=sys.stderr)\n")
    assert read_all(proc.stdout) == b"82\n"
    assert read_all(proc.stderr) == b"oops\n"
    assert exit_status(proc) == (0, None)
    proc.close()


def test_each_task_is_fresh_and_has_its_own_group(server):
    first = run_source(server, "import os\nLEFTOVER = 1\nprint(os.getpgid(0) == os.getpid(), os.getsid(0) == os.getpid())\n")
    assert read_all(first.stdout) == b"True True\n"
    exit_status(first)
    second = run_source(server, "print('LEFTOVER' in globals())\n")
    assert read_all(second.stdout) == b"False\n"
    assert exit_status(second) == (0, None)
    for p in (first, second):
        p.close()


def test_exit_codes_and_signals_are_reported(server):
    crash = run_source(server, "import ctypes\nctypes.string_at(0)\n")
    assert exit_status(crash) == (None, signal.SIGSEGV)
    hard_exit = run_source(server, "import os\nos._exit(3)\n")
    assert exit_status(hard_exit) == (3, None)
    for p in (crash, hard_exit):
        p.close()


def test_kill_reaches_a_grandchild_that_ignores_sigterm(server):
    source = textwrap.dedent(
        """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
        """
    )
    proc = run_source(server, source)
    grandchild = int(os.read(proc.stdout, 100).split()[0])
    time.sleep(0.3)
    proc.kill(signal.SIGTERM)  # the leader dies, the server kills its group before reaping
    assert exit_status(proc) == (None, signal.SIGTERM)
    assert wait_gone([proc.pid, grandchild], 5) == []
    proc.close()


def test_prelude_error_is_reported():
    with pytest.raises(PreludeError, match="ZeroDivisionError"):
        ForkServer("x = 1 / 0\n", preload=()).start()


def test_server_is_replaced_when_prelude_changes():
    try:
        a = get_server("A = 1\n")
        assert get_server("A = 1\n") is a
        b = get_server("A = 2\n")
        assert b is not a and not a.alive() and b.alive()
    finally:
        close_all()


def test_killing_the_orchestrator_kills_server_and_tasks(tmp_path):
    script = tmp_path / "orchestrator.py"
    script.write_text(textwrap.dedent(
        f"""
        import os, sys, time
        from flowmagic.runtime.worker.forkpool import ForkServer
        server = ForkServer("", preload=()).start()
        proc = server.spawn({ENTRY!r})
        proc.channel.sendall(b"import time\\nprint('up', flush=True)\\ntime.sleep(120)")
        proc.channel.shutdown(1)
        os.read(proc.stdout, 10)
        print(server.proc.pid, proc.pid, flush=True)
        time.sleep(120)
        """
    ))
    orch = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    server_pid, task_pid = map(int, orch.stdout.readline().split())
    assert psutil.pid_exists(task_pid)
    orch.kill()
    orch.wait()
    assert wait_gone([server_pid, task_pid], 5) == []


def test_spare_child_is_used_then_replaced_and_cleaned_up():
    srv = ForkServer("", preload=()).start()
    try:
        server = psutil.Process(srv.proc.pid)
        deadline = time.monotonic() + 5
        while not server.children() and time.monotonic() < deadline:
            time.sleep(0.02)
        [spare] = server.children()
        proc = run_source(srv, "import os\nprint(os.getpid())\n")
        assert int(read_all(proc.stdout)) == spare.pid  # the task ran in the waiting spare
        assert exit_status(proc) == (0, None)
        proc.close()
        deadline = time.monotonic() + 5
        while [c.pid for c in server.children()] in ([], [spare.pid]) and time.monotonic() < deadline:
            time.sleep(0.02)
        [next_spare] = server.children()
        assert next_spare.pid != spare.pid
    finally:
        srv.close()
    assert wait_gone([next_spare.pid, srv.proc.pid], 5) == []


# -- servers forked from a base server (a kernel's) ------------------------------------
def fresh_base() -> forkpool._Base:
    """A base started now, with this test's environment (not one an earlier test in this process left)."""
    forkpool.close_bases()
    forkpool.start_base()
    return forkpool._bases[sys.executable]


@pytest.fixture
def base():
    base = fresh_base()
    try:
        yield base
    finally:
        close_all()
        forkpool.close_bases()


def test_a_new_prelude_gets_a_server_forked_from_the_base_with_only_its_names(base, monkeypatch):
    monkeypatch.setenv("FLOWMAGIC_TEST_MARK", "first")
    a = get_server("RATE = 1\nOLD = 5\n")
    assert psutil.Process(a.proc.pid).ppid() == base.proc.pid
    monkeypatch.setenv("FLOWMAGIC_TEST_MARK", "second")   # set after the base started
    b = get_server("RATE = 2\n")
    assert psutil.Process(b.proc.pid).ppid() == base.proc.pid
    assert not a.alive()   # the old prelude's server is closed
    proc = run_source(b, "import os\nprint(RATE, 'OLD' in globals(), os.environ['FLOWMAGIC_TEST_MARK'])\n")
    assert read_all(proc.stdout) == b"2 False second\n"
    assert exit_status(proc) == (0, None)
    proc.close()


def test_a_prelude_error_in_a_forked_server_is_reported_and_the_base_serves_on(base):
    with pytest.raises(PreludeError, match="ZeroDivisionError"):
        get_server("x = 1 / 0\n")
    server = get_server("x = 3\n")
    assert psutil.Process(server.proc.pid).ppid() == base.proc.pid
    proc = run_source(server, "print(x)\n")
    assert read_all(proc.stdout) == b"3\n"
    exit_status(proc)
    proc.close()


def test_a_dead_base_falls_back_to_launching_a_server(base):
    base.proc.kill()
    base.proc.wait()
    server = get_server("y = 4\n")
    assert psutil.Process(server.proc.pid).ppid() == os.getpid()
    assert sys.executable not in forkpool._bases


def test_killing_the_orchestrator_kills_the_base_its_servers_and_their_tasks(tmp_path):
    script = tmp_path / "orchestrator.py"
    script.write_text(textwrap.dedent(
        f"""
        import os, sys, time
        from flowmagic.runtime.worker import forkpool
        forkpool.start_base()
        server = forkpool.get_server("")
        proc = server.spawn({ENTRY!r})
        proc.channel.sendall(b"import time\\nprint('up', flush=True)\\ntime.sleep(120)")
        proc.channel.shutdown(1)
        os.read(proc.stdout, 10)
        print(forkpool._bases[sys.executable].proc.pid, server.proc.pid, proc.pid, flush=True)
        time.sleep(120)
        """
    ))
    orch = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    pids = list(map(int, orch.stdout.readline().split()))
    assert len(pids) == 3 and psutil.Process(pids[1]).ppid() == pids[0]
    orch.kill()
    orch.wait()
    assert wait_gone(pids, 5) == []


def wait_idle(base, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with base.lock:
            if base.idle():
                return True
        time.sleep(0.05)
    return False


def test_the_base_imports_what_a_flow_needed_and_a_fork_never_waits_for_it(tmp_path, monkeypatch):
    (tmp_path / "slow_for_base.py").write_text("import time\ntime.sleep(2)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    base = fresh_base()
    try:
        get_server("A = 1\n", preload=("slow_for_base",))   # the base now imports it too (2 s)
        busy = get_server("A = 2\n")
        assert psutil.Process(busy.proc.pid).ppid() == os.getpid()   # launched, not queued behind it
        assert wait_idle(base, 30)
        server = get_server("A = 3\n")
        assert psutil.Process(server.proc.pid).ppid() == base.proc.pid
        proc = run_source(server, "import sys\nprint(A, 'slow_for_base' in sys.modules)\n")
        assert read_all(proc.stdout) == b"3 True\n"
        exit_status(proc)
        proc.close()
    finally:
        close_all()
        forkpool.close_bases()
