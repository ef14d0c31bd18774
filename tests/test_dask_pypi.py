"""`--pypi` steps on Dask, end to end: a real `dask scheduler` and `dask worker` (tests/dask_cluster.py) on
127.0.0.1, the real `flowmagic` console command, environments built for real with uv.

The orchestrator resolves the step's request once (`uv pip compile`) and each attempt carries that lock;
the worker builds exactly those pins into its own cache (FLOWMAGIC_ENV_CACHE, here one per cluster) and
runs the task in that environment's interpreter. Downloads go through uv's cache (UV_CACHE_DIR, default
~/.cache/uv), so only the first run on a machine is slow; a build still byte-compiles pandas (10-60 s).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from dask_cluster import DaskCluster
from runtime_helpers import (artifacts, attempts, command, flowmagic, flowmagic_json, run_record, tasks,
                             write_notebook)

from flowmagic.store.environments import recorded_environments

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PIN = "six==1.16.0"   # small, pure Python; the kernel has six 1.17


class TwoThreadCluster(DaskCluster):
    """One worker process with two threads: two tasks of a foreach run on it at the same time."""

    def _start(self, args, name, env=None, cwd=None):
        if args[0] == "worker":
            args = [*args]
            args[args.index("--nthreads") + 1] = "2"
        return super()._start(args, name, env, cwd)


def _cluster(log_dir: Path, **env: str) -> DaskCluster:
    return TwoThreadCluster(1, log_dir, worker_env=lambda _n: {**os.environ, **env}).start()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A worker whose environments go to a cache of its own (not the orchestrator's store)."""
    root = tmp_path_factory.mktemp("dask-pypi")
    running = _cluster(root, FLOWMAGIC_ENV_CACHE=str(root / "worker-envs"))
    running.env_cache = root / "worker-envs"
    try:
        yield running
    finally:
        running.stop()


def cells(executor: bool, pypi: str = PIN, retry: str = "") -> list[str]:
    where = " --executor dask" if executor else ""
    return [
        "%%step start\nitems = [1, 2]",
        f'%%step fit --foreach items --pypi "{pypi}"{retry}{where}\nimport sys\nimport six\n'
        "print('fit', input, 'six', six.__version__, 'prefix', sys.prefix, flush=True)\n"
        "version = six.__version__\ny = input * 10",
        "%%step end\ntotal = sum(y)\nversions = version",
    ]


def on_dask(cluster) -> dict[str, str]:
    return {"FLOWMAGIC_DASK_SCHEDULER": cluster.address}


def finished_envs(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("*/flowmagic-env.json")) if cache.is_dir() else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cluster):
    """The same flow run locally and with its --pypi step on Dask (twice: the second finds the worker's
    environment built)."""
    root = tmp_path_factory.mktemp("pypi-runs")
    (root / "local").mkdir()
    (root / "dask").mkdir()
    local = flowmagic("run", write_notebook(root / "local" / "pypi_flow.ipynb", cells(False)),
                      store=root / "local-store", timeout=600)
    assert local.returncode == 0, local.stdout + local.stderr
    nb = write_notebook(root / "dask" / "pypi_flow.ipynb", cells(True))
    started = time.monotonic()
    first = flowmagic("run", nb, store=root / "dask-store", env=on_dask(cluster), timeout=600)
    first_s = time.monotonic() - started
    assert first.returncode == 0, first.stdout + first.stderr
    started = time.monotonic()
    second = flowmagic("run", nb, store=root / "dask-store", env=on_dask(cluster), timeout=300)
    second_s = time.monotonic() - started
    assert second.returncode == 0, second.stdout + second.stderr
    print(f"dask --pypi run: first {first_s:.1f} s (the worker builds), second {second_s:.1f} s")
    return root, local, first, second


