"""`flowmagic export NOTEBOOK [-o flow.py] [--name CLASS] [--json]` (the CLI part)."""
from __future__ import annotations

import argparse
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("-o", "--output", help="write the script there (default: print it)")
    parser.add_argument("--name", help="class name of the flow (default: the flow's name)")
    parser.add_argument("--json", action="store_true",
                        help='print {"flow", "class", "output", "steps"} instead of the script')


def run(args: argparse.Namespace) -> int:
    from flowmagic.cli.main import EXIT_OK, print_json
    from flowmagic.export.script import plan_export, render_script
    from flowmagic.notebook import load_flow

    plan = plan_export(load_flow(args.notebook), args.name)
    source = render_script(plan)
    if args.output:
        from flowmagic.export import export_notebook

        export_notebook(args.notebook, args.output, args.name)
    if args.json:
        print_json({"flow": plan.graph.name, "class": plan.class_name, "output": args.output,
                    "steps": [{"name": s.name, "added": not s.real, "next": s.next, "foreach": s.foreach,
                               "join": s.join} for s in plan.structure.steps.values()]})
    elif not args.output:
        sys.stdout.write(source)
    else:
        sys.stderr.write(f"wrote {args.output} (class {plan.class_name})\n")
    return EXIT_OK
