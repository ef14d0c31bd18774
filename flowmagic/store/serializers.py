"""Values <-> stored artifacts.

Each value gets the first serialiser that fits:

- ``inline``: small plain values (numbers, short strings, small lists/dicts
  of them) kept as JSON text in the metadata, no object file;
- ``arrow-numpy`` / ``arrow-pandas`` / ``arrow-table`` / ``arrow-polars``:
  Arrow IPC files, read back memory-mapped (see ``_arrow``);
- ``pickle``: pickle protocol 5, large buffers (numpy arrays inside any
  object) written out-of-band and raw, so they too are mapped on load.

A value nothing can serialise raises :class:`SerializationError` naming the
step, the variable and the type, before anything is stored.

numpy, pyarrow and pandas are imported only when a value of theirs is saved
or an Arrow object is loaded: every task process and console command imports
this module, and those imports cost ~0.5 s a process that never uses them.
A value can only be a numpy array if numpy was imported, so the type checks
look in ``sys.modules`` instead of importing.
"""
from __future__ import annotations

import importlib
import io
import json
import math
import mmap
import pickle
import struct
import sys
import types
from dataclasses import dataclass
from typing import Any, BinaryIO

import xxhash

from flowmagic.errors import NotFoundError, SerializationError, StoreError
from .objects import DamagedObjectError, ObjectStore, verify_on_load

SERIALIZERS = ("arrow-pandas", "arrow-numpy", "arrow-table", "arrow-polars", "pickle", "inline")
# A value that could not be saved and no step read: recorded (DESIGN 4: "recorded as not
# persisted") with its type and no object, so a later reader gets a clear error, not a NameError.
UNSAVED = "unsaved"
INLINE_MAX = 1024  # characters of JSON text kept in the metadata

# pickle-5 object layout: magic, u32 buffer count, u64 pickle length, u64 per
# buffer length, then the pickle and each buffer, every part 64-byte aligned
# so that mapped numpy buffers are aligned too.
_PICKLE_MAGIC = b"FMPKL5\x00\x01"
_ALIGN = 64


@dataclass(frozen=True, slots=True)
class ArtifactRef:
    """What the metadata records about one stored value.

    The orchestrator keeps one per artifact of every finished task (a foreach
    of 100,000 tasks: 100,000s), so it has slots and shares its repeated strings.
    """

    name: str
    type: str           # "pandas.DataFrame", "numpy.ndarray", "int", ...
    size: int           # bytes stored (object file, or inline JSON text)
    hash: str           # object key; for inline values the hash of the JSON text
    serializer: str     # one of SERIALIZERS
    inline: str | None = None  # JSON text for small plain values

    def to_dict(self) -> dict:
        return {"name": self.name, "type": self.type, "size": self.size, "hash": self.hash,
                "serializer": self.serializer, "inline": self.inline}

    @classmethod
    def from_dict(cls, d: dict) -> ArtifactRef:
        return cls(name=sys.intern(d["name"]), type=sys.intern(d["type"]), size=int(d["size"]), hash=d["hash"],
                   serializer=sys.intern(d["serializer"]), inline=d.get("inline"))


# -- public API ----------------------------------------------------------------
def save_artifact(objects: ObjectStore, name: str, value: Any, step: str | None = None) -> ArtifactRef:
    """Persist ``value`` as artifact ``name``; raises SerializationError."""
    type_name = type_name_of(value)
    text = inline_json(value)
    if text is not None:
        return ArtifactRef(name, type_name, len(text.encode()), xxhash.xxh3_128_hexdigest(text.encode()),
                           "inline", text)
    try:
        serializer, key, size = _write_object(objects, value)
    except SerializationError:
        raise
    except OSError as exc:  # the disk, not the value: full, read-only, gone
        raise StoreError(f"artifact '{name}'{f' of step {step!r}' if step else ''} could not be written "
                         f"to {objects.root}: {exc}") from exc
    except Exception as exc:  # pickling fails with many types: TypeError, PicklingError, AttributeError...
        raise _unserialisable(name, value, step, exc) from exc
    return ArtifactRef(name, type_name, size, key, serializer)


def unsaved_ref(name: str, type_name: str) -> ArtifactRef:
    """The record of a value that could not be saved (see UNSAVED)."""
    return ArtifactRef(name, type_name, 0, "", UNSAVED)


def unsaved_message(ref: ArtifactRef, step: str | None = None) -> str:
    by = f"step '{step}'" if step else "its step"
    return (f"'{ref.name}' was not saved: {by} held a {ref.type} in it, which cannot be saved as an "
            f"artifact. Keep something that can be saved in '{ref.name}' (a path, the data it holds), "
            "or compute it in the step that reads it")


