"""Application queries shared by the console (``flowmagic``) and ``%flow``.

Each function builds one document (a JSON-ready dict): the ``--json`` output
of ``status``, ``dump``, ``logs``, ``tag`` and ``export``, which is also what
:mod:`flowmagic.report.text` renders as text. The two front ends differ only in
where the flow and the store come from (a saved notebook, or the kernel) and
in how they print; nothing here prints.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flowmagic.errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from flowmagic.flow.graph import FlowGraph
    from flowmagic.store import Store
    from flowmagic.store.metadata import AttemptRecord, RunRecord, TaskRecord


# --- status ---------------------------------------------------------------------

def status_document(store: Store | None, flow: str, tag: str | None = None) -> dict:
    """``{"flow", "runs": [...]}``, newest run first; ``store`` None: a store not made yet (no runs)."""
    if store is not None:
        store.refresh()   # a shared store (FLOWMAGIC_STORE): runs other homes published since it was opened
    runs = store.meta.list_runs(flow, tag=tag) if store is not None else []
    return {"flow": flow, "runs": [_run_row(r) for r in runs]}


def _run_row(run: RunRecord) -> dict:
    return {"run_id": run.run_id, "status": run.status, "tags": list(run.tags), "started_at": run.started_at,
            "finished_at": run.finished_at, "origin_run_id": run.origin_run_id, "interactive": run.interactive}


# --- selecting tasks by pathspec -----------------------------------------------------

def parse_pathspec(text: str) -> tuple[int, str | None, int | None]:
    """``"3/start/12"`` -> ``(3, "start", 12)``; a clear UsageError for anything else."""
    parts = text.strip("/").split("/")
    try:
        run_id = int(parts[0])
        task = int(parts[2]) if len(parts) > 2 else None
    except ValueError:
        raise UsageError(f"'{text}' is not RUN[/STEP[/TASK]] (for example 3, 3/start or 3/start/12)") from None
    if len(parts) > 3:
        raise UsageError(f"'{text}' is not RUN[/STEP[/TASK]]")
    return run_id, (parts[1] if len(parts) > 1 else None), task


def select_tasks(store: Store, flow: str, pathspec: str) -> tuple[int, list[TaskRecord]]:
    """The run id and the tasks ``pathspec`` names; NotFoundError lists what exists."""
    run_id, step, task_id = parse_pathspec(pathspec)
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


# --- dump ---------------------------------------------------------------------------

def dump_document(store: Store, flow: str, pathspec: str, include: Iterable[str] = (), *,
                  previews: bool = False, outputs: bool = False, trust: bool = False,
                  all_executions: bool = False) -> dict:
    """``{"flow", "run_id", "artifacts", ["environments"], ["outputs"]}`` of the tasks ``pathspec`` names.

    ``include``: artifact names (an item may be comma-separated); ``previews``
    adds each artifact's one-line text preview (for text, not ``--json``);
    ``outputs`` adds each task's stored rich outputs. A pickled value is
    previewed only in a store of the current user's, or with ``trust``
    (loading a pickle runs code: store/trust.py); else its preview says why not.
    Of a session run, only the current execution of each of its cells, unless
    ``all_executions``.
    """
    from flowmagic.store.environments import environments_of_run

    run_id, tasks = select_tasks(store, flow, pathspec)
    from flowmagic.store.metadata import current_executions

    _run, step, task = parse_pathspec(pathspec)
    if not all_executions and task is None:
        tasks = current_executions(store.meta.get_run(flow, run_id), tasks, named_step=step is not None)
    wanted = {name for item in include for name in item.split(",") if name}
    rows = _artifact_rows(store, tasks, wanted, previews, trust)
    _check_included(store, flow, pathspec, tasks, wanted, rows)
    document: dict[str, Any] = {"flow": flow, "run_id": run_id, "artifacts": rows}
    environments = environments_of_run(store.meta, flow, run_id, {t.step for t in tasks})   # --pypi/--conda
    if environments:
        document["environments"] = environments
    if outputs:
        document["outputs"] = [{"step": t.step, "task": t.task_id, "outputs": refs}
                               for t, refs in _task_outputs(store, tasks)]
    return document


def _artifact_rows(store: Store, tasks: Sequence[TaskRecord], wanted: set[str], previews: bool,
                   trust: bool = False) -> list[dict]:
    rows = []
    for task in tasks:
        for ref in store.meta.artifacts(task.task_id):
            if wanted and ref.name not in wanted:
                continue
            row = {"step": task.step, "task": task.task_id, "name": ref.name, "type": ref.type,
                   "size": ref.size, "hash": ref.hash}
            if previews:
                row["preview"] = _preview(store, ref, task.step, trust)
            rows.append(row)
    return rows


def _preview(store: Store, ref: Any, step: str, trust: bool = False) -> str:
    from flowmagic.report.text import preview
    from flowmagic.store import load_artifact
    from flowmagic.store.trust import untrusted_reason

    if ref.serializer == "unsaved":
        return "(not saved)"
    if ref.serializer == "pickle" and not trust:
        why = untrusted_reason(store.root, store.objects.path(ref.hash))
        if why is not None:
            return f"(a pickle, not loaded: {why}; loading it runs code: --trust to show it)"
    try:
        return preview(load_artifact(store.objects, ref, step=step))
    except Exception as exc:  # noqa: BLE001 - a preview must not hide the others
        return f"<cannot load: {exc}>"


def _check_included(store: Store, flow: str, pathspec: str, tasks: Sequence[TaskRecord], wanted: set[str],
                    rows: list[dict]) -> None:
    """A misspelt ``--include`` name is an error listing the artifacts, not an empty dump."""
    unknown = sorted(wanted - {row["name"] for row in rows})
    if unknown:
        names = sorted({r.name for t in tasks for r in store.meta.artifacts(t.task_id)})
        raise NotFoundError(f"no artifact {', '.join(map(repr, unknown))} in {flow}/{pathspec} "
                            f"(artifacts: {', '.join(names) or 'none'})")


def _task_outputs(store: Store, tasks: Sequence[TaskRecord]) -> list[tuple[TaskRecord, list[dict]]]:
    """(task, stored output refs of its last attempt) for the tasks that have outputs."""
    found = []
    for task in tasks:
        attempts = store.meta.attempts(task.task_id)
        if attempts and attempts[-1].outputs:
            found.append((task, list(attempts[-1].outputs)))
    return found


# --- logs ---------------------------------------------------------------------------

def logs_document(store: Store, flow: str, pathspec: str) -> dict:
    """``{"flow", "run_id", "tasks"}``: every attempt of the selected tasks, with its output and exception."""
    run_id, tasks = select_tasks(store, flow, pathspec)
    rows = [{"step": t.step, "task": t.task_id, "index": list(t.index) if t.index else None, "state": t.state,
             "attempts": [_attempt_logs(t, a) for a in store.meta.attempts(t.task_id, unfinished=True)]}
            for t in tasks]
    return {"flow": flow, "run_id": run_id, "tasks": rows}


def _attempt_logs(task: TaskRecord, a: AttemptRecord) -> dict:
    """One attempt of the logs document. ``complete`` is False for an attempt with no end record:
    its output so far, and outcome ``running`` (``crashed`` when its run's orchestrator died)."""
    outcome = a.outcome if a.complete or task.state != "crashed" else "crashed"
    return {"attempt": a.attempt, "outcome": outcome, "complete": a.complete, "stdout": a.stdout,
            "stderr": a.stderr, "exception": a.exception, "exit_code": a.exit_code, "signal": a.signal}


# --- tag ----------------------------------------------------------------------------

def tag_document(store: Store, flow: str, action: str, run_id: int, tags: Sequence[str]) -> dict:
    """Carry out ``tag add|remove|list``; ``{"flow", "run_id", "tags"}`` with the run's tags afterwards."""
    if action != "list" and not tags:
        raise UsageError(f"tag {action}: give at least one TAG")
    if action == "add":
        store.meta.add_tags(flow, run_id, tags)
    elif action == "remove":
        store.meta.remove_tags(flow, run_id, tags)
    return {"flow": flow, "run_id": run_id, "tags": list(store.meta.get_run(flow, run_id).tags)}


# --- export -------------------------------------------------------------------------

@dataclass(frozen=True)
class Export:
    """An exported flow: the script, and the ``--json`` document describing it."""

    source: str
    class_name: str
    document: dict


def export_document(graph: FlowGraph, class_name: str | None = None,
                    output: str | os.PathLike | None = None) -> Export:
    """The flow as a Metaflow FlowSpec script, written to ``output`` when given (never half-written)."""
    from flowmagic.export import write_script
    from flowmagic.export.script import plan_export, render_script

    plan = plan_export(graph, class_name)
    source = render_script(plan)
    if output is not None:
        write_script(output, source)
    steps = [{"name": s.name, "added": not s.real, "next": s.next, "foreach": s.foreach, "join": s.join}
             for s in plan.structure.steps.values()]
    document = {"flow": plan.graph.name, "class": plan.class_name,
                "output": None if output is None else str(output), "steps": steps}
    return Export(source=source, class_name=plan.class_name, document=document)

