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
from collections.abc import Sequence
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

META_KEY = b"flowmagic"
_NATIVE_KINDS = "iuf"


# -- numpy -------------------------------------------------------------------
def numpy_supported(arr: np.ndarray) -> bool:
    # np.memmap (np.load(..., mmap_mode=...)) is a plain array on disk; other
    # subclasses (matrix, masked arrays) carry more than the buffer: pickle them
    return type(arr) in (np.ndarray, np.memmap) and not arr.dtype.hasobject


def write_numpy(arr: np.ndarray, fh: BinaryIO) -> None:
    order = "F" if arr.flags.f_contiguous and not arr.flags.c_contiguous else "C"
    flat = arr.ravel(order="K" if order == "F" else "C")  # no copy when contiguous
    dtype = arr.dtype
    if not (dtype.kind in _NATIVE_KINDS and dtype.isnative and dtype.fields is None):
        flat = flat.view(np.uint8)  # raw bytes; the descriptor says how to read them
    # from_buffers wraps the memory as it is (pa.array would import pandas)
    column = pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat), [None, pa.py_buffer(flat)])
    meta = {"kind": "numpy", "dtype": np.lib.format.dtype_to_descr(dtype),
            "shape": list(arr.shape), "order": order}
    schema = pa.schema([pa.field("data", column.type)], metadata={META_KEY: json.dumps(meta)})
    batch = pa.record_batch([column], schema=schema)
    _write_batches(fh, schema, [batch])


def read_numpy(mm: mmap.mmap) -> np.ndarray:
    buf, reader = _open(mm)
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
    batches = table.to_batches()
    if not batches:  # keep the (empty) columns: their dictionaries hold a categorical's categories
        batches = [pa.RecordBatch.from_arrays(
            [c.chunk(0) if c.num_chunks else pa.array([], type=c.type) for c in table.columns],
            schema=table.schema)]
    _write_batches(fh, table.schema, batches)


def read_table(mm: mmap.mmap) -> tuple[pa.Table, dict, mmap.mmap, pa.Buffer]:
    """The table in the (verified, copy-on-write) mapping ``mm`` with
    flowmagic's metadata removed from its schema, that metadata, and the
    mapping with its Arrow buffer."""
    buf, reader = _open(mm)
    table = reader.read_all()
    schema_meta = dict(table.schema.metadata or {})
    meta = json.loads(schema_meta.pop(META_KEY, b"{}"))
    if len(schema_meta) != len(table.schema.metadata or {}):
        table = table.replace_schema_metadata(schema_meta or None)
    return table, meta, mm, buf


