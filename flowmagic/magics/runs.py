"""``%flow status|dump|tag|logs|export``: the console command's reading
sub-commands, on the kernel's flow and store.

The options are the console's own (:mod:`flowmagic.cli.options`), minus the
notebook argument; the documents are :mod:`flowmagic.services`' and the texts
:mod:`flowmagic.report.text`'s. Only where the console reads a saved notebook
do these read the kernel's flow instead.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from flowmagic import services
from flowmagic.cli.options import COMMANDS, add_options
from flowmagic.magics import views

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics


def command_parser(command: str, make: Callable[[str, str], argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The console sub-command's parser, built without its notebook argument."""
    parser = make(command, COMMANDS[command].help)
    add_options(parser, command, with_notebook=False)
    return parser


def _shown(args: argparse.Namespace, document: dict, render: Callable[[dict], str]) -> Any:
    """``--json``: the document is the magic's value; else its text is printed."""
    if args.json:
        return document
    print(render(document), end="")
    return None


def status(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.report.text import render_status

    return _shown(args, services.status_document(magics.store(), magics.flow_name(), args.tag), render_status)


def dump(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.report.text import render_dump, render_outputs

    store = magics.store()
    document = services.dump_document(store, magics.flow_name(), args.pathspec, args.include,
                                      previews=not args.json, outputs=args.outputs, trust=args.trust,
                                      all_executions=args.all_executions)
    if args.json:
        return document
    if not views.show_inspector(magics, document["flow"], document["run_id"], args.pathspec):
        print(render_dump(document), end="")
    if args.outputs:
        print(render_outputs(store.objects, document["outputs"]), end="")
    return None


def tag(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.report.text import render_tags

    document = services.tag_document(magics.store(), magics.flow_name(), args.action, args.run_id, args.tags)
    return _shown(args, document, render_tags)


def logs(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.report.text import render_logs

    return _shown(args, services.logs_document(magics.store(), magics.flow_name(), args.pathspec), render_logs)


def export(magics: FlowMagics, args: argparse.Namespace) -> Any:
    """The flow as a Metaflow FlowSpec script: printed, or written to -o FILE."""
    exported = services.export_document(magics.graph(), args.name, args.output)
    if args.json:
        return exported.document
    if args.output:
        print(f"wrote {args.output} (class {exported.class_name})")
    else:
        print(exported.source, end="")
    return None


READERS: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "status": status, "dump": dump, "tag": tag, "logs": logs, "export": export,
}
