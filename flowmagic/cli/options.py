"""Each sub-command's options, declared once, as data.

The console (``flowmagic CMD NOTEBOOK ...``) and ``%flow CMD ...`` build their
parsers from these declarations: the console adds every option, ``%flow``
leaves out the notebook argument (the kernel's flow replaces the saved file).
``run``/``resume`` take the flow's parameters as options too, so their second
parser is built from the flow itself (:func:`add_run_options`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Option:
    """One ``parser.add_argument(*flags, **settings)``; ``notebook``: the console-only notebook argument."""

    flags: tuple[str, ...]
    settings: dict[str, Any] = field(default_factory=dict)
    notebook: bool = False


def option(*flags: str, **settings: Any) -> Option:
    return Option(flags, settings)


def notebook(help: str = "the .ipynb file", **settings: Any) -> Option:
    return Option(("notebook",), {"help": help, **settings}, notebook=True)


@dataclass(frozen=True)
class Command:
    """A sub-command: its name, its one-line help and its options in order."""

    name: str
    help: str
    options: tuple[Option, ...]


JSON = option("--json", action="store_true", help="print one JSON document")

_RUN_HELP = ("--PARAM VALUE for each parameter, --max-workers N, --executor dask://HOST:PORT, --tag T, --json "
             "(`flowmagic run NB.ipynb --help` lists the parameters)")

COMMANDS: dict[str, Command] = {c.name: c for c in [
    Command("show", "show the flow a notebook defines: steps, options, edges, parameters", (
        notebook(),
        option("--json", action="store_true", help="print the flow as one JSON document"),
    )),
    Command("export", "write the notebook's flow as a Metaflow FlowSpec script", (
        notebook(),
        option("-o", "--output", help="write the script there (default: print it)"),
        option("--name", help="class name of the flow (default: the flow's name)"),
        option("--json", action="store_true", help='print {"flow", "class", "output", "steps"} instead of the script'),
    )),
    Command("env", "list or prune the cached --pypi/--conda step environments", (
        option("action", choices=["list", "prune"],
               help="list: the cached environments; prune: delete them (see --unused-days)"),
        notebook("a .ipynb file whose store to use (default: $FLOWMAGIC_HOME or ./.flowmagic)",
                 nargs="?", default=None),
        option("--unused-days", type=float, default=0.0, metavar="DAYS",
               help="prune: only environments not used for DAYS days (default 0: all)"),
        JSON,
    )),
    Command("run", "run the notebook's flow (`run NB.ipynb --help` lists its parameters)", (
        notebook(),
        option("options", nargs=argparse.REMAINDER, help=_RUN_HELP),
    )),
    Command("resume", "re-run the failed steps of a run (and what follows), cloning the rest", (
        notebook(),
        option("options", nargs=argparse.REMAINDER,
               help="[RUN] [--from STEP] [--max-workers N] [--executor WHERE] [--tag T] [--json]"),
    )),
    Command("status", "list the flow's runs, newest first", (
        notebook(),
        option("--tag", default=None, help="only runs with this tag"),
        JSON,
    )),
    Command("dump", "show the artifacts of a run, step or task", (
        notebook(),
        option("pathspec", metavar="RUN[/STEP[/TASK]]"),
        option("--include", action="append", default=[], metavar="NAME",
               help="only these artifacts (repeatable, or comma-separated)"),
        option("--outputs", action="store_true",
               help="also show each task's rich outputs: their text and the paths of saved images"),
        option("--trust", action="store_true",
               help="preview pickled values even in a store that is not yours (loading a pickle runs code)"),
        option("--all-executions", action="store_true",
               help="a session run: also the superseded executions of its cells (default: the current one of each)"),
        JSON,
    )),
    Command("tag", "add, remove or list the tags of a run", (
        option("action", choices=["add", "remove", "list"]),
        notebook(),
        option("run_id", type=int, metavar="RUN"),
        option("tags", nargs="*", metavar="TAG"),
        JSON,
    )),
    Command("logs", "show the output of a step's tasks, every attempt", (
        notebook(),
        option("pathspec", metavar="RUN/STEP[/TASK]"),
        JSON,
    )),
    Command("fsck", "check a store: objects against their hashes, the database, references", (
        option("path", nargs="?", default=None,
               help="a notebook (its store) or a store directory (default: $FLOWMAGIC_HOME or ./.flowmagic)"),
        option("--repair", action="store_true",
               help="quarantine damaged objects, so the next run that produces them writes them anew"),
        JSON,
    )),
    Command("gc", "remove stored objects no run refers to", (
        notebook("the .ipynb file (its store is collected)"),
        option("--keep", type=int, default=None, metavar="N",
               help="keep only the newest N runs of each flow (default: keep every run)"),
        option("--dry-run", action="store_true", help="only report what would be removed"),
        JSON,
    )),
]}


def add_options(parser: argparse.ArgumentParser, command: str, *, with_notebook: bool = True) -> None:
    """Add ``command``'s declared options to ``parser`` (without the notebook argument for ``%flow``)."""
    for declared in COMMANDS[command].options:
        if with_notebook or not declared.notebook:
            parser.add_argument(*declared.flags, **declared.settings)


def add_run_options(parser: argparse.ArgumentParser, graph: Any, command: str) -> None:
    """The options of ``run``/``resume`` on ``graph``: RUN and --from (resume), --cache and --PARAM (run)."""
    from flowmagic.report.text import format_number

    if command == "resume":
        parser.add_argument("run_id", nargs="?", type=int, metavar="RUN",
                            help="the run to resume (default: the latest finished run)")
        parser.add_argument("--from", dest="from_step", metavar="STEP",
                            help="re-run this step and everything after it, even if it succeeded")
    parser.add_argument("--max-workers", type=int, default=None, metavar="N",
                        help="tasks run at the same time (default: number of cores)")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="tag the run (repeatable)")
    parser.add_argument("--executor", default=None, metavar="WHERE",
                        help="where tasks run: local (default) or dask://HOST:PORT, a Dask scheduler "
                             "(default: $FLOWMAGIC_EXECUTOR); a step's own --executor wins")
    parser.add_argument("--json", action="store_true", help="print one JSON document; logs go to stderr")
    parser.add_argument("--verbose", action="store_true",
                        help="a line for every finished task (by default a foreach shows its progress)")
    if command == "run":
        parser.add_argument("--cache", action="store_true", help="reuse identical earlier tasks of every step "
                                                                  "(as `%%%%step NAME --cache` does for one)")
        group = parser.add_argument_group("parameters of the flow")
        for p in graph.params:
            default = p.default if not isinstance(p.default, float) else format_number(p.default)
            group.add_argument(f"--{p.name}", dest=f"param:{p.name}", metavar=p.type.upper(),
                               help=f"{p.help or p.name} ({p.type}, default: {default!r})")


def given_params(args: argparse.Namespace) -> dict[str, Any]:
    """The ``--PARAM VALUE`` options given on the command line (parameter name -> text)."""
    return {k.split(":", 1)[1]: v for k, v in vars(args).items() if k.startswith("param:") and v is not None}
