"""The S3 object-store plug-in, end to end: the real `flowmagic` command, a real S3 API
(moto's server, started here), real SQLite in two FLOWMAGIC_HOMEs."""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")

from runtime_helpers import command, write_notebook  # noqa: E402
from s3_helpers import CREDENTIALS, FaultProxy, MotoServer, s3_env  # noqa: E402

from flowmagic.store import open_store  # noqa: E402
from flowmagic.store.objects import hash_bytes  # noqa: E402

pytestmark = pytest.mark.slow

FOREACH_NB = [
    "import numpy as np",
    "%%step start\nparams = [1, 2, 3]\nshared = np.arange(1000)\ntext = 'hello'",
    "%%step compute --foreach params\nvalue = input * 10\nsquares = shared * input\nsame = text",
    "%%step join\ntotal = sum(value)\nlast = squares[-1][-1]",
]


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture
def bucket(moto) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    moto.make_bucket(name)
    return name


def run(*args, env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def run_json(*args, env: dict[str, str], expect: int = 0) -> dict:
    proc = run(*args, "--json", env=env)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def values(home: Path, env: dict[str, str], flow: str, run_id: int) -> dict:
    """Every artifact's value, by (step, foreach index, name), read in a subprocess with ``env``."""
    code = f"""
import json, sys
from flowmagic.store import open_store, load_artifact
s = open_store({str(home)!r})
out = {{}}
for t in s.meta.tasks({flow!r}, {run_id}):
    for r in s.meta.artifacts(t.task_id):
        v = load_artifact(s.objects, r)
        out[f"{{t.step}}/{{list(t.index or ())}}/{{r.name}}"] = v.tolist() if hasattr(v, "tolist") else v
json.dump(out, sys.stdout)
"""
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def assert_objects_intact(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    objects = moto.objects(bucket, "store/objects/")
    for name, data in objects.items():
        key = "".join(name.split("/")[-2:])
        assert hash_bytes(data) == key, f"{name} does not hold the bytes its name promises"
    return objects


def test_foreach_on_s3_matches_local_and_objects_are_written_once(tmp_path, moto, bucket):
    nb = write_notebook(tmp_path / "s3_flow.ipynb", FOREACH_NB)
    local_env = s3_env(tmp_path / "local", None, moto.url)
    assert run_json("run", nb, env=local_env)["status"] == "succeeded"

    proxy = FaultProxy(moto.port, every=0)   # counts PUTs, injects nothing
    try:
        env = s3_env(tmp_path / "home", f"s3://{bucket}/store", proxy.url)
        doc = run_json("run", nb, env=env)
        assert doc["status"] == "succeeded"
        assert values(tmp_path / "home", env, "S3Flow", 1) == values(tmp_path / "local", local_env, "S3Flow", 1)
        objects = assert_objects_intact(moto, bucket)
        assert objects, "no object reached the bucket"
        uploads = {p: n for p, n in proxy.puts.items() if "/objects/" in p}
        assert uploads and all(n == 1 for n in uploads.values()), uploads
        # `same` is one value in three tasks, and a second run stores nothing anew
        before = sum(uploads.values())
        assert run_json("run", nb, env=env)["run_id"] == 2
        assert sum(n for p, n in proxy.puts.items() if "/objects/" in p) == before
        # the run's metadata is published next to the objects
        names = moto.objects(bucket, "store/meta/S3Flow/runs/")
        assert {"store/meta/S3Flow/runs/1.json", "store/meta/S3Flow/runs/2.json"} <= set(names)
        assert json.loads(names["store/meta/S3Flow/runs/1.json"])["run"]["status"] == "succeeded"
    finally:
        proxy.stop()


def test_a_second_home_sees_the_runs_through_client_status_and_dump(tmp_path, moto, bucket):
    nb = write_notebook(tmp_path / "s3_flow.ipynb", FOREACH_NB)
    url = f"s3://{bucket}/store"
    writer = s3_env(tmp_path / "writer", url, moto.url)
    run_json("run", nb, "--tag", "shared", env=writer)
    reader = s3_env(tmp_path / "reader", url, moto.url)

    status = run_json("status", nb, env=reader)
    assert [(r["run_id"], r["status"], r["tags"]) for r in status["runs"]] == [(1, "succeeded", ["shared"])]
    dumped = run_json("dump", nb, "1", env=reader)
    mine = run_json("dump", nb, "1", env=writer)
    assert dumped["artifacts"] == mine["artifacts"]

    code = ("from flowmagic import Flow; r = Flow('S3Flow').latest_run; "
            "print(r.id, r.successful, r['join'].task.data.total, int(r['join'].task.data.last))")
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=reader,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "True", "60", "2997"]

    # a new run in the writer's home reaches the reader on its next look
    run_json("run", nb, env=writer)
    assert [r["run_id"] for r in run_json("status", nb, env=reader)["runs"]] == [2, 1]


@pytest.mark.parametrize("case", ["missing bucket", "bad credentials"])
def test_unusable_store_is_one_clear_line_exit_2_and_nothing_recorded(tmp_path, moto, case):
    nb = write_notebook(tmp_path / "s3_flow.ipynb", FOREACH_NB)
    home = tmp_path / "home"
    if case == "missing bucket":
        env = s3_env(home, "s3://no-such-bucket-here/store", moto.url, FLOWMAGIC_STORE_RETRIES="1")
        expected = "bucket does not exist"
    else:
        strict = MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})   # moto checks the keys from the start
        env = s3_env(home, "s3://some-bucket/store", strict.url, FLOWMAGIC_STORE_RETRIES="1",
                     AWS_ACCESS_KEY_ID="AKIAWRONGWRONGWRONG", AWS_SECRET_ACCESS_KEY="wrong")
        expected = "access denied"
    try:
        proc = run("run", nb, env=env)
    finally:
        if case != "missing bucket":
            strict.stop()
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("flowmagic: error: FLOWMAGIC_STORE="), proc.stderr
    assert expected in lines[0]
    assert not (home / "metadata.sqlite").exists()


