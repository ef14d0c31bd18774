"""Text renderings shared by the console command and the magics."""
from __future__ import annotations

import json
import shlex
import time
from typing import Any

from flowmagic.errors import cell_number
from flowmagic.states import TASK_FINISHED_OK, TASK_REUSED
from flowmagic.flow.cells import StepOptions
from flowmagic.flow.graph import FlowGraph, StepSpec

_INDENT = "    "


def format_options(options: StepOptions) -> str:
    """The options as they would be written on a ``%%step`` line."""
    words: list[str] = []
    if options.retry:
        words += ["--retry", str(options.retry)]
    if options.timeout is not None:
        words += ["--timeout", format_number(options.timeout)]
    for key in ("foreach", "catch", "pypi", "conda"):
        value = getattr(options, key)
        if value is not None:
            words += [f"--{key}", shlex.quote(value)]
    if options.cache:
        words.append("--cache")
    for step in options.after:
        words += ["--after", step]
    return " ".join(words)


def format_number(value: float) -> str:
    """``3.0`` -> ``"3"``, ``2.5`` -> ``"2.5"``: numbers as a user typed them."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _names(names) -> str:
    return ", ".join(names) if names else "-"


def render_show(graph: FlowGraph) -> str:
    """A readable listing of the flow, in the spirit of Metaflow's ``show``."""
    roots = graph.roots()
    summary = f"{len(graph.steps)} step{'s' if len(graph.steps) != 1 else ''}"
    if roots:
        summary += f", starts at {', '.join(roots)}"
    lines = [f"Flow {graph.name}  ({summary})", ""]
    if graph.params:
        lines.append("Parameters")
        rows = [(f"--{p.name}", p.type, f"default {json.dumps(p.default)}", p.help) for p in graph.params]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        for row in rows:
            text = "  ".join(cell.ljust(width) for cell, width in zip(row, widths))
            lines.append((_INDENT + text + "  " + row[3]).rstrip())
        lines.append("")
    if not graph.steps:
        lines.append("No steps: start a cell with `%%step NAME` to make it a step.")
    for spec in graph.steps:
        lines += _render_step(graph, spec)
    lines += [f"warning: {warning}" for warning in graph.warnings]
    return "\n".join(lines).rstrip() + "\n"


def _render_step(graph: FlowGraph, spec: StepSpec) -> list[str]:
    header = f"Step {spec.name}  (cell {cell_number(spec.cell)})"
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
        if edge.maybe:
            names = ", ".join(edge.maybe)
            lines.append(f"{_INDENT}   ({edge.target} binds {names} only in some branches: where it does not, "
                         f"it reads {spec.name}'s, so it runs after {spec.name})")
    lines.append("")
    return lines


# --- runs: live progress, summary, status, dump, logs (runtime owner) ---------------

def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _when(timestamp: float | None) -> str:
    import datetime

    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


# seconds between two progress lines of a step (``fit 41,250/100,000``) when
# the output is not a terminal (a terminal gets one line, redrawn in place)
PROGRESS_EVERY = 5.0
_REDRAW_EVERY = 0.1   # a terminal redraws at most this often: 100,000 redraws would cost more than the tasks


