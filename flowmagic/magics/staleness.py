"""Which steps an edited ordinary cell or ``%%params`` value made stale (issue 15).

A step ran with the prelude names it uses (its reads, and what the defs it
uses read, transitively) and the parameters it reads. What it ran with is
kept as text: ``ast.unparse`` of each prelude name's statement (so
whitespace and comments are not edits) and ``repr`` of each parameter's
value. After an ordinary or ``%%params`` cell runs, a step whose text
differs now is stale, and says which name changed and where.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

from flowmagic.errors import FlowmagicError

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics

_PRELUDE, _PARAM = "prelude", "param"


def inputs_of(graph: Any, step: str) -> dict[str, str]:
    """What ``step`` runs with besides step outputs: ``kind:name`` -> its text."""
    from flowmagic.flow.graph import prelude_definitions

    used = {f"{_PRELUDE}:{name}": d.text for name, d in prelude_definitions(graph, step).items()}
    reads = set(graph.step(step).reads)
    used.update({f"{_PARAM}:{p.name}": repr(p.default) for p in graph.params if p.name in reads})
    return used


def remember(magics: FlowMagics, graph: Any, step: str) -> None:
    """A step ran: keep what it ran with."""
    if magics.session is not None:
        magics.session.inputs[step] = inputs_of(graph, step)


def after_ordinary_cell(magics: FlowMagics) -> None:
    """After an ordinary cell ran: mark the steps whose prelude names changed.
    Never raises: an ordinary cell must run as it would without flowmagic."""
    try:
        graph = magics.graph()
    except FlowmagicError:
        return   # the flow does not build now: executing a step will say why
    except Exception as exc:  # noqa: BLE001 - a check must not break the user's cell
        print(f"[flowmagic] warning: could not check which steps are stale: {exc}", file=sys.stderr)
        return
    mark_changed(magics, graph)


def mark_changed(magics: FlowMagics, graph: Any) -> list[str]:
    """Mark stale every step whose prelude names or parameters changed since it
    ran; print one line and update the markers. Returns the steps marked."""
    session = magics.session
    if session is None:
        return []
    names = {s.name for s in graph.steps}
    marked: dict[str, list[str]] = {}   # "'clean' from cell 3" -> steps
    for step, before in list(session.inputs.items()):
        if step not in names:
            continue
        changed = _first_change(before, inputs_of(graph, step))
        if changed is None:
            continue
        why = _where(magics, graph, changed)
        if session.mark_stale(step, f"it used the previous {why}"):
            marked.setdefault(why, []).append(step)
        session.inputs.pop(step, None)   # stale now: the next execution records afresh
    for why, steps in marked.items():
        print(f"[flowmagic] marked stale (they used the previous {why}): {', '.join(steps)}")
    if marked:
        from flowmagic.magics import views

        magics.markers.refresh(session)
        views.refresh_view(magics, graph)
    return [s for steps in marked.values() for s in steps]


def _first_change(before: dict[str, str], now: dict[str, str]) -> str | None:
    """The first ``kind:name`` whose text differs (one it used before first)."""
    for key in [*before, *now]:
        if before.get(key) != now.get(key):
            return key
    return None


def _where(magics: FlowMagics, graph: Any, key: str) -> str:
    """``'clean' from cell 3``: the name and the cell that defines it now."""
    kind, name = key.split(":", 1)
    index = None
    if kind == _PARAM:
        index = next((p.cell for p in graph.params if p.name == name), None)
    elif name in graph.prelude_defs:
        index = graph.prelude_defs[name].cell
    cell = magics.definition.cell_at(index)
    return f"'{name}' from {cell.place()}" if cell is not None else f"'{name}'"