def test_failing_puts_are_retried_and_no_half_written_object_is_visible(tmp_path, moto, bucket):
    nb = write_notebook(tmp_path / "s3_flow.ipynb", [
        "import numpy as np",
        "%%step start\nparams = list(range(4))\nbig = np.arange(3_000_000)",   # 24 MB: a multipart upload
        "%%step compute --foreach params\nvalue = big[input] + input",
        "%%step join\ntotal = sum(value)",
    ])
    proxy = FaultProxy(moto.port, every=3)
    try:
        env = s3_env(tmp_path / "home", f"s3://{bucket}/store", proxy.url,
                     FLOWMAGIC_STORE_PART_SIZE=str(5 * 1024 * 1024))
        doc = run_json("run", nb, env=env)
        assert doc["status"] == "succeeded"
        assert proxy.failed >= 2, "the proxy injected no fault"
        assert_objects_intact(moto, bucket)
        # read back from the bucket alone (a fresh home: its cache is empty)
        reader = s3_env(tmp_path / "reader", f"s3://{bucket}/store", moto.url)
        got = values(tmp_path / "reader", reader, "S3Flow", 1)
        assert got["join/[]/total"] == 2 * sum(range(4))
        assert len(got["start/[]/big"]) == 3_000_000
    finally:
        proxy.stop()


def test_open_store_reports_a_bucket_that_vanished_as_a_store_error(tmp_path, moto, monkeypatch):
    from flowmagic.errors import StoreError

    monkeypatch.setenv("FLOWMAGIC_STORE", "s3://never-made/x")
    monkeypatch.setenv("FLOWMAGIC_S3_ENDPOINT_URL", moto.url)
    monkeypatch.setenv("FLOWMAGIC_STORE_RETRIES", "0")
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(StoreError, match="bucket does not exist"):
        open_store(tmp_path / "h")


