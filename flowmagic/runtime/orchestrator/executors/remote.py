"""What runs inside a Dask worker process for one attempt (shipped by dask.py as a task function).

Each worker process keeps its own warm fork server (forkpool.get_server, one
per prelude), and each attempt runs in its own forked process through
local.run_local_attempt: retry and catch stay the orchestrator's, the
timeout kills the task's process group, ``--memory`` is watched here. Output
goes back as it is written through ``Worker.log_event`` on the run's topic;
an interrupt arrives as :func:`cancel_attempts` (``Client.run``).

The store is the worker's business too. With a remote store (the spec's
``store_url``) the task reads its inputs from and writes its outputs to
the bucket through *this worker's* read cache, never the orchestrator's
directory (which another machine does not have); with a local store the
spec's ``objects_root`` must be a directory this worker sees (a shared
filesystem). A worker process checks the store before its first attempt
(and again after a failed check), so a worker that cannot use it fails its
attempts with one line that says why.

A ``--pypi`` step's attempt carries the lock the orchestrator resolved
(builder.Lock). The worker builds exactly those pins with uv into its own
cache (builder.worker_envs_root: ``FLOWMAGIC_ENV_CACHE``, keyed by the pins and
this worker's interpreter, a file lock so concurrent tasks build once), then
runs the attempt in a fork server of that environment's interpreter, as a
local ``--pypi`` step runs. A build that fails fails the attempt (not
started: ``--retry`` counts it) with one line naming the step, the worker
and the spec; the installer's whole report is the attempt's traceback.
"""
from __future__ import annotations

import dataclasses
import os
import threading

from flowmagic.runtime.environments import builder as environments
from flowmagic.runtime.environments.prelude import prelude_for_environment
from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.executors.base import AttemptRequest
from flowmagic.runtime.orchestrator.executors.local import not_started, run_local_attempt
from flowmagic.runtime.orchestrator.logs import LogLimits
from flowmagic.runtime.protocol import ExceptionRecord, TaskSpec
from flowmagic.runtime.worker.forkpool import get_server
from flowmagic.store.backends import STORE_ENV, backend_for, store_modules
from flowmagic.store.remote import CACHE_ENV, worker_cache_root

_cancels: dict[str, threading.Event] = {}   # attempt key -> its cancel flag, in this worker process
_lock = threading.Lock()
_usable: set[tuple[str, str | None]] = set()   # (objects_root, store_url) this worker process can use


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
    problem = store_problem(spec)
    if problem is not None:
        return not_started(StoreUnusable(f"Dask worker {worker.address}: {problem}")), sent[0]
    spec = worker_spec(spec)
    workdir = payload["workdir"] if payload["workdir"] and os.path.isdir(payload["workdir"]) else None
    request = AttemptRequest(
        info=None, attempt=spec.attempt, spec=spec, prelude=payload["prelude"],  # type: ignore[arg-type]
        flow_modules=tuple(payload["flow_modules"]), timeout=payload["timeout"], memory_mb=payload["memory_mb"],
        workdir=workdir, cancel=cancel, log_limits=LogLimits(**payload["log_limits"]),
        on_output=lambda stream, text: send({"stream": stream, "text": text}),
        on_message=lambda message: send({"message": message}))
    try:
        python, prelude = None, request.prelude
        if payload.get("environment"):
            try:
                env = worker_environment(environments.Lock.from_json(payload["environment"]), spec.step,
                                         worker.address, cancel, send)
            except environments.EnvironmentBuildError as exc:
                return build_failed(exc, worker.address), sent[0]
            except Exception as exc:  # noqa: BLE001 - an unforeseen failure: the attempt did not start either
                return not_started(exc), sent[0]
            python, prelude = str(env.python), prelude_for_environment(prelude)
        try:
            server = get_server(prelude, python=python, cwd=workdir,
                                preload=request.flow_modules + _store_modules(spec))
        except Exception as exc:  # noqa: BLE001 - the prelude fails here: the attempt never started
            return not_started(exc), sent[0]
        return run_local_attempt(server, request), sent[0]
    finally:
        with _lock:
            _cancels.pop(key, None)


def worker_environment(lock: environments.Lock, step: str, address: str, cancel: threading.Event,
                       send) -> environments.Environment:
    """This worker's environment for the lock, built on first use (the one building task says so in its
    output); a cancel stops the build, or the wait for another task's build."""
    def on_build() -> None:
        send({"stream": "stderr", "text": f"building the {lock.spec.describe()} environment on Dask worker "
                                          f"{address} ({len(lock.pins)} packages, from the run's lock)\n"})

    token = environments.build_stopped.set(cancel)
    try:
        return environments.environment_from_lock(lock, environments.worker_envs_root(), step=step,
                                                  on_build=on_build)
    finally:
        environments.build_stopped.reset(token)


def build_failed(exc: environments.EnvironmentBuildError, address: str) -> AttemptExit:
    """The attempt did not start: one line (step, worker, spec, the tool's last word); all of it below."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    head = lines[0].rstrip(":") if lines else type(exc).__name__
    said = lines[-1] if len(lines) > 1 else ""
    prefix = f"step '{exc.step}': " if exc.step else ""
    head = head.removeprefix(prefix)
    message = f"{prefix}Dask worker {address}: {head}" + (f": {said}" if said else "")
    attempt = not_started(exc)
    name = type(exc).__name__
    return dataclasses.replace(attempt, exception=ExceptionRecord(name, message, f"{name}: {message}\n\n{text}\n"))


class StoreUnusable(Exception):
    """This worker cannot reach the run's store (the attempt did not start)."""


def worker_spec(spec: TaskSpec) -> TaskSpec:
    """The spec as this worker runs it: a remote store's objects go through this worker's own cache."""
    if spec.store_url is None:
        return spec
    return dataclasses.replace(spec, objects_root=str(worker_cache_root()))


def store_problem(spec: TaskSpec) -> str | None:
    """Why this worker cannot use the run's store, or None (a usable store is checked once per process)."""
    where = (spec.objects_root, spec.store_url)
    with _lock:
        if where in _usable:
            return None
    problem = _check_store(*where)
    if problem is None:   # only success is remembered: a failure may pass (a network blip), so ask again
        with _lock:
            _usable.add(where)
    return problem


def _check_store(objects_root: str, url: str | None) -> str | None:
    if url is not None:
        cache = worker_cache_root()
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return (f"cannot make its read cache {cache} ({exc.strerror or exc}); set {CACHE_ENV} on the worker "
                    "to a writable directory")
        try:
            backend_for(url).check()   # this worker's credentials and endpoint, not the orchestrator's
        except Exception as exc:  # noqa: BLE001 - StoreError says it in one line; anything else too
            said = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return (f"{said}; a worker needs the store's credentials (and FLOWMAGIC_S3_ENDPOINT_URL, if any) "
                    "in its own environment")
        return None
    if not os.path.isdir(objects_root):
        return (f"the run's store {os.path.dirname(objects_root)} is not visible here: with a local store every "
                f"Dask worker needs it at the same path (a shared filesystem), or set {STORE_ENV}=s3://... "
                "on the orchestrator")
    return None


def _store_modules(spec: TaskSpec) -> tuple[str, ...]:
    """A remote store's file system (s3fs, botocore), imported once by the worker's fork server instead
    of by every task (the worker has no FLOWMAGIC_STORE of its own for backends.warm_up to see)."""
    return store_modules(spec.store_url) if spec.store_url is not None else ()
