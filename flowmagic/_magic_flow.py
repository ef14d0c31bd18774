"""``%flow``: the console command's sub-commands, on the kernel's flow.

The options mirror ``flowmagic`` (cli.py) minus the notebook argument: the
kernel's flow definition replaces the saved file. Bad options print a usage
line (IPython's UsageError), ``--help`` prints the help, and nothing here
ever shows a traceback of its own.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flowmagic import _magic_views as views
from flowmagic._magic_output import Interrupted, LivePrinter, usage_error
from flowmagic.errors import RunError

if TYPE_CHECKING:
    from flowmagic.magics import FlowMagics

SUBCOMMANDS = ("show", "run", "resume", "status", "dump", "tag", "logs", "new", "name",
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
    if handler is None:
        raise usage_error(f"%flow: unknown sub-command {command!r}; one of: {', '.join(SUBCOMMANDS)}\n"
                          "usage: %flow SUBCOMMAND [options]  (%flow --help for the list)")
    try:
        return handler(magics, rest)
    except _HelpShown:
        return None


def _overview() -> str:
    return ("usage: %flow SUBCOMMAND [options]\n\n"
            "  show                          the flow's steps, parameters and edges\n"
            "  run [--PARAM V] [--tag T]     a fresh run of the whole flow, in parallel\n"
            "  resume [RUN] [--from STEP]    re-run what failed, clone what succeeded\n"
            "  status                        the flow's runs, newest first\n"
            "  dump RUN[/STEP[/TASK]]        artifacts with type, size and a preview\n"
            "  tag add|remove|list RUN [TAG...]\n"
            "  logs RUN/STEP[/TASK]          stdout/stderr of each attempt\n"
            "  new                           start a new session run at the next step cell\n"
            "  name NAME                     name the flow (default: the notebook's name)\n"
            "  export [-o FILE]              write a Metaflow FlowSpec script\n"
            "  forget STEP                   drop a deleted step cell from the flow\n"
            "  reset                         forget all step and params cells executed so far\n\n"
            "%flow SUBCOMMAND --help for its options")


# -- show ---------------------------------------------------------------------
def _show(magics: FlowMagics, words: list[str]) -> Any:
    parser = _parser("show", "The flow the kernel has defined: steps, parameters, edges.")
    parser.add_argument("--json", action="store_true", help="return the `show` JSON document")
    args = parser.parse_args(words)
    graph = magics.graph()
    if args.json:
        return graph.to_json()
    views.show_graph(magics, graph)
    return None


# -- run / resume -------------------------------------------------------------
def _run_parser(graph: Any) -> MagicArgumentParser:
    parser = _parser("run", f"A fresh run of {graph.name}, every independent step in parallel.")
    group = parser.add_argument_group("parameters")
    for param in graph.params:
        group.add_argument(f"--{param.name}", default=None, metavar=param.type.upper(),
                           help=f"{param.help or ''} (default: {param.default!r})".strip())
    _add_run_options(parser)
    parser.add_argument("--cache", action="store_true", help="reuse matching succeeded tasks")
    return parser


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-workers", type=int, default=None, metavar="N",
                        help="tasks running at once (default: the number of cores)")
    parser.add_argument("--tag", action="append", default=[], metavar="T", help="tag the run (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="return {flow, run_id, status, origin_run_id} instead of the run")


def _run(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.runtime import scheduler
    from flowmagic.runtime.parameters import resolve_params

    graph = magics.graph()
    args = _run_parser(graph).parse_args(words)
    params = resolve_params(graph, {p.name: getattr(args, p.name) for p in graph.params
                                    if getattr(args, p.name, None) is not None})
    result = _drive(magics, graph, "run", lambda on_event: scheduler.run_flow(
        graph, magics.store(), params=params, tags=tuple(args.tag), max_workers=args.max_workers,
        on_event=on_event, cache=args.cache, workdir=str(Path.cwd())))
    magics.shell.user_ns.update(params)
    return _finish(magics, result, args.json)


def _resume(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.runtime import scheduler

    parser = _parser("resume", "A new run that clones what succeeded in RUN (default: the latest) "
                               "and re-runs the rest with the current code.")
    parser.add_argument("run", nargs="?", default=None, help="the origin run id (default: the latest)")
    parser.add_argument("--from", dest="from_step", default=None, metavar="STEP",
                        help="re-run from this step, even if it succeeded")
    _add_run_options(parser)
    args = parser.parse_args(words)
    origin = _run_id(args.run) if args.run is not None else None
    graph = magics.graph()
    if args.from_step is not None and args.from_step not in {s.name for s in graph.steps}:
        raise usage_error(f"%flow resume: no step {args.from_step!r}; steps: "
                          f"{', '.join(s.name for s in graph.steps)}")
    result = _drive(magics, graph, "resume", lambda on_event: scheduler.resume_flow(
        graph, magics.store(), origin_run_id=origin, from_step=args.from_step, tags=tuple(args.tag),
        max_workers=args.max_workers, on_event=on_event, workdir=str(Path.cwd())))
    return _finish(magics, result, args.json)


def _run_id(text: str) -> int:
    tail = text.rsplit("/", 1)[-1]
    if not tail.isdigit():
        raise usage_error(f"%flow: {text!r} is not a run id (a number, or FLOW/NUMBER)")
    return int(tail)


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
    from flowmagic import report

    render = getattr(report, "render_run_summary", None)
    if render is not None:
        return render(result).rstrip("\n")
    counts = f"{result.tasks} tasks" + (f", {result.cloned} cloned" if result.cloned else "")
    lines = [f"run {result.flow}/{result.run_id} {result.status} in {result.duration:.1f} s ({counts})"]
    lines += [f"  step '{step}': {line}" for step, line in result.failed]
    return "\n".join(lines)


def _finish(magics: FlowMagics, result: Any, as_json: bool) -> Any:
    print(_summary(result))
    if as_json:
        return result.to_json()
    if result.status != "succeeded":
        raise RunError(f"run {result.flow}/{result.run_id} {result.status}"
                       + "".join(f"\n  step '{step}': {line}" for step, line in result.failed)
                       + f"\nfix the cells, execute them, then %flow resume {result.run_id}")
    return magics.client_run(result.flow, result.run_id)


# -- reading past runs --------------------------------------------------------
def _status(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic import report

    parser = _parser("status", "The flow's runs, newest first.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(words)
    flow = magics.flow_name()
    document = report.status_json(magics.store(), flow)
    if args.json:
        return document
    print(report.status_text(magics.store(), flow))
    return None


def _dump(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic import report

    parser = _parser("dump", "Artifacts of a run, a step or a task, with type, size and a preview.")
    parser.add_argument("path", metavar="RUN[/STEP[/TASK]]")
    parser.add_argument("--include", action="append", default=[], metavar="NAME",
                        help="only these artifacts (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(words)
    flow = magics.flow_name()
    if args.json:
        return report.dump_json(magics.store(), flow, args.path, include=args.include)
    views.show_inspector(magics, flow, args.path)
    print(report.dump_text(magics.store(), flow, args.path, include=args.include))
    return None


def _tag(magics: FlowMagics, words: list[str]) -> Any:
    parser = _parser("tag", "Add, remove or list a run's tags.")
    parser.add_argument("action", choices=("add", "remove", "list"))
    parser.add_argument("run", metavar="RUN")
    parser.add_argument("tags", nargs="*", metavar="TAG")
    args = parser.parse_args(words)
    if args.action != "list" and not args.tags:
        raise usage_error(f"%flow tag {args.action}: give at least one TAG\n{parser.format_usage().strip()}")
    store, flow, run_id = magics.store(), magics.flow_name(), _run_id(args.run)
    if args.action == "add":
        store.meta.add_tags(flow, run_id, args.tags)
    elif args.action == "remove":
        store.meta.remove_tags(flow, run_id, args.tags)
    tags = sorted(store.meta.get_run(flow, run_id).tags)
    print(f"{flow}/{run_id}: {', '.join(tags) if tags else '(no tags)'}")
    return None


def _logs(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic import report

    parser = _parser("logs", "stdout and stderr of each attempt of a step's tasks.")
    parser.add_argument("path", metavar="RUN/STEP[/TASK]")
    parser.add_argument("--stderr", action="store_true", help="only stderr")
    parser.add_argument("--stdout", action="store_true", help="only stdout")
    args = parser.parse_args(words)
    print(report.logs_text(magics.store(), magics.flow_name(), args.path,
                           stdout=not args.stderr or args.stdout, stderr=not args.stdout or args.stderr))
    return None


# -- the kernel's flow --------------------------------------------------------
def _new(magics: FlowMagics, words: list[str]) -> Any:
    _parser("new", "Start a new session run: the next %%step cell executed creates it.").parse_args(words)
    magics.session = None
    print("[flowmagic] the next step cell you execute starts a new session run")
    return None


def _name(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic.cells import is_identifier

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


def _export(magics: FlowMagics, words: list[str]) -> Any:
    from flowmagic import export

    parser = _parser("export", "Write the flow as a Metaflow FlowSpec script.")
    parser.add_argument("-o", "--output", default=None, metavar="FILE",
                        help="where to write it (default: FLOWNAME.py next to the notebook)")
    args = parser.parse_args(words)
    graph = magics.graph()
    return views.export_script(magics, export, graph, args.output)


def _reset(magics: FlowMagics, words: list[str]) -> Any:
    _parser("reset", "Forget every step and params cell executed so far, and the session run "
                     "(as after a kernel restart; imports and defs stay).").parse_args(words)
    magics.definition.forget_flow_cells()
    magics.session = None
    print("[flowmagic] the kernel's flow has no steps now; execute step cells to define it again")
    return None


def _forget(magics: FlowMagics, words: list[str]) -> Any:
    parser = _parser("forget", "Drop a step from the kernel's flow (after deleting its cell).")
    parser.add_argument("step")
    args = parser.parse_args(words)
    if not magics.definition.forget_step(args.step):
        raise usage_error(f"%flow forget: the kernel has no step {args.step!r}")
    if magics.session is not None:
        magics.session.states.pop(args.step, None)
    print(f"[flowmagic] step '{args.step}' is no longer part of the flow")
    return None


_HANDLERS: dict[str, Callable[[Any, list[str]], Any]] = {
    "show": _show, "run": _run, "resume": _resume, "status": _status, "dump": _dump,
    "tag": _tag, "logs": _logs, "new": _new, "reset": _reset, "name": _name, "export": _export, "forget": _forget,
}
