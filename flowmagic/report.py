"""Text renderings shared by the console command and the magics."""
from __future__ import annotations

import json
import shlex

from flowmagic.dag import FlowGraph, StepOptions, StepSpec

_INDENT = "    "


def format_options(options: StepOptions) -> str:
    """The options as they would be written on a ``%%step`` line."""
    words: list[str] = []
    if options.retry:
        words += ["--retry", str(options.retry)]
    if options.timeout is not None:
        words += ["--timeout", _number(options.timeout)]
    for key in ("foreach", "catch", "pypi", "conda"):
        value = getattr(options, key)
        if value is not None:
            words += [f"--{key}", shlex.quote(value)]
    if options.cache:
        words.append("--cache")
    return " ".join(words)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _names(names) -> str:
    return ", ".join(names) if names else "-"


def render_show(graph: FlowGraph) -> str:
    """A readable listing of the flow, in the spirit of Metaflow's ``show``."""
    lines = [f"Flow {graph.name}", ""]
    if graph.params:
        lines.append("Parameters")
        width = max(len(p.name) for p in graph.params)
        for param in graph.params:
            default = json.dumps(param.default)
            text = f"{_INDENT}--{param.name:<{width}}  {param.type:<5}  default {default}"
            lines.append(f"{text}  {param.help}".rstrip() if param.help else text)
        lines.append("")
    if not graph.steps:
        lines.append("No steps: start a cell with `%%step NAME` to make it a step.")
    for spec in graph.steps:
        lines += _render_step(graph, spec)
    return "\n".join(lines).rstrip() + "\n"


def _render_step(graph: FlowGraph, spec: StepSpec) -> list[str]:
    header = f"Step {spec.name}  (cell {spec.cell})"
    options = format_options(spec.options)
    if options:
        header += f"  {options}"
    lines = [header]
    if spec.doc:
        lines.append(_INDENT + spec.doc)
    lines.append(f"{_INDENT}reads   {_names(spec.reads)}")
    lines.append(f"{_INDENT}writes  {_names(spec.writes)}")
    nested = graph.nested_in(spec.name)
    if nested:
        lines.append(f"{_INDENT}nested in the foreach of {nested}")
    joined = graph.foreach_producer(spec.name)
    if joined:
        lines.append(f"{_INDENT}joins the foreach of {joined}")
    edges = [e for e in graph.edges if e.source == spec.name]
    if not edges:
        lines.append(f"{_INDENT}=> (end)")
    for edge in edges:
        lines.append(f"{_INDENT}=> {edge.target}  [{', '.join(edge.variables)}]")
    lines.append("")
    return lines
