"""Live step states: folding orchestrator events into what the DAG shows.

The orchestrator emits one event per task state change (`runtime.events`);
a foreach step with 1,000 items emits thousands. The DAG view shows one
record per step, so events are folded here into ``{"state", "attempt",
"done", "total", "failed", "duration", "started"}`` per step, and
:class:`Throttle` coalesces the pushes to the front end (at most one per
interval, the last one always delivered).
"""
from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any
from collections.abc import Callable, Iterable, Mapping

from flowmagic.states import (STEP_STATES, TASK_ACTIVE, TASK_FINISHED_BAD, TASK_FINISHED_OK, TASK_TERMINAL,
                              TASK_WENT_WRONG, StepState, task_successful)  # noqa: F401 - StepState re-exported

STATES: tuple[str, ...] = STEP_STATES

_ACTIVE = TASK_ACTIVE
_OK = TASK_FINISHED_OK - {"caught"}         # counted "done" in the progress bar
_WRONG = TASK_WENT_WRONG                     # counted "failed" in the progress bar (caught too)
_BAD = TASK_FINISHED_BAD - {"cancelled"}     # a task ran and did not finish OK
_TERMINAL = TASK_TERMINAL


@dataclass
class _Step:
    """One step's tasks folded as they come: each task's latest state and counts of them, the
    first start and the last end (a 100,000-task foreach kept an object a task and re-read all
    of them on every push: 30 MB and O(tasks) a refresh)."""

    states: dict[Any, str] = field(default_factory=dict)   # task -> its latest state
    counts: Counter[str] = field(default_factory=Counter)
    attempt: int = 0
    started: float | None = None    # the earliest start of a task
    finished: float | None = None   # the latest end of a task
    expected: int = 0               # announced number of tasks (foreach), 0 if unknown
    override: dict | None = None    # set explicitly (stale, or a state loaded from the store)

    def put(self, task: Any, state: str, *, attempt: int | None = None, started: float | None = None,
            finished: float | None = None) -> None:
        old = self.states.get(task)
        if old is not None:
            self.counts[old] -= 1
        self.states[task] = state
        self.counts[state] += 1
        if attempt is not None and attempt > self.attempt:
            self.attempt = attempt
        if started is not None and (self.started is None or started < self.started):
            self.started = started
        if finished is not None and (self.finished is None or finished > self.finished):
            self.finished = finished

    def count(self, states: Iterable[str]) -> int:
        return sum(self.counts[s] for s in states)


class StepStates:
    """Per-step live states of one run, built from task events.

    Not thread-safe by itself: :class:`flowmagic.widgets.DagView` holds a
    lock around it.
    """

    def __init__(self, steps: Iterable[str] = ()) -> None:
        self._steps: dict[str, _Step] = {name: _Step() for name in steps}
        self.run: dict[str, Any] = {}

    def apply(self, event: Any) -> bool:
        """Fold one runtime event in; True when the picture changed."""
        kind = getattr(event, "kind", None)
        if kind == "run":
            self.run = {"run_id": event.run_id, "status": event.state}
            return True
        if kind != "task" or not event.step or not event.state:
            return False
        if self.run.get("run_id") is None:  # a session run's steps come without run events
            self.run = {"run_id": event.run_id, "status": self.run.get("status", "")}
        step = self._steps.setdefault(event.step, _Step())
        step.override = None
        data = event.data if isinstance(event.data, dict) else {}
        if isinstance(data.get("total"), int):
            step.expected = data["total"]
        key = event.task_id if event.task_id is not None else (event.index or "_")
        when = event.time or time.time()
        state = event.state
        # a task's start is its first running (or retrying) event, or its end if it went wrong unstarted
        step.put(key, state, attempt=event.attempt,
                 started=when if state in _ACTIVE or state in _WRONG else None,
                 finished=when if state in _TERMINAL else None)
        return True

    def set(self, name: str, record: Mapping[str, Any]) -> None:
        """Show ``record`` for a step until its next task event (e.g. stale).

        A bare ``{"state": ...}`` that agrees with what the step's task
        events already say (``done`` for a step seen ``caught``, say) keeps
        the richer record built from those events: counts, duration, caught.
        ``pending`` or ``running`` means the step starts again: the tasks of
        its earlier execution are forgotten.
        """
        step = self._steps.setdefault(name, _Step())
        given = _normalise(record)
        bare = set(record) <= {"state"}
        if given["state"] in ("pending", "running"):
            # the step starts (again, for a %%step cell executed once more):
            # the tasks of its earlier execution no longer describe it
            self._steps[name] = _Step()
            step = self._steps[name]
        elif bare and step.states and _outcome(self._record(step, events_only=True)["state"]) \
                == _outcome(given["state"]) is not None:
            step.override = None
            return
        step.override = given

    def reset(self, steps: Iterable[str] | None = None, *, keep_run: bool = False) -> None:
        """Forget every task of ``steps`` (all by default): a new run starts."""
        names = list(steps) if steps is not None else list(self._steps)
        for name in names:
            self._steps[name] = _Step()
        if steps is None:
            self._steps = {name: self._steps[name] for name in names}
        if not keep_run:
            self.run = {}

    def keep_only(self, names: Iterable[str]) -> None:
        """Drop the steps that are no longer in the flow; add new ones as pending."""
        wanted = list(names)
        self._steps = {name: self._steps.get(name) or _Step() for name in wanted}

    def snapshot(self) -> dict[str, dict]:
        return {name: self._record(step) for name, step in self._steps.items()}

    def _record(self, step: _Step, events_only: bool = False) -> dict:
        if step.override is not None and not events_only:
            return dict(step.override)
        total = max(step.expected, len(step.states))
        record = {
            "state": _fold(step, total),
            "attempt": step.attempt,
            "done": step.count(_OK),
            "total": total,
            "failed": step.count(_WRONG),
            "duration": None,
        }
        if step.started is not None:
            record["started"] = step.started
            if record["state"] not in _ACTIVE and step.finished is not None:
                record["duration"] = round(step.finished - step.started, 3)
        return record


