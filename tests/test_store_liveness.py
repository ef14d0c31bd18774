"""Is a run's orchestrator alive? Compared by its start in clock ticks since
boot, so a stepped wall clock never makes a live process look like another one."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from flowmagic.store.liveness import orchestrator_gone, start_ticks, this_process
from flowmagic.store.metadata import Metadata

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="ticks come from /proc")
HOST = socket.gethostname()


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def test_a_live_process_is_alive_whatever_its_wall_clock_start_reads(sleeper):
    ticks = start_ticks(sleeper.pid)
    assert ticks is not None
    drifted = 1.0e9   # a wall-clock start far from psutil's: only the ticks count
    assert not orchestrator_gone(sleeper.pid, drifted, HOST, ticks)
    own = this_process()
    assert not orchestrator_gone(own.pid, drifted, own.host, own.ticks)


def test_another_process_with_the_pid_or_none_at_all_is_gone(sleeper):
    ticks = start_ticks(sleeper.pid)
    assert orchestrator_gone(sleeper.pid, None, HOST, ticks + 1)     # a reused pid: another start
    own = this_process()
    assert orchestrator_gone(own.pid, own.started, own.host, own.ticks - 1)
    sleeper.kill()
    sleeper.wait()
    assert orchestrator_gone(sleeper.pid, None, HOST, ticks)


def test_a_zombie_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    ticks = start_ticks(proc.pid)
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)   # exited, not reaped: a zombie
    try:
        assert orchestrator_gone(proc.pid, None, HOST, ticks)
    finally:
        proc.wait()


def test_another_host_or_no_pid_cannot_be_told():
    assert not orchestrator_gone(None, None, HOST, None)
    assert not orchestrator_gone(1, None, "another-machine", 5)


def test_a_run_recorded_now_is_running_and_an_older_releases_row_still_reads(tmp_path):
    meta = Metadata(tmp_path / "metadata.sqlite")
    run_id = meta.new_run("F", params={}, code={})
    run = meta.get_run("F", run_id)
    assert run.status == "running" and run.orchestrator_ticks == start_ticks(os.getpid())
    # an older release wrote no ticks: the wall-clock start decides, as before
    with meta._write() as conn:
        conn.execute("UPDATE runs SET orchestrator_ticks = NULL, orchestrator_started = 1.0 WHERE run_id = ?",
                     (run_id,))
    assert meta.get_run("F", run_id).status == "crashed"
