"""The kernel's flow definition and its session run (no IPython here).

A notebook kernel's flow is what it has executed (DESIGN 1b), seeded from
the saved notebook when the kernel knows its file (after a restart the
steps are there, marked as not executed in this kernel) and kept in step
with it: a cell deleted from the saved notebook leaves the flow.
:class:`KernelFlowDefinition` keeps the latest source of
every ``%%step`` and ``%%params`` cell and the ordinary cells, tracked by
cell id (the header name without one), and turns them into the same cell
list the console command would read. Executed cells keep the order they were
first executed in (notebook order under Run All), so what worked
interactively keeps working; saved cells not executed yet sit after the
executed cell that precedes them in the saved notebook, and one that does
not build is left out with a note rather than breaking the flow.

:class:`SessionRun` tracks which steps have run in the notebook's
interactive run, so a step whose producer has not run gets a clear error and
re-running a step marks what depends on it stale.

The magics (:mod:`flowmagic.magics.extension`) are the only caller; keeping this module
free of IPython makes it testable and keeps the engine IPython-free.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Mapping

from flowmagic.flow.cells import classify_cell, flow_name_in
from flowmagic.errors import FlowDefinitionError
from flowmagic.states import STEP_FINISHED_OK

if TYPE_CHECKING:  # the engine is imported lazily: `import flowmagic` stays fast
    from flowmagic.flow.graph import FlowGraph

DEFAULT_FLOW_NAME = "NotebookFlow"

# A session run's steps take states from flowmagic.states.StepState: running,
# done, caught, failed, interrupted, and stale (ran, but a step it depends on
# ran again since). Done and caught steps have their outputs bound. The run is
# `partial` while some step of the flow has not run (DESIGN: never `succeeded`).
_HAS_OUTPUTS: frozenset[str] = STEP_FINISHED_OK | {"stale"}


@dataclass
class DefinedCell:
    """One executed cell, as the kernel's flow definition remembers it."""

    key: str                      # Jupyter's cell id, else a key derived from the cell
    kind: str                     # "step" | "params" | "ordinary"
    source: str                   # the full cell text, %%step line included
    execution_count: int | None   # the `In [n]` of its latest execution
    step: str | None = None       # the step name for a %%step cell
    cell_id: str | None = None    # the front end's (or the saved notebook's) cell id
    executed: bool = True         # False: read from the saved notebook, not executed in this kernel
    recorded_at: float = field(default_factory=time.time)
    renamed_from: str | None = None   # the step's previous name in this same cell

    number: int | None = None          # its cell number in the saved notebook (1-based, as JupyterLab shows)

    def label(self) -> str:
        """How a message names this cell: ``the cell '%%step start' (cell 4, In [3])``."""
        if self.kind == "step":
            what = f"the cell '%%step {self.step}'"
        elif self.kind == "params":
            what = "the '%%params' cell"
        else:
            first = next((ln.strip() for ln in self.source.splitlines() if ln.strip()), "")
            what = f"the cell '{first[:40]}'"
        where = [f"cell {self.number}"] if self.number else []
        if not self.executed:
            where.append("saved, not executed in this kernel yet")
        elif self.execution_count:
            where.append(f"In [{self.execution_count}]")
        return f"{what} ({', '.join(where)})" if where else what

    def place(self) -> str:
        """The short form, for a reason inside a sentence: ``cell 4``, else ``In [3]``."""
        if self.number:
            return f"cell {self.number}"
        if self.executed and self.execution_count:
            return f"In [{self.execution_count}]"
        return self.label()


