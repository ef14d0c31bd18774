"""What a flow looks like without a widget front end.

nbconvert, a terminal IPython and a notebook viewed on GitHub cannot run the
widgets' JavaScript, so every widget's mimebundle also carries a static SVG
(Graphviz's `dot`, through the `graphviz` package) and a text rendering.
Both show the same facts as the live view: steps with their state, foreach
progress and duration, edges labelled with their variables, parameters.
`picture_html` is the same picture for the static twin that follows a widget
in JupyterLab (see `_base.FlowmagicWidget`).
"""
from __future__ import annotations

import base64
import itertools
import shutil
import subprocess
from typing import Any
from collections.abc import Mapping

_MAX_EDGE_VARIABLES = 3
# (border, fill) per state: fixed colours, because the SVG leaves the page's
# theme behind (it carries its own white background).
_COLOURS = {
    "pending": ("#9e9e9e", "#fafafa"),
    "running": ("#1976d2", "#e3f2fd"),
    "retrying": ("#f57c00", "#fff3e0"),
    "failed": ("#d32f2f", "#ffebee"),
    "interrupted": ("#d32f2f", "#ffebee"),
    "caught": ("#e65100", "#fff8e1"),
    "cloned": ("#0097a7", "#e0f7fa"),
    "cached": ("#006064", "#e0f2f1"),
    "stale": ("#9e9e9e", "#eeeeee"),
    "cancelled": ("#757575", "#f5f5f5"),
    "done": ("#388e3c", "#e8f5e9"),
}
_DASHED = {"caught", "cloned", "cached", "stale", "cancelled"}
_svg_counter = itertools.count(1)


