"""A step's descendants that start their own session (so they escape its
process group) still end with the task: after a timeout, a failure, a
success with a daemon left behind, and while the fork server lives on (a
kernel's). Real console runs, real processes, 200 children each."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from runtime_helpers import flowmagic, start_flowmagic, wait_gone, write_notebook
from flowmagic.runtime.worker.forkpool import ForkServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_CHILD_SUBREAPER is Linux's")

CHILDREN = 200

# 200 `sleep`s, each in its own session, and a daemon (double fork + setsid)
# that writes its pid; the pids go to a file, then the step ends as `ending` says.
SPAWN = """\
import os, subprocess, time
pids = [subprocess.Popen(['sleep', '600'], start_new_session=True).pid for _ in range({n})]
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        open({pidfile!r} + '.daemon', 'w').write(str(os.getpid()))
        time.sleep(600)
    os._exit(0)
while not os.path.exists({pidfile!r} + '.daemon'):
    time.sleep(0.01)
open({pidfile!r}, 'w').write(' '.join(map(str, pids)))
print('spawned', len(pids), flush=True)
{ending}
"""

ENDINGS = {
    "timeout": "time.sleep(600)",
    "failure": "raise ValueError('step failed on purpose')",
    "success": "x = 1",
}


def _notebook(tmp_path: Path, ending: str, timeout: int = 10) -> tuple[Path, Path]:
    """``timeout``: long enough for 200 spawns on busy cores (a quiet machine needs ~0.3 s)."""
    pidfile = tmp_path / "pids.txt"
    code = SPAWN.format(n=CHILDREN, pidfile=str(pidfile), ending=ENDINGS[ending])
    header = f"%%step start --timeout {timeout}" if ending == "timeout" else "%%step start"
    nb = write_notebook(tmp_path / "trees.ipynb", [f"{header}\n{code}", "%%step end\ny = 2"])
    return nb, pidfile


# the timeout case waits out its 10 s timeout: slow, not in the quick loop
@pytest.mark.parametrize("ending", [pytest.param(e, marks=pytest.mark.slow) if e == "timeout" else e
                                    for e in sorted(ENDINGS)])
def test_own_session_children_and_a_daemon_end_with_the_task(tmp_path, ending):
    nb, pidfile = _notebook(tmp_path, ending)
    proc = flowmagic("run", nb, store=tmp_path / "store")
    assert proc.returncode == (0 if ending == "success" else 1), proc.stdout + proc.stderr
    assert f"spawned {CHILDREN}" in proc.stdout
    pids = [int(p) for p in pidfile.read_text().split()]
    daemon = int(Path(f"{pidfile}.daemon").read_text())
    assert len(pids) == CHILDREN
    assert wait_gone([*pids, daemon], 5) == []


def test_own_session_children_end_when_the_run_is_interrupted(tmp_path):
    import signal

    nb, pidfile = _notebook(tmp_path, "timeout", timeout=300)   # it would sleep; Ctrl-C comes first
    proc = start_flowmagic("run", nb, store=tmp_path / "store")
    for line in proc.stdout:
        if "spawned" in line:
            break
    proc.send_signal(signal.SIGINT)
    rest = proc.communicate(timeout=60)[0]
    assert proc.returncode == 1 and "interrupted" in rest, rest
    pids = [int(p) for p in pidfile.read_text().split()]
    daemon = int(Path(f"{pidfile}.daemon").read_text())
    assert wait_gone([*pids, daemon], 5) == []


def test_the_fork_server_kills_a_finished_tasks_orphans_and_lives_on(tmp_path):
    """A kernel's fork server outlives its tasks: it is the one that kills."""
    pidfile = tmp_path / "pids.txt"
    server = ForkServer("", preload=()).start()
    try:
        proc = server.spawn("flowmagic.runtime.worker.forkserver:run_source")
        proc.channel.sendall((
            "import subprocess\n"
            f"pids = [subprocess.Popen(['sleep', '600'], start_new_session=True).pid for _ in range({CHILDREN})]\n"
            f"open({str(pidfile)!r}, 'w').write(' '.join(map(str, pids)))\n").encode())
        proc.channel.shutdown(1)
        status = b""
        while chunk := os.read(proc.status, 4096):
            status += chunk
        assert b"exit 0" in status
        pids = [int(p) for p in pidfile.read_text().split()]
        assert len(pids) == CHILDREN
        assert wait_gone(pids, 5) == []
        assert server.alive()
        proc.close()
    finally:
        server.close()
