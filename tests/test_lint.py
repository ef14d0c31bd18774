"""Guard rails: ruff (configured in pyproject.toml) and docstrings on the whole public Client API."""
from __future__ import annotations

import inspect
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import flowmagic.client as client

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    result = subprocess.run([ruff, "check", "--no-cache", "flowmagic", "tests", "benchmarks", "scripts"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def _public_members(cls: type) -> list[tuple[str, object]]:
    """The public methods and properties ``cls`` defines or inherits from flowmagic (not from object/dict)."""
    members = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith("flowmagic"):
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in dict(members):
                continue
            if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
                members.append((name, value))
    return members


def undocumented(module) -> list[str]:
    """``module.__all__`` names (and their classes' public methods/properties) without a docstring."""
    missing = []
    for name in module.__all__:
        obj = getattr(module, name)
        if not (inspect.getdoc(obj) or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for member, value in _public_members(obj):
                target = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
                if not (getattr(target, "__doc__", None) or "").strip():
                    missing.append(f"{name}.{member}")
    return missing


def test_every_public_client_name_has_a_docstring():
    """What `Run?` / `run.data?` shows in a notebook: nothing public may be blank."""
    assert undocumented(client) == []


def test_the_docstring_check_sees_a_blank_method():
    class Documented:
        """A class."""

        def ok(self):
            """Has one."""

        @property
        def blank(self):
            return 1

    Documented.__module__ = "flowmagic.fake"
    module = type(sys)("fake")
    module.__all__ = ["Documented"]
    module.Documented = Documented
    assert undocumented(module) == ["Documented.blank"]


@pytest.mark.parametrize("name", client.__all__)
def test_help_in_a_notebook_shows_the_docstring(name):
    # `X?` in IPython prints inspect.getdoc(X): the first line must say what X is
    assert inspect.getdoc(getattr(client, name)).splitlines()[0].strip()
