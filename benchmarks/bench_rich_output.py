"""Rich step output: flowmagic's captured display()/figures against Metaflow cards.

Same machine, same run, real packages:

1. A flow whose first step shows a data frame, draws a matplotlib figure and
   ends with a value. flowmagic: plain notebook code (the outputs are captured
   and stored with the task). Metaflow: the same step with ``@card`` and
   ``current.card.append(Table/Image/Markdown)``. Whole ``run`` command.
2. Reading those outputs back in a fresh process: ``task.outputs`` against
   ``metaflow.cards.get_cards(task)``.
3. A step raising inside a helper: how many traceback frames the user is
   shown, and how many of them are the framework's own.
4. In a forked task process (as the fork server runs them): the cost of
   ``execute_cell`` over a bare ``exec`` for a trivial body.

    python benchmarks/bench_rich_output.py [--repeat 3]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat

METAFLOW_FLOW = '''
import pandas as pd
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from metaflow import FlowSpec, step, card, current
from metaflow.cards import Table, Image, Markdown


class RichFlow(FlowSpec):
    @card(type="blank")
    @step
    def start(self):
        self.table = pd.DataFrame({"city": ["Oslo", "Lima", "Pune"], "rain": [7, 2, 5]})
        current.card.append(Table.from_dataframe(self.table))
        fig, ax = plt.subplots()
        ax.bar(self.table["city"], self.table["rain"])
        current.card.append(Image.from_matplotlib(fig))
        current.card.append(Markdown(str(int(self.table["rain"].sum()) * 100)))
        self.next(self.end)

    @step
    def end(self):
        self.total = int(self.table["rain"].sum())


if __name__ == "__main__":
    RichFlow()
'''

NOTEBOOK_CELLS = [
    "%load_ext flowmagic",
    "import pandas as pd\nimport matplotlib.pyplot as plt",
    "%%step start\ntable = pd.DataFrame({'city': ['Oslo', 'Lima', 'Pune'], 'rain': [7, 2, 5]})\n"
    "display(table)\nplt.bar(table['city'], table['rain'])\nint(table['rain'].sum()) * 100",
    "%%step end\ntotal = int(table['rain'].sum())",
]

METAFLOW_FAILING = '''
from metaflow import FlowSpec, step


def ratio(a, b):
    return a / b


class FailFlow(FlowSpec):
    @step
    def start(self):
        self.level = ratio(1, 0)
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    FailFlow()
'''

FAILING_CELLS = [
    "%load_ext flowmagic",
    "def ratio(a, b):\n    return a / b",
    "%%step start\nlevel = ratio(1, 0)",
    "%%step end\ndone = level",
]

READ_FLOWMAGIC = ("from flowmagic.client import Flow\n"
                  "outs = Flow('Rich').latest_run['start'].task.outputs\n"
                  "assert any('image/png' in o.data for o in outs), outs\n")
READ_METAFLOW = ("from metaflow import Flow, namespace\nfrom metaflow.cards import get_cards\nnamespace(None)\n"
                 "task = Flow('RichFlow').latest_run['start'].task\n"
                 "cards = get_cards(task)\nassert 'data:image/png' in cards[0].get(), 'no image'\n")


def _env(workdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"USERNAME": "bench", "METAFLOW_DEFAULT_METADATA": "local", "METAFLOW_DEFAULT_DATASTORE": "local",
                "FLOWMAGIC_HOME": str(workdir / ".flowmagic"), "MPLBACKEND": "Agg"})
    return env


def _run(cmd: list[str], workdir: Path, expect_ok: bool = True) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, env=_env(workdir), capture_output=True, text=True)
    took = time.perf_counter() - started
    if (proc.returncode == 0) != expect_ok:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return took, proc


def _flowmagic(*args: str) -> list[str]:
    exe = shutil.which("flowmagic")
    return [exe, *args] if exe else [sys.executable, "-m", "flowmagic.cli.main", *args]


def _notebook(path: Path, cells: list[str]) -> Path:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nbformat.write(nb, path)
    return path


def bench_rich_run(workdir: Path) -> tuple[float, float, float, float]:
    """(metaflow run, flowmagic run, metaflow read, flowmagic read) seconds."""
    script = workdir / "rich_flow.py"
    script.write_text(METAFLOW_FLOW)
    nb = _notebook(workdir / "rich.ipynb", NOTEBOOK_CELLS)
    mf_run, _ = _run([sys.executable, str(script), "--no-pylint", "--quiet", "run"], workdir)
    fm_run, _ = _run(_flowmagic("run", str(nb)), workdir)
    mf_read, _ = _run([sys.executable, "-c", READ_METAFLOW], workdir)
    fm_read, _ = _run([sys.executable, "-c", READ_FLOWMAGIC], workdir)
    return mf_run, fm_run, mf_read, fm_read


_FRAME = re.compile(r'File "([^"]+)", line \d+')  # Metaflow prefixes each log line with a timestamp


def _frames(traceback_text: str, framework: str) -> tuple[int, int]:
    files = _FRAME.findall(traceback_text)
    return len(files), sum(1 for f in files if f"/{framework}/" in f)


def bench_traceback(workdir: Path) -> tuple[tuple[int, int], tuple[int, int]]:
    """((frames, metaflow's frames) shown by metaflow, (frames, flowmagic's frames) by flowmagic)."""
    script = workdir / "fail_flow.py"
    script.write_text(METAFLOW_FAILING)
    _, proc = _run([sys.executable, str(script), "--no-pylint", "run"], workdir, expect_ok=False)
    metaflow_tb = proc.stdout + proc.stderr
    nb = _notebook(workdir / "failing.ipynb", FAILING_CELLS)
    _, proc = _run(_flowmagic("run", str(nb)), workdir, expect_ok=False)
    code = ("from flowmagic.client import Flow\n"
            "print(Flow('Failing').latest_run['start'].task.exception.traceback)\n")
    _, shown = _run([sys.executable, "-c", code], workdir)
    assert "return a / b" in shown.stdout, shown.stdout
    return _frames(metaflow_tb, "metaflow"), _frames(shown.stdout, "flowmagic")


def bench_execute_overhead(samples: int = 40) -> tuple[float, float]:
    """Median in-child seconds of exec vs execute_cell on a trivial body, after fork."""
    import pandas  # noqa: F401 - a warm server has the heavy modules loaded

    from flowmagic.runtime.worker.execute import execute_cell, prepare_shell

    prepare_shell()
    results = {"exec": [], "cell": []}
    for kind in results:
        for _ in range(samples):
            read_fd, write_fd = os.pipe()
            pid = os.fork()
            if pid == 0:
                ns = {"__name__": "__main__"}
                started = time.perf_counter()
                if kind == "cell":
                    execute_cell("x = 1\ny = x + 1\n", ns, filename="<bench>", first_line=2, emit=lambda _o: None)
                else:
                    exec(compile("x = 1\ny = x + 1\n", "<bench>", "exec"), ns)  # noqa: S102
                os.write(write_fd, repr(time.perf_counter() - started).encode())
                os._exit(0)
            os.close(write_fd)
            results[kind].append(float(os.read(read_fd, 64)))
            os.close(read_fd)
            os.waitpid(pid, 0)
    return statistics.median(results["exec"]), statistics.median(results["cell"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of the timed commands (median shown)")
    args = parser.parse_args()
    runs = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-rich-") as tmp:
            runs.append(bench_rich_run(Path(tmp)))
    mf_run, fm_run, mf_read, fm_read = (statistics.median(column) for column in zip(*runs))
    with tempfile.TemporaryDirectory(prefix="bench-rich-tb-") as tmp:
        (mf_frames, mf_own), (fm_frames, fm_own) = bench_traceback(Path(tmp))
    plain, cell = bench_execute_overhead()

    print(f"{'':58} {'metaflow':>10} {'flowmagic':>10} {'ratio':>7}")
    print(f"{'table + figure + value step, whole run command (s)':58} {mf_run:10.2f} {fm_run:10.2f} "
          f"{fm_run / mf_run:7.2f}")
    print(f"{'read the outputs back, fresh process (s)':58} {mf_read:10.2f} {fm_read:10.2f} "
          f"{fm_read / mf_read:7.2f}")
    print(f"{'helper error: traceback frames shown':58} {mf_frames:10d} {fm_frames:10d}")
    print(f"{'  of which the framework own':58} {mf_own:10d} {fm_own:10d}")
    print(f"execute_cell in a forked task: {cell * 1e3:.2f} ms vs bare exec {plain * 1e3:.2f} ms "
          f"(+{(cell - plain) * 1e3:.2f} ms per task)")


if __name__ == "__main__":
    main()
