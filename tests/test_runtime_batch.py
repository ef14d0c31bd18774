"""Short foreach tasks sharing a forked process (worker/batch.py): real fork server, real store.

Each test compares what a batched run gives with what one process per task
gives (FLOWMAGIC_BATCH=1), since that is the promise: batching is invisible
except in speed.
"""
from __future__ import annotations

import time

import pytest

from flowmagic.errors import UsageError
from flowmagic.flow.graph import build_flow
from flowmagic.runtime.orchestrator.scheduler import run_flow
from flowmagic.store import load_artifact, open_store
from tests.runtime_helpers import flowmagic, write_notebook


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    yield s
    s.close()


def step_values(store, flow: str, run_id: int, step: str) -> list[dict]:
    tasks = sorted(store.meta.tasks(flow, run_id, step), key=lambda t: t.index or ())
    return [{r.name: load_artifact(store.objects, r) for r in store.meta.artifacts(t.task_id)
             if r.serializer != "unsaved"} for t in tasks]


def run(cells, store, tmp_path, name, monkeypatch, batch: int | None = None, **kw):
    if batch is None:
        monkeypatch.delenv("FLOWMAGIC_BATCH", raising=False)
    else:
        monkeypatch.setenv("FLOWMAGIC_BATCH", str(batch))
    return run_flow(build_flow(cells, name=name), store, workdir=str(tmp_path), **kw)


def batched_and_alone(cells, store, tmp_path, name, monkeypatch) -> tuple[list[dict], list[dict]]:
    """The values of step ``each``, batched and with one process per task (FLOWMAGIC_BATCH=1)."""
    batched = run(cells, store, tmp_path, f"{name}Batched", monkeypatch)
    alone = run(cells, store, tmp_path, f"{name}Alone", monkeypatch, batch=1)
    assert batched.status == alone.status == "succeeded"
    return (step_values(store, f"{name}Batched", batched.run_id, "each"),
            step_values(store, f"{name}Alone", alone.run_id, "each"))


def test_short_tasks_share_processes_and_give_what_one_process_each_gives(store, tmp_path, monkeypatch):
    cells = ["%%step start\nimport os, random\nimport numpy as np\nitems = list(range(200))",
             "%%step each --foreach items\nsq = input ** 2\npid = os.getpid()\nr = random.random()\n"
             "g = float(np.random.random())\nos.environ['SEEN'] = os.environ.get('SEEN', '') + 'x'\n"
             "seen = os.environ['SEEN']"]
    got, want = batched_and_alone(cells, store, tmp_path, "Batched", monkeypatch)
    assert [v["sq"] for v in got] == [v["sq"] for v in want] == [i * i for i in range(200)]
    assert len({v["pid"] for v in want}) == 200                 # FLOWMAGIC_BATCH=1: a process per task
    assert len({v["pid"] for v in got}) < 150                   # batched: processes ran several tasks
    assert len({v["r"] for v in got}) == 200                    # random reseeded per task, as after a fork
    # numpy's global state: as the fork server had it (if it imported numpy) or freshly seeded, batched or not
    assert len({v["g"] for v in got}) == len({v["g"] for v in want})
    assert {v["seen"] for v in got} == {v["seen"] for v in want} == {"x"}   # os.environ put back


def test_numpy_drawn_in_a_batch_starts_from_the_fork_servers_state(store, tmp_path, monkeypatch):
    cells = ["import numpy as np\nimport numpy.random",   # the fork server holds numpy's random state: forks share it
             "%%step start\nitems = list(range(50))",
             "%%step each --foreach items\nimport os\ng = float(np.random.random())\npid = os.getpid()"]
    got, want = batched_and_alone(cells, store, tmp_path, "Numpy", monkeypatch)
    assert len({v["g"] for v in want}) == 1 and {v["g"] for v in got} == {v["g"] for v in want}
    assert len({v["pid"] for v in got}) < 50


def test_each_task_of_a_batch_keeps_its_own_output(store, tmp_path, monkeypatch):
    cells = ["%%step start\nitems = list(range(60))",
             "%%step each --foreach items\nimport sys\nprint('out', input)\nprint('err', input, file=sys.stderr)\n"
             "v = input"]
    events = []
    result = run(cells, store, tmp_path, "Outputs", monkeypatch, on_event=events.append)
    assert result.status == "succeeded"
    tasks = sorted(store.meta.tasks("Outputs", result.run_id, "each"), key=lambda t: t.index)
    for k, task in enumerate(tasks):
        [attempt] = store.meta.attempts(task.task_id)
        assert (attempt.stdout, attempt.stderr) == (f"out {k}\n", f"err {k}\n")
    shown = {(e.label, e.text) for e in events if e.kind == "output"}
    assert all((f"each/{k}", f"out {k}\n") in shown for k in range(60))


def test_a_prelude_list_changed_in_place_is_never_handed_to_the_next_task(store, tmp_path, monkeypatch):
    cells = ["seen = []\ndef note(x):\n    seen.append(x)\n    return len(seen)",
             "%%step start\nitems = list(range(40))",
             "%%step each --foreach items\nn = note(input)"]
    result = run(cells, store, tmp_path, "Mutates", monkeypatch)
    assert result.status == "succeeded"
    assert [v["n"] for v in step_values(store, "Mutates", result.run_id, "each")] == [1] * 40


