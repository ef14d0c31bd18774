"""The records the orchestrator emits to UIs (CLI printer, magics, widgets).

Events are emitted on the thread that called ``run_flow``/``run_step``, in
order, so a subscriber never needs a lock.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal
from collections.abc import Callable

EventKind = Literal[
    "run",      # the run changed status: state is a RunStatus ("running", "succeeded", ...)
    "task",     # a task changed state: state is a TaskState ("running", "retrying", "done", ...)
    "output",   # a chunk of a task's stdout/stderr: stream + text
    "display",  # a rich output of a task: data is a mimebundle
    "warning",  # something the user should know that does not fail the run: text
]


@dataclass(frozen=True)
class Event:
    kind: EventKind
    run_id: int
    step: str | None = None
    task_id: int | None = None
    index: tuple[int, ...] | None = None
    state: str | None = None          # run status or TaskState
    attempt: int | None = None
    stream: str | None = None         # "stdout" | "stderr" for output
    text: str | None = None
    data: dict | None = None          # mimebundle for display; details for run/task events
    time: float = field(default_factory=time.time)

    @property
    def label(self) -> str:
        """``step/index`` as printed before a task's output lines."""
        if self.step is None:
            return ""
        if not self.index:
            return f"{self.step}/{self.task_id}" if self.task_id is not None else self.step
        return f"{self.step}/{'.'.join(str(i) for i in self.index)}"


EventHandler = Callable[[Event], None]


def emit_to(handler: EventHandler | None) -> EventHandler:
    """A handler that never raises into the scheduler (a broken UI must not kill a run)."""
    if handler is None:
        return lambda event: None

    def safe(event: Event) -> None:
        try:
            handler(event)
        except Exception:  # noqa: BLE001 - UIs are best effort
            import traceback

            traceback.print_exc()

    return safe
