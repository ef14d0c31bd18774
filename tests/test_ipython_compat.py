"""flowmagic.runtime.worker.ipython_compat: the one place private IPython details live.

Each leg of CI runs one IPython major (lowest-direct: 8, newest: 9); the tests
below check the compatibility layer against the IPython that is installed,
and say which major they ran on.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import IPython
import pytest

from flowmagic.runtime.worker.ipython_compat import NamespaceModule

MAJOR = int(IPython.__version__.split(".")[0])


def test_a_namespace_module_shares_its_namespace():
    namespace = {"a": 1}
    module = NamespaceModule.over(namespace)
    module.b = 2
    assert namespace == {"a": 1, "b": 2}
    assert module.a == 1


@pytest.mark.parametrize("major", [8, 9])
def test_time_magic_binds_in_the_tasks_namespace(major):
    if major != MAJOR:
        pytest.skip(f"IPython {IPython.__version__} is installed; this leg covers IPython {MAJOR}")
    # A fresh interpreter: the shell is a process-wide singleton.
    code = textwrap.dedent("""
        from flowmagic.runtime.worker.execute import execute_cell, prepare_shell
        prepare_shell(warm=False)
        ns = {}
        result = execute_cell("%time x = 41 + 1\\n", ns, filename="<cell>", first_line=1, emit=lambda o: None)
        assert result.ok, result.error
        print(ns["x"])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "42"


def test_no_private_ipython_name_is_imported_outside_the_compat_module():
    from pathlib import Path

    package = Path(__file__).resolve().parent.parent / "flowmagic"
    offenders = [
        f"{path.relative_to(package)}:{number}"
        for path in package.rglob("*.py") if path.name != "ipython_compat.py"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "from IPython.core.interactiveshell import" in line
        and line.split("import", 1)[1].replace("InteractiveShell", "").strip(" ,")
    ]
    assert offenders == []
