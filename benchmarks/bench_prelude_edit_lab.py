"""What editing an ordinary (prelude) cell adds to the next ``%%step``, in a real JupyterLab.

The browser half of issue 15's target (the kernel half is
``bench_prelude_edit.py``): a real JupyterLab server and headless Debian
Chromium (the helpers of ``tests/browser``), a notebook with an ordinary cell
(``RATE = 1``, ``import math``, a small def), a ``%%step`` that reads them and
a plain cell doing the same work. Timed in the page, as a user sees it: from
the Shift+Enter keydown on the cell to the moment the cell shows its new
execution count and its output (and, separately, to the kernel indicator
going idle). N rounds, alternating: the cell right after the ordinary cell's
first line was retyped and re-executed in the page, then the same cell again
with no edit; for the step, then for the plain cell. Prints medians, the
added time and its ratio to the 0.3 s target, and takes a screenshot.
``--pandas``: the prelude imports pandas and both cells use it.
``--profile FILE``: cProfile in the notebook's kernel during the measured rounds
(switched on and off through a second client, not through the page).
``--think S``: wait S seconds before the first edit, as a user typing would
(with ``--pandas``, an edit while the kernel's base server still imports
pandas pays for a new server's imports).
Usage: ``python benchmarks/bench_prelude_edit_lab.py [N] [--pandas] [--think S] [--screenshot FILE] [--profile FILE]``.
"""
from __future__ import annotations

import argparse
import os
import queue
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_client import BlockingKernelClient

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "browser"))

from labfixtures import launch_chromium, start_lab, stop_lab  # noqa: E402
from labpage import open_notebook, wait_idle, write_notebook  # noqa: E402

LOAD, PRELUDE, STEP, PLAIN = 0, 1, 2, 3   # cell indexes in the notebook
TARGET = 0.3

