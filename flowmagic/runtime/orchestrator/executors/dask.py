"""The Dask executor: each attempt is one task on a Dask distributed cluster.

The orchestrator stays here (it alone writes metadata); a worker runs the
attempt in a forked process of its own fork server (remote.py) and the task
reads and writes its objects itself: in a remote store (``FLOWMAGIC_STORE``,
through the worker's own read cache), or in a local store, which must then
be a path every worker sees (a shared filesystem). Dask itself
re-runs a task whose worker died (``distributed.scheduler.allowed-failures``);
flowmagic's ``--retry``/``--catch`` count attempts as they do locally.
Output comes back as it is written through the run's event topic
(``Worker.log_event`` -> ``Client.subscribe_topic``); Ctrl-C kills the
running attempts on the workers (``Client.run``) and cancels their futures.
A ``--pypi`` step's environment is resolved once, here (builds.StepServers),
and its lock travels with each attempt; the worker builds it (remote.py).
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid

from flowmagic.errors import UsageError
from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.executors import remote
from flowmagic.runtime.orchestrator.executors.base import AttemptRequest
from flowmagic.runtime.orchestrator.executors.local import crashed
from flowmagic.runtime.orchestrator.logs import number_from_env
from flowmagic.runtime.protocol import ExceptionRecord

CONNECT_TIMEOUT_VAR = "FLOWMAGIC_DASK_CONNECT_TIMEOUT"
DEFAULT_CONNECT_TIMEOUT = 10.0   # seconds
OUTPUT_GRACE = 2.0               # how long to wait for output events still in flight after the result
IN_FLIGHT_PER_THREAD = 4         # attempts submitted per worker thread (--max-workers overrides)
CANCEL_GRACE = 5.0               # how long a killed attempt gets to report before its future is dropped


# Dask logs a lost or closed connection as tracebacks on stderr; flowmagic says it in one line
# (the attempt fails with "lost the Dask scheduler at ..."), so those loggers only speak when critical.
_QUIET = ("distributed.client", "distributed.comm", "distributed.batched", "distributed.utils",
          "distributed.core")


def _quiet_dask_logs() -> None:
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)


def connect_timeout() -> float:
    return number_from_env(CONNECT_TIMEOUT_VAR, DEFAULT_CONNECT_TIMEOUT, convert=float,
                           accept=lambda v: not v <= 0, expected="a positive number of seconds")


class DaskExecutor:
    """A connected ``distributed.Client`` and the output listeners of the attempts it runs."""

    def __init__(self, client, address: str, max_workers: int | None) -> None:
        self.client, self.address = client, address
        self.name = f"dask://{address}"
        self.topic = f"flowmagic-{uuid.uuid4().hex}"
        self._listeners: dict[str, tuple[AttemptRequest, list[int]]] = {}   # key -> (request, [events seen])
        self._lock = threading.Lock()
        self._environments = None   # the run's builds.StepServers: the locks of --pypi steps
        # attempts in flight: a few per worker thread, so the next task waits on the worker, not a round trip
        self._slots = max_workers or IN_FLIGHT_PER_THREAD * max(1, sum(client.nthreads().values()))
        client.subscribe_topic(self.topic, self._on_event)

    @classmethod
    def connect(cls, address: str, *, max_workers: int | None = None) -> DaskExecutor:
        """Connect to the scheduler at HOST:PORT; a one-line UsageError (exit 2) if it cannot be reached."""
        timeout = connect_timeout()
        from distributed import Client

        url = address if "://" in address else f"tcp://{address}"
        _quiet_dask_logs()
        try:
            client = Client(url, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the Dask scheduler at {url} within {timeout:g} s "
                             f"({type(exc).__name__}; {CONNECT_TIMEOUT_VAR} sets the wait): "
                             "is `dask scheduler` running there? No run was recorded") from None
        return cls(client, url, max_workers)

    def use_environments(self, servers) -> None:
        """Where the locks of this run's --pypi steps are (Executors.attach_local)."""
        self._environments = servers

    def slots(self) -> int:
        return self._slots

    def prepare(self, request: AttemptRequest) -> None:
        self._lock_of(request)   # a --pypi step goes with its lock, or not at all (RunError: not started)
        # the worker starts its fork server itself

    def run_attempt(self, request: AttemptRequest) -> AttemptExit:
        spec = request.spec
        key = f"flowmagic-{spec.flow}-{spec.run_id}-{spec.task_id}-{spec.attempt}-{uuid.uuid4().hex[:8]}"
        seen = [0]
        with self._lock:
            self._listeners[key] = (request, seen)
        started = time.time()
        try:
            return self._run(request, key, seen, started)
        except Exception as exc:  # noqa: BLE001 - the client is closed, the scheduler gone: the attempt failed
            return self._failed(f"{type(exc).__name__}: {exc}", started)
        finally:
            with self._lock:
                self._listeners.pop(key, None)

    def _run(self, request: AttemptRequest, key: str, seen: list[int], started: float) -> AttemptExit:
        future = self.client.submit(remote.run_remote_attempt, self._payload(request, key), key=key, pure=False)
        done = threading.Event()
        future.add_done_callback(lambda _f: done.set())
        while not done.wait(0.25):
            if request.cancel.is_set():
                return self._cancel(future, key, done, started)
        if future.status == "cancelled":
            return self._failed(f"lost the Dask scheduler at {self.address} while the task ran", started)
        if future.status == "error":
            exc = future.exception()
            if type(exc).__name__ == "KilledWorker":
                return self._failed(f"Dask gave the task up: its worker died on every try ({exc})", started)
            return self._failed(f"{type(exc).__name__}: {exc}", started)
        result, sent = future.result()
        deadline = time.monotonic() + OUTPUT_GRACE
        while seen[0] < sent and time.monotonic() < deadline:   # output events travel apart from the result
            time.sleep(0.01)
        return result

    def _cancel(self, future, key: str, done: threading.Event, started: float) -> AttemptExit:
        try:
            self.client.run(remote.cancel_attempts, [key])   # every worker: kills the task's group where it runs
        except Exception:  # noqa: BLE001 - the cluster is going away anyway
            pass
        if done.wait(CANCEL_GRACE) and future.status == "finished":
            return future.result()[0]
        future.cancel()
        now = time.time()
        return AttemptExit("interrupted", None, None, None, "", "", started, now,
                           exception=ExceptionRecord.plain("KeyboardInterrupt", "the run was interrupted"))

    def _failed(self, message: str, started: float) -> AttemptExit:
        return dataclasses.replace(crashed(message), started_at=started)

    def _payload(self, request: AttemptRequest, key: str) -> dict:
        return {"key": key, "topic": self.topic, "spec": request.spec.to_json(), "prelude": request.prelude,
                "flow_modules": list(request.flow_modules), "timeout": request.timeout,
                "memory_mb": request.memory_mb, "workdir": request.workdir,
                "log_limits": dataclasses.asdict(request.log_limits), "environment": self._lock_of(request)}

    def _lock_of(self, request: AttemptRequest) -> dict | None:
        """The step's resolved --pypi environment (the engine waited for it), or None."""
        lock = self._environments.lock_for(request.info.step) if self._environments is not None else None
        return lock.to_json() if lock is not None else None

    def _on_event(self, event) -> None:
        """On the client's event loop: one output chunk or display message of a running attempt."""
        _when, message = event
        with self._lock:
            found = self._listeners.get(message.get("key"))
        if found is None:
            return   # an attempt given up (or a worker's output after a cancel)
        request, seen = found
        if "text" in message:
            request.on_output(message["stream"], message["text"])
        elif "message" in message:
            request.on_message(message["message"])
        seen[0] += 1

    def close(self) -> None:
        try:
            self.client.unsubscribe_topic(self.topic)
        except Exception:  # noqa: BLE001 - a closed client
            pass
        try:
            self.client.close(timeout=5)
        except Exception:  # noqa: BLE001 - the scheduler is gone: nothing to close
            pass