class KernelFlowDefinition:
    """The cells a kernel executed that define its flow, in first-executed order."""

    def __init__(self) -> None:
        self._cells: dict[str, DefinedCell] = {}
        self.name_override: str | None = None   # set by `%flow name X`
        self._saved_ids: set[str] = set()        # the cell ids of the saved notebook, as last read
        self._saved_order: list[str] = []         # the keys of the saved notebook's cells, in its order
        self._aside: dict[str, str] = {}          # saved cells that did not build: key -> their source
        self._numbers: dict[str, int] = {}        # key -> the cell's number in the saved notebook (1-based)
        self.notes: list[str] = []                # what the magics should say once (cells set aside)

    def record(self, source: str, *, cell_id: str | None = None,
               execution_count: int | None = None, executed: bool = True) -> DefinedCell:
        """Remember an executed cell; a re-executed cell keeps its first position.
        A step cell whose header changed name says so in ``renamed_from``.

        Raises FlowDefinitionError for a malformed ``%%step`` line.
        """
        try:
            parsed = classify_cell(source, index=0)
        except FlowDefinitionError as exc:   # its cell index means nothing here
            raise FlowDefinitionError(getattr(exc, "message", str(exc)), step=exc.step,
                                      line=exc.line, variable=exc.variable) from None
        if parsed.kind == "empty":
            return DefinedCell("", "ordinary", source, execution_count)
        kind = parsed.kind
        key = cell_id or self._fallback_key(kind, parsed.step_name, source)
        cell = DefinedCell(key, kind, source, execution_count, parsed.step_name, cell_id=cell_id,
                           executed=executed)
        before = self._cells.get(key)
        if before is not None and before.kind == "step" and kind == "step" and before.step != cell.step:
            cell.renamed_from = before.step
        previous = self._same_step_elsewhere(cell)
        if previous is not None and not previous.executed:
            del self._cells[previous.key]   # its saved twin: executed now, in first-executed order
            if previous.key in self._numbers:
                self._numbers.setdefault(key, self._numbers[previous.key])
            self._cells.pop(key, None)
            self._cells[key] = cell
            self._saved_order = [key if k == previous.key else k for k in self._saved_order]
        elif previous is not None:
            # The step moved to another cell (or was defined before the
            # front end sent cell ids): the newest source wins, in the old place.
            self._replace(previous.key, cell)
        else:
            if before is not None and not before.executed:
                del self._cells[key]   # first executed now: executed cells keep first-executed order
            self._cells[key] = cell   # dict keeps the first insertion's position
        return cell

    @staticmethod
    def _fallback_key(kind: str, step: str | None, source: str) -> str:
        # Without a cell id (nbclient, the terminal) a step is known by its
        # name, the params cell is assumed single, and an ordinary cell by its text.
        if kind == "step":
            return f"step:{step}"
        if kind == "params":
            return "params"
        return f"code:{source}"

    def _same_step_elsewhere(self, cell: DefinedCell) -> DefinedCell | None:
        """The cell this one replaces: the same step in another cell, or the
        saved twin (not executed here) of a cell executed without an id."""
        for other in self._cells.values():
            if other.key == cell.key:
                continue
            if cell.kind == "step" and other.kind == "step" and other.step == cell.step:
                return other
            if cell.cell_id is None and not other.executed and _twins(cell, other):
                return other
        return None

    def _replace(self, old_key: str, cell: DefinedCell) -> None:
        rebuilt: dict[str, DefinedCell] = {}
        for key, other in self._cells.items():
            if key == old_key:
                rebuilt[cell.key] = cell
            elif key != cell.key:
                rebuilt[key] = other
        self._cells = rebuilt

    # -- the saved notebook ---------------------------------------------------
    def sync_saved(self, saved: list[tuple[str | None, str]], saved_at: float,
                   numbers: list[int] | None = None) -> list[str]:
        """Follow the saved notebook (``(cell id, source)`` per code cell, in order;
        ``numbers``: each one's 1-based cell number there, markdown counted).

        Cells it has that this kernel does not know join the flow, not
        executed; saved sources replace those of cells not executed here; a
        cell with an id that it no longer has leaves the flow when it had
        been saved before or was executed before this save (a cell executed
        since may simply not be saved yet). Returns the steps that left.
        """
        ids = {cell_id for cell_id, _ in saved if cell_id}
        gone = [c for c in self._cells.values() if c.cell_id and c.cell_id not in ids
                and (not c.executed or c.cell_id in self._saved_ids or c.recorded_at < saved_at)]
        for cell in gone:
            del self._cells[cell.key]
        self._merge_saved(saved, numbers or list(range(1, len(saved) + 1)))
        self._saved_ids = ids
        return sorted({c.step for c in gone if c.kind == "step" and c.step and self.step_cell(c.step) is None})

    def _merge_saved(self, saved: list[tuple[str | None, str]], numbers: list[int]) -> None:
        """The saved cells this kernel has not executed, the saved order and cell numbers."""
        kept = {k: c for k, c in self._cells.items() if c.executed}
        order: list[str] = []
        self._numbers = {}
        for (cell_id, source), number in zip(saved, numbers):
            known = kept.get(cell_id) if cell_id else None
            if known is None:
                cell = _saved_cell(source, cell_id)
                if cell is None or self._aside.get(cell.key) == source:
                    continue
                known = self._executed_twin(cell)   # executed without an id (nbclient, a terminal)
                if known is None:
                    known = kept.setdefault(cell.key, cell)
            order.append(known.key)
            self._numbers.setdefault(known.key, number)
        self._cells, self._saved_order = kept, order

    def _ordered(self) -> list[DefinedCell]:
        """Executed cells in first-executed order (what worked interactively keeps
        working); each saved cell not executed yet right after the executed cell
        that precedes it in the saved notebook."""
        after: dict[str | None, list[DefinedCell]] = {}
        anchor: str | None = None
        placed = set()
        for key in self._saved_order:
            cell = self._cells.get(key)
            if cell is None or key in placed:
                continue
            if cell.executed:
                anchor = key
            else:
                after.setdefault(anchor, []).append(cell)
                placed.add(key)
        ordered = list(after.get(None, []))
        for cell in self._cells.values():
            if cell.executed:
                ordered.append(cell)
                ordered += after.get(cell.key, [])
            elif cell.key not in placed:
                ordered.append(cell)   # not in the saved order (restored by an undo): keep it
        return ordered

    def _executed_twin(self, cell: DefinedCell) -> DefinedCell | None:
        """The executed cell that stands for a saved one (same step, or the same text)."""
        for other in self._cells.values():
            if other.executed and not other.cell_id and _twins(cell, other):
                return other
        return None

    def cell_ids(self) -> set[str]:
        """The real cell ids this definition knows (front end's or saved)."""
        return {c.cell_id for c in self._cells.values() if c.cell_id}

    def executed_flow_sources(self) -> set[str]:
        """The text of the step and params cells this kernel executed."""
        return {c.source for c in self._cells.values() if c.executed and c.kind != "ordinary"}

    def explicit_name(self) -> str | None:
        """`%flow name X` (the magic, or a line in an ordinary cell), if any."""
        if self.name_override:
            return self.name_override
        for cell in reversed(self.cells):
            if cell.kind == "ordinary":
                try:
                    name = flow_name_in(cell.source)
                except FlowDefinitionError:
                    name = None
                if name:
                    return name
        return None

    def refused(self, key: str) -> None:
        """A step cell refused before it ran (a producer has not run) does not
        take a first-executed place: a saved cell goes back to its saved place,
        so executing the producer above it next still builds."""
        cell = self._cells.get(key)
        if cell is not None and key in self._numbers:
            cell.executed = False

    def snapshot(self) -> dict[str, DefinedCell]:
        return dict(self._cells)

    def restore(self, snapshot: dict[str, DefinedCell]) -> None:
        """Undo recording a cell whose code does not define a valid flow."""
        self._cells = dict(snapshot)

    def forget_flow_cells(self) -> None:
        """Forget every step and params cell (ordinary cells the kernel executed stay: it still has them)."""
        self._cells = {k: c for k, c in self._cells.items() if c.kind == "ordinary" and c.executed}

    def forget_step(self, step: str) -> bool:
        """Drop a step cell from the definition (the user deleted it)."""
        keys = [k for k, c in self._cells.items() if c.kind == "step" and c.step == step]
        for key in keys:
            del self._cells[key]
        return bool(keys)

    # -- reading ------------------------------------------------------------
    @property
    def cells(self) -> list[DefinedCell]:
        return [self._numbered(c) for c in self._ordered()]

    def _numbered(self, cell: DefinedCell) -> DefinedCell:
        cell.number = self._numbers.get(cell.key)
        return cell

    def sources(self) -> list[str]:
        """The cell list build_flow reads; indices match :meth:`cell_at`."""
        return [c.source for c in self._ordered()]

    def cell_at(self, index: int | None) -> DefinedCell | None:
        cells = self.cells
        return cells[index] if index is not None and 0 <= index < len(cells) else None

    def step_cell(self, step: str) -> DefinedCell | None:
        cell = next((c for c in self._cells.values() if c.kind == "step" and c.step == step), None)
        return self._numbered(cell) if cell is not None else None

    def keyed(self, key: str) -> DefinedCell | None:
        cell = self._cells.get(key)
        return self._numbered(cell) if cell is not None else None

    def flow_name(self, notebook: Path | None) -> str:
        """`%flow name X`, else the notebook's stem in CamelCase, else NotebookFlow."""
        explicit = self.explicit_name()
        if explicit:
            return explicit
        if notebook is not None:
            from flowmagic.notebook import camel_case

            return camel_case(notebook.stem)
        return DEFAULT_FLOW_NAME

    def build(self, name: str) -> FlowGraph:
        """The flow the kernel has defined. Raises FlowDefinitionError whose
        message names cells as the user knows them (``In [n]``)."""
        from flowmagic.flow.graph import build_flow

        while True:
            try:
                return build_flow(self.sources(), name=name)
            except FlowDefinitionError as exc:
                cell = self.cell_at(exc.cell)
                if cell is None or cell.executed:
                    raise self.relabel(exc) from None
                self._set_aside(cell, exc)

    def _set_aside(self, cell: DefinedCell, exc: FlowDefinitionError) -> None:
        """A saved cell this kernel has not executed must not break the flow it
        did execute: it stays out (until its saved text changes, or it runs)."""
        del self._cells[cell.key]
        self._aside[cell.key] = cell.source
        reason = getattr(exc, "message", str(exc))
        self.notes.append(f"{cell.label()} is left out of the flow until it is executed: {reason}")

    def relabel(self, exc: FlowDefinitionError) -> FlowDefinitionError:
        """The same error, with the kernel's cell index replaced by the cell's label."""
        cell = self.cell_at(exc.cell)
        message = getattr(exc, "message", str(exc))
        message = _CELL_REFERENCE.sub(self._cell_words, message)   # one pass: labels hold "cell N" too
        if cell is None:
            return exc
        where = [f"step '{exc.step}'"] if exc.step else []
        where.append(cell.label())
        if exc.line is not None:
            where.append(f"line {exc.line}")
        relabelled = FlowDefinitionError(f"{', '.join(where)}: {message}", variable=exc.variable)
        relabelled.step, relabelled.cell, relabelled.line = exc.step, exc.cell, exc.line
        relabelled.message = message
        return relabelled

    def _cell_words(self, match: re.Match) -> str:
        """A "cell N" (or "cells N and M") of a build_flow message, as labels."""
        numbers = [n for n in match.groups() if n is not None]
        cells = [self.cell_at(int(n) - 1) for n in numbers]
        if any(cell is None for cell in cells):
            return match.group(0)
        return " and ".join(cell.label() for cell in cells if cell is not None)


