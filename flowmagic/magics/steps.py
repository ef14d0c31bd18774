"""Executing ``%%step`` and ``%%params`` cells by hand (DESIGN 1b).

A step cell runs that one step now, as a task of the notebook's session run;
its outputs are then bound into the kernel's namespace. The engine is
imported here, lazily, so ``%load_ext flowmagic`` stays quick.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowmagic.magics import order, staleness, views
from flowmagic.magics.output import (Interrupted, LivePrinter, step_failure,
                                     usage_error)
from flowmagic.errors import FlowDefinitionError, RunError, cell_number
from flowmagic.magics.session import SessionRun
from flowmagic.store.paths import store_root_for

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics



def record_cell(magics: FlowMagics, magic: str, line: str, cell: str) -> tuple[Any, Any]:
    """Add the executing cell to the kernel's flow and build the flow.

    A cell that makes the flow invalid by itself (a syntax error, a name
    nothing defines) is not kept: the flow stays as it was, so other cells
    still run, as in a notebook without flowmagic.
    """
    raw, cell_id, count = magics._cell_text(magic, line, cell)
    before = magics.definition.snapshot()
    try:
        defined = magics.definition.record(raw, cell_id=cell_id, execution_count=count)
    except FlowDefinitionError as exc:   # a malformed %%step line is a usage error
        raise usage_error(f"{exc}\nusage: {_USAGE[magic]}") from None
    try:
        return defined, magics.graph()
    except FlowDefinitionError as exc:
        if exc.step is None or exc.step == defined.step:
            magics.definition.restore(before)
        raise _with_saved_notebook_hint(magics, exc) from None


_USAGE = {
    "%%step": "%%step NAME [--retry [N]] [--timeout S] [--foreach VAR] [--catch VAR] "
              "[--pypi SPEC] [--conda SPEC] [--cache] [--memory MB]",
    "%%params": "%%params (then one `name = value  # help` or `name = Parameter(...)` per line)",
}


def session_for(magics: FlowMagics) -> SessionRun:
    """The current session run; a new one when the flow's name or store moved."""
    flow, root = magics.flow_name(), store_root_for(magics.notebook())
    session = magics.session
    if session is None or session.flow != flow or session.root != root:
        magics.warn_if_unnamed()
        session = magics.session = SessionRun(flow=flow, root=root)
    return session


def parameter_values(graph: Any) -> dict[str, Any]:
    return {p.name: p.default for p in graph.params}


# -- %%params -----------------------------------------------------------------
def define_params(magics: FlowMagics, line: str, cell: str) -> None:
    _defined, graph = record_cell(magics, "%%params", line, cell)
    magics.shell.user_ns.update(parameter_values(graph))
    staleness.mark_changed(magics, graph)   # a changed value: the steps reading it are stale
    if magics.view is not None:
        views.refresh_view(magics, graph)


# -- %%step -------------------------------------------------------------------
def run_step_cell(magics: FlowMagics, line: str, cell: str) -> Any:
    defined, graph = record_cell(magics, "%%step", line, cell)
    from flowmagic.runtime.orchestrator import scheduler

    step = defined.step
    renamed = defined.renamed_from
    if renamed:
        magics.markers.rename(renamed, step)
    magics.markers.open(step)   # first in the cell's output: updated in place when the step goes stale
    session = session_for(magics)
    if renamed:
        session.rename(renamed, step)
        print(f"[flowmagic] step '{renamed}' renamed to '{step}'")
    store = magics.store()
    clones = _continue_loaded_run(magics, graph, session, store, step)
    order.warn_below(magics, graph, step)
    _check_producers(magics, graph, session, step)
    params = parameter_values(graph)
    if session.run_id is None:
        session.run_id = scheduler.new_session_run(graph, store, params=params)
        magics.record_notebook(graph.name, session.run_id)
    if clones:
        magics.loaded_run = None
        for task_id in clones:
            store.meta.clone_task(task_id, session.run_id)
    spec = graph.step(step)
    printer = LivePrinter(label_tasks=bool(spec.options.foreach),
                          on_state=lambda event: views.on_state(magics, event))
    session.states[step] = "running"
    views.refresh_view(magics, graph)
    try:
        result = scheduler.run_step(graph, store, session.run_id, step, params=params,
                                    on_event=printer, workdir=str(Path.cwd()))
    except KeyboardInterrupt:
        printer.close()
        _settle(magics, graph, session, step, "interrupted")
        raise Interrupted(f"step '{step}' was stopped; its tasks are ended and "
                          f"session run {session.run_id} is marked interrupted") from None
    printer.close()
    state = _step_state(result)
    session.task_states[step] = list(result.task_states)
    if state != "failed":
        staleness.remember(magics, graph, step)
    stale = _settle(magics, graph, session, step, state)
    value = printer.take_result()
    if state == "failed":
        if value is not None:
            views.show_output(value)
        record = _relabel_traceback(magics, result.exception)
        raise step_failure(step, record, _failure_note(step, session))
    _bind_outputs(magics, store, result)
    if stale:
        previous = f"'{renamed}' before its rename" if renamed else f"the previous '{step}'"
        print(f"[flowmagic] marked stale (they used {previous}): {', '.join(stale)}")
    return value


