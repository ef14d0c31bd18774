"""Arrow IPC codecs: numpy arrays, pandas/polars frames, Arrow tables.

Files are uncompressed Arrow IPC *files*, so a reader maps them and gets the
columns without copying. The mapping is private (copy-on-write): loaded
arrays are writable, and a write touches only the process's own pages, never
the stored object.

numpy arrays are stored as one column: the native Arrow type for plain
numbers, otherwise the raw bytes (uint8) with the dtype's descriptor in the
schema metadata, which covers bool, datetime64, complex, fixed-width strings
and structured dtypes alike.
"""
from __future__ import annotations

import json
import mmap
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

META_KEY = b"flowmagic"
_NATIVE_KINDS = "iuf"


# -- numpy -------------------------------------------------------------------
def numpy_supported(arr: np.ndarray) -> bool:
    return type(arr) is np.ndarray and not arr.dtype.hasobject


def write_numpy(arr: np.ndarray, fh: BinaryIO) -> None:
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    flat = arr.ravel(order="K" if order == "F" else "C")  # no copy when contiguous
    dtype = arr.dtype
    if dtype.kind in _NATIVE_KINDS and dtype.isnative and dtype.fields is None:
        column = pa.array(flat) if flat.size else pa.array(flat, type=pa.from_numpy_dtype(dtype))
    else:
        column = pa.array(flat.view(np.uint8)) if flat.size else pa.array([], type=pa.uint8())
    meta = {"kind": "numpy", "dtype": np.lib.format.dtype_to_descr(dtype),
            "shape": list(arr.shape), "order": order}
    schema = pa.schema([pa.field("data", column.type)], metadata={META_KEY: json.dumps(meta)})
    batch = pa.record_batch([column], schema=schema)
    _write_batches(fh, schema, [batch])


def read_numpy(path: Path) -> np.ndarray:
    mm, buf, reader = _open(path)
    meta = _meta(reader.schema)
    dtype = np.lib.format.descr_to_dtype(_descr(meta["dtype"]))
    shape = tuple(meta["shape"])
    column = reader.get_batch(0).column(0)
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype=dtype, order=meta["order"])
    data = column.buffers()[1]
    offset = data.address - buf.address + column.offset * column.type.bit_width // 8
    flat = np.frombuffer(mm, dtype=dtype, count=count, offset=offset)
    return flat.reshape(shape, order=meta["order"])


def _descr(d: Any) -> Any:
    """JSON turned the descriptor's tuples into lists; numpy wants tuples."""
    if isinstance(d, list):
        return [tuple(_descr(x) for x in field) if isinstance(field, list) else field for field in d]
    return d


# -- Arrow tables --------------------------------------------------------------
def write_table(table: pa.Table, fh: BinaryIO, meta: dict | None = None) -> None:
    if meta is not None:
        schema_meta = dict(table.schema.metadata or {})
        schema_meta[META_KEY] = json.dumps(meta).encode()
        table = table.replace_schema_metadata(schema_meta)
    _write_batches(fh, table.schema, table.to_batches())


def read_table(path: Path) -> tuple[pa.Table, mmap.mmap, pa.Buffer]:
    mm, buf, reader = _open(path)
    table = reader.read_all()
    schema_meta = dict(table.schema.metadata or {})
    if META_KEY in schema_meta:
        del schema_meta[META_KEY]
        table = table.replace_schema_metadata(schema_meta or None)
    return table, mm, buf


