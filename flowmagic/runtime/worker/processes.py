"""Process plumbing shared by the orchestrator, the fork server and tasks.

Why these exist: a task must never outlive the process that asked for it.
Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) kills a child when
the *thread* that created it exits, so it is set in every level (fork server,
task) and checked against a race with ``getppid()`` right after.

A step's subprocesses that start their own session (``start_new_session``,
a daemon's double fork) escape its process group. So the fork server and
each task are *subreapers* (``PR_SET_CHILD_SUBREAPER``): a descendant whose
parent dies re-parents to the nearest living task, or, once that task has
ended, to the fork server, which kills it (:func:`kill_orphans`). cgroup v2
would do the same without the fork server; it is often not writable (a
container), so the subreaper is the one mechanism. Linux only: elsewhere
these are no-ops and such descendants survive (README, limits).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
ORPHAN_SWEEPS = 200   # rounds of kill-and-reap; each round catches what the last one's deaths re-parented

_libc = None


def _load_libc():
    global _libc
    if _libc is None:
        try:
            # The process's own symbols include libc's; find_library("c") would run ldconfig (~10 ms).
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.prctl  # noqa: B018 - raises AttributeError where the C library is elsewhere
        except (OSError, AttributeError):
            try:
                _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            except OSError:
                _libc = False
    return _libc


def die_with_parent(expected_parent: int, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` (SIGKILL) to this process when its parent exits.

    ``expected_parent`` is the pid the caller believes is its parent: if it
    has already died (we were re-parented before prctl took effect), exit now.
    """
    libc = _load_libc()
    if libc and sys.platform.startswith("linux"):
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    if os.getppid() != expected_parent:
        os._exit(137)


def become_subreaper() -> bool:
    """Adopt this process's orphaned descendants (Linux); False where it cannot."""
    libc = _load_libc()
    if not (libc and sys.platform.startswith("linux")):
        return False
    return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def children_of(pid: int) -> set[int]:
    """The direct children of ``pid`` (zombies included): /proc first, psutil elsewhere."""
    found: set[int] = set()
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.update(int(c) for c in f.read().split())
        return found
    except (FileNotFoundError, NotADirectoryError):
        pass
    except OSError:
        return found
    try:
        import psutil  # here: a fork server in a --pypi environment may lack it
        return {child.pid for child in psutil.Process(pid).children()}
    except Exception:  # noqa: BLE001 - no psutil, or the process is gone
        return found


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for child in children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


def kill_orphans(keep: set[int]) -> int:
    """Kill and reap this process's children that are not in ``keep``, with
    every descendant of theirs; repeat while deaths re-parent more to us.
    Returns how many children were killed."""
    me, killed = os.getpid(), 0
    for _ in range(ORPHAN_SWEEPS):
        foreign = children_of(me) - keep
        if not foreign:
            break
        for child in foreign:
            # The whole subtree is listed before any of it dies; what forks or
            # re-parents to us meanwhile is caught by the next round.
            for pid in [child, *_descendants(child)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        killed += len(foreign)
        _reap(foreign)
    return killed


def _reap(pids: set[int], timeout: float = 2.0) -> None:
    """Reap killed children; one that cannot die (a setuid child we may not
    signal) is left after ``timeout`` rather than hang the fork server."""
    deadline = time.monotonic() + timeout
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    pending.discard(pid)
            except ChildProcessError:
                pending.discard(pid)
        if pending:
            time.sleep(0.005)


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> bool:
    """Signal a whole process group; False when it no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def describe_wait_status(status: int) -> tuple[int | None, int | None]:
    """(exit_code, signal) from a raw ``waitpid`` status."""
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status)
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status), None
    return None, None


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
