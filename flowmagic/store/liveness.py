"""Is a run's orchestrator still alive? A run row records the pid, the start
time and the host of the process that runs it; the pid alone is not enough
(pids are reused), and means nothing on another machine sharing the store."""
from __future__ import annotations

import os
import socket

# psutil derives start times from boot time and clock ticks: equal to the
# recorded one within this tolerance for the same process
_START_TOLERANCE_S = 1.0


def this_process() -> tuple[int, float | None, str]:
    """``(pid, start time, host)`` of the calling process."""
    import psutil  # here: a task in a --pypi environment imports the store, and may lack psutil

    pid = os.getpid()
    try:
        started: float | None = psutil.Process(pid).create_time()
    except psutil.Error:
        started = None
    return pid, started, socket.gethostname()


_own: dict[int, float | None] = {}


def _own_start() -> float | None:
    pid = os.getpid()  # keyed by pid: a forked child has its own start time
    if pid not in _own:
        _own[pid] = this_process()[1]
    return _own[pid]


def orchestrator_gone(pid: int | None, started: float | None, host: str | None) -> bool:
    """True only when we can tell for sure: same host, and no such process
    (or a zombie, or another process that reuses the pid)."""
    if pid is None or host != socket.gethostname():
        return False  # an older run without a pid, or another machine's: cannot tell
    if pid == os.getpid():  # the engine reading its own tasks: no process table per read
        own = _own_start()
        return started is not None and own is not None and abs(own - started) > _START_TOLERANCE_S
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return True
        return started is not None and abs(proc.create_time() - started) > _START_TOLERANCE_S
    except psutil.NoSuchProcess:
        return True
    except psutil.Error:  # AccessDenied: it exists
        return False
