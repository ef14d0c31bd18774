"""How fast is DAG inference? A 500-cell notebook (half steps, varied code).

Times ``flowmagic.flow.graph.build_flow`` on it (median of several runs, after one
warm-up that pays IPython's import), and, in the same run, the real
``metaflow`` package building the graph of an equivalent 250-step FlowSpec
(``metaflow.graph.FlowGraph``: source, AST, edges), then prints the ratio.
Finally both show commands end to end in fresh processes: ``flowmagic show
--json`` on the notebook, ``python flow.py --no-pylint show`` on the twin.
The machine is shared: CPU time is the steadier figure.

    python benchmarks/bench_dag.py [--cells 500] [--repeat 7]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

STEP_BODIES = [
    "{w0} = [v * 2 for v in range(N_{k})] + [{r0}]",
    "{w0} = {r0}\nif {w0}:\n    {w1} = helper_{h}({w0})\nelse:\n    {w1} = None",
    "try:\n    {w0} = {r0} / ({r1} or 1)\nexcept ZeroDivisionError as err:\n    {w0} = float('nan')",
    "%time {w0} = sorted([{r0}, {r1}], key=lambda v: str(v))",
    "{w0} = {{'a': {r0}, 'b': {r1}}}\n{w0}['c'] = len({w0})\n_tmp = {w0}\n{w1} = sum(1 for _ in _tmp)",
    "def local_{k}(x, scale={r0}):\n    return [x * scale for _ in range(3)]\n{w0} = local_{k}({r1})",
    "for i, item in enumerate([{r0}, {r1}]):\n    {w0} = (i, item)\nwhile True:\n    {w1} = {w0}\n    break",
    "with open(__file__) as fh:\n    {w0} = ({r0}, fh.name)\n{w1} = {{k: v for k, v in [('x', {r0})]}}",
    "class Holder_{k}:\n    size = N_{k}\n    def get(self):\n        return {r0}\n{w0} = Holder_{k}().get()",
    "match {r0}:\n    case [first, *rest]:\n        {w0} = first\n    case _:\n        {w0} = {r0}\n{w1} = {w0}",
]
ORDINARY = [
    "import math\nimport json as j_{k}\n",
    "LABELS_{k} = ['a', 'b', 'c']\nSIZE_{k} = 2 ** 10\n",
    "%matplotlib inline\nprint('exploring', N_{k})\nframe_{k} = list(range(N_{k}))\n",
    "class Config_{k}:\n    depth = 3\n",
]


def make_notebook(n_cells: int, seed: int = 0) -> tuple[list[str], list[tuple[str, str]]]:
    """Cells for flowmagic and (name, plain body) pairs for the Metaflow twin."""
    rng = random.Random(seed)
    cells = ["%load_ext flowmagic\n%flow name BenchFlow\nimport math", "%%params\nalpha = 0.5  # learning rate"]
    written: list[str] = ["alpha"]
    steps: list[tuple[str, str]] = []
    k = 0
    while len(cells) < n_cells:
        k += 1
        cells.append(f"N_{k} = {k}\ndef helper_{k}(value):\n    \"\"\"A prelude function.\"\"\"\n"
                     f"    return math.sqrt(abs(hash(str(value))) % N_{k})\n" + ORDINARY[k % len(ORDINARY)].format(k=k))
        reads = [rng.choice(written), rng.choice(written)]
        writes = [f"v{k}_0", f"v{k}_1"]
        body = STEP_BODIES[k % len(STEP_BODIES)].format(
            k=k, h=k, r0=reads[0], r1=reads[1], w0=writes[0], w1=writes[1])
        name = f"s{k}"
        if k % 25 == 0:  # a foreach over a fresh list, and its join
            cells.append(f"%%step {name} --retry 2 --timeout 60\n# step {k}\n{body}\nitems_{k} = [1, 2, 3]")
            cells.append(f"%%step {name}_each --foreach items_{k} --catch failed_{k}\ny_{k} = input * alpha")
            cells.append("")  # a markdown cell between them
            cells.append(f"%%step {name}_join\ntotal_{k} = sum(y_{k}) + len(inputs)")
            written += [f"total_{k}"]
            steps += [(f"{name}_each", f"y_{k} = 1"), (f"{name}_join", f"total_{k} = 0")]
        else:
            cells.append(f"%%step {name}\n# step {k}\n{body}")
        written += [w for w in writes if f"{w} =" in body]
        steps.insert(len(steps) - (2 if k % 25 == 0 else 0), (name, body))
    return cells[:n_cells], steps


def _measure(function, repeat: int) -> tuple[float, float]:
    """Median wall time and median CPU time of ``repeat`` calls: the machine is
    shared, so CPU time is the steadier figure."""
    walls, cpus = [], []
    for _ in range(repeat):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def time_flowmagic(cells: list[str], repeat: int) -> tuple[float, tuple[float, float], object]:
    from flowmagic.flow.graph import build_flow

    started = time.perf_counter()
    graph = build_flow(cells)  # warm-up: imports IPython's transformer once
    first = time.perf_counter() - started
    return first, _measure(lambda: build_flow(cells), repeat), graph


def metaflow_source(steps: list[tuple[str, str]]) -> str:
    from flowmagic.flow.analysis import transform_ipython

    lines = ["from metaflow import FlowSpec, step", "", "class BenchFlow(FlowSpec):"]
    names = ["start"] + [name for name, _ in steps] + ["end"]
    bodies = ["pass"] + [transform_ipython(body) for _, body in steps] + ["pass"]
    for index, (name, body) in enumerate(zip(names, bodies)):
        lines += ["    @step", f"    def {name}(self):", textwrap.indent(body.rstrip() or "pass", " " * 8)]
        if index + 1 < len(names):
            lines.append(f"        self.next(self.{names[index + 1]})")
        lines.append("")
    return "\n".join(lines) + "\n"


def time_metaflow(steps: list[tuple[str, str]], repeat: int) -> tuple[tuple[float, float], int]:
    from metaflow.graph import FlowGraph

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench_flow.py"
        path.write_text(metaflow_source(steps))
        spec = importlib.util.spec_from_file_location("bench_flow", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_flow"] = module
        spec.loader.exec_module(module)
        graph = FlowGraph(module.BenchFlow)  # warm-up
        return _measure(lambda: FlowGraph(module.BenchFlow), repeat), len(list(graph))


def time_show_commands(cells: list[str], steps: list[tuple[str, str]], repeat: int) -> tuple[float, float]:
    """End to end, in fresh processes: `flowmagic show --json nb.ipynb` against
    Metaflow's own `python flow.py show` on the twin FlowSpec (median wall time)."""
    import nbformat

    with tempfile.TemporaryDirectory() as folder:
        notebook = nbformat.v4.new_notebook()
        notebook.cells = [nbformat.v4.new_code_cell(c) if c else nbformat.v4.new_markdown_cell("notes")
                          for c in cells]
        nb_path = Path(folder) / "bench_flow.ipynb"
        nbformat.write(notebook, nb_path)
        flow_path = Path(folder) / "bench_flow.py"
        flow_path.write_text(metaflow_source(steps) + "\nif __name__ == '__main__':\n    BenchFlow()\n")
        env = dict(os.environ, FLOWMAGIC_HOME=str(Path(folder) / "store"), USERNAME="bench",
                   METAFLOW_HOME=folder)
        commands = {
            "flowmagic": [sys.executable, "-m", "flowmagic.cli.main", "show", "--json", str(nb_path)],
            "metaflow": [sys.executable, str(flow_path), "--no-pylint", "show"],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(repeat):
            for name, command in commands.items():
                started = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
                times[name].append(time.perf_counter() - started)
                if result.returncode != 0:
                    raise RuntimeError(f"{name} show failed: {result.stderr[-500:]}")
        return statistics.median(times["flowmagic"]), statistics.median(times["metaflow"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    cells, steps = make_notebook(args.cells)
    n_steps = sum(1 for c in cells if c.startswith("%%step"))
    first, (wall, cpu), graph = time_flowmagic(cells, args.repeat)
    print(f"notebook: {len(cells)} cells, {n_steps} steps, {len(graph.edges)} edges, "
          f"{len(graph.prelude.splitlines())} prelude lines")
    print(f"flowmagic build_flow: {wall * 1000:.1f} ms wall, {cpu * 1000:.1f} ms CPU, median of {args.repeat} "
          f"(first call {first * 1000:.1f} ms wall, incl. importing IPython's transformer)")
    try:
        (mf_wall, mf_cpu), mf_steps = time_metaflow(steps, args.repeat)
    except ImportError:
        print("metaflow is not installed: no comparison")
        return
    print(f"metaflow FlowGraph ({mf_steps} steps, same step bodies): {mf_wall * 1000:.1f} ms wall, "
          f"{mf_cpu * 1000:.1f} ms CPU")
    print(f"ratio flowmagic / metaflow: {cpu / mf_cpu:.2f}x CPU, {wall / mf_wall:.2f}x wall "
          "(flowmagic also infers reads and writes, which Metaflow takes from `self.next`)")
    print(f"per step (CPU): flowmagic {cpu / n_steps * 1e6:.0f} us, metaflow {mf_cpu / mf_steps * 1e6:.0f} us")
    fm_show, mf_show = time_show_commands(cells, steps, max(1, args.repeat // 3))
    print(f"show command, fresh process: `flowmagic show --json` {fm_show * 1000:.0f} ms, "
          f"`python flow.py --no-pylint show` {mf_show * 1000:.0f} ms, ratio {fm_show / mf_show:.2f}x")


if __name__ == "__main__":
    main()
