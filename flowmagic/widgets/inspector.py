"""The artifact inspector: pick a run, a step and a task; see what it stored.

Python reads the store (metadata through :class:`flowmagic.store.Metadata`,
previews through :mod:`.preview`) and fills plain JSON traits; the front
end (js/src/inspector.js) draws them and sends the pickers' choices back.
"""
from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import traitlets

from flowmagic.states import TASK_WENT_WRONG
from flowmagic.store.environments import environments_of_run
from flowmagic.store.outputs import output_previews
from flowmagic.store.metadata import current_executions
from ._base import FlowmagicWidget
from .live import Throttle, states_from_tasks
from .preview import format_size, preview_artifact
from .static import format_duration, text_html

LOG_CHARS = 20_000  # the end of a task's stdout/stderr shown per attempt


def as_store(store: Any) -> Any:
    """A Store from a Store, a store root path, or None (the default root)."""
    from flowmagic.store import Store, open_store

    if isinstance(store, Store):
        return store
    return open_store(Path(store) if store is not None else None)


# -- records -> picker options --------------------------------------------------------
def run_option(run: Any) -> dict:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.started_at)) if run.started_at else ""
    words = [f"run {run.run_id}", run.status, when]
    if run.origin_run_id is not None:
        words.append(f"resumed from {run.origin_run_id}")
    if run.interactive:
        words.append("interactive")
    if run.tags:
        words.append("tags: " + ", ".join(run.tags))
    return {"value": run.run_id, "label": " · ".join(w for w in words if w),
            "status": run.status, "tags": list(run.tags)}


def task_option(task: Any) -> dict:
    words = [f"task {task.task_id}"]
    if task.index:
        words.append("[" + ", ".join(str(i) for i in task.index) + "]")
    if task.item is not None:
        words.append(str(task.item)[:40])
    words.append(task.state)
    return {"value": task.task_id, "label": " · ".join(words), "state": task.state}


def attempt_record(attempt: Any) -> dict:
    words = [f"attempt {attempt.attempt}", attempt.outcome]
    if attempt.started_at and attempt.finished_at:
        words.append(format_duration(attempt.finished_at - attempt.started_at))
    if attempt.exit_code not in (None, 0):
        words.append(f"exit code {attempt.exit_code}")
    if attempt.signal:
        words.append(f"signal {attempt.signal}")
    exception = attempt.exception or None
    return {
        "attempt": attempt.attempt,
        "outcome": attempt.outcome,
        "label": " · ".join(words),
        "stdout": _tail(attempt.stdout or ""),
        "stderr": _tail(attempt.stderr or ""),
        "exception": {k: str(exception.get(k) or "") for k in ("type", "message", "traceback")}
        if exception else None,
    }


def _tail(text: str) -> str:
    return text if len(text) <= LOG_CHARS else "…" + text[-LOG_CHARS:]


def artifact_record(objects: Any, ref: Any) -> dict:
    return {"name": ref.name, "type": ref.type, "size": ref.size, "size_text": format_size(ref.size),
            "serializer": ref.serializer, "preview": preview_artifact(objects, ref)}


