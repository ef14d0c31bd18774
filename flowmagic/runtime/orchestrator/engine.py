"""The engine behind every run: steps in dependency order, tasks on worker threads.

One :class:`_Engine` drives every kind of run: a whole run (``run_flow``),
the steps left over by a resume (``resume_flow``), and one step of a
notebook's session run (``run_step``). It runs on the caller's thread, which
is the only one that writes metadata and emits events (through its
:class:`Recorder`); worker threads only drive task processes
(``attempt.run_attempt``) or build a step's environment (:class:`StepServers`)
and post typed messages (runtime/protocol.py) to a queue. What the run
knows is a :class:`RunState`; attempts waiting for a worker are in a
:class:`RetryQueue`. A KeyboardInterrupt kills every task's process group,
records the run as interrupted and is re-raised.
"""
from __future__ import annotations

import collections
from collections.abc import Iterable
import itertools
import os
import queue
import threading
import time

from flowmagic.errors import RunError, cell_number
from flowmagic.flow.catch import caught_exception
from flowmagic.states import TASK_FINISHED_OK
from flowmagic.runtime.environments import builder as environments
from flowmagic.runtime.orchestrator import inputs as plan
from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.builds import StepServers
from flowmagic.runtime.orchestrator.cache import cache_enabled, find_cached
from flowmagic.runtime.orchestrator.events import EventHandler
from flowmagic.runtime.orchestrator.executors.base import AttemptRequest, Executors
from flowmagic.runtime.orchestrator.executors.local import LocalExecutor, crashed, not_started
from flowmagic.runtime.orchestrator.logs import LiveLogs, LogLimits, OutputBudget, flush_interval
from flowmagic.runtime.orchestrator.recorder import Recorder
from flowmagic.runtime.orchestrator.run_state import RetryQueue, RunOptions, RunState
from flowmagic.runtime.orchestrator.batching import BatchSizer, max_batch
from flowmagic.runtime.orchestrator.messages import (AttemptFinished, BatchDone, EngineMessage, EnvironmentBuilt,
                                                     TaskMessage, TaskOutput, TaskStarted)
from flowmagic.runtime.protocol import ExceptionRecord, Manifest, TaskSpec, exception_json, foreach_info
from flowmagic.runtime.worker.forkserver import flow_preload
from flowmagic.runtime.orchestrator.tasks import StepTasks, StoredRefs, TaskInfo
from flowmagic.runtime.orchestrator.results import RunResult
from flowmagic.store.serializers import ArtifactRef, save_artifact

# Seconds before a failed attempt is retried (Metaflow waits minutes): long
# enough for a flaky cause (a clock, a busy service) to change, short enough
# for a notebook.
RETRY_DELAY = 1.0
# Messages handled, and recorded, in one metadata transaction: few enough that a
# reader (the notebook's DAG view, `flowmagic status`) sees progress at once.
ROUND = 500
# New tasks of a foreach recorded (and their indices made) this many at a time, in its one transaction.
NEW_TASKS_CHUNK = 5_000



def known_task(graph, store, record, state: str | None = None) -> TaskInfo:
    """A task recorded earlier (a clone's origin, a cached or resumed one), as the engine tracks it."""
    foreach_vars = plan.foreach_vars(graph, record.step)
    if record.index and not foreach_vars:   # a foreach task: its refs are read back when needed (tasks.py)
        return TaskInfo(record.task_id, record.step, tuple(record.index), state or record.state,
                        stored=StoredRefs.of(store.meta))
    refs = store.meta.artifacts(record.task_id)
    info = TaskInfo(record.task_id, record.step, tuple(record.index or ()), state or record.state, tuple(refs))
    for var in foreach_vars:
        ref = next((r for r in refs if r.name == var), None)
        if ref is not None:
            from flowmagic.store.serializers import load_artifact

            info.foreach = {**(info.foreach or {}), var: foreach_info(load_artifact(store.objects, ref))}
    return info


def _last_line(exception: ExceptionRecord | None) -> str:
    return exception.last_line if exception is not None else "failed"


def _state_data(exception: dict | None, state: str, catch: str | None) -> dict | None:
    """A task event's details: its exception and, when caught, the variable that holds it (printers say so)."""
    data: dict = {"exception": exception} if exception else {}
    if state == "caught" and catch:
        data["catch"] = catch
    return data or None


