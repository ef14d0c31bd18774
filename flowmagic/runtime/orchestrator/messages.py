"""What the engine's worker threads post to the orchestrator's thread (never leaves the process)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.tasks import TaskInfo


@dataclass(frozen=True)
class TaskOutput:
    """A chunk of a task's stdout or stderr."""

    info: TaskInfo
    attempt: int
    stream: str
    text: str


@dataclass(frozen=True)
class TaskMessage:
    """A channel message of a running task (a rich output)."""

    info: TaskInfo
    attempt: int
    message: dict


@dataclass(frozen=True)
class AttemptFinished:
    """An attempt ended (its process exited, was killed, or never started)."""

    info: TaskInfo
    attempt: int
    result: AttemptExit


@dataclass(frozen=True)
class TaskStarted:
    """A task of a batch began (the batch's first began when it was launched)."""

    info: TaskInfo
    attempt: int


@dataclass(frozen=True)
class BatchDone:
    """A batch process ended; ``not_started`` go back to the queue (``reason``: its step is not batched again)."""

    executor: object
    step: str
    not_started: tuple[tuple[TaskInfo, int], ...]
    reason: str | None


@dataclass(frozen=True)
class EnvironmentBuilt:
    """A step's --pypi/--conda environment build ended: (env, server), or the error."""

    step: str
    result: Any   # tuple[Environment, ForkServer] | BaseException


EngineMessage = TaskOutput | TaskMessage | AttemptFinished | TaskStarted | BatchDone | EnvironmentBuilt