def _continue_loaded_run(magics: FlowMagics, graph: Any, session: SessionRun, store: Any, step: str) -> list[int]:
    """After `%flow load RUN`, the first step cell's new session run starts from
    that run: the steps above that finished OK there count as run (their tasks
    are cloned in). Returns the task ids to clone."""
    loaded = magics.loaded_run
    if loaded is None or loaded[0] != graph.name or session.run_id is not None:
        return []
    from flowmagic.states import task_successful
    from flowmagic.store.metadata import latest_generation

    redo = {step} | graph.downstream(step)
    clones = []
    for spec in graph.steps:
        tasks = latest_generation(store.meta.tasks(graph.name, loaded[1], spec.name))
        if spec.name in redo or not tasks or not all(task_successful(t.state) for t in tasks):
            continue
        session.states[spec.name] = "cloned"
        clones += [t.task_id for t in tasks]
    return clones


def _step_state(result: Any) -> str:
    """The session's word for an executed step: a success with a --catch'ed task is ``caught``, as in a run."""
    if result.status != "succeeded":   # StepResult: succeeded | failed
        return "failed"
    return "caught" if "caught" in result.task_states else "done"


def _settle(magics: FlowMagics, graph: Any, session: SessionRun, step: str, state: str) -> list[str]:
    """Record a step's outcome in the session and its run's status in the store."""
    stale = session.record(graph, step, state)
    for below in stale:
        session.reasons[below] = _stale_reason(magics, graph, step, below)
    status = session.status(graph)
    # The session run's status follows the steps executed so far: failed or
    # interrupted at once; succeeded when every step of the flow has run;
    # running again when a failed step was fixed and others are still to run.
    if status != session.recorded:
        magics.store().meta.finish_run(graph.name, session.run_id, status)
        session.recorded = status
    magics.record_notebook(graph.name, session.run_id)   # cells executed since may have new ids
    views.refresh_view(magics, graph)
    magics.markers.refresh(session)
    return stale


def _stale_reason(magics: FlowMagics, graph: Any, step: str, below: str) -> str:
    """What a stale step's marker says: ``it used the previous 'rows' from cell 2``."""
    cell = magics.definition.step_cell(step)
    where = cell.place() if cell is not None else f"step '{step}'"
    variables = [v for v, producer in sorted(graph.producers(below).items()) if producer == step]
    if variables:
        return f"it used the previous {', '.join(repr(v) for v in variables)} from {where}"
    return f"it depends on step '{step}' ({where}), which ran again"


def _with_saved_notebook_hint(magics: FlowMagics, exc: FlowDefinitionError) -> FlowDefinitionError:
    """After a restart the kernel knows only the cells it executed: when a step
    reads a name no executed step writes, say which saved cell writes it."""
    notebook = magics.notebook()
    if exc.variable is None or notebook is None or not notebook.exists():
        return exc
    try:
        from flowmagic.notebook import load_flow

        saved = load_flow(notebook)
    except Exception:  # the saved file may be older, or broken: no hint then
        return exc
    writers = [s for s in saved.steps if exc.variable in s.writes and s.name != exc.step]
    if not writers:
        return exc
    writer = writers[0]
    hint = (f"\nthe saved notebook has step '{writer.name}' (cell {cell_number(writer.cell)} of {notebook.name}) "
            f"writing '{exc.variable}': execute that cell first")
    exc.args = (str(exc) + hint,)
    return exc