def test_a_thread_left_running_ends_the_batch_and_the_rest_still_run(store, tmp_path, monkeypatch):
    cells = ["%%step start\nitems = list(range(40))",
             "%%step each --foreach items\nimport threading, time\n"
             "if input == 10:\n    threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n"
             "v = input + 1"]
    result = run(cells, store, tmp_path, "Thread", monkeypatch)
    assert result.status == "succeeded"
    assert [v["v"] for v in step_values(store, "Thread", result.run_id, "each")] == list(range(1, 41))


def test_a_timeout_in_a_batch_kills_that_task_only(store, tmp_path, monkeypatch):
    cells = ["%%step start\nitems = list(range(40))",
             "%%step each --foreach items --timeout 2 --catch err\nimport time\nif input == 30:\n"
             "    time.sleep(60)\nv = input",
             "%%step end\nerrors = [e['type'] if e else None for e in err]\nvs = v"]
    started = time.monotonic()
    result = run(cells, store, tmp_path, "Timeout", monkeypatch)
    assert result.status == "succeeded" and time.monotonic() - started < 30
    [end] = step_values(store, "Timeout", result.run_id, "end")
    assert end["errors"] == [None] * 30 + ["TimeoutError"] + [None] * 9
    assert end["vs"] == list(range(30)) + [None] + list(range(31, 40))
    states = [t.state for t in sorted(store.meta.tasks("Timeout", result.run_id, "each"), key=lambda t: t.index)]
    assert states == ["done"] * 30 + ["caught"] + ["done"] * 9


def test_a_process_that_dies_mid_batch_costs_one_attempt_of_one_task(store, tmp_path, monkeypatch):
    marker = tmp_path / "died-once"
    cells = ["%%step start\nitems = list(range(40))",
             f"%%step each --foreach items --retry 1\nimport os\nif input == 25 and not os.path.exists({str(marker)!r}):\n"
             f"    open({str(marker)!r}, 'w').close()\n    os._exit(3)\nv = input * 10"]
    result = run(cells, store, tmp_path, "Dies", monkeypatch)
    assert result.status == "succeeded"
    assert [v["v"] for v in step_values(store, "Dies", result.run_id, "each")] == [i * 10 for i in range(40)]
    tasks = sorted(store.meta.tasks("Dies", result.run_id, "each"), key=lambda t: t.index)
    tries = [len(store.meta.attempts(t.task_id)) for t in tasks]
    assert tries == [1] * 25 + [2] + [1] * 14          # the tasks after it in its batch ran again, unattributed
    first = store.meta.attempts(tasks[25].task_id)[0]
    assert first.exit_code == 3


def test_a_segfault_mid_batch_is_caught_for_that_task(store, tmp_path, monkeypatch):
    cells = ["%%step start\nitems = list(range(30))",
             "%%step each --foreach items --catch err\nimport ctypes\nif input == 20:\n    ctypes.string_at(0)\n"
             "v = input",
             "%%step end\nerrors = [e['type'] if e else None for e in err]"]
    result = run(cells, store, tmp_path, "Segv", monkeypatch)
    assert result.status == "succeeded"
    [end] = step_values(store, "Segv", result.run_id, "end")
    assert end["errors"][:20] == [None] * 20 and end["errors"][21:] == [None] * 9
    assert end["errors"][20] is not None


def test_a_bad_flowmagic_batch_is_a_usage_error(store, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWMAGIC_BATCH", "0")
    with pytest.raises(UsageError, match="FLOWMAGIC_BATCH='0'"):
        run_flow(build_flow(["%%step start\nx = 1"], name="Bad"), store, workdir=str(tmp_path))
    nb = write_notebook(tmp_path / "bad.ipynb", ["%%step start\nx = 1"])
    proc = flowmagic("run", nb, store=tmp_path / "cli-store", env={"FLOWMAGIC_BATCH": "many"})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "FLOWMAGIC_BATCH='many'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "cli-store" / "runs").exists() or not any((tmp_path / "cli-store" / "runs").iterdir())


def test_a_metadata_transaction_commits_what_was_written_even_when_interrupted(tmp_path):
    s = open_store(tmp_path / "store")
    try:
        with pytest.raises(KeyboardInterrupt):
            with s.meta.transaction():
                s.meta.new_run("Tx", params={}, code={})
                raise KeyboardInterrupt
        other = open_store(tmp_path / "store")   # another connection sees it: committed
        try:
            assert [r.run_id for r in other.meta.list_runs("Tx")] == [1]
        finally:
            other.close()
    finally:
        s.close()


def test_a_join_over_more_tasks_than_a_spec_carries_reads_them_from_the_store(store, tmp_path, monkeypatch):
    from flowmagic.runtime.orchestrator.inputs import GATHER_STORED_AT

    n = GATHER_STORED_AT + 200   # the gathered binding is streamed into the store, the refs read back from SQLite
    cells = [f"%%step start\nitems = list(range({n}))", "%%step each --foreach items\ny = input * 2\nz = -input",
             "%%step join\ntotal = sum(y)\ncount = len(y)\n"
             "pairs = [(i.y, i.z) for i in inputs]\nlast = inputs[-1].y"]   # `inputs` (Metaflow's join) too
    result = run(cells, store, tmp_path, "Wide", monkeypatch)
    assert result.status == "succeeded"
    [join] = step_values(store, "Wide", result.run_id, "join")
    assert join == {"total": sum(2 * i for i in range(n)), "count": n,
                    "pairs": [(2 * i, -i) for i in range(n)], "last": 2 * (n - 1)}
    heads = [store.objects.get_bytes(key)[:10] for key in store.objects.keys() if store.objects.size(key) > 50_000]
    assert sorted(h[:3] for h in heads) == [b'[{"', b'{"l'], heads   # y and inputs went through the store
