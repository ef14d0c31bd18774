"""The Dask executor and the S3 store together: a real `dask scheduler` with two `dask worker` processes
(tests/dask_cluster.py) and moto's S3 server (tests/s3_helpers.py), all started here.

Each worker is set up as if on a machine of its own: its own working directory and HOME, no
FLOWMAGIC_HOME or FLOWMAGIC_STORE, and its own read cache (XDG_CACHE_HOME), so a task that leant
on the orchestrator's local store would show it. The workers read inputs from and write outputs to
the bucket; only the orchestrator writes metadata."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytest.importorskip("distributed")

from dask_cluster import dask_cluster, free_port  # noqa: E402
from runtime_helpers import command, reaped, write_notebook  # noqa: E402
from s3_helpers import MotoServer, s3_env  # noqa: E402

from flowmagic.runtime.orchestrator.executors.remote import store_problem  # noqa: E402
from flowmagic.runtime.protocol import TaskSpec  # noqa: E402
from flowmagic.store import open_store  # noqa: E402
from flowmagic.store.objects import hash_bytes  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

FLOW = "DaskS3Flow"
SEMANTICS = [
    "import numpy as np",
    "%%params\nmarker = ''  # where the flaky step keeps its first-attempt file",
    "%%step start\nitems = list(range(4))\nbase = np.arange(20_000)",
    # each worker runs one task at a time: the first two fit tasks wait for each other, so both workers run one
    "%%step fit --foreach items\nimport os, time\nopen(f'{marker}.fit{input}', 'w').close()\n"
    "deadline = time.time() + 60\n"
    "while sum(os.path.exists(f'{marker}.fit{i}') for i in range(4)) < 2 and time.time() < deadline:\n"
    "    time.sleep(0.05)\ndel deadline   # (a time: not an artifact to compare)\n"
    "print('fit', input, 'cache', os.environ.get('XDG_CACHE_HOME'), flush=True)\n"
    "y = input * input\nvec = base * input",
    "%%step join\ntotal = sum(y)\nstacked = np.stack(vec)",
    "%%step flaky --retry 1\nimport os\nfirst = not os.path.exists(marker + '.flaky')\n"
    "open(marker + '.flaky', 'a').close()\nif first:\n    raise RuntimeError('first attempt fails')\nok = 'second'",
    "%%step risky --catch err\nbad = 1 / 0",
    "%%step slow --timeout 2 --catch terr\nimport time\ntime.sleep(60)\nlate = 1",
    "%%step end\nsummary = (int(total), int(stacked.sum()), ok, bad, late)",
]


class Machines:
    """Where each worker lives: ``worker<n>/cwd``, ``worker<n>/home`` and its cache ``worker<n>/cache``."""

    def __init__(self, root: Path, endpoint: str) -> None:
        self.root, self.endpoint = root, endpoint

    def dir(self, n: int, what: str) -> Path:
        path = self.root / f"worker{n}" / what
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self, n: int) -> dict[str, str]:
        env = s3_env(None, None, self.endpoint, HOME=str(self.dir(n, "home")),
                     XDG_CACHE_HOME=str(self.dir(n, "cache")))
        assert not any(k in env for k in ("FLOWMAGIC_HOME", "FLOWMAGIC_STORE", "FLOWMAGIC_STORE_CACHE"))
        return env

    def cache_keys(self, n: int) -> set[str]:
        objects = self.dir(n, "cache") / "flowmagic" / "objects"
        return {p.parent.name + p.name for p in objects.glob("??/*") if p.is_file()}


@pytest.fixture(scope="module")
def moto():
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def machines(tmp_path_factory, moto) -> Machines:
    return Machines(tmp_path_factory.mktemp("machines"), moto.url)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, machines):
    with dask_cluster(2, log_dir=tmp_path_factory.mktemp("dask-logs"), worker_env=machines.env,
                      worker_cwd=lambda n: machines.dir(n, "cwd")) as running:
        yield running


def new_bucket(moto: MotoServer) -> str:
    name = f"b-{uuid.uuid4().hex[:12]}"
    moto.make_bucket(name)
    return name


def run(*args, env: dict[str, str], cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([*command(), *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=timeout)


def refs(home: Path, flow: str, run_id: int) -> dict[str, tuple]:
    """Every artifact's (type, serializer, content hash), by step/foreach index/name, from ``home``'s index."""
    store = open_store(home)
    try:
        return {f"{t.step}/{list(t.index or ())}/{r.name}": (r.type, r.serializer, r.hash)
                for t in store.meta.tasks(flow, run_id) for r in store.meta.artifacts(t.task_id)}
    finally:
        store.close()


def referenced(home: Path) -> set[str]:
    store = open_store(home)
    try:
        return store.meta.referenced_objects()
    finally:
        store.close()


def bucket_objects(moto: MotoServer, bucket: str) -> dict[str, bytes]:
    """The bucket's content objects by key, each checked against its name."""
    found = {}
    for name, data in moto.objects(bucket, "store/objects/").items():
        key = "".join(name.split("/")[-2:])
        assert hash_bytes(data) == key, f"{name} does not hold the bytes its name promises"
        found[key] = data
    return found