def test_a_notebook_run_all_in_a_kernel_stores_in_s3_and_another_home_reads_it(tmp_path, moto, bucket):
    from conftest import execute_notebook

    nb = write_notebook(tmp_path / "s3_flow.ipynb", ["%load_ext flowmagic", *FOREACH_NB])
    url = f"s3://{bucket}/store"
    env = s3_env(tmp_path / "kernel_home", url, moto.url)
    execute_notebook(nb, tmp_path, env, timeout=240)
    assert moto.objects(bucket, "store/objects/"), "the kernel's tasks stored nothing in the bucket"
    reader = s3_env(tmp_path / "reader", url, moto.url)
    code = ("from flowmagic import Flow; r = Flow('S3Flow').latest_run; "
            "print(r.id, r.status, r['join'].task.data.total)")
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=reader,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    run_id, _, total = proc.stdout.split()
    assert (run_id, total) == ("1", "60")


def test_an_open_reader_store_sees_a_later_run_in_its_next_status(tmp_path, moto, bucket, monkeypatch):
    from flowmagic import services

    nb = write_notebook(tmp_path / "s3_flow.ipynb", ["%%step start\nx = 1", "%%step end\ny = x + 1"])
    url = f"s3://{bucket}/store"
    writer = s3_env(tmp_path / "writer", url, moto.url)
    run_json("run", nb, env=writer)
    for k, v in s3_env(tmp_path / "reader", url, moto.url).items():
        monkeypatch.setenv(k, v)
    store = open_store(tmp_path / "reader")   # as a reading kernel keeps it open
    try:
        assert [r["run_id"] for r in services.status_document(store, "S3Flow")["runs"]] == [1]
        run_json("run", nb, env=writer)
        store._refreshed = 0.0   # (the reader looked more than a second ago)
        assert [r["run_id"] for r in services.status_document(store, "S3Flow")["runs"]] == [2, 1]
    finally:
        store.close()


def test_gc_in_the_writing_home_is_not_undone_by_the_published_documents(tmp_path, moto, bucket):
    nb = write_notebook(tmp_path / "s3_flow.ipynb", ["%%step start\nx = 1", "%%step end\ny = x + 1"])
    writer = s3_env(tmp_path / "writer", f"s3://{bucket}/store", moto.url)
    run_json("run", nb, env=writer)
    run_json("run", nb, env=writer)
    proc = run("gc", nb, "--keep", "1", env=writer)
    assert proc.returncode == 0, proc.stderr
    assert [r["run_id"] for r in run_json("status", nb, env=writer)["runs"]] == [2]
    # a reader still sees both: nothing is deleted from the bucket
    reader = s3_env(tmp_path / "reader", f"s3://{bucket}/store", moto.url)
    assert [r["run_id"] for r in run_json("status", nb, env=reader)["runs"]] == [2, 1]


def test_a_reader_sees_a_task_start_running_after_it_was_published_pending(tmp_path, moto, bucket):
    """A task's start (start_attempt, which also opens its live log) is published like any state
    change: with one worker the second foreach task is published pending, then starts."""
    gate = tmp_path / "gate"
    nb = write_notebook(tmp_path / "s3_wait.ipynb", [
        "%%step start\nitems = [0, 1]",
        f"%%step work --foreach items\nimport os, time\nwhile not os.path.exists({str(gate)!r} + str(input)):\n"
        "    time.sleep(0.1)\nx = input",
        "%%step end\ny = x"])
    url = f"s3://{bucket}/store"
    writer = subprocess.Popen([*command(), "run", str(nb), "--max-workers", "1"],
                              env=s3_env(tmp_path / "writer", url, moto.url),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    reader = s3_env(tmp_path / "reader", url, moto.url)
    code = ("from flowmagic import Flow\nr = Flow('S3Wait').latest_run\n"
            "print(' '.join(t.state for t in r['work'].tasks()) if 'work' in r else '')")

    def wait_for(states: str) -> None:
        deadline, seen, proc = time.monotonic() + 120, "", None
        while time.monotonic() < deadline and seen != states:
            proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=reader,
                                  cwd=tmp_path, timeout=120)
            seen = proc.stdout.strip()
            time.sleep(0.3)
        assert seen == states, (seen, proc.stderr if proc else "")

    try:
        wait_for("running pending")
        (tmp_path / "gate0").touch()
        wait_for("done running")
    finally:
        for n in (0, 1):
            (tmp_path / f"gate{n}").touch()
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
        writer.stderr.close()
