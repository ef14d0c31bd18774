"""Reading a saved ``.ipynb``: its cells, its flow's name and its store root."""
from __future__ import annotations

import os
import re
from pathlib import Path

from flowmagic.flow.graph import FlowGraph, build_flow, flow_name_from_cells
from flowmagic.errors import UsageError, cell_number



def read_cells(path: str | os.PathLike) -> list[str]:
    """Source of every cell in order; markdown and raw cells as "" so that
    indices match the notebook's. Raises UsageError for a missing file or
    anything that is not a notebook."""
    notebook_path = Path(path)
    if not notebook_path.is_file():
        raise UsageError(f"no such notebook: {notebook_path}")
    # A v4 notebook is plain JSON: reading it directly skips importing nbformat,
    # whose jsonschema format checkers take ~2 s to import (a big share of a CLI run).
    try:
        import json

        document = json.loads(notebook_path.read_text(encoding="utf-8"))
        if isinstance(document, dict) and document.get("nbformat") == 4 and isinstance(document.get("cells"), list):
            return [_source(cell, i, notebook_path) for i, cell in enumerate(document["cells"])]
    except (ValueError, UnicodeDecodeError):
        pass  # let nbformat say what is wrong
    except RecursionError:  # json and nbformat both recurse per level of nesting
        raise UsageError(f"{notebook_path} is not a Jupyter notebook (its JSON is nested too deeply)") from None
    import nbformat  # imported here: the dag does not need it

    try:
        notebook = nbformat.read(notebook_path, as_version=4)
    except Exception as exc:  # nbformat raises JSON, validation and reader errors
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UsageError(f"{notebook_path} is not a Jupyter notebook ({reason})") from None
    return [_source(cell, i, notebook_path) for i, cell in enumerate(notebook.get("cells", []))]


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