def _check_producers(magics: FlowMagics, graph: Any, session: SessionRun, step: str) -> None:
    missing = session.missing_producers(graph, step)
    if missing:
        message = _missing_message(magics, graph, step, missing, session)
        magics.definition.refused(magics.definition.step_cell(step).key)
        raise RunError(message)
    stale = session.stale_producers(graph, step)
    if stale:
        print(f"[flowmagic] note: {', '.join(repr(s) for s in stale)} ran before a step upstream "
              f"was re-run; execute {'its cell' if len(stale) == 1 else 'their cells'} "
              f"again to refresh what '{step}' reads")


def _missing_message(magics: FlowMagics, graph: Any, step: str, missing: list[str],
                     session: SessionRun) -> str:
    by_producer: dict[str, list[str]] = {}
    for variable, producer in sorted(graph.producers(step).items()):
        by_producer.setdefault(producer, []).append(variable)
    parts = []
    for producer in missing:
        cell = magics.definition.step_cell(producer)
        where = cell.label() if cell is not None else f"the cell '%%step {producer}'"
        names = ", ".join(by_producer.get(producer, [])) or "its outputs"
        why = session.states.get(producer)
        status = "failed" if why == "failed" else "was interrupted" if why == "interrupted" else "has not run"
        parts.append(f"step '{producer}' ({where}) produces {names} but {status} in this session run")
    return (f"step '{step}' cannot run yet: " + "; ".join(parts)
            + ". Execute that cell first, or run the whole flow with %flow run.")


def _failure_note(step: str, session: SessionRun) -> str:
    return (f"step '{step}' failed in session run {session.flow}/{session.run_id}: "
            "fix the cell and execute it again, or use %flow resume")


def _bind_outputs(magics: FlowMagics, store: Any, result: Any) -> None:
    """Bind the step's persisted outputs (frames and arrays memory-mapped)."""
    from flowmagic.store.serializers import load_artifact

    def load(ref: Any) -> Any:
        if isinstance(ref, (list, tuple)):   # gathered over a foreach's tasks
            return [load(r) for r in ref]
        return None if ref is None else load_artifact(store.objects, ref)

    values, unreadable = {}, []
    for name, ref in (result.artifacts or {}).items():
        if _unsaved(ref):
            continue   # the task warned already: the value could not be saved
        try:
            values[name] = load(ref)
        except Exception as exc:  # one bad artifact must not hide the others
            if isinstance(exc, ImportError) and getattr(ref, "type", None) == "module":
                continue   # `import editdistance` in a --pypi step: the kernel lacks it, as expected
            unreadable.append(f"{name} ({type(exc).__name__}: {exc})")
    magics.shell.user_ns.update(values)
    if unreadable:
        print(f"[flowmagic] warning: not bound in the notebook: {'; '.join(unreadable)}",
              file=sys.stderr)


def _unsaved(ref: Any) -> bool:
    if isinstance(ref, (list, tuple)):
        return bool(ref) and all(_unsaved(r) for r in ref)
    return getattr(ref, "serializer", None) == "unsaved"


# The scheduler names a step's code "<cell N: step S>", N numbering (from 1) the
# kernel's cell list; a user knows the cell by its place in the notebook and In [n].
_CELL_FILENAME = re.compile(r"<cell (\d+): step (\w+)>")


def _relabel_traceback(magics: FlowMagics, record: dict | None) -> dict | None:
    if not record:
        return record

    def label(match: re.Match) -> str:
        cell = magics.definition.step_cell(match.group(2))
        where = []
        if cell is not None and cell.number:
            where.append(f"cell {cell.number}")
        if cell is not None and cell.executed and cell.execution_count:
            where.append(f"In [{cell.execution_count}]")
        return f"step {match.group(2)} ({', '.join(where)})" if where else f"step {match.group(2)}"

    relabelled = dict(record)
    if isinstance(relabelled.get("traceback"), str):
        relabelled["traceback"] = _CELL_FILENAME.sub(label, relabelled["traceback"])
    if isinstance(relabelled.get("traceback_lines"), list):
        relabelled["traceback_lines"] = [_CELL_FILENAME.sub(label, ln) for ln in relabelled["traceback_lines"]]
    return relabelled
