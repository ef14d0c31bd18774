"""The local executor: today's path, a warm fork server on this machine forks one child per task.

:func:`run_local_attempt` is the one way an attempt runs in a forked process
(timeout, kill of the process group, the ``--memory`` watchdog, a fork server
that died restarted once); the Dask workers call it too (remote.py), so a
task behaves the same wherever it runs.
"""
from __future__ import annotations

import os
import time
from collections.abc import Callable

from flowmagic.runtime.orchestrator import memory
from flowmagic.runtime.orchestrator.attempt import AttemptExit, BatchEnd, BatchTask, run_attempt, run_batch
from flowmagic.runtime.orchestrator.executors.base import AttemptRequest
from flowmagic.runtime.orchestrator.inputs import binding_serializers
from flowmagic.runtime.protocol import ExceptionRecord
from flowmagic.runtime.worker.forkpool import ForkServer, get_server
from flowmagic.runtime.worker.forkserver import ForkServerDied, flow_preload


def run_local_attempt(server: ForkServer, request: AttemptRequest,
                      restart: Callable[[ForkServer], ForkServer] | None = None) -> AttemptExit:
    """Run the attempt in a child of ``server``; a dead server is replaced once (``restart``)."""
    restart = restart or _restarted
    watch = memory.MemoryWatch(request.spec.step, request.memory_mb)   # kills the group over its limit
    for tries in range(2):
        try:
            result = run_attempt(server, request.spec, timeout=request.timeout, on_output=request.on_output,
                                 on_message=request.on_message, cancel=request.cancel, on_start=watch.start,
                                 log_limits=request.log_limits)
            break
        except ForkServerDied:
            if tries:
                result = crashed("the fork server died and could not be restarted")
                break
            server = restart(server)
        except BaseException as exc:  # noqa: BLE001 - reported as the attempt's failure
            result = crashed(f"{type(exc).__name__}: {exc}")
            break
    return watch.verdict(result)


def _restarted(old: ForkServer) -> ForkServer:
    return get_server(old.prelude, python=old.python, cwd=old.cwd, preload=old.flow_modules)


class LocalExecutor:
    """Fork servers on this machine (one per step's interpreter: builds.StepServers)."""

    name = "local"

    def __init__(self, servers, max_workers: int | None = None) -> None:
        self.servers = servers
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)

    def slots(self) -> int:
        return self.max_workers

    def prepare(self, request: AttemptRequest) -> None:
        server = self.servers.server_for(request.info.step)
        # what the server did not preload for the flow: an environment's server knows only its
        # prelude, and a resumed step may read a frame though its code never names pandas
        server.ensure_preloaded(flow_preload([request.spec.code], input_serializers(request.spec)))
        request.server = server

    def run_attempt(self, request: AttemptRequest) -> AttemptExit:
        server = request.server
        assert isinstance(server, ForkServer)
        return run_local_attempt(server, request)   # its server's cwd is the run's workdir (StepServers)

    def run_batch(self, requests: list[AttemptRequest], on_started: Callable[[int], None],
                  on_finished: Callable[[int, AttemptExit], None]) -> BatchEnd:
        """Run the first attempts of several tasks of one step in one forked process (worker/batch.py).

        A fork server that died before the batch started is replaced once, as for one attempt."""
        first = requests[0]
        server = first.server
        assert isinstance(server, ForkServer)
        watch = memory.MemoryWatch(first.spec.step, first.memory_mb)   # one process: one watch
        tasks = [BatchTask(r.spec, r.on_output, r.on_message) for r in requests]
        for tries in range(2):
            try:
                return run_batch(server, tasks, timeout=first.timeout, on_started=on_started,
                                 on_finished=on_finished, on_start=watch.start, judge_last=watch.verdict,
                                 cancel=first.cancel, log_limits=first.log_limits)
            except ForkServerDied:
                if tries:
                    on_finished(0, crashed("the fork server died and could not be restarted"))
                    return BatchEnd(1)
                server = _restarted(server)
            finally:
                watch.stop()
        raise AssertionError("unreachable")

    def close(self) -> None:
        pass   # the fork servers are shared and outlive the run (forkpool keeps them warm)


def input_serializers(spec) -> set[str]:
    """The serializers of every artifact a task loads (an Arrow one needs pyarrow, maybe pandas)."""
    return binding_serializers(spec.input_bindings())


def not_started(exc: BaseException) -> AttemptExit:
    now = time.time()
    return AttemptExit("failed", None, None, None, "", "", now, now,
                       exception=ExceptionRecord.plain(type(exc).__name__, str(exc)))


def crashed(message: str) -> AttemptExit:
    now = time.time()
    # the traceback is the message alone, as earlier releases stored it
    return AttemptExit("killed", None, None, None, "", "", now, now,
                       exception=ExceptionRecord("RunError", message, message + "\n"))

