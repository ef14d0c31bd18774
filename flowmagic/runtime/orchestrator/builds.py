"""The fork server of each step, and the --pypi/--conda environments being built for them.

A first build takes seconds to minutes: it runs on a thread of its own and
posts :class:`~flowmagic.runtime.orchestrator.messages.EnvironmentBuilt` to the engine's
queue, so other tasks start, stream their output and finish meanwhile.

A step whose tasks run elsewhere (a Dask executor: :meth:`StepServers.run_elsewhere`)
gets no environment here: its request is only *resolved* (the same way, on the
same thread), and the resulting :class:`~flowmagic.runtime.environments.builder.Lock`
goes with each attempt (:meth:`StepServers.lock_for`); each worker builds it.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from flowmagic.errors import RunError
from flowmagic.runtime.environments import builder as environments
from flowmagic.runtime.orchestrator.tasks import TaskInfo
from flowmagic.runtime.orchestrator.messages import EngineMessage, EnvironmentBuilt
from flowmagic.runtime.worker.forkpool import ForkServer, get_server

Waiting = list[tuple[TaskInfo, int]]


class StepServers:
    def __init__(self, graph, store_root, workdir, post: Callable[[EngineMessage], None]) -> None:
        self.graph, self.store_root, self.workdir, self.post = graph, store_root, workdir, post
        self._servers: dict[str, ForkServer] = {}
        self.building: dict[str, Waiting] = {}     # step -> its attempts waiting for the build
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()              # the run ends (failed, interrupted): builds stop
        self.build_started: dict[str, float] = {}   # step -> when its environment build began
        self._reported: dict[str, float] = {}       # step -> when its last progress line was shown
        self._elsewhere: set[str] = set()           # steps whose tasks run on other machines (Dask)
        self._locks: dict[str, environments.Lock] = {}   # their resolved --pypi environments

    def run_elsewhere(self, steps) -> None:
        """These steps' environments are built where their tasks run: here they are only resolved."""
        self._elsewhere.update(steps)

    def lock_for(self, step: str) -> environments.Lock | None:
        """The resolved environment a remote step's attempts carry (None: the step has none)."""
        lock = self._locks.get(step)
        if lock is None and self.graph.step(step).options.pypi:   # never run one outside its environment
            raise RunError(f"step '{step}': its --pypi environment was not resolved before its task was sent")
        return lock

    def server_for(self, step: str) -> ForkServer:
        if step not in self._servers:   # an environment's server is there already (built())
            self._servers[step] = get_server(self.graph.prelude, cwd=self.workdir)
        server = self._servers[step]
        if not server.alive():
            server = self._servers[step] = get_server(server.prelude, python=server.python, cwd=self.workdir,
                                                      preload=server.flow_modules)
        return server

    def waits(self, info: TaskInfo, attempt: int) -> bool:
        """Whether the attempt must wait for its step's environment (then it is kept here)."""
        options = self.graph.step(info.step).options
        if info.step in self._servers or info.step in self._locks or not (options.pypi or options.conda):
            return False
        if info.step not in self.building:
            self.building[info.step] = []
            self.build_started[info.step] = time.time()
            thread = threading.Thread(target=self._build, args=(info.step,),
                                      name=f"flowmagic-environment-{info.step}", daemon=True)
            self._threads.append(thread)
            thread.start()
        self.building[info.step].append((info, attempt))
        return True

    def _build(self, step: str) -> None:
        try:
            if step in self._elsewhere:
                lock = environments.resolve_lock(self.graph.step(step), self.store_root, stop=self._stop)
                self.post(EnvironmentBuilt(step, (lock, None)))
                return
            result: tuple | BaseException = environments.environment_server(
                self.graph.step(step), self.graph.prelude, self.store_root, workdir=self.workdir, stop=self._stop)
        except BaseException as exc:  # noqa: BLE001 - the waiting tasks fail with it
            result = exc
        self.post(EnvironmentBuilt(step, result))

    def progress_lines(self, now: float) -> list[tuple[str, str]]:
        """(step, line) for builds that have taken a while: the first after a second, then every
        ten, so a 20 s ``uv`` resolve is never a silent pause."""
        lines = []
        for step in self.building:
            elapsed = now - self.build_started[step]
            last = self._reported.get(step)
            if (last is None and elapsed >= 1.0) or (last is not None and now - last >= 10.0):
                self._reported[step] = now
                options = self.graph.step(step).options
                kind, spec = ("pypi", options.pypi) if options.pypi else ("conda", options.conda)
                doing = "resolving" if step in self._elsewhere else "building"
                lines.append((step, f"{doing} the --{kind} environment \"{spec}\" ({elapsed:.0f} s)"))
        return lines

    def build_finished_line(self, step: str, env: object | None) -> str | None:
        """The line that closes a build announced by :meth:`progress_lines`."""
        if self._reported.pop(step, None) is None:
            return None
        elapsed = time.time() - self.build_started.get(step, time.time())
        if env is None:
            return f"environment build failed after {elapsed:.1f} s"
        if isinstance(env, environments.Lock):
            return f"environment resolved in {elapsed:.1f} s ({len(env.pins)} packages; the workers build it)"
        return f"environment ready in {elapsed:.1f} s ({len(getattr(env, 'packages', ()))} packages)"

    def built(self, step: str, result: tuple | BaseException) -> tuple[Waiting, object | None]:
        """The attempts that waited for ``step``, and its environment (None if the build failed)."""
        waiting = self.building.pop(step, [])
        if isinstance(result, BaseException):
            return waiting, None
        env, server = result
        if isinstance(env, environments.Lock):
            self._locks[step] = env
        else:
            self._servers[step] = server
        return waiting, env

    def stop(self) -> Waiting:
        """The run ends: stop the builds in progress; the attempts waiting for them never start."""
        self._stop.set()
        waiting = [item for items in self.building.values() for item in items]
        self.building.clear()
        return waiting

    def join(self, deadline: float) -> None:
        for thread in self._threads:   # their tools are killed: no build outlives the run
            thread.join(timeout=max(0.0, deadline - time.time()))
