"""A step printing 1 GB: the orchestrator's memory and the store stay
bounded, the stored log keeps the head and the tail around one marker line,
and the sizes are configurable (FLOWMAGIC_LOG_HEAD / FLOWMAGIC_LOG_TAIL)."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from runtime_helpers import command, drain_cell, env_for, flowmagic, peak_rss_until_exit, write_notebook
from flowmagic.runtime.orchestrator.logs import CappedLog, LogLimits, OutputBudget

MB = 1 << 20


def _printing_notebook(tmp_path: Path, megabytes: int) -> Path:
    return write_notebook(tmp_path / f"print{megabytes}.ipynb", [
        "%%step start\nimport sys\nchunk = ('x' * 1023 + '\\n') * 1024\n"
        f"print('the start')\nfor i in range({megabytes}):\n    sys.stdout.write(chunk)\nprint('the end')\nx = 1",
        "%%step end\ny = x",
    ])


def _peak_rss_of_run(nb: Path, store: Path, **env: str) -> int:
    """Run the console command (its output to /dev/null) and sample its RSS until it exits."""
    proc = subprocess.Popen([*command(), "run", str(nb)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**env_for(store), **env})
    peak = peak_rss_until_exit(proc)
    assert proc.wait() == 0, proc.stderr.read()
    proc.stderr.close()
    return peak


def _store_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_step_printing_1_gb_keeps_the_orchestrator_and_the_store_small(tmp_path):
    small = _peak_rss_of_run(_printing_notebook(tmp_path, 1), tmp_path / "small")
    store = tmp_path / "big"
    big = _peak_rss_of_run(_printing_notebook(tmp_path, 1024), store)
    print(f"orchestrator peak RSS: 1 MB printed {small / MB:.0f} MB, 1 GB printed {big / MB:.0f} MB; "
          f"store {_store_bytes(store) / MB:.1f} MB")
    assert big - small < 150 * MB
    assert _store_bytes(store) - _store_bytes(tmp_path / "small") < 4 * MB   # 1 MiB head + 1 MiB tail

    logs = flowmagic("logs", tmp_path / "print1024.ipynb", "1/start", store=store).stdout
    assert logs.count("the start") == 1 and logs.count("the end") == 1
    assert f"... {1024 * MB + 18 - 2 * MB:,} bytes omitted ...\n" in logs


def test_head_and_tail_sizes_come_from_the_environment(tmp_path):
    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "few.ipynb", [
        "%%step start\nfor i in range(1000):\n    print(f'line {i:04d}')\nx = 1"])
    _peak_rss_of_run(nb, store, FLOWMAGIC_LOG_HEAD="20", FLOWMAGIC_LOG_TAIL="10")
    logs = flowmagic("logs", nb, "1/start", "--json", store=store).stdout
    import json

    [task] = json.loads(logs)["tasks"]
    assert task["attempts"][0]["stdout"] == "line 0000\nline 0001\n... 9,970 bytes omitted ...\nline 0999\n"


def test_a_bad_size_is_a_clear_error(tmp_path):
    nb = write_notebook(tmp_path / "bad.ipynb", ["%%step start\nx = 1"])
    proc = subprocess.run([*command(), "run", str(nb)], capture_output=True, text=True,
                          env={**env_for(tmp_path / "store"), "FLOWMAGIC_LOG_HEAD": "lots"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "FLOWMAGIC_LOG_HEAD='lots': expected a number of bytes" in proc.stdout + proc.stderr
    assert "no runs yet" in flowmagic("status", nb, store=tmp_path / "store").stdout   # refused before the run


@pytest.mark.parametrize("chunks, head, tail, expected", [
    ([b"abc"], 10, 10, "abc"),                                   # short: whole
    ([b"abc", b"def"], 3, 3, "abcdef"),                          # exactly head + tail: whole
    ([b"ab\n", b"cdefgh", b"ij"], 3, 2, "ab\n... 6 bytes omitted ...\nij"),
    ([b"abc"] * 5, 2, 0, "ab\n... 13 bytes omitted ...\n"),       # no tail kept
    ([b"x" * 100], 0, 4, "... 96 bytes omitted ...\nxxxx"),      # no head kept
    (["h\u00e9llo w\u00f6rld".encode()], 2, 5, "h\n... 7 bytes omitted ...\n\u00f6rld"),
    ([b"a", "\u00e9\u00e9".encode()], 1, 3, "a\n... 2 bytes omitted ...\n\u00e9"),  # a cut character dropped
])
def test_capped_log_keeps_head_marker_tail(chunks, head, tail, expected):
    log = CappedLog(LogLimits(head, tail))
    for chunk in chunks:
        log.append(chunk)
    assert log.text() == expected


def test_output_budget_waits_for_room_and_gives_up_after_its_patience():
    budget = OutputBudget(limit=10, patience=0.2)
    budget.take(8)
    budget.take(8)            # room left (8 < 10): no wait
    started = time.monotonic()
    budget.take(1)            # 16 queued: waits its patience, then goes on
    assert time.monotonic() - started >= 0.2
    budget.give_back(17)
    started = time.monotonic()
    budget.take(1)
    assert time.monotonic() - started < 0.1


@pytest.mark.slow
def test_a_step_printing_1_gb_in_a_kernel_keeps_the_kernel_small(live_kernel):
    """The kernel is the orchestrator: IPython 9 keeps every write of a cell
    (history outputs), so task output goes to the cell past that tee."""
    import threading

    assert drain_cell(live_kernel, "%load_ext flowmagic\n%flow name Printer") == (0, [])
    assert drain_cell(live_kernel, "%%step warm\nx = 1")[1] == []
    kernel = psutil.Process(live_kernel.pid)
    base = peak = kernel.memory_info().rss
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, kernel.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        count, errors = drain_cell(live_kernel, "%%step big\nimport sys\nchunk = ('x' * 1023 + '\\n') * 1024\n"
                                            "for i in range(1024):\n    sys.stdout.write(chunk)\ny = 1")
    finally:
        done.set()
        sampler.join()
    print(f"kernel RSS {base / MB:.0f} MB before, peak {peak / MB:.0f} MB while a step printed 1 GB")
    assert errors == [] and count == 1024 * MB   # every byte reached the cell
    assert peak - base < 150 * MB
