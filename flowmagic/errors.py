"""flowmagic's one exception hierarchy.

Every error a user can meet derives from :class:`FlowmagicError`; ``str(e)``
is the message to show them (no traceback needed). Errors that concern a
step carry the step, the notebook cell and the variable involved, so a front
end can point at them.
"""
from __future__ import annotations


def cell_number(index: int) -> int:
    """The cell number a user sees (JupyterLab's: 1-based, markdown cells counted) of a 0-based cell index.

    Records and JSON keep the 0-based index; only messages say this number.
    """
    return index + 1


class FlowmagicError(Exception):
    """Base class: the message says what went wrong and what to do."""


class FlowDefinitionError(FlowmagicError):
    """The notebook does not define a valid flow; raised before anything runs."""

    def __init__(
        self,
        message: str,
        *,
        step: str | None = None,
        cell: int | None = None,
        variable: str | None = None,
        line: int | None = None,
    ) -> None:
        self.step = step
        self.cell = cell
        self.variable = variable
        self.line = line
        super().__init__(self._describe(message))
        self.message = message

    def _describe(self, message: str) -> str:
        where = []
        if self.step is not None:
            where.append(f"step '{self.step}'")
        if self.cell is not None:
            where.append(f"cell {cell_number(self.cell)}")
        if self.line is not None:
            where.append(f"line {self.line}")
        return f"{', '.join(where)}: {message}" if where else message


class StoreError(FlowmagicError):
    """The datastore is unreadable, corrupted, locked or newer than this code."""


class NotFoundError(StoreError, KeyError):
    """A flow, run, step, task or artifact does not exist; the message lists what does."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class SerializationError(FlowmagicError):
    """A value cannot be persisted as an artifact."""

    def __init__(self, message: str, *, variable: str, type_name: str, step: str | None = None) -> None:
        self.variable = variable
        self.type_name = type_name
        self.step = step
        super().__init__(message)


class RunError(FlowmagicError):
    """A run could not start (bad parameters, missing origin run...)."""


class UsageError(FlowmagicError):
    """Bad options on the command line or in a magic (exit status 2)."""
