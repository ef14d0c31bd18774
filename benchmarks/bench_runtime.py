"""flowmagic's runtime against the real `metaflow` package, same machine, same run.

    python benchmarks/bench_runtime.py [--foreach 1000] [--repeat 1]

Scenarios (each the console command of both tools, in a fresh temp dir):
  hello     a 3-step flow, whole command (start-up included)
  chain     a 20-step linear chain; per-task overhead = the run's own
            duration (created -> finished, from each tool's metadata) / 20
  foreach   one step over N trivial items (default 1,000), whole command
  resume    a 5-step flow that failed at step 4, whole `resume` command;
            plus flowmagic's resume as `%flow resume` runs it in a kernel
            whose fork server is already warm (resume_flow in-process)

Both tools run with their default --max-workers (metaflow: 16, flowmagic:
the number of cores), each as its installed console entry point would: the
`flowmagic` script beside this interpreter (not a version manager's shim),
and the package's bytecode compiled first, as a wheel install does (an
editable install under PYTHONDONTWRITEBYTECODE would otherwise compile every
module on every start, which metaflow's installed files never do). Prints a
table: metaflow, flowmagic, ratio.
"""
from __future__ import annotations

import argparse
import compileall
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

TARGETS = {"chain": 20.0, "foreach": 10.0, "resume": 5.0}


# --------------------------------------------------------------------------- flows

def metaflow_linear(name: str, steps: int, fail_at: int | None = None) -> str:
    names = ["start"] + [f"s{i}" for i in range(1, steps - 1)] + ["end"]
    lines = ["import os", "from metaflow import FlowSpec, step", "", f"class {name}(FlowSpec):"]
    for i, step in enumerate(names):
        body = ["        self.x = 0"] if i == 0 else ["        self.x = self.x + 1"]
        if fail_at is not None and i == fail_at:
            body.append("        if os.path.exists('fail.flag'):\n            raise RuntimeError('failing on purpose')")
        nxt = [f"        self.next(self.{names[i + 1]})"] if i + 1 < len(names) else []
        lines += ["    @step", f"    def {step}(self):", *body, *nxt, ""]
    lines += ["if __name__ == '__main__':", f"    {name}()"]
    return "\n".join(lines) + "\n"


def metaflow_foreach(name: str) -> str:
    return f'''from metaflow import FlowSpec, step

class {name}(FlowSpec):
    @step
    def start(self):
        self.items = list(range(int(__import__("os").environ["BENCH_N"])))
        self.next(self.work, foreach="items")

    @step
    def work(self):
        self.y = self.input * 2
        self.next(self.join)

    @step
    def join(self, inputs):
        self.total = sum(i.y for i in inputs)
        self.next(self.end)

    @step
    def end(self):
        pass

if __name__ == "__main__":
    {name}()
'''


def notebook_linear(path: Path, steps: int, fail_at: int | None = None) -> Path:
    cells = ["%load_ext flowmagic", "import os"]
    for i in range(steps):
        body = "x = 0" if i == 0 else "x = x + 1"
        if fail_at is not None and i == fail_at:
            body += "\nif os.path.exists('fail.flag'):\n    raise RuntimeError('failing on purpose')"
        cells.append(f"%%step s{i}\n{body}")
    return _write(path, cells)


def notebook_foreach(path: Path, n: int) -> Path:
    return _write(path, [
        "%load_ext flowmagic",
        f"%%step start\nitems = list(range({n}))",
        "%%step work --foreach items\ny = input * 2",
        "%%step join\ntotal = sum(y)",
        "%%step end\ndone = True",
    ])


def _write(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nbformat.write(nb, path)
    return path


# --------------------------------------------------------------------------- running

def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"USERNAME": "bench", "METAFLOW_DEFAULT_METADATA": "local", "METAFLOW_DEFAULT_DATASTORE": "local",
                "FLOWMAGIC_HOME": str(workdir / ".flowmagic")})
    env.pop("BENCH_FAIL", None)
    env.update(extra)
    return env


def timed(cmd: list[str], cwd: Path, env: dict[str, str], expect_ok: bool = True) -> float:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    took = time.perf_counter() - started
    if (proc.returncode == 0) != expect_ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return took


def flowmagic_cmd(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("flowmagic")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "flowmagic.cli.main", *args]


def compile_flowmagic() -> None:
    """Write flowmagic's bytecode, as installing its wheel would."""
    import flowmagic

    compileall.compile_dir(str(Path(flowmagic.__file__).parent), quiet=1)


def metaflow_cmd(script: Path, *args: str) -> list[str]:
    return [sys.executable, str(script), "--no-pylint", "--quiet", *args]


def metaflow_run_seconds(workdir: Path, flow: str) -> float:
    code = (f"from metaflow import Flow, namespace; namespace(None); r = Flow({flow!r}).latest_run; "
            "print((r.finished_at - r.created_at).total_seconds())")
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=_env(workdir), capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def flowmagic_run_seconds(workdir: Path, flow: str) -> float:
    from flowmagic.store import open_store

    run = open_store(workdir / ".flowmagic").meta.list_runs(flow)[0]
    return run.finished_at - run.started_at


