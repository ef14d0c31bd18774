"""Metaflow, Flow, Run and Step: the run-level handles."""
from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from collections.abc import Iterator

from flowmagic.errors import NotFoundError
from flowmagic.store import Store
from flowmagic.store.metadata import RunRecord, TaskRecord, latest_generation
from ._base import (_ClientObject, _fmt_duration, _fmt_duration_tasks, _fmt_time, _html_table, _int_id,
                    _open_store, _parts, _short_list, _when)
from ._tasks import Task



class Metaflow(_ClientObject):
    """The whole store: ``Metaflow().flows``."""

    def __init__(self, *, root: str | Path | None = None) -> None:
        self._store = _open_store(root)
        self.pathspec = ""

    @property
    def flows(self) -> list[Flow]:
        """Every flow in the store, as :class:`Flow` handles."""
        return [Flow(name, _store=self._store) for name in self._store.meta.list_flows()]

    def __iter__(self) -> Iterator[Flow]:
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

    def runs(self, *tags: str) -> list[Run]:
        """Runs newest first; with tags, only the runs carrying all of them."""
        records = self._store.meta.list_runs(self.name, tag=tags[0] if tags else None)
        return [Run._from_record(r, self._store) for r in records if set(tags) <= set(r.tags)]

    def __iter__(self) -> Iterator[Run]:
        return iter(self.runs())

    def __getitem__(self, run_id: int | str) -> Run:
        return Run(f"{self.name}/{run_id}", _store=self._store)

    def __contains__(self, run_id: int | str) -> bool:
        try:
            self[run_id]
            return True
        except NotFoundError:
            return False

    @property
    def latest_run(self) -> Run | None:
        """The newest run (session runs included), or None when the flow has no runs."""
        runs = self._store.meta.list_runs(self.name)
        return Run._from_record(runs[0], self._store) if runs else None

    @property
    def latest_successful_run(self) -> Run | None:
        """The newest run whose status is ``succeeded``, or None. A ``partial``
        session run (some step of the notebook never ran in it) is skipped:
        ask for it by id, or with ``latest_run``."""
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
    def _from_record(cls, record: RunRecord, store: Store) -> Run:
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
        """``running``, ``succeeded``, ``failed``, ``interrupted`` or ``crashed`` (its orchestrator
        died while it ran), read fresh from the store."""
        return self._refresh().status

    @property
    def successful(self) -> bool:
        """True when the run's status is ``succeeded``."""
        return self.status == "succeeded"

    @property
    def finished(self) -> bool:
        """True once the run stopped running (succeeded, partial, failed, interrupted or crashed)."""
        return self.status != "running"

    @property
    def finished_at(self) -> dt.datetime | None:
        """When the run ended (a datetime), or None while it runs."""
        return _when(self._refresh().finished_at)

    @property
    def created_at(self) -> dt.datetime:
        """When the run started (a datetime)."""
        return _when(self._record.started_at)  # type: ignore[return-value]

    @property
    def tags(self) -> frozenset[str]:
        """The run's tags (a frozenset), read fresh from the store."""
        return frozenset(self._refresh().tags)

    @property
    def user(self) -> str | None:
        """The user who started the run, when known."""
        return self._record.user

    @property
    def parameters(self) -> dict[str, Any]:
        """The flow parameters the run used: name -> value."""
        return dict(self._record.params)

    @property
    def code(self) -> dict[str, str]:
        """Source of every step (and ``_prelude``) as the run executed it."""
        return dict(self._refresh().code)

    @property
    def graph(self) -> dict | None:
        """The flow's graph as the run recorded it (``flowmagic show --json``'s document), or None."""
        return self._refresh().graph

    @property
    def interactive(self) -> bool:
        """True for a session run (``%%step`` cells executed in a kernel), False for a whole run."""
        return self._record.interactive

    @property
    def origin_run(self) -> Run | None:
        """For a resumed run, the run it resumed (its successful tasks were cloned); else None."""
        origin = self._record.origin_run_id
        return Run(f"{self.flow_name}/{origin}", _store=self._store) if origin is not None else None

    @property
    def flow(self) -> Flow:
        """The :class:`Flow` this run belongs to."""
        return Flow(self.flow_name, _store=self._store)

    # tags
    def add_tag(self, tag: str) -> None:
        """Add one tag to the run (tags are the one thing a finished run lets you change)."""
        self.add_tags([tag])

    def add_tags(self, tags: list[str] | tuple[str, ...]) -> None:
        """Add several tags to the run."""
        self._store.meta.add_tags(self.flow_name, self.run_id, list(tags))

    def remove_tag(self, tag: str) -> None:
        """Remove one tag from the run (a tag it does not have is ignored)."""
        self.remove_tags([tag])

    def remove_tags(self, tags: list[str] | tuple[str, ...]) -> None:
        """Remove several tags from the run."""
        self._store.meta.remove_tags(self.flow_name, self.run_id, list(tags))

    # steps
    def step_names(self) -> list[str]:
        """Steps that have tasks, in the flow's order."""
        present = self._store.meta.step_names(self.flow_name, self.run_id)
        order = [s["name"] for s in (self.graph or {}).get("steps", [])]
        return sorted(present, key=lambda s: (order.index(s) if s in order else len(order), present.index(s)))

    def steps(self) -> list[Step]:
        """The run's steps that have tasks, in the flow's order, as :class:`Step` handles."""
        return [Step._make(self, name) for name in self.step_names()]

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps())

    def __getitem__(self, step: str) -> Step:
        if step not in self.step_names():
            raise NotFoundError(f"step '{step}' has no task in run {self.pathspec}; steps with tasks: "
                                f"{_short_list(self.step_names())}")
        return Step._make(self, step)

    def __contains__(self, step: str) -> bool:
        return step in self.step_names()

    @property
    def end_task(self) -> Task | None:
        """The task of the flow's last step (a step with no successor)."""
        names = self.step_names()
        if not names:
            return None
        steps = {s["name"]: s for s in (self.graph or {}).get("steps", [])}
        sinks = [n for n in names if not steps.get(n, {}).get("next")]
        return Step._make(self, (sinks or names)[-1]).task

    @property
    def data(self) -> RunData | None:
        """The namespace a Run All of the notebook would leave, as ``run.data.NAME``.

        In Metaflow the end task carries every upstream artifact, so
        ``run.data.NAME`` is any name the flow computed. Here each name is read
        from the latest step that wrote it, in the flow's order (the end
        step's view along the DAG), and the run's parameters are names too.
        Per-item tasks of ``--foreach`` steps are left out, as in Metaflow:
        their values reach later steps through the join. None for a run with
        no task yet.
        """
        return RunData(self) if self.step_names() else None

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