# Armed before the key is pressed: the keydown (capture phase, before
# JupyterLab sees it) starts the clock; a MutationObserver stops it when the
# cell shows a new execution count (the reply arrived; the output came before
# it) and records whether the output holds the expected value, then when the
# kernel indicator is idle again.
ARM = """([index, marker]) => {
  const cell = document.querySelectorAll('.jp-Notebook .jp-Cell')[index];
  const count = () => {
    const found = /\\[(\\d+)\\]/.exec(cell.querySelector('.jp-InputPrompt').textContent);
    return found ? Number(found[1]) : null;
  };
  const before = count();
  const state = window.__bench = {start: null, shown: null, idle: null, wrong: null};
  const key = event => {
    if (event.key === 'Enter' && event.shiftKey && state.start === null) state.start = performance.now();
  };
  document.addEventListener('keydown', key, true);
  const check = () => {
    if (state.start === null) return;
    if (state.shown === null) {
      const now = count();
      const out = cell.querySelector('.jp-OutputArea')?.textContent || '';
      if (now !== null && now !== before) {
        state.shown = performance.now();
        if (!out.includes(marker)) state.wrong = out;
      }
    }
    if (state.shown !== null &&
        document.querySelector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')) {
      state.idle = performance.now();
      observer.disconnect();
      document.removeEventListener('keydown', key, true);
    }
  };
  const observer = new MutationObserver(check);
  observer.observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


@dataclass
class Timing:
    shown: list[float] = field(default_factory=list)   # Shift+Enter -> count and output in the cell
    idle: list[float] = field(default_factory=list)    # Shift+Enter -> kernel idle again
    kernel: list[float] = field(default_factory=list)  # the kernel's own busy -> idle

    def add(self, shown: float, idle: float, kernel: float) -> None:
        self.shown.append(shown)
        self.idle.append(idle)
        self.kernel.append(kernel)


class KernelClock:
    """Listens to the notebook kernel's iopub beside JupyterLab: each execute request's
    busy -> idle by the kernel's own clock, so the page's share can be told apart."""

    def __init__(self, connection_file: Path) -> None:
        self.client = BlockingKernelClient(connection_file=str(connection_file))
        self.client.load_connection_file()
        self.client.start_channels(shell=True, iopub=True, stdin=False, hb=False, control=False)
        self.done: queue.Queue[float] = queue.Queue()
        self._busy: dict[str, object] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.client.get_iopub_msg(timeout=0.2)
            except queue.Empty:
                continue
            parent = msg["parent_header"]
            if msg["msg_type"] != "status" or parent.get("msg_type") != "execute_request" \
                    or parent.get("session") == self.client.session.session:
                continue   # comm messages and kernel_info requests go busy/idle too; and ours
            if msg["content"]["execution_state"] == "busy":
                self._busy[parent["msg_id"]] = msg["header"]["date"]
            elif msg["content"]["execution_state"] == "idle" and parent["msg_id"] in self._busy:
                self.done.put((msg["header"]["date"] - self._busy.pop(parent["msg_id"])).total_seconds())

    def next(self) -> float:
        """The kernel time of the next execution to finish (one per Shift+Enter)."""
        return self.done.get(timeout=60)

    def execute(self, code: str) -> None:
        """Run code in the kernel from this client (silent: no history, no count)."""
        msg_id = self.client.execute(code, silent=True, store_history=False)
        reply = self.client.get_shell_msg(timeout=60)   # iopub is the listener's
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.client.get_shell_msg(timeout=60)
        if reply["content"]["status"] != "ok":
            raise SystemExit(f"kernel: {code!r}: {reply['content'].get('evalue')}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)   # its socket must not close under its poll
        self.client.stop_channels()


def kernel_clock(lab, base: Path, name: str) -> KernelClock:
    for session in lab.api("/api/sessions"):
        if session.get("path") == name:
            return KernelClock(base / "runtime" / f"kernel-{session['kernel']['id']}.json")
    raise SystemExit(f"no kernel for {name}")


def cells(pandas: bool) -> list[str | tuple[str, str]]:
    imports = "import math\nimport pandas as pd\n" if pandas else "import math\n"
    work = "float(pd.Series([scaled(x) for x in range(5)]).sum())" if pandas else \
        "sum(scaled(x) for x in range(5))"
    return [
        "%load_ext flowmagic\n%flow name PreludeEditLab",
        f"RATE = 1\n{imports}def scaled(x):\n    return x * RATE + math.sqrt(4)",
        f"%%step compute\ny = {work}\nprint('step result', y)",
        f"z = {work}\nprint('plain result', z)",
        ("markdown", "Shift+Enter on the plain cell lands here (no new cell is added)."),
    ]


def press(page, clock: KernelClock, index: int, marker: str) -> tuple[float, float, float]:
    """Shift+Enter in cell ``index`` (its editor already focused): seconds until the cell
    shows its result, until the page's kernel indicator is idle, and the kernel's own time."""
    page.evaluate(ARM, [index, marker])
    page.keyboard.press("Shift+Enter")
    page.wait_for_function("() => window.__bench.idle !== null", timeout=180_000, polling=50)
    state = page.evaluate("() => window.__bench")
    wait_idle(page)
    if state["wrong"] is not None:
        raise SystemExit(f"cell {index + 1}: expected {marker!r} in its output, got {state['wrong']!r}")
    kernel = clock.next()
    return (state["shown"] - state["start"]) / 1000, (state["idle"] - state["start"]) / 1000, kernel


def focus(page, index: int) -> None:
    target = page.locator(".jp-Notebook .jp-Cell").nth(index).locator(".jp-InputArea-editor")
    target.scroll_into_view_if_needed()
    target.click()


def timed_run(page, clock: KernelClock, index: int, marker: str) -> tuple[float, float, float]:
    """Click into cell ``index`` and execute it as it is."""
    focus(page, index)
    return press(page, clock, index, marker)


def edit_prelude(page, clock: KernelClock, rate: int) -> tuple[float, float, float]:
    """Retype the ordinary cell's first line as a user would, execute it; its own times."""
    focus(page, PRELUDE)
    page.keyboard.press("Control+Home")
    page.keyboard.press("Shift+End")
    page.keyboard.type(f"RATE = {rate}")
    return press(page, clock, PRELUDE, "")


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:.0f} ms  ({', '.join(f'{v * 1000:.0f}' for v in values)})"


def expected(kind: str, rate: int) -> str:
    """What the cell prints with this RATE: sum(x * RATE + 2 for x in range(5)) as a float."""
    return f"{kind} result {float(10 * rate + 10)}"