@pytest.fixture(scope="module")
def semantics_run(tmp_path_factory, moto, machines, cluster):
    """The semantics flow run twice: locally (a local store), and on the cluster with the S3 store."""
    tmp = tmp_path_factory.mktemp("semantics")
    nb = write_notebook(tmp / "dask_s3_flow.ipynb", SEMANTICS)
    bucket = new_bucket(moto)
    url = f"s3://{bucket}/store"
    local = run("run", nb, "--marker", tmp / "local", env=s3_env(tmp / "local-home", None, moto.url))
    assert local.returncode == 0, local.stdout + local.stderr
    started = time.monotonic()
    remote = run("run", nb, "--marker", tmp / "dask", "--executor", f"dask://{cluster.address}",
                 env=s3_env(tmp / "orchestrator", url, moto.url))
    took = time.monotonic() - started
    assert remote.returncode == 0, remote.stdout + remote.stderr
    return {"tmp": tmp, "nb": nb, "bucket": bucket, "url": url, "local": local, "remote": remote, "took": took}


def test_foreach_retry_catch_timeout_on_dask_with_s3_give_the_artifacts_of_a_local_run(semantics_run):
    tmp = semantics_run["tmp"]
    mine, local = refs(tmp / "orchestrator", FLOW, 1), refs(tmp / "local-home", FLOW, 1)
    assert "end/[]/summary" in mine and "join/[]/stacked" in mine and "fit/[3]/vec" in mine
    assert mine == local   # the same names, types and content hashes: the same values
    assert any(serializer != "inline" for _, serializer, _ in mine.values())   # objects were stored, not inlined
    remote = semantics_run["remote"].stdout
    assert sum(f"fit {i} cache " in remote for i in range(4)) == 4   # streamed back from the workers
    assert "cache None" not in remote and "cache None" in semantics_run["local"].stdout
    store = open_store(tmp / "orchestrator")
    try:
        (flaky,) = store.meta.tasks(FLOW, 1, "flaky")
        assert [a.outcome for a in store.meta.attempts(flaky.task_id)] == ["failed", "ok"]
        (slow,) = store.meta.tasks(FLOW, 1, "slow")
        assert slow.state == "caught"
        assert store.meta.get_run(FLOW, 1).status == "succeeded"
    finally:
        store.close()


def test_every_object_the_run_references_is_in_the_bucket_written_by_the_workers(semantics_run, moto, machines):
    tmp = semantics_run["tmp"]
    wanted = referenced(tmp / "orchestrator")
    in_bucket = bucket_objects(moto, semantics_run["bucket"])
    assert wanted and wanted <= set(in_bucket), wanted - set(in_bucket)
    # the tasks wrote their outputs through their own worker's cache, not the orchestrator's directory
    vec = {h for name, (_, _, h) in refs(tmp / "orchestrator", FLOW, 1).items() if name.endswith("/vec")}
    assert len(vec) == 4
    caches = [machines.cache_keys(0), machines.cache_keys(1)]
    assert vec <= caches[0] | caches[1]
    orchestrator_cache = {p.parent.name + p.name for p in (tmp / "orchestrator" / "objects").glob("??/*")}
    assert not vec & orchestrator_cache, "a task wrote into the orchestrator's local store"
    # both workers ran fit tasks, and the join read all four outputs: it downloaded the other worker's
    remote = semantics_run["remote"].stdout
    ran = {n for n in (0, 1) if f"cache {machines.dir(n, 'cache')}" in remote}
    assert ran == {0, 1}, remote
    assert any(vec <= keys for keys in caches)
    # only the orchestrator wrote metadata: no worker has a store of its own
    assert not list(machines.root.rglob("metadata.sqlite")), list(machines.root.rglob("metadata.sqlite"))
    assert not list(machines.root.rglob(".flowmagic"))
    assert not (tmp / ".flowmagic").exists()   # (the tasks ran in the notebook's folder: it exists here)


