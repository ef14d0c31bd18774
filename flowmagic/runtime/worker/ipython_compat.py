"""The few things flowmagic needs from IPython beyond its documented API, in one place.

Each supported major version (8 and 9) is tested in ``tests/test_ipython_compat.py``.
Keep this module tiny: everything else uses IPython's public API.
"""
from __future__ import annotations

from typing import Any


class NamespaceModule:
    """A module-like object whose ``__dict__`` *is* a given namespace.

    ``InteractiveShell.user_module`` must be such an object for magics
    (``%time x = 1``) to bind in the task's namespace. IPython 8 shipped one
    as ``IPython.core.interactiveshell.DummyMod``; IPython 9 dropped it. A
    ``types.ModuleType`` cannot be used: its ``__dict__`` is read-only.
    """

    @classmethod
    def over(cls, namespace: dict[str, Any]) -> NamespaceModule:
        module = cls()
        module.__dict__ = namespace
        return module
