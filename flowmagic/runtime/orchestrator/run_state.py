"""What one run knows while it runs: its options, its tasks and step states,
and the attempts waiting for a worker. Plain data, no I/O: the engine
(engine.py) changes it on its own thread."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from flowmagic.runtime.orchestrator.tasks import StepTasks, TaskInfo


@dataclass(frozen=True)
class RunOptions:
    """How to run: which steps, on how many workers, where, with the step cache or not."""

    targets: frozenset[str]            # the steps to execute (the others are known already)
    max_workers: int | None = None     # None: one per core
    workdir: str | None = None         # the tasks' working directory (the notebook's)
    cache: bool = False                # --cache for every step
    # resume: step -> {foreach index: origin task id} of a partly done foreach's finished tasks, cloned not run
    clones: dict[str, dict[tuple[int, ...], int]] = field(default_factory=dict)


@dataclass
class RunState:
    """Tasks per step, step states, failures and counts of one run."""

    tasks: dict[str, StepTasks]
    step_state: dict[str, str]          # step -> pending | running | done | failed
    failed: list[tuple[str, str]] = field(default_factory=list)   # (step, last line of its exception)
    outputs: dict[str, list[dict]] = field(default_factory=dict)  # step -> rich outputs of its tasks
    stopping: bool = False              # a step failed: nothing new starts
    executed: int = 0
    cloned: int = 0
    cached: int = 0
    caught: int = 0                     # tasks whose failure --catch saved
    started: float = field(default_factory=time.time)
    # step -> how many of its first tasks are known to have finished ok: a task
    # that finished ok stays so, so step_finished_ok resumes from there
    # (checking every task on each finish made a foreach quadratic)
    _ok_prefix: dict[str, int] = field(default_factory=dict, repr=False)

    def fail_step(self, step: str, line: str) -> None:
        self.step_state[step] = "failed"
        self.failed.append((step, line))
        self.stopping = True

    def step_finished_ok(self, step: str) -> bool:
        tasks = self.tasks[step]
        done = min(self._ok_prefix.get(step, 0), len(tasks))
        while done < len(tasks) and tasks.finished_ok_at(done):
            done += 1
        self._ok_prefix[step] = done
        return done == len(tasks)

    def status(self) -> str:
        ok = not self.failed and all(s == "done" for s in self.step_state.values())
        return "succeeded" if ok else "failed"

    def stop_reason(self) -> str:
        """Why the tasks that never started were cancelled."""
        failed = list(dict.fromkeys(step for step, _line in self.failed))
        if not failed:
            return "the run stopped"
        return f"the run stopped because {' and '.join(failed)} failed"


class _Pending:
    """New tasks of a step waiting in line as positions of its table, checked out one by one
    (100,000 queued (TaskInfo, attempt) pairs were 26 MB)."""

    __slots__ = ("table", "next", "stop")

    def __init__(self, table: StepTasks, positions: range) -> None:
        self.table, self.next, self.stop = table, positions.start, positions.stop

    def take(self) -> tuple[TaskInfo, int]:
        info = self.table.checkout(self.next)
        self.next += 1
        return info, 0


class RetryQueue:
    """Attempts waiting for a worker: ready now, or retries due after a delay."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self._ready: deque[tuple[TaskInfo, int] | _Pending] = deque()
        self._count = 0   # attempts in _ready
        self._delayed: list[tuple[float, TaskInfo, int]] = []

    def add(self, info: TaskInfo, attempt: int = 0) -> None:
        self._ready.append((info, attempt))
        self._count += 1

    def add_pending(self, table: StepTasks, positions: range) -> None:
        """First attempts of the tasks at ``positions`` of ``table`` (StepTasks.add_pending)."""
        if positions:
            self._ready.append(_Pending(table, positions))
            self._count += len(positions)

    def add_first(self, items: list[tuple[TaskInfo, int]]) -> None:
        """Back at the head of the line (their environment is built now)."""
        self._ready.extendleft(reversed(items))
        self._count += len(items)

    def retry_later(self, info: TaskInfo, attempt: int) -> None:
        self._delayed.append((time.time() + self.delay, info, attempt))

    def release_due(self) -> None:
        now = time.time()
        due = [item for item in self._delayed if item[0] <= now]
        if due:
            self._delayed = [item for item in self._delayed if item[0] > now]
            self.add_first([(info, attempt) for _due, info, attempt in due])

    def has_ready(self) -> bool:
        return bool(self._ready)

    def has_delayed(self) -> bool:
        return bool(self._delayed)

    def pop(self) -> tuple[TaskInfo, int]:
        head = self._ready[0]
        self._count -= 1
        if isinstance(head, _Pending):
            taken = head.take()
            if head.next == head.stop:
                self._ready.popleft()
            return taken
        return self._ready.popleft()

    def ready_count(self) -> int:
        return self._count

    def pop_alike(self, step: str, attempt: int, most: int) -> list[tuple[TaskInfo, int]]:
        """Up to ``most`` ready attempts from the head of the line, while they are ``attempt`` of ``step``."""
        taken: list[tuple[TaskInfo, int]] = []
        while self._ready and len(taken) < most and self._head_is(step, attempt):
            taken.append(self.pop())
        return taken

    def _head_is(self, step: str, attempt: int) -> bool:
        head = self._ready[0]
        if isinstance(head, _Pending):
            return head.table.step == step and attempt == 0
        return head[0].step == step and head[1] == attempt

    def drain(self) -> list[tuple[TaskInfo, int]]:
        """Every waiting attempt, ready or delayed; the queue is empty after."""
        waiting = [self.pop() for _ in range(self._count)]
        waiting += [(info, attempt) for _due, info, attempt in self._delayed]
        self._delayed.clear()
        return waiting
