"""Views the magics show: the DAG widget, the inspector, or their text forms.

Widgets are best effort: without a widget front end (nbconvert, a terminal)
the text renderings of :mod:`flowmagic.report` are printed instead, and a
widget problem never fails a step or a run.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from flowmagic.magics import FlowMagics


def _quietly(action: Callable[[], Any], default: Any = None) -> Any:
    try:
        return action()
    except Exception as exc:  # a view must never break the cell's real work
        print(f"[flowmagic] view unavailable: {exc}", file=sys.stderr)
        return default


def show_graph(magics: FlowMagics, graph: Any) -> None:
    from flowmagic import report

    print(report.show_text(graph))


def run_view(magics: FlowMagics, graph: Any) -> Callable[[Any], None] | None:
    """A live view above the streamed output of a whole run; its event callback."""
    return None


def refresh_view(magics: FlowMagics, graph: Any) -> None:
    """Push the session run's step states to its view, if one is shown."""


def on_state(magics: FlowMagics, graph: Any, event: Any) -> None:
    """A task/run event of a step executed by hand, for the session view."""


def show_inspector(magics: FlowMagics, flow: str, path: str) -> None:
    """The artifact inspector for `%flow dump`, when widgets can be shown."""


def export_script(magics: FlowMagics, export: Any, graph: Any, output: str | None) -> Path:
    notebook = magics.notebook()
    folder = notebook.parent if notebook is not None else Path.cwd()
    target = Path(output) if output else folder / f"{graph.name.lower()}.py"
    path = export.export_flow(graph, target)
    print(f"[flowmagic] wrote {path or target}")
    return Path(path or target)
