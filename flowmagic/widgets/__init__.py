"""flowmagic's widgets: the live DAG view, the artifact inspector, the run view.

Each is an anywidget (front end built from js/ into static/) whose
mimebundle also carries a static SVG and a text rendering, so nbconvert and
terminals show the flow too. The magics call the functions below.
"""
from __future__ import annotations

from typing import Any, Mapping

from .dagview import DagView
from .live import STATES, StepStates, Throttle
from .static import graph_svg, graph_text

__all__ = ["DagView", "STATES", "StepStates", "Throttle", "graph_svg", "graph_text", "show_graph"]


def show_graph(graph_json: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
               *, run_id: int | None = None) -> DagView:
    """Display the flow's DAG (``%flow show``) and return the view."""
    view = DagView(graph_json, states, run_id=run_id)
    view.display()
    return view
