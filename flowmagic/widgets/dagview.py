"""The live DAG view: the flow's steps and edges with each step's state.

Python keeps the truth in traits (``graph``, ``states``, ``run``,
``selected_step``); the front end (js/src/dag.js) only draws them, so a
re-rendered cell or a reloaded page shows the same picture. Runtime events
are folded into per-step records (:mod:`.live`) and pushed at most
``1 / interval`` times a second.
"""
from __future__ import annotations

import threading
from typing import Any
from collections.abc import Mapping

import traitlets
from ipywidgets import widget_serialization

from ._base import FlowmagicWidget, VizAsset, viz_asset
from .live import StepStates, Throttle, normalise_states
from .static import graph_svg, graph_text, picture_html

PUSH_INTERVAL = 0.1  # seconds between two pushes of live states: 10 per second


def check_graph(graph: Mapping[str, Any]) -> dict:
    """The `show` document (DESIGN section 8) as a plain dict, or a clear error."""
    if not isinstance(graph, Mapping):
        raise TypeError(f"a flowmagic DAG view needs FlowGraph.to_json(), a dict; got {type(graph).__name__}")
    steps = graph.get("steps")
    if not isinstance(steps, list):
        raise ValueError("the graph document has no 'steps' list: pass FlowGraph.to_json()")
    for i, step in enumerate(steps):
        if not isinstance(step, Mapping) or not isinstance(step.get("name"), str):
            raise ValueError(f"steps[{i}] of the graph document has no 'name'")
    names = {s["name"] for s in steps}
    for i, edge in enumerate(graph.get("edges") or []):
        for end in ("from", "to"):
            if edge.get(end) not in names:
                raise ValueError(f"edges[{i}] {end} {edge.get(end)!r} is not a step of the graph")
    return {
        "flow": graph.get("flow") or "",
        "parameters": [dict(p) for p in graph.get("parameters") or []],
        "steps": [dict(s) for s in steps],
        "edges": [dict(e) for e in graph.get("edges") or []],
    }


class DagMixin(traitlets.HasTraits):
    """Traits and behaviour of a DAG view; shared by DagView and RunView."""

    graph = traitlets.Dict().tag(sync=True)
    states = traitlets.Dict().tag(sync=True)
    run = traitlets.Dict().tag(sync=True)               # {"run_id", "status"}
    selected_step = traitlets.Unicode("").tag(sync=True)
    _viz = traitlets.Instance(VizAsset, allow_none=True).tag(sync=True, **widget_serialization)

    def _init_dag(self, graph_json: Mapping[str, Any], states: Mapping[str, Mapping] | None,
                  run_id: int | None, interval: float) -> None:
        self._live_lock = threading.RLock()
        self.on_msg(self._on_front_end_message)
        self.graph = check_graph(graph_json)
        self._live = StepStates(s["name"] for s in self.graph["steps"])
        for name, record in normalise_states(states or {}).items():
            self._live.set(name, record)
        self._throttle = Throttle(self._push, interval=interval)
        if run_id is not None:
            self._live.run = {"run_id": run_id, "status": ""}
        self._push()

    # -- feeding it ---------------------------------------------------------
    def on_event(self, event: Any) -> None:
        """Take a runtime Event (pass this method as ``on_event=``); throttled."""
        with self._live_lock:
            changed = self._live.apply(event)
        if not changed:
            return
        if getattr(event, "kind", None) == "run":
            self.flush()  # run status changes are rare and worth showing at once
        else:
            self._throttle.request()

    def set_states(self, states: Mapping[str, Mapping[str, Any]], *, replace: bool = False) -> None:
        """Show these records (``{step: {"state", ...}}``), e.g. ``stale`` steps; immediate.

        With ``replace``, steps not given go back to pending. A bare
        ``{"state": "done"}`` for a step whose task events said ``caught``
        keeps the richer record (see :meth:`StepStates.set`).
        """
        with self._live_lock:
            if replace:  # steps not given go back to pending
                self._live.reset([s["name"] for s in self.graph["steps"] if s["name"] not in states],
                                 keep_run=True)
            for name, record in states.items():
                self._live.set(str(name), record)
        self.flush()

    def set_graph(self, graph_json: Mapping[str, Any]) -> None:
        """The flow changed (a %%step cell was edited): keep the states of steps that remain."""
        graph = check_graph(graph_json)
        with self._live_lock:
            self._live.keep_only(s["name"] for s in graph["steps"])
            self.graph = graph
            if self.selected_step and self.selected_step not in {s["name"] for s in graph["steps"]}:
                self.selected_step = ""
        self.flush()

    def start_run(self, run_id: int | None, status: str = "running") -> None:
        """A new run begins in this view: every step back to pending (run id None: not known yet)."""
        with self._live_lock:
            self._live.reset(s["name"] for s in self.graph["steps"])
            self._live.run = {"run_id": run_id, "status": status} if run_id is not None else {}
        self.flush()

    def flush(self) -> None:
        """Push pending state changes now (call at the end of a run)."""
        self._throttle.flush()

    def _push(self) -> None:
        with self._live_lock:
            snapshot = self._live.snapshot()
            names = [s["name"] for s in self.graph["steps"]]
            self.states = {name: snapshot[name] for name in names if name in snapshot}
            self.run = dict(self._live.run)

    @property
    def pushes(self) -> int:
        """How many times live states were sent to the front end."""
        return self._throttle.pushes

    # -- showing it ---------------------------------------------------------
    def _on_front_end_message(self, _widget: Any, content: Any, _buffers: Any) -> None:
        if isinstance(content, dict) and content.get("type") == "need-viz":
            self._before_widget_display()

    def _before_widget_display(self) -> None:
        # Graphviz goes to the front end only when a view will draw it (its
        # trait message precedes the display message on the same channel).
        if self._viz is None or self._viz.comm is None:
            self._viz = viz_asset()

    def finish(self) -> None:
        """The run is over: push the last states and rewrite the static forms the notebook keeps."""
        self.flush()
        self.refresh_static()

    def dag_text(self) -> str:
        return graph_text(self.graph, self.states, self.run)

    def dag_svg(self) -> str | None:
        return graph_svg(self.graph, self.states)

    def dag_html(self) -> str:
        return picture_html(self.graph, self.states, self.run)


class DagView(DagMixin, FlowmagicWidget):
    """The flow's DAG with live step states.

    ``DagView(graph.to_json())``; feed it with :meth:`on_event` (runtime
    events) or :meth:`set_states`; read :attr:`selected_step` (set by a
    click on a node).
    """

    _view = traitlets.Unicode("dag").tag(sync=True)

    def __init__(self, graph_json: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
                 *, run_id: int | None = None, interval: float = PUSH_INTERVAL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_dag(graph_json, states, run_id, interval)

    def fallback_text(self) -> str:
        return self.dag_text()

    def fallback_svg(self) -> str | None:
        return self.dag_svg()

    def fallback_html(self) -> str:
        return self.dag_html()
