"""Helpers for the runtime's end-to-end tests: notebooks on disk, the real
``flowmagic`` console command in a subprocess, and what is left running."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import psutil

from flowmagic.store import open_store


def write_notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbformat.v4.new_code_cell(c)
                for c in cells]
    nbformat.write(nb, path)
    return path


def command() -> list[str]:
    exe = shutil.which("flowmagic")
    return [exe] if exe else [sys.executable, "-m", "flowmagic.cli.main"]


def env_for(store: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLOWMAGIC_HOME"] = str(store)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def flowmagic(*args: str, store: Path, cwd: Path | None = None, timeout: float = 180,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *map(str, args)], capture_output=True, text=True,
                          env={**env_for(store), **(env or {})}, cwd=cwd, timeout=timeout)


def flowmagic_json(*args: str, store: Path, expect: int = 0, **kw) -> dict:
    proc = flowmagic(*args, "--json", store=store, **kw)
    assert proc.returncode == expect, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return json.loads(proc.stdout)


def start_flowmagic(*args: str, store: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([*command(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**env_for(store), **(extra_env or {})})


@contextlib.contextmanager
def reaped(proc: subprocess.Popen):
    """The block may kill ``proc`` (see :func:`sigkill`); whatever happens, it is gone and its stdout closed after."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None:
            proc.stdout.close()


def sigkill(proc: subprocess.Popen) -> None:
    """Kill ``proc`` as a crash would (no cleanup of its own) and reap it."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def artifacts(store: Path, flow: str, run_id: int, step: str) -> list[dict]:
    """Every task's artifacts (values loaded) of one step, in index order."""
    from flowmagic.store import load_artifact

    s = open_store(store)
    try:
        tasks = sorted(s.meta.tasks(flow, run_id, step), key=lambda t: t.index or ())
        return [{r.name: load_artifact(s.objects, r) for r in s.meta.artifacts(t.task_id) if r.serializer != "unsaved"}
                for t in tasks]
    finally:
        s.close()


def tasks(store: Path, flow: str, run_id: int, step: str | None = None):
    s = open_store(store)
    try:
        return sorted(s.meta.tasks(flow, run_id, step), key=lambda t: (t.step, t.index or ()))
    finally:
        s.close()


def attempts(store: Path, task_id: int):
    s = open_store(store)
    try:
        return s.meta.attempts(task_id)
    finally:
        s.close()


def run_record(store: Path, flow: str, run_id: int):
    s = open_store(store)
    try:
        return s.meta.get_run(flow, run_id)
    finally:
        s.close()


def processes_with_marker(marker: str) -> list[psutil.Process]:
    """Live processes whose command line or environment mentions ``marker``."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _alive(p)]
        if alive:
            time.sleep(0.05)
    return alive


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def peak_rss_until_exit(proc: subprocess.Popen, interval: float = 0.01) -> int:
    """Sample the process's RSS until it exits; the peak, in bytes."""
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(interval)
    return peak


def drain_cell(kernel, code: str, timeout: float = 300) -> tuple[int, list[str]]:
    """Execute a cell in a kernel fixture (``kernel.kc``: a jupyter_client) and wait for it,
    counting its stream characters without keeping them: (count, error names)."""
    return wait_idle_counting(kernel, kernel.kc.execute(code), timeout)


def wait_idle_counting(kernel, msg_id: str, timeout: float = 300) -> tuple[int, list[str]]:
    """Wait until the request ``msg_id`` is done: (its stream characters, its error names)."""
    count, errors = 0, []
    while True:
        io = kernel.kc.get_iopub_msg(timeout=timeout)
        if io["parent_header"].get("msg_id") != msg_id:
            continue
        kind = io["header"]["msg_type"]
        if kind == "stream":
            count += len(io["content"]["text"])
        elif kind == "error":
            errors.append(io["content"]["ename"])
        elif kind == "status" and io["content"]["execution_state"] == "idle":
            return count, errors
