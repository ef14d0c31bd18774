"""The shape of the metadata: states, the SQLite schema, and the records
the read side returns (frozen dataclasses)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

from flowmagic.states import RUN_STATES, TASK_STATES, RunState, TaskState  # noqa: F401 - re-exported

# The states live in flowmagic.states (one vocabulary for every layer); the
# names below are the ones the store has always exported.
RunStatus = RunState
Outcome = Literal["ok", "failed", "timeout", "killed", "interrupted"]

RUN_STATUSES = RUN_STATES
OUTCOMES = ("ok", "failed", "timeout", "killed", "interrupted")

SCHEMA_VERSION = 1  # additive changes (new nullable columns) keep the version: older code still opens the store
# Columns added after version 1 shipped: a store that lacks them gets them when opened.
RUN_ADDED_COLUMNS = {"orchestrator_pid": "INTEGER", "orchestrator_started": "REAL", "orchestrator_host": "TEXT",
                     "orchestrator_ticks": "INTEGER"}

# Tables added after version 1 shipped: created in an older store when it is opened
# (older releases ignore them), by name. notebook_runs is how a notebook finds its flow
# again after a rename or in a new kernel: the file it was at, and its cells' ids.
# running_attempts and live_log_chunks are a running attempt and its output so far,
# written while it runs (so a crash keeps them); its end record replaces both.
ADDED_TABLES = {
    "notebook_runs": """
CREATE TABLE IF NOT EXISTS notebook_runs (
    flow TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    notebook TEXT,                  -- the notebook's absolute path at that run, or NULL when unknown
    cell_ids TEXT NOT NULL,         -- JSON list of the nbformat ids of its cells
    recorded_at REAL NOT NULL,
    PRIMARY KEY (flow, run_id))""",
    "running_attempts": """
CREATE TABLE IF NOT EXISTS running_attempts (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    started_at REAL NOT NULL,
    PRIMARY KEY (task_id, attempt))""",
    "live_log_chunks": """
CREATE TABLE IF NOT EXISTS live_log_chunks (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    stream TEXT NOT NULL,           -- stdout | stderr
    seq INTEGER NOT NULL,           -- the log is its chunks in seq order: head, marker, tail
    text TEXT NOT NULL,
    PRIMARY KEY (task_id, attempt, stream, seq))""",
    # runs imported from a shared store (FLOWMAGIC_STORE, store/replica.py), not run here
    "replica_runs": """
CREATE TABLE IF NOT EXISTS replica_runs (
    flow TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    version TEXT NOT NULL,          -- the published run document's version it was imported at ('deleted': by gc)
    PRIMARY KEY (flow, run_id))""",
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS flows (
    name TEXT PRIMARY KEY,
    next_run_id INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    flow TEXT NOT NULL REFERENCES flows(name),
    run_id INTEGER NOT NULL,
    status TEXT NOT NULL,
    params TEXT NOT NULL,           -- JSON object
    code TEXT NOT NULL,             -- JSON object: step name (and "_prelude") -> source
    graph TEXT,                     -- JSON `show` document, or NULL
    user TEXT,
    interactive INTEGER NOT NULL DEFAULT 0,
    origin_run_id INTEGER,
    started_at REAL NOT NULL,
    finished_at REAL,
    orchestrator_pid INTEGER,       -- the process running it (RUN_ADDED_COLUMNS: added to older stores)
    orchestrator_started REAL,      -- that process's start time (a reused pid is another process)
    orchestrator_host TEXT,         -- where it runs: a pid means nothing on another machine
    orchestrator_ticks INTEGER,     -- its start in clock ticks since boot (store/liveness.py: why)
    PRIMARY KEY (flow, run_id));
CREATE TABLE IF NOT EXISTS run_tags (
    flow TEXT NOT NULL, run_id INTEGER NOT NULL, tag TEXT NOT NULL,
    PRIMARY KEY (flow, run_id, tag));
CREATE TABLE IF NOT EXISTS tasks (
    task_id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused, even after gc
    flow TEXT NOT NULL,
    run_id INTEGER NOT NULL,
    step TEXT NOT NULL,
    foreach_index TEXT,             -- JSON list of ints (nested foreach), or NULL
    item TEXT,                      -- repr of the foreach item, for display
    state TEXT NOT NULL,
    origin_task_id INTEGER,         -- the task a cloned/cached task copies
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS tasks_by_run ON tasks (flow, run_id, step);
CREATE TABLE IF NOT EXISTS attempts (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    started_at REAL,
    finished_at REAL,
    exit_code INTEGER,
    signal INTEGER,
    exception TEXT,                 -- JSON {type, message, traceback}, or NULL
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT '',
    outputs TEXT NOT NULL DEFAULT '[]',   -- JSON list of stored mimebundle records
    PRIMARY KEY (task_id, attempt));
CREATE TABLE IF NOT EXISTS artifacts (
    task_id INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    size INTEGER NOT NULL,
    hash TEXT NOT NULL,
    serializer TEXT NOT NULL,
    inline TEXT,
    PRIMARY KEY (task_id, attempt, name));
CREATE INDEX IF NOT EXISTS artifacts_by_hash ON artifacts (hash);
""" + "".join(ddl + ";\n" for ddl in ADDED_TABLES.values())


