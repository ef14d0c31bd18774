"""The console command ``flowmagic``: a thin layer over the services and the engine.

Each sub-command's options are declared in :mod:`flowmagic.cli.options`; its
runner (``run(args) -> int``) is in :data:`RUNNERS`. A :class:`FlowmagicError`
(or an unreadable file) becomes a one-line message on stderr and exit status 2;
``--json`` reports go to stdout as exactly one JSON document.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from flowmagic.cli import options
from flowmagic.cli.base import EXIT_OK, EXIT_USAGE, ConsoleParser, print_json
from flowmagic.cli.commands import env as env_command
from flowmagic.cli.commands import export as export_command
from flowmagic.cli.commands import fsck as fsck_command
from flowmagic.cli.commands import runs as runs_commands
from flowmagic.errors import FlowmagicError, UsageError


def run_show(args: argparse.Namespace) -> int:
    from flowmagic.notebook import load_flow
    from flowmagic.report.text import render_show

    graph = load_flow(args.notebook)
    if args.json:
        print_json(graph.to_json())
    else:
        sys.stdout.write(render_show(graph))
    return EXIT_OK


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "show": run_show, "export": export_command.run, "env": env_command.run, "fsck": fsck_command.run,
    **runs_commands.RUNNERS,
}


def build_parser() -> argparse.ArgumentParser:
    parser = ConsoleParser(prog="flowmagic", description="Metaflow's model for Jupyter notebooks.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ConsoleParser)
    for command in options.COMMANDS.values():
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        options.add_options(sub, command.name)
        sub.set_defaults(_run=RUNNERS[command.name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # name the subcommand whose --help lists what it takes
            command = f" {args.command}" if getattr(args, "command", None) else ""
            raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see `flowmagic{command} --help`)")
        if getattr(args, "_run", None) is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args._run(args)
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else EXIT_OK
    except FlowmagicError as exc:
        return _fail(str(exc))
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))


def _fail(message: str) -> int:
    sys.stderr.write("flowmagic: error: " + " ".join(message.split()) + "\n")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
