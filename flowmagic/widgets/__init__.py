"""flowmagic's widgets: the live DAG view, the artifact inspector, the run view.

Each is an anywidget (front end built from js/ into static/) whose
mimebundle also carries a static SVG and a text rendering, so nbconvert,
terminals and GitHub show the flow too. The magics call the functions
below (see docs/ARCHITECTURE.md, "widgets/").
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

from .dagview import DagView
from .inspector import Inspector
from .live import STATES, StepStates, Throttle, states_from_tasks
from .runview import RunView, graph_of_run, states_from_store
from ._base import static_twin_expected
from .static import graph_svg, graph_text

__all__ = [
    "DagView", "Inspector", "RunView", "STATES", "StepStates", "Throttle", "graph_of_run", "graph_svg",
    "graph_text", "live_run", "show_graph", "show_run", "states_from_store", "states_from_tasks",
    "static_twin_expected",
]


def show_graph(graph_json: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
               *, run_id: int | None = None) -> DagView:
    """Display the flow's DAG (``%flow show``) and return the view."""
    view = DagView(graph_json, states, run_id=run_id)
    view.display()
    return view


def live_run(graph_json: Mapping[str, Any], *, store: Any = None, flow: str | None = None) -> DagView | RunView:
    """Display a view for a run about to start and return it (``%flow run``/``resume``).

    Pass ``view.on_event`` as the scheduler's ``on_event`` and call
    ``view.finish()`` when the call returns (also after an exception). With
    ``store`` and ``flow`` the view has the inspector below the DAG.
    """
    if store is not None and flow:
        view: DagView | RunView = RunView(store, flow, graph_json, run_id=None)
        view.start_run(None)  # the run id comes with the scheduler's first event
    else:
        view = DagView(graph_json)
    view.display()
    return view


def show_run(store: Any, flow: str, run_id: int | None = None,
             graph_json: Mapping[str, Any] | None = None) -> RunView:
    """Display a recorded run (``%flow dump RUN``): its DAG with final states and the inspector."""
    view = RunView(store, flow, graph_json, run_id=run_id)
    view.display()
    return view
