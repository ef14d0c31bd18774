"""Client API: read past runs, as Metaflow's client does.

    from flowmagic import Flow, Run
    Flow("MovieFlow").latest_run["join"].task.data.failed
    Run("MovieFlow/12")["start"].task["movies"].data

Objects are light handles named by a *pathspec* (``Flow/run_id/step/task_id
/artifact``); they read the metadata when asked, and load an artifact's value
only when its ``.data`` is read. The store is found as the notebook finds it:
``$FLOWMAGIC_HOME``, else ``./.flowmagic``; :func:`namespace_root` points the
client elsewhere.
"""
from __future__ import annotations

import datetime as dt
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import NotFoundError, UsageError
from .runtime.outputs import Output, load_outputs
from .store import Store, open_store, store_root
from .store.metadata import AttemptRecord, RunRecord, TaskRecord
from .store.serializers import ArtifactRef, load_artifact

__all__ = ["DataArtifact", "Flow", "Metaflow", "Run", "Step", "Task", "TaskException", "namespace_root"]

_root_override: Path | None = None
_stores: dict[Path, Store] = {}
_UNSET: Any = object()
_OK_TASK_STATES = ("done", "cloned", "cached")


def namespace_root(path: str | Path | None = _UNSET) -> Path:
    """Point the client at the store in ``path`` (``None``: back to the
    default, ``$FLOWMAGIC_HOME`` or ``./.flowmagic``); return the root in use."""
    global _root_override
    if path is not _UNSET:
        _root_override = Path(path).expanduser().absolute() if path is not None else None
    return _root_override or store_root()


def _open_store(root: str | Path | None = None) -> Store:
    path = Path(root).expanduser().absolute() if root is not None else namespace_root()
    store = _stores.get(path)
    if store is None:
        if not (path / "metadata.sqlite").exists():
            raise NotFoundError(f"no flowmagic store at {path}: run a flow first, set FLOWMAGIC_HOME, "
                                "or call namespace_root(path) to read another store")
        store = _stores[path] = open_store(path)
    return store


def _parts(pathspec: str, n: int, example: str, cls: str) -> list[str]:
    parts = str(pathspec).strip("/").split("/")
    if len(parts) != n or not all(parts):
        raise UsageError(f"{cls}() takes a pathspec like '{example}', got '{pathspec}'")
    return parts


def _int_id(text: str, what: str, pathspec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NotFoundError(f"'{text}' in '{pathspec}' is not a {what} id (ids are integers)") from None


def _when(ts: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(ts).astimezone() if ts is not None else None


def _short_list(items: list[str], limit: int = 20) -> str:
    if not items:
        return "(none)"
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


class _ClientObject:
    """Shared by every handle: pathspec, equality, repr."""

    _store: Store
    pathspec: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pathspec!r})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.pathspec == self.pathspec  # type: ignore[attr-defined]
                and other._store.root == self._store.root)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.pathspec))


# -- Metaflow / Flow ---------------------------------------------------------------
class Metaflow(_ClientObject):
    """The whole store: ``Metaflow().flows``."""

    def __init__(self, *, root: str | Path | None = None) -> None:
        self._store = _open_store(root)
        self.pathspec = ""

    @property
    def flows(self) -> list["Flow"]:
        return [Flow(name, _store=self._store) for name in self._store.meta.list_flows()]

    def __iter__(self) -> Iterator["Flow"]:
        return iter(self.flows)

    def __repr__(self) -> str:
        return f"Metaflow({str(self._store.root)!r})"


