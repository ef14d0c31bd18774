"""Serialisers: every kind of value round-trips through real files."""
from __future__ import annotations

import datetime as dt
import decimal
import json
import mmap
import os
import socket
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from flowmagic.errors import NotFoundError, SerializationError, StoreError
from flowmagic.store.objects import ObjectStore
from flowmagic.store.serializers import ArtifactRef, load_artifact, save_artifact, value_hash


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


def roundtrip(objects: ObjectStore, value: Any, name: str = "v") -> tuple[Any, ArtifactRef]:
    ref = save_artifact(objects, name, value, step="start")
    ref = ArtifactRef.from_dict(json.loads(json.dumps(ref.to_dict())))  # as a manifest carries it
    return load_artifact(objects, ref), ref


def backed_by_mmap(arr: np.ndarray) -> bool:
    """True when the array's memory is a view of a memory-mapped file."""
    base: Any = arr
    while base is not None:
        if isinstance(base, mmap.mmap):
            return True
        if isinstance(base, memoryview):
            base = base.obj
            continue
        base = getattr(base, "base", None)
    return False


# -- inline -----------------------------------------------------------------------
@pytest.mark.parametrize("value", [
    0, -5, 2**62, 3.5, True, False, None, "", "text", [1, 2.5, "a", None], {"a": [1, {"b": 2}]}, [],
])
def test_small_plain_values_are_inline(objects: ObjectStore, value: Any) -> None:
    back, ref = roundtrip(objects, value)
    assert ref.serializer == "inline" and back == value and type(back) is type(value)
    assert list(objects.keys()) == []  # no object file


@pytest.mark.parametrize("value", [
    (1, 2), {1: "int key"}, float("nan"), float("inf"), "x" * 5000, 2**70, {"a", "b"},
    [(1, 2)], b"bytes", dt.date(2024, 1, 2), decimal.Decimal("1.10"), 1 + 2j,
])
def test_values_json_would_change_are_pickled(objects: ObjectStore, value: Any) -> None:
    back, ref = roundtrip(objects, value)
    assert ref.serializer == "pickle"
    if isinstance(value, float) and value != value:
        assert back != back
    else:
        assert back == value and type(back) is type(value)


def test_nested_lists_and_custom_objects(objects: ObjectStore) -> None:
    value = {"nested": [[1, [2, [3, [4, [5]]]]]], "arr": np.arange(5), "set": {1, 2}}
    back, ref = roundtrip(objects, value)
    assert ref.serializer == "pickle" and ref.type == "dict"
    assert back["nested"] == value["nested"] and back["set"] == {1, 2}
    np.testing.assert_array_equal(back["arr"], value["arr"])


# -- numpy -----------------------------------------------------------------------
ARRAYS = {
    "float64": np.linspace(0, 1, 101),
    "int32-2d": np.arange(24, dtype=np.int32).reshape(4, 6),
    "fortran": np.asfortranarray(np.arange(24.0).reshape(4, 6)),
    "non-contiguous": np.arange(100)[::3],
    "bool": np.array([True, False, True]),
    "float16": np.array([1.5, -2.0], dtype=np.float16),
    "big-endian": np.arange(5, dtype=">i8"),
    "complex": np.array([1 + 2j, 3 - 4j]),
    "datetime64": np.array(["2024-01-01", "NaT"], dtype="datetime64[ns]"),
    "timedelta64": np.array([1, 2], dtype="timedelta64[s]"),
    "unicode": np.array(["ab", "cde"]),
    "bytes": np.array([b"ab", b"c"]),
    "nan": np.array([np.nan, 1.0, np.inf]),
    "zero-size": np.zeros((0, 3)),
    "zero-dim": np.array(7.5),
    "structured": np.array([(1, 2.0, "x"), (3, 4.0, "y")], dtype=[("a", "i4"), ("b", "f8"), ("c", "U3")]),
    "nested-structured": np.zeros(3, dtype=[("p", [("x", "f4"), ("y", "f4")]), ("v", "i2", (2,))]),
    "3d": np.random.default_rng(0).random((3, 4, 5)),
}


