"""What editing an ordinary (prelude) cell adds to the next ``%%step``, in a real kernel.

Through jupyter_client (request sent -> reply received, as a front end sees
it), N times each: a step executed after another step (no edit), and the
same step executed right after the prelude cell (``import math`` plus a
constant) was edited. Issue 15 target: at most 0.3 s added. Also the edited
ordinary cell's own time (it checks which steps the edit made stale). ``--pandas``: the
prelude imports pandas too and the step uses it (the flow's server then loads it).
Usage: ``python benchmarks/bench_prelude_edit.py [N] [--pandas]``.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

from jupyter_client import KernelManager


def timed(kc, code: str, cell_id: str) -> float:
    # JupyterLab sends the cell id in the request's metadata: an edited cell replaces itself
    content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
               "allow_stdin": False, "stop_on_error": False}
    msg = kc.session.msg("execute_request", content, metadata={"cellId": cell_id})
    started = time.perf_counter()
    kc.shell_channel.send(msg)
    reply = kc.get_shell_msg(timeout=120)
    while reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
        reply = kc.get_shell_msg(timeout=120)
    took = time.perf_counter() - started
    if reply["content"]["status"] != "ok":
        raise SystemExit(f"cell failed: {code!r}: {reply['content'].get('evalue')}")
    return took


def main(n: int = 5, pandas: bool = False) -> None:
    imports = "import math\nimport pandas as pd\n" if pandas else "import math\n"
    after = "%%step after\ny = pd.Series([x]).sum()" if pandas else "%%step after\ny = x + 1"
    folder = tempfile.mkdtemp()
    env = dict(os.environ, FLOWMAGIC_HOME=os.path.join(folder, "store"))
    env.pop("JPY_SESSION_NAME", None)
    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=folder, env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    try:
        timed(kc, "%load_ext flowmagic", "load")
        timed(kc, f"{imports}SCALE = 0", "prelude")
        timed(kc, "%%step start\nx = math.sqrt(4) + SCALE", "start")
        timed(kc, after, "after")   # warm-up
        plain = [timed(kc, after, "after") for _ in range(n)]
        edited, edits = [], []
        for i in range(n):
            # the edit cell itself also checks which steps it made stale (they are)
            edits.append(timed(kc, f"{imports}SCALE = {i + 1}", "prelude"))
            edited.append(timed(kc, after, "after"))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    p, e = statistics.median(plain), statistics.median(edited)
    print(f"step, no edit:               median {p * 1000:.0f} ms  ({', '.join(f'{t * 1000:.0f}' for t in plain)})")
    print(f"step after a prelude edit:   median {e * 1000:.0f} ms  ({', '.join(f'{t * 1000:.0f}' for t in edited)})")
    print(f"added by the edit:           {(e - p) * 1000:.0f} ms (target <= 300 ms)")
    print(f"the edited ordinary cell:    median {statistics.median(edits) * 1000:.0f} ms  "
          f"({', '.join(f'{t * 1000:.0f}' for t in edits)})")


if __name__ == "__main__":
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    main(int(numbers[0]) if numbers else 5, pandas="--pandas" in sys.argv[1:])
