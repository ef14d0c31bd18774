"""Per-task overhead of the Dask executor vs the local fork server.

    python benchmarks/bench_dask.py [--tasks 200 1000] [--workers 2]

Starts a real cluster (tests/dask_cluster.py: `dask scheduler` and WORKERS
`dask worker --nthreads 1` processes on 127.0.0.1), then runs the same
start -> work --foreach (N trivial tasks) -> join -> end notebook with
`flowmagic run` locally and with `--executor dask://...`, each in a fresh
store. Overhead per task is the difference between the run's recorded time
at N tasks and at a 10-task run, over N - 10: the connect, the fork server
starts and the other steps cancel out.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
from bench_runtime import _env, flowmagic_cmd, flowmagic_run_seconds, notebook_foreach  # noqa: E402
from dask_cluster import dask_cluster  # noqa: E402

BASE = 10


def run_seconds(n: int, executor: str | None) -> float:
    with tempfile.TemporaryDirectory(prefix="bench-dask-") as tmp:
        nb = notebook_foreach(Path(tmp) / "foreach_flow.ipynb", n)
        extra = ["--executor", executor] if executor else []
        proc = subprocess.run(flowmagic_cmd("run", str(nb), *extra), cwd=tmp, env=_env(Path(tmp)),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"run exited {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
        return flowmagic_run_seconds(Path(tmp), "ForeachFlow")


def per_task(n: int, executor: str | None) -> float:
    return (run_seconds(n, executor) - run_seconds(BASE, executor)) / (n - BASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with dask_cluster(args.workers) as cluster:
        address = f"dask://{cluster.address}"
        print(f"cluster: {args.workers} workers x 1 thread at {cluster.address}")
        print(f"{'tasks':>7} {'local ms/task':>14} {'dask ms/task':>13} {'ratio':>6}")
        for n in args.tasks:
            local, remote = per_task(n, None), per_task(n, address)
            print(f"{n:>7} {local * 1e3:>14.2f} {remote * 1e3:>13.2f} {remote / local:>6.1f}x", flush=True)


if __name__ == "__main__":
    main()
