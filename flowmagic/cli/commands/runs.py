"""Console subcommands about runs: run, resume, status, dump, tag, logs, gc.

Registered in :data:`flowmagic.cli.main.COMMANDS`. ``run`` and ``resume`` take the
flow's parameters as options (``--alpha 0.5``), so their options are parsed
in two passes: the notebook first, then a parser built from its parameters.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flowmagic.cli.main import EXIT_FAILED, EXIT_OK, Subcommand, _Parser, print_json
from flowmagic.errors import NotFoundError, UsageError


def _load(notebook: str):
    from flowmagic.notebook import load_flow, store_root_for
    from flowmagic.store import open_store

    graph = load_flow(notebook)
    return graph, open_store(store_root_for(notebook))


def _open(notebook: str):
    """The flow name and store, without building the DAG (reading commands)."""
    from flowmagic.notebook import flow_name_for, read_cells, store_root_for
    from flowmagic.store import open_store

    cells = read_cells(notebook)
    root = store_root_for(notebook)
    if not root.exists():
        raise UsageError(f"no runs yet: the store {root} does not exist (run the notebook first)")
    return flow_name_for(notebook, cells), open_store(root)


# --- run / resume ----------------------------------------------------------------


def _configure_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="--PARAM VALUE for each parameter, --max-workers N, --tag T, --json "
                             "(`flowmagic run NB.ipynb --help` lists the parameters)")


def _configure_resume(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="[RUN] [--from STEP] [--max-workers N] [--tag T] [--json]")


def _run_options(graph, command: str, notebook: str) -> argparse.ArgumentParser:
    from flowmagic.report.text import _number

    parser = _Parser(prog=f"flowmagic {command} {notebook}",
                     description=f"{'Run' if command == 'run' else 'Resume'} the flow {graph.name}.")
    if command == "resume":
        parser.add_argument("run_id", nargs="?", type=int, metavar="RUN",
                            help="the run to resume (default: the latest finished run)")
        parser.add_argument("--from", dest="from_step", metavar="STEP",
                            help="re-run this step and everything after it, even if it succeeded")
    parser.add_argument("--max-workers", type=int, default=None, metavar="N",
                        help="tasks run at the same time (default: number of cores)")
    parser.add_argument("--tag", action="append", default=[], metavar="TAG", help="tag the run (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON document; logs go to stderr")
    if command == "run":
        parser.add_argument("--cache", action="store_true",
                            help="reuse identical earlier tasks of every step (as `%%%%step NAME --cache` does for one)")
        group = parser.add_argument_group("parameters of the flow")
        for p in graph.params:
            default = p.default if not isinstance(p.default, float) else _number(p.default)
            group.add_argument(f"--{p.name}", dest=f"param:{p.name}", metavar=p.type.upper(),
                               help=f"{p.help or p.name} ({p.type}, default: {default!r})")
    return parser


def _prestart_server() -> None:
    from flowmagic.runtime.worker.forkserver import prestart

    # Forked from this process, before any thread starts: its imports overlap
    # with reading the notebook and building the flow.
    prestart(fork=True)


def _run_run(args: argparse.Namespace) -> int:
    if "-h" not in args.options and "--help" not in args.options:
        _prestart_server()
    graph, store = _load(args.notebook)
    opts = _run_options(graph, "run", args.notebook).parse_args(args.options)
    params = {k.split(":", 1)[1]: v for k, v in vars(opts).items() if k.startswith("param:") and v is not None}
    from flowmagic.runtime.orchestrator.scheduler import run_flow

    return _drive(args, opts, graph, lambda on_event: run_flow(
        graph, store, params=params, tags=opts.tag, max_workers=opts.max_workers, on_event=on_event,
        cache=opts.cache, workdir=_workdir(args.notebook)))


def _run_resume(args: argparse.Namespace) -> int:
    _prestart_server()
    graph, store = _load(args.notebook)
    opts = _run_options(graph, "resume", args.notebook).parse_args(args.options)
    from flowmagic.runtime.orchestrator.scheduler import resume_flow

    return _drive(args, opts, graph, lambda on_event: resume_flow(
        graph, store, origin_run_id=opts.run_id, from_step=opts.from_step, tags=opts.tag,
        max_workers=opts.max_workers, on_event=on_event, workdir=_workdir(args.notebook)))


def _workdir(notebook: str) -> str:
    return str(Path(notebook).absolute().parent)


def _drive(args, opts, graph, start) -> int:
    """Run with a live printer; Ctrl-C ends the run (interrupted, exit 1)."""
    from flowmagic.report.text import RunPrinter, render_run_summary

    if opts.max_workers is not None and opts.max_workers < 1:
        raise UsageError(f"--max-workers must be 1 or more, not {opts.max_workers}")

    log = sys.stderr if opts.json else sys.stdout
    printer = RunPrinter(log, flow=graph.name)
    try:
        result = start(printer)
    except KeyboardInterrupt:
        log.write(f"Run {graph.name}/{printer.run_id} interrupted\n")
        if opts.json:
            print_json({"flow": graph.name, "run_id": printer.run_id, "status": "interrupted",
                        "origin_run_id": getattr(opts, "run_id", None)})
        return EXIT_FAILED
    log.write(render_run_summary(result, args.notebook))
    log.flush()
    if opts.json:
        print_json(result.to_json())
    return EXIT_OK if result.status == "succeeded" else EXIT_FAILED


# --- status ------------------------------------------------------------------------


def _configure_status(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("--tag", default=None, help="only runs with this tag")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _run_status(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_status
    from flowmagic.notebook import flow_name_for, read_cells, store_root_for
    from flowmagic.store import open_store

    flow = flow_name_for(args.notebook, read_cells(args.notebook))
    root = store_root_for(args.notebook)
    runs = open_store(root).meta.list_runs(flow, tag=args.tag) if root.exists() else []
    if args.json:
        print_json({"flow": flow, "runs": [
            {"run_id": r.run_id, "status": r.status, "tags": list(r.tags), "started_at": r.started_at,
             "finished_at": r.finished_at, "origin_run_id": r.origin_run_id, "interactive": r.interactive}
            for r in runs]})
    else:
        sys.stdout.write(render_status(flow, runs))
    return EXIT_OK


# --- dump ----------------------------------------------------------------------------


def _parse_pathspec(text: str) -> tuple[int, str | None, int | None]:
    parts = text.strip("/").split("/")
    try:
        run_id = int(parts[0])
        task = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        raise UsageError(f"'{text}' is not RUN[/STEP[/TASK]] (for example 3, 3/start or 3/start/12)") from None
    if len(parts) > 3:
        raise UsageError(f"'{text}' is not RUN[/STEP[/TASK]]")
    return run_id, (parts[1] if len(parts) > 1 else None), task


def _select_tasks(store, flow: str, spec: str):
    run_id, step, task_id = _parse_pathspec(spec)
    store.meta.get_run(flow, run_id)  # NotFoundError lists the runs
    tasks = store.meta.tasks(flow, run_id, step)
    if step is not None and not tasks:
        steps = sorted({t.step for t in store.meta.tasks(flow, run_id)})
        raise NotFoundError(f"run {flow}/{run_id} has no step '{step}' (steps: {', '.join(steps) or 'none'})")
    if task_id is not None:
        ids = ", ".join(str(t.task_id) for t in tasks)
        tasks = [t for t in tasks if t.task_id == task_id]
        if not tasks:
            raise NotFoundError(f"step {flow}/{run_id}/{step} has no task {task_id} (tasks: {ids})")
    return run_id, tasks


def _configure_dump(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("pathspec", metavar="RUN[/STEP[/TASK]]")
    parser.add_argument("--include", action="append", default=[], metavar="NAME",
                        help="only these artifacts (repeatable, or comma-separated)")
    parser.add_argument("--outputs", action="store_true",
                        help="also show each task's rich outputs: their text and the paths of saved images")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _task_outputs(store, tasks) -> list[tuple[object, list[dict]]]:
    """(task, stored output refs of its last attempt) for the tasks that have outputs."""
    found = []
    for task in tasks:
        attempts = store.meta.attempts(task.task_id)
        if attempts and attempts[-1].outputs:
            found.append((task, list(attempts[-1].outputs)))
    return found


def _render_outputs(store, found) -> str:
    from flowmagic.store.outputs import describe_outputs

    if not found:
        return "no outputs\n"
    lines = []
    for task, refs in found:
        lines.append(f"Outputs of {task.step}/{task.task_id}")
        lines.extend(describe_outputs(store.objects, refs))
    return "\n".join(lines) + "\n"


def check_included(store, flow: str, pathspec: str, tasks, include: set[str], rows: list[dict]) -> None:
    """A misspelt ``--include`` name is an error listing the artifacts, not an empty dump."""
    unknown = sorted(include - {row["name"] for row in rows})
    if unknown:
        names = sorted({r.name for t in tasks for r in store.meta.artifacts(t.task_id)})
        raise NotFoundError(f"no artifact {', '.join(map(repr, unknown))} in {flow}/{pathspec} "
                            f"(artifacts: {', '.join(names) or 'none'})")


def collect_dump(store, flow: str, args: argparse.Namespace):
    """The selected tasks of a dump and one row per artifact (with a text
    preview unless ``--json``); shared by ``flowmagic dump`` and ``%flow dump``."""
    from flowmagic.report.text import preview
    from flowmagic.store import load_artifact

    run_id, tasks = _select_tasks(store, flow, args.pathspec)
    include = {n for item in args.include for n in item.split(",") if n}
    rows = []
    for task in tasks:
        for ref in store.meta.artifacts(task.task_id):
            if include and ref.name not in include:
                continue
            row = {"step": task.step, "task": task.task_id, "name": ref.name, "type": ref.type,
                   "size": ref.size, "hash": ref.hash}
            if not args.json and ref.serializer == "unsaved":
                row["preview"] = "(not saved)"
            elif not args.json:
                try:
                    row["preview"] = preview(load_artifact(store.objects, ref, step=task.step))
                except Exception as exc:  # noqa: BLE001 - a preview must not hide the others
                    row["preview"] = f"<cannot load: {exc}>"
            rows.append(row)
    check_included(store, flow, args.pathspec, tasks, include, rows)
    return run_id, tasks, rows


def _run_dump(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_dump
    from flowmagic.runtime.environments.builder import environments_of_run, render_environments

    flow, store = _open(args.notebook)
    run_id, tasks, rows = collect_dump(store, flow, args)
    found = _task_outputs(store, tasks) if args.outputs else []
    environments = environments_of_run(store.meta, flow, run_id, {t.step for t in tasks})   # --pypi/--conda
    if args.json:
        document = {"flow": flow, "run_id": run_id, "artifacts": rows}
        if environments:
            document["environments"] = environments
        if args.outputs:
            document["outputs"] = [{"step": t.step, "task": t.task_id, "outputs": refs} for t, refs in found]
        print_json(document)
    else:
        sys.stdout.write(render_dump(flow, run_id, rows) + render_environments(environments))
        if args.outputs:
            sys.stdout.write(_render_outputs(store, found))
    return EXIT_OK


# --- tag -------------------------------------------------------------------------------


def _configure_tag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["add", "remove", "list"])
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("run_id", type=int, metavar="RUN")
    parser.add_argument("tags", nargs="*", metavar="TAG")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def apply_tags(store, flow: str, args: argparse.Namespace) -> list[str]:
    """Carry out ``tag add|remove|list``; return the run's tags afterwards
    (shared by ``flowmagic tag`` and ``%flow tag``)."""
    if args.action != "list" and not args.tags:
        raise UsageError(f"tag {args.action}: give at least one TAG")
    if args.action == "add":
        store.meta.add_tags(flow, args.run_id, args.tags)
    elif args.action == "remove":
        store.meta.remove_tags(flow, args.run_id, args.tags)
    return list(store.meta.get_run(flow, args.run_id).tags)


def _run_tag(args: argparse.Namespace) -> int:
    flow, store = _open(args.notebook)
    tags = apply_tags(store, flow, args)
    if args.json:
        print_json({"flow": flow, "run_id": args.run_id, "tags": tags})
    else:
        sys.stdout.write((" ".join(tags) or "(no tags)") + "\n")
    return EXIT_OK


# --- logs -------------------------------------------------------------------------------


def _configure_logs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file")
    parser.add_argument("pathspec", metavar="RUN/STEP[/TASK]")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def collect_logs(store, flow: str, pathspec: str) -> tuple[int, list[dict]]:
    """Every attempt of the selected tasks, with its output and exception;
    shared by ``flowmagic logs`` and ``%flow logs``."""
    run_id, tasks = _select_tasks(store, flow, pathspec)
    rows = [{"step": t.step, "task": t.task_id, "index": list(t.index) if t.index else None, "state": t.state,
             "attempts": [{"attempt": a.attempt, "outcome": a.outcome, "stdout": a.stdout, "stderr": a.stderr,
                           "exception": a.exception, "exit_code": a.exit_code, "signal": a.signal}
                          for a in store.meta.attempts(t.task_id)]}
            for t in tasks]
    return run_id, rows


def _run_logs(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_logs

    flow, store = _open(args.notebook)
    run_id, rows = collect_logs(store, flow, args.pathspec)
    if args.json:
        print_json({"flow": flow, "run_id": run_id, "tasks": rows})
    else:
        sys.stdout.write(render_logs(flow, run_id, rows))
    return EXIT_OK


# --- gc -----------------------------------------------------------------------------------


def _configure_gc(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("notebook", help="the .ipynb file (its store is collected)")
    parser.add_argument("--keep", type=int, default=None, metavar="N",
                        help="keep only the newest N runs of each flow (default: keep every run)")
    parser.add_argument("--dry-run", action="store_true", help="only report what would be removed")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def _run_gc(args: argparse.Namespace) -> int:
    from flowmagic.store.gc import gc

    _flow, store = _open(args.notebook)
    try:
        result = gc(store, args.keep, dry_run=args.dry_run)
    except ValueError as exc:
        raise UsageError(f"gc: {exc}") from None
    if args.json:
        print_json(result.to_json())
    else:
        sys.stdout.write(result.summary() + "\n")
    return EXIT_OK


COMMANDS = [
    Subcommand("run", "run the notebook's flow (`run NB.ipynb --help` lists its parameters)",
               _configure_run, _run_run),
    Subcommand("resume", "re-run the failed steps of a run (and what follows), cloning the rest",
               _configure_resume, _run_resume),
    Subcommand("status", "list the flow's runs, newest first", _configure_status, _run_status),
    Subcommand("dump", "show the artifacts of a run, step or task", _configure_dump, _run_dump),
    Subcommand("tag", "add, remove or list the tags of a run", _configure_tag, _run_tag),
    Subcommand("logs", "show the output of a step's tasks, every attempt", _configure_logs, _run_logs),
    Subcommand("gc", "remove stored objects no run refers to", _configure_gc, _run_gc),
]
