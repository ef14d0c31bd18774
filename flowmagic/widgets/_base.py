"""What every flowmagic widget shares: the one front-end module, and a
mimebundle that still shows something where widgets cannot run."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anywidget
import traitlets

STATIC = Path(__file__).parent / "static"
ESM = STATIC / "flowmagic.js"
CSS = STATIC / "flowmagic.css"
VIZ = STATIC / "viz.js.gz"   # @viz-js/viz (Graphviz compiled to WASM, MIT), gzipped: 0.47 MB


class VizAsset(anywidget.AnyWidget):
    """Graphviz for the front end, sent once per kernel and shared by every view.

    Views point to it with their ``_viz`` trait (a widget reference), so the
    module is neither repeated per widget nor per saved widget state. It
    travels gzipped as a binary buffer; the browser inflates it.
    """

    _esm = "export default {};"
    source = traitlets.Bytes().tag(sync=True)


_viz_asset: VizAsset | None = None


def viz_asset() -> VizAsset:
    """The kernel's one Graphviz asset (made again if it was closed)."""
    global _viz_asset
    if _viz_asset is None or _viz_asset.comm is None:
        _viz_asset = VizAsset(source=VIZ.read_bytes())
    return _viz_asset


def widget_frontend_expected() -> bool:
    """Whether the kernel's client can show widgets (else only SVG and text are sent).

    A notebook executed by nbconvert/nbclient/papermill keeps every output
    and is viewed later where no kernel runs the widget (HTML export,
    GitHub): there the static SVG is the right output, and nbconvert would
    pick the widget over it. Kernels started by a Jupyter server
    (JupyterLab, Notebook 7) have ``JPY_SESSION_NAME``; VS Code and Colab
    are recognised too. ``FLOWMAGIC_WIDGETS=on|off`` overrides the guess.
    """
    setting = os.environ.get("FLOWMAGIC_WIDGETS", "auto").strip().lower()
    if setting in ("1", "on", "true", "yes"):
        return True
    if setting in ("0", "off", "false", "no"):
        return False
    if os.environ.get("JPY_SESSION_NAME") or "google.colab" in sys.modules:
        return True
    shell = _ipython()
    return shell is not None and "__vsc_ipynb_file__" in getattr(shell, "user_ns", {})


def _ipython() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()


def static_twin_expected() -> bool:
    """Whether a widget's output is followed by its static twin (see :class:`FlowmagicWidget`).

    Only where JupyterLab or Notebook 7 draws the outputs (a kernel a Jupyter
    server started has ``JPY_SESSION_NAME``; ``FLOWMAGIC_WIDGETS=on`` counts
    too): their output areas are siblings in one page, which the twin's CSS
    relies on. VS Code and Colab draw each output in its own frame, where the
    twin could not hide itself next to a live view, so they get none.
    """
    if not widget_frontend_expected():
        return False
    if os.environ.get("FLOWMAGIC_WIDGETS", "").strip().lower() in ("1", "on", "true", "yes"):
        return True
    shell = _ipython()
    in_vscode = shell is not None and "__vsc_ipynb_file__" in getattr(shell, "user_ns", {})
    return bool(os.environ.get("JPY_SESSION_NAME")) and not in_vscode


TWIN_CLASS = "fm-twin"
# Why CSS: a widget output whose model is gone (a new kernel, no kernel)
# shows "Error displaying widget: model not found" and never falls back to
# another mime type. So the static picture is a separate output right after
# the widget's; these rules (JupyterLab's output-area classes, `:has()`) hide
# the twin while a live view (`.fm-root`, set by js/src/index.js) is drawn
# before it, and hide the dead widget's error box otherwise. The same rules
# ship in the widgets' own CSS (js/src/style.css), which JupyterLab never
# sanitises: in an untrusted notebook the twin's <style> is stripped.
TWIN_RULES = (
    ".jp-OutputArea-child:has(.fm-root) + .jp-OutputArea-child:has(.fm-twin) { display: none; }\n"
    ".jp-OutputArea-child:not(:has(.fm-root)):has(+ .jp-OutputArea-child .fm-twin) { display: none; }\n"
)
TWIN_STYLE = f"<style>\n{TWIN_RULES}</style>"


