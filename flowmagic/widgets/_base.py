"""What every flowmagic widget shares: the one front-end module, and a
mimebundle that still shows something where widgets cannot run."""
from __future__ import annotations

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

    def _repr_mimebundle_(self, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The widget for front ends that have one; SVG and text for the rest.

        JupyterLab picks the widget view; nbconvert, terminals and GitHub
        pick the SVG or the text.
        """
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
