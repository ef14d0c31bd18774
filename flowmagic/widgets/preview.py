"""Previews of stored artifacts that never load a big one whole.

- Arrow frames and tables: the schema and the first record batches only
  (the file is memory-mapped; the row count comes from batch headers).
- numpy arrays: shape and dtype from the schema metadata; min/max over the
  memory-mapped data, only up to ``ARRAY_STATS_MAX_BYTES``.
- pickles: loaded only up to ``PICKLE_PREVIEW_MAX_BYTES``, then ``repr`` cut.
- inline values: ``repr`` cut.

Every preview is a JSON-able dict with a ``kind``: "frame", "array",
"text" or "none" (nothing shown, ``text`` says why).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from flowmagic.report.text import format_size  # noqa: F401  (the inspector imports it from here)

PREVIEW_ROWS = 8
PREVIEW_COLUMNS = 12
CELL_CHARS = 40
REPR_CHARS = 400
PICKLE_PREVIEW_MAX_BYTES = 2_000_000
ARRAY_STATS_MAX_BYTES = 64_000_000
_ARROW_TABLES = {"arrow-pandas", "arrow-table", "arrow-polars"}


def cut(text: str, limit: int = REPR_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def preview_artifact(objects: Any, ref: Any) -> dict:
    """A preview of one stored artifact (an ``ArtifactRef``) in ``objects``."""
    try:
        if ref.serializer == "inline":
            value = json.loads(ref.inline) if ref.inline is not None else None
            return {"kind": "text", "text": cut(repr(value))}
        objects.map(ref.hash).close()  # verified first: a damaged object is "no preview", never wrong values
        path = Path(objects.open_path(ref.hash))
        if ref.serializer in _ARROW_TABLES:
            return frame_preview(path)
        if ref.serializer == "arrow-numpy":
            return array_preview(path)
        if ref.serializer == "pickle":
            return _pickle_preview(objects, ref)
        return {"kind": "none", "text": f"no preview for serializer '{ref.serializer}'"}
    except Exception as exc:  # noqa: BLE001 - a broken preview must not break the inspector
        return {"kind": "none", "text": f"no preview: {type(exc).__name__}: {cut(str(exc), 200)}"}


def _open_arrow(path: Path) -> pa.ipc.RecordBatchFileReader:
    return pa.ipc.open_file(pa.memory_map(str(path), "r"))


def _flowmagic_meta(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(b"flowmagic")
    return json.loads(raw) if raw else {}


def frame_preview(path: Path, rows: int = PREVIEW_ROWS) -> dict:
    """Shape, dtypes and the first rows of an Arrow IPC file, without reading the rest."""
    reader = _open_arrow(path)
    batches, total, taken = [], 0, 0
    for i in range(reader.num_record_batches):
        batch = reader.get_batch(i)  # zero-copy over the mapping: headers only until touched
        total += batch.num_rows
        if taken < rows:
            batches.append(batch.slice(0, rows - taken))
            taken += min(batch.num_rows, rows - taken)
    head = pa.Table.from_batches(batches, schema=reader.schema)
    meta = _flowmagic_meta(reader.schema)
    frame = head.to_pandas() if reader.schema.pandas_metadata else head.to_pandas(ignore_metadata=True)
    if meta.get("kind") == "pandas-series" and len(frame.columns) == 1:
        frame.columns = [meta.get("series_name") or "value"]  # stored as a one-column frame
    columns = [str(c) for c in frame.columns]
    object_columns = set(meta.get("object_columns") or ())
    dtypes = {str(c): ("object" if c in object_columns else str(t)) for c, t in frame.dtypes.items()}
    shown = columns[:PREVIEW_COLUMNS]
    body = [[cut(_cell(v), CELL_CHARS) for v in row[: len(shown)]] for row in frame.itertuples(index=False)]
    preview = {
        "kind": "frame",
        "shape": [total, len(columns)],
        "dtypes": dtypes,
        "columns": shown,
        "index": [cut(_cell(i), CELL_CHARS) for i in frame.index],
        "rows": body,
    }
    notes = []
    if total > len(body):
        notes.append(f"first {len(body)} of {total} rows")
    if len(columns) > len(shown):
        notes.append(f"first {len(shown)} of {len(columns)} columns")
    if notes:
        preview["truncated"] = ", ".join(notes)
    return preview


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def array_preview(path: Path) -> dict:
    """Shape and dtype from the schema; min/max over the mapped data when small enough."""
    reader = _open_arrow(path)
    meta = _flowmagic_meta(reader.schema)
    shape = [int(n) for n in meta.get("shape", [])]
    dtype = np.lib.format.descr_to_dtype(_descr(meta["dtype"])) if "dtype" in meta else None
    preview: dict[str, Any] = {"kind": "array", "shape": shape, "dtype": str(dtype) if dtype is not None else "?"}
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if dtype is None or dtype.kind not in "iufb" or count == 0:
        return preview
    nbytes = count * dtype.itemsize
    if nbytes > ARRAY_STATS_MAX_BYTES:
        preview["note"] = f"min/max not computed: {format_size(nbytes)} is too big to scan for a preview"
        return preview
    column = reader.get_batch(0).column(0)
    values = column.to_numpy(zero_copy_only=False)
    if dtype.kind == "b" or values.dtype != dtype:  # stored as raw bytes: view them as the dtype
        values = np.frombuffer(column.buffers()[1], dtype=dtype, count=count,
                               offset=column.offset * column.type.bit_width // 8)
    with np.errstate(all="ignore"):
        lo, hi = (np.nanmin(values), np.nanmax(values)) if dtype.kind == "f" else (values.min(), values.max())
    preview["min"], preview["max"] = _cell(lo.item()), _cell(hi.item())
    return preview


def _descr(d: Any) -> Any:
    if isinstance(d, list):
        return [tuple(_descr(x) for x in field) if isinstance(field, list) else field for field in d]
    return d


def _pickle_preview(objects: Any, ref: Any) -> dict:
    if ref.size > PICKLE_PREVIEW_MAX_BYTES:
        return {"kind": "none",
                "text": f"{format_size(ref.size)} pickle: not loaded for a preview "
                        f"(read it with the Client API: .data.{ref.name})"}
    from flowmagic.store import load_artifact

    value = load_artifact(objects, ref)
    return {"kind": "text", "text": cut(repr(value))}
