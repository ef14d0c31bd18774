"""The kernel's flow definition and its session run (no IPython here).

A notebook kernel does not read the ``.ipynb`` file: its flow is what it has
executed (DESIGN 1b). :class:`KernelFlowDefinition` keeps, in the order the
cells were first executed (notebook order under Run All), the latest source
of every ``%%step`` and ``%%params`` cell and the ordinary cells that ran,
and turns them into the same cell list the console command would read.

:class:`SessionRun` tracks which steps have run in the notebook's
interactive run, so a step whose producer has not run gets a clear error and
re-running a step marks what depends on it stale.

The magics (:mod:`flowmagic.magics.extension`) are the only caller; keeping this module
free of IPython makes it testable and keeps the engine IPython-free.
"""
from __future__ import annotations

import re
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
# ran again since). Done and caught steps have their outputs bound.
_HAS_OUTPUTS: frozenset[str] = STEP_FINISHED_OK | {"stale"}


@dataclass
class DefinedCell:
    """One executed cell, as the kernel's flow definition remembers it."""

    key: str                      # Jupyter's cell id, else a key derived from the cell
    kind: str                     # "step" | "params" | "ordinary"
    source: str                   # the full cell text, %%step line included
    execution_count: int | None   # the `In [n]` of its latest execution
    step: str | None = None       # the step name for a %%step cell

    def label(self) -> str:
        """How an error names this cell: ``%%step start`` (In [3])."""
        if self.kind == "step":
            what = f"the cell '%%step {self.step}'"
        elif self.kind == "params":
            what = "the '%%params' cell"
        else:
            first = next((ln.strip() for ln in self.source.splitlines() if ln.strip()), "")
            what = f"the cell '{first[:40]}'"
        return f"{what} (In [{self.execution_count}])" if self.execution_count else what


class KernelFlowDefinition:
    """The cells a kernel executed that define its flow, in first-executed order."""

    def __init__(self) -> None:
        self._cells: dict[str, DefinedCell] = {}
        self.name_override: str | None = None   # set by `%flow name X`

    def record(self, source: str, *, cell_id: str | None = None,
               execution_count: int | None = None) -> DefinedCell:
        """Remember an executed cell; a re-executed cell keeps its first position.

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
        cell = DefinedCell(key, kind, source, execution_count, parsed.step_name)
        previous = self._same_step_elsewhere(cell)
        if previous is not None:
            # The step moved to another cell (or was defined before the
            # front end sent cell ids): the newest source wins, in the old place.
            self._replace(previous.key, cell)
        else:
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
        if cell.kind != "step":
            return None
        for other in self._cells.values():
            if other.kind == "step" and other.step == cell.step and other.key != cell.key:
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

    def snapshot(self) -> dict[str, DefinedCell]:
        return dict(self._cells)

    def restore(self, snapshot: dict[str, DefinedCell]) -> None:
        """Undo recording a cell whose code does not define a valid flow."""
        self._cells = dict(snapshot)

    def forget_flow_cells(self) -> None:
        """Forget every step and params cell (ordinary cells stay: the kernel still has them)."""
        self._cells = {k: c for k, c in self._cells.items() if c.kind == "ordinary"}

    def forget_step(self, step: str) -> bool:
        """Drop a step cell from the definition (the user deleted it)."""
        keys = [k for k, c in self._cells.items() if c.kind == "step" and c.step == step]
        for key in keys:
            del self._cells[key]
        return bool(keys)

    # -- reading ------------------------------------------------------------
    @property
    def cells(self) -> list[DefinedCell]:
        return list(self._cells.values())

    def sources(self) -> list[str]:
        """The cell list build_flow reads; indices match :meth:`cell_at`."""
        return [c.source for c in self._cells.values()]

    def cell_at(self, index: int | None) -> DefinedCell | None:
        cells = self.cells
        return cells[index] if index is not None and 0 <= index < len(cells) else None

    def step_cell(self, step: str) -> DefinedCell | None:
        return next((c for c in self._cells.values() if c.kind == "step" and c.step == step), None)

    def flow_name(self, notebook: Path | None) -> str:
        """`%flow name X`, else the notebook's stem in CamelCase, else NotebookFlow."""
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
        if notebook is not None:
            from flowmagic.notebook import camel_case

            return camel_case(notebook.stem)
        return DEFAULT_FLOW_NAME

    def build(self, name: str) -> FlowGraph:
        """The flow the kernel has defined. Raises FlowDefinitionError whose
        message names cells as the user knows them (``In [n]``)."""
        from flowmagic.flow.graph import build_flow

        try:
            return build_flow(self.sources(), name=name)
        except FlowDefinitionError as exc:
            raise self.relabel(exc) from None

    def relabel(self, exc: FlowDefinitionError) -> FlowDefinitionError:
        """The same error, with the kernel's cell index replaced by the cell's label."""
        cell = self.cell_at(exc.cell)
        message = getattr(exc, "message", str(exc))
        message = _CELL_REFERENCE.sub(lambda m: self._cell_words(int(m.group(1)) - 1, m.group(0)), message)
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

    def _cell_words(self, index: int, original: str) -> str:
        cell = self.cell_at(index)
        return cell.label() if cell is not None else original


# "cell 3" inside a message from build_flow is the 1-based number (errors.cell_number) of an index of our cell list
_CELL_REFERENCE = re.compile(r"\b(?:ordinary )?cell (\d+)\b")


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

    def missing_producers(self, graph: FlowGraph, step: str) -> list[str]:
        """Parent steps of ``step`` whose outputs this run does not have."""
        return [p for p in graph.parents(step) if self.states.get(p) not in _HAS_OUTPUTS]

    def stale_producers(self, graph: FlowGraph, step: str) -> list[str]:
        return [p for p in graph.parents(step) if self.states.get(p) == "stale"]

    def record(self, graph: FlowGraph, step: str, state: str) -> list[str]:
        """Record a step's outcome; returns the steps that became stale."""
        had_run = step in self.states
        self.states[step] = state
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
        return "running"