# ----------------------------------------------------------------------------- the engine


class _Engine:
    def __init__(self, graph, store, run_id: int, params: dict, options: RunOptions, *,
                 known: dict[str, Iterable[TaskInfo]] | None = None, on_event: EventHandler | None = None,
                 executors: Executors | None = None) -> None:
        self.graph, self.store, self.run_id, self.params = graph, store, run_id, params
        self.options = options
        self.flow = graph.name
        self.meta = store.meta
        self.chain = plan.chains(graph)
        self.max_workers = max(1, options.max_workers or os.cpu_count() or 1)
        # a finished foreach task's refs are read back from the metadata when a later task needs them
        self._stored_refs = StoredRefs.of(store.meta)
        known = known or {}
        tasks = {s.name: StepTasks.of(s.name, known.get(s.name, ()), self._stored_refs) for s in graph.steps}
        self.state = RunState(tasks, {s.name: ("pending" if s.name in options.targets else "done")
                                      for s in graph.steps})
        self.record = Recorder(self.meta, self.flow, run_id, on_event)
        self.queue = RetryQueue(RETRY_DELAY)
        # task id -> (info, attempt, thread, its executor; None for a task of a batch: BatchDone frees the slot)
        self.running: dict[int, tuple[TaskInfo, int, threading.Thread, object | None]] = {}
        self.in_flight: collections.Counter[int] = collections.Counter()   # id(executor) -> its running attempts
        self.events: queue.Queue[EngineMessage] = queue.Queue()
        self.servers = StepServers(graph, store.root, options.workdir, self.events.put)
        self.cancel = threading.Event()   # set by Ctrl-C: running attempts are killed
        self.live = OutputBudget(cancel=self.cancel)   # output queued for this thread to show: bounded (logs.py)
        self.log_limits = LogLimits.from_env()         # here: a bad FLOWMAGIC_LOG_HEAD stops the run before it starts
        self.batches = BatchSizer(max_batch())         # short tasks of a step share a process (batching.py)
        self.live_logs = LiveLogs(self.log_limits, flush_interval())   # output so far, written while tasks run
        # where each step's attempts run (executors/): the run's Dask clients, connected by the caller
        self.executors = executors or Executors()
        self.executors.attach_local(LocalExecutor(self.servers, self.max_workers))
        self.flow_modules = flow_preload([graph.prelude, *(s.code for s in graph.steps)])
        self._stored: dict[tuple, dict] = {}   # gathered values written to the store (_stored_if_gathered)

    def input_plan(self, step: str, index: tuple[int, ...],
                   tasks: dict[str, plan.Tasks] | None = None) -> plan.InputPlan:
        """What the task of ``step`` at ``index`` reads, from this run's tasks (or ``tasks``: the cache)."""
        return plan.plan_inputs(self.graph, step, index, self.chain, self.state.tasks if tasks is None else tasks,
                                self.params)

    # what scheduler.py and cache.py read
    @property
    def tasks(self) -> dict[str, StepTasks]:
        return self.state.tasks

    @property
    def outputs(self) -> dict[str, list[dict]]:
        return self.state.outputs

    # -- driving -------------------------------------------------------------------
    def run_to_end(self, origin_run_id: int | None, announce: bool = True) -> RunResult:
        if announce:
            self.record.run_started()
        status = self.run_tasks(finish_run=True)
        state = self.state
        return RunResult(self.flow, self.run_id, status, origin_run_id, state.failed,
                         time.time() - state.started, state.executed, state.cloned, state.cached,
                         state.caught)

    def run_tasks(self, *, finish_run: bool) -> str:
        try:
            self._schedule_steps()
            while self.queue.has_ready() or self._waiting_for_something():
                self.queue.release_due()
                with self.meta.transaction():
                    self._launch()
                if self.servers.building:
                    self._report_builds()
                if not self._waiting_for_something():
                    break
                self._flush_logs()
                try:
                    message = self.events.get(timeout=0.25)
                except queue.Empty:
                    continue
                self._handle_round(message)
        except KeyboardInterrupt:
            self._interrupt(finish_run)
            raise
        status = self.state.status()
        if finish_run:
            self.record.run_finished(status, self.state.failed)
        return status

    def _flush_logs(self) -> None:
        if self.live_logs.due():
            self.record.live_logs(self.live_logs.take())

    def _waiting_for_something(self) -> bool:
        return (bool(self.running) or any(n > 0 for n in self.in_flight.values())   # a batch not yet done
                or self.queue.has_delayed() or bool(self.servers.building))

    def _interrupt(self, finish_run: bool) -> None:
        self.cancel.set()
        self.live.stop()
        for info, _attempt in self.servers.stop():
            self.record.task_state(info, "interrupted")
        deadline = time.time() + 5
        while self.running and time.time() < deadline:
            try:
                self._handle(self.events.get(timeout=0.1))
            except queue.Empty:
                continue
            except KeyboardInterrupt:
                continue  # a second Ctrl-C: keep cleaning up
        for info, _attempt, _thread, _executor in list(self.running.values()):
            self.record.task_state(info, "interrupted")
        for info, _attempt in self.queue.drain():
            self.record.task_state(info, "interrupted")
        self.servers.join(deadline)
        if finish_run:
            self.record.run_finished("interrupted")

    def _schedule_steps(self) -> None:
        progressed = True
        step_state = self.state.step_state
        while progressed and not self.state.stopping:
            progressed = False
            for name in self.graph.topological_order():
                if step_state[name] != "pending":
                    continue
                if all(step_state[p] == "done" for p in self.graph.parents(name)):
                    self._start_step(name)
                    progressed = True

    def _start_step(self, name: str) -> None:
        indices = self._foreach_indices(name)
        if indices is None:
            return
        self.state.step_state[name] = "running"
        use_cache = cache_enabled(self.graph.step(name), self.options.cache)
        clones = self.options.clones.get(name, {})
        if use_cache or clones:
            self._start_tasks_reusing(name, indices, use_cache, clones)
        else:
            self._new_tasks(name, indices)
        if self.state.step_finished_ok(name):  # empty foreach, or all cached
            self._step_finished(name)

    def _new_tasks(self, name: str, indices: Iterable[tuple[tuple[int, ...], str | None]]) -> None:
        """Record the step's new tasks (one transaction for the whole foreach) and queue them as
        positions of its table: no object per task until it runs (tasks.py)."""
        table = self.state.tasks[name]
        items = iter(indices)
        with self.meta.transaction():
            while chunk := list(itertools.islice(items, NEW_TASKS_CHUNK)):
                ids = self.record.new_tasks(name, chunk)
                self.queue.add_pending(table, table.add_pending(ids, [index for index, _item in chunk]))

    def _start_tasks_reusing(self, name: str, indices: Iterable[tuple[tuple[int, ...], str | None]],
                             use_cache: bool, clones: dict) -> None:
        """Clone each task a resumed foreach finished or the step cache has, create the others;
        task ids stay in index order (latest_generation tells a session run's generations apart by them)."""
        for index, item in indices:
            cached = find_cached(self, name, index) if use_cache and index not in clones else None
            if index in clones or cached is not None:
                info = self._reused_task(clones[index], "cloned") if index in clones else self._cached_task(cached)
                self.state.tasks[name].append(info)
                self.state.tasks[name].settle(info)   # finished already: the engine never changes it
                self.record.task_reused(info)
                continue
            self._new_tasks(name, [(index, item)])

    def _foreach_indices(self, name: str) -> Iterable[tuple[tuple[int, ...], str | None]] | None:
        """The index (and item repr) of each task of the step; None if its list is unusable (the step failed)."""
        var = self.graph.step(name).options.foreach
        if not var:
            return [((), None)]
        producer = self.graph.producers(name).get(var)
        if producer is None:  # iterating over a parameter
            return [((i,), repr(x)[:60]) for i, x in enumerate(list(self.params.get(var) or []))]
        bad = [t for t in self.state.tasks[producer] if ((t.foreach or {}).get(var) or {}).get("length") is None]
        if bad:
            error = ((bad[0].foreach or {}).get(var) or {}).get("error") or f"'{var}' was not saved"
            self.state.fail_step(name, f"TypeError: --foreach {var}: {error}")
            return None
        return plan.foreach_indices(var, self.state.tasks[producer])

    def _cached_task(self, origin_task_id: int) -> TaskInfo:
        return self._reused_task(origin_task_id, "cached")

    def _reused_task(self, origin_task_id: int, state: str) -> TaskInfo:
        """A copy of a finished task: the step cache's (cached) or a resumed foreach's (cloned)."""
        new_id = self.meta.clone_task(origin_task_id, self.run_id, state=state)
        if state == "cached":
            self.state.cached += 1
        else:
            self.state.cloned += 1
        return known_task(self.graph, self.store, self.meta.get_task(new_id))

    def _launch(self) -> None:
        while self.queue.has_ready() and not self.state.stopping:
            info, attempt = self.queue.pop()
            executor = self.executors.for_step(info.step)
            if self._busy(executor):   # each executor has its own slots (cores here, threads of a cluster)
                self.queue.add_first([(info, attempt)])
                break
            if self.servers.waits(info, attempt):
                continue
            request = self._prepared(executor, info, attempt)
            if request is None:
                continue
            batch = self._batch_with(executor, request)
            self.record.attempt_started(info, attempt, live_logs=self.live_logs.enabled)
            if len(batch) > 1:
                thread = threading.Thread(target=self._batch_thread, args=(executor, batch),
                                          name=f"flowmagic-batch-{info.task_id}", daemon=True)
                for member in batch:
                    self.running[member.info.task_id] = (member.info, member.attempt, thread, None)
            else:
                thread = threading.Thread(target=self._attempt_thread, args=(executor, request),
                                          name=f"flowmagic-task-{info.task_id}", daemon=True)
                self.running[info.task_id] = (info, attempt, thread, executor)
            self.in_flight[id(executor)] += 1
            thread.start()
        if self.state.stopping:
            self._cancel_waiting()

    def _prepared(self, executor, info: TaskInfo, attempt: int) -> AttemptRequest | None:
        """The attempt's request, ready to run; None if it failed as not started."""
        request = self._request(info, attempt)
        try:
            executor.prepare(request)
        except RunError as exc:  # its environment cannot be built, or the prelude fails in it
            self.record.task_state(info, "running", attempt)
            self._finish_attempt(info, attempt, not_started(exc))
            return None
        return request

    def _batch_with(self, executor, request: AttemptRequest) -> list[AttemptRequest]:
        """``request`` and the ready first attempts of its step that share its process (batching.py)."""
        if request.attempt != 0 or not hasattr(executor, "run_batch"):
            return [request]
        step = request.info.step
        size = self.batches.size(step, 1 + self.queue.ready_count(), executor.slots())
        batch = [request]
        for info, attempt in self.queue.pop_alike(step, 0, size - 1):
            more = self._prepared(executor, info, attempt)
            if more is not None:
                batch.append(more)
        return batch

    def _cancel_waiting(self) -> None:
        """A task failed, so the run stops: the tasks that have not started never will."""
        state = "cancelled" if not self.cancel.is_set() else "interrupted"
        data = {"reason": self.state.stop_reason()} if state == "cancelled" else None
        for info, _attempt in [*self.queue.drain(), *self.servers.stop()]:
            self.record.task_state(info, state, data=data)

    def _report_builds(self) -> None:
        for step, line in self.servers.progress_lines(time.time()):
            self.record.step_note(step, line)

    def _environment_ready(self, step: str, result: tuple | BaseException) -> None:
        waiting, env = self.servers.built(step, result)
        line = self.servers.build_finished_line(step, env)
        if line is not None:
            self.record.step_note(step, line)
        if env is not None:
            # the package list the step ran with, kept with the run (dump, the inspector)
            environments.record_environment(self.meta, self.flow, self.run_id, step, env)
            self.queue.add_first(waiting)
            return
        for info, attempt in waiting:   # cannot be built, or the prelude fails in it
            self.record.task_state(info, "running", attempt)
            self._finish_attempt(info, attempt, not_started(result))

    def _busy(self, executor) -> bool:
        return self.in_flight[id(executor)] >= executor.slots()

    def _request(self, info: TaskInfo, attempt: int) -> AttemptRequest:
        post = self.events.put

        def on_output(stream: str, text: str) -> None:
            self.live.take(len(text))
            post(TaskOutput(info, attempt, stream, text))

        def on_message(message: dict) -> None:
            post(TaskMessage(info, attempt, message))

        options = self.graph.step(info.step).options
        return AttemptRequest(info, attempt, self._task_spec(info, attempt), self.graph.prelude, self.flow_modules,
                              options.timeout, options.memory, self.options.workdir, self.cancel, self.log_limits,
                              on_output, on_message)

    def _attempt_thread(self, executor, request: AttemptRequest) -> None:
        try:
            result = executor.run_attempt(request)
        except BaseException as exc:  # noqa: BLE001 - reported as the attempt's failure
            result = crashed(f"{type(exc).__name__}: {exc}")
        self.events.put(AttemptFinished(request.info, request.attempt, result))

    def _batch_thread(self, executor, batch: list[AttemptRequest]) -> None:
        post = self.events.put
        reported = [0]

        def on_started(k: int) -> None:
            post(TaskStarted(batch[k].info, batch[k].attempt))

        def on_finished(k: int, result: AttemptExit) -> None:
            reported[0] = k + 1
            post(AttemptFinished(batch[k].info, batch[k].attempt, result))

        reason = None
        try:
            end = executor.run_batch(batch, on_started, on_finished)
            done, reason = end.done, end.reason
        except BaseException as exc:  # noqa: BLE001 - the task it was running fails; the rest run again
            done = reported[0]
            if done < len(batch):
                on_finished(done, crashed(f"{type(exc).__name__}: {exc}"))
                done += 1
        post(BatchDone(executor, batch[0].info.step,
                       tuple((r.info, r.attempt) for r in batch[done:]), reason))

    def _batch_done(self, message: BatchDone) -> None:
        self.in_flight[id(message.executor)] -= 1
        if message.reason is not None:
            self.batches.refuse(message.step, message.reason)
        for info, _attempt in message.not_started:
            self.running.pop(info.task_id, None)
        if self.cancel.is_set():
            for info, _attempt in message.not_started:
                self.record.task_state(info, "interrupted")
            return
        self.queue.add_first(list(message.not_started))   # cancelled by _launch if the run is stopping

    def _handle_round(self, first: EngineMessage) -> None:
        """``first`` and what else is queued now (up to ROUND), recorded as one metadata transaction."""
        with self.meta.transaction():
            self._handle(first)
            for _ in range(ROUND - 1):
                try:
                    message = self.events.get_nowait()
                except queue.Empty:
                    break
                self._handle(message)

    def _handle(self, message: EngineMessage) -> None:
        if isinstance(message, EnvironmentBuilt):
            self._environment_ready(message.step, message.result)
        elif isinstance(message, TaskOutput):
            self.live.give_back(len(message.text))
            self.live_logs.add(message.info.task_id, message.attempt, message.stream, message.text)
            self.record.output(message.info, message.attempt, message.stream, message.text)
        elif isinstance(message, TaskMessage):
            data = message.message
            if data.get("type") == "output":  # data: {"type", "data": mimebundle, "metadata"}
                self.record.display(message.info, message.attempt, data.get("output"))
        elif isinstance(message, AttemptFinished):
            running = self.running.pop(message.info.task_id, None)
            self.live_logs.forget(message.info.task_id, message.attempt)
            if running is not None and running[3] is not None:
                self.in_flight[id(running[3])] -= 1
            if message.result.outcome == "ok":
                self.batches.observe(message.info.step, message.result.finished_at - message.result.started_at)
            self._finish_attempt(message.info, message.attempt, message.result)
        elif isinstance(message, TaskStarted):
            self.record.attempt_started(message.info, message.attempt, live_logs=self.live_logs.enabled)
        elif isinstance(message, BatchDone):
            self._batch_done(message)

    # -- one attempt finished ---------------------------------------------------------
    def _finish_attempt(self, info: TaskInfo, attempt: int, result: AttemptExit) -> None:
        spec = self.graph.step(info.step)
        manifest = result.manifest or Manifest(result.outcome)
        state = self._state_after(spec, attempt, result)
        artifacts = [ArtifactRef.from_dict(d) for d in manifest.artifacts]
        if state == "caught" and not manifest.caught:  # the process died: nothing was saved, so save the record here
            artifacts = self._caught_artifacts(spec, result.exception)
        if state not in TASK_FINISHED_OK:   # a failed attempt saves nothing
            artifacts = []
        self.record.attempt(info, attempt, result, manifest, artifacts)
        self.state.executed += attempt == 0
        self.state.outputs.setdefault(info.step, []).extend(manifest.outputs)
        info.exception = exception_json(result.exception)
        self.state.caught += state == "caught"
        self.record.task_state(info, state, attempt, data=_state_data(info.exception, state, spec.options.catch))
        if state == "retrying":
            self.queue.retry_later(info, attempt + 1)
        elif state in TASK_FINISHED_OK:
            info.keep_refs(tuple(artifacts), self._stored_refs if info.index else None)
            info.foreach = manifest.foreach or None
            self.state.tasks[info.step].settle(info)   # the engine is done with it (tasks.py)
            if self.state.step_finished_ok(info.step):
                self._step_finished(info.step)
        elif state == "failed":
            self.state.fail_step(info.step, _last_line(result.exception))

    def _state_after(self, spec, attempt: int, result: AttemptExit) -> str:
        if result.outcome == "ok":
            return "done"
        if result.outcome == "interrupted" or self.cancel.is_set():
            return "interrupted"
        if attempt < spec.options.retry:
            return "retrying"
        return "caught" if spec.options.catch else "failed"

    def _caught_artifacts(self, spec, exception: ExceptionRecord | None) -> list[ArtifactRef]:
        refs = [save_artifact(self.store.objects, name, None, step=spec.name)
                for name in spec.writes if name != spec.options.catch]
        refs.append(save_artifact(self.store.objects, spec.options.catch, caught_exception(exception_json(exception)),
                                  step=spec.name))
        return refs

    def _step_finished(self, name: str) -> None:
        self.state.step_state[name] = "done"
        self._schedule_steps()

    # -- specs ---------------------------------------------------------------------------
    def _stored_if_gathered(self, binding: dict) -> dict:
        """A value gathered from many tasks goes to its task as an object of the store (streamed there:
        never the whole binding in memory); the task reads it back (task.resolve_binding)."""
        gathered = binding.get("gathered")
        return binding if gathered is None else self._stored_object(gathered)

    def _stored_object(self, gathered: plan.Gathered | plan.GatheredInputs) -> dict:
        # the same gathered value for every task of a foreach over it: written once
        if gathered.which not in self._stored:
            serializers: set[str] = set()

            def write(fh) -> None:
                serializers.update(gathered.write_json(fh))

            key, _size = self.store.objects.put_stream(write)
            self._stored[gathered.which] = {"stored": key, "serializers": sorted(serializers),
                                            "step": gathered.producer, "tasks": len(gathered.tasks)}
        return self._stored[gathered.which]

    def _task_spec(self, info: TaskInfo, attempt: int) -> TaskSpec:
        graph, step = self.graph, info.step
        spec = graph.step(step)
        inputs = self.input_plan(step, info.index)
        bindings = {var: self._stored_if_gathered(binding) for var, binding in inputs.bindings.items()}
        foreach = inputs.foreach and {**inputs.foreach, "binding": self._stored_if_gathered(inputs.foreach["binding"])}
        joined = self._stored_object(inputs.inputs) if isinstance(inputs.inputs, plan.GatheredInputs) else inputs.inputs
        return TaskSpec(
            objects_root=str(self.store.objects.root),
            store_url=self.store.objects.url,
            flow=self.flow, run_id=self.run_id, task_id=info.task_id, attempt=attempt,
            step=step, cell=spec.cell, index=tuple(info.index),
            source=spec.source, code=spec.code, first_line=spec.body_line,
            filename=f"<cell {cell_number(spec.cell)}: step {step}>",
            params=self.params, bindings=bindings, foreach=foreach, inputs=joined,
            catch=spec.options.catch, catch_now=attempt >= spec.options.retry,
            writes=tuple(w for w in spec.writes if w not in ("input", "inputs")),
            required=tuple(sorted(plan.required_names(graph, step))),
            foreach_vars=tuple(plan.foreach_vars(graph, step)),
            mutation_check=True,
        )