def load_artifact(objects: ObjectStore, ref: ArtifactRef, step: str | None = None) -> Any:
    """The stored value; arrays and frames are memory-mapped (copy-on-write).

    The object is checked against its hash first (see ``objects``): a damaged
    one raises StoreError naming the artifact, ``step`` and the object."""
    if ref.serializer == UNSAVED:
        raise SerializationError(unsaved_message(ref), variable=ref.name, type_name=ref.type)
    if ref.serializer == "inline":
        return json.loads(ref.inline) if ref.inline is not None else None
    reader = _READERS.get(ref.serializer)
    if reader is None:
        raise StoreError(f"artifact '{ref.name}' uses serializer '{ref.serializer}', which this "
                         f"version of flowmagic does not know (known: {', '.join(SERIALIZERS)})")
    try:
        mm = objects.map(ref.hash)
    except DamagedObjectError as exc:  # say which artifact it was
        raise DamagedObjectError(f"artifact '{ref.name}'{_of_step(step)} cannot be loaded: {exc}",
                                 key=exc.key, quarantined=exc.quarantined) from None
    except NotFoundError as exc:
        raise NotFoundError(f"artifact '{ref.name}'{_of_step(step)} cannot be loaded: {exc}") from None
    try:
        return reader(mm)
    # (an ImportError is left alone: a pickled class whose module is missing
    # here is the caller's to explain, not a damaged store)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, struct.error, KeyError, IndexError) as exc:
        if ref.serializer == "pickle" and verify_on_load():
            # The bytes matched their hash: not store damage, the value's own code failed to rebuild it.
            raise SerializationError(
                f"artifact '{ref.name}'{_of_step(step)} ({ref.type}) could not be rebuilt from its pickle: "
                f"its reconstructor raised {type(exc).__name__}: {exc} (the stored object is intact; "
                "the class's unpickling code, or its version here, is what fails)",
                variable=ref.name, type_name=ref.type, step=step) from exc
        raise StoreError(f"artifact '{ref.name}' (object {ref.hash}) cannot be read: {exc}") from exc


def _of_step(step: str | None) -> str:
    return f" of step '{step}'" if step else ""


def value_hash(value: Any) -> str:
    """A content hash of ``value`` (mutation detection, step cache keys).

    Equal for values that serialise to the same bytes; cheap for arrays (the
    raw buffer is hashed, no copy) and frames (pickle-5 buffers, no copy).
    """
    h = xxhash.xxh3_128()
    text = inline_json(value)
    if text is not None:
        h.update(b"inline:" + text.encode())
    elif _is_ndarray(value) and not value.dtype.hasobject:
        np = sys.modules["numpy"]
        h.update(f"ndarray:{value.dtype.str}:{value.shape}:".encode())
        h.update(memoryview(np.ascontiguousarray(value)).cast("B"))
    else:
        buffers: list[pickle.PickleBuffer] = []
        try:
            h.update(_dumps(value, buffers.append))
        except Exception as exc:
            raise _unserialisable("<value>", value, None, exc) from exc
        for b in buffers:
            h.update(b.raw())
    return h.hexdigest()


def type_name_of(value: Any) -> str:
    """A readable type name: "int", "pandas.DataFrame", "numpy.ndarray"."""
    cls = type(value)
    module, qualname = cls.__module__, cls.__qualname__
    if module == "builtins":
        return qualname
    top = module.split(".")[0]
    if getattr(sys.modules.get(top), qualname, None) is cls:
        return f"{top}.{qualname}"  # the public spelling (pandas.DataFrame, not pandas.core.frame)
    return f"{module}.{qualname}"


def inline_json(value: Any) -> str | None:
    """JSON text when ``value`` is small and plain enough to round-trip exactly."""
    if not _plain(value, depth=0):
        return None
    try:
        text = json.dumps(value, allow_nan=False, separators=(",", ":"))
    except (ValueError, TypeError):
        return None
    return text if len(text) <= INLINE_MAX else None


# -- choosing ------------------------------------------------------------------
def _plain(value: Any, depth: int) -> bool:
    t = type(value)
    if value is None or t is bool or t is str:
        return t is not str or len(value) <= INLINE_MAX
    if t is int:
        return abs(value) < 2**63
    if t is float:
        return math.isfinite(value)
    if depth >= 4:
        return False
    if t is list:
        return len(value) <= 64 and all(_plain(v, depth + 1) for v in value)
    if t is dict:
        return len(value) <= 64 and all(type(k) is str and _plain(v, depth + 1) for k, v in value.items())
    return False


def _write_object(objects: ObjectStore, value: Any) -> tuple[str, str, int]:
    """Store ``value`` as an object: ``(serializer, key, size)``."""
    serializer, write = _choose_writer(value)
    if serializer != "pickle":
        try:
            return (serializer, *objects.put_stream(lambda fh: write(value, fh)))
        except (ValueError, TypeError, ArithmeticError, NotImplementedError):
            pass  # Arrow refused what the cheap checks let through (say, a string that is not UTF-8)
    return ("pickle", *objects.put_stream(lambda fh: _write_pickle(value, fh)))


def _is_ndarray(value: Any) -> bool:
    """isinstance(value, numpy.ndarray), without importing numpy (no numpy, no arrays)."""
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.ndarray)


