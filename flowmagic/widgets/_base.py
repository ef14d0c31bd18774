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


class FlowmagicWidget(anywidget.AnyWidget):
    """Base of the DAG view, the inspector and the run view.

    Subclasses set ``_view`` (which front-end view draws them) and implement
    ``fallback_text`` and, where they have a picture, ``fallback_svg``.
    """

    _esm = ESM
    _css = CSS
    _view = traitlets.Unicode("").tag(sync=True)

    def fallback_text(self) -> str:
        raise NotImplementedError

    def fallback_svg(self) -> str | None:
        return None

    def _before_widget_display(self) -> None:
        """Hook: runs before the widget view is sent (e.g. to attach assets)."""

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The widget for front ends that have one; SVG and text for the rest.

        JupyterLab picks the widget view; nbconvert, terminals and GitHub
        pick the SVG or the text (see :func:`widget_frontend_expected`).
        """
        data: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        if widget_frontend_expected():
            self._before_widget_display()
            parent = super()._repr_mimebundle_(**kwargs) or ({}, {})
            data, metadata = parent if isinstance(parent, tuple) else (parent, {})
            data = dict(data)
        data["text/plain"] = self.fallback_text()
        svg = self.fallback_svg()
        if svg:
            data["image/svg+xml"] = svg
        return data, dict(metadata or {})

    def __repr__(self) -> str:
        return self.fallback_text()
