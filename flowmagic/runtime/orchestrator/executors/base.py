"""The executor seam: what the engine hands an executor for one attempt, and which executor runs a step.

The engine decides *what* runs (specs, retries, catch, metadata); an
executor decides *where*: ``executors.for_step(step).run_attempt(request)``
on one of the engine's worker threads. :func:`chosen_executor` reads the
run's ``--executor`` (or ``$FLOWMAGIC_EXECUTOR``) and each step's own
``--executor``; :class:`Executors` connects what the run needs *before* the
run is recorded, so an unreachable scheduler records nothing.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Protocol

from flowmagic.errors import UsageError, cell_number
from flowmagic.runtime.orchestrator.attempt import AttemptExit, MessageCallback, OutputCallback
from flowmagic.runtime.orchestrator.tasks import TaskInfo
from flowmagic.runtime.orchestrator.logs import LogLimits
from flowmagic.runtime.protocol import TaskSpec

EXECUTOR_VAR = "FLOWMAGIC_EXECUTOR"             # the run's default: local | dask://HOST:PORT
DASK_SCHEDULER_VAR = "FLOWMAGIC_DASK_SCHEDULER"  # where a step's bare `--executor dask` goes
LOCAL = "local"


@dataclass
class AttemptRequest:
    """One attempt of one task, as every executor gets it."""

    info: TaskInfo
    attempt: int
    spec: TaskSpec
    prelude: str
    flow_modules: tuple[str, ...]    # what the fork server imports first (pandas only if the flow uses it)
    timeout: float | None
    memory_mb: int | None
    workdir: str | None
    cancel: threading.Event          # set by Ctrl-C: the attempt is killed wherever it runs
    log_limits: LogLimits
    on_output: OutputCallback
    on_message: MessageCallback
    server: object | None = None     # the local fork server (LocalExecutor.prepare)


class Executor(Protocol):
    """Runs attempts somewhere; ``prepare`` on the engine's thread, ``run_attempt`` on a worker thread."""

    name: str

    def slots(self) -> int:
        """How many attempts may run at once here."""

    def prepare(self, request: AttemptRequest) -> None:
        """Get ready for the attempt (raise RunError if it cannot start: it fails as not started)."""

    def run_attempt(self, request: AttemptRequest) -> AttemptExit: ...

    def close(self) -> None: ...


def run_executor(given: str | None) -> str:
    """The run's executor: ``--executor``, else $FLOWMAGIC_EXECUTOR, else local (checked: exit 2 if bad)."""
    value = (given or os.environ.get(EXECUTOR_VAR, "") or LOCAL).strip()
    if value == LOCAL or (value.startswith("dask://") and len(value) > len("dask://")):
        return value
    where = "--executor" if given else EXECUTOR_VAR
    raise UsageError(f"{where}={value!r}: expected local or dask://HOST:PORT (e.g. dask://127.0.0.1:8786)")


def chosen_executor(step, run_value: str) -> str:
    """Where ``step``'s tasks run: ``local`` or a ``dask://HOST:PORT`` address."""
    own = step.options.executor
    if own is None:
        return run_value
    if own == "dask":
        if run_value.startswith("dask://"):
            return run_value
        address = os.environ.get(DASK_SCHEDULER_VAR, "").strip()
        if not address:
            raise UsageError(f"step '{step.name}' (cell {cell_number(step.cell)}) has --executor dask but no "
                             f"scheduler is given: run with --executor dask://HOST:PORT or set {DASK_SCHEDULER_VAR}")
        return address if address.startswith("dask://") else "dask://" + address.removeprefix("tcp://")
    return own


class Executors:
    """The executor of each step of one run: its Dask ones connected once per address, and the local one
    (attached by the engine, which owns the fork servers)."""

    def __init__(self, by_step: dict[str, str] | None = None, remote: dict[str, Executor] | None = None) -> None:
        self._by_step = by_step or {}
        self._made: dict[str, Executor] = dict(remote or {})

    @classmethod
    def for_run(cls, graph, given: str | None, steps, *, max_workers: int | None = None) -> Executors:
        """Connect what ``steps`` (the ones this run executes) need; raises UsageError before anything runs."""
        run_value = run_executor(given)
        by_step = {s.name: chosen_executor(s, run_value) for s in graph.steps if s.name in steps}
        made: dict[str, Executor] = {}
        try:
            for step in graph.steps:
                value = by_step.get(step.name, LOCAL)
                if value == LOCAL:
                    continue
                if step.options.conda:   # --pypi: resolved here, built by each worker (StepServers.run_elsewhere)
                    raise UsageError(f"step '{step.name}' (cell {cell_number(step.cell)}): --conda "
                                     "environments are not built on Dask workers; use --pypi with the same "
                                     "packages, or drop --executor for it")
                if value not in made:
                    from flowmagic.runtime.orchestrator.executors.dask import DaskExecutor

                    made[value] = DaskExecutor.connect(value.removeprefix("dask://"), max_workers=max_workers)
        except BaseException:
            for executor in made.values():
                executor.close()
            raise
        return cls(by_step, made)

    def attach_local(self, executor: Executor) -> None:
        """The engine's local executor; its step servers learn which steps' environments are built on
        other machines (they only resolve those), and the remote executors where to find their locks."""
        self._made.setdefault(LOCAL, executor)
        servers = getattr(executor, "servers", None)
        if servers is None:
            return
        servers.run_elsewhere({step for step, value in self._by_step.items() if value != LOCAL})
        for value, made in self._made.items():
            if value != LOCAL and hasattr(made, "use_environments"):
                made.use_environments(servers)

    def for_step(self, step: str) -> Executor:
        return self._made[self._by_step.get(step, LOCAL)]

    def remote(self) -> bool:
        """Whether any step runs off this machine."""
        return any(value != LOCAL for value in self._by_step.values())

    def close(self) -> None:
        for executor in self._made.values():
            executor.close()
