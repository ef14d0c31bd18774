"""A wide foreach on one machine: time, tasks/s and the orchestrator's RSS.

    python benchmarks/bench_scale.py [--tasks 1000 10000 100000] [--metaflow 1000]

Each size is one whole `flowmagic run` of start -> work --foreach (N trivial
tasks) -> join -> end, in a fresh temp dir. The orchestrator's RSS (the
`flowmagic` process alone, not its fork server or tasks) is sampled every
0.2 s with psutil; the peak is reported, and each size's peak over the
smallest size's (the target: within 1.5x from 1,000 to 100,000 tasks).
With --metaflow N, the real `metaflow` package runs the same flow on N
tasks in the same run (bench_runtime.py's flow, its default 16 workers), and
the per-task overheads are compared.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtime import (_env, compile_flowmagic, flowmagic_cmd, metaflow_cmd, metaflow_foreach,  # noqa: E402
                           notebook_foreach, timed)


def run_sampled(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of the command's own process."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.2)
    out = proc.communicate()[0]
    took = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}")
    return took, peak


def bench_flowmagic(n: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        nb = notebook_foreach(Path(tmp) / "foreach_flow.ipynb", n)
        return run_sampled(flowmagic_cmd("run", str(nb)), Path(tmp), _env(Path(tmp)))


def bench_metaflow(n: int) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-scale-mf-") as tmp:
        script = Path(tmp) / "foreach.py"
        script.write_text(metaflow_foreach("ForeachFlow"))
        return timed(metaflow_cmd(script, "run", "--max-num-splits", str(n + 1)), Path(tmp),
                     _env(Path(tmp), BENCH_N=str(n)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--metaflow", type=int, default=0, metavar="N", help="also run metaflow on N tasks")
    args = parser.parse_args()
    compile_flowmagic()
    rows = []
    for n in sorted(args.tasks):
        took, peak = bench_flowmagic(n)
        rows.append((n, took, peak))
        print(f"  done: {n:,} tasks in {took:.1f} s, RSS {peak / 1e6:.0f} MB", file=sys.stderr, flush=True)
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'tasks':>8} {'wall s':>8} {'tasks/s':>8} {'ms/task':>8} {'RSS MB':>8} {'RSS x':>6}")
    for n, took, peak in rows:
        print(f"{n:>8,} {took:>8.1f} {n / took:>8.0f} {took / n * 1000:>8.2f} {peak / 1e6:>8.0f} "
              f"{peak / rows[0][2]:>6.2f}")
    if args.metaflow:
        mf = bench_metaflow(args.metaflow)
        fm, _peak = bench_flowmagic(args.metaflow)
        print(f"\n{args.metaflow:,} tasks: metaflow {mf:.1f} s ({mf / args.metaflow * 1000:.0f} ms/task), "
              f"flowmagic {fm:.1f} s ({fm / args.metaflow * 1000:.1f} ms/task): {mf / fm:.1f}x")


if __name__ == "__main__":
    main()
