"""Per-step overhead of executing a ``%%step`` cell by hand, in a real kernel.

Measures, through jupyter_client (request sent -> reply received, as a
notebook front end sees it):

* a plain cell ``x = 1``;
* the same code as a ``%%step`` cell (a task of the session run: fork,
  run, persist, bind back), after one warm-up step has started the fork server;
* a step that reads the previous step's output (one artifact loaded);

and, as the reference the team compares against, the real ``metaflow``
package's per-task cost on a 5-step linear flow run in the same session.

Target: under 50 ms added per step. Usage: ``python benchmarks/bench_magics.py [N]``.
"""
from __future__ import annotations

import os
import queue
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from jupyter_client import KernelManager


def execute(kc, code: str) -> float:
    """Seconds from sending the request to its reply; fails loudly on an error."""
    started = time.perf_counter()
    msg_id = kc.execute(code)
    while True:
        reply = kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            break
    took = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {code!r}: {reply['content'].get('evalue')}")
    _drain(kc)
    return took


def _drain(kc) -> None:
    while True:
        try:
            kc.get_iopub_msg(timeout=0.01)
        except queue.Empty:
            return


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def measure_kernel(n: int, folder: Path) -> dict[str, float]:
    env = dict(os.environ, FLOWMAGIC_HOME=str(folder / "store"))
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(folder), env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        execute(kc, "%load_ext flowmagic")
        execute(kc, "%flow name BenchMagics")
        started = time.perf_counter()
        execute(kc, "%%step warm\nw = 0")          # starts the fork server
        first = time.perf_counter() - started
        plain = [execute(kc, "x = 1") for _ in range(n)]
        step = [execute(kc, "%%step s\nx = 1") for _ in range(n)]
        reader = [execute(kc, "%%step r\ny = x + 1") for _ in range(n)]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"first step (fork server start)": first * 1000, "plain cell": median_ms(plain),
            "%%step cell": median_ms(step), "%%step reading 1 artifact": median_ms(reader)}


METAFLOW_CHAIN = '''
from metaflow import FlowSpec, step

class Chain(FlowSpec):
{steps}

if __name__ == "__main__":
    Chain()
'''


def measure_metaflow(folder: Path, steps: int = 5) -> float | None:
    """Metaflow's per-task cost (ms) on a linear flow of trivial steps, or None."""
    names = ["start"] + [f"s{i}" for i in range(1, steps - 1)] + ["end"]
    body = []
    for i, name in enumerate(names):
        nxt = f"        self.next(self.{names[i + 1]})\n" if i + 1 < len(names) else ""
        body.append(f"    @step\n    def {name}(self):\n        self.x = {i}\n{nxt}")
    script = folder / "chain.py"
    script.write_text(METAFLOW_CHAIN.format(steps="\n".join(body)))
    env = dict(os.environ, METAFLOW_HOME=str(folder), USERNAME="bench",
               METAFLOW_DATASTORE_SYSROOT_LOCAL=str(folder))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, str(script), "--no-pylint", "run"], cwd=folder, env=env,
                          capture_output=True, text=True)
    took = time.perf_counter() - started
    if done.returncode != 0:
        print(f"metaflow run failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return took * 1000 / steps


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        figures = measure_kernel(n, folder)
        metaflow_task = measure_metaflow(folder)
    overhead = figures["%%step cell"] - figures["plain cell"]
    print(f"per-cell times in a real kernel, median of {n} (ms)")
    for label, value in figures.items():
        print(f"  {label:<34} {value:8.1f}")
    print(f"  {'added per %%step (target < 50)':<34} {overhead:8.1f}")
    print(f"  {'added per step reading 1 artifact':<34} "
          f"{figures['%%step reading 1 artifact'] - figures['plain cell']:8.1f}")
    if metaflow_task is not None:
        print(f"  {'metaflow, per task (5-step run)':<34} {metaflow_task:8.1f}")
        print(f"  ratio metaflow task / flowmagic step overhead: {metaflow_task / overhead:.1f}x")
    print(textwrap.dedent(f"""\
        verdict: {'OK' if overhead < 50 else 'OVER TARGET'} ({overhead:.1f} ms added per step)"""))


if __name__ == "__main__":
    main()