class RunPrinter:
    """Prints a run's events as text: task output prefixed ``[step/index]``,
    step starts and ends, failures and retries, and a step's progress
    (``fit 41,250/100,000``) rather than a line per task (``verbose`` adds
    those). Used by the console command (events arrive on one thread, so no lock)."""

    def __init__(self, out, *, flow: str = "", verbose: bool = False, tty: bool | None = None,
                 progress_every: float = PROGRESS_EVERY) -> None:
        self.out = out
        self.flow = flow
        self.verbose = verbose                    # one line per finished task too
        self.tty = _isatty(out) if tty is None else tty
        self.progress_every = progress_every      # seconds between progress lines when not a tty
        self._shown_at: dict[str, float] = {}     # step -> when its progress was last written
        self._in_place = False                    # a progress line without its newline is on the tty
        self.run_id: int | None = None
        self._partial: dict[tuple, str] = {}
        self._started: dict[str, float] = {}
        self._counts: dict[str, list[int]] = {}   # step -> [finished, total]
        self._reused: set[str] = set()            # steps whose tasks were cloned or cached

    def __call__(self, event) -> None:
        kind = event.kind
        if kind == "run":
            self._run(event)
        elif kind == "output":
            self._output(event)
        elif kind == "display":
            data = (event.data or {}).get("data", {})
            text = data.get("text/plain") if isinstance(data, dict) else None
            if text:  # what a terminal can show of a rich output
                for line in str(text).splitlines() or [""]:
                    self._line(event, line)
            else:
                kinds = ", ".join(sorted(data)) if isinstance(data, dict) else "output"
                self._line(event, f"<{kinds}>")
        elif kind == "warning":
            self._line(event, f"warning: {event.text}")
        elif kind == "task":
            self._task(event)
        self.out.flush()

    def _run(self, event) -> None:
        self.run_id = event.run_id
        flow = (event.data or {}).get("flow", self.flow)
        if event.state == "running":
            self._write(f"Run {flow}/{event.run_id} started\n")

    def _task(self, event) -> None:
        counts = self._counts.setdefault(event.step, [0, 0])
        state = event.state
        if state == "pending" or state in TASK_REUSED:
            counts[1] += 1
        if state in TASK_REUSED:
            counts[0] += 1
            if event.step not in self._reused:  # one line per step, not per task
                self._reused.add(event.step)
                how = "cloned from the origin run" if state == "cloned" else "cached (identical earlier task)"
                self._write(f"Step {event.step} {how}\n")
        elif state == "running" and event.step not in self._started:
            self._started[event.step] = event.time
            total = counts[1]
            self._write(f"Step {event.step} started" + (f" ({total} tasks)" if total != 1 else "") + "\n")
        elif state == "retrying":
            self._line(event, f"attempt {event.attempt + 1} failed: {exception_line(event.data)}; retrying")
        elif state == "failed":
            self._line(event, f"failed: {exception_line(event.data)}")
        elif state == "caught":
            self._line(event, caught_line(event.data))
        elif state == "interrupted":
            self._line(event, "interrupted")
        elif state == "cancelled":
            self._line(event, f"cancelled: {(event.data or {}).get('reason') or 'the run stopped'}")
        if state in TASK_FINISHED_OK - TASK_REUSED:   # reused tasks were counted above
            counts[0] += 1
            if self.verbose:
                self._line(event, state)
            self._progress(event.step)
            self._step_done_maybe(event.step)

    def _step_done_maybe(self, step: str) -> None:
        done, total = self._counts[step]
        if done != total:
            return
        started = self._started.get(step)
        took = f" in {_seconds(time.time() - started)}" if started else ""
        self._write(f"Step {step} done{took}\n")

    def _progress(self, step: str) -> None:
        """``step done/total``: in place on a terminal, else every few seconds (never per task)."""
        done, total = self._counts[step]
        if total < 2 or done == total:   # one task, or the step's done line says it
            return
        now = time.monotonic()
        every = _REDRAW_EVERY if self.tty else self.progress_every
        if now - self._shown_at.setdefault(step, now) < every:
            return
        self._shown_at[step] = now
        text = f"{step} {done:,}/{total:,}"
        if self.tty:
            self.out.write(f"\r\x1b[K{text}")
            self._in_place = True
        else:
            self.out.write(text + "\n")

    def _write(self, text: str) -> None:
        """Write whole lines, first erasing a progress line drawn in place."""
        if self._in_place:
            self.out.write("\r\x1b[K")
            self._in_place = False
        self.out.write(text)

    def _output(self, event) -> None:
        key = (event.task_id, event.stream)
        text = self._partial.pop(key, "") + (event.text or "")
        *lines, rest = text.split("\n")
        if len(rest) > MAX_PARTIAL_LINE:  # a step printing without newlines: show it in pieces, not hold it
            lines.append(rest)
        elif rest:
            self._partial[key] = rest
        for line in lines:
            self._write(f"[{event.label}] {line}\n")

    def _line(self, event, text: str) -> None:
        for key in [k for k in self._partial if k[0] == event.task_id]:
            self._write(f"[{event.label}] {self._partial.pop(key)}\n")
        self._write(f"[{event.label}] {text}\n")


def _isatty(out) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):   # no isatty, or a closed file
        return False


MAX_PARTIAL_LINE = 1 << 16   # characters of an unfinished output line held back for its end


def exception_line(data: dict | None) -> str:
    """``Type: last line of the message`` of an event's exception record."""
    exc = (data or {}).get("exception") or {}
    message = (exc.get("message") or "").strip().splitlines()
    return f"{exc.get('type', 'error')}: {message[-1] if message else ''}".rstrip(": ")


def caught_line(data: dict | None) -> str:
    """``caught ValueError: bad degree -> fit_error``: a task --catch saved, and where its exception went."""
    catch = (data or {}).get("catch")
    return f"caught {exception_line(data)}" + (f" -> {catch}" if catch else "")


def render_run_summary(result, notebook: str | None = None) -> str:
    """The lines printed when a run ends: status, id, time, failures, how to resume."""
    lines = [f"Run {result.flow}/{result.run_id} {result.status} in {_seconds(result.duration)} "
             f"({result.tasks} tasks run, {result.cloned} cloned"
             + (f", {result.cached} cached" if getattr(result, "cached", 0) else "")
             + (f", {result.caught} caught" if getattr(result, "caught", 0) else "")
             + (f", resumed from run {result.origin_run_id}" if result.origin_run_id else "") + ")"]
    for step, line in result.failed:
        lines.append(f"  step {step} failed: {line}")
    if result.status in ("failed", "interrupted"):
        target = shlex.quote(notebook) if notebook else "NOTEBOOK.ipynb"
        lines.append(f"Fix the failing cells, then resume: flowmagic resume {target} {result.run_id}")
    return "\n".join(lines) + "\n"


