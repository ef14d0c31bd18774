"""What the magics put in a cell: live task output, and errors without noise.

IPython shows an exception that has ``_render_traceback_`` with exactly the
lines it returns (the hook ipyparallel uses for remote errors). The magics
use it so that a user's mistake is one clear message and a failed step shows
its *own* traceback, while the cell still counts as an error (Run All stops).
"""
from __future__ import annotations

import sys
import threading
from typing import Any, TypeVar
from collections.abc import Callable

from IPython.core.error import UsageError

from flowmagic.errors import FlowmagicError
from flowmagic.report.text import MAX_PARTIAL_LINE

T = TypeVar("T")
FLUSH_EVERY = 1 << 20

_RED = "\x1b[0;31m"
_BOLD_RED = "\x1b[1;31m"
_RESET = "\x1b[0m"


def guarded(action: Callable[[], T]) -> T:
    """Run a magic's body; a FlowmagicError becomes a one-message cell error."""
    try:
        return action()
    except FlowmagicError as exc:
        if not hasattr(exc, "_render_traceback_"):
            exc._render_traceback_ = _message_renderer(exc)  # type: ignore[attr-defined]
        raise exc from None


def _message_renderer(exc: BaseException) -> Callable[[], list[str]]:
    def render() -> list[str]:
        return [f"{_BOLD_RED}{type(exc).__name__}{_RESET}: {exc}"]
    return render


def usage_error(message: str) -> UsageError:
    """IPython prints a UsageError as one line, without a traceback."""
    return UsageError(message)


# -- a failed step ------------------------------------------------------------
class StepFailed(FlowmagicError):
    """A step's last attempt failed. Shown as the step's own traceback.

    Raised as a subclass named after the step's exception (``ZeroDivisionError``),
    so the cell's error output says what a plain cell would have said.
    """

    step: str = ""
    record: dict = {}
    note: str = ""

    def _render_traceback_(self) -> list[str]:
        lines = _traceback_lines(self.record)
        if not lines:
            lines = [f"{_BOLD_RED}{type(self).__name__}{_RESET}: {self}"]
        return lines + [f"{_RED}{self.note}{_RESET}"] if self.note else lines


_FAILURE_CLASSES: dict[str, type[StepFailed]] = {}


def step_failure(step: str, record: dict | None, note: str) -> StepFailed:
    """The exception a failed ``%%step`` cell raises."""
    record = dict(record or {})
    type_name = str(record.get("type") or "StepFailed").rsplit(".", 1)[-1]
    if not type_name.isidentifier():
        type_name = "StepFailed"
    cls = _FAILURE_CLASSES.get(type_name)
    if cls is None:
        cls = type(type_name, (StepFailed,), {"__module__": "flowmagic.step"})
        _FAILURE_CLASSES[type_name] = cls
    error = cls(str(record.get("message", "")))
    error.step, error.record, error.note = step, record, note
    return error


def _traceback_lines(record: dict) -> list[str]:
    tb = record.get("traceback")
    if isinstance(tb, (list, tuple)):
        return [str(line) for line in tb]
    if isinstance(tb, str) and tb.strip():
        return [tb.rstrip("\n")]
    return []


class Interrupted(KeyboardInterrupt):
    """KeyboardInterrupt with a one-line explanation instead of our frames."""

    def _render_traceback_(self) -> list[str]:
        return [f"{_BOLD_RED}KeyboardInterrupt{_RESET}: {self}"]


Interrupted.__name__ = Interrupted.__qualname__ = "KeyboardInterrupt"  # the cell's error name


# -- live output --------------------------------------------------------------
def _write_untracked(stream: Any, text: str) -> None:
    """Write a task's output to the cell past IPython 9's tee, which keeps every
    write of a cell in ``history_manager.outputs`` (for ``%notebook``): a step
    printing 1 GB would stay in the kernel. The store keeps the task's logs."""
    if "write" in getattr(stream, "__dict__", {}):   # the tee patches the instance's write
        type(stream).write(stream, text)
    else:
        stream.write(text)


