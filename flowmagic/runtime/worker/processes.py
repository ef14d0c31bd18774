"""Process plumbing shared by the orchestrator, the fork server and tasks.

Why these exist: a task must never outlive the process that asked for it.
Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG)``) kills a child when
the *thread* that created it exits, so it is set in every level (fork server,
task) and checked against a race with ``getppid()`` right after.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1

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
