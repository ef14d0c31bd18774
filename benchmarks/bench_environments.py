"""`--pypi` step environments: what the first use costs, and how fast a step in one starts after that.

In a fresh store (uv's download cache is warm after the machine's first run):

1. first run of a flow with a `--pypi "pandas==2.2.3"` step: resolve, build,
   byte-compile the environment, start its fork server;
2. the second use: `ensure_environment` on the cached environment (no new one);
3. *start latency* of a step = its first line's clock minus its parent's
   last line's clock (scheduling, fork, loading one data frame). For an
   ordinary step and the same step in the environment, median over repeated
   runs in one process (warm fork servers, as in a kernel); ratio, target <= 2;
4. the same with `flowmagic run` in fresh processes (each run starts its
   fork servers, so the environment's server start is on the env step's path);
5. the real `metaflow`, same run, same machine: the same linear flow run with
   `python flow.py run`, step start latency measured the same way. Metaflow's
   `@pypi`/`@conda` need micromamba, which is not installable from PyPI here,
   so the reference is Metaflow's *ordinary* step.

    python benchmarks/bench_environments.py [--runs 7]
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

PIN = "pandas==2.2.3"
CELLS = [
    "import time\nimport pandas as pd",
    "%%step start\nframe = pd.DataFrame({'a': list(range(1000))})\nt_end = time.time()",
    "%%step plain\nt_start = time.time()\nframe1 = frame.assign(b=frame.a * 2)\nt_end = time.time()",
    f'%%step isolated --pypi "{PIN}"\nt_start = time.time()\nversion = pd.__version__\n'
    "frame2 = frame1.assign(c=frame1.b + 1)\nt_end = time.time()",
    "%%step end\nt_start = time.time()\ntotal = int(frame2.c.sum())",
]
METAFLOW_FLOW = '''import time
from metaflow import FlowSpec, step


class EnvBench(FlowSpec):
    @step
    def start(self):
        import pandas as pd
        self.frame = pd.DataFrame({"a": list(range(1000))})
        self.t_end = time.time()
        self.next(self.plain)

    @step
    def plain(self):
        self.t_start = time.time()
        self.frame1 = self.frame.assign(b=self.frame.a * 2)
        self.t_end = time.time()
        self.next(self.end)

    @step
    def end(self):
        self.t_start = time.time()
        self.total = int(self.frame1.b.sum())


if __name__ == "__main__":
    EnvBench()
'''


def gaps(store, flow: str, run_id: int) -> dict[str, float]:
    """Start latency of `plain` and `isolated`, in seconds, for one run."""
    from flowmagic.store import load_artifact

    def value(step: str, name: str) -> float:
        (task,) = store.meta.tasks(flow, run_id, step)
        ref = next(r for r in store.meta.artifacts(task.task_id) if r.name == name)
        return load_artifact(store.objects, ref)

    return {"plain": value("plain", "t_start") - value("start", "t_end"),
            "isolated": value("isolated", "t_start") - value("plain", "t_end")}


def in_process(tmp: Path, runs: int) -> dict:
    from flowmagic.flow.graph import build_flow
    from flowmagic.runtime.environments.builder import EnvSpec, ensure_environment
    from flowmagic.runtime.orchestrator.scheduler import run_flow
    from flowmagic.store import open_store

    graph = build_flow(CELLS, name="EnvBench")
    store = open_store(tmp / "store")
    started = time.perf_counter()
    first = run_flow(graph, store)
    first_seconds = time.perf_counter() - started
    assert first.status == "succeeded", first.failed
    envs = sorted(p.name for p in (tmp / "store" / "envs").iterdir() if p.is_dir())
    lookups = []
    for _ in range(20):
        t = time.perf_counter()
        env = ensure_environment(EnvSpec("pypi", (PIN,)), store.root)
        lookups.append(time.perf_counter() - t)
        assert not env.created
    samples = []
    for _ in range(runs):
        result = run_flow(graph, store)
        assert result.status == "succeeded", result.failed
        samples.append(gaps(store, "EnvBench", result.run_id))
    assert sorted(p.name for p in (tmp / "store" / "envs").iterdir() if p.is_dir()) == envs, "a new environment"
    return {"first_run": first_seconds, "first_gaps": gaps(store, "EnvBench", first.run_id),
            "lookup": statistics.median(lookups), "samples": samples}


def fresh_processes(tmp: Path, runs: int) -> list[dict]:
    """`flowmagic run` in new processes on the in-process store (its environment exists)."""
    from flowmagic.store import open_store

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("%flow name EnvBench\n" + CELLS[0])] + [
        nbformat.v4.new_code_cell(c) for c in CELLS[1:]]
    path = tmp / "env_bench.ipynb"
    nbformat.write(nb, path)
    exe = shutil.which("flowmagic")
    cmd = [exe] if exe else [sys.executable, "-m", "flowmagic.cli.main"]
    env = dict(os.environ, FLOWMAGIC_HOME=str(tmp / "store"))
    samples = []
    for _ in range(runs):
        proc = subprocess.run([*cmd, "run", str(path), "--json"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-2000:])
        store = open_store(tmp / "store")
        samples.append(gaps(store, "EnvBench", store.meta.list_runs("EnvBench")[0].run_id))
        store.close()
    return samples


def metaflow(tmp: Path, runs: int) -> list[float]:
    script = tmp / "env_bench_flow.py"
    script.write_text(METAFLOW_FLOW)
    env = dict(os.environ, USERNAME="bench", METAFLOW_DEFAULT_METADATA="local", METAFLOW_DEFAULT_DATASTORE="local")
    for _ in range(runs):
        subprocess.run([sys.executable, str(script), "--no-pylint", "--quiet", "run"], cwd=tmp, env=env,
                       capture_output=True, text=True, check=True)
    code = ("from metaflow import Flow, namespace; namespace(None)\n"
            f"for r in list(Flow('EnvBench'))[:{runs:d}]:\n"
            "    print(r['plain'].task.data.t_start - r['start'].task.data.t_end)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp, env=env, capture_output=True, text=True, check=True)
    return [float(line) for line in out.stdout.split()]


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-env-") as folder:
        tmp = Path(folder)
        print("first run (builds the environment)...", file=sys.stderr, flush=True)
        inner = in_process(tmp, args.runs)
        print("fresh processes...", file=sys.stderr, flush=True)
        cold = fresh_processes(tmp, max(3, args.runs // 2))
        print("metaflow...", file=sys.stderr, flush=True)
        reference = metaflow(tmp, max(3, args.runs // 2))

    warm_plain = median_ms([s["plain"] for s in inner["samples"]])
    warm_env = median_ms([s["isolated"] for s in inner["samples"]])
    cold_plain = median_ms([s["plain"] for s in cold])
    cold_env = median_ms([s["isolated"] for s in cold])
    mf = median_ms(reference)
    print(f"first run, building the {PIN} environment: {inner['first_run']:.1f} s "
          f"(env step start {inner['first_gaps']['isolated']:.1f} s)")
    print(f"cached environment lookup (no new environment): {inner['lookup'] * 1000:.2f} ms")
    print(f"{'step start latency, median (ms)':<52} {'ordinary':>9} {'--pypi':>9} {'ratio':>7} {'target':>7}")
    print(f"{'  later runs in one process (kernel)':<52} {warm_plain:>9.1f} {warm_env:>9.1f} "
          f"{warm_env / warm_plain:>7.2f} {'<= 2':>7}")
    print(f"{'  flowmagic run, fresh process each run':<52} {cold_plain:>9.1f} {cold_env:>9.1f} "
          f"{cold_env / cold_plain:>7.2f}")
    print(f"{'  metaflow run (ordinary step; @pypi needs micromamba)':<52} {mf:>9.1f}")
    print(f"{'  ratio flowmagic --pypi (kernel) / metaflow ordinary':<52} {'':>9} {'':>9} {warm_env / mf:>7.3f}")
    print(f"{'  ratio flowmagic --pypi (fresh) / metaflow ordinary':<52} {'':>9} {'':>9} {cold_env / mf:>7.3f}")


if __name__ == "__main__":
    main()
