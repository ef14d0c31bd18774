"""Run All order, checked while working (issue 15).

The kernel builds its flow in the order cells were first executed, so a step
may work interactively while something it reads is defined in a cell *below*
it in the notebook. Executed top to bottom that breaks:

- a step output from a step below: every top-to-bottom run fails at this
  step (JupyterLab's Restart Kernel and Run All, ``jupyter nbconvert
  --execute``, papermill, ``flowmagic run``): no step above writes the name;
- a parameter or prelude name (import, def, constant) from a cell below:
  kernels that do not know the notebook's file (nbconvert, papermill,
  nbclient) have not run that cell yet and fail at this step. JupyterLab's
  Restart and Run All and ``flowmagic run`` read the saved notebook, which
  has the cell, and work.

Executing such a step warns at once, in one line naming that cell.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics
    from flowmagic.magics.session import DefinedCell


def warn_below(magics: FlowMagics, graph: Any, step: str) -> list[str]:
    """Print (and return) one warning per cell below ``step``'s cell it needs."""
    here = magics.definition.step_cell(step)
    if here is None or here.number is None:
        return []   # not in the saved notebook (yet): its place is unknown
    lines = []
    for cell, names, kind in _sources_below(magics, graph, step, here.number):
        lines.append(_warning(step, here, cell, names, kind))
    for line in lines:
        print(f"[flowmagic] warning: {line}", file=sys.stderr)
    return lines


def _sources_below(magics: FlowMagics, graph: Any, step: str, number: int) -> list[tuple[DefinedCell, list[str], str]]:
    """(cell, names it gives this step, "step" | "name"), for cells below ``number``."""
    from flowmagic.flow.graph import prelude_definitions

    definition = magics.definition
    found: dict[str, tuple[DefinedCell, list[str], str]] = {}

    def note(cell: DefinedCell | None, name: str, kind: str) -> None:
        if cell is not None and cell.number is not None and cell.number > number:
            found.setdefault(cell.key, (cell, [], kind))[1].append(name)

    for var, producer in sorted(graph.producers(step).items()):
        note(definition.step_cell(producer), var, "step")
    reads = set(graph.step(step).reads)
    for param in graph.params:
        if param.name in reads:
            note(definition.cell_at(param.cell), param.name, "name")
    for name, defined in sorted(prelude_definitions(graph, step).items()):
        # defined above too (and again below): a top-to-bottom run has the name
        cells = [definition.cell_at(index) for index in defined.cells]
        if not any(c is not None and c.number is not None and c.number < number for c in cells):
            note(definition.cell_at(defined.cell), name, "name")
    return sorted(found.values(), key=lambda item: item[0].number or 0)


def _warning(step: str, here: DefinedCell, cell: DefinedCell, names: list[str], kind: str) -> str:
    quoted = ", ".join(f"'{n}'" for n in names)
    what = f"step '{step}' ({here.place()}) reads {quoted} from {cell.label()}, below it"
    if kind == "step":
        return (f"{what}: Run All (JupyterLab's Restart and Run All, nbconvert, papermill, flowmagic run) "
                f"fails at this step, as no step above writes it; move this cell below cell {cell.number}")
    return (f"{what}: nbconvert --execute and papermill fail at this step (that cell has not run yet; "
            f"JupyterLab's Run All and flowmagic run read the saved notebook and work); "
            f"move cell {cell.number} above cell {here.number}")