class LivePrinter:
    """The scheduler's ``on_event``: streams task output into the running cell.

    With ``label_tasks`` (several tasks may run at once) each line is
    prefixed ``[step/index]``; a lone task's output looks like a plain cell's.
    Events may come from the scheduler's threads, hence the lock.
    """

    def __init__(self, *, label_tasks: bool, on_state: Callable[[Any], None] | None = None) -> None:
        self.label_tasks = label_tasks
        self.on_state = on_state
        self._lock = threading.Lock()
        self._partial: dict[tuple, tuple[str, str]] = {}   # (task, stream) -> (prefix, text)
        self.result: dict | None = None    # a lone step's last value, kept for take_result()
        self._unflushed = 0                # characters written since the cell's stream was last flushed

    def __call__(self, event: Any) -> None:
        with self._lock:
            try:
                self._dispatch(event)
            except Exception as exc:  # a UI problem must never stop a run
                print(f"[flowmagic] could not show an event: {exc!r}", file=sys.__stderr__)

    def _dispatch(self, event: Any) -> None:
        kind = event.kind
        if kind == "output":
            self._write(event)
        elif kind == "display":
            self._display(event)
        elif kind == "task" and event.state == "retrying":
            from flowmagic.report.text import exception_line

            attempt = (event.attempt or 0) + 1
            self._write_line(event, "stderr", f"attempt {attempt} failed: {exception_line(event.data)}; retrying")
        elif kind == "task" and event.state == "caught":
            from flowmagic.report.text import caught_line

            self._write_line(event, "stderr", caught_line(event.data))
        elif kind == "warning":
            self._write_line(event, "stderr", f"warning: {event.text}")
        if kind in ("task", "run") and self.on_state is not None:
            self.on_state(event)

    def label(self, event: Any) -> str:
        return f"[{event.label}] " if event.step else ""

    def _stream(self, name: str | None):
        return sys.stderr if name == "stderr" else sys.stdout

    def _write(self, event: Any) -> None:
        text = event.text or ""
        stream = self._stream(event.stream)
        self._pace(stream, len(text))
        if not self.label_tasks:
            _write_untracked(stream, text)
            return
        key = (event.task_id, event.stream)
        prefix = self.label(event)
        text = self._partial.pop(key, ("", ""))[1] + text
        *lines, rest = text.split("\n")
        if len(rest) > MAX_PARTIAL_LINE:  # a step printing without newlines: show it in pieces, not hold it
            lines.append(rest)
        elif rest:
            self._partial[key] = (prefix, rest)
        if lines:
            _write_untracked(stream, "".join(f"{prefix}{line}\n" for line in lines))

    def _pace(self, stream: Any, size: int) -> None:
        """Flush the cell's stream every FLUSH_EVERY characters: ipykernel's stream only
        buffers, and its flush waits until the text is sent, so a step printing GBs
        is slowed to what the kernel can send instead of filling the kernel's memory."""
        self._unflushed += size
        if self._unflushed >= FLUSH_EVERY:
            self._unflushed = 0
            try:
                stream.flush()
            except Exception:  # noqa: BLE001 - a closed or odd stream must not stop the run
                pass

    def _write_line(self, event: Any, stream: str, text: str) -> None:
        """A note of flowmagic's own (not the task's output)."""
        prefix = self.label(event) if self.label_tasks else "[flowmagic] "
        for key in [k for k in self._partial if k[0] == event.task_id]:  # the task's unfinished line first
            held_prefix, rest = self._partial.pop(key)
            self._stream(key[1]).write(f"{held_prefix}{rest}\n")
        self._stream(stream).write(f"{prefix}{text}\n")

    def _display(self, event: Any) -> None:
        """One output of a task: ``{"type", "data", "metadata", "transient"}``."""
        output = event.data or {}
        kind = output.get("type", "display")
        if kind == "execute_result" and not self.label_tasks:
            # A lone step's last value becomes the cell's own Out[n] when it ends.
            self.result = output
            return
        if self.label_tasks:
            sys.stdout.write(f"{self.label(event).strip()}\n")
        _show_output(output)

    def take_result(self) -> Any:
        """The step's last value as the cell's result (displayed as Out[n])."""
        output, self.result = self.result, None
        return None if output is None else CellResult(output)

    def close(self) -> None:
        """Flush lines that did not end with a newline."""
        with self._lock:
            for (_task, stream), (prefix, rest) in self._partial.items():
                self._stream(stream).write(f"{prefix}{rest}\n")
            self._partial.clear()
        sys.stdout.flush()
        sys.stderr.flush()


def _show_output(output: dict) -> None:
    from IPython.display import display

    sys.stdout.flush()
    data = output.get("data", {})
    metadata = output.get("metadata") or {}
    display_id = (output.get("transient") or {}).get("display_id")
    if output.get("type") == "update_display" and display_id:
        display(data, raw=True, metadata=metadata, display_id=display_id, update=True)
    elif display_id:
        display(data, raw=True, metadata=metadata, display_id=display_id)
    else:
        display(data, raw=True, metadata=metadata)


class CellResult:
    """A step's last value, shown as the cell's Out[n] with its stored mimebundle."""

    def __init__(self, output: dict) -> None:
        self.output = output

    def _repr_mimebundle_(self, include: Any = None, exclude: Any = None) -> tuple[dict, dict]:
        return self.output.get("data", {}), self.output.get("metadata") or {}

    def __repr__(self) -> str:
        return str(self.output.get("data", {}).get("text/plain", "<step result>"))