class Flow(_ClientObject):
    """A flow: its runs, newest first."""

    def __init__(self, name: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        self._store = _store or _open_store(root)
        (self.name,) = _parts(name, 1, "HelloFlow", "Flow")
        self.pathspec = self.id = self.name
        if _store is None and self.name not in self._store.meta.list_flows():
            raise NotFoundError(f"flow '{self.name}' does not exist in the store at {self._store.root}; "
                                f"flows there: {_short_list(self._store.meta.list_flows())}")

    def runs(self, *tags: str) -> list["Run"]:
        """Runs newest first; with tags, only the runs carrying all of them."""
        records = self._store.meta.list_runs(self.name, tag=tags[0] if tags else None)
        return [Run._from_record(r, self._store) for r in records if set(tags) <= set(r.tags)]

    def __iter__(self) -> Iterator["Run"]:
        return iter(self.runs())

    def __getitem__(self, run_id: int | str) -> "Run":
        return Run(f"{self.name}/{run_id}", _store=self._store)

    def __contains__(self, run_id: int | str) -> bool:
        try:
            self[run_id]
            return True
        except NotFoundError:
            return False

    @property
    def latest_run(self) -> "Run | None":
        runs = self._store.meta.list_runs(self.name)
        return Run._from_record(runs[0], self._store) if runs else None

    @property
    def latest_successful_run(self) -> "Run | None":
        for record in self._store.meta.list_runs(self.name):
            if record.status == "succeeded":
                return Run._from_record(record, self._store)
        return None

    def _repr_html_(self) -> str:
        rows = [[r.id, r.status, r.user or "", _fmt_time(r.created_at), _fmt_duration(r._record),
                 ", ".join(sorted(r.tags))] for r in self.runs()[:20]]
        return _html_table(f"Flow {self.name}", ["run", "status", "user", "started", "duration", "tags"], rows)


# -- Run ----------------------------------------------------------------------------
class Run(_ClientObject):
    """One run: ``Run("HelloFlow/3")``; ``run["start"]`` is a step."""

    def __init__(self, pathspec: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        self._store = _store or _open_store(root)
        flow, run = _parts(pathspec, 2, "HelloFlow/3", "Run")
        if run == "latest":
            latest = Flow(flow, _store=self._store).latest_run
            if latest is None:
                raise NotFoundError(f"flow '{flow}' has no runs")
            run = latest.id
        self._record = self._store.meta.get_run(flow, _int_id(run, "run", pathspec))
        self._init_names()

    @classmethod
    def _from_record(cls, record: RunRecord, store: Store) -> "Run":
        self = cls.__new__(cls)
        self._store, self._record = store, record
        self._init_names()
        return self

    def _init_names(self) -> None:
        self.flow_name = self._record.flow
        self.run_id = self._record.run_id
        self.id = str(self.run_id)
        self.pathspec = self._record.pathspec

    def _refresh(self) -> RunRecord:
        self._record = self._store.meta.get_run(self.flow_name, self.run_id)
        return self._record

    # what the run recorded
    @property
    def status(self) -> str:
        return self._refresh().status

    @property
    def successful(self) -> bool:
        return self.status == "succeeded"

    @property
    def finished(self) -> bool:
        return self.status != "running"

    @property
    def finished_at(self) -> dt.datetime | None:
        return _when(self._refresh().finished_at)

    @property
    def created_at(self) -> dt.datetime:
        return _when(self._record.started_at)  # type: ignore[return-value]

    @property
    def tags(self) -> frozenset[str]:
        return frozenset(self._refresh().tags)

    @property
    def user(self) -> str | None:
        return self._record.user

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self._record.params)

    @property
    def code(self) -> dict[str, str]:
        """Source of every step (and ``_prelude``) as the run executed it."""
        return dict(self._refresh().code)

    @property
    def graph(self) -> dict | None:
        return self._refresh().graph

    @property
    def interactive(self) -> bool:
        return self._record.interactive

    @property
    def origin_run(self) -> "Run | None":
        origin = self._record.origin_run_id
        return Run(f"{self.flow_name}/{origin}", _store=self._store) if origin is not None else None

    @property
    def flow(self) -> Flow:
        return Flow(self.flow_name, _store=self._store)

    # tags
    def add_tag(self, tag: str) -> None:
        self.add_tags([tag])

    def add_tags(self, tags: list[str] | tuple[str, ...]) -> None:
        self._store.meta.add_tags(self.flow_name, self.run_id, list(tags))

    def remove_tag(self, tag: str) -> None:
        self.remove_tags([tag])

    def remove_tags(self, tags: list[str] | tuple[str, ...]) -> None:
        self._store.meta.remove_tags(self.flow_name, self.run_id, list(tags))

    # steps
    def step_names(self) -> list[str]:
        """Steps that have tasks, in the flow's order."""
        present: list[str] = []
        for task in self._store.meta.tasks(self.flow_name, self.run_id):
            if task.step not in present:
                present.append(task.step)
        order = [s["name"] for s in (self.graph or {}).get("steps", [])]
        return sorted(present, key=lambda s: (order.index(s) if s in order else len(order), present.index(s)))

    def steps(self) -> list["Step"]:
        return [Step._make(self, name) for name in self.step_names()]

    def __iter__(self) -> Iterator["Step"]:
        return iter(self.steps())

    def __getitem__(self, step: str) -> "Step":
        if step not in self.step_names():
            raise NotFoundError(f"step '{step}' has no task in run {self.pathspec}; steps with tasks: "
                                f"{_short_list(self.step_names())}")
        return Step._make(self, step)

    def __contains__(self, step: str) -> bool:
        return step in self.step_names()

    @property
    def end_task(self) -> "Task | None":
        """The task of the flow's last step (a step with no successor)."""
        names = self.step_names()
        if not names:
            return None
        steps = {s["name"]: s for s in (self.graph or {}).get("steps", [])}
        sinks = [n for n in names if not steps.get(n, {}).get("next")]
        return Step._make(self, (sinks or names)[-1]).task

    @property
    def data(self) -> "TaskData | None":
        """The artifacts of the end task, as ``run.data.NAME`` (Metaflow's rule)."""
        task = self.end_task
        return task.data if task is not None else None

    def _repr_html_(self) -> str:
        record = self._refresh()
        rows = []
        for step in self.steps():
            tasks = step.tasks()
            states = sorted({t.state for t in tasks})
            rows.append([step.name, str(len(tasks)), ", ".join(states), _fmt_duration_tasks(tasks)])
        title = (f"Run {self.pathspec}: {record.status}"
                 + (f" (resumed from {record.origin_run_id})" if record.origin_run_id else "")
                 + (f", tags: {', '.join(record.tags)}" if record.tags else ""))
        return _html_table(title, ["step", "tasks", "state", "duration"], rows)


# -- Step ---------------------------------------------------------------------------
class Step(_ClientObject):
    """A step of a run: ``step.task`` (the task, or the first of a foreach),
    ``step.tasks()``; in a session run, the tasks of its latest execution."""

    def __init__(self, pathspec: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        flow, run, step = _parts(pathspec, 3, "HelloFlow/3/start", "Step")
        run_obj = Run(f"{flow}/{run}", root=root, _store=_store)
        run_obj[step]  # raises NotFoundError listing the steps
        self._init(run_obj, step)

    @classmethod
    def _make(cls, run: Run, name: str) -> "Step":
        self = cls.__new__(cls)
        self._init(run, name)
        return self

    def _init(self, run: Run, name: str) -> None:
        self._store, self._run, self.name = run._store, run, name
        self.id = name
        self.pathspec = f"{run.pathspec}/{name}"

    @property
    def run(self) -> Run:
        return self._run

    def _records(self) -> list[TaskRecord]:
        return self._store.meta.tasks(self._run.flow_name, self._run.run_id, self.name)

    def tasks(self) -> list["Task"]:
        """The tasks of the step's latest execution, in foreach order."""
        return [Task._make(self, r) for r in _latest_generation(self._records())]

    def all_tasks(self) -> list["Task"]:
        """Every task of the step in this run, re-executions included."""
        return [Task._make(self, r) for r in self._records()]

    def __iter__(self) -> Iterator["Task"]:
        return iter(self.tasks())

    def __getitem__(self, task_id: int | str) -> "Task":
        records = self._records()
        for r in records:
            if str(r.task_id) == str(task_id):
                return Task._make(self, r)
        raise NotFoundError(f"task {task_id} is not a task of {self.pathspec}; its tasks: "
                            f"{_short_list([str(r.task_id) for r in records])}")

    @property
    def task(self) -> "Task":
        return self.tasks()[0]

    @property
    def finished_at(self) -> dt.datetime | None:
        times = [t.finished_at for t in self.tasks()]
        return None if not times or None in times else max(times)  # type: ignore[type-var]

    @property
    def created_at(self) -> dt.datetime:
        return min(t.created_at for t in self.tasks())

    def _repr_html_(self) -> str:
        rows = [[t.id, "" if t.index is None else str(list(t.index)), t.item or "", t.state,
                 ", ".join(a.name for a in t)] for t in self.tasks()]
        return _html_table(f"Step {self.pathspec}", ["task", "index", "item", "state", "artifacts"], rows)


def _latest_generation(tasks: list[TaskRecord]) -> list[TaskRecord]:
    """A session run may execute a step several times; each execution adds a
    generation of tasks, created together, first index first."""
    if not tasks:
        return []
    tasks = sorted(tasks, key=lambda t: t.task_id)
    starts = [t.task_id for t in tasks if not t.index or not any(t.index)]
    first = max(starts) if starts else tasks[0].task_id
    return [t for t in tasks if t.task_id >= first]


# -- Task ---------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskException:
    """The exception a task's last attempt ended with."""

    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def to_dict(self) -> dict:
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


class Task(_ClientObject):
    """One task: ``task.data.NAME``, ``task["NAME"].data``, logs, exception."""

    def __init__(self, pathspec: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        flow, run, step, task_id = _parts(pathspec, 4, "HelloFlow/3/start/17", "Task")
        step_obj = Step(f"{flow}/{run}/{step}", root=root, _store=_store)
        found = step_obj[task_id]
        self._init(step_obj, found._record)

    @classmethod
    def _make(cls, step: Step, record: TaskRecord) -> "Task":
        self = cls.__new__(cls)
        self._init(step, record)
        return self

    def _init(self, step: Step, record: TaskRecord) -> None:
        self._store, self._step, self._record = step._store, step, record
        self.task_id = record.task_id
        self.id = str(record.task_id)
        self.pathspec = f"{step.pathspec}/{record.task_id}"
        self._artifact_cache: dict[str, DataArtifact] | None = None

    @property
    def step(self) -> Step:
        return self._step

    @property
    def run(self) -> Run:
        return self._step.run

    @property
    def index(self) -> tuple[int, ...] | None:
        return self._record.index

    @property
    def item(self) -> str | None:
        return self._record.item

    @property
    def state(self) -> str:
        self._record = self._store.meta.get_task(self.task_id)
        return self._record.state

    @property
    def successful(self) -> bool:
        return self.state in _OK_TASK_STATES

    @property
    def finished(self) -> bool:
        return self.state not in ("pending", "running", "retrying")

    @property
    def origin(self) -> "Task | None":
        """For a cloned or cached task, the task it copies."""
        origin = self._record.origin_task_id
        if origin is None:
            return None
        record = self._store.meta.get_task(origin)
        return Task(record.pathspec, _store=self._store)

    @property
    def created_at(self) -> dt.datetime:
        return _when(self._record.created_at)  # type: ignore[return-value]

    @property
    def finished_at(self) -> dt.datetime | None:
        last = self._last_attempt()
        return _when(last.finished_at) if last is not None and self.finished else None

    # attempts, logs, outputs
    @property
    def attempts(self) -> list[AttemptRecord]:
        return self._store.meta.attempts(self.task_id)

    def _last_attempt(self) -> AttemptRecord | None:
        attempts = self.attempts
        return attempts[-1] if attempts else None

    @property
    def current_attempt(self) -> int | None:
        last = self._last_attempt()
        return last.attempt if last is not None else None

    @property
    def stdout(self) -> str:
        last = self._last_attempt()
        return last.stdout if last is not None else ""

    @property
    def stderr(self) -> str:
        last = self._last_attempt()
        return last.stderr if last is not None else ""

    @property
    def exception(self) -> TaskException | None:
        last = self._last_attempt()
        if last is None or not last.exception:
            return None
        e = last.exception
        return TaskException(str(e.get("type", "")), str(e.get("message", "")), str(e.get("traceback", "")))

    @property
    def outputs(self) -> list[Output]:
        """Rich outputs of the last attempt (display() calls, the last value, figures),
        in order; each has ``.type``, ``.data`` (a mimebundle), ``.text`` and shows
        its rich form again when displayed in a notebook."""
        last = self._last_attempt()
        if last is None:
            return []
        return [Output(**bundle) for bundle in load_outputs(self._store.objects, last.outputs)]

    # artifacts
    def _artifacts(self) -> dict[str, "DataArtifact"]:
        if self._artifact_cache is None:
            refs = self._store.meta.artifacts(self.task_id)
            self._artifact_cache = {r.name: DataArtifact._make(self, r) for r in refs}
        return self._artifact_cache

    @property
    def artifacts(self) -> "TaskArtifacts":
        return TaskArtifacts(self)

    @property
    def data(self) -> "TaskData":
        return TaskData(self)

    def __getitem__(self, name: str) -> "DataArtifact":
        artifacts = self._artifacts()
        if name not in artifacts:
            raise NotFoundError(f"task {self.pathspec} has no artifact '{name}'; its artifacts: "
                                f"{_short_list(sorted(artifacts))}")
        return artifacts[name]

    def __contains__(self, name: str) -> bool:
        return name in self._artifacts()

    def __iter__(self) -> Iterator["DataArtifact"]:
        return iter(self._artifacts().values())

    def _repr_html_(self) -> str:
        rows = [[a.name, a.type, _fmt_size(a.size), a.serializer] for a in self]
        title = f"Task {self.pathspec}: {self.state}"
        exc = self.exception
        if exc is not None:
            title += f" ({exc})"
        return _html_table(title, ["artifact", "type", "size", "stored as"], rows)


class TaskData:
    """``task.data.NAME`` loads that one artifact; ``dir()`` lists the names."""

    def __init__(self, task: Task) -> None:
        object.__setattr__(self, "_task", task)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            artifact = self._task[name]
        except NotFoundError as exc:
            raise AttributeError(str(exc)) from None
        return artifact.data  # a missing object stays a NotFoundError

    def __getitem__(self, name: str) -> Any:
        return self._task[name].data

    def __contains__(self, name: str) -> bool:
        return name in self._task

    def __dir__(self) -> list[str]:
        return sorted(self._task._artifacts())

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._task._artifacts()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("artifacts are immutable: assign to a variable in a new step instead")

    def __repr__(self) -> str:
        return f"<TaskData {self._task.pathspec}: {', '.join(self)}>"


class TaskArtifacts(TaskData):
    """``task.artifacts.NAME`` is the :class:`DataArtifact` (not its value)."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._task[name]
        except NotFoundError as exc:
            raise AttributeError(str(exc)) from None

    def __getitem__(self, name: str) -> Any:
        return self._task[name]

    def __repr__(self) -> str:
        return f"<TaskArtifacts {self._task.pathspec}: {', '.join(self)}>"


# -- DataArtifact -------------------------------------------------------------------
class DataArtifact(_ClientObject):
    """One stored value; ``.data`` loads it (memory-mapped where possible)."""

    _UNLOADED: Any = object()

    def __init__(self, pathspec: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        flow, run, step, task_id, name = _parts(pathspec, 5, "HelloFlow/3/start/17/x", "DataArtifact")
        task = Task(f"{flow}/{run}/{step}/{task_id}", root=root, _store=_store)
        other = task[name]
        self._init(task, other._ref)

    @classmethod
    def _make(cls, task: Task, ref: ArtifactRef) -> "DataArtifact":
        self = cls.__new__(cls)
        self._init(task, ref)
        return self

    def _init(self, task: Task, ref: ArtifactRef) -> None:
        self._store, self._task, self._ref = task._store, task, ref
        self.name = self.id = ref.name
        self.pathspec = f"{task.pathspec}/{ref.name}"
        self._value = self._UNLOADED

    @property
    def data(self) -> Any:
        if self._value is self._UNLOADED:
            self._value = load_artifact(self._store.objects, self._ref)
        return self._value

    @property
    def type(self) -> str:
        return self._ref.type

    @property
    def size(self) -> int:
        return self._ref.size

    @property
    def hash(self) -> str:
        return self._ref.hash

    sha = hash  # Metaflow's name

    @property
    def serializer(self) -> str:
        return self._ref.serializer

    @property
    def ref(self) -> ArtifactRef:
        return self._ref

    @property
    def task(self) -> Task:
        return self._task

    @property
    def finished_at(self) -> dt.datetime | None:
        return self._task.finished_at

    def __repr__(self) -> str:
        return f"DataArtifact({self.pathspec!r}: {self.type}, {_fmt_size(self.size)})"

    def _repr_html_(self) -> str:
        rows = [["type", self.type], ["size", _fmt_size(self.size)], ["stored as", self.serializer],
                ["hash", self.hash]]
        return _html_table(f"Artifact {self.pathspec}", ["", ""], rows)


# -- formatting ----------------------------------------------------------------------
def _fmt_time(when: dt.datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when is not None else ""


def _fmt_duration(record: RunRecord) -> str:
    if record.finished_at is None:
        return ""
    return f"{record.finished_at - record.started_at:.1f}s"


def _fmt_duration_tasks(tasks: list[Task]) -> str:
    spans = [(a.started_at, a.finished_at) for t in tasks for a in t.attempts
             if a.started_at is not None and a.finished_at is not None]
    if not spans:
        return ""
    return f"{max(e for _, e in spans) - min(s for s, _ in spans):.1f}s"


def _fmt_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th style='text-align:left'>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{esc(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    empty = "" if rows else f"<tr><td colspan='{len(header)}'><i>nothing yet</i></td></tr>"
    return (f"<div class='flowmagic-client'><b>{esc(title)}</b>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}{empty}</tbody></table></div>")
