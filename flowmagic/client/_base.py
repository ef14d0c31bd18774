"""Shared by the client's handles: where the store is, pathspecs, formatting."""
from __future__ import annotations

import datetime as dt
import html
from pathlib import Path
from typing import Any

from flowmagic.errors import NotFoundError, UsageError
from flowmagic.store import Store, open_store
from flowmagic.store.backends import store_url
from flowmagic.store.paths import store_root
from flowmagic.report.text import format_size as _fmt_size  # noqa: F401  (re-exported to the client modules)
from flowmagic.store.metadata import RunRecord

_root_override: Path | None = None
_stores: dict[Path, tuple[int, Store]] = {}  # root -> (database inode, store)
_UNSET: Any = object()


def namespace_root(path: str | Path | None = _UNSET) -> Path:
    """Point the client at the store in ``path`` (``None``: back to the
    default, ``$FLOWMAGIC_HOME`` or ``./.flowmagic``); return the root in use."""
    global _root_override
    if path is not _UNSET:
        _root_override = Path(path).expanduser().absolute() if path is not None else None
    return _root_override or store_root()


def _open_store(root: str | Path | None = None) -> Store:
    """The store at ``root`` (default: :func:`namespace_root`), opened once
    per process, and again if its database file was replaced (a user who
    deleted ``.flowmagic`` and ran again must not read the old, unlinked one)."""
    path = Path(root).expanduser().absolute() if root is not None else namespace_root()
    try:
        inode = (path / "metadata.sqlite").stat().st_ino
    except FileNotFoundError:
        if store_url() is not None:   # a shared store: a new home reads the runs published there
            cached = _stores[path] = (-1, open_store(path))
            return cached[1]
        raise NotFoundError(f"no flowmagic store at {path}: run a flow first, set FLOWMAGIC_HOME, "
                            "or call namespace_root(path) to read another store") from None
    cached = _stores.get(path)
    if cached is None or cached[0] != inode:
        if cached is not None:
            cached[1].close()
        cached = _stores[path] = (inode, open_store(path))
    return cached[1]


def _parts(pathspec: str, n: int, example: str, cls: str) -> list[str]:
    parts = str(pathspec).strip("/").split("/")
    if len(parts) != n or not all(parts):
        raise UsageError(f"{cls}() takes a pathspec like '{example}', got '{pathspec}'")
    return parts


def _int_id(text: str, what: str, pathspec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise NotFoundError(f"'{text}' in '{pathspec}' is not a {what} id (ids are integers)") from None


def _when(ts: float | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(ts).astimezone() if ts is not None else None


def _short_list(items: list[str], limit: int = 20) -> str:
    if not items:
        return "(none)"
    return ", ".join(items[:limit]) + (f" ... ({len(items)} in all)" if len(items) > limit else "")


class _ClientObject:
    """Shared by every handle: pathspec, equality, repr."""

    _store: Store
    pathspec: str

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.pathspec!r})"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and other.pathspec == self.pathspec  # type: ignore[attr-defined]
                and other._store.root == self._store.root)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.pathspec))

    def __reduce__(self) -> tuple:
        # A handle pickles as its pathspec and store root, as Metaflow's do, so a step
        # may keep `run = Flow("X").latest_run` and a later step (or process) reopen it.
        return _reopen, (type(self), self.pathspec, str(self._store.root))


def _reopen(cls: type, pathspec: str, root: str) -> _ClientObject:
    if not pathspec:  # Metaflow(): the whole store
        return cls(root=root)
    return cls(pathspec, root=root)


def _fmt_time(when: dt.datetime | None) -> str:
    return when.strftime("%Y-%m-%d %H:%M:%S") if when is not None else ""


def _fmt_duration(record: RunRecord) -> str:
    if record.finished_at is None:
        return ""
    return f"{record.finished_at - record.started_at:.1f}s"


def _fmt_duration_tasks(tasks: list) -> str:
    spans = [(a.started_at, a.finished_at) for t in tasks for a in t.attempts
             if a.started_at is not None and a.finished_at is not None]
    if not spans:
        return ""
    return f"{max(e for _, e in spans) - min(s for s, _ in spans):.1f}s"


def _html_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    esc = html.escape
    head = "".join(f"<th style='text-align:left'>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td style='text-align:left'>{esc(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    empty = "" if rows else f"<tr><td colspan='{len(header)}'><i>nothing yet</i></td></tr>"
    return (f"<div class='flowmagic-client'><b>{esc(title)}</b>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}{empty}</tbody></table></div>")
