"""The memory watchdog (runtime/memory.py): real steps that allocate real memory.

The end-to-end CLI case (exit status, message, earlier run intact through the
Client API) is in tests/test_bad_input.py; here: the scheduler API, retry and
catch, a leaking child process, and what must *not* count (memory-mapped
inputs, pages shared with the fork server).
"""
from __future__ import annotations

import pytest

from flowmagic.flow.cells import parse_step_header
from flowmagic.flow.graph import build_flow
from flowmagic.errors import FlowDefinitionError
from flowmagic.runtime.orchestrator import memory
from flowmagic.runtime.orchestrator.scheduler import run_flow
from flowmagic.store import load_artifact, open_store

# Allocates 50 MB a round, touching every page, for up to 10 s: far past any small limit.
LEAK = """blocks = []
for _round in range(200):
    blocks.append(bytearray(b"x" * 50_000_000))
    time.sleep(0.05)
done = True"""


@pytest.fixture
def store(tmp_path):
    s = open_store(tmp_path / "store")
    yield s
    s.close()


def attempts_of(store, flow, run_id, step):
    (task,) = store.meta.tasks(flow, run_id, step)
    return task, store.meta.attempts(task.task_id)


def test_memory_option_parses_and_rejects_bad_values():
    assert parse_step_header("hog --memory 300")[1].memory == 300
    assert parse_step_header("hog")[1].memory is None
    for bad in ("0", "-5", "lots", "1.5"):
        with pytest.raises(FlowDefinitionError, match="--memory") as info:
            parse_step_header(f"hog --memory {bad}", cell=4)
        assert info.value.step == "hog" and info.value.cell == 4
    graph = build_flow(["%%step hog --memory 300\nx = 1"])
    assert graph.to_json()["steps"][0]["options"] == {"memory": 300}


def test_default_limit_is_most_of_the_machine_minus_the_orchestrator():
    import psutil

    total = psutil.virtual_memory().total
    limit = memory.default_limit()
    assert total * 0.7 < limit < total * memory.DEFAULT_FRACTION
    assert memory.limit_for(300) == 300 * 1024 * 1024


@pytest.mark.slow
def test_leaking_step_is_killed_within_seconds_and_earlier_steps_are_kept(store, tmp_path):
    graph = build_flow(["import time", "%%step start\nkept = 41", f"%%step hog --memory 300\nx = kept\n{LEAK}"],
                       name="Leak")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "failed"
    (step, line), = result.failed
    assert step == "hog" and line.startswith("MemoryError: out of memory: step 'hog' used 0.")
    assert "limit 0.29 GiB (--memory 300" in line
    task, (attempt,) = attempts_of(store, "Leak", result.run_id, "hog")
    assert attempt.finished_at - attempt.started_at < 5   # the leak alone would take 10 s and 10 GB
    assert task.state == "failed" and attempt.outcome == "killed"
    assert attempt.exception["type"] == "MemoryError"
    (start,) = store.meta.tasks("Leak", result.run_id, "start")
    (ref,) = store.meta.artifacts(start.task_id)
    assert load_artifact(store.objects, ref) == 41


@pytest.mark.slow
def test_out_of_memory_is_retried_and_caught_like_any_failure(store, tmp_path):
    graph = build_flow(["import time", f"%%step hog --memory 250 --retry 1 --catch oom\n{LEAK}",
                        "%%step after\nreport = oom['message']"], name="Caught")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "succeeded"
    task, attempts = attempts_of(store, "Caught", result.run_id, "hog")
    assert task.state == "caught" and [a.outcome for a in attempts] == ["killed", "killed"]
    (after,) = store.meta.tasks("Caught", result.run_id, "after")
    report = {r.name: load_artifact(store.objects, r) for r in store.meta.artifacts(after.task_id)}["report"]
    assert report.startswith("out of memory: step 'hog' used")


def test_a_leaking_child_process_counts_for_its_step(store, tmp_path):
    child = f"import time\n{LEAK}"
    graph = build_flow(["import subprocess, sys",
                        f"%%step spawn --memory 300\nsubprocess.run([sys.executable, '-c', {child!r}])\nok = 1"],
                       name="Child")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "failed" and "out of memory: step 'spawn'" in result.failed[0][1]
    _task, (attempt,) = attempts_of(store, "Child", result.run_id, "spawn")
    assert attempt.finished_at - attempt.started_at < 5


@pytest.mark.slow
def test_memory_mapped_inputs_and_shared_pages_do_not_count(store, tmp_path):
    # 'big' is 400 MB on disk; the reader maps and touches all of it (RSS > 400 MB),
    # but those are clean file pages, not the step's own memory: no kill at 300 MB.
    graph = build_flow(["import numpy as np",
                        "%%step make\nbig = np.ones(50_000_000)",
                        "%%step read --memory 300\ntotal = float(big.sum())"], name="Mapped")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "succeeded", result.failed
    (task,) = store.meta.tasks("Mapped", result.run_id, "read")
    (ref,) = store.meta.artifacts(task.task_id)
    assert load_artifact(store.objects, ref) == 50_000_000.0


def test_message_names_step_sizes_and_the_option():
    text = memory.out_of_memory_message("train", 3 * memory.GIB, 2 * memory.GIB, 2048)
    assert text == ("out of memory: step 'train' used 3.00 GiB, limit 2.00 GiB "
                    "(--memory 2048; raise it with --memory MB)")
    default = memory.out_of_memory_message("train", 30 * memory.GIB, 20 * memory.GIB, None)
    assert "80% of this machine's memory; set --memory MB" in default


@pytest.mark.slow
def test_export_writes_resources_and_metaflow_runs_it(tmp_path):
    import os
    import subprocess
    import sys

    from flowmagic.export import export_flow

    graph = build_flow(["%%step start\nx = 41", "%%step end --memory 300\ny = x + 1"], name="Sized")
    script = tmp_path / "sized.py"
    script.write_text(export_flow(graph))
    text = script.read_text()
    assert "@resources(memory=300)" in text and "resources" in text.split("from metaflow import ")[1].split("\n")[0]
    env = dict(os.environ, METAFLOW_HOME=str(tmp_path / "mf_home"), METAFLOW_DEFAULT_DATASTORE="local",
               METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path / "mf_store"), METAFLOW_DEFAULT_METADATA="local",
               USERNAME="tester")
    done = subprocess.run([sys.executable, str(script), "--no-pylint", "run"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.slow
def test_a_frame_several_times_the_memory_limit_is_read_through_the_mapped_store(store, tmp_path):
    # 'frame' is 5 float64 columns of 10M rows: 400 MB, four times the reader's 100 MB
    # limit. Its Arrow file is mapped, so summing one column pages in that column only,
    # as clean file pages, and the reader is not killed.
    graph = build_flow(["import numpy as np\nimport pandas as pd",
                        "%%step make\nframe = pd.DataFrame({c: np.full(10_000_000, 0.5) for c in 'abcde'})",
                        "%%step read --memory 100\ntotal = float(frame['c'].sum())"], name="BigFrame")
    result = run_flow(graph, store, workdir=str(tmp_path))
    assert result.status == "succeeded", result.failed
    (make,) = store.meta.tasks("BigFrame", result.run_id, "make")
    (frame,) = store.meta.artifacts(make.task_id)
    assert frame.size > 3.5 * 100 * 1024 * 1024   # several times the limit, on disk
    (task,) = store.meta.tasks("BigFrame", result.run_id, "read")
    (ref,) = store.meta.artifacts(task.task_id)
    assert load_artifact(store.objects, ref) == 5_000_000.0
