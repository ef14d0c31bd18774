"""The layer rules of docs/ARCHITECTURE.md, enforced: import-linter's contracts
(pyproject.toml) and no private name imported across packages."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "flowmagic"


def test_the_import_contracts_hold():
    lint_imports = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([lint_imports, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _top_package(module: str) -> str:
    """'flowmagic.store.outputs' -> 'store'; a top-level module is its own package ('notebook')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def private_imports_across_packages(source: str, module: str) -> list[str]:
    """``from flowmagic.X import _y`` lines of ``source`` where X is another top-level package than ``module``'s."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom) or node.level or not (node.module or "").startswith("flowmagic"):
            continue
        if _top_package(node.module) == _top_package(module):
            continue
        for alias in node.names:
            if alias.name.startswith("_") and not alias.name.startswith("__"):
                found.append(f"{module}:{node.lineno} imports {node.module}.{alias.name}")
    return found


def test_no_private_name_is_imported_across_packages():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += private_imports_across_packages(path.read_text(), _module_of(path))
    assert found == []


@pytest.mark.parametrize("source, module, expected", [
    ("from flowmagic.report.text import _number\n", "flowmagic.cli.commands.runs",
     ["flowmagic.cli.commands.runs:1 imports flowmagic.report.text._number"]),
    ("def f():\n    from flowmagic.cli.main import _Parser\n", "flowmagic.magics.runs",
     ["flowmagic.magics.runs:2 imports flowmagic.cli.main._Parser"]),
    ("from flowmagic.store.objects import _shard\n", "flowmagic.store.gc", []),   # same package: allowed
    ("from flowmagic.store import Store\n", "flowmagic.client._base", []),
    ("from ._base import _fmt_size\n", "flowmagic.client._runs", []),
])
def test_the_private_import_check_sees_what_it_should(source, module, expected):
    assert private_imports_across_packages(source, module) == expected


def test_only_store_paths_reads_flowmagic_home():
    """One store-root resolver: the console, %flow, the Client and the notebook reader agree by construction."""
    readers = sorted(str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
                     if '"FLOWMAGIC_HOME")' in path.read_text() or "'FLOWMAGIC_HOME')" in path.read_text())
    assert readers == ["flowmagic/store/paths.py"]
