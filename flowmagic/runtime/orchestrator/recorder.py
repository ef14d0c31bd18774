"""The one writer of a run's metadata and the one emitter of its events.

Called on the engine's thread only, so the metadata and the events UIs see
always tell the same story in the same order.
"""
from __future__ import annotations

from collections.abc import Sequence

from flowmagic.runtime.orchestrator.attempt import AttemptExit
from flowmagic.runtime.orchestrator.events import Event, EventHandler, emit_to
from flowmagic.runtime.orchestrator.tasks import TaskInfo
from flowmagic.runtime.protocol import Manifest, exception_json
from flowmagic.store.schema import LiveLogWrite
from flowmagic.store.serializers import ArtifactRef


class Recorder:
    def __init__(self, meta, flow: str, run_id: int, on_event: EventHandler | None) -> None:
        self.meta, self.flow, self.run_id = meta, flow, run_id
        self.emit = emit_to(on_event)

    # -- the run
    def run_started(self) -> None:
        self.emit(Event("run", self.run_id, state="running", data={"flow": self.flow}))

    def run_finished(self, status: str, failed: list[tuple[str, str]] | None = None) -> None:
        self.meta.finish_run(self.flow, self.run_id, status)
        data = {"flow": self.flow, **({"failed": failed} if failed is not None else {})}
        self.emit(Event("run", self.run_id, state=status, data=data))

    # -- tasks
    def new_tasks(self, step: str, items: Sequence[tuple[tuple[int, ...], str | None]]) -> list[int]:
        """The ids of a step's new pending tasks (its foreach items), recorded together."""
        ids = self.meta.new_tasks(self.flow, self.run_id, step, [(index or None, item) for index, item in items])
        for task_id, (index, _item) in zip(ids, items):
            self.emit(Event("task", self.run_id, step=step, task_id=task_id, index=index, state="pending"))
        return ids

    def task_reused(self, info: TaskInfo) -> None:
        """A task cloned by the step cache (its metadata is written by clone_task)."""
        self.emit(Event("task", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                        state=info.state))

    def task_state(self, info: TaskInfo, state: str, attempt: int | None = None, data: dict | None = None) -> None:
        self.meta.set_task_state(info.task_id, state)
        self._state_event(info, state, attempt, data)

    def attempt_started(self, info: TaskInfo, attempt: int, live_logs: bool) -> None:
        """The task is running ``attempt``; with ``live_logs`` the store records the attempt's start
        too (one transaction), so the output written while it runs belongs to it."""
        if not live_logs:
            self.task_state(info, "running", attempt)
            return
        self.meta.start_attempt(info.task_id, attempt)
        self._state_event(info, "running", attempt)

    def _state_event(self, info: TaskInfo, state: str, attempt: int | None, data: dict | None = None) -> None:
        info.state = state
        self.emit(Event("task", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                        state=state, attempt=attempt, data=data))

    def live_logs(self, writes: list[LiveLogWrite]) -> None:
        """Running attempts' output so far (LiveLogs.take), one transaction."""
        self.meta.write_live_logs(writes)

    def attempt(self, info: TaskInfo, attempt: int, result: AttemptExit, manifest: Manifest,
                artifacts: list[ArtifactRef]) -> None:
        self.meta.record_attempt(
            info.task_id, attempt, outcome=result.outcome, started_at=result.started_at,
            finished_at=result.finished_at, exit_code=result.exit_code, signal=result.signal,
            exception=exception_json(result.exception), stdout=result.stdout,
            # warnings reach UIs as events (not task stderr: shown twice); the logs keep them too
            stderr=result.stderr + "".join(f"flowmagic: warning: {w}\n" for w in manifest.warnings),
            artifacts=artifacts, outputs=manifest.outputs)
        for warning in manifest.warnings:
            self.emit(Event("warning", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                            text=warning))

    # -- what a running task shows
    def output(self, info: TaskInfo, attempt: int, stream: str, text: str) -> None:
        self.emit(Event("output", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                        attempt=attempt, stream=stream, text=text))

    def step_note(self, step: str, text: str) -> None:
        """A line about a step that is no task's output (its environment build), on stderr."""
        self.emit(Event("output", self.run_id, step=step, stream="stderr", text=text + "\n"))

    def display(self, info: TaskInfo, attempt: int, output: dict | None) -> None:
        self.emit(Event("display", self.run_id, step=info.step, task_id=info.task_id, index=info.index,
                        attempt=attempt, data=output))
