"""Whether it is safe to unpickle what a store holds, for a preview.

A pickle runs code when it is loaded (as Metaflow's artifacts do). A preview
is the one place where flowmagic loads a value that nobody asked to run:
``dump`` shows pickled values only when the store and the object are owned by
the current user (a store you made), or the caller says ``--trust``. Steps,
the Client API and the inspector load what they are asked to (README,
limits).
"""
from __future__ import annotations

import os
from pathlib import Path

try:
    import pwd
except ImportError:  # not POSIX: no owner to compare
    pwd = None  # type: ignore[assignment]


def untrusted_reason(store_root: Path, object_path: Path) -> str | None:
    """Why a pickle at ``object_path`` should not be loaded, or None when it may be."""
    if not hasattr(os, "getuid"):
        return None  # Windows: file owners are not uids; trust as before
    me = os.getuid()
    for what, path in (("the store", store_root), ("its object", object_path)):
        try:
            owner = path.stat().st_uid
        except FileNotFoundError:
            return None  # nothing to load: loading it says what is missing
        except OSError as exc:
            return f"{what} cannot be checked ({exc.strerror})"
        if owner != me:
            return f"{what} belongs to {_user(owner)}, not to you"
    return None


def _user(uid: int) -> str:
    if pwd is not None:
        try:
            return f"user '{pwd.getpwuid(uid).pw_name}'"
        except KeyError:
            pass
    return f"uid {uid}"