@pytest.mark.parametrize("name", sorted(ARRAYS))
def test_numpy_arrays_roundtrip_through_arrow(objects: ObjectStore, name: str) -> None:
    arr = ARRAYS[name]
    back, ref = roundtrip(objects, arr)
    assert ref.serializer == "arrow-numpy" and ref.type == "numpy.ndarray"
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)
    if back.size:
        assert backed_by_mmap(back)
        assert back.flags.writeable  # copy-on-write mapping
        back.flat[0] = back.flat[-1]
        again = load_artifact(objects, ref)  # the stored object did not change
        np.testing.assert_array_equal(again, arr)


def test_memmaps_and_array_subclasses(objects: ObjectStore, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.arange(1000.0))
    mapped = np.load(tmp_path / "a.npy", mmap_mode="r")
    back, ref = roundtrip(objects, mapped)
    assert ref.serializer == "arrow-numpy" and type(back) is np.ndarray
    np.testing.assert_array_equal(back, np.arange(1000.0))
    masked = np.ma.masked_array([1, 2, 3], mask=[0, 1, 0])
    back, ref = roundtrip(objects, masked)
    assert ref.serializer == "pickle" and back.mask.tolist() == [False, True, False]


def test_object_arrays_are_pickled(objects: ObjectStore) -> None:
    arr = np.array([{"a": 1}, None, "x"], dtype=object)
    back, ref = roundtrip(objects, arr)
    assert ref.serializer == "pickle" and list(back) == list(arr)


def test_pickled_objects_keep_big_arrays_out_of_band(objects: ObjectStore) -> None:
    big = np.arange(1_000_000, dtype=np.float64)
    back, ref = roundtrip(objects, {"weights": big, "label": "w"})
    assert ref.serializer == "pickle"
    assert ref.size < big.nbytes + 4096  # raw buffer, no pickle framing copy
    assert backed_by_mmap(back["weights"]) and back["weights"].flags.writeable
    np.testing.assert_array_equal(back["weights"], big)


@pytest.mark.slow
def test_a_1gb_array_loads_memory_mapped_without_copying(objects: ObjectStore) -> None:
    psutil = pytest.importorskip("psutil")
    arr = np.ones(1 << 27, dtype=np.float64)  # 1 GiB
    ref = save_artifact(objects, "big", arr)
    del arr
    process = psutil.Process()
    before = process.memory_info().rss
    back = load_artifact(objects, ref)
    after = process.memory_info().rss
    assert back.nbytes == 1 << 30 and backed_by_mmap(back)
    assert after - before < 64 << 20  # nothing was read into memory
    assert back[12345] == 1.0 and back[-1] == 1.0
    back[0] = 2.0  # copy-on-write: one page, the object is unchanged
    assert load_artifact(objects, ref)[0] == 1.0


# -- pandas -----------------------------------------------------------------------
def _rich_frame() -> pd.DataFrame:
    df = pd.DataFrame(
        {
            "i": [1, 2, 3],
            "f": [1.5, np.nan, 3.0],
            "s": ["a", None, "c"],
            "obj_str": pd.Series(["x", None, "z"], index=[10, 20, 30], dtype=object),
            "cat": pd.Categorical(["u", "v", "u"], categories=["v", "u"], ordered=True),
            "ts": pd.to_datetime(["2024-01-01", None, "2024-03-01"]),
            "tz": pd.to_datetime(["2024-01-01 10:00", "2024-06-01 12:00", None]).tz_localize("Europe/Paris"),
            "b": [True, False, True],
            "nullable": pd.array([1, None, 3], dtype="Int64"),
            "td": pd.to_timedelta([1, 2, 3], unit="s"),
        },
        index=pd.Index([10, 20, 30], name="key"),
    )
    assert df["obj_str"].dtype == object
    return df


