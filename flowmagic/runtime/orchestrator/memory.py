"""The memory watchdog: a task that blows up memory is killed, not the machine.

A step runs in a forked process, so a leak cannot corrupt the kernel, but it
can still eat the machine until Linux's OOM killer picks a victim, and the
victim may be the notebook's kernel. So the orchestrator watches each task's
process group and kills the group (SIGKILL) when it uses more than its limit;
the attempt then fails with "out of memory: step 'X' used N GiB, limit M GiB"
and is retried or caught like any other failure.

The limit is the step's ``--memory MB`` option (Metaflow's
``@resources(memory=MB)``), else ``DEFAULT_FRACTION`` (80%) of the machine's
total memory minus what the orchestrator process (the kernel, or the console
command) itself uses: a runaway step is stopped before it can starve the
kernel, and an ordinary step never notices the guard.

What counts is the task's anonymous memory, proportional share, plus swap
(``Pss_Anon`` and ``SwapPss`` of ``/proc/PID/smaps_rollup``). File pages of
memory-mapped inputs are not its memory (even dirty ones: an object written a
moment ago is still dirty in the page cache), and pages it shares
copy-on-write with its warm fork server (numpy, pandas, the prelude's values)
count only in part: counting RSS would kill a step for reading a big
memory-mapped data frame. RSS bounds the resident part of
that figure and costs one small read per process, so each poll reads RSS
only, and the precise figure once RSS is over the limit (and every
``_FULL_SCAN_EVERY`` polls, for swap).

Cost: one thread per running task, polling every ``POLL_INTERVAL`` seconds;
a poll reads two small /proc files per process of the task's tree (~0.07 ms
for a task without children), and smaps_rollup (~0.5 ms) only past the limit.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading
from collections.abc import Callable

from flowmagic.runtime.protocol import ExceptionRecord

POLL_INTERVAL = 0.15       # seconds between polls: a leak of 1 GB/s overshoots by ~150 MB
DEFAULT_FRACTION = 0.8     # of total memory, minus the orchestrator's own, when --memory is not set
MB = 1024 * 1024
GIB = 1024 ** 3
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_FULL_SCAN_EVERY = 10      # polls between scans of /proc for group members the tree walk misses


# psutil (~20 ms to import) only where /proc cannot answer: not on the path of every run.


@functools.lru_cache(maxsize=1)
def _total_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * _PAGE
    except (ValueError, OSError, AttributeError):
        import psutil

        return psutil.virtual_memory().total


def default_limit() -> int:
    """Bytes a task may use when its step sets no ``--memory`` (computed per attempt:
    the orchestrator's own memory changes as a notebook binds data)."""
    return max(int(_total_memory() * DEFAULT_FRACTION) - rss(os.getpid()), 256 * MB)


def limit_for(memory_mb: int | None) -> int:
    """The limit in bytes for a step's ``--memory`` option (None: the default)."""
    return memory_mb * MB if memory_mb else default_limit()


def out_of_memory_message(step: str, used: int, limit: int, memory_mb: int | None) -> str:
    where = (f"--memory {memory_mb}; raise it with --memory MB" if memory_mb else
             f"the default, {DEFAULT_FRACTION:.0%} of this machine's memory; set --memory MB")
    return f"out of memory: step '{step}' used {used / GIB:.2f} GiB, limit {limit / GIB:.2f} GiB ({where})"


# ----------------------------------------------------------------------------- measuring


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:   # not Linux (or gone): psutil walks the process table
        import psutil

        try:
            return [child.pid for child in psutil.Process(pid).children()]
        except psutil.Error:
            return kids
    for tid in threads:
        data = _read(f"/proc/{pid}/task/{tid}/children")
        if data:
            kids.extend(int(x) for x in data.split())
    return kids


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def group_members(pgid: int, extra: set[int] = frozenset()) -> set[int]:
    """The processes of the task's group: its tree (children files), plus ``extra``
    (members found earlier by a full scan, e.g. re-parented to init)."""
    found: set[int] = set()
    stack = [pgid, *extra]
    while stack:
        pid = stack.pop()
        if pid in found or _pgid(pid) != pgid:
            continue
        found.add(pid)
        stack.extend(_children(pid))
    return found


def scan_group(pgid: int) -> set[int]:
    """Every live process whose group is ``pgid`` (one getpgid per process: ~0.15 ms for 150)."""
    members = set()
    for pid in _pids():
        if _pgid(pid) == pgid:
            members.add(pid)
    return members


def _pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:   # not Linux
        import psutil

        return psutil.pids()


def rss(pid: int) -> int:
    data = _read(f"/proc/{pid}/statm")
    if data is None:   # not Linux, or the process is gone
        import psutil

        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return 0
    return int(data.split()[1]) * _PAGE


def private_memory(pid: int) -> int:
    """The process's share of anonymous memory (Pss_Anon: its own pages in
    full, pages shared copy-on-write with its fork server in part) plus swap."""
    data = _read(f"/proc/{pid}/smaps_rollup")
    if data is None:
        import psutil

        try:
            info = psutil.Process(pid).memory_full_info()   # other systems: USS
            return info.uss + getattr(info, "swap", 0)
        except psutil.Error:
            return 0
    fields = {}
    for line in data.splitlines():
        key, _, rest = line.partition(b":")
        if rest.strip():
            fields[key] = int(rest.split()[0]) * 1024
    own = fields.get(b"Pss_Anon", fields.get(b"Private_Dirty", 0))   # Pss_Anon: Linux 5.10+
    return own + fields.get(b"SwapPss", fields.get(b"Swap", 0))


# ----------------------------------------------------------------------------- the watchdog


class MemoryWatch:
    """Watches one task (one attempt at a time): ``start(proc)`` when it is
    forked, ``verdict(result)`` when the attempt is over."""

    def __init__(self, step: str, memory_mb: int | None, interval: float = POLL_INTERVAL) -> None:
        self.step = step
        self.memory_mb = memory_mb
        self.limit = limit_for(memory_mb)
        self.interval = interval
        self.used: int | None = None            # set when the task was killed for its memory
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, proc) -> None:
        """``proc``: a forked TaskProcess (``pid`` leads its own group; ``kill(sig)``)."""
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(proc.pid, proc.kill, self._stop),
                                        name=f"flowmagic-memory-{proc.pid}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def verdict(self, result):
        """The attempt's result, as an out-of-memory failure if the watchdog killed it."""
        self.stop()
        if self.used is None or result.outcome == "ok":
            return result   # a task that finished before the kill landed keeps its result
        message = out_of_memory_message(self.step, self.used, self.limit, self.memory_mb)
        return dataclasses.replace(result, outcome="killed", exception=ExceptionRecord.plain("MemoryError", message))

    def _watch(self, pgid: int, kill: Callable[[int], None], stop: threading.Event) -> None:
        extra: set[int] = set()
        polls = 0
        while not stop.wait(self.interval):
            polls += 1
            thorough = polls % _FULL_SCAN_EVERY == 0
            if thorough:   # also the precise figure: swapped-out memory is not in RSS
                extra = scan_group(pgid)
            members = group_members(pgid, extra)
            if not thorough and sum(rss(pid) for pid in members) <= self.limit:
                continue
            used = sum(private_memory(pid) for pid in members)
            if used > self.limit:
                self.used = used
                kill(signal.SIGKILL)
                return
