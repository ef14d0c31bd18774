"""The orchestrator's public API: run_flow, resume_flow, new_session_run, run_step.

The work is done by :class:`flowmagic.runtime.orchestrator.engine._Engine`; this module
decides what a run is made of (a fresh run, a resume that clones what
succeeded, one step of a session run).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

from flowmagic.errors import RunError, UsageError, cell_number
from flowmagic.states import task_successful
from flowmagic.runtime.environments import builder as environments
from flowmagic.runtime.orchestrator import inputs as plan
from flowmagic.runtime.orchestrator.engine import _Engine, known_task
from flowmagic.store.metadata import latest_generation
from flowmagic.runtime.orchestrator.events import Event, EventHandler, emit_to
from flowmagic.runtime.orchestrator.executors.base import Executors
from flowmagic.runtime.worker.forkpool import ForkServer, get_server
from flowmagic.runtime.worker.forkserver import flow_preload
from flowmagic.runtime.orchestrator.tasks import TaskInfo
from flowmagic.runtime.orchestrator.logs import LogLimits
from flowmagic.runtime.orchestrator.parameters import resolve_params
from flowmagic.runtime.orchestrator.results import RunResult, StepResult
from flowmagic.runtime.orchestrator.run_state import RunOptions

__all__ = ["RunResult", "StepResult", "new_session_run", "resume_flow", "run_flow", "run_step"]

PRELUDE_KEY = "_prelude"


# ----------------------------------------------------------------------------- public API


def run_flow(graph, store, *, params: dict | None = None, tags=(), max_workers: int | None = None,
             on_event: EventHandler | None = None, cache: bool = False, workdir: str | None = None,
             executor: str | None = None) -> RunResult:
    """Run the whole flow as a new run; returns when it has finished.

    ``executor``: ``local`` or ``dask://HOST:PORT`` (default $FLOWMAGIC_EXECUTOR, else local); a
    scheduler that cannot be reached is a UsageError before the run is recorded."""
    values = resolve_params(graph, params)
    _warm_up(graph, store, workdir)
    targets = frozenset(graph.topological_order())
    with _connected(graph, executor, targets, max_workers) as executors:
        run_id = store.meta.new_run(graph.name, params=values, code=code_of(graph), tags=list(tags),
                                    graph=graph.to_json())
        options = RunOptions(targets, max_workers=max_workers, workdir=workdir, cache=cache)
        engine = _Engine(graph, store, run_id, values, options, on_event=on_event, executors=executors)
        return engine.run_to_end(origin_run_id=None)


def resume_flow(graph, store, *, origin_run_id: int | None = None, from_step: str | None = None, tags=(),
                max_workers: int | None = None, on_event: EventHandler | None = None,
                workdir: str | None = None, executor: str | None = None) -> RunResult:
    """A new run that clones what succeeded in the origin run (the latest by
    default) and re-runs the failed steps, ``from_step``, and everything
    downstream of them, with the current code and the origin's parameters."""
    meta = store.meta
    if not graph.steps:
        raise RunError(f"nothing to resume: flow '{graph.name}' has no steps (after a kernel restart, "
                       "save the notebook or execute its step cells first); no run was recorded")
    origin = _origin_run(meta, graph.name, origin_run_id)
    if from_step is not None and from_step not in {s.name for s in graph.steps}:
        raise UsageError(f"--from: no step '{from_step}' (steps: {', '.join(s.name for s in graph.steps)})")
    values = resolve_params(graph, {k: v for k, v in origin.params.items() if k in {p.name for p in graph.params}})
    origin_tasks = {s.name: latest_generation(meta.tasks(graph.name, origin.run_id, s.name)) for s in graph.steps}
    rerun = steps_to_rerun(graph, origin_tasks, from_step)
    if not rerun:
        raise RunError(f"nothing to resume: every step of run {graph.name}/{origin.run_id} finished OK; "
                       "use --from STEP to run a step again; no run was recorded")
    _warm_up(graph, store, workdir)
    with _connected(graph, executor, frozenset(rerun), max_workers) as executors:
        run_id = meta.new_run(graph.name, params=values, code=code_of(graph), tags=list(tags),
                              origin_run_id=origin.run_id, graph=graph.to_json())
        return _resume_run(graph, store, run_id, values, origin, origin_tasks, rerun, from_step,
                           max_workers, workdir, on_event, executors)


def _resume_run(graph, store, run_id, values, origin, origin_tasks, rerun, from_step, max_workers, workdir,
                on_event, executors) -> RunResult:
    emit = emit_to(on_event)
    emit(Event("run", run_id, state="running", data={"flow": graph.name}))
    options = RunOptions(frozenset(rerun), max_workers=max_workers, workdir=workdir,
                         clones=partial_foreach_clones(graph, origin_tasks, rerun, from_step))
    with store.meta.transaction():   # 100,000 clones: one commit, and no list of them (the engine's table)
        known = {name: (_clone(graph, store, t, run_id, emit) for t in origin_tasks[name])
                 for name in graph.topological_order() if name not in rerun}
        engine = _Engine(graph, store, run_id, values, options, known=known, on_event=on_event,
                         executors=executors)
    engine.state.cloned += sum(len(engine.tasks[name]) for name in known)
    return engine.run_to_end(origin_run_id=origin.run_id, announce=False)


def new_session_run(graph, store, *, params: dict | None = None) -> int:
    """Create the interactive run that a notebook's executed step cells join."""
    values = resolve_params(graph, params)
    return store.meta.new_run(graph.name, params=values, code=code_of(graph), interactive=True,
                              graph=graph.to_json())


