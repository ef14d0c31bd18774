"""How a foreach's cost grows with its number of tasks (issue 18, item 1).

    python benchmarks/bench_foreach_scale.py [--sizes 1000,3000,10000] [--profile FILE]

For each N: a flow ``start: items = list(range(N))``, ``fit --foreach items:
y = item * 2``, ``join: total = sum(y)``, run in this process through the
engine (``run_flow`` over ``build_flow``, with a warm fork server, as the
tests do) in a fresh store. Prints wall time, tasks/s, the CPU seconds of
the orchestrator and its fork server's tasks (load-independent, unlike wall
time on a shared machine), and this (orchestrator) process's peak RSS. With --profile, the largest size runs
under cProfile and the stats are written to FILE (and the top entries by
cumulative and by own time printed).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil

from flowmagic.flow.graph import build_flow
from flowmagic.runtime.orchestrator.scheduler import run_flow
from flowmagic.store import open_store


def cells(n: int) -> list[str]:
    return [f"%%step start\nitems = list(range({n}))",
            "%%step fit --foreach items\ny = input * 2",
            "%%step join\ntotal = sum(y)"]


def cpu_seconds() -> float:
    """CPU of this process and of the fork servers with the tasks they reaped:
    a figure the other load on a shared machine does not inflate as it does wall time."""
    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children():
        t = child.cpu_times()
        total += t.user + t.system + t.children_user + t.children_system
    return total


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux; this process is the orchestrator.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_once(n: int, profile: cProfile.Profile | None = None) -> tuple[float, float, float]:
    graph = build_flow(cells(n), name=f"Scale{n}")
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(Path(tmp) / "store")
        try:
            cpu0, start = cpu_seconds(), time.perf_counter()
            if profile is not None:
                profile.enable()
            result = run_flow(graph, store, workdir=tmp)
            if profile is not None:
                profile.disable()
            wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
            assert result.status == "succeeded", result.status
            assert result.tasks == n + 2, result.tasks
        finally:
            store.close()
    return wall, cpu, peak_rss_mb()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000")
    ap.add_argument("--profile", default=None, help="cProfile the largest size into this file")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    run_once(10)  # warm the fork server and imports so the first size is not charged for them
    print(f"{'tasks':>8} {'wall s':>8} {'tasks/s':>9} {'CPU s':>8} {'peak RSS MB':>12}")
    for n in sizes:
        prof = cProfile.Profile() if args.profile and n == max(sizes) else None
        wall, cpu, rss = run_once(n, prof)
        print(f"{n:>8} {wall:>8.2f} {n / wall:>9.0f} {cpu:>8.1f} {rss:>12.0f}", flush=True)
        if prof is not None:
            prof.dump_stats(args.profile)
            for key in ("cumulative", "tottime"):
                pstats.Stats(args.profile, stream=sys.stdout).sort_stats(key).print_stats(25)
    return 0


if __name__ == "__main__":
    sys.exit(main())
