"""A real Dask cluster for the tests: `dask scheduler` and `dask worker` started from their CLIs on
127.0.0.1 with free ports, each in its own process group, always killed at the end."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dask() -> str:
    return str(Path(sys.executable).parent / "dask")


class DaskCluster:
    def __init__(self, workers: int = 2, log_dir: Path | None = None,
                 worker_env: Callable[[int], dict[str, str]] | None = None,
                 worker_cwd: Callable[[int], Path] | None = None) -> None:
        """``worker_env(n)``/``worker_cwd(n)``: worker n's whole environment and working directory
        (as on another machine); by default the test's own."""
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.workers = workers
        self.log_dir = log_dir
        self.worker_env, self.worker_cwd = worker_env, worker_cwd
        self.procs: list[subprocess.Popen] = []

    def _start(self, args: list[str], name: str, env: dict[str, str] | None = None,
               cwd: Path | None = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else subprocess.DEVNULL
        proc = subprocess.Popen([_dask(), *args], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=cwd,
                                env={**(os.environ if env is None else env),
                                     "DASK_DISTRIBUTED__ADMIN__TICK__LIMIT": "30s"})
        self.procs.append(proc)
        return proc

    def start(self, timeout: float = 90) -> DaskCluster:
        self.scheduler = self._start(["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                                      "--no-dashboard"], "scheduler")
        for n in range(self.workers):
            self._start(["worker", f"tcp://{self.address}", "--host", "127.0.0.1", "--nthreads", "1",
                         "--nworkers", "1", "--no-dashboard", "--death-timeout", "15",
                         "--memory-limit", "0"], f"worker{n}",
                        self.worker_env(n) if self.worker_env else None,
                        self.worker_cwd(n) if self.worker_cwd else None)
        self.wait_for_workers(self.workers, timeout)
        return self

    def wait_for_workers(self, count: int, timeout: float = 90) -> None:
        from distributed import Client

        with Client(f"tcp://{self.address}", timeout=timeout, set_as_default=False) as client:
            client.wait_for_workers(count, timeout=timeout)

    def worker_processes(self) -> list[psutil.Process]:
        """The worker processes proper (the nannies' children), where tasks' fork servers live."""
        found = []
        for proc in self.procs[1:]:
            with contextlib.suppress(psutil.Error):
                found.extend(psutil.Process(proc.pid).children())
        return found

    def kill_scheduler(self) -> None:
        _killpg(self.scheduler)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _killpg(proc)


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


@contextlib.contextmanager
def dask_cluster(workers: int = 2, log_dir: Path | None = None, **worker_setup):
    cluster = DaskCluster(workers, log_dir, **worker_setup)
    try:
        yield cluster.start()
    finally:
        cluster.stop()
        time.sleep(0)   # nothing to wait for: every process was SIGKILLed and reaped
