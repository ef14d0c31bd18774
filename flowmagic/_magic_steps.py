"""Executing ``%%step`` and ``%%params`` cells by hand (DESIGN 1b).

A step cell runs that one step now, as a task of the notebook's session run;
its outputs are then bound into the kernel's namespace. The engine is
imported here, lazily, so ``%load_ext flowmagic`` stays quick.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowmagic import _magic_views as views
from flowmagic._magic_output import (Interrupted, LivePrinter, step_failure,
                                     usage_error)
from flowmagic.errors import FlowDefinitionError, RunError
from flowmagic.session import SessionRun, store_root_for

if TYPE_CHECKING:
    from flowmagic.magics import FlowMagics

_OK_STATES = {"done": "done", "succeeded": "done", "ok": "done", "caught": "caught"}


def record_cell(magics: FlowMagics, magic: str, line: str, cell: str):
    raw, cell_id, count = magics._cell_text(magic, line, cell)
    try:
        return magics.definition.record(raw, cell_id=cell_id, execution_count=count)
    except FlowDefinitionError as exc:   # a malformed %%step line is a usage error
        raise usage_error(f"{exc}\nusage: %%step NAME [--retry [N]] [--timeout S] [--foreach VAR] "
                          "[--catch VAR] [--pypi SPEC] [--conda SPEC] [--cache]") from None


def session_for(magics: FlowMagics) -> SessionRun:
    """The current session run; a new one when the flow's name or store moved."""
    flow, root = magics.flow_name(), store_root_for(magics.notebook())
    session = magics.session
    if session is None or session.flow != flow or session.root != root:
        session = magics.session = SessionRun(flow=flow, root=root)
    return session


def parameter_values(graph: Any) -> dict[str, Any]:
    return {p.name: p.default for p in graph.params}


# -- %%params -----------------------------------------------------------------
def define_params(magics: FlowMagics, line: str, cell: str) -> None:
    record_cell(magics, "%%params", line, cell)
    graph = magics.graph()
    magics.shell.user_ns.update(parameter_values(graph))
    if magics.view is not None:
        views.refresh_view(magics, graph)


# -- %%step -------------------------------------------------------------------
def run_step_cell(magics: FlowMagics, line: str, cell: str) -> None:
    defined = record_cell(magics, "%%step", line, cell)
    from flowmagic.runtime import scheduler

    graph = magics.graph()
    step = defined.step
    session = session_for(magics)
    _check_producers(magics, graph, session, step)
    store = magics.store()
    params = parameter_values(graph)
    if session.run_id is None:
        session.run_id = scheduler.new_session_run(graph, store, params=params)
    spec = graph.step(step)
    printer = LivePrinter(label_tasks=bool(spec.options.foreach),
                          on_state=lambda event: views.on_state(magics, graph, event))
    session.states[step] = "running"
    views.refresh_view(magics, graph)
    try:
        result = scheduler.run_step(graph, store, session.run_id, step, params=params, on_event=printer)
    except KeyboardInterrupt:
        printer.close()
        session.record(graph, step, "interrupted")
        views.refresh_view(magics, graph)
        raise Interrupted(f"step '{step}' was stopped; its tasks are ended and "
                          f"session run {session.run_id} is marked interrupted") from None
    printer.close()
    state = _OK_STATES.get(result.status, "failed")
    stale = session.record(graph, step, state)
    views.refresh_view(magics, graph)
    if state == "failed":
        raise step_failure(step, result.exception, _failure_note(magics, step, session))
    _bind_outputs(magics, store, result)
    if stale:
        print(f"[flowmagic] marked stale (they used the previous '{step}'): {', '.join(stale)}")


def _check_producers(magics: FlowMagics, graph: Any, session: SessionRun, step: str) -> None:
    missing = session.missing_producers(graph, step)
    if missing:
        raise RunError(_missing_message(magics, graph, step, missing, session))
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


def _failure_note(magics: FlowMagics, step: str, session: SessionRun) -> str:
    return (f"step '{step}' failed in session run {session.flow}/{session.run_id}: "
            "fix the cell and execute it again, or use %flow resume")


def _bind_outputs(magics: FlowMagics, store: Any, result: Any) -> None:
    """Bind the step's persisted outputs (frames and arrays memory-mapped)."""
    from flowmagic.store.serializers import load_artifact

    values = {}
    for name, ref in (result.artifacts or {}).items():
        if isinstance(ref, (list, tuple)):
            values[name] = [None if r is None else load_artifact(store.objects, r) for r in ref]
        else:
            values[name] = None if ref is None else load_artifact(store.objects, ref)
    magics.shell.user_ns.update(values)