def _choose_writer(value: Any):
    module = type(value).__module__.split(".")[0]
    if module not in ("numpy", "pandas", "pyarrow", "polars") and not _is_ndarray(value):
        return "pickle", _write_pickle  # most values: no Arrow module is imported for them
    from . import _arrow

    if _is_ndarray(value) and _arrow.numpy_supported(value):
        return "arrow-numpy", _arrow.write_numpy
    if module == "pandas" and _arrow.pandas_supported(value):
        return "arrow-pandas", _arrow.write_pandas
    if module == "pandas" and _arrow.series_supported(value):
        return "arrow-pandas", _arrow.write_series
    if module == "pyarrow":
        import pyarrow as pa

        if type(value) is pa.Table:
            return "arrow-table", _arrow.write_table
    if module == "polars" and type(value).__name__ == "DataFrame":
        return "arrow-polars", _arrow.write_polars
    return "pickle", _write_pickle


# -- pickle-5 ------------------------------------------------------------------
def _dumps(value: Any, buffer_callback) -> memoryview:
    """Pickle protocol 5 with out-of-band buffers."""
    out = io.BytesIO()
    _Pickler(out, protocol=5, buffer_callback=buffer_callback).dump(value)
    return out.getbuffer()  # no copy of what may be a large in-band pickle


class _Pickler(pickle.Pickler):
    """Plain pickle, except for importable modules (by name) and functions and classes defined in a notebook:
    those live in ``__main__`` of one process only, so they are stored by
    value with cloudpickle (when installed) and load in any process.
    Everything else keeps pickle's rules (open files, locks, generators fail)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, types.ModuleType) and obj.__name__ != "__main__" and obj.__name__ in sys.modules:
            # `import numpy as np` in a step, `np` read by a later one: by reference, as Run All shares it
            return importlib.import_module, (obj.__name__,)
        if isinstance(obj, (types.FunctionType, type)) and _defined_interactively(obj):
            try:
                import cloudpickle
            except ImportError:
                return NotImplemented
            return cloudpickle.loads, (cloudpickle.dumps(obj, protocol=5),)
        return NotImplemented


def _defined_interactively(obj: Any) -> bool:
    module = getattr(obj, "__module__", None)
    return module in (None, "__main__") or module not in sys.modules or "<lambda>" in obj.__qualname__ \
        or "<locals>" in obj.__qualname__


def _write_pickle(value: Any, fh: BinaryIO) -> None:
    buffers: list[pickle.PickleBuffer] = []
    data = _dumps(value, buffers.append)
    raws = [b.raw() for b in buffers]
    header = _PICKLE_MAGIC + struct.pack(f"<IQ{len(raws)}Q", len(raws), len(data), *(r.nbytes for r in raws))
    pos = _write_padded(fh, header, 0)
    pos = _write_padded(fh, data, pos)
    for raw in raws:
        pos = _write_padded(fh, raw, pos)


def _write_padded(fh: BinaryIO, data: bytes | memoryview, pos: int) -> int:
    fh.write(data)
    pos += len(data) if isinstance(data, bytes) else data.nbytes
    pad = -pos % _ALIGN
    if pad:
        fh.write(b"\0" * pad)
    return pos + pad


def _read_pickle(mm: mmap.mmap) -> Any:
    if mm[:len(_PICKLE_MAGIC)] != _PICKLE_MAGIC:
        raise ValueError("not a flowmagic pickle object")
    pos = len(_PICKLE_MAGIC)
    count, length = struct.unpack_from("<IQ", mm, pos)
    pos += 12
    sizes = struct.unpack_from(f"<{count}Q", mm, pos)
    pos = _aligned(pos + 8 * count)
    if pos + length + sum(sizes) > len(mm):
        raise ValueError(f"the object is truncated ({len(mm)} bytes, its header announces more)")
    view = memoryview(mm)
    data = view[pos:pos + length]
    pos = _aligned(pos + length)
    buffers = []
    for size in sizes:
        buffers.append(view[pos:pos + size])
        pos = _aligned(pos + size)
    return pickle.loads(data, buffers=buffers)


def _aligned(pos: int) -> int:
    return pos + (-pos % _ALIGN)


def _arrow_reader(name: str):
    """A reader from ``_arrow``, which (with pyarrow and numpy) is imported on the first load."""
    def read(mm: mmap.mmap) -> Any:
        from . import _arrow

        return getattr(_arrow, name)(mm)

    return read


def _read_table(mm: mmap.mmap) -> Any:
    from . import _arrow

    return _arrow.read_table(mm)[0]


_READERS = {
    "arrow-numpy": _arrow_reader("read_numpy"),
    "arrow-pandas": _arrow_reader("read_pandas"),
    "arrow-table": _read_table,
    "arrow-polars": _arrow_reader("read_polars"),
    "pickle": _read_pickle,
}


def _unserialisable(name: str, value: Any, step: str | None, exc: BaseException) -> SerializationError:
    type_name = type_name_of(value)
    where = f"step '{step}': " if step else ""
    reason = str(exc).strip() or type(exc).__name__
    return SerializationError(
        f"{where}variable '{name}' holds a {type_name}, which cannot be saved as an artifact "
        f"({reason}). Rename it to _{name} to keep it private to the cell, or keep something "
        f"that can be saved instead (a path, a configuration, the data it holds).",
        variable=name, type_name=type_name, step=step)
