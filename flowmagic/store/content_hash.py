"""A hash of what a value *is*, not of how it happens to be laid out in memory.

The mutation check (did a step change an input in place?) compares a hash
taken before the step runs with one taken after. Pickle bytes are the wrong
thing to compare for pandas objects: a read such as ``df.dropna(...)`` or
``df.values`` consolidates the frame's blocks in place, which changes its
pickle but not its content. So frames and series are hashed by their values
(numeric columns by their bytes, others with ``pandas.util.hash_pandas_object``),
dtypes, index and columns; numpy
arrays by their bytes, dtype and shape; containers element by element; and
anything else falls back to the serializer's hash.
"""
from __future__ import annotations

import sys
from typing import Any

import xxhash

from flowmagic.store.serializers import value_hash

_MAX_DEPTH = 4    # nested containers deeper than this fall back to pickle bytes
_MAX_ITEMS = 10_000


def content_hash(value: Any) -> str:
    """A hex digest equal for equal content; raises when the value cannot be hashed."""
    h = xxhash.xxh3_128()
    _update(h, value, 0)
    return h.hexdigest()


def _update(h: Any, value: Any, depth: int) -> None:
    pd = sys.modules.get("pandas")
    if pd is not None and isinstance(value, (pd.DataFrame, pd.Series)):
        _update_pandas(h, pd, value)
    elif _is_plain_ndarray(value):
        np = sys.modules["numpy"]
        h.update(f"ndarray:{value.dtype.str}:{value.shape}:".encode())
        h.update(memoryview(np.ascontiguousarray(value)).cast("B"))
    elif depth < _MAX_DEPTH and type(value) in (list, tuple) and len(value) <= _MAX_ITEMS:
        h.update(f"{type(value).__name__}:{len(value)}:".encode())
        for item in value:
            _update(h, item, depth + 1)
    elif depth < _MAX_DEPTH and type(value) is dict and len(value) <= _MAX_ITEMS:
        h.update(f"dict:{len(value)}:".encode())
        for key, item in value.items():
            _update(h, key, depth + 1)
            _update(h, item, depth + 1)
    else:
        h.update(b"value:" + value_hash(value).encode())


def _is_plain_ndarray(value: Any) -> bool:
    np = sys.modules.get("numpy")
    return np is not None and type(value) is np.ndarray and not value.dtype.hasobject


def _update_pandas(h: Any, pd: Any, value: Any) -> None:
    frame = value.to_frame() if isinstance(value, pd.Series) else value
    h.update(f"{type(value).__name__}:{frame.shape}:{getattr(value, 'name', None)!r}:".encode())
    h.update(repr([(column, str(dtype)) for column, dtype in frame.dtypes.items()]).encode())
    h.update(f"{type(frame.index).__name__}:{list(frame.index.names)!r}:{frame.index.dtype}".encode())
    try:
        # column by column, numeric ones by their bytes: hashing the whole frame at
        # once (a uint64 per row and column) took twice a column's memory, more than
        # a task reading a memory-mapped frame bigger than its --memory limit has
        _update_index(h, pd, frame.index)
        for _name, col in frame.items():
            _update_column(h, pd, col)
    except TypeError:  # unhashable cells (lists, dicts): the serializer's hash still tells
        h.update(b"pickled:" + value_hash(value).encode())


def _update_index(h: Any, pd: Any, index: Any) -> None:
    if isinstance(index, pd.RangeIndex):
        h.update(f"range:{index.start}:{index.stop}:{index.step}:".encode())
    else:
        h.update(memoryview(pd.util.hash_pandas_object(index).to_numpy()).cast("B"))


def _update_column(h: Any, pd: Any, col: Any) -> None:
    np = sys.modules["numpy"]
    if isinstance(col.dtype, np.dtype) and col.dtype.kind in "biufcmM":
        values = np.ascontiguousarray(col.to_numpy())   # a view of a mapped column
        h.update(memoryview(values.view(np.uint8) if values.dtype.kind in "mM" else values).cast("B"))
    else:
        h.update(memoryview(pd.util.hash_pandas_object(col, index=False).to_numpy()).cast("B"))
