"""What runs inside a Dask worker process for one attempt (shipped by dask.py as a task function).

Each worker process keeps its own warm fork server (forkpool.get_server, one
per prelude), and each attempt runs in its own forked process through
local.run_local_attempt: retry and catch stay the orchestrator's, the
timeout kills the task's process group, ``--memory`` is watched here. Output
goes back as it is written through ``Worker.log_event`` on the run's topic;
an interrupt arrives as :func:`cancel_attempts` (``Client.run``).
"""
from __future__ import annotations

import os
import threading

from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.executors.base import AttemptRequest
from flowmagic.runtime.orchestrator.executors.local import not_started, run_local_attempt
from flowmagic.runtime.orchestrator.logs import LogLimits
from flowmagic.runtime.protocol import TaskSpec
from flowmagic.runtime.worker.forkpool import get_server

_cancels: dict[str, threading.Event] = {}   # attempt key -> its cancel flag, in this worker process
_lock = threading.Lock()


def _cancel_flag(key: str) -> threading.Event:
    with _lock:
        return _cancels.setdefault(key, threading.Event())


def cancel_attempts(keys: list[str]) -> int:
    """Kill these attempts if they run here (or when they start): called on every worker by Client.run."""
    for key in keys:
        _cancel_flag(key).set()
    return len(keys)


def run_remote_attempt(payload: dict) -> tuple[AttemptExit, int]:
    """Run one attempt on this worker; returns its exit and how many output events it sent."""
    from distributed import get_worker

    worker = get_worker()
    key, topic = payload["key"], payload["topic"]
    sent = [0]

    def send(message: dict) -> None:
        sent[0] += 1
        worker.log_event(topic, {"key": key, **message})

    cancel = _cancel_flag(key)
    spec = TaskSpec.from_json(payload["spec"])
    workdir = payload["workdir"] if payload["workdir"] and os.path.isdir(payload["workdir"]) else None
    request = AttemptRequest(
        info=None, attempt=spec.attempt, spec=spec, prelude=payload["prelude"],  # type: ignore[arg-type]
        flow_modules=tuple(payload["flow_modules"]), timeout=payload["timeout"], memory_mb=payload["memory_mb"],
        workdir=workdir, cancel=cancel, log_limits=LogLimits(**payload["log_limits"]),
        on_output=lambda stream, text: send({"stream": stream, "text": text}),
        on_message=lambda message: send({"message": message}))
    try:
        try:
            server = get_server(request.prelude, cwd=workdir, preload=request.flow_modules)
        except Exception as exc:  # noqa: BLE001 - the prelude fails here: the attempt never started
            return not_started(exc), sent[0]
        return run_local_attempt(server, request), sent[0]
    finally:
        with _lock:
            _cancels.pop(key, None)
