"""Bounded task logs: what the store keeps of a task's stdout and stderr.

A step may print gigabytes; the orchestrator (a kernel, in a notebook) must
not hold them, nor the database grow by as much. So each stream keeps its
first ``FLOWMAGIC_LOG_HEAD`` bytes and its last ``FLOWMAGIC_LOG_TAIL`` bytes
(1 MiB each by default) and counts the rest, which the stored log replaces by
one marker line: ``... 873,213,344 bytes omitted ...``. The live stream to
the console or the cell is not cut; it is passed on chunk by chunk.

While a task runs, its output so far is written to the store every
``FLOWMAGIC_LOG_FLUSH`` seconds (:class:`LiveLogs`), bounded by the same rule,
so a crashed, killed or hung task's output is there to read; the end record
replaces it.
"""
from __future__ import annotations

import codecs
import os
import threading
import time
from collections import deque
from dataclasses import dataclass

from flowmagic.errors import UsageError
from flowmagic.store.logtext import capped_text, separator
from flowmagic.store.schema import LiveLogWrite

DEFAULT_HEAD = 1 << 20
DEFAULT_TAIL = 1 << 20
HEAD_VAR = "FLOWMAGIC_LOG_HEAD"
TAIL_VAR = "FLOWMAGIC_LOG_TAIL"
FLUSH_VAR = "FLOWMAGIC_LOG_FLUSH"
DEFAULT_FLUSH = 1.0   # seconds between writes of running tasks' output; 0: only when the attempt ends


@dataclass(frozen=True)
class LogLimits:
    """How many bytes of a stream's start (head) and end (tail) the store keeps."""

    head: int = DEFAULT_HEAD
    tail: int = DEFAULT_TAIL

    @classmethod
    def from_env(cls) -> LogLimits:
        return cls(_size(HEAD_VAR, DEFAULT_HEAD), _size(TAIL_VAR, DEFAULT_TAIL))


def flush_interval() -> float:
    """``FLOWMAGIC_LOG_FLUSH``: seconds between writes of the output so far (0 turns them off)."""
    return number_from_env(FLUSH_VAR, DEFAULT_FLUSH, convert=float,
                           accept=lambda v: 0 <= v < float("inf"),   # also refuses nan
                           expected="a number of seconds (0 writes logs only at the end)")


def _size(var: str, default: int) -> int:
    return number_from_env(var, default, convert=int, accept=lambda v: v >= 0,
                           expected="a number of bytes (0 or more)")


def number_from_env(var: str, default, *, convert, accept, expected: str):
    """``$var`` read with ``convert`` (``default`` when unset or blank); a one-line
    UsageError naming ``expected`` when it does not convert or ``accept`` refuses it."""
    text = os.environ.get(var, "").strip()
    if not text:
        return default
    try:
        value = convert(text)
    except ValueError:
        raise UsageError(f"{var}={text!r}: expected {expected}") from None
    if not accept(value):
        raise UsageError(f"{var}={text!r}: expected {expected}")
    return value


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
        return capped_text(head, omitted, tail.decode("utf-8", "replace"))

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