def render_status(document: dict) -> str:
    """The text of a status document (:func:`flowmagic.services.status_document`)."""
    flow, runs = document["flow"], document["runs"]
    if not runs:
        return f"Flow {flow}: no runs yet\n"
    rows = [("RUN", "STATUS", "STARTED", "TIME", "TAGS")]
    for r in runs:
        took = (r["finished_at"] - r["started_at"]) if r["finished_at"] else None
        kind = " (session)" if r["interactive"] else ""
        origin = f" (resume of {r['origin_run_id']})" if r["origin_run_id"] else ""
        rows.append((str(r["run_id"]), r["status"] + kind + origin, _when(r["started_at"]), _seconds(took),
                     ", ".join(r["tags"]) or "-"))
    return f"Flow {flow}\n" + _table(rows)


def printable(text: str) -> str:
    """``text`` with control characters (terminal escape codes from a tag) shown as ``\\x1b``, not obeyed."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _table(rows) -> str:
    rows = [tuple(printable(cell) for cell in row) for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n" for row in rows)


def preview(value, width: int = 60) -> str:
    """A one-line look at a value: shape and dtype for arrays, size for frames."""
    shape = getattr(value, "shape", None)
    if isinstance(value, type) or callable(shape) or type(value).__name__ == "module":
        shape = None   # a class, or a module like numpy: its `shape` is a function
    if shape is not None and hasattr(value, "dtype"):
        return f"array {tuple(shape)} {value.dtype}"
    if shape is not None and hasattr(value, "columns"):
        columns = ", ".join(str(c) for c in list(value.columns)[:6])
        return f"{shape[0]} rows x {shape[1]} columns ({columns}{', ...' if shape[1] > 6 else ''})"
    text = " ".join(repr(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."


def format_size(size: int | None) -> str:
    """Bytes for people: ``512 B``, ``1.5 KB``, ``2.0 GB`` (powers of 1024)."""
    if size is None:
        return ""
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def render_dump(document: dict) -> str:
    """The text of a dump document (:func:`flowmagic.services.dump_document`), outputs aside."""
    return _render_artifacts(document["flow"], document["run_id"], document["artifacts"]) \
        + render_environments(document.get("environments") or {})


def _render_artifacts(flow: str, run_id: int, rows: list[dict]) -> str:
    """rows: {"step", "task", "name", "type", "size", "preview"}."""
    lines = [f"Run {flow}/{run_id}"]
    table = [("STEP/TASK", "NAME", "TYPE", "SIZE", "VALUE")]
    table += [(f"{r['step']}/{r['task']}", r["name"], r["type"], format_size(r["size"]), r.get("preview", ""))
              for r in rows]
    return "\n".join(lines) + "\n" + (_table(table) if rows else "no artifacts\n")


def render_logs(document: dict) -> str:
    """The text of a logs document (:func:`flowmagic.services.logs_document`)."""
    return _render_attempts(document["flow"], document["run_id"], document["tasks"])


def _render_attempts(flow: str, run_id: int, tasks: list[dict]) -> str:
    """tasks: {"step", "task", "index", "attempts": [{"attempt", "outcome", "stdout", "stderr", "exception"}]}."""
    out = []
    for task in tasks:
        for a in task["attempts"]:
            so_far = "" if a.get("complete", True) else "; its output so far"
            out.append(f"== {flow}/{run_id}/{task['step']}/{task['task']} attempt {a['attempt']} "
                       f"({a['outcome']}{so_far})")
            if a["stdout"]:
                out.append(a["stdout"].rstrip("\n"))
            if a["stderr"]:
                out.append("-- stderr")
                out.append(a["stderr"].rstrip("\n"))
            if a.get("exception") and a["exception"].get("traceback"):
                out.append("-- exception")
                out.append(a["exception"]["traceback"].rstrip("\n"))
    return "\n".join(out) + "\n" if out else "no logs\n"


def render_environments(environments: dict[str, dict]) -> str:
    """Text lines for `dump`: each step's environment and its packages."""
    lines = []
    for step, record in environments.items():
        lines.append(f"environment of step {step}: --{record['kind']} \"{' '.join(record['requested'])}\" "
                     f"(python {record['python']}, {record['key']})")
        lines.append("  " + " ".join(record["packages"]))
    return "".join(line + "\n" for line in lines)


def render_outputs(objects: Any, outputs: list[dict]) -> str:
    """The text of a dump document's ``"outputs"``: each task's rich outputs (text, saved image paths)."""
    from flowmagic.store.outputs import describe_outputs

    if not outputs:
        return "no outputs\n"
    lines = []
    for task in outputs:
        lines.append(f"Outputs of {task['step']}/{task['task']}")
        lines.extend(describe_outputs(objects, task["outputs"]))
    return "\n".join(lines) + "\n"


def render_tags(document: dict) -> str:
    """The text of a tag document: the run's tags after the change."""
    return (" ".join(map(printable, document["tags"])) or "(no tags)") + "\n"
