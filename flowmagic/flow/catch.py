"""What a ``--catch`` variable holds after its step failed.

A dict, as the notebook has always shown it (``e["type"]``, ``e["message"]``,
``e["traceback"]``), that also reads like Metaflow's
``MetaflowExceptionWrapper`` (``e.type``, ``e.exception``, ``e.stacktrace``),
so code that uses the attributes runs the same in the notebook and in the
exported Metaflow flow.
"""
from __future__ import annotations

import builtins
from typing import Any


class CaughtException(dict):
    """The failed attempt's exception record; attributes as Metaflow's wrapper has them."""

    @property
    def exception(self) -> str:
        """The exception's message (``str(exc)``)."""
        return self.get("message", "")

    @property
    def type(self) -> str:
        """``module.ClassName``, as Metaflow writes it (``builtins.ZeroDivisionError``)."""
        name = self.get("type", "")
        return name if "." in name or not hasattr(builtins, name) else f"builtins.{name}"

    @property
    def stacktrace(self) -> str | None:
        return self.get("traceback")

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"a --catch record has no attribute {name!r}: use .exception, .type, "
                             f".stacktrace, or the keys {', '.join(sorted(self))}")

    def __reduce__(self):
        return (CaughtException, (dict(self),))


def caught_exception(record: dict | None) -> CaughtException | None:
    """The --catch variable's value for an exception record (None stays None)."""
    return None if record is None else CaughtException(record)
