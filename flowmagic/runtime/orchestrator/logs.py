"""Bounded task logs: what the store keeps of a task's stdout and stderr.

A step may print gigabytes; the orchestrator (a kernel, in a notebook) must
not hold them, nor the database grow by as much. So each stream keeps its
first ``FLOWMAGIC_LOG_HEAD`` bytes and its last ``FLOWMAGIC_LOG_TAIL`` bytes
(1 MiB each by default) and counts the rest, which the stored log replaces by
one marker line: ``... 873,213,344 bytes omitted ...``. The live stream to
the console or the cell is not cut; it is passed on chunk by chunk.
"""
from __future__ import annotations

import codecs
import os
import threading
from collections import deque
from dataclasses import dataclass

from flowmagic.errors import UsageError

DEFAULT_HEAD = 1 << 20
DEFAULT_TAIL = 1 << 20
HEAD_VAR = "FLOWMAGIC_LOG_HEAD"
TAIL_VAR = "FLOWMAGIC_LOG_TAIL"


@dataclass(frozen=True)
class LogLimits:
    """How many bytes of a stream's start (head) and end (tail) the store keeps."""

    head: int = DEFAULT_HEAD
    tail: int = DEFAULT_TAIL

    @classmethod
    def from_env(cls) -> LogLimits:
        return cls(_size(HEAD_VAR, DEFAULT_HEAD), _size(TAIL_VAR, DEFAULT_TAIL))


def _size(var: str, default: int) -> int:
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{var}={text!r}: expected a number of bytes (0 or more)")
    return value


def omitted_marker(count: int) -> str:
    return f"... {count:,} bytes omitted ...\n"


class CappedLog:
    """One stream's bytes: the head kept whole, a ring of the tail, a count of the middle."""

    def __init__(self, limits: LogLimits) -> None:
        self.limits = limits
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.total = 0

    def append(self, data: bytes) -> None:
        self.total += len(data)
        room = self.limits.head - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if not data or self.limits.tail == 0:
            return
        self.tail.append(data)
        self.tail_size += len(data)
        while self.tail_size - len(self.tail[0]) >= self.limits.tail:  # drop whole chunks no longer needed
            self.tail_size -= len(self.tail.popleft())

    def text(self) -> str:
        tail = b"".join(self.tail)[-self.limits.tail:] if self.limits.tail else b""
        omitted = self.total - len(self.head) - len(tail)
        if not omitted:
            return (bytes(self.head) + tail).decode("utf-8", "replace")
        # Cuts inside a character: the head's unfinished one and the tail's leading
        # continuation bytes are dropped (and counted) rather than shown as U+FFFD.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        head = decoder.decode(bytes(self.head), final=False)
        omitted += len(decoder.getstate()[0])
        while tail and 0x80 <= tail[0] < 0xC0:
            tail, omitted = tail[1:], omitted + 1
        gap = "" if not head or head.endswith("\n") else "\n"
        return head + gap + omitted_marker(omitted) + tail.decode("utf-8", "replace")

LIVE_BUDGET = 8 << 20   # bytes of live output posted to the engine's thread and not yet shown


class OutputBudget:
    """Backpressure between the threads pumping tasks' output and the engine's
    thread that shows it: a pump waits while more than ``limit`` characters
    are queued, so a step printing faster than the console (or the cell) can
    show is slowed down (its pipe fills) instead of filling the orchestrator's
    memory. A wait gives up after ``patience`` seconds, so a stuck consumer
    slows a task down but never hangs it."""

    def __init__(self, limit: int = LIVE_BUDGET, patience: float = 30.0,
                 cancel: threading.Event | None = None) -> None:
        self.limit, self.patience = limit, patience
        self.cancel = cancel   # once set (Ctrl-C), nobody may be reading: never wait
        self.queued = 0
        self._cond = threading.Condition()

    def take(self, size: int) -> None:
        with self._cond:
            self._cond.wait_for(self._room, timeout=self.patience)
            self.queued += size

    def _room(self) -> bool:
        return self.queued < self.limit or (self.cancel is not None and self.cancel.is_set())

    def stop(self) -> None:
        """Wake every waiting pump: the consumer is going away."""
        with self._cond:
            self._cond.notify_all()

    def give_back(self, size: int) -> None:
        with self._cond:
            self.queued -= size
            self._cond.notify_all()