# --------------------------------------------------------------------------- scenarios

def bench_hello(tmp: Path) -> tuple[float, float]:
    script = tmp / "hello.py"
    script.write_text(metaflow_linear("HelloFlow", 3))
    nb = notebook_linear(tmp / "hello_flow.ipynb", 3)
    mf = timed(metaflow_cmd(script, "run"), tmp, _env(tmp))
    fm = timed(flowmagic_cmd("run", str(nb)), tmp, _env(tmp))
    return mf, fm


def bench_chain(tmp: Path) -> tuple[float, float]:
    script = tmp / "chain.py"
    script.write_text(metaflow_linear("ChainFlow", 20))
    nb = notebook_linear(tmp / "chain_flow.ipynb", 20)
    timed(metaflow_cmd(script, "run"), tmp, _env(tmp))
    timed(flowmagic_cmd("run", str(nb)), tmp, _env(tmp))
    return metaflow_run_seconds(tmp, "ChainFlow") / 20, flowmagic_run_seconds(tmp, "ChainFlow") / 20


def bench_foreach(tmp: Path, n: int) -> tuple[float, float]:
    script = tmp / "foreach.py"
    script.write_text(metaflow_foreach("ForeachFlow"))
    nb = notebook_foreach(tmp / "foreach_flow.ipynb", n)
    env = _env(tmp, BENCH_N=str(n))
    mf = timed(metaflow_cmd(script, "run", "--max-num-splits", str(n + 1)), tmp, env)
    fm = timed(flowmagic_cmd("run", str(nb)), tmp, env)
    return mf, fm


def bench_resume(tmp: Path) -> tuple[float, float, float]:
    """Both commands; then flowmagic's resume as the notebook does it (`%flow
    resume`: the kernel's fork server is already warm)."""
    script = tmp / "resume.py"
    script.write_text(metaflow_linear("ResumeFlow", 5, fail_at=3))
    nb = notebook_linear(tmp / "resume_flow.ipynb", 5, fail_at=3)
    flag = tmp / "fail.flag"
    flag.touch()
    timed(metaflow_cmd(script, "run"), tmp, _env(tmp), expect_ok=False)
    timed(flowmagic_cmd("run", str(nb)), tmp, _env(tmp), expect_ok=False)
    flag.unlink()
    mf = timed(metaflow_cmd(script, "resume"), tmp, _env(tmp))
    fm = timed(flowmagic_cmd("resume", str(nb)), tmp, _env(tmp))
    return mf, fm, warm_resume(tmp, nb, flag)


def warm_resume(tmp: Path, nb: Path, flag: Path) -> float:
    from flowmagic.notebook import load_flow
    from flowmagic.runtime.orchestrator.scheduler import resume_flow, run_flow
    from flowmagic.store import open_store

    graph = load_flow(nb)
    store = open_store(tmp / ".flowmagic-warm")
    flag.touch()
    assert run_flow(graph, store, workdir=str(tmp)).status == "failed"
    flag.unlink()
    started = time.perf_counter()
    assert resume_flow(graph, store, workdir=str(tmp)).status == "succeeded"
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--foreach", type=int, default=1000, help="items in the foreach scenario")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (the median is shown)")
    parser.add_argument("--only", nargs="*", choices=["hello", "chain", "foreach", "resume"])
    args = parser.parse_args()
    compile_flowmagic()
    scenarios = {
        "hello": ("3-step hello flow, whole command (s)", bench_hello),
        "chain": ("20-step chain, per-task overhead (s)", bench_chain),
        "foreach": (f"foreach of {args.foreach} trivial tasks, whole command (s)",
                    lambda tmp: bench_foreach(tmp, args.foreach)),
        "resume": ("resume of a 5-step flow failing at step 4 (s)", bench_resume),
    }
    rows = []
    for key, (label, func) in scenarios.items():
        if args.only and key not in args.only:
            continue
        results = []
        for _ in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix=f"bench-{key}-") as tmp:
                results.append(func(Path(tmp)))
        mf = statistics.median(r[0] for r in results)
        fm = statistics.median(r[1] for r in results)
        rows.append((key, label, mf, fm))
        print(f"  done: {label}: metaflow {mf:.4f}, flowmagic {fm:.4f}", file=sys.stderr, flush=True)
        if key == "resume":
            warm = statistics.median(r[2] for r in results)
            rows.append(("resume-warm", "  same, flowmagic in a warm kernel (%flow resume) (s)", mf, warm))
    print(f"\nmachine: {os.cpu_count()} cores, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'scenario':<58} {'metaflow':>10} {'flowmagic':>10} {'ratio':>8} {'target':>8}")
    for key, label, mf, fm in rows:
        target = f">= {TARGETS[key]:.0f}x" if key in TARGETS else ""
        print(f"{label:<58} {mf:>10.4f} {fm:>10.4f} {mf / fm:>7.1f}x {target:>8}")


if __name__ == "__main__":
    main()
