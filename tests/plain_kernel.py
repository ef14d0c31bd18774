"""Execute a flowmagic notebook top to bottom in a *plain* IPython kernel.

This is DESIGN's invariant made executable: a flow run must yield the same
values as Run All in a kernel that has never heard of flowmagic. Each
`%%step` body runs as an ordinary cell; a `--foreach` step runs its body once
per item in a copy of the namespace and binds the gathered lists (and
`inputs`), `--catch VAR` records the exception, `--retry N` tries again a second
later (as the runtime does), `%%params` binds defaults.
The values come back pickled, so tests can compare them with artifacts.
"""
from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from flowmagic.flow.graph import build_flow
from flowmagic.notebook import read_cells

_PARAMETER_SHIM = '''
def Parameter(name, default=None, help="", type=None):
    return default
'''

_FOREACH_TEMPLATE = '''
import types as _types
_items = list({foreach})
_results = []
for _item in _items:
    _ns = dict(globals())
    _ns["input"] = _item
    {catch_init}
    try:
        exec(compile({body!r}, "<step {name}>", "exec"), _ns)
    except Exception as _exc:
        {catch_handler}
    _results.append(_ns)
for _name in {writes!r}:
    globals()[_name] = [_r.get(_name) for _r in _results]
inputs = [_types.SimpleNamespace(**{{_n: _r.get(_n) for _n in {writes!r}}}) for _r in _results]
'''

_CATCH_TEMPLATE = '''
{catch} = None
try:
    exec(compile({body!r}, "<step {name}>", "exec"), globals())
except Exception as _exc:
    {catch} = {{"type": type(_exc).__name__, "message": str(_exc)}}
    for _name in {writes!r}:
        globals().setdefault(_name, None)
'''


_RETRY_TEMPLATE = '''
import time as _time
for _attempt in range({attempts}):
    try:
        exec(compile({body!r}, "<step {name}>", "exec"), globals())
        break
    except Exception:
        if _attempt == {attempts} - 1:
            raise
        _time.sleep(1.0)   # as the runtime spaces retries
'''


def plain_cells(path: Path) -> list[str]:
    """The notebook's code, rewritten so a kernel without flowmagic runs it."""
    cells = read_cells(path)
    graph = build_flow(cells)
    steps = {s.cell: s for s in graph.steps}
    out: list[str] = []
    for index, source in enumerate(cells):
        stripped = source.lstrip()
        if index in steps:
            out.append(_plain_step(steps[index]))
        elif stripped.startswith("%%params"):
            out.append(_PARAMETER_SHIM + source.split("\n", 1)[1] if "\n" in source else "")
        elif "flowmagic" in source:
            continue  # cells that read runs back through the Client API need flowmagic
        elif stripped:
            kept = [ln for ln in source.splitlines() if not ln.lstrip().startswith(("%load_ext", "%flow"))]
            out.append("\n".join(kept))
    return [c for c in out if c.strip()]


def _plain_step(step) -> str:
    writes = tuple(step.writes)
    catch = step.options.catch
    if step.options.foreach:
        if catch:
            catch_init = f'_ns["{catch}"] = None'
            catch_handler = (
                f'_ns["{catch}"] = {{"type": type(_exc).__name__, "message": str(_exc)}}\n'
                f"        for _n in {writes!r}:\n            _ns.setdefault(_n, None)"
            )
        else:
            catch_init, catch_handler = "pass", "raise"
        return _FOREACH_TEMPLATE.format(
            foreach=step.options.foreach, body=step.code, name=step.name, writes=writes,
            catch_init=catch_init, catch_handler=catch_handler,
        )
    if catch:
        return _CATCH_TEMPLATE.format(catch=catch, body=step.code, name=step.name, writes=writes)
    if step.options.retry:
        return _RETRY_TEMPLATE.format(attempts=step.options.retry + 1, body=step.code, name=step.name)
    return step.code


def run_plainly(path: Path, names: list[str], workdir: Path, timeout: int = 60) -> dict:
    """Run the notebook in a fresh plain kernel; return the named values."""
    dump = workdir / "plain-values.pkl"
    cells = plain_cells(path) + [textwrap.dedent(f'''
        import pickle as _pickle
        with open({str(dump)!r}, "wb") as _f:
            _pickle.dump({{_n: globals().get(_n) for _n in {names!r}}}, _f)
    ''')]
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}).execute()
    with open(dump, "rb") as f:
        return pickle.load(f)
