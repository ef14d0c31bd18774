"""The one rule for where a store lives: ``$FLOWMAGIC_HOME``, else ``.flowmagic/`` next to the notebook
(or in the current directory when there is no notebook). The console, ``%flow``, the Client API and
the notebook reader all ask here, so they always agree on the store they read and write."""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

STORE_DIRNAME = ".flowmagic"


def store_root(notebook_dir: str | os.PathLike | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``$FLOWMAGIC_HOME`` when set, else ``<notebook_dir or cwd>/.flowmagic``; always absolute."""
    home = (os.environ if env is None else env).get("FLOWMAGIC_HOME")
    if home:
        return Path(home).expanduser().absolute()
    return (Path(notebook_dir) if notebook_dir is not None else Path.cwd()).absolute() / STORE_DIRNAME


def store_root_for(notebook: str | os.PathLike | None, env: Mapping[str, str] | None = None) -> Path:
    """The store of the notebook file ``notebook`` (``None``: no notebook, the current directory's)."""
    return store_root(Path(notebook).absolute().parent if notebook is not None else None, env)
