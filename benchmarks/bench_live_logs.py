"""Logs written while a task runs (FLOWMAGIC_LOG_FLUSH), against the real `metaflow` package.

    python benchmarks/bench_live_logs.py [--megabytes 1024] [--no-metaflow]

Scenarios (each tool's console command, in a fresh temp dir):
  print     a step printing N MB: the orchestrator's peak RSS, the store's
            peak and final size (sampled while it runs), wall time;
            flowmagic with FLOWMAGIC_LOG_FLUSH=1 (default) and 0 (end only)
  visible   a step prints one line, then waits: seconds until another
            process reads that line (`flowmagic logs`; Metaflow's Client
            `task.stdout`), 60 s at most
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import psutil

MB = 1 << 20


def _env(workdir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"USERNAME": "bench", "METAFLOW_DEFAULT_METADATA": "local", "METAFLOW_DEFAULT_DATASTORE": "local",
                "FLOWMAGIC_HOME": str(workdir / ".flowmagic"), "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def _flowmagic(*args: str) -> list[str]:
    exe = Path(sys.executable).with_name("flowmagic")
    return [str(exe), *args] if exe.exists() else [sys.executable, "-m", "flowmagic.cli.main", *args]


def _notebook(path: Path, body: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("import os, sys, time"),
                nbformat.v4.new_code_cell(f"%%step start\n{body}\nx = 1"),
                nbformat.v4.new_code_cell("%%step end\ny = x")]
    nbformat.write(nb, path)
    return path


def _metaflow_flow(path: Path, name: str, body: str) -> Path:
    indented = "\n".join("        " + line for line in body.splitlines())
    path.write_text(f"import os, sys, time\nfrom metaflow import FlowSpec, step\n\nclass {name}(FlowSpec):\n"
                    f"    @step\n    def start(self):\n{indented}\n        self.next(self.end)\n\n"
                    f"    @step\n    def end(self):\n        pass\n\nif __name__ == '__main__':\n    {name}()\n")
    return path


def _size(root: Path) -> int:
    total = 0
    for p in root.rglob("*"):
        try:
            total += p.stat().st_size if p.is_file() else 0
        except OSError:
            pass
    return total


def _watch(cmd: list[str], cwd: Path, env: dict[str, str], store: Path) -> tuple[float, int, int, int]:
    """(wall s, peak RSS of the command's process, peak store bytes, final store bytes)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    watched, rss, peak_store, last = psutil.Process(proc.pid), 0, 0, 0.0
    while proc.poll() is None:
        try:
            rss = max(rss, watched.memory_info().rss)
        except psutil.Error:
            break
        if time.monotonic() - last > 0.5:
            peak_store, last = max(peak_store, _size(store)), time.monotonic()
        time.sleep(0.01)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.wait() != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{err[-2000:]}")
    final = _size(store)
    return time.perf_counter() - started, rss, max(peak_store, final), final


def _print_body(megabytes: int) -> str:
    return f"chunk = ('x' * 1023 + '\\n') * 1024\nfor i in range({megabytes}):\n    sys.stdout.write(chunk)"


def bench_print(megabytes: int, metaflow: bool) -> list[tuple[str, tuple[float, int, int, int]]]:
    rows = []
    for flush in ("1", "0"):
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            nb = _notebook(work / "print.ipynb", _print_body(megabytes))
            rows.append((f"flowmagic, FLOWMAGIC_LOG_FLUSH={flush}",
                         _watch(_flowmagic("run", str(nb)), work, _env(work, FLOWMAGIC_LOG_FLUSH=flush),
                                work / ".flowmagic")))
    if metaflow:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            flow = _metaflow_flow(work / "printflow.py", "PrintFlow", _print_body(megabytes))
            rows.append(("metaflow", _watch([sys.executable, str(flow), "--no-pylint", "run"], work, _env(work),
                                            work / ".metaflow")))
    return rows


def _hold_body(go: Path) -> str:
    return f"print('visible now')\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.05)"


def _seconds_until(read, limit: float = 60.0) -> float | None:
    started = time.perf_counter()
    while time.perf_counter() - started < limit:
        if "visible now" in read():
            return time.perf_counter() - started
        time.sleep(0.1)
    return None


def bench_visible(metaflow: bool) -> list[tuple[str, float | None]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        go = work / "go"
        nb = _notebook(work / "hold.ipynb", _hold_body(go))
        env = _env(work)
        proc = subprocess.Popen(_flowmagic("run", str(nb)), cwd=work, env=env, stdout=subprocess.DEVNULL)
        try:
            def read() -> str:
                out = subprocess.run(_flowmagic("logs", str(nb), "1/start"), cwd=work, env=env,
                                     capture_output=True, text=True)
                return out.stdout
            _seconds_until(lambda: "running" if "(running" in read() else "", 60)  # the task started
            rows.append(("flowmagic logs", _seconds_until(read)))
        finally:
            go.touch()
            proc.wait(timeout=120)
    if metaflow:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            go = work / "go"
            flow = _metaflow_flow(work / "holdflow.py", "HoldFlow", _hold_body(go))
            env = _env(work)
            proc = subprocess.Popen([sys.executable, str(flow), "--no-pylint", "run"], cwd=work, env=env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            reader = ("import sys\nfrom metaflow import Flow, namespace\nnamespace(None)\ntry:\n"
                      "    print(Flow('HoldFlow').latest_run['start'].task.stdout)\nexcept Exception:\n    pass\n")
            try:
                def read() -> str:
                    return subprocess.run([sys.executable, "-c", reader], cwd=work, env=env,
                                          capture_output=True, text=True).stdout
                rows.append(("metaflow Client task.stdout", _seconds_until(read)))
            finally:
                go.touch()
                proc.wait(timeout=120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--no-metaflow", action="store_true")
    args = parser.parse_args()
    print(f"a step printing {args.megabytes} MB")
    print(f"{'':38} {'wall':>8} {'peak RSS':>10} {'store peak':>11} {'store end':>10}")
    for name, (wall, rss, peak, final) in bench_print(args.megabytes, not args.no_metaflow):
        print(f"{name:38} {wall:7.1f}s {rss / MB:8.0f}MB {peak / MB:9.1f}MB {final / MB:8.1f}MB")
    print("a printed line, read by another process while the step runs")
    for name, seconds in bench_visible(not args.no_metaflow):
        print(f"{name:38} {'not visible within 60 s' if seconds is None else f'{seconds:.1f} s'}")


if __name__ == "__main__":
    main()
