"""flowmagic: Metaflow's model inside the Jupyter notebook."""
from __future__ import annotations

__version__ = "0.1.0"

# The Client API is imported on first use, so `import flowmagic` stays fast.
_CLIENT_NAMES = frozenset({"DataArtifact", "Flow", "Metaflow", "Run", "Step", "Task", "namespace_root"})


def __getattr__(name: str):
    if name in _CLIENT_NAMES:
        from flowmagic import client

        return getattr(client, name)
    raise AttributeError(f"module 'flowmagic' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _CLIENT_NAMES)


def load_ipython_extension(ipython) -> None:
    """``%load_ext flowmagic``: register %%step, %%params and %flow."""
    from flowmagic.magics.extension import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from flowmagic.magics.extension import unload

    unload(ipython)
