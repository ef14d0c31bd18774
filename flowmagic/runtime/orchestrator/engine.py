"""The engine behind every run: steps in dependency order, tasks on worker threads.

One :class:`_Engine` drives every kind of run: a whole run (``run_flow``),
the steps left over by a resume (``resume_flow``), and one step of a
notebook's session run (``run_step``). It runs on the caller's thread, which
is the only one that writes metadata and emits events; worker threads only
drive task processes (``attempt.run_attempt``) or build a step's environment
(``environments.environment_server``) and post what happened to a queue. A
KeyboardInterrupt kills every task's process group, records the run as
interrupted and is re-raised.
"""
from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque

from flowmagic.errors import RunError
from flowmagic.states import TASK_FINISHED_OK
from flowmagic.runtime.environments import builder as environments
from flowmagic.runtime.orchestrator import memory
from flowmagic.runtime.orchestrator import inputs as plan
from flowmagic.runtime.orchestrator.attempt import AttemptExit, run_attempt
from flowmagic.runtime.orchestrator.cache import cache_enabled, find_cached
from flowmagic.runtime.orchestrator.events import Event, emit_to
from flowmagic.runtime.protocol import (AttemptFinished, EngineMessage, EnvironmentBuilt, ExceptionRecord, Manifest,
                                        TaskMessage, TaskOutput, TaskSpec, exception_json)
from flowmagic.runtime.worker.forkpool import ForkServer, get_server
from flowmagic.runtime.worker.forkserver import ForkServerDied, flow_preload
from flowmagic.runtime.orchestrator.inputs import TaskInfo
from flowmagic.runtime.orchestrator.results import RunResult
from flowmagic.store.metadata import latest_generation
from flowmagic.store.serializers import ArtifactRef, save_artifact

# Seconds before a failed attempt is retried (Metaflow waits minutes): long
# enough for a flaky cause (a clock, a busy service) to change, short enough
# for a notebook.
RETRY_DELAY = 1.0



def _known_task(graph, store, record, state: str | None = None) -> TaskInfo:
    refs = store.meta.artifacts(record.task_id)
    info = TaskInfo(record.task_id, record.step, tuple(record.index or ()), state or record.state,
                    {r.name: r.to_dict() for r in refs})
    for var in plan.foreach_vars(graph, record.step):
        ref = next((r for r in refs if r.name == var), None)
        if ref is not None:
            from flowmagic.runtime.worker.task import _foreach_info
            from flowmagic.store.serializers import load_artifact

            info.foreach[var] = _foreach_info(load_artifact(store.objects, ref))
    return info


def _last_line(exception: ExceptionRecord | None) -> str:
    return exception.last_line if exception is not None else "failed"


# ----------------------------------------------------------------------------- the engine


