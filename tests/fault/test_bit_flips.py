"""Bit flips in a real store, seen through the real console: a damaged object
is never used silently, fsck finds it, and the next run writes it anew."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from runtime_helpers import artifacts, flowmagic, flowmagic_json, write_notebook
from flowmagic.store import open_store

pytestmark = pytest.mark.slow   # real console runs, resumes and fsck over damaged stores: not in the quick loop

NB = [
    "import numpy as np\nimport pandas as pd",
    "%%step start\narr = np.arange(1_000_000, dtype=np.int64)\n"
    "frame = pd.DataFrame({'v': np.arange(50_000, dtype=np.float64)})\n"
    "bag = {'w': np.ones(100_000), 'tag': 'x'}",
    "%%step end\ntotal = int(arr.sum()) + int(frame.v.sum()) + int(bag['w'].sum())",
]
TOTAL = sum(range(1_000_000)) + sum(range(50_000)) + 100_000


@pytest.fixture
def store(tmp_path) -> Path:
    return tmp_path / "store"


def object_of(store: Path, flow: str, run_id: int, step: str, name: str) -> str:
    s = open_store(store)
    try:
        [task] = s.meta.tasks(flow, run_id, step)
        return next(r.hash for r in s.meta.artifacts(task.task_id) if r.name == name)
    finally:
        s.close()


def flip_bit(path: Path) -> None:
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size * 3 // 4)
        byte = f.read(1)[0]
        f.seek(size * 3 // 4)
        f.write(bytes([byte ^ 0x01]))


@pytest.mark.parametrize("name", ["arr", "frame", "bag"])
def test_resume_over_a_flipped_bit_fails_naming_the_artifact_and_a_new_run_heals(tmp_path, store, name):
    nb = write_notebook(tmp_path / "sums.ipynb", NB)
    assert flowmagic_json("run", nb, store=store)["status"] == "succeeded"
    key = object_of(store, "Sums", 1, "start", name)
    flip_bit(store / "objects" / key[:2] / key[2:])

    proc = flowmagic("resume", nb, "--from", "end", store=store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert f"artifact '{name}' of step 'start'" in out and key in out and "damaged" in out

    doc = flowmagic_json("run", nb, store=store)  # writes the quarantined object anew
    assert doc["status"] == "succeeded" and artifacts(store, "Sums", doc["run_id"], "end") == [{"total": TOTAL}]
    report = flowmagic_json("fsck", store, store=store)
    assert report["ok"] and report["damaged"] == [] and report["missing"] == [] and report["quarantined"] == 1


def test_fsck_finds_damage_and_repair_quarantines_it(tmp_path, store):
    nb = write_notebook(tmp_path / "sums.ipynb", NB)
    flowmagic_json("run", nb, store=store)
    key = object_of(store, "Sums", 1, "start", "frame")
    flip_bit(store / "objects" / key[:2] / key[2:])

    report = flowmagic_json("fsck", nb, store=store, expect=1)
    assert [d["object"] for d in report["damaged"]] == [key] and report["damaged"][0]["quarantined_to"] is None
    assert report["database"] == {"ok": True, "messages": ["ok"]} and report["objects_checked"] >= 3

    report = flowmagic_json("fsck", nb, "--repair", store=store, expect=1)
    assert report["damaged"][0]["quarantined_to"] and report["quarantined"] == 1
    assert [(m["object"], m["name"], m["run_id"], m["step"]) for m in report["missing"]] == [(key, "frame", 1, "start")]
    text = flowmagic("fsck", nb, store=store)
    assert text.returncode == 1 and "Sums/1" in text.stdout and "run them again" in text.stdout

    flowmagic_json("run", nb, store=store)
    assert flowmagic_json("fsck", nb, store=store)["ok"]


def test_fsck_reports_a_damaged_database(tmp_path, store):
    nb = write_notebook(tmp_path / "sums.ipynb", NB)
    for _ in range(3):
        flowmagic_json("run", nb, store=store)
    db = store / "metadata.sqlite"
    s = open_store(store)
    s.meta._read("PRAGMA wal_checkpoint(TRUNCATE)")
    page_size = s.meta._read("PRAGMA page_size")[0][0]
    pages = db.stat().st_size // page_size
    s.close()
    with open(db, "r+b") as f:  # scribble over the b-tree pages past the schema
        for page in range(2, pages):
            f.seek(page * page_size + 16)
            f.write(b"\x0d\xff\xff\xff" * 8)
    proc = flowmagic("fsck", nb, "--json", store=store)
    assert proc.returncode in (1, 2), proc.stderr
    if proc.returncode == 1:
        report = json.loads(proc.stdout)
        assert not report["database"]["ok"] and report["database"]["messages"] != ["ok"]
    else:  # too damaged to open at all: one clear line
        assert proc.stderr.startswith("flowmagic: error:") and "Traceback" not in proc.stderr


def test_fsck_without_a_store_is_a_usage_error(tmp_path, store):
    proc = flowmagic("fsck", tmp_path / "nowhere", store=store)
    assert proc.returncode == 2 and "no flowmagic store" in proc.stderr and "Traceback" not in proc.stderr
