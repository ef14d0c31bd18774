"""A run at a glance: the live DAG above, the inspector below.

Clicking a node selects that step in the inspector (and picking a step in
the inspector highlights its node). While a run goes on, the inspector
follows it: it switches to the new run when it starts and re-reads the
store at most once a second as tasks finish.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Mapping

import traitlets

from ._base import FlowmagicWidget
from .dagview import PUSH_INTERVAL, DagMixin
from .inspector import InspectorMixin, as_store
from .live import states_from_tasks
from .static import graph_svg
from flowmagic.states import TASK_TERMINAL



def graph_of_run(store: Any, flow: str, run_id: int | None) -> dict:
    """The `show` document a run recorded, or one built from its tasks (no edges)."""
    meta = as_store(store).meta
    if run_id is None:
        runs = meta.list_runs(flow)
        if not runs:
            return {"flow": flow, "parameters": [], "steps": [], "edges": []}
        run_id = runs[0].run_id
    run = meta.get_run(flow, run_id)
    if run.graph and isinstance(run.graph.get("steps"), list):
        return dict(run.graph, flow=run.graph.get("flow") or flow)
    names: list[str] = []
    for task in meta.tasks(flow, run_id):
        if task.step not in names:
            names.append(task.step)
    steps = [{"name": n, "cell": None, "reads": [], "writes": [], "options": {}, "next": []} for n in names]
    return {"flow": flow, "parameters": [], "steps": steps, "edges": []}


def states_from_store(store: Any, flow: str, run_id: int) -> dict[str, dict]:
    """Per-step records (``{"state", "done", "total", ...}``) of a recorded run."""
    return states_from_tasks(as_store(store).meta.tasks(flow, run_id))


class RunView(DagMixin, InspectorMixin, FlowmagicWidget):
    """``RunView(store_or_root, "MovieFlow", graph_json=None, run_id=None)``.

    Without ``graph_json`` the graph the run recorded is shown; without
    ``run_id`` the newest run. Feed a live run with :meth:`on_event`.
    """

    _view = traitlets.Unicode("run").tag(sync=True)

    def __init__(self, store: Any, flow: str, graph_json: Mapping[str, Any] | None = None,
                 run_id: int | None = None, *, interval: float = PUSH_INTERVAL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_inspector(store, flow, run_id, None, None)
        graph = graph_json if graph_json is not None else graph_of_run(self._store, flow, self.run_id)
        states = states_from_store(self._store, flow, self.run_id) if self.run_id is not None else {}
        self._init_dag(graph, states, self.run_id, interval)
        status = next((r["status"] for r in self.runs if r["value"] == self.run_id), "")
        if self.run_id is not None:
            self._live.run = {"run_id": self.run_id, "status": status}
            self._push()
        self.selected_step = self.step

    # -- the link between the two halves ------------------------------------------------
    @traitlets.observe("selected_step")
    def _node_clicked(self, change: dict) -> None:
        if change["new"] and change["new"] != self.step and any(s["value"] == change["new"] for s in self.steps):
            self.step = change["new"]

    @traitlets.observe("step")
    def _step_shown(self, change: dict) -> None:
        if change["new"] and change["new"] != self.selected_step:
            self.selected_step = change["new"]

    # -- live -------------------------------------------------------------------------------
    def on_event(self, event: Any) -> None:
        super().on_event(event)
        kind, state = getattr(event, "kind", None), getattr(event, "state", None)
        if kind == "run":
            # a new run shows up in the pickers at once; a finished one is re-read
            self.select(event.run_id, self.step or None, None)
        elif kind == "task" and state in TASK_TERMINAL:
            self._refresh_throttle.request()

    def finish(self) -> None:
        self._refresh_throttle.flush()
        super().finish()

    def fallback_text(self) -> str:
        return self.dag_text() + "\n\n" + self.inspector_text()

    def fallback_svg(self) -> str | None:
        return graph_svg(self.graph, self.states)

    def fallback_html(self) -> str:
        return self.dag_html() + self.inspector_html()