class InspectorMixin(traitlets.HasTraits):
    """Traits and store reading of the inspector; shared by Inspector and RunView."""

    flow = traitlets.Unicode("").tag(sync=True)
    runs = traitlets.List().tag(sync=True)        # [{"value", "label", "status", "tags"}], newest first
    run_id = traitlets.Int(None, allow_none=True).tag(sync=True)
    steps = traitlets.List().tag(sync=True)       # [{"value", "label", "state"}]
    step = traitlets.Unicode("").tag(sync=True)
    tasks = traitlets.List().tag(sync=True)       # [{"value", "label", "state"}]
    task_id = traitlets.Int(None, allow_none=True).tag(sync=True)
    detail = traitlets.Dict().tag(sync=True)      # {"artifacts": [...], "attempts": [...], "note"}
    message = traitlets.Unicode("").tag(sync=True)

    def _init_inspector(self, store: Any, flow: str, run_id: int | None, step: str | None,
                        task_id: int | None) -> None:
        self._store = as_store(store)
        self._loading = False
        self._refresh_throttle = Throttle(self.refresh, interval=1.0)
        self.flow = flow
        self._select(run_id, step, task_id)

    # -- public ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Read the store again (a run started or finished), keeping the selection."""
        self._select(self.run_id, self.step or None, self.task_id)

    def select(self, run_id: int | None = None, step: str | None = None, task_id: int | None = None) -> None:
        """Show this run (newest when None), step and task."""
        self._select(run_id, step, task_id)

    # -- loading ----------------------------------------------------------------------------
    def _select(self, run_id: int | None, step: str | None, task_id: int | None) -> None:
        self._loading = True
        try:
            runs = self._store.meta.list_runs(self.flow)
            self.runs = [run_option(r) for r in runs]
            if not runs:
                self.message = f"Flow {self.flow} has no runs in the store at {self._store.root} yet."
                self.run_id, self.steps, self.step, self.tasks, self.task_id, self.detail = (
                    None, [], "", [], None, {})
                return
            ids = [r.run_id for r in runs]
            self.run_id = run_id if run_id in ids else ids[0]
            self.message = "" if run_id in (None, self.run_id) else (
                f"run {run_id} does not exist; showing run {self.run_id}")
            self._load_steps(step, task_id)
        finally:
            self._loading = False

    def _load_steps(self, step: str | None, task_id: int | None) -> None:
        # a session run: the current execution of each cell (session branch, issue 15)
        tasks = current_executions(self._store.meta.get_run(self.flow, self.run_id),
                                   self._store.meta.tasks(self.flow, self.run_id))
        states = states_from_tasks(tasks)
        order = _step_order(self._store.meta.get_run(self.flow, self.run_id), tasks)
        self.steps = [{"value": name, "label": f"{name} · {states.get(name, {}).get('state', 'pending')}",
                       "state": states.get(name, {}).get("state", "pending")} for name in order]
        if step not in order:
            failed = [s["value"] for s in self.steps if s["state"] in TASK_WENT_WRONG]
            step = failed[0] if failed else (order[0] if order else "")
        self.step = step or ""
        self._load_tasks(task_id)

    def _load_tasks(self, task_id: int | None) -> None:
        tasks = current_executions(self._store.meta.get_run(self.flow, self.run_id),
                                   self._store.meta.tasks(self.flow, self.run_id, self.step),
                                   named_step=True) if self.step else []
        self.tasks = [task_option(t) for t in tasks]
        ids = [t.task_id for t in tasks]
        if task_id not in ids:
            failed = [t.task_id for t in tasks if t.state in TASK_WENT_WRONG]
            task_id = failed[0] if failed else (ids[0] if ids else None)
        self.task_id = task_id
        self._load_detail()

    def _load_detail(self) -> None:
        if self.task_id is None:
            self.detail = {"artifacts": [], "attempts": [],
                           "note": f"step {self.step} has no task in run {self.run_id}" if self.step else ""}
            return
        meta = self._store.meta
        task = meta.get_task(self.task_id)
        attempts = meta.attempts(self.task_id)
        note = ""
        if not attempts and task.origin_task_id is not None:  # a clone: show what ran
            attempts = meta.attempts(task.origin_task_id)
            note = f"{task.state} from task {task.origin_task_id}"
        self.detail = {
            "artifacts": [artifact_record(self._store.objects, ref) for ref in meta.artifacts(self.task_id)],
            "attempts": [attempt_record(a) for a in attempts],
            # display() calls, last values and figures of the visible attempt (runtime/outputs.py)
            "outputs": output_previews(self._store.objects, attempts[-1].outputs) if attempts else [],
            "note": note,
            # the --pypi/--conda environment the step ran in: {"kind", "requested", "packages", ...} or None
            "environment": environments_of_run(meta, self.flow, self.run_id, [self.step]).get(self.step),
        }

    @traitlets.observe("detail")
    def _detail_shown(self, _change: dict) -> None:
        # what the user picked is what the saved notebook's static twin shows
        refresh = getattr(self, "refresh_static", None)
        if refresh is not None:
            refresh(twin_only=True)

    # -- the pickers ----------------------------------------------------------------------------
    @traitlets.observe("run_id")
    def _run_picked(self, change: dict) -> None:
        if not self._loading and change["new"] is not None:
            self._select(change["new"], self.step or None, None)

    @traitlets.observe("step")
    def _step_picked(self, change: dict) -> None:
        if not self._loading and change["new"]:
            self._loading = True
            try:
                self._load_tasks(None)
            finally:
                self._loading = False

    @traitlets.observe("task_id")
    def _task_picked(self, change: dict) -> None:
        if not self._loading and change["new"] is not None:
            self._loading = True
            try:
                self._load_detail()
            finally:
                self._loading = False

    # -- text ---------------------------------------------------------------------------------------
    def inspector_text(self) -> str:
        run = next((r for r in self.runs if r["value"] == self.run_id), None)
        lines = [f"{self.flow} · {run['label'] if run else 'no runs'}"]
        if self.message:
            lines.append(self.message)
        if self.step:
            task = next((t for t in self.tasks if t["value"] == self.task_id), None)
            lines.append(f"step {self.step}" + (f" · {task['label']}" if task else ""))
        artifacts = self.detail.get("artifacts") or []
        if artifacts:
            width = max(len(a["name"]) for a in artifacts)
            type_width = max(len(a["type"]) for a in artifacts)
            for a in artifacts:
                lines.append(f"  {a['name']:<{width}}  {a['type']:<{type_width}}  {a['size_text']:>9}  "
                             f"{_preview_line(a['preview'])}")
        environment = self.detail.get("environment")
        if environment:
            lines.append(f"  environment --{environment['kind']} \"{' '.join(environment['requested'])}\": "
                         + " ".join(environment["packages"]))
        for output in self.detail.get("outputs") or []:
            shown = output["text"].replace("\n", " ")[:60] if output["kind"] == "text" else output["mimetype"]
            lines.append(f"  {output['label']}: {shown}")
        for attempt in self.detail.get("attempts") or []:
            lines.append(f"  {attempt['label']}")
            if attempt["exception"]:
                lines.append(f"    {attempt['exception']['type']}: {attempt['exception']['message']}")
        return "\n".join(lines)


    def inspector_html(self) -> str:
        """The inspector as static HTML (the twin): the selection, the artifacts
        table with a frame's first rows, the attempts and their exceptions."""
        run = next((r for r in self.runs if r["value"] == self.run_id), None)
        task = next((t for t in self.tasks if t["value"] == self.task_id), None)
        head = [self.flow, run["label"] if run else "no runs"]
        if self.step:
            head.append(f"step {self.step}" + (f" · {task['label']}" if task else ""))
        parts = [f'<div class="fm-twin-caption" style="font-weight:600">{_esc(" · ".join(head))}</div>']
        if self.message:
            parts.append(f"<div>{_esc(self.message)}</div>")
        artifacts = self.detail.get("artifacts") or []
        if artifacts:
            rows = "".join(f"<tr><td{_TOP}><code>{_esc(a['name'])}</code></td><td{_TOP}>{_esc(a['type'])}</td>"
                           f"<td{_TOP}>{_esc(a['size_text'])}</td>"
                           f"<td{_TOP}>{_esc(_preview_line(a['preview']))}{_frame_html(a['preview'])}</td></tr>"
                           for a in artifacts)
            parts.append('<table class="fm-twin-artifacts"><thead><tr><th>artifact</th><th>type</th>'
                         f"<th>size</th><th>preview</th></tr></thead><tbody>{rows}</tbody></table>")
        elif self.detail.get("note"):
            parts.append(f"<div>{_esc(self.detail['note'])}</div>")
        for attempt in self.detail.get("attempts") or []:
            parts.append(f"<div>{_esc(attempt['label'])}</div>")
            if attempt["exception"]:
                exc = attempt["exception"]
                parts.append(text_html(f"{exc['type']}: {exc['message']}"))
        return "".join(parts)