def _twins(a: DefinedCell, b: DefinedCell) -> bool:
    """One cell seen twice, once without an id: the same step, the same text, or the (one) params cell."""
    return a.kind == b.kind and (a.kind == "params" or a.source == b.source
                                 or (a.kind == "step" and a.step == b.step))


def _saved_cell(source: str, cell_id: str | None) -> DefinedCell | None:
    """A saved cell as a definition cell, not executed; None for an empty or malformed one."""
    try:
        parsed = classify_cell(source, index=0)
    except FlowDefinitionError:
        return None   # executing it will say what is wrong
    if parsed.kind == "empty":
        return None
    key = cell_id or KernelFlowDefinition._fallback_key(parsed.kind, parsed.step_name, source)
    return DefinedCell(key, parsed.kind, source, None, parsed.step_name, cell_id=cell_id, executed=False)


# "cell 3" inside a message from build_flow is the 1-based number (errors.cell_number) of an index of our cell list
# (and "cells N and M", as in "declared twice (cells 2 and 5)")
_CELL_REFERENCE = re.compile(r"\bcells (\d+) and (\d+)\b|\b(?:ordinary )?cell (\d+)\b")


# -- where the notebook is ---------------------------------------------------
def notebook_path(env: Mapping[str, str], user_ns: Mapping[str, object],
                  cwd: Path | None = None) -> Path | None:
    """The notebook file this kernel runs, when the front end says so.

    VS Code sets ``__vsc_ipynb_file__`` (absolute); Jupyter Server sets
    ``JPY_SESSION_NAME`` (also ``__session__``), relative to the server's root,
    and starts the kernel in the notebook's folder. nbclient sets neither.
    """
    cwd = cwd or Path.cwd()
    vscode = user_ns.get("__vsc_ipynb_file__")
    if isinstance(vscode, str) and vscode:
        return Path(vscode)
    session = env.get("JPY_SESSION_NAME") or user_ns.get("__session__")
    if not isinstance(session, str) or not session.endswith(".ipynb"):
        return None
    path = Path(session)
    if path.is_absolute():
        return path
    for candidate in (cwd / path.name, cwd / path):
        if candidate.exists():
            return candidate
    return cwd / path.name


