"""ObjectStore: content addressing, de-duplication, atomic publication."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import xxhash

from flowmagic.errors import NotFoundError
from flowmagic.store.objects import ObjectStore


@pytest.fixture
def objects(tmp_path: Path) -> ObjectStore:
    return ObjectStore(tmp_path / "objects")


def test_put_bytes_is_content_addressed_and_sharded(objects: ObjectStore) -> None:
    key = objects.put_bytes(b"hello")
    assert key == xxhash.xxh3_128_hexdigest(b"hello")
    path = objects.path(key)
    assert path.parent.name == key[:2] and path.name == key[2:]
    assert path.read_bytes() == b"hello"
    assert objects.exists(key) and objects.get_bytes(key) == b"hello"


def test_published_objects_are_read_only(objects: ObjectStore) -> None:
    key = objects.put_bytes(b"immutable")
    assert not os.access(objects.path(key), os.W_OK) or os.geteuid() == 0
    assert objects.path(key).stat().st_mode & 0o222 == 0


def test_put_stream_hashes_what_was_written(objects: ObjectStore) -> None:
    def write(fh):
        fh.write(b"abc")
        fh.write(memoryview(b"def"))

    key, size = objects.put_stream(write)
    assert size == 6
    assert key == objects.put_bytes(b"abcdef")
    assert objects.get_bytes(key) == b"abcdef"


def test_identical_content_is_stored_once(objects: ObjectStore) -> None:
    first = objects.put_bytes(b"x" * 10_000)
    mtime = objects.path(first).stat().st_mtime_ns
    second, _ = objects.put_stream(lambda fh: fh.write(b"x" * 10_000))
    assert first == second
    assert list(objects.keys()) == [first]
    assert objects.path(first).stat().st_mtime_ns >= mtime  # touched, so gc spares it
    assert list(objects.tmp_dir.iterdir()) == []


def test_a_failing_writer_leaves_nothing(objects: ObjectStore) -> None:
    def write(fh):
        fh.write(b"partial")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        objects.put_stream(write)
    assert list(objects.keys()) == []
    assert list(objects.tmp_dir.iterdir()) == []


def test_missing_and_malformed_keys(objects: ObjectStore) -> None:
    assert not objects.exists("0" * 32)
    assert not objects.exists("not-a-key")
    with pytest.raises(NotFoundError, match="missing"):
        objects.get_bytes("0" * 32)
    with pytest.raises(NotFoundError, match="not an object key"):
        objects.path("../../etc/passwd")


_SLOW_WRITER = textwrap.dedent("""
    import sys, time
    from flowmagic.store.objects import ObjectStore
    store = ObjectStore(sys.argv[1])
    def write(fh):
        chunk = b"\\1" * (1 << 20)
        for i in range(100_000):          # 100 GB: never finishes
            fh.write(chunk)
            if i == 8:
                print("writing", flush=True)
    store.put_stream(write)
""")


def test_sigkill_mid_object_leaves_no_visible_partial_object(objects: ObjectStore) -> None:
    done = objects.put_bytes(b"written before the crash")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, str(objects.root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL

    # The partial data exists only as a temporary file: never under a key.
    temps = list(objects.tmp_dir.iterdir())
    assert len(temps) == 1 and temps[0].stat().st_size >= 9 << 20
    assert list(objects.keys()) == [done]
    for key in objects.keys():
        assert xxhash.xxh3_128_hexdigest(objects.get_bytes(key)) == key
    # and the store keeps working
    assert objects.put_bytes(b"after") in set(objects.keys())


def test_writing_after_tmp_was_removed(objects: ObjectStore) -> None:
    import shutil

    shutil.rmtree(objects.root)
    key = objects.put_bytes(b"the store dir was deleted under a running kernel")
    assert objects.get_bytes(key).startswith(b"the store")


_ARRAY_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from flowmagic.store.objects import ObjectStore
    from flowmagic.store.serializers import save_artifact
    big = np.ones(100_000_000)                        # 800 MB
    print("saving", flush=True)
    save_artifact(ObjectStore(sys.argv[1]), "big", big, step="train")
    print("saved", flush=True)
""")


@pytest.mark.slow
def test_sigkill_while_saving_a_huge_array(tmp_path: Path) -> None:
    """A task killed while it writes an 800 MB array leaves no object, and gc
    removes its temporary file once the grace period has passed."""
    from flowmagic.store import open_store
    from flowmagic.store.gc import gc

    store = open_store(tmp_path / "store")
    run_id = store.meta.new_run("F", params={}, code={})
    proc = subprocess.Popen([sys.executable, "-c", _ARRAY_WRITER, str(store.objects.root)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until the object is partly written
        sizes = [p.stat().st_size for p in store.objects.tmp_dir.iterdir()]
        if sizes and max(sizes) > 50 << 20:
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert proc.stdout.read() == ""  # it never finished

    assert list(store.objects.keys()) == []
    assert store.meta.get_run("F", run_id).status == "running"  # metadata unharmed
    assert gc(store, grace_seconds=0).temp_files_removed == 0  # the run is live: its writer may be too
    store.meta.finish_run("F", run_id, "failed")  # the orchestrator records the killed task
    assert gc(store, grace_seconds=0).temp_files_removed == 1
    assert list(store.objects.tmp_dir.iterdir()) == []
