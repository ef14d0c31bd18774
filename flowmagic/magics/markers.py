"""The stale marker atop each step cell's own output area (issue 15).

Every ``%%step`` execution opens its output with one display, given a
``display_id``, whose bundle carries ``application/vnd.flowmagic.stale+json``:
empty while the step is fresh (nothing shows), and a one-line text/HTML
notice once it is stale. When staleness changes (a step above ran again, a
prelude name or parameter it used was edited) the display is updated in place
with ``update_display``, as the live DAG is, so the stale cell itself says so.
The marker is its own display: the cell's prints, rich output and widgets
are untouched.
"""
from __future__ import annotations

import html
import uuid
from typing import Any

MIME = "application/vnd.flowmagic.stale+json"

_STYLE = ("color:#8a6d00;background:#fff8e1;border-left:3px solid #f0ad00;"
          "padding:2px 8px;font-family:var(--jp-ui-font-family, sans-serif);font-size:12px")


def bundle(reason: str | None) -> dict[str, Any]:
    """The marker's mimebundle: only the flowmagic type while fresh."""
    if reason is None:
        return {MIME: {}}
    text = f"stale: re-run this cell ({reason})"
    return {MIME: {"stale": True, "reason": reason}, "text/plain": text,
            "text/html": f'<div class="flowmagic-stale" style="{_STYLE}">&#9888; {html.escape(text)}</div>'}


class StaleMarkers:
    """Each step's latest marker display, and what it shows now."""

    def __init__(self) -> None:
        self._ids: dict[str, str] = {}             # step -> display id of its latest execution's marker
        self._shown: dict[str, str | None] = {}    # step -> the reason shown (None: fresh)

    def open(self, step: str) -> None:
        """Show a fresh marker at the top of the executing step cell's output."""
        from IPython.display import display

        display_id = f"flowmagic-stale-{uuid.uuid4().hex}"
        display(bundle(None), raw=True, display_id=display_id)
        self._ids[step], self._shown[step] = display_id, None

    def refresh(self, session: Any) -> None:
        """Bring every marker in line with the session's stale steps."""
        from IPython.display import update_display

        for step, display_id in list(self._ids.items()):
            reason = session.stale_because(step) if session is not None else None
            if reason != self._shown.get(step):
                update_display(bundle(reason), raw=True, display_id=display_id)
                self._shown[step] = reason

    def rename(self, old: str, new: str) -> None:
        if old in self._ids:
            self._ids[new], self._shown[new] = self._ids.pop(old), self._shown.pop(old, None)

    def forget(self, step: str) -> None:
        self._ids.pop(step, None)
        self._shown.pop(step, None)

