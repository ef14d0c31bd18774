"""Is a run's orchestrator still alive? A run row records the pid, the start
time and the host of the process that runs it; the pid alone is not enough
(pids are reused), and means nothing on another machine sharing the store.

The start is compared in clock ticks since boot (``/proc/PID/stat``), which
never change for a process. psutil's wall-clock start is those ticks plus the
boot time, which moves whenever the wall clock is stepped (NTP, a resumed
virtual machine): a live kernel's recorded start would then differ from the
one computed later, and its run would read as crashed (and gc would treat it
as finished). The wall-clock start is still recorded, for stores read by
older releases and for machines without ``/proc``.
"""
from __future__ import annotations

import os
import socket
from typing import NamedTuple

# psutil's wall-clock start times of the same process agree within this
# tolerance while the clock is not stepped: the check for rows without ticks
_START_TOLERANCE_S = 1.0


class ProcessStamp(NamedTuple):
    """Who runs a run: enough to tell later whether that very process still lives."""

    pid: int
    started: float | None      # wall-clock start (psutil's create_time)
    host: str
    ticks: int | None          # start in clock ticks since boot; None without /proc


def start_ticks(pid: int) -> int | None:
    """The process's start in clock ticks since boot, or None (no such process, no /proc)."""
    stat = _stat_fields(pid)
    return int(stat[19]) if stat is not None else None


def _stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 (state) on; the command name before it may hold spaces."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()


def this_process() -> ProcessStamp:
    """The calling process's stamp."""
    pid = os.getpid()
    ticks, started = _own_start()
    return ProcessStamp(pid, started, socket.gethostname(), ticks)


_own: dict[int, tuple[int | None, float | None]] = {}


def _own_start() -> tuple[int | None, float | None]:
    pid = os.getpid()  # keyed by pid: a forked child has its own start
    if pid not in _own:
        _own[pid] = (start_ticks(pid), _wall_clock_start(pid))
    return _own[pid]


def _wall_clock_start(pid: int) -> float | None:
    import psutil  # here: a task in a --pypi environment imports the store, and may lack psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def orchestrator_gone(pid: int | None, started: float | None, host: str | None,
                      ticks: int | None = None) -> bool:
    """True only when we can tell for sure: same host, and no such process
    (or a zombie, or another process that reuses the pid)."""
    if pid is None or host != socket.gethostname():
        return False  # an older run without a pid, or another machine's: cannot tell
    if ticks is not None:
        return _gone_by_ticks(pid, ticks)
    return _gone_by_wall_clock(pid, started)


def _gone_by_ticks(pid: int, ticks: int) -> bool:
    if pid == os.getpid():  # the engine reading its own tasks: no process table per read
        return _own_start()[0] != ticks
    stat = _stat_fields(pid)
    if stat is None:
        return True   # no such process (ticks were recorded, so this machine has /proc)
    return stat[0] == b"Z" or int(stat[19]) != ticks


def _gone_by_wall_clock(pid: int, started: float | None) -> bool:
    """For runs recorded without ticks (older releases)."""
    if pid == os.getpid():
        own = _own_start()[1]
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