_TOP = ' style="text-align:left;vertical-align:top"'  # JupyterLab centres table cells


def _esc(text: str) -> str:
    return html.escape(str(text), quote=True)


def _frame_html(preview: dict, rows: int = 5) -> str:
    """A data frame's first rows as a small table (the live inspector shows more)."""
    if preview.get("kind") != "frame" or not preview.get("columns"):
        return ""
    head = "".join(f"<th>{_esc(c)}</th>" for c in preview["columns"])
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>"
                   for row in preview["rows"][:rows])
    return f'<table class="fm-twin-frame"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _preview_line(preview: dict) -> str:
    kind = preview.get("kind")
    if kind == "frame":
        return f"{preview['shape'][0]} rows × {preview['shape'][1]} columns"
    if kind == "array":
        words = [f"shape {tuple(preview['shape'])}", preview["dtype"]]
        words += [f"{k} {preview[k]}" for k in ("min", "max") if k in preview]
        return " · ".join(words)
    return (preview.get("text") or "").replace("\n", " ")[:60]


def _step_order(run: Any, tasks: list) -> list[str]:
    """Steps in the flow's order when the run recorded its graph, else in task order."""
    order = [s["name"] for s in (run.graph or {}).get("steps", [])] if run.graph else []
    for task in tasks:
        if task.step not in order:
            order.append(task.step)
    return order


class Inspector(InspectorMixin, FlowmagicWidget):
    """``Inspector(store_or_root, "MovieFlow", run_id=None, step=None, task_id=None)``."""

    _view = traitlets.Unicode("inspector").tag(sync=True)

    def __init__(self, store: Any, flow: str, run_id: int | None = None, step: str | None = None,
                 task_id: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._init_inspector(store, flow, run_id, step, task_id)

    def fallback_text(self) -> str:
        return self.inspector_text()

    def fallback_html(self) -> str:
        return self.inspector_html()
