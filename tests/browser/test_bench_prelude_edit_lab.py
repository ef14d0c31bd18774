"""benchmarks/bench_prelude_edit_lab.py keeps working: one round, run as a user runs it.

The script starts its own JupyterLab and Chromium (the helpers in
labfixtures.py), checks every output against the RATE it typed (a step run
with the previous prelude stops it) and saves a screenshot. No timing is
asserted: the machine is shared.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.slow]
SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_prelude_edit_lab.py"


def test_the_browser_prelude_edit_benchmark_runs_one_round(tmp_path):
    shot = tmp_path / "bench.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "1", "--screenshot", str(shot)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    out = done.stdout
    for kind in ("%%step cell", "plain cell"):
        assert re.search(rf"^{re.escape(kind)}, added by the edit: +[-+]\d+ ms shown", out, re.M), out
    assert re.search(r"kernel median \d+ ms", out), out
    assert shot.stat().st_size > 10_000   # a real page, not a blank one