FRAMES = {
    "rich": _rich_frame(),
    "zero-rows": _rich_frame().iloc[:0],
    "string-index": pd.DataFrame({"x": [1, 2]}, index=pd.Index(["a", "b"], name="k")),
    "multiindex": pd.DataFrame({"x": [1, 2]}, index=pd.MultiIndex.from_tuples([("a", 1), ("b", 2)], names=["k", "n"])),
    "datetime-index": pd.DataFrame({"x": [1.0, 2.0]}, index=pd.date_range("2024", periods=2, tz="UTC")),
    "period": pd.DataFrame({"p": pd.period_range("2024-01", periods=2, freq="M")}),
    "index-name-clash": pd.DataFrame({"a": [1, 2]}, index=pd.Index([5, 6], name="a")),
    "non-unique-index": pd.DataFrame({"a": [1, 2]}, index=[1, 1]),
    "float-index-nan": pd.DataFrame({"a": [1, 2]}, index=[1.5, np.nan]),
    "uint64-max": pd.DataFrame({"u": np.array([2**64 - 1, 0], dtype=np.uint64)}),
    "nullable-bool": pd.DataFrame({"b": pd.array([True, None], dtype="boolean")}),
    "interval": pd.DataFrame({"i": pd.arrays.IntervalArray.from_breaks([0, 1, 2])}),
    "categorical-index": pd.DataFrame({"a": [1, 2]}, index=pd.CategoricalIndex(["x", "y"])),
    "timedelta-index": pd.DataFrame({"a": [1, 2]}, index=pd.to_timedelta([1, 2], unit="s")),
    "pyarrow-dtype": pd.DataFrame({"x": pd.array([1, None], dtype="int64[pyarrow]")}),
    "named-columns-axis": pd.DataFrame({"a": [1]}).rename_axis("cols", axis=1),
    "range-index-step": pd.DataFrame({"x": [1, 2, 3]}, index=pd.RangeIndex(5, 11, 2)),
}


@pytest.mark.parametrize("name", sorted(FRAMES))
def test_pandas_frames_roundtrip_through_arrow(objects: ObjectStore, name: str) -> None:
    df = FRAMES[name]
    back, ref = roundtrip(objects, df)
    assert ref.serializer == "arrow-pandas" and ref.type == "pandas.DataFrame"
    pd.testing.assert_frame_equal(back, df)


def test_loaded_frames_are_zero_copy_and_writable(objects: ObjectStore) -> None:
    df = _rich_frame()
    back, _ = roundtrip(objects, df)
    assert backed_by_mmap(back["f"].to_numpy())
    back.loc[10, "i"] = 100
    back.loc[20, "cat"] = "u"
    back["f"] += 1
    back.iloc[0, back.columns.get_loc("tz")] = pd.Timestamp("2025-01-01", tz="Europe/Paris")
    assert back.loc[10, "i"] == 100 and back.loc[20, "cat"] == "u"
    again, _ = roundtrip(objects, df)
    pd.testing.assert_frame_equal(again, df)  # the stored object is unchanged


FRAMES_PICKLED = {
    "mixed-object": pd.DataFrame({"m": [1, "a", None]}),
    "list-column": pd.DataFrame({"l": [[1, 2], [3]]}),
    "int-column-names": pd.DataFrame({1: [1], 2: [2]}),
    "duplicate-columns": pd.DataFrame([[1, 2]], columns=["a", "a"]),
    "attrs": pd.DataFrame({"x": [1]}).pipe(lambda d: d.attrs.update(source="db") or d),
    "multiindex-columns": pd.DataFrame([[1, 2]], columns=pd.MultiIndex.from_tuples([("a", "b"), ("a", "c")])),
    "no-columns": pd.DataFrame(index=[1, 2]),
    "sparse": pd.DataFrame({"s": pd.arrays.SparseArray([0, 0, 1])}),
    "mixed-time-zones": pd.DataFrame({"t": [pd.Timestamp("2020", tz="UTC"), pd.Timestamp("2020", tz="Europe/Paris")]}),
    "dict-column": pd.DataFrame({"d": [{"a": 1}, {"b": 2}]}),
    "not-utf8-strings": pd.DataFrame({"s": pd.Series(["ok", "lone surrogate \ud800"], dtype=object)}),
    "object-nan-missing": pd.DataFrame({"o": pd.Series(["x", np.nan], dtype=object)}),
}


@pytest.mark.parametrize("name", sorted(FRAMES_PICKLED))
def test_frames_arrow_would_change_fall_back_to_pickle(objects: ObjectStore, name: str) -> None:
    df = FRAMES_PICKLED[name]
    back, ref = roundtrip(objects, df)
    assert ref.serializer == "pickle"
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs == df.attrs