class RunData:
    """``run.data.NAME``: the latest writer's value of NAME, or a parameter."""

    def __init__(self, run: Run) -> None:
        object.__setattr__(self, "_run", run)
        object.__setattr__(self, "_sources", None)

    def _writers(self) -> dict[str, Task | None]:
        """name -> the task whose artifact it is (None: a parameter)."""
        if self._sources is None:
            sources: dict[str, Task | None] = {name: None for name in self._run.parameters}
            per_item = {s["name"] for s in (self._run.graph or {}).get("steps", [])
                        if s.get("options", {}).get("foreach")}
            for step in self._run.steps():
                tasks = step.tasks()
                if step.name in per_item or len(tasks) != 1:
                    continue
                for name in tasks[0]._artifacts():
                    sources[name] = tasks[0]
            object.__setattr__(self, "_sources", sources)
        return self._sources

    def _value(self, name: str) -> Any:
        writers = self._writers()
        if name not in writers:
            raise NotFoundError(f"run {self._run.pathspec} has no artifact or parameter '{name}'; "
                                f"its names: {_short_list(sorted(writers))}")
        task = writers[name]
        return self._run.parameters[name] if task is None else task[name].data

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self._value(name)
        except NotFoundError as exc:
            raise AttributeError(str(exc)) from None

    def __getitem__(self, name: str) -> Any:
        return self._value(name)

    def __contains__(self, name: str) -> bool:
        return name in self._writers()

    def __dir__(self) -> list[str]:
        return sorted(self._writers())

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._writers()))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("artifacts are immutable: assign to a variable in a new step instead")

    def __repr__(self) -> str:
        return f"<RunData {self._run.pathspec}: {', '.join(self)}>"


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
    def _make(cls, run: Run, name: str) -> Step:
        self = cls.__new__(cls)
        self._init(run, name)
        return self

    def _init(self, run: Run, name: str) -> None:
        self._store, self._run, self.name = run._store, run, name
        self.id = name
        self.pathspec = f"{run.pathspec}/{name}"

    @property
    def run(self) -> Run:
        """The :class:`Run` this step belongs to."""
        return self._run

    def _records(self) -> list[TaskRecord]:
        return self._store.meta.tasks(self._run.flow_name, self._run.run_id, self.name)

    def tasks(self) -> list[Task]:
        """The tasks of the step's latest execution, in foreach order."""
        return [Task._make(self, r) for r in latest_generation(self._records())]

    def all_tasks(self) -> list[Task]:
        """Every task of the step in this run, re-executions included."""
        return [Task._make(self, r) for r in self._records()]

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks())

    def __getitem__(self, task_id: int | str) -> Task:
        records = self._records()
        for r in records:
            if str(r.task_id) == str(task_id):
                return Task._make(self, r)
        raise NotFoundError(f"task {task_id} is not a task of {self.pathspec}; its tasks: "
                            f"{_short_list([str(r.task_id) for r in records])}")

    @property
    def task(self) -> Task:
        """The step's task; for a foreach step, its first task."""
        return self.tasks()[0]

    @property
    def finished_at(self) -> dt.datetime | None:
        """When the step's last task ended, or None while any task is unfinished."""
        times = [t.finished_at for t in self.tasks()]
        return None if not times or None in times else max(times)  # type: ignore[type-var]

    @property
    def created_at(self) -> dt.datetime:
        """When the step's first task was created."""
        return min(t.created_at for t in self.tasks())

    def _repr_html_(self) -> str:
        rows = [[t.id, "" if t.index is None else str(list(t.index)), t.item or "", t.state,
                 ", ".join(a.name for a in t)] for t in self.tasks()]
        return _html_table(f"Step {self.pathspec}", ["task", "index", "item", "state", "artifacts"], rows)
