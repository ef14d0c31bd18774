"""Console sub-commands about runs: run, resume, status, dump, tag, logs, gc.

Their options are declared in :mod:`flowmagic.cli.options`; their documents are
built by :mod:`flowmagic.services` and rendered by :mod:`flowmagic.report.text`.
``run`` and ``resume`` take the flow's parameters as options (``--alpha 0.5``),
so their options are parsed in two passes: the notebook first, then a parser
built from its parameters.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from collections.abc import Callable

from flowmagic import services
from flowmagic.cli.base import EXIT_FAILED, EXIT_OK, ConsoleParser, print_json
from flowmagic.cli.options import add_run_options, given_params
from flowmagic.errors import UsageError


def _load(notebook: str):
    from flowmagic.flow.graph import build_flow
    from flowmagic.notebook import read_cells
    from flowmagic.store import open_store
    from flowmagic.store.paths import store_root_for

    cells = read_cells(notebook)   # a file that is no notebook says so before a store is made
    store = open_store(store_root_for(notebook))
    graph = build_flow(cells, name=_flow_name(notebook, store))
    return graph, store


def _flow_name(notebook: str, store: Any = None) -> str:
    """The flow's name, without building the DAG: a renamed notebook keeps the
    flow its runs recorded, and says so on stderr (stdout may be --json)."""
    from flowmagic.notebook import flow_identity

    name, note = flow_identity(Path(notebook), store.meta if store is not None else None)
    if note:
        print(f"[flowmagic] {note}", file=sys.stderr)
    return name


def _record_notebook(store: Any, notebook: str, result: Any) -> None:
    """Remember where this notebook was and its cells' ids with the run (renames find it)."""
    from flowmagic.notebook import read_saved_cells

    try:
        ids = [c.cell_id for c in read_saved_cells(notebook) if c.cell_id]
        store.meta.record_notebook(result.flow, result.run_id, str(Path(notebook).absolute()), ids)
    except Exception as exc:  # noqa: BLE001 - the run is recorded; only where it came from is not
        print(f"[flowmagic] warning: could not record the notebook with the run: {exc}", file=sys.stderr)


def _open(notebook: str):
    """The flow name and the store, which must exist already."""
    from flowmagic.store import open_store
    from flowmagic.store.paths import store_root_for

    from flowmagic.store.backends import store_url

    root = store_root_for(notebook)
    if not root.exists() and store_url() is None:   # a shared store (FLOWMAGIC_STORE) fills a new home
        _flow_name(notebook)   # a notebook that is not one says so first
        raise UsageError(f"no runs yet: the store {root} does not exist (run the notebook first)")
    store = open_store(root)
    return _flow_name(notebook, store), store


# --- run / resume ----------------------------------------------------------------

def run_parser(graph: Any, command: str, notebook: str) -> argparse.ArgumentParser:
    """The second-pass parser of ``run``/``resume``: the flow's parameters included."""
    parser = ConsoleParser(prog=f"flowmagic {command} {notebook}",
                           description=f"{'Run' if command == 'run' else 'Resume'} the flow {graph.name}.")
    add_run_options(parser, graph, command)
    return parser


def _prestart_server() -> None:
    from flowmagic.runtime.worker.forkpool import prestart

    # Forked from this process, before any thread starts: its imports overlap
    # with reading the notebook and building the flow.
    prestart(fork=True)


def run_run(args: argparse.Namespace) -> int:
    if "-h" not in args.options and "--help" not in args.options:
        _prestart_server()
    graph, store = _load(args.notebook)
    opts = run_parser(graph, "run", args.notebook).parse_args(args.options)
    params = given_params(opts)
    from flowmagic.runtime.orchestrator.scheduler import run_flow

    return _drive(args, opts, graph, lambda on_event: _recorded(store, args.notebook, run_flow(
        graph, store, params=params, tags=opts.tag, max_workers=opts.max_workers, on_event=on_event,
        cache=opts.cache, workdir=_workdir(args.notebook), executor=opts.executor)))


def run_resume(args: argparse.Namespace) -> int:
    _prestart_server()
    graph, store = _load(args.notebook)
    opts = run_parser(graph, "resume", args.notebook).parse_args(args.options)
    from flowmagic.runtime.orchestrator.scheduler import resume_flow

    return _drive(args, opts, graph, lambda on_event: _recorded(store, args.notebook, resume_flow(
        graph, store, origin_run_id=opts.run_id, from_step=opts.from_step, tags=opts.tag,
        max_workers=opts.max_workers, on_event=on_event, workdir=_workdir(args.notebook),
        executor=opts.executor)))


def _recorded(store: Any, notebook: str, result: Any) -> Any:
    _record_notebook(store, notebook, result)
    return result


def _workdir(notebook: str) -> str:
    return str(Path(notebook).absolute().parent)


def _drive(args, opts, graph, start) -> int:
    """Run with a live printer; Ctrl-C ends the run (interrupted, exit 1)."""
    from flowmagic.report.text import RunPrinter, render_run_summary

    if opts.max_workers is not None and opts.max_workers < 1:
        raise UsageError(f"--max-workers must be 1 or more, not {opts.max_workers}")

    log = sys.stderr if opts.json else sys.stdout
    printer = RunPrinter(log, flow=graph.name, verbose=opts.verbose)
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


# --- reading commands: a document, printed as JSON or as text --------------------------

def _print(args: argparse.Namespace, document: dict, render: Callable[[dict], str]) -> int:
    if args.json:
        print_json(document)
    else:
        sys.stdout.write(render(document))
    return EXIT_OK


def run_status(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_status
    from flowmagic.store import open_store
    from flowmagic.store.backends import store_url
    from flowmagic.store.paths import store_root_for

    root = store_root_for(args.notebook)
    # a shared store (FLOWMAGIC_STORE) fills a new home with the runs published there
    store = open_store(root) if root.exists() or store_url() is not None else None
    return _print(args, services.status_document(store, _flow_name(args.notebook, store), args.tag), render_status)


def run_dump(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_dump, render_outputs

    flow, store = _open(args.notebook)
    document = services.dump_document(store, flow, args.pathspec, args.include, previews=not args.json,
                                      outputs=args.outputs, trust=args.trust,
                                      all_executions=args.all_executions)
    _print(args, document, render_dump)
    if args.outputs and not args.json:
        sys.stdout.write(render_outputs(store.objects, document["outputs"]))
    return EXIT_OK


def run_tag(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_tags

    flow, store = _open(args.notebook)
    return _print(args, services.tag_document(store, flow, args.action, args.run_id, args.tags), render_tags)


def run_logs(args: argparse.Namespace) -> int:
    from flowmagic.report.text import render_logs

    flow, store = _open(args.notebook)
    return _print(args, services.logs_document(store, flow, args.pathspec), render_logs)


def run_gc(args: argparse.Namespace) -> int:
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


RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": run_run, "resume": run_resume, "status": run_status, "dump": run_dump, "tag": run_tag,
    "logs": run_logs, "gc": run_gc,
}