def test_the_step_sees_the_pinned_version_in_the_workers_environment(runs, cluster):
    root, _local, first, second = runs
    for i in (1, 2):
        line = next(x for x in first.stdout.splitlines() if f"fit {i} six" in x)
        assert "six 1.16.0" in line, line
        prefix = Path(line.split("prefix ")[1].strip())
        assert prefix.parent == cluster.env_cache, line   # the worker's cache, not the orchestrator's store
    assert finished_envs(cluster.env_cache) and not finished_envs(root / "dask-store" / "envs")
    assert [a["version"] for a in artifacts(root / "dask-store", "PypiFlow", 1, "fit")] == ["1.16.0"] * 2
    # resolved here once, remembered: nothing is installed on the orchestrator's side
    assert len(list((root / "dask-store" / "envs" / "locks").glob("*.json"))) == 1
    recorded = recorded_environments(run_record(root / "dask-store", "PypiFlow", 1))
    assert recorded["fit"]["requested"] == [PIN] and PIN in recorded["fit"]["packages"]


def test_artifacts_are_those_of_a_local_run(runs):
    root = runs[0]
    for step in ("start", "fit", "end"):
        assert artifacts(root / "dask-store", "PypiFlow", 1, step) == \
            artifacts(root / "local-store", "PypiFlow", 1, step), step
    assert artifacts(root / "dask-store", "PypiFlow", 2, "end") == [{"total": 30, "versions": ["1.16.0"] * 2}]

    def hashes(store: Path) -> list[tuple]:
        dump = flowmagic_json("dump", root / "local" / "pypi_flow.ipynb", "1", store=store)
        return sorted((a["step"], a["name"], a["hash"]) for a in dump["artifacts"])

    assert hashes(root / "dask-store") == hashes(root / "local-store")


def test_two_tasks_of_a_foreach_on_one_worker_build_the_environment_once(runs, cluster):
    _root, _local, first, second = runs
    output = first.stdout + first.stderr
    assert output.count("building the --pypi") == 1, output   # one task built it; the other waited for it
    assert "building the --pypi" not in second.stdout + second.stderr   # found built
    assert len(finished_envs(cluster.env_cache)) == 1
    assert not list(cluster.env_cache.glob(".build-*"))


def test_a_bad_spec_fails_the_step_clearly_and_the_run_ends(tmp_path, cluster):
    nb = write_notebook(tmp_path / "bad_spec.ipynb", cells(True, pypi="six==99.0.0", retry=" --retry 1"))
    started = time.monotonic()
    proc = flowmagic("run", nb, "--json", store=tmp_path / "store", env=on_dask(cluster), timeout=300)
    assert time.monotonic() - started < 120
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"
    assert "[fit/0] failed: EnvironmentBuildError" in proc.stderr and "six==99.0.0" in proc.stderr, proc.stderr
    fit = tasks(tmp_path / "store", "BadSpec", 1, "fit")
    assert fit and all(t.state in ("failed", "cancelled") for t in fit) and fit[0].state == "failed"
    tried = attempts(tmp_path / "store", fit[0].task_id)
    assert len(tried) == 2   # --retry 1: a build failure is a failed attempt like any other
    assert tried[-1].exception["type"] == "EnvironmentBuildError"
    assert "step 'fit'" in tried[-1].exception["message"]


def test_a_worker_that_cannot_build_fails_the_attempt_in_one_line(tmp_path):
    """The lock resolves on the orchestrator, but this worker has an empty uv cache and no index it
    can reach (uv 0.5, the lowest supported, ignores UV_OFFLINE, so the index is a closed port too)."""
    cache = tmp_path / "worker-envs"
    broken = _cluster(tmp_path, FLOWMAGIC_ENV_CACHE=str(cache), UV_OFFLINE="1",
                      UV_INDEX_URL="http://127.0.0.1:9/simple", UV_DEFAULT_INDEX="http://127.0.0.1:9/simple",
                      UV_CACHE_DIR=str(tmp_path / "empty-uv-cache"))
    try:
        nb = write_notebook(tmp_path / "offline.ipynb", cells(True, retry=" --retry 1"))
        proc = flowmagic("run", nb, store=tmp_path / "store", env=on_dask(broken), timeout=300)
    finally:
        broken.stop()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    fit = tasks(tmp_path / "store", "Offline", 1, "fit")   # the run fails with the first: the other is cancelled
    failed = [t for t in fit if t.state == "failed"]
    assert failed and all(t.state in ("failed", "cancelled") for t in fit)
    tried = attempts(tmp_path / "store", failed[0].task_id)
    assert len(tried) == 2 and all(a.outcome == "failed" for a in tried)
    exception = tried[-1].exception
    assert exception["type"] == "EnvironmentBuildError"
    message = exception["message"]
    assert "\n" not in message, message
    assert message.startswith("step 'fit': Dask worker tcp://127.0.0.1:"), message
    # uv's own reason: offline (uv >= 0.6 honours UV_OFFLINE) or the closed index (uv 0.5)
    assert f'--pypi "{PIN}"' in message, message
    assert "network was disabled" in message or "Connection refused" in message, message
    assert "failed: EnvironmentBuildError: step 'fit': Dask worker" in proc.stdout + proc.stderr, proc.stdout
    print(message)
    assert not finished_envs(cache) and not list(cache.glob(".build-*"))


