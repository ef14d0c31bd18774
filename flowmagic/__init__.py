"""flowmagic: Metaflow's model inside the Jupyter notebook."""
from __future__ import annotations

__version__ = "0.1.0"


def load_ipython_extension(ipython) -> None:
    """``%load_ext flowmagic``: register %%step, %%params and %flow."""
    from flowmagic.magics import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from flowmagic.magics import unload

    unload(ipython)
