"""A running task's output is in the store while it runs (every
FLOWMAGIC_LOG_FLUSH seconds), bounded like the final log, so a hung, killed
or crashed task's output so far can be read: `flowmagic logs`, the Client."""
from __future__ import annotations

import random
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from runtime_helpers import (command, drain_cell, env_for, flowmagic, flowmagic_json, peak_rss_until_exit, reaped,
                             sigkill, start_flowmagic, wait_idle_counting, write_notebook)
from flowmagic.runtime.orchestrator.logs import CappedLog, LiveLog, LogLimits
from flowmagic.store.logtext import capped_text, omitted_marker
from flowmagic.store.metadata import Metadata
from flowmagic.store.schema import SCHEMA

WAIT = 120   # seconds: the machine is shared and loaded


def _holding_notebook(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """A flow whose step runs ``body``, writes a file, then waits for a second file."""
    printed, go = tmp_path / "printed", tmp_path / "go"
    nb = write_notebook(tmp_path / "live.ipynb", [
        "import os, sys, time",
        f"%%step start\n{body}\nsys.stdout.flush()\nopen({str(printed)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\nx = 1",
        "%%step end\ny = x",
    ])
    return nb, go


def _until(check, what: str, timeout: float = WAIT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"never: {what}")


def _logs_text(nb: Path, store: Path, pathspec: str = "1/start") -> str:
    proc = flowmagic("logs", nb, pathspec, store=store)
    return proc.stdout if proc.returncode == 0 else ""


def _live_rows(store: Path) -> tuple[int, int]:
    """(running_attempts rows, bytes in live_log_chunks)."""
    conn = sqlite3.connect(store / "metadata.sqlite")
    try:
        running = conn.execute("SELECT COUNT(*) FROM running_attempts").fetchone()[0]
        size = conn.execute("SELECT COALESCE(SUM(LENGTH(CAST(text AS BLOB))), 0) FROM live_log_chunks").fetchone()[0]
        return running, size
    finally:
        conn.close()


def test_output_is_readable_while_the_step_runs(tmp_path):
    store = tmp_path / "store"
    nb, go = _holding_notebook(tmp_path, "print('hello so far')\nprint('oops', file=sys.stderr)")
    with reaped(start_flowmagic("run", nb, store=store)) as proc:
        logs = _until(lambda: "hello so far" in (t := _logs_text(nb, store)) and t, "output in flowmagic logs")
        assert "attempt 0 (running; its output so far)" in logs and "-- stderr\noops" in logs
        from flowmagic.client import Run
        task = Run("Live/1", root=store)["start"].task
        assert task.stdout == "hello so far\n" and task.stderr == "oops\n"
        assert [a.attempt for a in task.attempts] == []       # finished attempts only
        [attempt] = flowmagic_json("logs", nb, "1/start", store=store)["tasks"][0]["attempts"]
        assert (attempt["outcome"], attempt["complete"]) == ("running", False)
        go.touch()
        assert proc.wait(timeout=WAIT) == 0
    [attempt] = flowmagic_json("logs", nb, "1/start", store=store)["tasks"][0]["attempts"]
    assert (attempt["outcome"], attempt["complete"], attempt["stdout"]) == ("ok", True, "hello so far\n")
    assert _live_rows(store) == (0, 0)   # the end record replaced the chunks


def test_a_sigkilled_orchestrator_leaves_the_output_so_far(tmp_path):
    store = tmp_path / "store"
    nb, _go = _holding_notebook(tmp_path, "for i in range(3):\n    print(f'line {i}')")
    with reaped(start_flowmagic("run", nb, store=store)) as proc:
        _until(lambda: "line 2" in _logs_text(nb, store), "output in the store")
        sigkill(proc)
    logs = _logs_text(nb, store)
    assert "attempt 0 (crashed; its output so far)\nline 0\nline 1\nline 2\n" in logs
    from flowmagic.client import Run
    task = Run("Live/1", root=store)["start"].task
    assert task.state == "crashed" and task.stdout == "line 0\nline 1\nline 2\n"


def test_a_step_printing_a_lot_keeps_the_live_log_bounded(tmp_path):
    store = tmp_path / "store"
    nb, go = _holding_notebook(tmp_path, "print('the start')\nfor i in range(200_000):\n"
                                         "    print(f'line {i:06d} ' + 'x' * 200)\nprint('the end')")
    env = {**env_for(store), "FLOWMAGIC_LOG_HEAD": "4096", "FLOWMAGIC_LOG_TAIL": "4096"}
    # its 40 MB of live output go nowhere: a pipe nobody reads would stop the run
    with reaped(subprocess.Popen([*command(), "run", str(nb)], stdout=subprocess.DEVNULL, env=env)) as proc:
        logs = _until(lambda: "the end" in (t := _logs_text(nb, store)) and t, "the end in the live log")
        running, size = _live_rows(store)
        assert running == 1 and size <= 4096 + 2 * 4096 + (64 << 10) + 100   # head + 2 tails + a read + marker
        assert logs.count("the start") == 1 and " bytes omitted ...\n" in logs
        go.touch()
        assert proc.wait(timeout=WAIT) == 0
    final = flowmagic_json("logs", nb, "1/start", store=store)["tasks"][0]["attempts"][0]["stdout"]
    total = len("the start\n") + 200_000 * len("line 000000 " + "x" * 200 + "\n") + len("the end\n")
    assert final.startswith("the start\n") and final.endswith("the end\n")
    assert omitted_marker(total - 2 * 4096) in final


def test_flush_0_writes_nothing_until_the_end(tmp_path):
    store = tmp_path / "store"
    nb, go = _holding_notebook(tmp_path, "print('hello')")
    printed = tmp_path / "printed"
    proc = start_flowmagic("run", nb, store=store, extra_env={"FLOWMAGIC_LOG_FLUSH": "0"})
    with reaped(proc):
        _until(printed.exists, "the step printed")
        time.sleep(3)   # three default flush intervals
        assert _live_rows(store) == (0, 0)
        assert "hello" not in _logs_text(nb, store)
        go.touch()
        assert proc.wait(timeout=WAIT) == 0
    assert "hello" in _logs_text(nb, store)


def test_a_bad_flush_interval_is_a_clear_error(tmp_path):
    nb = write_notebook(tmp_path / "bad.ipynb", ["%%step start\nx = 1"])
    proc = subprocess.run([*command(), "run", str(nb)], capture_output=True, text=True,
                          env={**env_for(tmp_path / "store"), "FLOWMAGIC_LOG_FLUSH": "soon"}, timeout=WAIT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "FLOWMAGIC_LOG_FLUSH='soon': expected a number of seconds" in proc.stdout + proc.stderr


def test_a_store_made_before_the_live_tables_opens_and_gains_them(tmp_path):
    old_schema = SCHEMA.split("CREATE TABLE IF NOT EXISTS running_attempts")[0]
    db = tmp_path / "metadata.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(old_schema)
    conn.execute("INSERT INTO schema_info VALUES ('version', '1')")
    conn.commit()
    conn.close()
    meta = Metadata(db)
    try:
        run_id = meta.new_run("Old", params={}, code={})
        task = meta.new_task("Old", run_id, "start")
        meta.start_attempt(task, 0)
        assert [(a.outcome, a.complete) for a in meta.attempts(task, unfinished=True)] == [("running", False)]
    finally:
        meta.close()
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"running_attempts", "live_log_chunks"} <= tables


def _stored(log: LiveLog, table: dict[int, str]) -> str:
    chunks, deleted = log.flush()
    table.update(chunks)
    for seq in deleted:
        del table[seq]
    return "".join(table[s] for s in sorted(table))


@pytest.mark.parametrize("seed", range(20))
def test_the_live_log_is_the_capped_log_rule_and_stays_bounded(seed):
    rng = random.Random(seed)
    head, tail = rng.choice([0, 1, 7, 50]), rng.choice([0, 1, 9, 60])
    live, capped, table, text = LiveLog(LogLimits(head, tail)), CappedLog(LogLimits(head, tail)), {}, ""
    for _ in range(rng.randrange(1, 60)):
        piece = "".join(rng.choice("ab\n\u00e9") for _ in range(rng.randrange(1, 20)))
        text += piece
        live.append(piece)
        capped.append(piece.encode())
        stored = _stored(live, table) if rng.random() < 0.3 else None
        if stored is not None:
            assert len(stored.encode()) <= head + 2 * tail + 20 + 40   # + one piece + the marker
    stored = _stored(live, table)
    total = len(text.encode())
    if total <= head:
        assert stored == text == capped.text()
        return
    # the capped rule: head, a marker counting exactly what is missing, a suffix of the text
    data = text.encode()
    kept_head = data[:live.head_size].decode()
    kept_tail = data[len(data) - live.stored_tail_size:].decode() if live.stored_tail_size else ""
    assert stored == capped_text(kept_head, total - live.head_size - live.stored_tail_size, kept_tail)
    assert live.head_size >= min(head, total) - 1          # a character that did not fit at most
    assert live.stored_tail_size >= min(tail, total - live.head_size)


@pytest.mark.slow
def test_a_step_printing_1_gb_keeps_the_orchestrator_small_while_logs_are_written(tmp_path):
    """Console orchestrator RSS, flushing every second vs only at the end (1 GB printed)."""
    nb = write_notebook(tmp_path / "print.ipynb", [
        "%%step start\nimport sys\nchunk = ('x' * 1023 + '\\n') * 1024\n"
        "for i in range(1024):\n    sys.stdout.write(chunk)\nx = 1"])
    peaks = {}
    for flush in ("1", "0"):
        store = tmp_path / f"store{flush}"
        proc = subprocess.Popen([*command(), "run", str(nb)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**env_for(store), "FLOWMAGIC_LOG_FLUSH": flush})
        started = time.monotonic()
        peak = peak_rss_until_exit(proc)
        assert proc.wait() == 0, proc.stderr.read()
        proc.stderr.close()
        peaks[flush] = (peak, time.monotonic() - started)
        assert _live_rows(store) == (0, 0)
    (live, live_s), (end, end_s) = peaks["1"], peaks["0"]
    print(f"1 GB printed: orchestrator peak RSS {live / 2**20:.0f} MB flushing every 1 s ({live_s:.1f} s), "
          f"{end / 2**20:.0f} MB writing at the end ({end_s:.1f} s)")
    assert live - end < 100 << 20


@pytest.mark.slow
def test_a_step_in_a_kernel_has_its_output_so_far_in_the_store(live_kernel, tmp_path):
    """The kernel is the orchestrator of %%step: a step that hangs shows its output to the Client."""
    from flowmagic.client import Flow

    go = tmp_path / "go"
    assert drain_cell(live_kernel, "%load_ext flowmagic\n%flow name Held")[1] == []
    msg_id = live_kernel.kc.execute(f"%%step start\nimport os, time\nprint('so far, so good')\n"
                                    f"while not os.path.exists({str(go)!r}):\n    time.sleep(0.05)\nx = 1")

    def output_so_far() -> str:
        try:
            return Flow("Held", root=tmp_path / "store").latest_run["start"].task.stdout
        except Exception:   # noqa: BLE001 - not created yet
            return ""

    assert _until(output_so_far, "the step's output in the store") == "so far, so good\n"
    go.touch()
    assert wait_idle_counting(live_kernel, msg_id, WAIT)[1] == []
    task = Flow("Held", root=tmp_path / "store").latest_run["start"].task
    assert task.successful and task.stdout == "so far, so good\n" and len(task.attempts) == 1


