"""Export a flowmagic notebook to a Metaflow ``FlowSpec`` script (DESIGN section 7).

The script runs with the real ``metaflow`` package and produces the artifacts
the notebook run produces. What cannot be expressed exactly in Metaflow is a
:class:`~flowmagic.errors.FlowDefinitionError` naming the step and the reason,
never a script that silently does something else.

Parts: :mod:`.structure` (the series-parallel Metaflow graph), :mod:`.names`
(which names are ``self.`` artifacts), :mod:`.rewrite` (step code through the
AST), :mod:`.carry` (what joins carry forward), :mod:`.prelude` (module-level
code), :mod:`.script` (the text).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flowmagic.flow.graph import FlowGraph

__all__ = ["ExportPlan", "export_flow", "export_notebook", "plan_export", "write_script"]


def __getattr__(name: str):
    # The parts load on first use: the console imports this package
    # for every subcommand's parser, and `flowmagic run` needs none of this.
    if name in ("ExportPlan", "plan_export", "render_script"):
        from flowmagic.export import script

        return getattr(script, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def export_flow(graph: FlowGraph, class_name: str | None = None) -> str:
    """The Metaflow script (source text) for ``graph``; the class is
    ``class_name`` or the flow's name. Raises FlowDefinitionError."""
    from flowmagic.export.script import plan_export, render_script

    return render_script(plan_export(graph, class_name))


def export_notebook(path: str | os.PathLike, output: str | os.PathLike | None = None,
                    class_name: str | None = None) -> str:
    """Export the notebook at ``path``; write the script to ``output`` when
    given. Returns the script. Raises UsageError (not a notebook) or
    FlowDefinitionError."""
    from flowmagic.notebook import load_flow  # nbformat is only needed here

    source = export_flow(load_flow(path), class_name)
    if output is not None:
        write_script(output, source)
    return source


def write_script(output: str | os.PathLike, source: str) -> None:
    """Write the script at ``output`` through a temporary file: never a half-written script."""
    target = Path(output)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_text(source, encoding="utf-8")
    temporary.replace(target)