@pytest.mark.parametrize("series, serializer", [
    (pd.Series([1.0, None, 3.0], name="x", index=pd.Index(["a", "b", "c"], dtype="str")), "arrow-pandas"),
    (pd.Series([1, 2], name=None), "arrow-pandas"),
    (pd.Series(pd.Categorical(["a", "b"]), name=7), "arrow-pandas"),
    (pd.Series(pd.date_range("2024", periods=3, tz="UTC"), name="__series__"), "arrow-pandas"),
    (pd.Series([1, "mixed"], name="m"), "pickle"),
    (pd.Series([1], name=("tuple", "name")), "pickle"),
])
def test_series_roundtrip(objects: ObjectStore, series: pd.Series, serializer: str) -> None:
    back, ref = roundtrip(objects, series)
    assert ref.serializer == serializer and ref.type == "pandas.Series"
    pd.testing.assert_series_equal(back, series)
    if serializer == "arrow-pandas" and series.dtype == np.float64:
        assert backed_by_mmap(back.to_numpy())
        back.iloc[0] = 5.0


def test_arrow_tables_roundtrip(objects: ObjectStore) -> None:
    table = pa.table({"a": [1, 2, None], "b": ["x", "y", "z"], "l": [[1], [], [2, 3]]},
                     metadata={"owner": "me"})
    back, ref = roundtrip(objects, table)
    assert ref.serializer == "arrow-table" and ref.type == "pyarrow.Table"
    assert back.equals(table) and back.schema.metadata == {b"owner": b"me"}


def test_polars_frames_roundtrip(objects: ObjectStore) -> None:
    import polars as pl  # in the test extra
    df = pl.DataFrame({"a": [1, 2], "b": ["x", None]})
    back, ref = roundtrip(objects, df)
    assert ref.serializer == "arrow-polars" and back.equals(df)


