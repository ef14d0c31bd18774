"""Task, its data and its artifacts: the task-level handles."""
from __future__ import annotations

import datetime as dt
import html
import reprlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Iterator

from flowmagic.errors import NotFoundError
from flowmagic.states import task_finished, task_successful
from flowmagic.store import Store
from flowmagic.store.metadata import AttemptRecord, TaskRecord
from flowmagic.store.serializers import ArtifactRef, load_artifact
from ._base import _ClientObject, _fmt_size, _html_table, _parts, _short_list, _when

if TYPE_CHECKING:
    from flowmagic.store.outputs import Output
    from ._runs import Run, Step



@dataclass(frozen=True)
class TaskException:
    """The exception a task's last attempt ended with."""

    type: str
    message: str
    traceback: str

    def __str__(self) -> str:
        return f"{self.type}: {self.message}"

    def to_dict(self) -> dict:
        """``{"type", "message", "traceback"}``, as ``flowmagic logs --json`` shows it."""
        return {"type": self.type, "message": self.message, "traceback": self.traceback}


class Task(_ClientObject):
    """One task: ``task.data.NAME``, ``task["NAME"].data``, logs, exception."""

    def __init__(self, pathspec: str, *, root: str | Path | None = None, _store: Store | None = None) -> None:
        from ._runs import Step  # the run-level module imports this one

        flow, run, step, task_id = _parts(pathspec, 4, "HelloFlow/3/start/17", "Task")
        step_obj = Step(f"{flow}/{run}/{step}", root=root, _store=_store)
        found = step_obj[task_id]
        self._init(step_obj, found._record)

    @classmethod
    def _make(cls, step: Step, record: TaskRecord) -> Task:
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
        """The :class:`Step` this task belongs to."""
        return self._step

    @property
    def run(self) -> Run:
        """The :class:`Run` this task belongs to."""
        return self._step.run

    @property
    def index(self) -> tuple[int, ...] | None:
        """The task's position in its foreach splits (one int per nesting level), or None outside a foreach."""
        return self._record.index

    @property
    def item(self) -> str | None:
        """A short text of the foreach item this task worked on, or None outside a foreach."""
        return self._record.item

    @property
    def state(self) -> str:
        """The task's state, read fresh from the store: ``pending``, ``running``, ``retrying``, ``done``,
        ``failed``, ``caught``, ``cloned``, ``cached``, ``interrupted`` or ``crashed`` (unfinished in a run whose
        orchestrator died)."""
        self._record = self._store.meta.get_task(self.task_id)
        return self._record.state

    @property
    def successful(self) -> bool:
        """True once the task finished OK: done, cloned, cached, or caught
        (``--catch`` saved its exception; its downstream steps ran)."""
        return task_successful(self.state)

    @property
    def finished(self) -> bool:
        """True once the task will not change again (cancelled and failed tasks included)."""
        return task_finished(self.state)

    @property
    def origin(self) -> Task | None:
        """For a cloned or cached task, the task it copies."""
        origin = self._record.origin_task_id
        if origin is None:
            return None
        record = self._store.meta.get_task(origin)
        return Task(record.pathspec, _store=self._store)

    @property
    def created_at(self) -> dt.datetime:
        """When the task was created (a datetime)."""
        return _when(self._record.created_at)  # type: ignore[return-value]

    @property
    def finished_at(self) -> dt.datetime | None:
        """When the task's last attempt ended, or None while it is unfinished."""
        last = self._last_attempt()
        return _when(last.finished_at) if last is not None and self.finished else None

    # attempts, logs, outputs
    @property
    def attempts(self) -> list[AttemptRecord]:
        """Every attempt of the task, first to last (retries make more than one)."""
        return self._store.meta.attempts(self.task_id)

    def _last_attempt(self) -> AttemptRecord | None:
        attempts = self.attempts
        return attempts[-1] if attempts else None

    @property
    def current_attempt(self) -> int | None:
        """The number of the last attempt (0 for the first), or None before any attempt."""
        last = self._last_attempt()
        return last.attempt if last is not None else None

    def _latest_logs(self) -> AttemptRecord | None:
        """The last attempt, an unfinished one included (running, or cut short by a crash)."""
        attempts = self._store.meta.attempts(self.task_id, unfinished=True)
        return attempts[-1] if attempts else None

    @property
    def stdout(self) -> str:
        """What the last attempt printed to stdout (``""`` when it has not run); while it
        runs, or when a crash cut it short, its output so far."""
        last = self._latest_logs()
        return last.stdout if last is not None else ""

    @property
    def stderr(self) -> str:
        """What the last attempt printed to stderr (``""`` when it has not run); while it
        runs, or when a crash cut it short, its output so far."""
        last = self._latest_logs()
        return last.stderr if last is not None else ""

    @property
    def exception(self) -> TaskException | None:
        """The :class:`TaskException` the last attempt raised, or None."""
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
        from flowmagic.store.outputs import Output, load_outputs

        last = self._last_attempt()
        if last is None:  # a cloned or cached task shows what its origin showed
            origin = self.origin
            return origin.outputs if origin is not None else []
        return [Output(**bundle) for bundle in load_outputs(self._store.objects, last.outputs)]

    # artifacts
    def _artifacts(self) -> dict[str, DataArtifact]:
        if self._artifact_cache is None:
            refs = self._store.meta.artifacts(self.task_id)
            self._artifact_cache = {r.name: DataArtifact._make(self, r) for r in refs}
        return self._artifact_cache

    @property
    def artifacts(self) -> TaskArtifacts:
        """The task's artifacts as :class:`DataArtifact` handles: ``task.artifacts.NAME``."""
        return TaskArtifacts(self)

    @property
    def data(self) -> TaskData:
        """The task's artifact values: ``task.data.NAME`` loads that one value."""
        return TaskData(self)

    def __getitem__(self, name: str) -> DataArtifact:
        artifacts = self._artifacts()
        if name not in artifacts:
            raise NotFoundError(f"task {self.pathspec} has no artifact '{name}'; its artifacts: "
                                f"{_short_list(sorted(artifacts))}")
        return artifacts[name]

    def __contains__(self, name: str) -> bool:
        return name in self._artifacts()

    def __iter__(self) -> Iterator[DataArtifact]:
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
    def _make(cls, task: Task, ref: ArtifactRef) -> DataArtifact:
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
        """The stored value, loaded on first access (memory-mapped for Arrow data) and kept."""
        if self._value is self._UNLOADED:
            self._value = load_artifact(self._store.objects, self._ref, step=self._task._record.step)
        return self._value

    @property
    def type(self) -> str:
        """The value's type name, e.g. ``pandas.DataFrame``."""
        return self._ref.type

    @property
    def size(self) -> int:
        """The stored size in bytes."""
        return self._ref.size

    @property
    def hash(self) -> str:
        """The content hash the value is stored under (``sha`` is Metaflow's name for it)."""
        return self._ref.hash

    sha = hash  # Metaflow's name

    @property
    def serializer(self) -> str:
        """How the value is stored: ``inline``, ``arrow-*``, ``pickle``, ``unsaved``, ..."""
        return self._ref.serializer

    @property
    def ref(self) -> ArtifactRef:
        """The store's record of the artifact (name, type, size, hash, serializer)."""
        return self._ref

    @property
    def task(self) -> Task:
        """The :class:`Task` that produced this artifact."""
        return self._task

    @property
    def finished_at(self) -> dt.datetime | None:
        """When the producing task finished (Metaflow's name for the artifact's time)."""
        return self._task.finished_at

    def __repr__(self) -> str:
        return f"DataArtifact({self.pathspec!r}: {self.type}, {_fmt_size(self.size)})"

    def _repr_html_(self) -> str:
        rows = [["type", self.type], ["size", _fmt_size(self.size)], ["stored as", self.serializer],
                ["hash", self.hash]]
        return _html_table(f"Artifact {self.pathspec}", ["", ""], rows) + self._preview_html()

    def _preview_html(self) -> str:
        """A glimpse of the value when reading it is cheap: memory-mapped
        Arrow data or a small inline value (pickles may be big: not loaded)."""
        if self.serializer == "inline":
            return f"<pre>{html.escape(reprlib.repr(self.data))}</pre>"
        if not self.serializer.startswith("arrow"):
            return ""
        value = self.data
        if hasattr(value, "shape") and hasattr(value, "dtype"):  # numpy array or pandas Series
            head = f"shape {value.shape}, dtype {value.dtype}"
        else:
            head = f"shape {getattr(value, 'shape', '?')}"
        if hasattr(value, "head") and hasattr(value.head(), "_repr_html_"):
            return f"<p>{html.escape(head)}</p>" + value.head()._repr_html_()
        return f"<p>{html.escape(head)}</p><pre>{html.escape(reprlib.repr(value))}</pre>"
