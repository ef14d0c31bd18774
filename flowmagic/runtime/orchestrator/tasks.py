"""What the orchestrator knows about a run's tasks: a :class:`TaskInfo` for each task it is
working on, and per step a :class:`StepTasks` table that keeps the others as a few bytes.

A 100,000-task foreach made 100,000 TaskInfo objects (with their ids and index tuples,
~200 bytes each) that lived for the whole run. A task the engine is not working on is
either pending (its id and index are all there is to it) or finished with its refs left
in the store's metadata; the table keeps those as columns (arrays of ids, indices and a
state code: 17 bytes a task) and makes a TaskInfo again when one is read. The engine
*checks out* a task before it changes it (it is about to run) and *settles* it when it
has finished, so the objects alive are the tasks in flight, not the step.
"""
from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

from flowmagic.states import task_successful
from flowmagic.store.serializers import ArtifactRef

Index = tuple[int, ...]


@dataclass(slots=True)
class TaskInfo:
    """What the orchestrator knows about one task of the current run."""

    task_id: int
    step: str
    index: Index
    state: str = "pending"            # TaskState
    refs: tuple[ArtifactRef, ...] = ()   # a tuple: a dict per task cost 190 bytes more
    foreach: dict[str, dict] | None = None   # name -> {"length", "items"} of the lists it wrote for a foreach
    exception: dict | None = None
    # a finished foreach task's refs are left in the store's metadata (0.3 KB a task kept in memory for the
    # whole run): this reads them back, ``Metadata.artifacts`` / ``artifacts_of`` (see :func:`refs_of`)
    stored: StoredRefs | None = None

    @property
    def artifacts(self) -> tuple[ArtifactRef, ...]:
        if self.stored is not None:
            return tuple(self.stored.one(self.task_id))
        return self.refs

    def artifact(self, name: str) -> ArtifactRef | None:
        return named(self.artifacts, name)

    def keep_refs(self, refs: tuple[ArtifactRef, ...], stored: StoredRefs | None) -> None:
        """The refs of the finished task: in memory, or (``stored``) read back from the metadata."""
        self.refs, self.stored = (() if stored is not None else refs), stored

    @property
    def finished_ok(self) -> bool:
        return task_successful(self.state)


@dataclass(frozen=True)
class StoredRefs:
    """Where finished tasks' refs are read back from: the run's metadata."""

    one: Any    # task id -> list[ArtifactRef]   (Metadata.artifacts)
    many: Any   # [task id] -> {task id: list[ArtifactRef]}   (Metadata.artifacts_of)

    @classmethod
    def of(cls, meta) -> StoredRefs:
        """A store's (equal to any other of the same store: bound methods compare by their object)."""
        return cls(meta.artifacts, meta.artifacts_of)


def named(refs: tuple[ArtifactRef, ...], name: str) -> ArtifactRef | None:
    return next((ref for ref in refs if ref.name == name), None)


# the states a task kept as columns can be in; its code is the position here
_STATES = ("pending", "done", "caught", "cloned", "cached")
_CODE = {state: code for code, state in enumerate(_STATES)}
_PENDING = 0