def twin_html(kind: str, body: str) -> str:
    """The static twin's HTML: the rules above and ``body`` in a ``.fm-twin`` box."""
    note = ('<div class="fm-twin-note" style="font-size:11px;color:#757575;margin-top:2px">'
            "static copy of the flowmagic view (execute the cell again for the live one)</div>")
    return f'<div class="{TWIN_CLASS}" data-fm-twin="{kind}">{TWIN_STYLE}{body}{note}</div>'


class FlowmagicWidget(anywidget.AnyWidget):
    """Base of the DAG view, the inspector and the run view.

    Subclasses set ``_view`` (which front-end view draws them) and implement
    ``fallback_text``, ``fallback_html`` and, where they have a picture,
    ``fallback_svg``.

    Displayed under JupyterLab, a view is two outputs: the widget, and right
    after it its *static twin*, a ``text/html`` output with its own display
    id that :meth:`refresh_static` rewrites (so the saved notebook holds the
    final state). A live view hides the twin; a dead one (a reopened
    notebook) is hidden and the twin shows in its place (see ``TWIN_RULES``).
    """

    _esm = ESM
    _css = CSS
    _view = traitlets.Unicode("").tag(sync=True)

    def fallback_text(self) -> str:
        raise NotImplementedError

    def fallback_svg(self) -> str | None:
        return None

    def fallback_html(self) -> str:
        """The twin's body (HTML); by default the text rendering."""
        from .static import text_html

        return text_html(self.fallback_text())

    def _before_widget_display(self) -> None:
        """Hook: runs before the widget view is sent (e.g. to attach assets)."""

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The widget for front ends that have one; SVG and text for the rest.

        JupyterLab picks the widget view; nbconvert, terminals and GitHub
        pick the SVG or the text (see :func:`widget_frontend_expected`).
        Where a static twin follows the widget, the SVG is left to the twin.
        """
        data: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        widget = widget_frontend_expected()
        if widget:
            self._before_widget_display()
            parent = super()._repr_mimebundle_(**kwargs) or ({}, {})
            data, metadata = parent if isinstance(parent, tuple) else (parent, {})
            data = dict(data)
        data["text/plain"] = self.fallback_text()
        svg = None if widget and static_twin_expected() else self.fallback_svg()
        if svg:
            data["image/svg+xml"] = svg
        return data, dict(metadata or {})

    def twin_bundle(self) -> dict[str, str]:
        """The static twin's mimebundle (``text/html`` only)."""
        return {"text/html": twin_html(self._view or "view", self.fallback_html())}

    def display(self) -> Any:
        """Display the view (and its twin); display ids are kept for :meth:`refresh_static`."""
        from IPython.display import display

        data, metadata = self._repr_mimebundle_()
        handle = display(data, metadata=metadata, raw=True, display_id=True)
        if handle is None:  # not in IPython: display() printed the text
            return None
        self._display_handles().append(("view", handle))
        if "application/vnd.jupyter.widget-view+json" in data and static_twin_expected():
            twin = display(self.twin_bundle(), raw=True, display_id=True)
            self._display_handles().append(("twin", twin))
        return handle

    def _ipython_display_(self) -> None:
        # `display(view)` and a view as a cell's last value both come here
        self.display()

    def refresh_static(self, *, twin_only: bool = False) -> None:
        """Rewrite what this view left in the notebook (its twin, its text and SVG)
        with the current state: called when a run finishes."""
        for kind, handle in self._display_handles():
            if kind == "twin":
                handle.update(self.twin_bundle(), raw=True)
            elif not twin_only:
                data, metadata = self._repr_mimebundle_()
                handle.update(data, metadata=metadata, raw=True)

    def _display_handles(self) -> list[tuple[str, Any]]:
        handles = self.__dict__.get("_fm_handles")
        if handles is None:
            handles = self.__dict__["_fm_handles"] = []
        return handles

    def __repr__(self) -> str:
        return self.fallback_text()