# -- the session run ---------------------------------------------------------
@dataclass
class SessionRun:
    """Which steps have run in the notebook's interactive run, and how."""

    flow: str
    root: Path
    run_id: int | None = None
    states: dict[str, str] = field(default_factory=dict)
    task_states: dict[str, list[str]] = field(default_factory=dict)   # step -> its last execution's task states
    recorded: str = "running"     # the status last written to the store
    reasons: dict[str, str] = field(default_factory=dict)   # stale step -> why, for its cell's marker
    # step -> what it last ran with besides step outputs: the text of each
    # prelude name it uses and each parameter's value (magics/staleness.py)
    inputs: dict[str, dict[str, str]] = field(default_factory=dict)

    def stale_because(self, step: str) -> str | None:
        """Why ``step`` is stale (``it used the previous 'x' from cell 3``), None when it is not."""
        if self.states.get(step) != "stale":
            return None
        return self.reasons.get(step, "a step it depends on ran again")

    def mark_stale(self, step: str, reason: str) -> bool:
        """Mark a step that ran stale; False when it was not run (or is stale already)."""
        if self.states.get(step) not in STEP_FINISHED_OK | {"failed"}:
            return False
        self.states[step] = "stale"
        self.reasons[step] = reason
        return True

    def missing_producers(self, graph: FlowGraph, step: str) -> list[str]:
        """Parent steps of ``step`` whose outputs this run does not have."""
        return [p for p in graph.parents(step) if self.states.get(p) not in _HAS_OUTPUTS]

    def stale_producers(self, graph: FlowGraph, step: str) -> list[str]:
        return [p for p in graph.parents(step) if self.states.get(p) == "stale"]

    def record(self, graph: FlowGraph, step: str, state: str) -> list[str]:
        """Record a step's outcome; returns the steps that became stale."""
        had_run = step in self.states
        self.states[step] = state
        self.reasons.pop(step, None)
        if state not in STEP_FINISHED_OK or not had_run:
            return []
        stale = []
        for below in sorted(graph.downstream(step)):
            if self.states.get(below) in STEP_FINISHED_OK | {"failed"}:
                self.states[below] = "stale"
                stale.append(below)
        return stale

    def status(self, graph: FlowGraph) -> str:
        """The run status this session run has earned so far."""
        states = [self.states.get(s.name) for s in graph.steps]
        if "interrupted" in states:
            return "interrupted"
        if "failed" in states:
            return "failed"
        if states and all(s in STEP_FINISHED_OK for s in states):
            return "succeeded"
        # a session run in which some step has not run (or is stale) is not a success
        return "running" if "running" in states else "partial"

    def rename(self, old: str, new: str) -> None:
        """A step cell's header changed name: its state follows the cell."""
        for table in (self.states, self.reasons, self.inputs):
            if old in table:
                table[new] = table.pop(old)

    def forget(self, steps: list[str]) -> None:
        for step in steps:
            for table in (self.states, self.reasons, self.inputs):
                table.pop(step, None)
