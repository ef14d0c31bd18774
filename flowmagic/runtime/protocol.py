"""What crosses the orchestrator/task boundary, as typed records.

The orchestrator sends a task process one :class:`TaskSpec` (JSON over the
fork server's channel); the task sends back :class:`Manifest` (one JSON
line, after its output messages). Every failure anywhere in the runtime is
one :class:`ExceptionRecord`. (The engine's own queue messages, which never
leave the orchestrator, are in :mod:`flowmagic.runtime.orchestrator.messages`.)

The JSON is the wire and the store format: ``to_json()`` writes exactly the
keys earlier releases wrote (an exception record is stored with each
attempt, so old stores must read), ``from_json()`` accepts records that
lack the optional keys.
"""
from __future__ import annotations

import traceback as _traceback
from dataclasses import dataclass, field, fields
from typing import Any
from collections.abc import Mapping


@dataclass(frozen=True)
class ExceptionRecord:
    """An exception as the store keeps it: ``{"type", "message", "traceback"}``,
    plus, for an exception raised by a step's cell, the lines of the traceback
    and the cell line that raised."""

    type: str
    message: str
    traceback: str
    traceback_lines: tuple[str, ...] | None = None
    line: int | None = None

    @classmethod
    def plain(cls, type_name: str, message: str) -> ExceptionRecord:
        """A failure of flowmagic's own (a timeout, a dead process): no frames to show."""
        return cls(type_name, message, f"{type_name}: {message}\n")

    @classmethod
    def of(cls, exc: BaseException) -> ExceptionRecord:
        """A Python exception with its full traceback."""
        text = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
        return cls(type(exc).__name__, str(exc), text)

    @property
    def last_line(self) -> str:
        """``Type: last line of the message``, as progress lines print it."""
        message = (self.message or "").strip().splitlines()
        return f"{self.type or 'Error'}: {message[-1] if message else ''}".rstrip(": ")

    def to_json(self) -> dict:
        data: dict[str, Any] = {"type": self.type, "message": self.message, "traceback": self.traceback}
        if self.traceback_lines is not None:
            data["traceback_lines"] = list(self.traceback_lines)
        if self.line is not None or self.traceback_lines is not None:
            data["line"] = self.line
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> ExceptionRecord | None:
        if not data:
            return None
        lines = data.get("traceback_lines")
        return cls(str(data.get("type") or ""), str(data.get("message") or ""), str(data.get("traceback") or ""),
                   tuple(lines) if lines is not None else None, data.get("line"))


def exception_json(record: ExceptionRecord | None) -> dict | None:
    """The stored form of an optional record."""
    return record.to_json() if record is not None else None


@dataclass(frozen=True)
class TaskSpec:
    """Everything one attempt of one task needs; built by the engine, read by worker/task.py.

    A *binding* is ``{"ref": ArtifactRef dict, "step"}``, ``{"list": [bindings]}``
    (a gathered foreach value), ``{"stored": object key, "serializers", "step", "tasks"}`` (such a
    list from more than inputs.GATHER_STORED_AT tasks, streamed into the store), ``{"value": JSON}``
    or ``{"missing": message}``.
    """

    objects_root: str
    flow: str
    run_id: int
    task_id: int
    attempt: int
    step: str
    cell: int
    index: tuple[int, ...]
    source: str                       # the cell as written (executed, shown in tracebacks)
    code: str                         # the step's code without its %%step line (preloads)
    first_line: int                   # the cell line the code starts on
    filename: str                     # what tracebacks call the cell
    params: dict[str, Any]            # parameter name -> JSON value
    bindings: dict[str, dict]         # name -> binding
    foreach: dict | None              # {"binding", "index"} for a foreach step's task
    # a join's ``inputs``: one name -> binding per foreach task, or (more than GATHER_STORED_AT
    # tasks) ``{"stored": key, ...}``: that list, streamed into the store
    inputs: list[dict] | dict | None
    catch: str | None                 # --catch variable
    catch_now: bool                   # the last attempt: a failure is caught, not retried
    writes: tuple[str, ...]
    required: tuple[str, ...]         # names a later step reads (they must be saved)
    foreach_vars: tuple[str, ...]     # names a later foreach step iterates over
    mutation_check: bool = True
    store_url: str | None = None      # FLOWMAGIC_STORE: objects_root is then its local cache

    def to_json(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("index", "writes", "required", "foreach_vars"):
            data[key] = list(data[key])
        if data["store_url"] is None:   # a local store: the wire of earlier releases, unchanged
            del data["store_url"]
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TaskSpec:
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        for key in ("index", "writes", "required", "foreach_vars"):
            values[key] = tuple(values.get(key) or ())
        return cls(**values)

    def input_bindings(self) -> list:
        """Every binding the task resolves (to find the serializers it loads)."""
        return [self.bindings, self.foreach, self.inputs]


@dataclass(frozen=True)
class Manifest:
    """What a task process reports when its code has run (the ``manifest`` channel message)."""

    outcome: str                                  # "ok" | "failed"
    artifacts: list[dict] = field(default_factory=list)     # ArtifactRef dicts, saved by the task
    exception: ExceptionRecord | None = None
    outputs: list[dict] = field(default_factory=list)       # rich outputs (store/outputs.py)
    foreach: dict[str, dict] = field(default_factory=dict)  # name -> {"length", "items"[, "error"]}
    warnings: list[str] = field(default_factory=list)
    not_persisted: list[dict] = field(default_factory=list)  # {"name", "type"} of unsaveable names
    caught: bool | None = None                    # --catch saved the exception (set once artifacts are saved)

    def to_json(self) -> dict:
        data = {"outcome": self.outcome, "artifacts": self.artifacts, "exception": exception_json(self.exception),
                "outputs": self.outputs, "foreach": self.foreach, "warnings": self.warnings,
                "not_persisted": self.not_persisted}
        if self.caught is not None:
            data["caught"] = self.caught
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        return cls(str(data.get("outcome", "failed")), list(data.get("artifacts") or []),
                   ExceptionRecord.from_json(data.get("exception")), list(data.get("outputs") or []),
                   dict(data.get("foreach") or {}), list(data.get("warnings") or []),
                   list(data.get("not_persisted") or []), data.get("caught"))


# -- a --foreach list, as a manifest summarises it ----------------------------------

ITEM_REPR_MAX = 60         # characters kept of one item's repr
ITEM_REPRS_MAX = 10_000    # items whose repr is kept (the DAG and dump show them)


def as_sequence(value: Any) -> Any:
    """The list a foreach iterates: sequences as they are, other iterables listed."""
    if isinstance(value, (list, tuple, range, str)):
        return value
    return list(value)


def foreach_info(value: Any) -> dict:
    """A manifest's summary of a ``--foreach`` list: its length and its first
    items' reprs, or (length None) why it cannot be iterated."""
    try:
        items = as_sequence(value)
        length = len(items)
    except TypeError:
        return {"length": None, "items": [], "error": f"a {type(value).__name__} cannot be iterated"}
    reprs = []
    for item in items[:ITEM_REPRS_MAX]:
        text = repr(item)
        reprs.append(text if len(text) <= ITEM_REPR_MAX else text[: ITEM_REPR_MAX - 3] + "...")
    return {"length": length, "items": reprs}
