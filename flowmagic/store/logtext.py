"""The one rule for a capped log's text: its head, one marker line, its tail.

Both the orchestrator's in-memory cap (runtime/orchestrator/logs.py) and the
logs written while a task runs (the ``live_log_chunks`` table) say what they
left out the same way: ``... 873,213,344 bytes omitted ...``.
"""
from __future__ import annotations


def omitted_marker(count: int) -> str:
    """The line that stands for ``count`` bytes left out of a log."""
    return f"... {count:,} bytes omitted ...\n"


def separator(head: str, omitted: int) -> str:
    """What goes between a log's head and its tail: nothing, or the marker on a line of its
    own (only the head's last character matters: pass its last piece)."""
    if not omitted:
        return ""
    return ("" if not head or head.endswith("\n") else "\n") + omitted_marker(omitted)


def capped_text(head: str, omitted: int, tail: str) -> str:
    """``head``, then (when something was left out) the marker on a line of its own, then ``tail``."""
    return head + separator(head, omitted) + tail