def test_timeout_memory_and_output_behave_as_locally_in_the_workers_environment(tmp_path, cluster):
    nb = write_notebook(tmp_path / "limits.ipynb", [
        "%%step start\nx = 1",
        f'%%step slow --pypi "{PIN}" --timeout 2 --catch terr --executor dask\nimport time, six\n'
        "print('slow on six', six.__version__, flush=True)\ntime.sleep(60)\nlate = x",
        f'%%step hungry --pypi "{PIN}" --memory 150 --catch merr --executor dask\nblob = b"x" * (600 << 20)',
        "%%step end\nsummary = (late, blob)",
    ])
    proc = flowmagic("run", nb, store=tmp_path / "store", env=on_dask(cluster), timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "slow on six 1.16.0" in proc.stdout   # streamed back from the task in the environment
    assert artifacts(tmp_path / "store", "Limits", 1, "end") == [{"summary": (None, None)}]
    (slow,) = tasks(tmp_path / "store", "Limits", 1, "slow")
    (hungry,) = tasks(tmp_path / "store", "Limits", 1, "hungry")
    assert slow.state == hungry.state == "caught"
    assert "timeout of 2 s" in repr(artifacts(tmp_path / "store", "Limits", 1, "slow")[0]["terr"])
    assert "out of memory" in repr(artifacts(tmp_path / "store", "Limits", 1, "hungry")[0]["merr"])


def test_ctrl_c_kills_a_task_running_in_the_workers_environment(tmp_path, cluster):
    from runtime_helpers import reaped, start_flowmagic, wait_gone

    marker = tmp_path / "pid"
    nb = write_notebook(tmp_path / "interrupted.ipynb", [
        "%%params\nmarker = ''",
        f'%%step work --pypi "{PIN}" --executor dask\nimport os, time\n'
        "open(marker, 'w').write(str(os.getpid()))\ntime.sleep(120)\nr = 1",
    ])
    with reaped(start_flowmagic("run", nb, "--marker", marker, store=tmp_path / "store",
                                extra_env=on_dask(cluster))) as proc:
        deadline = time.monotonic() + 120
        while not marker.exists() or not marker.read_text():
            assert time.monotonic() < deadline and proc.poll() is None, "the task never started"
            time.sleep(0.1)
        pid = int(marker.read_text())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert wait_gone([pid], 15) == []
    assert run_record(tmp_path / "store", "Interrupted", 1).status == "interrupted"


def test_with_an_s3_store_the_workers_environment_reads_and_writes_the_bucket(tmp_path):
    """No shared filesystem: the worker has its own HOME and XDG_CACHE_HOME (its environments go to the
    default ~/.cache/flowmagic/envs there), no FLOWMAGIC_* settings; the lock carries s3fs."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from s3_helpers import MotoServer, s3_env

    moto = MotoServer()
    uv_cache = os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")   # downloads shared
    worker = s3_env(None, None, moto.url, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"),
                    UV_CACHE_DIR=uv_cache)
    (tmp_path / "cwd").mkdir()
    cluster = DaskCluster(1, tmp_path, worker_env=lambda _n: worker, worker_cwd=lambda _n: tmp_path / "cwd")
    try:
        moto.make_bucket("pypi-bucket")
        cluster.start()
        (tmp_path / "nb").mkdir()
        nb = write_notebook(tmp_path / "nb" / "s3_pypi.ipynb", [
            "%%step start\nx = 41",
            f'%%step fit --pypi "{PIN}" --executor dask\nimport six\ny = x + 1\nversion = six.__version__',
            "%%step end\nz = (y, version)",
        ])
        env = s3_env(tmp_path / "home-orchestrator", "s3://pypi-bucket/flows", moto.url, **on_dask(cluster))
        proc = subprocess.run([*command(), "run", str(nb)], capture_output=True, text=True, env=env, timeout=600)
    finally:
        cluster.stop()
        moto.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert artifacts(tmp_path / "home-orchestrator", "S3Pypi", 1, "end") == [{"z": (42, "1.16.0")}]
    (env_dir,) = finished_envs(tmp_path / "cache" / "flowmagic" / "envs")
    frozen = json.loads((env_dir / "flowmagic-env.json").read_text())["packages"]
    assert PIN in frozen and any(p.startswith("s3fs==") for p in frozen)


def test_in_a_kernel_a_pypi_cell_runs_on_the_worker_and_a_bad_spec_is_an_error_the_kernel_survives(
        tmp_path, cluster):
    from conftest import LiveKernel, kernel_env

    kernel = LiveKernel(tmp_path, kernel_env(tmp_path / "store", **on_dask(cluster)))
    try:
        kernel.ok("%load_ext flowmagic\n%flow name KernelPypi")
        kernel.ok("%%step start\nx = 1")
        ran = kernel.ok(f'%%step fit --pypi "{PIN}" --executor dask\nimport six, sys\n'
                        "print('prefix', sys.prefix)\nversion = six.__version__\ny = x + 1")
        assert str(cluster.env_cache) in ran.stdout, ran.stdout   # the worker's environment
        assert kernel.value("(version, y)") == ("1.16.0", 2)
        started = time.monotonic()
        bad = kernel.execute('%%step broken --pypi "six==99.0.0" --executor dask\nz = y + 1')
        assert time.monotonic() - started < 120
        assert bad.status == "error"
        shown = bad.error_text + bad.stderr + bad.stdout
        assert "six==99.0.0" in shown and "broken" in shown, shown
        assert kernel.value("(x, y)") == (1, 2)   # the kernel and what earlier steps bound are untouched
    finally:
        kernel.shutdown()


def test_the_orchestrators_lock_is_kept_and_prune_forgets_it(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from flowmagic.runtime.environments import builder

    monkeypatch.delenv("FLOWMAGIC_STORE", raising=False)
    step = SimpleNamespace(name="fit", options=SimpleNamespace(pypi=PIN, conda=None))
    lock = builder.resolve_lock(step, tmp_path)
    assert PIN in lock.pins and lock.spec.packages == (PIN,)
    assert builder.Lock.from_json(json.loads(json.dumps(lock.to_json()))).key == lock.key
    monkeypatch.setattr(builder, "_resolve_pypi", lambda *a: pytest.fail("resolved twice"))
    assert builder.resolve_lock(step, tmp_path) == lock   # the second use reads envs/locks
    assert builder.prune_environments(tmp_path, unused_for_days=1) == [] and builder.resolve_lock(step, tmp_path)
    builder.prune_environments(tmp_path)
    assert not list((tmp_path / "envs" / "locks").glob("*.json"))


def test_ctrl_c_while_a_worker_builds_stops_the_build_and_leaves_no_partial_environment(tmp_path, cluster):
    from runtime_helpers import reaped, start_flowmagic

    other = "six==1.15.0"   # a lock the worker has not built yet
    nb = write_notebook(tmp_path / "stopped.ipynb", [
        f'%%step work --pypi "{other}" --executor dask\nimport six\nv = six.__version__'])
    before = finished_envs(cluster.env_cache)
    with reaped(start_flowmagic("run", nb, store=tmp_path / "store", extra_env=on_dask(cluster))) as proc:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if "building the --pypi" in line:
                break
        else:
            pytest.fail("".join(seen))
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, "".join(seen) + out
    assert run_record(tmp_path / "store", "Stopped", 1).status == "interrupted"
    assert {t.state for t in tasks(tmp_path / "store", "Stopped", 1, "work")} == {"interrupted"}
    deadline = time.monotonic() + 30   # the worker kills uv and removes its half-built folder
    while list(cluster.env_cache.glob(".build-*")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(cluster.env_cache.glob(".build-*"))
    assert finished_envs(cluster.env_cache) == before
