"""The console command ``flowmagic``: a thin layer over the engine.

Subcommands live in a small table (:data:`COMMANDS`); to add one, write a
``configure(parser)`` and a ``run(args) -> int`` and append a
:class:`Subcommand`. A :class:`FlowmagicError` (or an unreadable file) becomes
a one-line message on stderr and exit status 2; ``--json`` reports go to
stdout as exactly one JSON document (DESIGN section 8).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from flowmagic.errors import FlowmagicError, UsageError
from flowmagic.cli.commands import env as _env_command
from flowmagic.cli.commands import export as _export_command
from flowmagic.cli.commands import fsck as _fsck_command

EXIT_OK = 0
EXIT_FAILED = 1   # a run that failed or was interrupted
EXIT_USAGE = 2    # bad usage, or a flow that cannot be built


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def print_json(document: dict) -> None:
    """The one JSON document a ``--json`` command prints."""
    sys.stdout.write(json.dumps(document, indent=2, allow_nan=False) + "\n")


# --- show ----------------------------------------------------------------------

def _configure_show(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("--json", action="store_true", help="print the flow as one JSON document")


def _run_show(args: argparse.Namespace) -> int:
    from flowmagic.notebook import load_flow
    from flowmagic.report.text import render_show

    graph = load_flow(args.notebook)
    if args.json:
        print_json(graph.to_json())
    else:
        sys.stdout.write(render_show(graph))
    return EXIT_OK


COMMANDS: list[Subcommand] = [
    Subcommand("show", "show the flow a notebook defines: steps, options, edges, parameters",
               _configure_show, _run_show),
    Subcommand("export", "write the notebook's flow as a Metaflow FlowSpec script",
               _export_command.configure, _export_command.run),
    Subcommand("env", "list or prune the cached --pypi/--conda step environments",
               _env_command.configure, _env_command.run),
    Subcommand("fsck", "check a store: objects against their hashes, the database, references",
               _fsck_command.configure, _fsck_command.run),
]


# --- the parser and the entry point ----------------------------------------------

class _Parser(argparse.ArgumentParser):
    """Usage errors become UsageError (one line, exit 2) instead of SystemExit."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flowmagic", description="Metaflow's model for Jupyter notebooks.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    from flowmagic.cli.commands.runs import COMMANDS as RUN_COMMANDS  # here: cli_runs imports this module

    for command in [*COMMANDS, *RUN_COMMANDS]:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.configure(sub)
        sub.set_defaults(_run=command.run)
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
