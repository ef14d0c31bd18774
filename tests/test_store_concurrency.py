"""Several real processes on one store: orchestrators, readers, task writers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import xxhash

from flowmagic.store import open_store

# An orchestrator: creates runs of one flow, each with tasks, attempts and
# artifacts, as fast as it can.
_ORCHESTRATOR = textwrap.dedent("""
    import json, sys, time
    from flowmagic.store import open_store, save_artifact
    store = open_store(sys.argv[1])
    name, count = sys.argv[2], int(sys.argv[3])
    sys.stdin.readline()                     # start together
    runs, tasks = [], []
    for i in range(count):
        run_id = store.meta.new_run("Shared", params={"by": name, "i": i}, code={"start": "x = 1"})
        task = store.meta.new_task("Shared", run_id, "start")
        ref = save_artifact(store.objects, "x", [name, i, "payload" * 50])
        store.meta.record_attempt(task, 0, outcome="ok", started_at=time.time(), finished_at=time.time(),
                                  stdout=f"{name} {i}", artifacts=[ref])
        store.meta.set_task_state(task, "done")
        store.meta.finish_run("Shared", run_id, "succeeded")
        runs.append(run_id); tasks.append(task)
    print(json.dumps({"runs": runs, "tasks": tasks}))
""")

# A reader: polls the run list while the orchestrators write.
_READER = textwrap.dedent("""
    import json, sys, time
    from flowmagic.store import open_store
    from flowmagic.store.serializers import load_artifact
    store = open_store(sys.argv[1])
    sys.stdin.readline()
    seen, loads, deadline = [], 0, time.time() + float(sys.argv[2])
    while time.time() < deadline:
        runs = store.meta.list_runs("Shared")
        seen.append(len(runs))
        for run in runs[:3]:
            if run.status != "succeeded":
                continue
            for task in store.meta.tasks("Shared", run.run_id):
                for ref in store.meta.artifacts(task.task_id):
                    assert load_artifact(store.objects, ref)[1] == run.params["i"]
                    loads += 1
    print(json.dumps({"seen": seen, "loads": loads}))
""")

# A task process: writes the same large object as the others, then a private one.
_OBJECT_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from flowmagic.store.objects import ObjectStore
    from flowmagic.store.serializers import save_artifact
    objects = ObjectStore(sys.argv[1])
    sys.stdin.readline()
    shared = save_artifact(objects, "shared", np.arange(2_000_000, dtype=np.float64))
    own = save_artifact(objects, "own", np.full(1000, int(sys.argv[2])))
    print(shared.hash, own.hash)
""")


def _start(script: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _go_and_collect(procs: list[subprocess.Popen]) -> list[str]:
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        outs.append(out)
    return outs


def test_two_orchestrators_create_runs_of_one_flow_at_once(tmp_path: Path) -> None:
    root = tmp_path / "store"
    open_store(root).close()
    per_process = 40
    procs = [_start(_ORCHESTRATOR, str(root), name, str(per_process)) for name in ("a", "b")]
    procs.append(_start(_READER, str(root), "3"))
    outs = _go_and_collect(procs)
    a, b, reader = (json.loads(o) for o in outs)

    assert a["runs"] == sorted(a["runs"]) and b["runs"] == sorted(b["runs"])  # increasing in each
    assert sorted(a["runs"] + b["runs"]) == list(range(1, 2 * per_process + 1))  # unique, no gaps
    assert len(set(a["tasks"] + b["tasks"])) == 2 * per_process

    store = open_store(root)
    runs = store.meta.list_runs("Shared")
    assert len(runs) == 2 * per_process and {r.status for r in runs} == {"succeeded"}
    for run in runs:
        (task,) = store.meta.tasks("Shared", run.run_id)
        assert store.meta.attempts(task.task_id)[0].stdout == f"{run.params['by']} {run.params['i']}"
    # the reader never failed and saw the store grow monotonically
    assert reader["seen"] == sorted(reader["seen"]) and reader["loads"] > 0


def test_task_processes_write_the_same_object_at_once(tmp_path: Path) -> None:
    objects_root = tmp_path / "objects"
    procs = [_start(_OBJECT_WRITER, str(objects_root), str(i)) for i in range(4)]
    outs = [o.split() for o in _go_and_collect(procs)]
    shared = {o[0] for o in outs}
    own = {o[1] for o in outs}
    assert len(shared) == 1 and len(own) == 4
    store = open_store(tmp_path)
    keys = set(store.objects.keys())
    assert keys == shared | own
    for key in keys:  # every object intact
        assert xxhash.xxh3_128_hexdigest(store.objects.get_bytes(key)) == key
    assert list(store.objects.tmp_dir.iterdir()) == []


def test_processes_opening_a_new_store_at_once(tmp_path: Path) -> None:
    """Six processes open each of twenty new stores at the same moment: creating
    the file and switching it to WAL race, and every opener must still succeed."""
    rounds, workers = 20, 6
    roots = [tmp_path / f"fresh{i}" for i in range(rounds)]
    script = textwrap.dedent("""
        import sys
        from flowmagic.store import open_store
        for root in sys.argv[1:]:
            sys.stdin.readline()                 # start together
            store = open_store(root)
            print(store.meta.new_run("F", params={}, code={}), flush=True)
            store.close()
    """)
    procs = [_start(script, *map(str, roots)) for _ in range(workers)]
    try:
        for _ in roots:
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
            ids = sorted(int(p.stdout.readline() or -1) for p in procs)
            assert ids == list(range(1, workers + 1)), [p.stderr.read() for p in procs if p.poll() is not None]
    finally:
        for p in procs:
            p.kill()
            p.wait()