def run_step(graph, store, run_id: int, step: str, *, params: dict | None = None,
             on_event: EventHandler | None = None, workdir: str | None = None,
             executor: str | None = None) -> StepResult:
    """Run one step (all its foreach tasks) inside an existing run, reading the
    latest task of each producer step in that run."""
    meta = store.meta
    spec = graph.step(step)
    run = meta.get_run(graph.name, run_id)
    values = resolve_params(graph, params if params is not None else
                            {k: v for k, v in run.params.items() if k in {p.name for p in graph.params}})
    known: dict[str, Iterable[TaskInfo]] = {}
    for producer in _upstream_sources(graph, step):
        states = [t.state for t in meta.latest_tasks(graph.name, run_id, producer)]
        if not states or not all(task_successful(state) for state in states):
            cell = graph.step(producer).cell
            reads = sorted(v for v, p in graph.producers(step).items() if p == producer)
            what = f"reads {', '.join(repr(r) for r in reads)} from" if reads else "depends on"
            raise RunError(f"step '{step}' (cell {cell_number(spec.cell)}) {what} step '{producer}' "
                           f"(cell {cell_number(cell)}), "
                           f"which has not {'run' if not states else 'succeeded'} in this session yet: "
                           "execute that cell first")
        # read again as the engine's table takes them: never a list of 100,000 records
        known[producer] = (known_task(graph, store, t) for t in meta.latest_tasks(graph.name, run_id, producer))
    meta.set_run_graph(graph.name, run_id, code=code_of(graph), graph=environments.graph_with_environments(graph, run))
    _warm_up(graph, store, workdir)
    with _connected(graph, executor, frozenset({step}), None) as executors:
        engine = _Engine(graph, store, run_id, values, RunOptions(frozenset({step}), workdir=workdir), known=known,
                         on_event=on_event, executors=executors)
        status = engine.run_tasks(finish_run=False)
    meta.publish()   # a shared store (FLOWMAGIC_STORE) shows the executed cell at once; a no-op otherwise
    tasks = engine.tasks[step]
    artifacts = plan.step_refs(tasks, len(engine.chain[step]))
    exception = next((t.exception for t in tasks if t.state == "failed"), None)
    return StepResult(step, status, [t.task_id for t in tasks], artifacts, exception, engine.outputs.get(step, []),
                      [t.state for t in tasks])


# ----------------------------------------------------------------------------- helpers


def code_of(graph) -> dict[str, str]:
    code = {s.name: s.source for s in graph.steps}
    code[PRELUDE_KEY] = graph.prelude
    return code


def steps_to_rerun(graph, origin_tasks: dict[str, list], from_step: str | None) -> set[str]:
    rerun: set[str] = set()
    for name in graph.topological_order():
        tasks = origin_tasks.get(name) or []
        if not tasks or not all(task_successful(t.state) for t in tasks):
            rerun.add(name)
    if from_step is not None:
        rerun.add(from_step)
    for name in list(rerun):
        rerun |= graph.downstream(name)
    return rerun


def partial_foreach_clones(graph, origin_tasks: dict[str, list], rerun: set[str],
                           from_step: str | None) -> dict[str, dict[tuple[int, ...], int]]:
    """The finished tasks of a partly done foreach, by index, to clone rather than run (as
    Metaflow does): only in a step re-run for its own tasks (not ``--from`` it or below),
    all of whose parents are cloned, so its foreach list and inputs are the origin's."""
    forced = {from_step, *graph.downstream(from_step)} if from_step is not None else set()
    clones: dict[str, dict[tuple[int, ...], int]] = {}
    for name in rerun - forced:
        if any(parent in rerun for parent in graph.parents(name)):
            continue
        done = {tuple(t.index): t.task_id for t in origin_tasks.get(name) or []
                if t.index and task_successful(t.state)}
        if done:
            clones[name] = done
    return clones


def _origin_run(meta, flow: str, origin_run_id: int | None):
    if origin_run_id is not None:
        return meta.get_run(flow, origin_run_id)
    # a partial session run is resumed only when named: by default, a finished run
    runs = [r for r in meta.list_runs(flow) if r.status not in ("running", "partial")]
    if not runs:
        raise RunError(f"flow '{flow}' has no finished run to resume (partial session runs: name one)")
    return runs[0]


def _upstream_sources(graph, step: str) -> list[str]:
    spec = graph.step(step)
    sources = set(graph.producers(step).values()) & {s.name for s in graph.steps}
    if "inputs" in spec.reads and graph.foreach_producer(step):
        sources.add(graph.foreach_producer(step))
    return sorted(sources)


def _clone(graph, store, record, run_id: int, emit) -> TaskInfo:
    new_id = store.meta.clone_task(record.task_id, run_id)
    info = known_task(graph, store, record, state="cloned")
    info.task_id = new_id
    emit(Event("task", run_id, step=record.step, task_id=new_id, index=info.index, state="cloned"))
    return info


@contextlib.contextmanager
def _connected(graph, executor: str | None, targets: frozenset[str], max_workers: int | None):
    """The run's executors, connected before it is recorded and closed when it ends."""
    executors = Executors.for_run(graph, executor, targets, max_workers=max_workers)
    try:
        yield executors
    finally:
        executors.close()


def _warm_up(graph, store, workdir) -> ForkServer:
    """Start (or reuse) the fork server now, so a prelude error stops the run before it begins."""
    environments.check_environment_tools(graph.steps)   # e.g. --conda without a conda tool
    LogLimits.from_env()   # a bad FLOWMAGIC_LOG_HEAD/TAIL is refused before a run is created
    environments.prestart_servers(graph.steps, store.root)   # built environments: imports start now
    sources = [graph.prelude, *(step.code for step in graph.steps)]
    return get_server(graph.prelude, cwd=workdir, preload=flow_preload(sources))   # pandas only if it is used
