"""Views the magics show: the DAG widget, the inspector, or their text forms.

Widgets are best effort: without a widget front end (nbconvert, a terminal)
the text renderings of :mod:`flowmagic.report.text` are printed instead, and a
widget problem never fails a step or a run.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics


def _quietly(action: Callable[[], Any], default: Any = None) -> Any:
    try:
        return action()
    except Exception as exc:  # a view must never break the cell's real work
        print(f"[flowmagic] view unavailable: {exc}", file=sys.stderr)
        return default


def graph_json(magics: FlowMagics, graph: Any) -> dict:
    """The ``show`` document, each step's ``cell`` its 0-based index in the saved
    notebook (the DAG's tooltip says "cell N" from it); the kernel's own cell
    list is in first-executed order, so its index is used only for a cell not saved yet."""
    document = graph.to_json()
    for step in document["steps"]:
        cell = magics.definition.step_cell(step["name"])
        if cell is not None and cell.number:
            step["cell"] = cell.number - 1
    return document


def show_output(value: Any) -> None:
    from IPython.display import display

    display(value)


def session_states(magics: FlowMagics, *, counts: bool = False) -> dict[str, dict]:
    """The session run's step states, as the DAG view draws them; with ``counts``,
    also each step's task counts (a new view has no events to fold them from)."""
    session = magics.session
    if session is None:
        return {}
    shown = {"interrupted": "failed"}
    records = {step: {"state": shown.get(state, state)} for step, state in session.states.items()}
    if counts:
        from flowmagic.widgets.live import record_from_states

        for step, record in records.items():
            tasks = session.task_states.get(step)
            if tasks:
                record.update({**record_from_states(tasks), "state": record["state"]})
    return records


def show_graph(magics: FlowMagics, graph: Any) -> None:
    """`%flow show`: the DAG (live: later step cells update this view)."""
    from flowmagic import widgets

    session = magics.session
    run_id = session.run_id if session is not None else None
    states = session_states(magics, counts=True)
    magics.view = _quietly(lambda: widgets.show_graph(graph_json(magics, graph), states, run_id=run_id))
    if magics.view is None:
        print(widgets.graph_text(graph_json(magics, graph), states))
    for warning in graph.warnings:
        print(f"[flowmagic] warning: {warning}", file=sys.stderr)


def run_view(magics: FlowMagics, graph: Any) -> Callable[[Any], None] | None:
    """A live view (DAG + inspector) above the streamed output of a whole run;
    returns its event callback, None when widgets cannot be shown."""
    from flowmagic import widgets

    view = _quietly(lambda: widgets.live_run(graph_json(magics, graph), store=magics.store(), flow=graph.name))
    return None if view is None else view.on_event


def finish_run_view(callback: Callable[[Any], None] | None) -> None:
    view = getattr(callback, "__self__", None)
    if view is not None:
        _quietly(view.finish)


def refresh_view(magics: FlowMagics, graph: Any) -> None:
    """Push the session run's step states (stale ones included) to its view."""
    view = magics.view
    if view is None:
        return

    def push() -> None:
        view.set_graph(graph_json(magics, graph))
        view.set_states(session_states(magics), replace=True)
        view.finish()
    _quietly(push)


def on_state(magics: FlowMagics, event: Any) -> None:
    """A task/run event of a step executed by hand, for the session view."""
    if magics.view is not None and event.kind == "task":
        _quietly(lambda: magics.view.on_event(event))


def show_inspector(magics: FlowMagics, flow: str, run_id: int, pathspec: str) -> bool:
    """`%flow dump`: the run's DAG and inspector (a task's inspector for RUN/STEP/TASK).
    False when no widget could be shown (the caller prints text then)."""
    from flowmagic import widgets

    parts = pathspec.strip("/").split("/")
    step = parts[1] if len(parts) > 1 else None
    task = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else None

    def show() -> Any:
        if step is None:
            return widgets.show_run(magics.store(), flow, run_id)
        inspector = widgets.Inspector(magics.store(), flow, run_id, step, task)
        from IPython.display import display

        display(inspector)
        return inspector
    return _quietly(show) is not None