# -- functions defined in a notebook ---------------------------------------------
def test_notebook_functions_load_in_another_process(objects: ObjectStore) -> None:
    """A lambda or def from __main__ is stored by value: a fresh interpreter,
    which never saw its source, can call it."""
    code = textwrap.dedent("""
        import sys
        from flowmagic.store.objects import ObjectStore
        from flowmagic.store.serializers import save_artifact
        SCALE = 3
        def scale(x):
            return x * SCALE
        class Box:
            def __init__(self, v): self.v = v
        ref = save_artifact(ObjectStore(sys.argv[1]), "f", {"f": scale, "g": lambda y: y + 1, "box": Box(4)})
        print(ref.hash)
    """)
    out = subprocess.run([sys.executable, "-c", code, str(objects.root)], capture_output=True, text=True,
                         check=True)
    key = out.stdout.strip()
    load = textwrap.dedent(f"""
        import sys
        from flowmagic.store.objects import ObjectStore
        from flowmagic.store.serializers import ArtifactRef, load_artifact
        ref = ArtifactRef("f", "dict", 0, "{key}", "pickle")
        d = load_artifact(ObjectStore(sys.argv[1]), ref)
        print(d["f"](2), d["g"](2), d["box"].v)
    """)
    out = subprocess.run([sys.executable, "-c", load, str(objects.root)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["6", "3", "4"]


# -- errors -----------------------------------------------------------------------
def _generator():
    yield 1


@pytest.mark.parametrize("make, type_name", [
    (lambda tmp: open(tmp / "f.txt", "w"), "_io.TextIOWrapper"),
    (lambda tmp: _generator(), "generator"),
    (lambda tmp: threading.Lock(), "_thread.lock"),
    (lambda tmp: socket.socket(), "socket.socket"),
    (lambda tmp: {"nested": [threading.Lock()]}, "dict"),
])
def test_unserialisable_values_name_variable_type_and_step(objects: ObjectStore, tmp_path: Path, make,
                                                           type_name: str) -> None:
    value = make(tmp_path)
    try:
        with pytest.raises(SerializationError) as info:
            save_artifact(objects, "conn", value, step="load")
    finally:
        getattr(value, "close", lambda: None)()
    err = info.value
    assert (err.variable, err.type_name, err.step) == ("conn", type_name, "load")
    assert "'conn'" in str(err) and type_name in str(err) and "step 'load'" in str(err)
    assert list(objects.keys()) == [] and list(objects.tmp_dir.iterdir()) == []


def test_missing_object_and_unknown_serializer(objects: ObjectStore) -> None:
    with pytest.raises(NotFoundError, match="missing"):
        load_artifact(objects, ArtifactRef("x", "int", 1, "0" * 32, "pickle"))
    ref = save_artifact(objects, "x", [1, 2, (3,)])
    with pytest.raises(StoreError, match="serializer 'zstd-magic'"):
        load_artifact(objects, ArtifactRef("x", "list", ref.size, ref.hash, "zstd-magic"))


def test_truncated_objects_are_a_store_error(objects: ObjectStore) -> None:
    for value in (np.arange(100_000), pd.DataFrame({"a": np.arange(100_000)}), {"w": np.arange(100_000)}):
        ref = save_artifact(objects, "x", value)
        path = objects.path(ref.hash)
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.truncate(ref.size // 2)
        with pytest.raises(StoreError, match="artifact 'x'.*damaged"):
            load_artifact(objects, ref)


def test_truncated_objects_are_a_store_error_without_verification(objects: ObjectStore, monkeypatch) -> None:
    monkeypatch.setenv("FLOWMAGIC_VERIFY_OBJECTS", "0")  # the codecs' own checks still hold
    for value in (np.arange(100_000), pd.DataFrame({"a": np.arange(100_000)}), {"w": np.arange(100_000)}):
        ref = save_artifact(objects, "x", value)
        path = objects.path(ref.hash)
        os.chmod(path, 0o644)
        with open(path, "r+b") as f:
            f.truncate(ref.size // 2)
        with pytest.raises(StoreError, match="artifact 'x'.*cannot be read"):
            load_artifact(objects, ref)


def test_corrupted_object_is_a_store_error(objects: ObjectStore) -> None:
    for value in (np.arange(10), pd.DataFrame({"a": [1]}), {"a": (1,)}):
        ref = save_artifact(objects, "x", value)
        path = objects.path(ref.hash)
        os.chmod(path, 0o644)
        path.write_bytes(b"garbage" * 10)
        with pytest.raises(StoreError, match="artifact 'x'"):
            load_artifact(objects, ref)


# -- hashing and de-duplication ------------------------------------------------
def test_value_hash_tracks_content() -> None:
    arr = np.arange(10)
    h = value_hash(arr)
    assert h == value_hash(np.arange(10))
    arr[0] = 99
    assert value_hash(arr) != h
    df = _rich_frame()
    hd = value_hash(df)
    assert hd == value_hash(_rich_frame())
    df.loc[10, "i"] = 7
    assert value_hash(df) != hd
    lst = [1, 2]
    hl = value_hash(lst)
    lst.append(3)
    assert value_hash(lst) != hl
    assert value_hash(np.arange(3, dtype=np.int64)) != value_hash(np.arange(3, dtype=np.int32))


def test_saving_the_same_value_twice_adds_no_bytes(objects: ObjectStore) -> None:
    values = {"arr": np.random.default_rng(1).random(500_000), "df": _rich_frame(), "obj": {"k": list(range(1000))}}
    first = {k: save_artifact(objects, k, v) for k, v in values.items()}
    used = _disk_usage(objects.root)
    second = {k: save_artifact(objects, k, v, step="again") for k, v in values.items()}
    assert {k: r.hash for k, r in first.items()} == {k: r.hash for k, r in second.items()}
    assert _disk_usage(objects.root) - used == 0
    assert used > 4_000_000


def _disk_usage(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_a_full_disk_is_a_store_error_not_a_serialization_error(objects: ObjectStore,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk cannot be made for real in a test: the temporary file's
    writes fail as the kernel's would (ENOSPC); the value is fine."""
    from flowmagic.store import objects as objects_module

    class FullDiskTemp(objects_module._TempFile):
        def __enter__(self):
            fh, path = super().__enter__()
            return _FullFile(), path

    monkeypatch.setattr(objects, "_temp_file", lambda: FullDiskTemp(objects.tmp_dir))
    with pytest.raises(StoreError, match="artifact 'arr' of step 'load' could not be written.*No space left"):
        save_artifact(objects, "arr", np.arange(1000), step="load")
    assert list(objects.keys()) == [] and list(objects.tmp_dir.iterdir()) == []


class _FullFile:
    def write(self, data) -> int:
        import errno

        raise OSError(errno.ENOSPC, "No space left on device")

    def flush(self) -> None:
        pass
