"""A full disk fails loudly: the store lives on a real, small tmpfs (mounted
for the test; needs root), and a step writes more than fits."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from runtime_helpers import artifacts, flowmagic, flowmagic_json, run_record, write_notebook
from flowmagic.store import open_store

NB = [
    "import numpy as np",
    "%%params\nn = 10  # how many floats the throwaway array holds",
    "%%step start\nsmall = 1\njunk = np.ones(n)  # no later step reads it",
    "%%step end\ny = small + 1",
]


@pytest.fixture
def small_disk(tmp_path: Path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_an_artifact_that_does_not_fit_fails_the_run_with_the_os_error(tmp_path, small_disk):
    store = small_disk / "store"
    nb = write_notebook(tmp_path / "full.ipynb", NB)
    assert flowmagic_json("run", nb, store=store)["status"] == "succeeded"

    proc = flowmagic("run", nb, "--n", "2000000", store=store)  # 16 MB on a 6 MB disk
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "No space left on device" in out and "artifact 'junk' of step 'start'" in out
    assert "cannot be saved" not in out and "not persisted" not in out
    assert run_record(store, "Full", 2).status == "failed"
    # nothing half-written is visible, and the earlier run is intact
    assert list((store / "objects" / "tmp").iterdir()) == []
    assert artifacts(store, "Full", 1, "end") == [{"y": 2}]
    assert flowmagic_json("fsck", store, store=store)["ok"]


@pytest.mark.slow
def test_a_full_disk_under_the_database_says_so_and_the_store_stays_usable(tmp_path, small_disk):
    store = small_disk / "store"
    nb = write_notebook(tmp_path / "full.ipynb", NB)
    assert flowmagic_json("run", nb, store=store)["run_id"] == 1
    filler = small_disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode in (1, 2), proc.stdout + proc.stderr
    assert "No space left on device" in proc.stdout + proc.stderr
    assert "corrupted" not in proc.stderr and "Traceback" not in proc.stderr
    filler.unlink()
    doc = flowmagic_json("run", nb, store=store)
    assert doc["status"] == "succeeded" and doc["run_id"] >= 2
    assert artifacts(store, "Full", 1, "end") == [{"y": 2}]
    s = open_store(store)
    try:
        assert s.meta.integrity_check() == ["ok"]
    finally:
        s.close()