@dataclass(frozen=True)
class RunRecord:
    flow: str
    run_id: int
    status: str
    params: dict
    code: dict
    tags: tuple[str, ...]
    user: str | None
    interactive: bool
    origin_run_id: int | None
    started_at: float
    finished_at: float | None
    graph: dict | None = field(default=None, repr=False)
    orchestrator_pid: int | None = field(default=None, repr=False)
    orchestrator_started: float | None = field(default=None, repr=False)
    orchestrator_host: str | None = field(default=None, repr=False)
    orchestrator_ticks: int | None = field(default=None, repr=False)

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}"


@dataclass(frozen=True)
class TaskRecord:
    task_id: int
    flow: str
    run_id: int
    step: str
    index: tuple[int, ...] | None
    item: str | None
    state: str
    origin_task_id: int | None
    created_at: float
    updated_at: float

    @property
    def pathspec(self) -> str:
        return f"{self.flow}/{self.run_id}/{self.step}/{self.task_id}"


def latest_generation(tasks: list[TaskRecord]) -> list[TaskRecord]:
    """The tasks of a step's latest execution in a run (a session run may hold
    several: each re-execution of a cell adds a generation). A generation's
    tasks are created together, first index first."""
    if not tasks:
        return []
    tasks = sorted(tasks, key=lambda t: t.task_id)
    starts = [t.task_id for t in tasks if not t.index or not any(t.index)]
    first = max(starts) if starts else tasks[0].task_id
    return [t for t in tasks if t.task_id >= first]


def current_executions(run: RunRecord, tasks: list[TaskRecord], *, named_step: bool = False) -> list[TaskRecord]:
    """Of a session run's tasks, those of each step's latest execution, for the
    steps its flow has now (a renamed or deleted step cell's tasks are history,
    unless the step is ``named_step``). Other runs' tasks as they are."""
    if not run.interactive:
        return list(tasks)
    steps_now = set() if named_step else {s["name"] for s in (run.graph or {}).get("steps", [])}
    by_step: dict[str, list[TaskRecord]] = {}
    for task in tasks:
        by_step.setdefault(task.step, []).append(task)
    kept = [t for step, group in by_step.items() if not steps_now or step in steps_now
            for t in latest_generation(group)]
    return sorted(kept, key=lambda t: t.task_id)


@dataclass(frozen=True)
class AttemptRecord:
    task_id: int
    attempt: int
    outcome: str
    started_at: float | None
    finished_at: float | None
    exit_code: int | None
    signal: int | None
    exception: dict | None
    stdout: str
    stderr: str
    outputs: list
    complete: bool = True   # False: an attempt still running, or cut short by a crash (its output so far)


@dataclass(frozen=True)
class LiveLogWrite:
    """One flush of one stream of a running attempt: chunks to put (seq, text), seqs to delete."""

    task_id: int
    attempt: int
    stream: str
    chunks: tuple[tuple[int, str], ...] = ()
    deleted: tuple[int, ...] = ()


# column lists of the SELECTs that run_record / task_record read
RUN_COLUMNS = ("flow, run_id, status, params, code, user, interactive, origin_run_id, started_at,"
               " finished_at, graph, orchestrator_pid, orchestrator_started, orchestrator_host, orchestrator_ticks")
TASK_COLUMNS = ("task_id, flow, run_id, step, foreach_index, item, state, origin_task_id, created_at,"
                " updated_at")


def run_record(r: tuple, tags: tuple[str, ...]) -> RunRecord:
    return RunRecord(flow=r[0], run_id=r[1], status=r[2], params=json.loads(r[3]), code=json.loads(r[4]),
                     tags=tags, user=r[5], interactive=bool(r[6]), origin_run_id=r[7], started_at=r[8],
                     finished_at=r[9], graph=json.loads(r[10]) if r[10] else None,
                     orchestrator_pid=r[11], orchestrator_started=r[12], orchestrator_host=r[13],
                     orchestrator_ticks=r[14])


def task_record(r: tuple) -> TaskRecord:
    return TaskRecord(task_id=r[0], flow=r[1], run_id=r[2], step=r[3],
                      index=tuple(json.loads(r[4])) if r[4] else None, item=r[5], state=r[6],
                      origin_task_id=r[7], created_at=r[8], updated_at=r[9])
