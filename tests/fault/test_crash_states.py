"""A run whose orchestrator was SIGKILLed is shown as crashed, gc treats it as
finished, and a plain resume picks it up with its parameters."""
from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path


from runtime_helpers import artifacts, flowmagic_json, reaped, sigkill, start_flowmagic, write_notebook
from flowmagic.store import open_store
from flowmagic.store.metadata import Metadata
from flowmagic.store.schema import SCHEMA

NB = [
    "import os, time",
    "%%params\nn = 1  # a number\nhold = ''  # a file the slow step waits for",
    "%%step start\nx = n * 10",
    "%%step slow\nwhile hold and not os.path.exists(hold):\n    time.sleep(0.05)\ny = x + 1",
    "%%step end\nz = y + 1",
]


def wait_for_running_task(store: Path, flow: str, step: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (store / "metadata.sqlite").exists():
            s = open_store(store)
            try:
                runs = s.meta.list_runs(flow) if flow in s.meta.list_flows() else []
                if runs and any(t.step == step and t.state == "running"
                                for t in s.meta.tasks(flow, runs[0].run_id)):
                    return
            finally:
                s.close()
        time.sleep(0.05)
    raise AssertionError(f"step {step} never started")


def test_a_sigkilled_run_is_crashed_gc_frees_it_and_plain_resume_picks_it(tmp_path):
    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "crash.ipynb", NB)
    assert flowmagic_json("run", nb, store=store)["status"] == "succeeded"  # run 1: a finished run

    hold = tmp_path / "go"
    proc = start_flowmagic("run", nb, "--n", "7", "--hold", str(hold), store=store)
    with reaped(proc):
        wait_for_running_task(store, "Crash", "slow")
        sigkill(proc)

    status = flowmagic_json("status", nb, store=store)
    assert [(r["run_id"], r["status"]) for r in status["runs"]] == [(2, "crashed"), (1, "succeeded")]
    from flowmagic.client import Run
    assert Run("Crash/2", root=store).status == "crashed"
    # Its unfinished task reads as crashed too, everywhere: logs, dump's tasks, the Client.
    logs = flowmagic_json("logs", nb, "2", store=store)
    assert {t["step"]: t["state"] for t in logs["tasks"]} == {"start": "done", "slow": "crashed"}
    slow = Run("Crash/2", root=store)["slow"].task
    assert slow.state == "crashed" and slow.finished and not slow.successful

    hold.touch()
    doc = flowmagic_json("resume", nb, store=store)  # no run id: the crashed run, with n=7
    assert doc["origin_run_id"] == 2 and doc["status"] == "succeeded"
    assert artifacts(store, "Crash", doc["run_id"], "end") == [{"z": 72}]

    gc = flowmagic_json("gc", nb, "--keep", "1", store=store)  # crashed counts as finished
    assert sorted(r["run_id"] for r in gc["runs_removed"]) == [1, 2]


def test_a_live_run_stays_running(tmp_path):
    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "crash.ipynb", NB)
    hold = tmp_path / "go"
    proc = start_flowmagic("run", nb, "--hold", str(hold), store=store)
    try:
        wait_for_running_task(store, "Crash", "slow")
        status = flowmagic_json("status", nb, store=store)
        assert status["runs"][0]["status"] == "running"
        gc = flowmagic_json("gc", nb, "--keep", "0", store=store)
        assert gc["runs_removed"] == []
        hold.touch()
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()


def test_a_store_made_before_the_pid_columns_opens_and_gains_them(tmp_path):
    old_schema = "\n".join(line for line in SCHEMA.splitlines() if "orchestrator_" not in line)
    db = tmp_path / "metadata.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO schema_info VALUES ('version', '1')")
    conn.execute("INSERT INTO flows VALUES ('Old', 2, 0)")
    conn.execute("INSERT INTO runs (flow, run_id, status, params, code, started_at) VALUES"
                 " ('Old', 1, 'running', '{}', '{}', 0)")
    conn.commit()
    conn.close()
    meta = Metadata(db)
    try:
        run = meta.get_run("Old", 1)
        assert run.status == "running" and run.orchestrator_pid is None  # no pid: cannot tell, left as is
        assert meta.new_run("Old", params={}, code={}) == 2
        assert meta.get_run("Old", 2).orchestrator_pid == os.getpid()
    finally:
        meta.close()
    cols = {r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(runs)")}
    assert {"orchestrator_pid", "orchestrator_started", "orchestrator_host"} <= cols
