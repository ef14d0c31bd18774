"""The Dask executor end to end: a real `dask scheduler` and two `dask worker` processes (tests/dask_cluster.py)
on 127.0.0.1, the real `flowmagic` console command, real stores; faults by killing real processes."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from dask_cluster import dask_cluster, free_port
from runtime_helpers import artifacts, attempts, flowmagic, reaped, run_record, start_flowmagic, tasks, write_notebook

from flowmagic.store import open_store

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with dask_cluster(2, log_dir=tmp_path_factory.mktemp("dask-logs")) as running:
        yield running


def executor(cluster) -> str:
    return f"dask://{cluster.address}"


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


SEMANTICS = [
    "%%params\nmarker = ''  # where the flaky step keeps its first-attempt file",
    "%%step start\nitems = list(range(4))",
    "%%step fit --foreach items\nimport psutil\n"
    "print('fit', input, 'on-worker', any('dask worker' in ' '.join(p.cmdline()) for p in psutil.Process().parents()))\n"
    "y = input * input",
    "%%step flaky --retry 1\nimport os\nfirst = not os.path.exists(marker + '.flaky')\n"
    "open(marker + '.flaky', 'a').close()\nif first:\n    raise RuntimeError('first attempt fails')\nok = 'second'",
    "%%step risky --catch err\nbad = 1 / 0",
    "%%step slow --timeout 2 --catch terr\nimport time\ntime.sleep(60)\nlate = 1",
    "%%step hungry --memory 150 --catch merr\nblob = b'x' * (600 << 20)",
    "%%step end\nsummary = (sum(y), ok, bad, late, blob)",
]
STEPS = ["start", "fit", "flaky", "risky", "slow", "hungry", "end"]


def comparable(rows: list[dict]) -> list[dict]:
    # a caught exception is a fresh object each load: compare what it says
    return [{k: (v if isinstance(v, (int, str, tuple, list, type(None))) else repr(v)) for k, v in row.items()
             if k not in ("marker", "merr")} for row in rows]   # merr says how much memory it used


def test_foreach_retry_catch_timeout_give_the_artifacts_of_a_local_run(tmp_path, cluster):
    nb = write_notebook(tmp_path / "semantics.ipynb", SEMANTICS)
    local = flowmagic("run", nb, "--marker", tmp_path / "local", store=tmp_path / "local-store")
    assert local.returncode == 0, local.stdout + local.stderr
    remote = flowmagic("run", nb, "--marker", tmp_path / "dask", "--executor", executor(cluster),
                       store=tmp_path / "dask-store")
    assert remote.returncode == 0, remote.stdout + remote.stderr
    for step in STEPS:
        assert comparable(artifacts(tmp_path / "dask-store", "Semantics", 1, step)) == \
            comparable(artifacts(tmp_path / "local-store", "Semantics", 1, step)), step
    assert artifacts(tmp_path / "dask-store", "Semantics", 1, "end")[0]["summary"] == (14, "second", None, None, None)
    # the output streamed back to the console, from tasks that ran under the Dask workers
    for i in range(4):
        assert f"fit {i} on-worker True" in remote.stdout
        assert f"fit {i} on-worker False" in local.stdout
    (flaky,) = tasks(tmp_path / "dask-store", "Semantics", 1, "flaky")
    assert [a.outcome for a in attempts(tmp_path / "dask-store", flaky.task_id)] == ["failed", "ok"]
    (slow,) = tasks(tmp_path / "dask-store", "Semantics", 1, "slow")
    assert slow.state == "caught"
    assert "timeout of 2 s" in repr(artifacts(tmp_path / "dask-store", "Semantics", 1, "slow")[0]["terr"])
    for store in ("dask-store", "local-store"):   # --memory: the watchdog killed it on the worker too
        assert "out of memory: step 'hungry'" in repr(artifacts(tmp_path / store, "Semantics", 1, "hungry")[0]["merr"])


def test_a_step_sends_only_itself_to_the_cluster(tmp_path, cluster):
    where = "import psutil\non = any('dask worker' in ' '.join(p.cmdline()) for p in psutil.Process().parents())"
    nb = write_notebook(tmp_path / "mixed.ipynb", [
        f"%%step start\n{where}\nhere = on",
        f"%%step heavy --executor dask\n{where}\nthere = on",
    ])
    proc = flowmagic("run", nb, store=tmp_path / "store", env={"FLOWMAGIC_DASK_SCHEDULER": cluster.address})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert artifacts(tmp_path / "store", "Mixed", 1, "start")[0]["here"] is False
    assert artifacts(tmp_path / "store", "Mixed", 1, "heavy")[0]["there"] is True
    bare = flowmagic("run", nb, store=tmp_path / "store2", env={"FLOWMAGIC_DASK_SCHEDULER": ""})
    assert bare.returncode == 2 and "step 'heavy' (cell 2) has --executor dask" in bare.stderr


def test_an_unreachable_scheduler_is_one_line_exit_2_and_nothing_recorded(tmp_path):
    nb = write_notebook(tmp_path / "lonely.ipynb", ["%%step start\nx = 1"])
    store = tmp_path / "store"
    proc = flowmagic("run", nb, "--executor", f"dask://127.0.0.1:{free_port()}", store=store,
                     env={"FLOWMAGIC_DASK_CONNECT_TIMEOUT": "2"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach the Dask scheduler at tcp://127.0.0.1:" in lines[0], proc.stderr
    assert "No run was recorded" in lines[0]
    s = open_store(store)
    try:
        assert s.meta.list_runs("Lonely") == []
    finally:
        s.close()
    bad = flowmagic("run", nb, "--executor", "yarn://x", store=store)
    assert bad.returncode == 2 and "expected local or dask://HOST:PORT" in bad.stderr


def test_ctrl_c_kills_the_tasks_running_on_the_workers(tmp_path, cluster):
    from runtime_helpers import wait_gone

    marker = tmp_path / "int"
    nb = write_notebook(tmp_path / "interrupted.ipynb", [
        "%%params\nmarker = ''",
        "%%step start\nitems = [0, 1]",
        "%%step work --foreach items\nimport os, time\nprint('working', input, flush=True)\n"
        "open(f'{marker}.{input}', 'w').write(str(os.getpid()))\ntime.sleep(120)\nr = input",
    ])
    with reaped(start_flowmagic("run", nb, "--marker", marker, "--executor", executor(cluster),
                                store=tmp_path / "store")) as proc:
        for i in (0, 1):
            wait_for(Path(f"{marker}.{i}"))
        time.sleep(0.3)
        pids = [int(Path(f"{marker}.{i}").read_text()) for i in (0, 1)]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1, out
    assert "working 0" in out and "working 1" in out   # streamed while they ran
    assert wait_gone(pids, 15) == []
    assert run_record(tmp_path / "store", "Interrupted", 1).status == "interrupted"
    assert {t.state for t in tasks(tmp_path / "store", "Interrupted", 1, "work")} == {"interrupted"}


def test_a_worker_killed_mid_task_the_task_runs_elsewhere_and_the_run_succeeds(tmp_path, cluster):
    marker = tmp_path / "kill"
    nb = write_notebook(tmp_path / "killed.ipynb", [
        "%%params\nmarker = ''",
        "%%step start\nitems = [0, 1]",
        "%%step fit --foreach items\nimport os, time\n"
        "if input == 0 and not os.path.exists(marker + '.killed'):\n"
        "    open(marker + '.pid', 'w').write(str(os.getpid()))\n    time.sleep(120)\ny = input + 10",
    ])
    with reaped(start_flowmagic("run", nb, "--marker", marker, "--executor", executor(cluster),
                                store=tmp_path / "store")) as proc:
        wait_for(marker.with_suffix(".pid"))
        time.sleep(0.2)
        task = psutil.Process(int(marker.with_suffix(".pid").read_text()))
        workers = {p.pid for p in cluster.worker_processes()}
        (worker,) = [p for p in task.parents() if p.pid in workers]
        marker.with_suffix(".killed").touch()
        os.kill(worker.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    assert [row["y"] for row in artifacts(tmp_path / "store", "Killed", 1, "fit")] == [10, 11]
    first = tasks(tmp_path / "store", "Killed", 1, "fit")[0]
    assert [a.outcome for a in attempts(tmp_path / "store", first.task_id)] == ["ok"]   # Dask re-ran it, not --retry
    assert run_record(tmp_path / "store", "Killed", 1).status == "succeeded"
    cluster.wait_for_workers(2)   # the nanny restarted it: the next test has both


def test_the_scheduler_lost_mid_run_fails_it_and_resume_completes_it_on_a_new_one(tmp_path, cluster):
    marker = tmp_path / "lost"
    block = marker.with_suffix(".block")
    block.touch()
    nb = write_notebook(tmp_path / "lost.ipynb", [
        "%%params\nmarker = ''",
        "%%step start\nx = 1",
        "%%step slow\nimport os, time\nopen(marker + '.started', 'w').close()\n"
        "while os.path.exists(marker + '.block'):\n    time.sleep(0.2)\ny = x + 1",
        "%%step end\nz = y * 2",
    ])
    store = tmp_path / "store"
    with dask_cluster(1) as doomed:
        with reaped(start_flowmagic("run", nb, "--marker", marker, "--executor", executor(doomed),
                                    store=store)) as proc:
            wait_for(marker.with_suffix(".started"))
            doomed.stop()
            out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, out
    assert "lost the Dask scheduler" in out and "Traceback" not in out, out   # one line, not Dask's logs
    assert run_record(store, "Lost", 1).status == "failed"
    block.unlink()
    done = flowmagic("resume", nb, "--executor", executor(cluster), store=store)
    assert done.returncode == 0, done.stdout + done.stderr
    assert run_record(store, "Lost", 2).status == "succeeded"
    assert artifacts(store, "Lost", 2, "end") == [{"z": 4}]


def test_flow_run_in_a_kernel_sends_the_run_to_the_cluster(tmp_path, cluster):
    from conftest import LiveKernel, kernel_env

    where = "import psutil\non = any('dask worker' in ' '.join(p.cmdline()) for p in psutil.Process().parents())"
    kernel = LiveKernel(tmp_path, kernel_env(tmp_path / "store", FLOWMAGIC_DASK_CONNECT_TIMEOUT="3"))
    try:
        kernel.ok("%load_ext flowmagic\n%flow name KernelDask")
        kernel.ok("%%step start\nitems = [1, 2, 3]")
        kernel.ok(f"%%step fit --foreach items\n{where}\nprint('fitting', input, 'on-worker', on)\nsq = input ** 2")
        execution = kernel.ok(f"r = %flow run --executor dask://{cluster.address}")
        for i in (1, 2, 3):
            assert f"fitting {i} on-worker True" in execution.stdout   # streamed into the cell
        assert kernel.value("[t.data.sq for t in r['fit']]") == [1, 4, 9]
        bad = kernel.execute(f"%flow run --executor dask://127.0.0.1:{free_port()}")
        said = bad.stderr + bad.error_text + bad.stdout
        assert "cannot reach the Dask scheduler" in said and "Traceback" not in said, said
        assert kernel.value("1 + 1") == 2   # the kernel lives on
    finally:
        kernel.shutdown()
