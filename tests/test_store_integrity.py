"""Verified objects: real bit flips in stored Arrow arrays, frames and pickles."""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowmagic.errors import NotFoundError, StoreError
from flowmagic.store.objects import DamagedObjectError, ObjectStore
from flowmagic.store.serializers import load_artifact, save_artifact


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


def flip_bit(path: Path, at: float = 0.75) -> None:
    """Flip one bit of a stored object in place, as a failing disk would."""
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(int(size * at))
        byte = f.read(1)[0]
        f.seek(int(size * at))
        f.write(bytes([byte ^ 0x10]))


VALUES = {
    "arrow-numpy": lambda: np.arange(200_000, dtype=np.float64),
    "arrow-pandas": lambda: pd.DataFrame({"a": np.arange(100_000), "b": np.linspace(0, 1, 100_000)}),
    "pickle (raw numpy buffer)": lambda: {"w": np.arange(100_000), "name": "weights"},
    "pickle (plain)": lambda: [object.__name__] * 5000 + [set(range(1000))],
}


@pytest.mark.parametrize("kind", list(VALUES))
def test_a_flipped_bit_is_a_clear_error_and_the_object_is_quarantined(objects: ObjectStore, kind: str) -> None:
    ref = save_artifact(objects, "weights", VALUES[kind](), step="train")
    flip_bit(objects.path(ref.hash))
    with pytest.raises(DamagedObjectError) as info:
        load_artifact(objects, ref, step="train")
    message = str(info.value)
    assert "artifact 'weights' of step 'train'" in message and ref.hash in message and "damaged" in message
    assert not objects.exists(ref.hash)
    [moved] = objects.quarantined(ref.hash)
    assert moved.parent == objects.root / "quarantine"
    # later loads say what happened, not "removed by gc"
    with pytest.raises(NotFoundError, match="found damaged and moved to"):
        load_artifact(objects, ref, step="train")


@pytest.mark.parametrize("kind", list(VALUES))
def test_the_next_writer_of_the_same_content_stores_it_anew(objects: ObjectStore, kind: str) -> None:
    value = VALUES[kind]()
    ref = save_artifact(objects, "x", value)
    flip_bit(objects.path(ref.hash))
    again = save_artifact(objects, "x", value)  # de-duplication checks before it re-uses
    assert again.hash == ref.hash
    assert objects.verify(ref.hash)
    assert len(objects.quarantined(ref.hash)) == 1
    back = load_artifact(objects, again)
    if isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(back, value)
    elif isinstance(value, np.ndarray):
        np.testing.assert_array_equal(back, value)
    else:
        assert repr(back) == repr(value)


def test_put_bytes_rewrites_a_damaged_copy(objects: ObjectStore) -> None:
    data = os.urandom(1 << 20)
    key = objects.put_bytes(data)
    flip_bit(objects.path(key), 0.5)
    with pytest.raises(DamagedObjectError, match=key):
        objects.get_bytes(key)
    assert objects.put_bytes(data) == key and objects.get_bytes(key) == data


def test_a_good_copy_published_meanwhile_is_not_quarantined(objects: ObjectStore) -> None:
    data = os.urandom(4096)
    key = objects.put_bytes(data)
    stale = objects.path(key).stat()
    objects.quarantine(key)
    objects.put_bytes(data)  # another writer stored it again: a new file
    assert objects.quarantine(key, stale) is None and objects.get_bytes(key) == data


def test_the_opt_out_skips_the_check_on_load(objects: ObjectStore, monkeypatch) -> None:
    ref = save_artifact(objects, "a", np.arange(1000, dtype=np.int64))
    flip_bit(objects.path(ref.hash), 0.6)
    monkeypatch.setenv("FLOWMAGIC_VERIFY_OBJECTS", "0")
    assert load_artifact(objects, ref).sum() != np.arange(1000).sum()  # what the user opted into
    monkeypatch.delenv("FLOWMAGIC_VERIFY_OBJECTS")
    with pytest.raises(StoreError, match="damaged"):
        load_artifact(objects, ref)


def test_verifying_a_100mb_array_adds_at_most_15ms(objects: ObjectStore, monkeypatch) -> None:
    ref = save_artifact(objects, "big", np.random.default_rng(0).random(100_000_000 // 8))

    def best_load_ms() -> float:
        best = float("inf")
        for _ in range(9):
            t0 = time.perf_counter()
            load_artifact(objects, ref)
            best = min(best, time.perf_counter() - t0)
        return best * 1e3

    verified = best_load_ms()
    monkeypatch.setenv("FLOWMAGIC_VERIFY_OBJECTS", "0")
    lazy = best_load_ms()
    print(f"100 MB array load: {lazy:.2f} ms unverified, {verified:.2f} ms verified")
    assert verified - lazy < 15.0


def test_the_inspector_preview_of_a_damaged_frame_says_so(objects: ObjectStore) -> None:
    from flowmagic.widgets.preview import preview_artifact

    ref = save_artifact(objects, "frame", pd.DataFrame({"v": np.arange(10_000, dtype=np.float64)}))
    assert preview_artifact(objects, ref)["kind"] == "frame"
    flip_bit(objects.path(ref.hash))
    shown = preview_artifact(objects, ref)
    assert shown["kind"] == "none" and "damaged" in shown["text"]