def _outcome(state: str) -> str | None:
    """Success or failure, for states that end a step; None for the others."""
    if task_successful(state):
        return "ok"
    if state in TASK_FINISHED_BAD:
        return "bad"
    return None


def _fold(step: _Step, total: int) -> str:
    """One word for a step from its tasks' states."""
    if not step.states:
        return "pending"
    counts = step.counts
    if counts["retrying"]:
        return "retrying"
    if counts["running"]:
        return "running"
    finished = step.count(_TERMINAL)
    if finished < total:
        return "running" if finished else "pending"
    if step.count(_BAD):
        return "failed" if not counts["interrupted"] else "interrupted"
    if counts["cancelled"]:
        return "cancelled"
    if counts["caught"]:
        return "caught"
    for uniform in ("cloned", "cached"):
        if counts[uniform] == len(step.states):
            return uniform
    return "done"


def _normalise(record: Mapping[str, Any]) -> dict:
    state = str(record.get("state", "pending"))
    return {
        "state": state,
        "attempt": int(record.get("attempt") or 0),
        "done": int(record.get("done") or 0),
        "total": int(record.get("total") or 0),
        "failed": int(record.get("failed") or 0),
        "duration": record.get("duration"),
        **({"started": record["started"]} if record.get("started") is not None else {}),
    }


def normalise_states(states: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
    """Validate and fill in a ``{step: record}`` mapping given by a caller."""
    return {str(name): _normalise(record) for name, record in states.items()}


class Throttle:
    """Calls ``push`` at most once per ``interval`` seconds, coalescing requests.

    A request inside the interval is delivered by a timer at the interval's
    end, so the last state always reaches the front end even if no further
    event comes.
    """

    def __init__(self, push: Callable[[], None], interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._push = push
        self.interval = interval
        self._clock = clock
        self._lock = threading.RLock()
        self._last = float("-inf")
        self._timer: threading.Timer | None = None
        self.pushes = 0

    def request(self) -> None:
        with self._lock:
            wait = self._last + self.interval - self._clock()
            if wait <= 0:
                self._deliver()
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def flush(self) -> None:
        """Deliver now whatever is pending (end of a run, tests)."""
        with self._lock:
            self._deliver()

    def _on_timer(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._deliver()

    def _deliver(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._last = self._clock()
        self.pushes += 1
        self._push()


def record_from_states(states: Iterable[str]) -> dict:
    """One step's record (state, done, total, failed) from its tasks' states, as a run's events would fold it."""
    step = _Step()
    for i, state in enumerate(states):
        step.put(i, state)
    return StepStates()._record(step)


def states_from_tasks(tasks: Iterable[Any]) -> dict[str, dict]:
    """Step records of a recorded run, from its task records (store read side).

    Durations span the tasks' creation to their last state change, which is
    what the metadata keeps per task.
    """
    live = StepStates()
    for record in tasks:
        step = live._steps.setdefault(record.step, _Step())
        finished = record.updated_at if record.state in _TERMINAL else None
        started = record.created_at if record.state in _ACTIVE | _WRONG | {"done"} else None
        step.put(record.task_id, record.state, started=started, finished=finished)
    return live.snapshot()
