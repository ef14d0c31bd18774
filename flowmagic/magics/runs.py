"""``%flow status|dump|tag|logs|export``: the console command's reading
sub-commands, on the kernel's flow and store.

The options are the console command's own (its ``configure`` functions, in
cli.py / cli_runs.py / export/command.py), minus the notebook argument; the
texts are :mod:`flowmagic.report.text`'s. Only where the console reads a saved
notebook do these read the kernel's flow instead.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from flowmagic.magics import views

if TYPE_CHECKING:
    from flowmagic.magics.extension import FlowMagics


def console_parser(command: str, make: Callable[[str, str], argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """The console sub-command's parser, without its notebook argument."""
    from flowmagic.cli.main import COMMANDS
    from flowmagic.cli.commands.runs import COMMANDS as RUN_COMMANDS

    spec = next(c for c in [*COMMANDS, *RUN_COMMANDS] if c.name == command)
    parser = make(command, spec.help)
    spec.configure(parser)
    drop_argument(parser, "notebook")
    return parser


def drop_argument(parser: argparse.ArgumentParser, dest: str) -> None:
    for action in [a for a in parser._actions if a.dest == dest]:
        parser._remove_action(action)
        for group in parser._action_groups:
            if action in group._group_actions:
                group._group_actions.remove(action)


def status(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.report.text import render_status

    flow = magics.flow_name()
    runs = magics.store().meta.list_runs(flow, tag=args.tag)
    if args.json:
        return {"flow": flow, "runs": [
            {"run_id": r.run_id, "status": r.status, "tags": list(r.tags), "started_at": r.started_at,
             "finished_at": r.finished_at, "origin_run_id": r.origin_run_id, "interactive": r.interactive}
            for r in runs]}
    print(render_status(flow, runs), end="")
    return None


def dump(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.cli.commands.runs import _render_outputs, _task_outputs, collect_dump
    from flowmagic.report.text import render_dump

    flow, store = magics.flow_name(), magics.store()
    run_id, tasks, rows = collect_dump(store, flow, args)
    found = _task_outputs(store, tasks) if args.outputs else []
    if args.json:
        document = {"flow": flow, "run_id": run_id, "artifacts": rows}
        if args.outputs:
            document["outputs"] = [{"step": t.step, "task": t.task_id, "outputs": refs} for t, refs in found]
        return document
    if not views.show_inspector(magics, flow, run_id, args.pathspec):
        print(render_dump(flow, run_id, rows), end="")
    if args.outputs:
        print(_render_outputs(store, found), end="")
    return None


def tag(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.cli.commands.runs import apply_tags

    flow, store = magics.flow_name(), magics.store()
    tags = apply_tags(store, flow, args)
    if args.json:
        return {"flow": flow, "run_id": args.run_id, "tags": tags}
    print(" ".join(tags) or "(no tags)")
    return None


def logs(magics: FlowMagics, args: argparse.Namespace) -> Any:
    from flowmagic.cli.commands.runs import collect_logs
    from flowmagic.report.text import render_logs

    flow, store = magics.flow_name(), magics.store()
    run_id, rows = collect_logs(store, flow, args.pathspec)
    if args.json:
        return {"flow": flow, "run_id": run_id, "tasks": rows}
    print(render_logs(flow, run_id, rows), end="")
    return None


def export(magics: FlowMagics, args: argparse.Namespace) -> Any:
    """The flow as a Metaflow FlowSpec script: printed, or written to -o FILE."""
    from flowmagic.export.script import plan_export, render_script

    plan = plan_export(magics.graph(), args.name)
    source = render_script(plan)
    if args.output:
        target = Path(args.output)
        temporary = target.with_name(f".{target.name}.tmp")
        temporary.write_text(source, encoding="utf-8")
        temporary.replace(target)   # never a half-written script
    if args.json:
        return {"flow": plan.graph.name, "class": plan.class_name, "output": args.output,
                "steps": [{"name": s.name, "added": not s.real, "next": s.next, "foreach": s.foreach,
                           "join": s.join} for s in plan.structure.steps.values()]}
    if args.output:
        print(f"wrote {args.output} (class {plan.class_name})")
    else:
        print(source, end="")
    return None


READERS: dict[str, Callable[[Any, argparse.Namespace], Any]] = {
    "status": status, "dump": dump, "tag": tag, "logs": logs, "export": export,
}