class StepTasks(Sequence[TaskInfo]):
    """One step's tasks in the order they were created (index order, for a run's own tasks)."""

    def __init__(self, step: str, stored: StoredRefs | None = None) -> None:
        self.step = step
        self._stored = stored                 # how a settled task's refs are read back
        self._ids = array("q")
        self._codes = bytearray()             # _STATES code of each task not checked out
        self._indices = array("q")            # ``depth`` entries a task
        self._depth: int | None = None
        self._live: dict[int, TaskInfo] = {}  # position -> the object the engine works on
        self._position: dict[int, int] = {}   # task id -> position, of the live ones
        self._in_order = True                 # indices ascending: a prefix's tasks are one range

    @classmethod
    def of(cls, step: str, known: Iterable[TaskInfo], stored: StoredRefs | None = None) -> StepTasks:
        """A table of tasks that finished before the run (a resume's clones, a session's earlier
        steps): the engine never changes them, so they are settled as they come."""
        table = cls(step, stored)
        for info in known:
            table.append(info)
            table.settle(info)
        return table

    # -- adding ------------------------------------------------------------------------
    def append(self, info: TaskInfo) -> None:
        """Add a task the caller holds (and may change): it stays an object until :meth:`settle`."""
        pos = self._push(info.task_id, info.index, _PENDING)
        self._live[pos] = info
        self._position[info.task_id] = pos

    def add_pending(self, task_ids: Sequence[int], indices: Sequence[Index]) -> range:
        """New pending tasks, kept as columns; their positions (for the queue: :meth:`checkout`)."""
        start = len(self._ids)
        for task_id, index in zip(task_ids, indices, strict=True):
            if self._depth is not None and len(index) != self._depth:
                raise ValueError(f"step '{self.step}': index {index} has another depth than its other tasks")
            self._push(task_id, index, _PENDING)
        return range(start, len(self._ids))

    def _push(self, task_id: int, index: Index, code: int) -> int:
        pos = len(self._ids)
        if self._depth is None:
            self._depth = len(index)
        if pos and self._in_order and index < self.index_at(pos - 1):
            self._in_order = False
        self._ids.append(task_id)
        self._codes.append(code)
        # another depth never happens for one step's tasks; such a task stays an object (append,
        # _fits_columns), its columns only padding
        self._indices.extend(index if len(index) == self._depth else [0] * self._depth)
        return pos

    # -- the engine's working copy -----------------------------------------------------------
    def checkout(self, pos: int) -> TaskInfo:
        """The task at ``pos`` as the object the engine changes while it runs it."""
        info = self._live.get(pos)
        if info is None:
            info = self._unpacked(pos)
            self._live[pos] = info
            self._position[info.task_id] = pos
        return info

    def settle(self, info: TaskInfo) -> None:
        """The engine is done with ``info``: if columns can hold it, its object goes."""
        pos = self._position.get(info.task_id)
        if pos is None or not self._fits_columns(info):
            return
        self._codes[pos] = _CODE[info.state]
        del self._live[pos], self._position[info.task_id]

    def _fits_columns(self, info: TaskInfo) -> bool:
        if info.state not in _CODE or info.foreach is not None or info.exception is not None or info.refs:
            return False
        if len(info.index) != self._depth:
            return False
        return info.stored is None if info.state == "pending" else (info.stored is not None
                                                                     and info.stored == self._stored)

    # -- reading -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    @overload
    def __getitem__(self, pos: int) -> TaskInfo: ...
    @overload
    def __getitem__(self, pos: slice) -> list[TaskInfo]: ...

    def __getitem__(self, pos):
        return _item(self, 0, len(self), pos)

    def __iter__(self) -> Iterator[TaskInfo]:
        return (self._at(pos) for pos in range(len(self)))

    def _at(self, pos: int) -> TaskInfo:
        info = self._live.get(pos)
        return info if info is not None else self._unpacked(pos)

    def _unpacked(self, pos: int) -> TaskInfo:
        """A fresh TaskInfo of a task kept as columns (changing it changes nothing: see checkout)."""
        state = _STATES[self._codes[pos]]
        return TaskInfo(self._ids[pos], self.step, self.index_at(pos), state,
                        stored=None if state == "pending" else self._stored)

    def index_at(self, pos: int) -> Index:
        info = self._live.get(pos)
        if info is not None:
            return info.index
        depth = self._depth or 0
        return tuple(self._indices[pos * depth:(pos + 1) * depth])

    def finished_ok_at(self, pos: int) -> bool:
        info = self._live.get(pos)
        return info.finished_ok if info is not None else self._codes[pos] != _PENDING

    def matching(self, prefix: Index) -> Sequence[TaskInfo]:
        """The tasks whose index starts with ``prefix``, in index order (a range of the table when
        it is in order: no copy of a 100,000-task step for its join)."""
        if not self._in_order:
            return sorted((t for t in self if t.index[:len(prefix)] == prefix), key=lambda t: t.index)
        if not prefix:
            return self
        depth = len(prefix)
        positions = range(len(self))
        lo = bisect_left(positions, prefix, key=lambda pos: self.index_at(pos)[:depth])
        hi = bisect_right(positions, prefix, lo=lo, key=lambda pos: self.index_at(pos)[:depth])
        return _Range(self, lo, hi)


class _Range(Sequence[TaskInfo]):
    """Positions ``lo``..``hi`` of a table, read through it."""

    def __init__(self, table: StepTasks, lo: int, hi: int) -> None:
        self._table, self._lo, self._hi = table, lo, hi

    def __len__(self) -> int:
        return self._hi - self._lo

    def __getitem__(self, pos):
        return _item(self._table, self._lo, len(self), pos)

    def __iter__(self) -> Iterator[TaskInfo]:
        return (self._table._at(pos) for pos in range(self._lo, self._hi))


def _item(table: StepTasks, lo: int, length: int, pos: int | slice):
    """``pos`` (a position or a slice) of the ``length`` tasks from ``lo`` of ``table``."""
    if isinstance(pos, slice):
        return [table._at(lo + k) for k in range(*pos.indices(length))]
    if pos < 0:
        pos += length
    if not 0 <= pos < length:
        raise IndexError(pos)
    return table._at(lo + pos)
