"""The notebook's prelude, made to run inside a step's isolated environment.

The ordinary cells were written for the kernel's packages; an environment
holds only the step's own (plus flowmagic's worker packages). A top-level
import the environment lacks must not fail every step that runs there, so
each one is wrapped: on ImportError the name is bound to a placeholder whose
first use raises ModuleNotFoundError saying what to add to ``--pypi``.
Pure: source text in, source text out.
"""
from __future__ import annotations

import ast

_MISSING_HELPER = '''
class _FlowmagicMissingModule:
    """Stands for a prelude import that this step's environment does not have."""
    def __init__(self, name, error):
        object.__setattr__(self, "_fm_message", (
            f"{error} in this step's isolated environment: the notebook's ordinary cells import it, "
            f"but only the step's --pypi/--conda packages (and flowmagic's own) are installed there; "
            f"add it to the step's package list to use {name!r} in this step"))
    def __getattr__(self, attribute):
        raise ModuleNotFoundError(object.__getattribute__(self, "_fm_message"))
    def __call__(self, *args, **kwargs):
        raise ModuleNotFoundError(object.__getattribute__(self, "_fm_message"))
'''


def prelude_for_environment(prelude: str) -> str:
    """The prelude with every top-level import made tolerant of a missing module.

    The notebook's ordinary cells were written for the kernel's packages; an
    isolated environment holds only the step's own. A missing import must not
    fail every step of that environment: the name is bound to a placeholder
    whose first use raises ModuleNotFoundError saying what to add to --pypi.
    """
    try:
        tree = ast.parse(prelude)
    except SyntaxError:
        return prelude   # the fork server reports it, as for the kernel's own prelude
    lines = prelude.splitlines()
    shared = _lines_holding_several_statements(tree)
    future, pieces, done = [], [], 0
    for node in tree.body:
        start, end = node.lineno - 1, node.end_lineno
        if not isinstance(node, (ast.Import, ast.ImportFrom)) or shared & set(range(start, end)):
            continue   # not an import, or `import a; x = 1` on one line: left as it is
        pieces.extend(lines[done:start])
        if isinstance(node, ast.ImportFrom) and node.module == "__future__":
            future.extend(lines[start:end])   # must stay first, cannot be in a try
        else:
            pieces.extend(_tolerant_import(node))
        done = end
    if not done:
        return prelude
    pieces.extend(lines[done:])
    return "\n".join([*future, _MISSING_HELPER, *pieces]) + "\n"


def _lines_holding_several_statements(tree: ast.Module) -> set[int]:
    seen: dict[int, int] = {}
    for node in tree.body:
        for line in range(node.lineno - 1, node.end_lineno):
            seen[line] = seen.get(line, 0) + 1
    return {line for line, count in seen.items() if count > 1}


def _tolerant_import(node: ast.Import | ast.ImportFrom) -> list[str]:
    """One try per imported name, so a missing one does not hide the others."""
    out = []
    for alias in node.names:
        single = type(node)(names=[alias], **({"module": node.module, "level": node.level}
                                              if isinstance(node, ast.ImportFrom) else {}))
        out += ["try:", "    " + ast.unparse(single), "except ImportError as _fm_error:"]
        if alias.name == "*":
            out.append("    pass")
        else:
            bound = alias.asname or alias.name.split(".")[0]
            out.append(f"    {bound} = _FlowmagicMissingModule({bound!r}, _fm_error)")
    return out
