"""The opt-in step cache (DESIGN section 4): reuse an identical earlier task.

A task of a step with ``--cache`` (or of any step when a run asks for
``cache=True``) is not executed when an earlier run of the same flow has a
succeeded task of that step at the same foreach index whose step code and
prelude are the same, which read the same parameter values, and whose
inputs had the same content hashes. Its task is cloned (objects shared by
reference) and marked ``cached``.

Nothing extra is stored: the earlier run's code, parameters and producer
tasks are in the metadata already, so the input plan of that earlier task is
computed by the very function that plans a task's inputs
(inputs.plan_inputs) and compared by content hash.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flowmagic.states import TASK_FINISHED_OK
from flowmagic.runtime.orchestrator.tasks import TaskInfo

RUNS_SEARCHED = 20          # newest runs of the flow looked at for a match
# a caught task is successful, but its values are the None of a failure: never reused
_REUSABLE = TASK_FINISHED_OK - {"caught"}


def cache_enabled(spec, run_cache: bool) -> bool:
    return bool(run_cache or spec.options.cache)


def find_cached(engine, step: str, index: tuple[int, ...]) -> int | None:
    """The id of an earlier task identical to the one about to run, or None."""
    graph, meta = engine.graph, engine.meta
    spec = graph.step(step)
    now = fingerprint(engine, engine.tasks, step, index)
    param_names = {p.name for p in graph.params} & set(spec.reads)
    for run in meta.list_runs(graph.name)[:RUNS_SEARCHED]:
        if run.run_id == engine.run_id:
            continue
        code = run.code or {}
        if code.get(step) != spec.source or code.get("_prelude") != graph.prelude:
            continue
        if any(run.params.get(name) != engine.params.get(name) for name in param_names):
            continue
        from flowmagic.runtime.orchestrator.engine import known_task
        from flowmagic.store.metadata import latest_generation

        candidates = [t for t in latest_generation(meta.tasks(graph.name, run.run_id, step))
                      if tuple(t.index or ()) == index and t.state in _REUSABLE]
        if not candidates:
            continue
        then_tasks: dict[str, list[TaskInfo]] = {}
        for producer in _sources(graph, step):
            records = latest_generation(meta.tasks(graph.name, run.run_id, producer))
            then_tasks[producer] = [known_task(graph, engine.store, r) for r in records]
        if fingerprint(engine, then_tasks, step, index) == now:
            return candidates[0].task_id
    return None


def fingerprint(engine, tasks: dict[str, Sequence[TaskInfo]], step: str, index: tuple[int, ...]) -> Any:
    """The content hashes of everything a task of ``step`` at ``index`` reads:
    the input plan the engine sends the task (inputs.plan_inputs), hashed."""
    return engine.input_plan(step, index, tasks).fingerprint()


def _sources(graph, step: str) -> set[str]:
    steps = {s.name for s in graph.steps}
    found = set(graph.producers(step).values()) & steps
    if "inputs" in graph.step(step).reads and graph.foreach_producer(step):
        found.add(graph.foreach_producer(step))
    return found