# -- internals -----------------------------------------------------------------
def _write_batches(fh: BinaryIO, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    sink = pa.PythonFile(fh, mode="w")
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _open(path: Path) -> tuple[mmap.mmap, pa.Buffer, pa.ipc.RecordBatchFileReader]:
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    buf = pa.py_buffer(mm)
    return mm, buf, pa.ipc.open_file(pa.BufferReader(buf))


def _meta(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


def schema_meta(path: Path) -> dict:
    """The flowmagic metadata recorded in an Arrow file's schema."""
    return _meta(_open(path)[2].schema)


# -- pandas ------------------------------------------------------------------
_ARROW_SAFE_OBJECTS = {"string", "empty", "bytes", "date"}


def pandas_supported(df: Any) -> bool:
    """True when Arrow round-trips ``df`` exactly (else the caller pickles it).

    Checked cheaply: object columns must hold strings/bytes/dates only, column
    labels must be unique strings, and a zero-row slice must come back with
    the same dtypes, columns and index type.
    """
    import pandas as pd

    if type(df) is not pd.DataFrame or df.attrs or type(df.columns) is not pd.Index:
        return False
    if not df.columns.is_unique or not all(isinstance(c, str) for c in df.columns):
        return False
    for _, col in df.items():
        if col.dtype == object and pd.api.types.infer_dtype(col, skipna=True) not in _ARROW_SAFE_OBJECTS:
            return False
    for level in _index_levels(df.index):
        if level.dtype == object and pd.api.types.infer_dtype(level, skipna=True) not in _ARROW_SAFE_OBJECTS:
            return False
    try:
        empty = df.iloc[:0]
        back = pa.Table.from_pandas(empty).to_pandas()
        return (list(back.columns) == list(df.columns) and back.dtypes.equals(df.dtypes)
                and type(back.index) is type(df.index) and back.index.names == df.index.names
                and back.columns.name == df.columns.name and _index_dtypes_equal(back.index, df.index))
    except (pa.ArrowException, TypeError, ValueError):
        return False


def _index_levels(index: Any) -> list:
    import pandas as pd

    if isinstance(index, pd.MultiIndex):
        return [index.get_level_values(i) for i in range(index.nlevels)]
    return [index]


def _index_dtypes_equal(a: Any, b: Any) -> bool:
    return [x.dtype for x in _index_levels(a)] == [x.dtype for x in _index_levels(b)]


def write_pandas(df: Any, fh: BinaryIO) -> None:
    write_table(pa.Table.from_pandas(df), fh, {"kind": "pandas"})


def read_pandas(path: Path) -> Any:
    table, mm, buf = read_table(path)
    df = table.to_pandas(split_blocks=True)  # one block per column: no consolidation copy
    return _writable_frame(df, mm, buf)


def _writable_frame(df: Any, mm: mmap.mmap, buf: pa.Buffer) -> Any:
    """Arrow hands pandas read-only views; rebuild each such column as a
    writable view of the copy-on-write mapping (or a copy if it lives
    elsewhere), so ``df.loc[0, "x"] = 1`` works as on any frame."""
    import pandas as pd

    columns = {name: _writable_column(col, mm, buf) for name, col in df.items()}
    out = pd.DataFrame(columns, index=df.index, copy=False)
    out.columns = df.columns
    return out


def _writable_column(col: Any, mm: mmap.mmap, buf: pa.Buffer) -> Any:
    import pandas as pd

    dtype = col.dtype
    if isinstance(dtype, np.dtype) and dtype.kind in "biufcmM":
        values = col.to_numpy()
        if not values.flags.writeable:
            values = _remap(values, mm, buf)
        return pd.Series(values, index=col.index, name=col.name, copy=False)
    if isinstance(dtype, pd.CategoricalDtype):
        codes = col.cat.codes.to_numpy()
        if not codes.flags.writeable:
            codes = codes.copy()  # codes are small (int8/16/32)
        cat = pd.Categorical.from_codes(codes, dtype=dtype, validate=False)
        return pd.Series(cat, index=col.index, name=col.name, copy=False)
    if isinstance(dtype, pd.DatetimeTZDtype):
        utc = col.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
        if not utc.flags.writeable:
            utc = _remap(utc, mm, buf)
        return pd.Series(utc, index=col.index, name=col.name, copy=False).dt.tz_localize("UTC").dt.tz_convert(dtype.tz)
    return col  # Arrow-backed and extension arrays copy on write themselves


def _remap(values: np.ndarray, mm: mmap.mmap, buf: pa.Buffer) -> np.ndarray:
    offset = values.__array_interface__["data"][0] - buf.address
    if values.ndim == 1 and values.strides[0] == values.itemsize and 0 <= offset <= len(mm) - values.nbytes:
        return np.frombuffer(mm, dtype=values.dtype, count=values.size, offset=offset)
    return values.copy()


# -- polars ------------------------------------------------------------------
def write_polars(df: Any, fh: BinaryIO) -> None:
    write_table(df.to_arrow(), fh, {"kind": "polars"})


def read_polars(path: Path) -> Any:
    import polars as pl

    return pl.from_arrow(read_table(path)[0])