def test_a_second_home_reads_the_dask_run_through_dump_and_the_client_api(semantics_run, moto):
    tmp, nb, url = semantics_run["tmp"], semantics_run["nb"], semantics_run["url"]
    reader = s3_env(tmp / "reader", url, moto.url)
    writer = s3_env(tmp / "orchestrator", url, moto.url)
    dumped = run("dump", nb, "1", "--json", env=reader)
    assert dumped.returncode == 0, dumped.stderr
    mine = run("dump", nb, "1", "--json", env=writer)
    assert json.loads(dumped.stdout)["artifacts"] == json.loads(mine.stdout)["artifacts"]
    code = (f"from flowmagic import Flow; r = Flow({FLOW!r}).latest_run; "
            "print(r.id, r.successful, r['end'].task.data.summary, int(r['join'].task.data.stacked[3][-1]))")
    proc = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=reader, cwd=tmp,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().split(maxsplit=2) == ["1", "True", f"(14, {6 * sum(range(20_000))}, 'second', None, None) "
                                             f"{3 * 19_999}"]
    # the reader loaded them from the bucket: its cache holds what it read
    assert list((tmp / "reader" / "objects").glob("??/*"))


def test_a_worker_killed_mid_task_with_s3_the_task_runs_elsewhere_and_the_run_succeeds(tmp_path, moto, cluster):
    marker = tmp_path / "kill"
    nb = write_notebook(tmp_path / "killed_s3.ipynb", [
        "import numpy as np",
        "%%params\nmarker = ''",
        "%%step start\nitems = [0, 1]\nbase = np.arange(5_000)",
        "%%step fit --foreach items\nimport os, time\n"
        "if input == 0 and not os.path.exists(marker + '.killed'):\n"
        "    open(marker + '.pid', 'w').write(str(os.getpid()))\n    time.sleep(120)\nvec = base + input",
        "%%step end\ntotal = int(sum(v.sum() for v in vec))",
    ])
    bucket = new_bucket(moto)
    url = f"s3://{bucket}/store"
    env = s3_env(tmp_path / "orchestrator", url, moto.url)
    proc = subprocess.Popen([*command(), "run", str(nb), "--marker", str(marker), "--executor",
                             f"dask://{cluster.address}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    with reaped(proc):
        pid_file = marker.with_suffix(".pid")
        deadline = time.monotonic() + 120
        while not pid_file.exists():
            assert time.monotonic() < deadline and proc.poll() is None, "the task never started"
            time.sleep(0.1)
        time.sleep(0.2)
        task = psutil.Process(int(pid_file.read_text()))
        workers = {p.pid for p in cluster.worker_processes()}
        (worker,) = [p for p in task.parents() if p.pid in workers]
        marker.with_suffix(".killed").touch()
        os.kill(worker.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    expected = 2 * sum(range(5_000)) + 5_000
    assert set(referenced(tmp_path / "orchestrator")) <= set(bucket_objects(moto, bucket))
    code = ("from flowmagic import Flow; r = Flow('KilledS3').latest_run; "
            "print(r.successful, r['end'].task.data.total)")
    reader = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                            env=s3_env(tmp_path / "reader", url, moto.url), cwd=tmp_path, timeout=120)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.split() == ["True", str(expected)]
    store = open_store(tmp_path / "orchestrator")
    try:
        first = sorted(store.meta.tasks("KilledS3", 1, "fit"), key=lambda t: t.index)[0]
        assert [a.outcome for a in store.meta.attempts(first.task_id)] == ["ok"]   # Dask re-ran it, not --retry
    finally:
        store.close()
    cluster.wait_for_workers(2)   # the nanny restarted it: the next test has both


def test_a_worker_that_cannot_reach_the_bucket_fails_the_task_with_one_line(tmp_path, moto, machines):
    nb = write_notebook(tmp_path / "unreachable_s3.ipynb", ["%%step start\nx = list(range(100))",
                                                            "%%step end\ny = len(x)"])
    url = f"s3://{new_bucket(moto)}/store"
    dead_end = f"http://127.0.0.1:{free_port()}"   # this worker's S3 endpoint: nothing listens there

    def env(n: int) -> dict[str, str]:
        return {**machines.env(n + 2), "FLOWMAGIC_S3_ENDPOINT_URL": dead_end, "FLOWMAGIC_STORE_RETRIES": "0"}

    with dask_cluster(1, worker_env=env, worker_cwd=lambda n: machines.dir(n + 2, "cwd")) as lonely:
        proc = run("run", nb, "--executor", f"dask://{lonely.address}",
                   env=s3_env(tmp_path / "orchestrator", url, moto.url))
    said = proc.stdout + proc.stderr
    assert proc.returncode == 1, said
    assert "Traceback" not in said, said
    line = next(ln for ln in said.splitlines() if "cannot use the store" in ln)   # the task's line
    assert "[start/1] failed: StoreUnusable: Dask worker tcp://127.0.0.1:" in line, line
    assert f"FLOWMAGIC_STORE={url}" in line and "EndpointConnectionError" in line, line
    assert "in its own environment" in line, line
    store = open_store(tmp_path / "orchestrator")
    try:
        assert store.meta.get_run("UnreachableS3", 1).status == "failed"
    finally:
        store.close()


def bare_spec(objects_root: Path, store_url: str | None = None) -> TaskSpec:
    return TaskSpec.from_json({"objects_root": str(objects_root), "store_url": store_url, "flow": "F", "run_id": 1,
                               "task_id": 1, "attempt": 0, "step": "start", "cell": 0, "index": [], "source": "",
                               "code": "", "first_line": 1, "filename": "", "params": {}, "bindings": {},
                               "foreach": None, "inputs": None, "catch": None, "catch_now": False, "writes": [],
                               "required": [], "foreach_vars": []})


def test_a_local_store_a_worker_does_not_see_is_named(tmp_path):
    spec = bare_spec(tmp_path / "elsewhere" / "objects")
    problem = store_problem(spec)
    assert problem is not None and str(tmp_path / "elsewhere") in problem and "shared filesystem" in problem
    (tmp_path / "elsewhere" / "objects").mkdir(parents=True)
    assert store_problem(spec) is None


def test_a_worker_cache_that_cannot_be_made_is_named_before_the_bucket_is_asked(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("in the way")
    monkeypatch.setenv("FLOWMAGIC_STORE_CACHE", str(tmp_path / "a-file" / "cache"))
    problem = store_problem(bare_spec(tmp_path / "orchestrator" / "objects", "s3://never-asked/x"))
    assert problem is not None and f"cannot make its read cache {tmp_path / 'a-file' / 'cache'}" in problem
    assert "FLOWMAGIC_STORE_CACHE" in problem



def test_a_worker_fork_server_warm_from_a_local_store_run_imports_s3fs_for_an_s3_run(tmp_path, moto, cluster):
    """The workers have no FLOWMAGIC_STORE, so their fork servers learn the store from the task: one that
    served a local-store run first still imports s3fs once for the S3 run, not in every task (~0.3 s each)."""
    nb = write_notebook(tmp_path / "warm_s3.ipynb", [
        f"marker = {uuid.uuid4().hex!r}   # a prelude of its own: fresh fork servers on the workers",
        "%%step start\nimport sys\nprint('s3fs before the step:', 's3fs' in sys.modules, flush=True)\nx = 1",
    ])
    executor = ["--executor", f"dask://{cluster.address}"]
    first = run("run", nb, *executor, env=s3_env(tmp_path / "local-home", None, moto.url))
    assert first.returncode == 0 and "s3fs before the step: False" in first.stdout, first.stdout + first.stderr
    second = run("run", nb, *executor, env=s3_env(tmp_path / "home", f"s3://{new_bucket(moto)}/store", moto.url))
    assert second.returncode == 0 and "s3fs before the step: True" in second.stdout, second.stdout + second.stderr


def test_the_scheduler_lost_mid_run_with_s3_and_resume_on_a_new_one_reads_the_cloned_inputs_from_s3(
        tmp_path, moto, machines, cluster):
    marker = tmp_path / "lost"
    block = marker.with_suffix(".block")
    block.touch()
    nb = write_notebook(tmp_path / "lost_s3.ipynb", [
        "import numpy as np",
        "%%params\nmarker = ''",
        "%%step start\nbase = np.arange(30_000)",
        "%%step slow\nimport os, time\nopen(marker + '.started', 'w').close()\n"
        "while os.path.exists(marker + '.block'):\n    time.sleep(0.2)\ndoubled = base * 2",
        "%%step end\ntotal = int(doubled.sum())",
    ])
    url = f"s3://{new_bucket(moto)}/store"
    env = s3_env(tmp_path / "orchestrator", url, moto.url)
    with dask_cluster(1, worker_env=lambda n: machines.env(n + 4), worker_cwd=lambda n: machines.dir(n + 4, "cwd")) \
            as doomed:
        proc = subprocess.Popen([*command(), "run", str(nb), "--marker", str(marker), "--executor",
                                 f"dask://{doomed.address}"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, env=env)
        with reaped(proc):
            deadline = time.monotonic() + 120
            while not marker.with_suffix(".started").exists():
                assert time.monotonic() < deadline and proc.poll() is None, "the slow step never started"
                time.sleep(0.1)
            doomed.stop()
            out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "lost the Dask scheduler" in out, out
    block.unlink()
    done = run("resume", nb, "--executor", f"dask://{cluster.address}", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    expected = 2 * sum(range(30_000))
    reader = s3_env(tmp_path / "reader", url, moto.url)   # a fresh home: everything comes from the bucket
    code = "from flowmagic import Flow; r = Flow('LostS3').latest_run; print(r.id, r.successful, r['end'].task.data.total)"
    got = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, env=reader, cwd=tmp_path,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["2", "True", str(expected)]
    assert referenced(tmp_path / "orchestrator") <= set(bucket_objects(moto, url.split("/")[2]))
