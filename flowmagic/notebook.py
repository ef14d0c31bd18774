"""Reading a saved ``.ipynb``: its cells, its flow's name and its store root.

A notebook keeps its flow across renames: each run records where its
notebook was and its cells' nbformat ids (``Metadata.record_notebook``), and
:func:`known_flow` finds that flow again for a notebook at a new path.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from flowmagic.flow.graph import FlowGraph, build_flow, flow_name_from_cells
from flowmagic.errors import UsageError, cell_number

if TYPE_CHECKING:
    from flowmagic.store.metadata import Metadata


@dataclass(frozen=True)
class SavedCell:
    """One cell of a saved notebook."""

    cell_id: str | None     # nbformat 4.5 id (None in older notebooks)
    kind: str               # "code" | "markdown" | "raw"
    source: str             # "" for markdown and raw cells


def read_saved_cells(path: str | os.PathLike) -> list[SavedCell]:
    """Every cell of a saved notebook with its id. Raises UsageError for a
    missing file or anything that is not a notebook."""
    notebook_path = Path(path)
    if not notebook_path.is_file():
        raise UsageError(f"no such notebook: {notebook_path}")
    cells = _cells_of(notebook_path)
    sources = [_source(cell, i, notebook_path) for i, cell in enumerate(cells)]   # checks each is a cell
    return [SavedCell(c.get("id") if isinstance(c.get("id"), str) else None, str(c.get("cell_type", "")), source)
            for c, source in zip(cells, sources)]


def _cells_of(notebook_path: Path) -> list[dict]:
    # A v4 notebook is plain JSON: reading it directly skips importing nbformat,
    # whose jsonschema format checkers take ~2 s to import (a big share of a CLI run).
    try:
        document = json.loads(notebook_path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and document.get("nbformat") == 4 and isinstance(document.get("cells"), list):
            return list(document["cells"])
    except UnicodeDecodeError:
        pass  # let nbformat say what is wrong
    except ValueError as exc:   # not JSON at all: say so without importing nbformat
        where = f"line {exc.lineno}, column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise UsageError(f"{notebook_path} is not a Jupyter notebook (not valid JSON at {where})") from None
    except RecursionError:  # json and nbformat both recurse per level of nesting
        raise UsageError(f"{notebook_path} is not a Jupyter notebook (its JSON is nested too deeply)") from None
    except OSError as exc:   # deleted or unreadable between the check and the read
        raise UsageError(f"cannot read the notebook {notebook_path}: {exc.strerror or exc}") from None
    import nbformat  # imported here: the dag does not need it

    try:
        notebook = nbformat.read(notebook_path, as_version=4)
    except Exception as exc:  # nbformat raises JSON, validation and reader errors
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(f"{notebook_path} is not a Jupyter notebook ({reason})") from None
    return list(notebook.get("cells", []))


def read_cells(path: str | os.PathLike) -> list[str]:
    """Source of every cell in order; markdown and raw cells as "" so that
    indices match the notebook's. Raises UsageError for a missing file or
    anything that is not a notebook."""
    return [cell.source for cell in read_saved_cells(path)]


def _source(cell, index: int, path: Path) -> str:
    if not isinstance(cell, dict):
        raise UsageError(f"{path}: cell {cell_number(index)} is a {type(cell).__name__}, not a cell (a JSON object)")
    if cell.get("cell_type") != "code":
        return ""
    source = cell.get("source", "")
    if isinstance(source, str):
        return source
    if isinstance(source, list) and all(isinstance(line, str) for line in source):
        return "".join(source)
    raise UsageError(f"{path}: cell {cell_number(index)}'s source is {_json_kind(source)}, not text "
                     "(a string or a list of strings)")


def _json_kind(value) -> str:
    if isinstance(value, list):
        bad = next(v for v in value if not isinstance(v, str))
        return f"a list holding {_json_kind(bad)}"
    return {dict: "an object", bool: "a boolean", int: "a number", float: "a number",
            type(None): "null"}.get(type(value), type(value).__name__)


def camel_case(stem: str) -> str:
    """``hello_flow`` -> ``HelloFlow``; the result is always a valid identifier."""
    parts = [p for p in re.split(r"[\W_]+", stem) if p]
    name = "".join(p[0].upper() + p[1:] for p in parts)
    if not name or not name.isidentifier():
        name = "Flow" + name
    return name if name.isidentifier() else "Flow"


def flow_name_for(path: str | os.PathLike, cells: list[str] | None = None) -> str:
    """``%flow name NAME`` if a cell has one, else the file stem in CamelCase."""
    found = flow_name_from_cells(cells if cells is not None else read_cells(path))
    return found or camel_case(Path(path).stem)


def load_flow(path: str | os.PathLike) -> FlowGraph:
    """Read a notebook and build its flow. Raises UsageError or FlowDefinitionError."""
    cells = read_cells(path)
    return build_flow(cells, name=flow_name_for(path, cells))


# -- which flow a notebook belongs to -----------------------------------------------
@dataclass(frozen=True)
class KnownFlow:
    """The flow earlier runs of this notebook recorded, and where it was then."""

    flow: str
    renamed_from: str | None   # the notebook's earlier path, when it moved since

    def note(self, default: str) -> str:
        """The one line a front end prints when the flow is not the default name."""
        moved = f" (notebook renamed from {Path(self.renamed_from).name})" if self.renamed_from else ""
        return f"Flow {default}: continuing flow {self.flow}{moved}"


def known_flow(meta: Metadata, path: Path | None, cell_ids: set[str]) -> KnownFlow | None:
    """The flow this notebook's runs were recorded under: the flow last run from
    ``path``; else the flow whose recorded cells share most ids with ``cell_ids``,
    when its notebook is no longer there (a copy is a new notebook: its
    original still has those cells)."""
    records = meta.notebook_records()
    where = str(path.absolute()) if path is not None else None
    if where is not None:
        same_place = next((r for r in records if r[2] == where), None)
        if same_place is not None:
            return KnownFlow(same_place[0], None)
    best: tuple[int, str, str | None] | None = None
    for flow, _run, recorded_path, ids in records:   # newest first: ties go to the newest
        shared = len(ids & cell_ids)
        if shared and (best is None or shared > best[0]):
            best = (shared, flow, recorded_path)
    if best is None or _still_there(best[2], cell_ids):
        return None
    return KnownFlow(best[1], best[2] if best[2] != where else None)


def _still_there(recorded_at: str | None, cell_ids: set[str]) -> bool:
    """Whether the notebook recorded at ``recorded_at`` still holds these cells."""
    if recorded_at is None or not Path(recorded_at).is_file():
        return False
    try:
        ids = {c.cell_id for c in read_saved_cells(recorded_at)}
    except UsageError:
        return False
    return bool(ids & cell_ids)


def notebook_with_cells(folder: Path, cell_ids: set[str], sources: set[str] = frozenset(),
                        limit: int = 50) -> Path | None:
    """The one notebook in ``folder`` holding one of ``cell_ids``, else every one
    of ``sources`` (a kernel that was not told its notebook, as under nbclient,
    which sends no cell ids either, finds it by what it executed)."""
    if not cell_ids and not sources:
        return None
    found = []
    for candidate in sorted(folder.glob("*.ipynb"))[:limit]:
        try:
            cells = read_saved_cells(candidate)
        except UsageError:
            continue
        if cell_ids and {c.cell_id for c in cells} & cell_ids:
            found.append(candidate)
        elif not cell_ids and sources <= {c.source for c in cells}:
            found.append(candidate)
    return found[0] if len(found) == 1 else None


def flow_identity(path: Path, meta: Metadata | None) -> tuple[str, str | None]:
    """The flow of the saved notebook at ``path`` for the console: ``%flow name``
    in a cell, else a flow its earlier runs recorded (with the line to say
    so), else the file stem in CamelCase."""
    cells = read_saved_cells(path)
    named = flow_name_from_cells([c.source for c in cells])
    if named:
        return named, None
    default = camel_case(path.stem)
    known = known_flow(meta, path, {c.cell_id for c in cells if c.cell_id}) if meta is not None else None
    if known is None or known.flow == default:
        return default, None
    return known.flow, known.note(default)
