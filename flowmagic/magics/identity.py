"""Which notebook this kernel runs, and which flow it belongs to (no IPython here).

:class:`SavedNotebookWatch` keeps the kernel's flow definition in step with
the saved ``.ipynb`` (read again only when the file changed on disk; a file
that is gone or broken gives one warning and the kernel's flow stays as it
is). :func:`decide` names the flow: the flow earlier runs of this notebook
recorded (found by path or by cell ids, so a renamed notebook keeps its
runs), else the notebook's file name, else the shared default.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowmagic.errors import UsageError
from flowmagic.magics.session import DEFAULT_FLOW_NAME, KernelFlowDefinition

if TYPE_CHECKING:
    from flowmagic.store.metadata import Metadata


class SavedNotebookWatch:
    """What the kernel last read of its saved notebook."""

    def __init__(self) -> None:
        self._seen: tuple[Path, int, int] | None = None   # path, mtime_ns, size
        self._warned: object = None                        # the state last warned about

    def follow(self, definition: KernelFlowDefinition, notebook: Path | None) -> list[str]:
        """Sync ``definition`` with the saved notebook if it changed; returns the steps that left."""
        if notebook is None:
            return []
        try:
            stat = notebook.stat()
        except OSError:
            self._warn_once(("gone", notebook), f"the notebook file {notebook} is gone (deleted or renamed?): "
                            "the flow stays as this kernel executed it")
            return []
        seen = (notebook, stat.st_mtime_ns, stat.st_size)
        if seen == self._seen:
            return []
        from flowmagic.notebook import read_saved_cells

        try:
            cells = read_saved_cells(notebook)
        except UsageError as exc:
            self._warn_once(seen, f"cannot read the saved notebook: {exc}; the flow stays as this kernel "
                            "executed it")
            return []
        self._seen = seen
        code = [(number, c) for number, c in enumerate(cells, start=1) if c.kind == "code"]
        saved = [(c.cell_id, c.source) for _, c in code]
        return definition.sync_saved(saved, stat.st_mtime, [number for number, _ in code])

    def _warn_once(self, state: object, message: str) -> None:
        if self._warned != state:
            self._warned = state
            print(f"[flowmagic] warning: {message}", file=sys.stderr)


def decide(definition: KernelFlowDefinition, notebook: Path | None, meta: Metadata | None) -> tuple[str, str | None]:
    """The flow's name without ``%flow name``, and the line to print when it
    continues a flow of another name (None otherwise)."""
    from flowmagic.notebook import camel_case, notebook_with_cells

    ids = definition.cell_ids()
    if notebook is None:
        # nbclient, nbconvert and papermill do not say which file they run:
        # its cells' ids find it in the working folder, or earlier runs of it
        notebook = notebook_with_cells(Path.cwd(), ids, definition.executed_flow_sources())
    default = camel_case(notebook.stem) if notebook is not None else DEFAULT_FLOW_NAME
    known = _known(meta, notebook, ids)
    if known is None or known.flow == default:
        return default, None
    return known.flow, known.note(default)


def _known(meta: Metadata | None, notebook: Path | None, ids: set[str]) -> Any:
    from flowmagic.notebook import known_flow

    if meta is None or (notebook is None and not ids):
        return None
    try:
        return known_flow(meta, notebook, ids)
    except Exception:  # noqa: BLE001 - a store it cannot read: the default name, as before
        return None