class LiveLog:
    """One stream of a running attempt, as chunks for the ``live_log_chunks`` table.

    The same cap as :class:`CappedLog`, kept incrementally so a flush writes only
    what is new: the head's chunks (first seqs), then one marker chunk (rewritten
    as its count grows), then tail chunks, the oldest deleted once the newer ones
    hold ``tail`` bytes. Stored: at most head + 2 x tail (+ one read); held here
    between flushes: what is new, bounded the same way."""

    def __init__(self, limits: LogLimits) -> None:
        self.limits = limits
        self.head_room = limits.head
        self.head_end = ""                     # the head's last text: is the marker on a line of its own?
        self.pending_head: list[str] = []
        self.pending_tail: deque[tuple[str, int]] = deque()   # (text, bytes)
        self.pending_tail_size = 0
        self.stored_tail: deque[tuple[int, int]] = deque()    # (seq, bytes) in the table
        self.stored_tail_size = 0
        self.head_size = 0
        self.total = 0
        self.next_seq = 0
        self.marker_seq: int | None = None
        self.marker_written = 0

    def append(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.total += len(data)
        if self.head_room > 0:
            part = data[:self.head_room].decode("utf-8", "ignore")   # never half a character
            if part:
                self.pending_head.append(part)
                self.head_end = part
            used = len(part.encode("utf-8", "surrogatepass"))
            self.head_size += used
            # head closed once anything goes past it (a character that did not fit included)
            self.head_room = 0 if used < len(data) else self.head_room - used
            text, data = text[len(part):], data[used:]
        if not text or self.limits.tail == 0:
            return
        self.pending_tail.append((text, len(data)))
        self.pending_tail_size += len(data)
        while self.pending_tail_size - self.pending_tail[0][1] >= self.limits.tail:
            self.pending_tail_size -= self.pending_tail.popleft()[1]   # counted as omitted

    def flush(self) -> tuple[tuple[tuple[int, str], ...], tuple[int, ...]]:
        """(chunks to put, seqs to delete) since the last flush; both empty when nothing changed."""
        chunks: list[tuple[int, str]] = []
        deleted: list[int] = []
        if self.pending_head:
            chunks.append((self._seq(), "".join(self.pending_head)))
            self.pending_head.clear()
        if self.pending_tail:
            if self.marker_seq is None:
                self.marker_seq = self._seq()   # between the head and the tail, for good
            seq = self._seq()
            chunks.append((seq, "".join(text for text, _ in self.pending_tail)))
            self.stored_tail.append((seq, self.pending_tail_size))
            self.stored_tail_size += self.pending_tail_size
            self.pending_tail.clear()
            self.pending_tail_size = 0
            while self.stored_tail_size - self.stored_tail[0][1] >= self.limits.tail:
                old, size = self.stored_tail.popleft()
                self.stored_tail_size -= size
                deleted.append(old)
        omitted = self.total - self.head_size - self.stored_tail_size
        if omitted != self.marker_written and omitted > 0:
            if self.marker_seq is None:       # no tail kept: the marker follows the head
                self.marker_seq = self._seq()
            chunks.append((self.marker_seq, separator(self.head_end, omitted)))
            self.marker_written = omitted
        return tuple(chunks), tuple(deleted)

    def _seq(self) -> int:
        self.next_seq += 1
        return self.next_seq - 1


class LiveLogs:
    """The output so far of every running attempt, and when to write it: the engine's
    thread (which sees every chunk of output anyway) adds to it, and every
    ``interval`` seconds hands :meth:`take` to the Recorder, one transaction."""

    def __init__(self, limits: LogLimits, interval: float) -> None:
        self.limits, self.interval = limits, interval
        self.logs: dict[tuple[int, int, str], LiveLog] = {}
        self.last_flush = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def add(self, task_id: int, attempt: int, stream: str, text: str) -> None:
        if not self.enabled:
            return
        key = (task_id, attempt, stream)
        log = self.logs.get(key)
        if log is None:
            log = self.logs[key] = LiveLog(self.limits)
        log.append(text)

    def forget(self, task_id: int, attempt: int) -> None:
        """The attempt ended: its end record replaces what was written of it."""
        for stream in ("stdout", "stderr"):
            self.logs.pop((task_id, attempt, stream), None)

    def due(self) -> bool:
        return self.enabled and time.monotonic() - self.last_flush >= self.interval

    def take(self) -> list[LiveLogWrite]:
        """What changed since the last take, for :meth:`Metadata.write_live_logs`."""
        self.last_flush = time.monotonic()
        writes = []
        for (task_id, attempt, stream), log in self.logs.items():
            chunks, deleted = log.flush()
            if chunks or deleted:
                writes.append(LiveLogWrite(task_id, attempt, stream, chunks, deleted))
        return writes
