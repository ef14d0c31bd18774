"""``%flow``: the console command's sub-commands, on the kernel's flow.

The options are ``flowmagic``'s (cli/options.py) minus the notebook argument: the
kernel's flow definition replaces the saved file. Bad options print a usage
line (IPython's UsageError), ``--help`` prints the help, and nothing here
ever shows a traceback of its own.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from flowmagic.magics import runs as _magic_runs
from flowmagic.magics import views
from flowmagic.magics.output import Interrupted, LivePrinter, usage_error
from flowmagic.errors import RunError

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics

SUBCOMMANDS = ("show", "run", "resume", "load", "status", "dump", "tag", "logs", "new", "name",
               "export", "forget", "reset")


class _HelpShown(Exception):
    """argparse printed --help; the magic returns quietly."""


class MagicArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad option as a UsageError instead of exiting."""

    def error(self, message: str):  # type: ignore[override]
        raise usage_error(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        if message:
            print(message)
        raise _HelpShown()


def _parser(command: str, description: str) -> MagicArgumentParser:
    return MagicArgumentParser(prog=f"%flow {command}", description=description, allow_abbrev=False)


def flow_command(magics: FlowMagics, line: str) -> Any:
    try:
        words = shlex.split(line)
    except ValueError as exc:
        raise usage_error(f"%flow: cannot read the options: {exc}") from None
    if not words or words[0] in ("-h", "--help", "help"):
        print(_overview())
        return None
    command, rest = words[0], words[1:]
    handler = _HANDLERS.get(command)
    if handler is None and command not in _magic_runs.READERS:
        raise usage_error(f"%flow: unknown sub-command {command!r}; one of: {', '.join(SUBCOMMANDS)}\n"
                          "usage: %flow SUBCOMMAND [options]  (%flow --help for the list)")
    try:
        if command in _magic_runs.READERS:
            args = _magic_runs.command_parser(command, _parser).parse_args(rest)
            return _magic_runs.READERS[command](magics, args)
        return handler(magics, rest)
    except (_HelpShown, SystemExit):   # --help was printed
        return None


def _overview() -> str:
    return ("usage: %flow SUBCOMMAND [options]\n\n"
            "  show                          the flow's steps, parameters and edges\n"
            "  run [--PARAM V] [--tag T]     a fresh run of the whole flow, in parallel\n"
            "  resume [RUN] [--from STEP]    re-run what failed, clone what succeeded\n"
            "  load [RUN]                    bind a past run's artifacts here and continue from it\n"
            "  status                        the flow's runs, newest first\n"
            "  dump RUN[/STEP[/TASK]]        artifacts with type, size and a preview\n"
            "  tag add|remove|list RUN [TAG...]\n"
            "  logs RUN/STEP[/TASK]          stdout/stderr of each attempt\n"
            "  new                           start a new session run at the next step cell\n"
            "  name NAME                     name the flow (default: the notebook's name)\n"
            "  export [-o FILE] [--name C]   the flow as a Metaflow FlowSpec script\n"
            "  forget STEP                   drop a deleted step cell from the flow\n"
            "  reset                         forget all step and params cells executed so far\n\n"
            "%flow SUBCOMMAND --help for its options")


# -- show ---------------------------------------------------------------------
def _show(magics: FlowMagics, words: list[str]) -> Any:
    args = _magic_runs.command_parser("show", _parser).parse_args(words)
    graph = magics.graph()
    if args.json:
        return views.graph_json(magics, graph)
    views.show_graph(magics, graph)
    return None


# -- run / resume -------------------------------------------------------------
def _console_run_parser(graph: Any, command: str) -> argparse.ArgumentParser:
    """The console's `run`/`resume` parser (the flow's parameters included), named `%flow CMD`."""
    from flowmagic.cli.commands.runs import run_parser

    parser = run_parser(graph, command, "")
    parser.prog = f"%flow {command}"
    return parser


def _run(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.runtime.orchestrator import scheduler
    from flowmagic.cli.options import given_params
    from flowmagic.runtime.orchestrator.parameters import resolve_params

    graph = magics.graph()
    args = _console_run_parser(graph, "run").parse_args(words)
    params = resolve_params(graph, given_params(args))
    result = _drive(magics, graph, "run", lambda on_event: scheduler.run_flow(
        graph, magics.store(), params=params, tags=tuple(args.tag), max_workers=args.max_workers,
        on_event=on_event, cache=args.cache, workdir=str(Path.cwd()), executor=args.executor))
    magics.record_notebook(result.flow, result.run_id)
    magics.shell.user_ns.update(params)
    return _finish(magics, result, args.json)


def _resume(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.runtime.orchestrator import scheduler

    graph = magics.graph()
    args = _console_run_parser(graph, "resume").parse_args(words)
    result = _drive(magics, graph, "resume", lambda on_event: scheduler.resume_flow(
        graph, magics.store(), origin_run_id=args.run_id, from_step=args.from_step, tags=tuple(args.tag),
        max_workers=args.max_workers, on_event=on_event, workdir=str(Path.cwd()),
        executor=args.executor))
    magics.record_notebook(result.flow, result.run_id)
    return _finish(magics, result, args.json)


def _drive(magics: FlowMagics, graph: Any, what: str, start: Callable[[Any], Any]) -> Any:
    """Run the whole flow with a live view and streamed, labelled output."""
    view = views.run_view(magics, graph)
    printer = LivePrinter(label_tasks=True, on_state=view)
    try:
        return start(printer)
    except KeyboardInterrupt:
        printer.close()
        raise Interrupted(f"%flow {what} was stopped; every task is ended and the run is "
                          "marked interrupted") from None
    finally:
        printer.close()
        views.finish_run_view(view)


def _summary(result: Any) -> str:
    from flowmagic.report.text import render_run_summary

    # its resume hint is the console's; the error below gives the notebook's
    lines = render_run_summary(result).rstrip("\n").splitlines()
    return "\n".join(ln for ln in lines if "flowmagic resume" not in ln)


def _finish(magics: FlowMagics, result: Any, as_json: bool) -> Any:
    print(_summary(result))
    if as_json:
        return result.to_json()
    if result.status != "succeeded":
        raise RunError(f"run {result.flow}/{result.run_id} {result.status}"
                       + "".join(f"\n  step '{step}': {line}" for step, line in result.failed)
                       + f"\nfix the cells, execute them, then %flow resume {result.run_id}")
    return magics.client_run(result.flow, result.run_id)


# -- load ---------------------------------------------------------------------
def _load(magics: FlowMagics, words: list[str]) -> Any:
    parser = _parser("load", "Bind a past run's artifacts into the notebook (frames and arrays "
                             "memory-mapped): each name from its latest writer, and the parameters.")
    parser.add_argument("run_id", nargs="?", type=int, metavar="RUN", help="default: the latest run")
    args = parser.parse_args(words)
    flow, store = magics.flow_name(), magics.store()
    record = _run_to_load(magics, store, flow, args.run_id)
    run = magics.client_run(flow, record.run_id)
    data = run.data
    if data is None:
        raise RunError(f"run {flow}/{record.run_id} ({record.status}) has no artifacts to load")
    values, unreadable = {}, []
    for name in data:
        try:
            values[name] = data[name]
        except Exception as exc:  # noqa: BLE001 - one bad artifact must not hide the others
            unreadable.append(f"{name} ({type(exc).__name__}: {exc})")
    magics.shell.user_ns.update(values)
    # the next step cell starts a session run in which this run's finished steps count as run
    magics.session, magics.loaded_run = None, (flow, record.run_id)
    magics.markers.refresh(None)   # stale meant: in the session run now left
    names = ", ".join(sorted(values)) or "nothing"
    print(f"[flowmagic] bound {len(values)} names from run {flow}/{record.run_id} ({record.status}): {names}; "
          "the next step cell continues from its steps")
    if unreadable:
        print(f"[flowmagic] warning: not bound: {'; '.join(unreadable)}", file=sys.stderr)
    return None


def _run_to_load(magics: FlowMagics, store: Any, flow: str, run_id: int | None) -> Any:
    """The named run, else the newest one that is not this kernel's session run nor still running."""
    if run_id is not None:
        return store.meta.get_run(flow, run_id)   # NotFoundError lists the runs
    own = magics.session.run_id if magics.session is not None else None
    for record in store.meta.list_runs(flow):
        if record.run_id != own and record.status != "running":
            return record
    raise RunError(f"flow '{flow}' has no past run to load; run the flow (%flow run) or execute its step cells")


# -- the kernel's flow --------------------------------------------------------
def _new(magics: FlowMagics, words: list[str]) -> Any:
    _parser("new", "Start a new session run: the next %%step cell executed creates it.").parse_args(words)
    magics.session = None
    magics.markers.refresh(None)
    print("[flowmagic] the next step cell you execute starts a new session run")
    return None


def _name(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.flow.cells import is_identifier

    parser = _parser("name", "Name the flow (default: the notebook's name in CamelCase).")
    parser.add_argument("name", nargs="?", default=None)
    args = parser.parse_args(words)
    if args.name is None:
        print(magics.flow_name())
        return None
    if not is_identifier(args.name):
        raise usage_error(f"%flow name: {args.name!r} is not a valid flow name; use a Python "
                          "identifier such as MovieFlow")
    magics.definition.name_override = args.name
    return None


def _reset(magics: FlowMagics, words: list[str]) -> Any:
    _parser("reset", "Forget every step and params cell executed so far, and the session run "
                     "(as after a kernel restart; imports and defs stay).").parse_args(words)
    magics.definition.forget_flow_cells()
    magics.session = None
    magics.markers.refresh(None)
    print("[flowmagic] the kernel's flow has no steps now; execute step cells to define it again")
    return None


def _forget(magics: FlowMagics, words: list[str]) -> Any:
    parser = _parser("forget", "Drop a step from the kernel's flow (after deleting its cell).")
    parser.add_argument("step")
    args = parser.parse_args(words)
    if not magics.definition.forget_step(args.step):
        raise usage_error(f"%flow forget: the kernel has no step {args.step!r}")
    if magics.session is not None:
        magics.session.forget([args.step])
    magics.markers.refresh(magics.session)   # a forgotten step's marker goes blank
    magics.markers.forget(args.step)
    print(f"[flowmagic] step '{args.step}' is no longer part of the flow")
    return None


_HANDLERS: dict[str, Callable[[Any, list[str]], Any]] = {
    "show": _show, "run": _run, "resume": _resume, "load": _load, "new": _new, "reset": _reset,
    "name": _name, "forget": _forget,
}