class _Engine:
    def __init__(self, graph, store, run_id: int, params: dict, *, targets: set[str],
                 known: dict[str, list[TaskInfo]], max_workers: int | None, on_event, workdir,
                 cache: bool = False) -> None:
        self.graph, self.store, self.run_id, self.params = graph, store, run_id, params
        self.flow = graph.name
        self.meta = store.meta
        self.emit = emit_to(on_event)
        self.max_workers = max(1, max_workers or os.cpu_count() or 1)
        self.workdir = workdir
        self.chain = plan.chains(graph)
        self.tasks: dict[str, list[TaskInfo]] = {s.name: [] for s in graph.steps}
        self.tasks.update(known)
        self.step_state = {s.name: ("pending" if s.name in targets else "done") for s in graph.steps}
        self.ready: deque[tuple[TaskInfo, int]] = deque()
        self.delayed: list[tuple[float, TaskInfo, int]] = []   # retries waiting for RETRY_DELAY
        self.running: dict[int, tuple[TaskInfo, int, threading.Thread]] = {}
        self.events: queue.Queue = queue.Queue()
        self.cancel = threading.Event()
        self.stopping = False
        self.failed: list[tuple[str, str]] = []
        self.outputs: dict[str, list[dict]] = {}
        self.executed = 0
        self.cloned = 0
        self.cached = 0
        self.cache = cache
        self.started = time.time()
        self._servers: dict[str, ForkServer] = {}
        # Environments being built, off this thread: step -> its tasks waiting for it.
        self.building: dict[str, list[tuple[TaskInfo, int]]] = {}
        self.build_threads: list[threading.Thread] = []
        self.stop_builds = threading.Event()   # the run ends (failed, interrupted): builds stop

    # -- driving -------------------------------------------------------------------
    def run_to_end(self, origin_run_id: int | None, announce: bool = True) -> RunResult:
        if announce:
            self.emit(Event("run", self.run_id, state="running", data={"flow": self.flow}))
        status = self.run_tasks(finish_run=True)
        return RunResult(self.flow, self.run_id, status, origin_run_id, self.failed,
                         time.time() - self.started, self.executed, self.cloned, self.cached)

    def run_tasks(self, *, finish_run: bool) -> str:
        try:
            self._schedule_steps()
            while self.ready or self.running or self.delayed or self.building:
                self._release_delayed()
                self._launch()
                if not self.running and not self.delayed and not self.building:
                    break
                try:
                    message = self.events.get(timeout=0.25)
                except queue.Empty:
                    continue
                self._handle(message)
        except KeyboardInterrupt:
            self._interrupt(finish_run)
            raise
        status = "succeeded" if not self.failed and all(s == "done" for s in self.step_state.values()) else "failed"
        if finish_run:
            self.meta.finish_run(self.flow, self.run_id, status)
            self.emit(Event("run", self.run_id, state=status, data={"flow": self.flow, "failed": self.failed}))
        return status

    def _interrupt(self, finish_run: bool) -> None:
        self.cancel.set()
        self._stop_building("interrupted")
        deadline = time.time() + 5
        while self.running and time.time() < deadline:
            try:
                self._handle(self.events.get(timeout=0.1))
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                continue  # a second Ctrl-C: keep cleaning up
        for info, _attempt, _thread in list(self.running.values()):
            self._set_state(info, "interrupted")
        for info, _attempt in [*self.ready, *((i, a) for _due, i, a in self.delayed)]:
            self._set_state(info, "interrupted")
        self.ready.clear()
        self.delayed.clear()
        for thread in self.build_threads:   # their tools are killed: no build outlives the run
            thread.join(timeout=max(0.0, deadline - time.time()))
        if finish_run:
            self.meta.finish_run(self.flow, self.run_id, "interrupted")
            self.emit(Event("run", self.run_id, state="interrupted", data={"flow": self.flow}))

    def _schedule_steps(self) -> None:
        progressed = True
        while progressed and not self.stopping:
            progressed = False
            for name in self.graph.topological_order():
                if self.step_state[name] != "pending":
                    continue
                if all(self.step_state[p] == "done" for p in self.graph.parents(name)):
                    self._start_step(name)
                    progressed = True

    def _start_step(self, name: str) -> None:
        spec = self.graph.step(name)
        indices: list[tuple[tuple[int, ...], str | None]] = [((), None)]
        if spec.options.foreach:
            var = spec.options.foreach
            producer = self.graph.producers(name).get(var)
            if producer is None:  # iterating over a parameter
                items = list(self.params.get(var) or [])
                indices = [((i,), repr(x)[:60]) for i, x in enumerate(items)]
            else:
                bad = [t for t in self.tasks[producer] if (t.foreach.get(var) or {}).get("length") is None]
                if bad:
                    error = (bad[0].foreach.get(var) or {}).get("error") or f"'{var}' was not saved"
                    self.step_state[name] = "failed"
                    self.failed.append((name, f"TypeError: --foreach {var}: {error}"))
                    self.stopping = True
                    return
                indices = plan.foreach_indices(var, producer, self.tasks[producer])
        self.step_state[name] = "running"
        use_cache = cache_enabled(spec, self.cache)
        for index, item in indices:
            cached = find_cached(self, name, index) if use_cache else None
            if cached is not None:
                info = self._cached_task(cached)
                self.tasks[name].append(info)
                self.emit(Event("task", self.run_id, step=name, task_id=info.task_id, index=index, state="cached"))
                continue
            task_id = self.meta.new_task(self.flow, self.run_id, name, index=index or None, item=item)
            info = TaskInfo(task_id, name, index)
            self.tasks[name].append(info)
            self.ready.append((info, 0))
            self.emit(Event("task", self.run_id, step=name, task_id=task_id, index=index, state="pending"))
        if all(t.finished_ok for t in self.tasks[name]):  # empty foreach, or all cached
            self._step_finished(name)

    def _cached_task(self, origin_task_id: int) -> TaskInfo:
        new_id = self.meta.clone_task(origin_task_id, self.run_id, state="cached")
        self.cached += 1
        return _known_task(self.graph, self.store, self.meta.get_task(new_id))

    def _launch(self) -> None:
        while self.ready and len(self.running) < self.max_workers and not self.stopping:
            info, attempt = self.ready.popleft()
            if self._waits_for_environment(info, attempt):
                continue
            spec = self._task_spec(info, attempt)
            try:
                server = self._server_for(info.step)
                # what the server did not preload for the flow: an environment's server knows only its
                # prelude, and a resumed step may read a frame though its code never names pandas
                server.ensure_preloaded(flow_preload([spec.code], _input_serializers(spec)))
            except RunError as exc:  # its environment cannot be built, or the prelude fails in it
                self._set_state(info, "running", attempt)
                self._finish_attempt(info, attempt, _not_started(exc))
                continue
            self._set_state(info, "running", attempt)
            timeout = self.graph.step(info.step).options.timeout
            thread = threading.Thread(target=self._attempt_thread, args=(info, attempt, server, spec, timeout),
                                      name=f"flowmagic-task-{info.task_id}", daemon=True)
            self.running[info.task_id] = (info, attempt, thread)
            thread.start()
        if self.stopping:
            self._cancel_waiting()

    def _cancel_waiting(self) -> None:
        """A task failed, so the run stops: the tasks that have not started never will."""
        state = "cancelled" if not self.cancel.is_set() else "interrupted"
        data = {"reason": self._stop_reason()} if state == "cancelled" else None
        for info, _attempt in [*self.ready, *((i, a) for _due, i, a in self.delayed)]:
            self._set_state(info, state, data=data)
        self.ready.clear()
        self.delayed.clear()
        self._stop_building(state, data)

    def _stop_reason(self) -> str:
        failed = list(dict.fromkeys(step for step, _line in self.failed))
        if not failed:
            return "the run stopped"
        return f"the run stopped because {' and '.join(failed)} failed"

    # -- environments, built off this thread ----------------------------------------------
    def _waits_for_environment(self, info: TaskInfo, attempt: int) -> bool:
        """Whether the task must wait for its step's environment. A first build
        takes seconds to minutes: it runs on a thread of its own, so other
        tasks start, stream their output and finish meanwhile."""
        options = self.graph.step(info.step).options
        if info.step in self._servers or not (options.pypi or options.conda):
            return False
        if info.step not in self.building:
            self.building[info.step] = []
            thread = threading.Thread(target=self._environment_thread, args=(info.step,),
                                      name=f"flowmagic-environment-{info.step}", daemon=True)
            self.build_threads.append(thread)
            thread.start()
        self.building[info.step].append((info, attempt))
        return True

    def _environment_thread(self, step: str) -> None:
        try:
            result: tuple | BaseException = environments.environment_server(
                self.graph.step(step), self.graph.prelude, self.store.root, workdir=self.workdir,
                stop=self.stop_builds)
        except BaseException as exc:  # noqa: BLE001 - the waiting tasks fail with it
            result = exc
        self.events.put(EnvironmentBuilt(step, result))

    def _environment_ready(self, step: str, result: "tuple | BaseException") -> None:
        waiting = self.building.pop(step, [])
        if isinstance(result, tuple):
            env, self._servers[step] = result
            # the package list the step ran with, kept with the run (dump, the inspector)
            environments.record_environment(self.meta, self.flow, self.run_id, step, env)
            self.ready.extendleft(reversed(waiting))
            return
        for info, attempt in waiting:   # cannot be built, or the prelude fails in it
            self._set_state(info, "running", attempt)
            self._finish_attempt(info, attempt, _not_started(result))

    def _stop_building(self, state: str, data: dict | None = None) -> None:
        """The run ends: stop the builds in progress; their tasks never start."""
        self.stop_builds.set()
        for waiting in self.building.values():
            for info, _attempt in waiting:
                self._set_state(info, state, data=data)
        self.building.clear()

    def _release_delayed(self) -> None:
        now = time.time()
        due = [item for item in self.delayed if item[0] <= now]
        if due:
            self.delayed = [item for item in self.delayed if item[0] > now]
            self.ready.extendleft((info, attempt) for _due, info, attempt in reversed(due))

    def _attempt_thread(self, info: TaskInfo, attempt: int, server: ForkServer, spec: TaskSpec,
                        timeout: float | None) -> None:
        post = self.events.put

        def on_output(stream: str, text: str) -> None:
            post(TaskOutput(info, attempt, stream, text))

        def on_message(message: dict) -> None:
            post(TaskMessage(info, attempt, message))

        options = self.graph.step(info.step).options
        watch = memory.MemoryWatch(info.step, options.memory)   # kills the group over its memory limit
        for tries in range(2):
            try:
                result = run_attempt(server, spec, timeout=timeout, on_output=on_output,
                                     on_message=on_message, cancel=self.cancel, on_start=watch.start)
                break
            except ForkServerDied:
                if tries:
                    result = _crashed(f"the fork server died and could not be restarted")
                    break
                server = get_server(server.prelude, python=server.python, cwd=self.workdir,
                                    preload=server.flow_modules)
            except BaseException as exc:  # noqa: BLE001 - reported as the attempt's failure
                result = _crashed(f"{type(exc).__name__}: {exc}")
                break
        post(AttemptFinished(info, attempt, watch.verdict(result)))

    def _handle(self, message: EngineMessage) -> None:
        if isinstance(message, EnvironmentBuilt):
            self._environment_ready(message.step, message.result)
            return
        info, attempt = message.info, message.attempt
        if isinstance(message, TaskOutput):
            self.emit(Event("output", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                            attempt=attempt, stream=message.stream, text=message.text))
        elif isinstance(message, TaskMessage):
            data = message.message
            if data.get("type") == "output":  # data: {"type", "data": mimebundle, "metadata"}
                self.emit(Event("display", self.run_id, step=info.step, task_id=info.task_id,
                                index=info.index, attempt=attempt, data=data.get("output")))
        elif isinstance(message, AttemptFinished):
            self.running.pop(info.task_id, None)
            self._finish_attempt(info, attempt, message.result)

    # -- one attempt finished ---------------------------------------------------------
    def _finish_attempt(self, info: TaskInfo, attempt: int, result: AttemptExit) -> None:
        spec = self.graph.step(info.step)
        manifest = result.manifest or Manifest(result.outcome)
        last = attempt >= spec.options.retry
        artifacts = [ArtifactRef.from_dict(d) for d in manifest.artifacts]
        if result.outcome == "ok":
            state = "done"
        elif result.outcome == "interrupted" or self.cancel.is_set():
            state = "interrupted"
        elif not last:
            state = "retrying"
        elif spec.options.catch:
            state = "caught"
            if not manifest.caught:  # the process died: nothing was saved, so save the record here
                artifacts = self._caught_artifacts(spec, result.exception)
        else:
            state = "failed"
        if state not in TASK_FINISHED_OK:   # a failed attempt saves nothing
            artifacts = []
        self.meta.record_attempt(
            info.task_id, attempt, outcome=result.outcome, started_at=result.started_at,
            finished_at=result.finished_at, exit_code=result.exit_code, signal=result.signal,
            exception=exception_json(result.exception), stdout=result.stdout,
            # warnings reach UIs as events (not task stderr: shown twice); the logs keep them too
            stderr=result.stderr + "".join(f"flowmagic: warning: {w}\n" for w in manifest.warnings),
            artifacts=artifacts, outputs=manifest.outputs)
        self.executed += attempt == 0
        for warning in manifest.warnings:
            self.emit(Event("warning", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                            text=warning))
        self.outputs.setdefault(info.step, []).extend(manifest.outputs)
        info.exception = exception_json(result.exception)
        self._set_state(info, state, attempt, data={"exception": info.exception} if info.exception else None)
        if state == "retrying":
            self.delayed.append((time.time() + RETRY_DELAY, info, attempt + 1))
        elif state in TASK_FINISHED_OK:
            info.artifacts = {r.name: r.to_dict() for r in artifacts}
            info.foreach = manifest.foreach
            if all(t.finished_ok for t in self.tasks[info.step]):
                self._step_finished(info.step)
        elif state == "failed":
            self.step_state[info.step] = "failed"
            self.failed.append((info.step, _last_line(result.exception)))
            self.stopping = True

    def _caught_artifacts(self, spec, exception: ExceptionRecord | None) -> list[ArtifactRef]:
        refs = [save_artifact(self.store.objects, name, None, step=spec.name)
                for name in spec.writes if name != spec.options.catch]
        refs.append(save_artifact(self.store.objects, spec.options.catch, exception_json(exception), step=spec.name))
        return refs

    def _step_finished(self, name: str) -> None:
        self.step_state[name] = "done"
        self._schedule_steps()

    def _set_state(self, info: TaskInfo, state: str, attempt: int | None = None, data: dict | None = None) -> None:
        info.state = state
        self.meta.set_task_state(info.task_id, state)
        self.emit(Event("task", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                        state=state, attempt=attempt, data=data))

    # -- specs ---------------------------------------------------------------------------
    def _server_for(self, step: str) -> ForkServer:
        if step not in self._servers:   # an environment's server is there already (_environment_ready)
            self._servers[step] = get_server(self.graph.prelude, cwd=self.workdir)
        server = self._servers[step]
        if not server.alive():
            server = self._servers[step] = get_server(server.prelude, python=server.python, cwd=self.workdir,
                                                      preload=server.flow_modules)
        return server

    def _task_spec(self, info: TaskInfo, attempt: int) -> TaskSpec:
        graph, step = self.graph, info.step
        spec = graph.step(step)
        chain = self.chain[step]
        steps = {s.name for s in graph.steps}
        bindings = {}
        for var, producer in graph.producers(step).items():
            if producer in steps and var not in ("input", "inputs"):
                bindings[var] = plan.binding_for(var, producer, chain, info.index, self.chain, self.tasks[producer])
        foreach = None
        if spec.options.foreach:
            var = spec.options.foreach
            producer = graph.producers(step).get(var)
            if producer in steps:
                binding = plan.binding_for(var, producer, chain[:-1], info.index[:-1], self.chain,
                                           self.tasks[producer])
            else:
                binding = {"value": self.params.get(var)}
            foreach = {"binding": binding, "index": info.index[-1]}
        inputs = None
        if "inputs" in spec.reads:
            joined = graph.foreach_producer(step)
            if joined:
                inputs = plan.inputs_for(joined, chain, info.index, self.chain, self.tasks[joined])
        return TaskSpec(
            objects_root=str(self.store.objects.root),
            flow=self.flow, run_id=self.run_id, task_id=info.task_id, attempt=attempt,
            step=step, cell=spec.cell, index=tuple(info.index),
            source=spec.source, code=spec.code, first_line=spec.body_line,
            filename=f"<cell {spec.cell}: step {step}>",
            params=self.params, bindings=bindings, foreach=foreach, inputs=inputs,
            catch=spec.options.catch, catch_now=attempt >= spec.options.retry,
            writes=tuple(w for w in spec.writes if w not in ("input", "inputs")),
            required=tuple(sorted(plan.required_names(graph, step))),
            foreach_vars=tuple(plan.foreach_vars(graph, step)),
            mutation_check=True,
        )


def _input_serializers(spec: TaskSpec) -> set[str]:
    """The serializers of every artifact a task loads (an Arrow one needs pyarrow, maybe pandas)."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            ref = node.get("ref")
            if isinstance(ref, dict) and isinstance(ref.get("serializer"), str):
                found.add(ref["serializer"])
            for value in node.values():
                if isinstance(value, (dict, list)):
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec.input_bindings())
    return found


def _not_started(exc: Exception) -> AttemptExit:
    now = time.time()
    return AttemptExit("failed", None, None, None, "", "", now, now,
                       exception=ExceptionRecord.plain(type(exc).__name__, str(exc)))


def _crashed(message: str) -> AttemptExit:
    now = time.time()
    # the traceback is the message alone, as earlier releases stored it
    return AttemptExit("killed", None, None, None, "", "", now, now,
                       exception=ExceptionRecord("RunError", message, message + "\n"))