# -- internals -----------------------------------------------------------------
def _write_batches(fh: BinaryIO, schema: pa.Schema, batches: list[pa.RecordBatch]) -> None:
    sink = pa.PythonFile(fh, mode="w")
    with pa.ipc.new_file(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def _open(mm: mmap.mmap) -> tuple[pa.Buffer, pa.ipc.RecordBatchFileReader]:
    buf = pa.py_buffer(mm)
    return buf, pa.ipc.open_file(pa.BufferReader(buf))


def _meta(schema: pa.Schema) -> dict:
    raw = (schema.metadata or {}).get(META_KEY)
    return json.loads(raw) if raw else {}


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
        if col.dtype == object and not _arrow_safe_objects(col):
            return False
    if any(level.dtype == object and not _arrow_safe_objects(level) for level in _index_levels(df.index)):
        return False  # mixed objects in an index: pickle keeps them as they are
    try:
        empty = df.iloc[:0]
        back = pa.Table.from_pandas(empty).to_pandas()
        return (list(back.columns) == list(df.columns) and _dtypes_equal(back.dtypes, df.dtypes)
                and type(back.index) is type(df.index) and back.index.names == df.index.names
                and back.columns.name == df.columns.name
                and _dtypes_equal([x.dtype for x in _index_levels(back.index)],
                                  [x.dtype for x in _index_levels(df.index)]))
    except (pa.ArrowException, TypeError, ValueError):
        return False


def _arrow_safe_objects(values: Any) -> bool:
    """Object values Arrow gives back unchanged: strings, bytes or dates, with
    None as the only missing value (Arrow turns NaN and NaT into None)."""
    import pandas as pd

    if pd.api.types.infer_dtype(values, skipna=True) not in _ARROW_SAFE_OBJECTS:
        return False
    missing = pd.isna(values)
    missing = missing.to_numpy() if hasattr(missing, "to_numpy") else np.asarray(missing)
    return not missing.any() or all(v is None for v in np.asarray(values, dtype=object)[missing])


def _index_levels(index: Any) -> list:
    import pandas as pd

    if isinstance(index, pd.MultiIndex):
        return [index.get_level_values(i) for i in range(index.nlevels)]
    return [index]


def _dtypes_equal(a: Any, b: Any) -> bool:
    """Strict dtype equality: pandas calls a categorical equal to "category"
    whatever its categories, which would hide a lost set of categories."""
    import pandas as pd

    a, b = list(a), list(b)
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if type(x) is not type(y) or str(x) != str(y):
            return False
        if isinstance(x, pd.CategoricalDtype) and (
                x.ordered != y.ordered or not x.categories.equals(y.categories)
                or x.categories.dtype != y.categories.dtype):
            return False
    return True


_SERIES_COLUMN = "__series__"


def series_supported(series: Any) -> bool:
    """A Series goes through Arrow as a one-column frame, when its name can
    be kept in JSON."""
    import pandas as pd

    return (type(series) is pd.Series and type(series.name) in (str, int, float, type(None))
            and not series.attrs and pandas_supported(series.to_frame(_SERIES_COLUMN)))


def write_series(series: Any, fh: BinaryIO) -> None:
    write_pandas(series.to_frame(_SERIES_COLUMN), fh, series_name=series.name)


_NOT_A_SERIES: Any = object()


def write_pandas(df: Any, fh: BinaryIO, *, series_name: Any = _NOT_A_SERIES) -> None:
    is_series = series_name is not _NOT_A_SERIES
    meta: dict[str, Any] = {"kind": "pandas-series" if is_series else "pandas",
                            "series_name": series_name if is_series else None,
                            "object_columns": [name for name, col in df.items() if col.dtype == object],
                            "object_index_levels": [i for i, level in enumerate(_index_levels(df.index))
                                                    if level.dtype == object]}
    freq = getattr(df.index, "freq", None)
    if freq is not None:  # Arrow keeps the values of a DatetimeIndex, not its frequency
        meta["index_freq"] = df.index.freqstr
    write_table(_keep_nan(pa.Table.from_pandas(df), df), fh, meta)


def _keep_nan(table: pa.Table, df: Any) -> pa.Table:
    """Arrow turns NaN in float columns into nulls, which to_pandas must then
    copy back into NaN; store the NaN bits instead, so the column maps
    without copying."""
    for name, col in df.items():
        if isinstance(col.dtype, np.dtype) and col.dtype.kind == "f":
            i = table.schema.get_field_index(name)
            if i >= 0 and table.column(i).null_count:
                table = table.set_column(i, table.schema.field(i),
                                         pa.array(col.to_numpy(), from_pandas=False))
    return table


def read_pandas(mm: mmap.mmap) -> Any:
    table, meta, mm, buf = read_table(mm)
    df = table.to_pandas(split_blocks=True)  # one block per column: no consolidation copy
    index = _object_levels(df.index, meta.get("object_index_levels", ()))
    df = _writable_frame(df, mm, buf, index)
    for name in meta.get("object_columns", ()):
        df[name] = _as_object(df[name])
    if meta.get("index_freq"):
        df.index.freq = meta["index_freq"]
    if meta.get("kind") == "pandas-series":
        series = df[_SERIES_COLUMN]
        series.name = meta.get("series_name")  # not rename(): it copies on pandas 2
        return series
    return df


def _as_object(col: Any) -> Any:
    """Arrow gives strings back as pandas' str dtype; the frame had them as
    objects with None for missing values, so restore exactly that."""
    if col.dtype == object:
        return col
    values = col.to_numpy(dtype=object, na_value=None)
    return col._constructor(values, index=col.index, name=col.name, dtype=object, copy=False)


def _object_levels(index: Any, levels: Sequence[int]) -> Any:
    """Arrow gives a string index back as pandas 3's str dtype; restore the
    object levels the frame had."""
    import pandas as pd

    if not levels:
        return index
    if not isinstance(index, pd.MultiIndex):
        return index if index.dtype == object else index.astype(object)
    return index.set_levels([index.levels[i].astype(object) for i in levels], level=levels)


def _writable_frame(df: Any, mm: mmap.mmap, buf: pa.Buffer, index: Any) -> Any:
    """Arrow hands pandas read-only views; rebuild each such column as a
    writable view of the copy-on-write mapping (or a copy if it lives
    elsewhere), so ``df.loc[0, "x"] = 1`` works as on any frame."""
    import pandas as pd

    columns = {name: _writable_column(col, mm, buf) for name, col in df.items()}
    out = pd.DataFrame(columns, index=index, copy=False)
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


def read_polars(mm: mmap.mmap) -> Any:
    import polars as pl

    return pl.from_arrow(read_table(mm)[0])