def measure(page, clock: KernelClock, n: int, profile: Path | None = None, think: float = 0) -> dict[str, object]:
    """Warm-up, then n rounds alternating edited / not edited, step then plain cell.

    Every output is checked against the RATE the page last typed, so a step
    that ran with the previous prelude would stop the benchmark.
    """
    rate = 1
    first = {}
    for index, marker in ((LOAD, ""), (PRELUDE, ""), (STEP, expected("step", rate)),
                          (PLAIN, expected("plain", rate))):
        first[index] = timed_run(page, clock, index, marker)
    rate += 1
    time.sleep(think)
    first["edit"] = edit_prelude(page, clock, rate)          # the first edit: a new prelude's server
    first["step after edit"] = timed_run(page, clock, STEP, expected("step", rate))
    results = {name: Timing() for name in ("step edited", "step", "plain edited", "plain")}
    if profile:
        clock.execute("import cProfile as _bench_cp; _bench_prof = _bench_cp.Profile(); _bench_prof.enable()")
    edits = Timing()
    for _ in range(n):
        for index, kind in ((STEP, "step"), (PLAIN, "plain")):
            rate += 1
            edits.add(*edit_prelude(page, clock, rate))
            results[f"{kind} edited"].add(*timed_run(page, clock, index, expected(kind, rate)))
            results[kind].add(*timed_run(page, clock, index, expected(kind, rate)))
    if profile:
        clock.execute(f"_bench_prof.disable(); _bench_prof.dump_stats({str(profile)!r})")
    timed_run(page, clock, STEP, expected("step", rate))     # so the screenshot shows a fresh step
    return {"first": first, "results": results, "edits": edits}


def report(measured: dict[str, object], pandas: bool, n: int, think: float) -> None:
    first, results, edits = measured["first"], measured["results"], measured["edits"]
    print(f"JupyterLab + headless Chromium, {'--pandas, ' if pandas else ''}medians of {n}; "
          f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(f"warm-up ({think:g} s before the first edit): first step {first[STEP][0] * 1000:.0f} ms, "
          f"first plain cell {first[PLAIN][0] * 1000:.0f} ms, first edit {first['edit'][0] * 1000:.0f} ms, "
          f"the step after it {first['step after edit'][0] * 1000:.0f} ms "
          f"(kernel {first['step after edit'][2] * 1000:.0f} ms)")
    for kind in ("step", "plain"):
        label = "%%step cell" if kind == "step" else "plain cell"
        plain, edited = results[kind], results[f"{kind} edited"]
        print(f"{label}, no edit:            shown {ms(plain.shown)}; idle {ms(plain.idle)}; "
              f"kernel {ms(plain.kernel)}")
        print(f"{label}, after an edit:      shown {ms(edited.shown)}; idle {ms(edited.idle)}; "
              f"kernel {ms(edited.kernel)}")
        added = statistics.median(edited.shown) - statistics.median(plain.shown)
        added_idle = statistics.median(edited.idle) - statistics.median(plain.idle)
        added_kernel = statistics.median(edited.kernel) - statistics.median(plain.kernel)
        print(f"{label}, added by the edit:  {added * 1000:+.0f} ms shown, {added_idle * 1000:+.0f} ms idle, "
              f"{added_kernel * 1000:+.0f} ms in the kernel "
              f"({added / TARGET:.2f} of the {TARGET * 1000:.0f} ms target)")
    step_vs_plain = statistics.median(results["step"].shown) - statistics.median(results["plain"].shown)
    print(f"a %%step cell over a plain cell, no edit: {step_vs_plain * 1000:+.0f} ms")
    print(f"the edited ordinary cell itself:     shown {ms(edits.shown)}; idle {ms(edits.idle)}; "
          f"kernel {ms(edits.kernel)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("n", nargs="?", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--pandas", action="store_true", help="the prelude imports pandas, the cells use it")
    parser.add_argument("--screenshot", type=Path, default=REPO / "test-artifacts" / "bench_prelude_edit_lab.png")
    parser.add_argument("--think", type=float, default=0, help="seconds before the first edit (default 0)")
    parser.add_argument("--profile", type=Path, help="cProfile the kernel during the rounds, stats to FILE")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    base = Path(tempfile.mkdtemp(prefix="bench-lab-"))
    lab = start_lab(base)
    try:
        with sync_playwright() as playwright:
            browser = launch_chromium(playwright)
            page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
            write_notebook(lab.root / "prelude_edit.ipynb", cells(args.pandas))
            started = time.monotonic()
            open_notebook(page, lab, "prelude_edit.ipynb")
            print(f"JupyterLab page and kernel ready in {time.monotonic() - started:.1f} s", file=sys.stderr)
            clock = kernel_clock(lab, base, "prelude_edit.ipynb")
            try:
                measured = measure(page, clock, args.n, args.profile and args.profile.resolve(), args.think)
            finally:
                clock.close()
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.screenshot))
            browser.close()
    finally:
        stop_lab(lab)
    report(measured, args.pandas, args.n, args.think)
    print(f"screenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
