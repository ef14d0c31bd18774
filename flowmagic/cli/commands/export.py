"""`flowmagic export NOTEBOOK [-o flow.py] [--name CLASS] [--json]`."""
from __future__ import annotations

import argparse
import sys

from flowmagic.cli.base import EXIT_OK, print_json


def run(args: argparse.Namespace) -> int:
    from flowmagic import services
    from flowmagic.notebook import load_flow

    exported = services.export_document(load_flow(args.notebook), args.name, args.output)
    if args.json:
        print_json(exported.document)
    elif not args.output:
        sys.stdout.write(exported.source)
    else:
        sys.stderr.write(f"wrote {args.output} (class {exported.class_name})\n")
    return EXIT_OK