def format_duration(seconds: float | None) -> str:
    """Same wording as the live view: ``0.4 s``, ``12 s``, ``2 min 05 s``."""
    if seconds is None or seconds < 0:
        return ""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{round(seconds)} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {round(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def edge_label(variables: list[str]) -> str:
    shown = ", ".join(variables[:_MAX_EDGE_VARIABLES])
    rest = len(variables) - _MAX_EDGE_VARIABLES
    return f"{shown} +{rest}" if rest > 0 else shown


def status_text(step: Mapping[str, Any], record: Mapping[str, Any] | None) -> str:
    """``running #2 · 3/10 (1 failed) · 4.2 s`` for one step."""
    record = record or {}
    state = record.get("state", "pending")
    attempt = record.get("attempt") or 0
    words = [f"{state} #{attempt}" if state == "retrying" or (state == "running" and attempt > 1) else state]
    total = record.get("total") or 0
    is_foreach = bool((step.get("options") or {}).get("foreach"))
    if (is_foreach or total > 1) and total:
        failed = record.get("failed") or 0
        words.append(f"{record.get('done') or 0}/{total}" + (f" ({failed} failed)" if failed else ""))
    duration = format_duration(record.get("duration"))
    if duration:
        words.append(duration)
    return " · ".join(words)


def _param_label(param: Mapping[str, Any]) -> str:
    return f"{param['name']} = {param.get('default')!r}"[:40]


def rankdir(graph: Mapping[str, Any]) -> str:
    """``TB``, or ``LR`` for a fan-out much wider than the flow is deep (as the live view)."""
    names = [s["name"] for s in graph.get("steps", [])]
    parents: dict[str, list[str]] = {n: [] for n in names}
    for edge in graph.get("edges", []):
        if edge["to"] in parents and edge["from"] in parents:
            parents[edge["to"]].append(edge["from"])
    rank: dict[str, int] = {}

    def rank_of(name: str, seen: frozenset = frozenset()) -> int:
        if name not in rank:
            if name in seen:
                return 0
            rank[name] = max((rank_of(p, seen | {name}) for p in parents[name]), default=-1) + 1
        return rank[name]

    widths: dict[int, int] = {}
    for name in names:
        widths[rank_of(name)] = widths.get(rank_of(name), 0) + 1
    widest = max(widths.values(), default=0)
    return "LR" if widest > 6 and widest > len(widths) else "TB"


def graph_to_dot(graph: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
                 *, prefix: str = "fm") -> str:
    """The DOT source of the static picture (ids prefixed, so several SVGs fit one page)."""
    import graphviz

    states = states or {}
    dot = graphviz.Digraph(graph.get("flow") or "flow")
    dot.attr("graph", rankdir=rankdir(graph), nodesep="0.3", ranksep="0.42", bgcolor="white",
             pad="0.15", id=f"{prefix}_graph")
    dot.attr("node", shape="box", style="rounded,filled", fontname="Helvetica", fontsize="11",
             margin="0.15,0.06")
    dot.attr("edge", fontname="Helvetica", fontsize="9", arrowsize="0.7", color="#616161",
             fontcolor="#424242")
    step_names = {s["name"] for s in graph.get("steps", [])}
    for i, step in enumerate(graph.get("steps", [])):
        record = states.get(step["name"]) or {}
        state = record.get("state", "pending")
        border, fill = _COLOURS.get(state, _COLOURS["pending"])
        style = "rounded,filled,dashed" if state in _DASHED else "rounded,filled"
        label = (f"<<b>{_html(step['name'])}</b><br/>"
                 f"<font point-size=\"9\" color=\"{border}\">{_html(status_text(step, record))}</font>>")
        dot.node(f"s_{step['name']}", label=label, color=border, fillcolor=fill, style=style,
                 penwidth="1.5", id=f"{prefix}_n{i}", tooltip=step["name"])
    for i, param in enumerate(graph.get("parameters", [])):
        dot.node(f"p_{param['name']}", label=_param_label(param), shape="box",
                 style="rounded,dashed", fontname="Courier", fontsize="9", color="#757575",
                 id=f"{prefix}_p{i}")
        for j, step in enumerate(graph.get("steps", [])):
            if param["name"] in step.get("reads", []):
                dot.edge(f"p_{param['name']}", f"s_{step['name']}", style="dashed",
                         id=f"{prefix}_pe{i}_{j}")
    for i, edge in enumerate(graph.get("edges", [])):
        if edge["from"] in step_names and edge["to"] in step_names:
            label = edge_label(list(edge.get("variables", [])))
            dot.edge(f"s_{edge['from']}", f"s_{edge['to']}", label=f" {label} " if label else "",
                     id=f"{prefix}_e{i}")
    return dot.source


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def dot_available() -> bool:
    return shutil.which("dot") is not None


def graph_svg(graph: Mapping[str, Any], states: Mapping[str, Mapping] | None = None) -> str | None:
    """The static SVG, or None when Graphviz's `dot` is not installed or fails."""
    if not dot_available():
        return None
    import graphviz

    prefix = f"fm_static{next(_svg_counter)}"
    source = graph_to_dot(graph, states, prefix=prefix)
    try:
        svg = graphviz.Source(source).pipe(format="svg", encoding="utf-8")
    except (graphviz.ExecutableNotFound, graphviz.CalledProcessError, subprocess.SubprocessError, OSError):
        return None
    # Drop the XML prologue: the SVG is embedded in HTML pages.
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def graph_text(graph: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
               run: Mapping[str, Any] | None = None) -> str:
    """A plain-text table of the flow: one line per step, edges as `-> next [vars]`."""
    states = states or {}
    steps = list(graph.get("steps", []))
    head = [graph.get("flow") or "flow", f"{len(steps)} step{'s' if len(steps) != 1 else ''}"]
    if run and run.get("run_id") is not None:
        head.append(f"run {run['run_id']}")
    if run and run.get("status"):
        head.append(str(run["status"]))
    lines = [" · ".join(head)]
    if not steps:
        lines.append("  (no steps yet: start a cell with %%step NAME)")
    outgoing: dict[str, list[str]] = {}
    for edge in graph.get("edges", []):
        variables = edge.get("variables", [])
        outgoing.setdefault(edge["from"], []).append(
            f"{edge['to']} [{edge_label(list(variables))}]" if variables else edge["to"])
    width = max([len(s["name"]) for s in steps] + [4])
    status = {s["name"]: status_text(s, states.get(s["name"])) for s in steps}
    status_width = max([len(v) for v in status.values()] + [5])
    for step in steps:
        nxt = outgoing.get(step["name"])
        arrow = f"  -> {', '.join(nxt)}" if nxt else ""
        lines.append(f"  {step['name']:<{width}}  {status[step['name']]:<{status_width}}{arrow}".rstrip())
    params = graph.get("parameters", [])
    if params:
        lines.append("parameters: " + ", ".join(_param_label(p) for p in params))
    return "\n".join(lines)


def text_html(text: str) -> str:
    """Text as an HTML block (the twin's body where there is no picture)."""
    return f'<pre class="fm-twin-text" style="margin:0">{_html(text)}</pre>'


def picture_html(graph: Mapping[str, Any], states: Mapping[str, Mapping] | None = None,
                 run: Mapping[str, Any] | None = None) -> str:
    """The DAG as HTML for the static twin: a one-line caption and the SVG as
    an <img> (a data URI: an untrusted notebook's sanitiser keeps it, where it
    would strip an inline <svg> to its bare text), or the text table without `dot`."""
    head = [graph.get("flow") or "flow"]
    if run and run.get("run_id") is not None:
        head.append(f"run {run['run_id']}")
    if run and run.get("status"):
        head.append(str(run["status"]))
    steps = [s["name"] for s in graph.get("steps", [])]
    done = sum(1 for name in steps if ((states or {}).get(name) or {}).get("state") in ("done", "cloned", "cached"))
    head.append(f"{done}/{len(steps)} steps done")
    svg = graph_svg(graph, states)
    if svg is None:
        return text_html(graph_text(graph, states, run))
    caption = f'<div class="fm-twin-caption" style="font-weight:600">{_html(" · ".join(head))}</div>'
    data = base64.b64encode(svg.encode()).decode()
    alt = _html(graph_text(graph, states, run)).replace('"', "&quot;")
    return (f'{caption}<div class="fm-twin-picture">'
            f'<img src="data:image/svg+xml;base64,{data}" alt="{alt}"></div>')
