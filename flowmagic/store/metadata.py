"""Run metadata in SQLite: flows, runs, tags, tasks, attempts, artifacts, logs.

Only the orchestrator writes (tasks hand it a manifest); any number of
processes read. The database runs in WAL mode so readers never block the
writer, with a busy timeout so two orchestrators take turns. Run ids come
from a per-flow counter bumped inside ``BEGIN IMMEDIATE``, so they increase,
are never reused (not even after gc) and never collide between processes.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import sqlite3
import threading
import time
import weakref
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any
from collections.abc import Iterator, Sequence

from flowmagic.errors import NotFoundError, StoreError
from flowmagic.states import TASK_TERMINAL
from .schema import (  # noqa: F401  (the states and records are re-exported: part of this API)
    ADDED_TABLES, OUTCOMES, RUN_ADDED_COLUMNS, RUN_COLUMNS, RUN_STATUSES, SCHEMA, SCHEMA_VERSION, TASK_COLUMNS,
    TASK_STATES,
    AttemptRecord, LiveLogWrite,
    Outcome, RunRecord, RunStatus, TaskRecord, TaskState, current_executions, latest_generation, run_record,
    task_record)
from .liveness import orchestrator_gone, this_process
from .serializers import ArtifactRef

_OBJECT_KEY_RE = re.compile(r"\b[0-9a-f]{32}\b")
BUSY_TIMEOUT_S = 60.0


def _use_wal(conn: sqlite3.Connection) -> None:
    """Put the database in WAL mode (it stays so, in the file). Switching needs
    the file to itself for a moment and SQLite does not wait for that (the
    busy timeout does not apply): processes opening a new store at once retry."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    delay = 0.002
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
                return
            if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() == "wal":
                return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
        if time.monotonic() > deadline:
            raise sqlite3.OperationalError("database is locked (could not switch it to WAL mode)")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


class Metadata:
    """The SQLite database ``<root>/metadata.sqlite``."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self._open: sqlite3.Connection | None = None   # inside transaction(): its connection
        self._pid = -1
        _instances.add(self)
        self._connect()

    def _after_fork_in_child(self) -> None:
        """A fork copies the lock in whatever state another thread held it,
        and the parent's connection: start the child with fresh ones."""
        self._lock = threading.RLock()
        self._conn = self._open = None

    # -- connection ------------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        """The connection of this process (reopened after a fork: SQLite
        connections must not cross processes)."""
        if self._conn is not None and self._pid == os.getpid():
            return self._conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._refuse_emptied()
        try:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            _use_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA cell_size_check = ON")   # damaged pages fail reads instead of reading as empty
            self._conn, self._pid = conn, os.getpid()
            self._migrate(conn)
        except sqlite3.DatabaseError as exc:
            self._conn = None
            raise self._store_error(exc) from exc
        return conn

    def _refuse_emptied(self) -> None:
        """A 0-byte database beside stored objects lost its runs (a copy cut short, a full
        disk): refuse it, or run ids would restart at 1 over the old runs' objects."""
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            if self.path.stat().st_size or (wal.exists() and wal.stat().st_size):
                return
        except FileNotFoundError:
            return  # a new store
        if _holds_objects(self.path.parent / "objects"):
            raise StoreError(f"{self.path} is empty (0 bytes) but the store holds objects of earlier runs: "
                             "its database lost its contents. Restore it from a copy, or move the store "
                             "away to start a new one; it is not reinitialised over the old runs.")

    def _migrate(self, conn: sqlite3.Connection) -> None:
        row = None
        # One read of the table list: two (has schema_info? then: any tables?) could
        # straddle another process's commit of a new store and call it foreign.
        tables = [t[0] for t in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        has_info = "schema_info" in tables
        if has_info:
            row = conn.execute("SELECT value FROM schema_info WHERE key='version'").fetchone()
        if row is not None:
            version = int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the store at {self.path.parent} was written by a newer flowmagic (schema "
                    f"version {version}; this one knows up to {SCHEMA_VERSION}). Upgrade flowmagic, "
                    "or point FLOWMAGIC_HOME at another store.")
            self._add_missing_columns(conn)
            self._add_missing_tables(conn, tables)
            return
        if tables and not has_info:
            raise StoreError(f"{self.path} is a SQLite database but not a flowmagic store "
                             f"(tables: {', '.join(tables)})")
        with self._write(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT OR IGNORE INTO schema_info VALUES ('version', ?)", (str(SCHEMA_VERSION),))

    def _add_missing_columns(self, conn: sqlite3.Connection) -> None:
        """Additive, automatic migration: a store made before a column existed gets it."""
        if not self._missing_columns(conn):
            return
        with self._write(conn):
            for name in self._missing_columns(conn):  # again, inside the lock: another opener may have won
                conn.execute(f"ALTER TABLE runs ADD COLUMN {name} {RUN_ADDED_COLUMNS[name]}")

    def _add_missing_tables(self, conn: sqlite3.Connection, tables: list[str]) -> None:
        missing = [ddl for name, ddl in ADDED_TABLES.items() if name not in tables]
        if not missing:
            return
        with self._write(conn):
            for ddl in missing:   # IF NOT EXISTS: another opener may have won
                conn.execute(ddl)

    @staticmethod
    def _missing_columns(conn: sqlite3.Connection) -> list[str]:
        have = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        return [name for name in RUN_ADDED_COLUMNS if name not in have]

    def _store_error(self, exc: sqlite3.DatabaseError) -> StoreError:
        code = getattr(exc, "sqlite_errorcode", None)
        io_error = code is not None and code & 0xFF == sqlite3.SQLITE_IOERR or "disk I/O error" in str(exc)
        # SQLite often reports a full disk as an I/O error (a failed WAL or shm write)
        full = code == getattr(sqlite3, "SQLITE_FULL", 13)   # the name exists from Python 3.11
        if full or "disk is full" in str(exc) or (io_error and _disk_full(self.path)):
            return StoreError(f"the metadata database {self.path} cannot be written: No space left on device "
                              f"({exc}). Free some space (`flowmagic gc` removes old runs) and try again; "
                              "the store itself is not damaged.")
        if io_error:
            return StoreError(f"the metadata database {self.path} cannot be written: an I/O error ({exc}); "
                              "check the disk (space, permissions, a network file system that went away)")
        return StoreError(f"the metadata database {self.path} cannot be used ({exc}). If the file "
                          "is corrupted, move the store away (it holds your runs) and start a new one.")

    @contextmanager
    def _write(self, conn: sqlite3.Connection | None = None) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (BEGIN IMMEDIATE) so the
        read-then-write sequences inside are atomic across processes."""
        with self._lock:
            if self._open is not None:   # inside transaction(): a savepoint keeps this write whole
                with self._savepoint(self._open) as conn:
                    yield conn
                return
            conn = conn or self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                raise self._store_error(exc) from exc

    @contextmanager
    def _savepoint(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        try:
            conn.execute("SAVEPOINT fm_write")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK TO fm_write")
                conn.execute("RELEASE fm_write")
                raise
            conn.execute("RELEASE fm_write")
        except sqlite3.DatabaseError as exc:
            raise self._store_error(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Every write inside as one commit: the engine records a round of task messages at once (a
        foreach of 100,000 tasks made 300,000 commits). Each write stays whole (a savepoint); what
        was written is committed even when the round ends in an exception (Ctrl-C keeps it)."""
        with self._lock:
            if self._open is not None:
                yield
                return
            conn = self._connect()
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.DatabaseError as exc:
                raise self._store_error(exc) from exc
            self._open = conn
            try:
                yield
            finally:
                self._open = None
                self._end_transaction(conn)

    def _end_transaction(self, conn: sqlite3.Connection) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass
            raise self._store_error(exc) from exc

    def _read(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._connect().execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise self._store_error(exc) from exc

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    # -- runs ------------------------------------------------------------------
    def new_run(self, flow: str, *, params: dict, code: dict[str, str], tags: Sequence[str] = (),
                user: str | None = None, interactive: bool = False, origin_run_id: int | None = None,
                graph: dict | None = None) -> int:
        """Create a running run; return its id (increasing per flow)."""
        now = time.time()
        user = user if user is not None else _current_user()
        owner = this_process()
        with self._write() as conn:
            if origin_run_id is not None and conn.execute(
                    "SELECT 1 FROM runs WHERE flow = ? AND run_id = ?", (flow, origin_run_id)).fetchone() is None:
                # gc removed it between the resume's reading it and now; once this run exists, gc spares it
                raise NotFoundError(f"run {flow}/{origin_run_id} was removed (by gc) while a resume of it was "
                                    "starting; nothing was run: resume another run")
            conn.execute("INSERT OR IGNORE INTO flows (name, next_run_id, created_at) VALUES (?, 1, ?)",
                         (flow, now))
            run_id = conn.execute("SELECT next_run_id FROM flows WHERE name = ?", (flow,)).fetchone()[0]
            conn.execute("UPDATE flows SET next_run_id = ? WHERE name = ?", (run_id + 1, flow))
            conn.execute(
                "INSERT INTO runs (flow, run_id, status, params, code, graph, user, interactive,"
                " origin_run_id, started_at, orchestrator_pid, orchestrator_started, orchestrator_host,"
                " orchestrator_ticks) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (flow, run_id, _json(params), _json(code), _json(graph) if graph is not None else None,
                 user, int(interactive), origin_run_id, now, owner.pid, owner.started, owner.host, owner.ticks))
            conn.executemany("INSERT OR IGNORE INTO run_tags VALUES (?, ?, ?)",
                             [(flow, run_id, str(t)) for t in tags])
        return int(run_id)

    def finish_run(self, flow: str, run_id: int, status: RunStatus) -> None:
        _check(status, RUN_STATUSES, "run status")
        with self._write() as conn:
            n = conn.execute("UPDATE runs SET status = ?, finished_at = ? WHERE flow = ? AND run_id = ?",
                             (status, time.time(), flow, run_id)).rowcount
        if n == 0:
            raise self._missing_run(flow, run_id)

    def set_run_graph(self, flow: str, run_id: int, *, code: dict[str, str] | None = None,
                      graph: dict | None = None) -> None:
        """Update the code/graph of a (session) run whose cells changed."""
        with self._write() as conn:
            if code is not None:
                conn.execute("UPDATE runs SET code = ? WHERE flow = ? AND run_id = ?", (_json(code), flow, run_id))
            if graph is not None:
                conn.execute("UPDATE runs SET graph = ? WHERE flow = ? AND run_id = ?", (_json(graph), flow, run_id))

    # -- which notebook a run came from ---------------------------------------------
    def record_notebook(self, flow: str, run_id: int, notebook: str | None, cell_ids: Sequence[str]) -> None:
        """Remember where the notebook of a run was and its cells' ids (replaces an earlier record)."""
        with self._write() as conn:
            conn.execute("INSERT OR REPLACE INTO notebook_runs VALUES (?, ?, ?, ?, ?)",
                         (flow, run_id, notebook, _json(sorted(set(cell_ids))), time.time()))

    def notebook_records(self) -> list[tuple[str, int, str | None, frozenset[str]]]:
        """Every ``(flow, run_id, notebook path, cell ids)`` recorded, newest first."""
        rows = self._read("SELECT flow, run_id, notebook, cell_ids FROM notebook_runs"
                          " ORDER BY recorded_at DESC, run_id DESC")
        return [(r[0], r[1], r[2], frozenset(json.loads(r[3]))) for r in rows]

    def add_tags(self, flow: str, run_id: int, tags: Sequence[str]) -> None:
        self.get_run(flow, run_id)
        with self._write() as conn:
            conn.executemany("INSERT OR IGNORE INTO run_tags VALUES (?, ?, ?)",
                             [(flow, run_id, str(t)) for t in tags])

    def remove_tags(self, flow: str, run_id: int, tags: Sequence[str]) -> None:
        self.get_run(flow, run_id)
        with self._write() as conn:
            conn.executemany("DELETE FROM run_tags WHERE flow = ? AND run_id = ? AND tag = ?",
                             [(flow, run_id, str(t)) for t in tags])

    # -- tasks -----------------------------------------------------------------
    def new_task(self, flow: str, run_id: int, step: str, *, index: tuple[int, ...] | None = None,
                 item: str | None = None) -> int:
        """Create a pending task; task ids are unique in the whole store."""
        (task_id,) = self.new_tasks(flow, run_id, step, [(index, item)])
        return task_id

    def new_tasks(self, flow: str, run_id: int, step: str,
                  items: Sequence[tuple[tuple[int, ...] | None, str | None]]) -> list[int]:
        """Create the pending tasks of a step, ``(index, item)`` each, in one
        transaction (a foreach of 100,000 tasks is one commit, not 100,000)."""
        now = time.time()
        with self._write() as conn:
            return [int(conn.execute(
                "INSERT INTO tasks (flow, run_id, step, foreach_index, item, state, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                (flow, run_id, step, _json(list(index)) if index is not None else None, item, now, now)).lastrowid)
                for index, item in items]

    def set_task_state(self, task_id: int, state: TaskState) -> None:
        _check(state, TASK_STATES, "task state")
        with self._write() as conn:
            _update_task_state(conn, task_id, state, time.time())

    def start_attempt(self, task_id: int, attempt: int, started_at: float | None = None) -> None:
        """The task is running ``attempt``: its state and the attempt's start, in one transaction,
        so its output so far (:meth:`write_live_logs`) has an attempt to belong to."""
        now = time.time()
        with self._write() as conn:
            _update_task_state(conn, task_id, "running", now)
            conn.execute("INSERT OR REPLACE INTO running_attempts VALUES (?, ?, ?)",
                         (task_id, attempt, started_at if started_at is not None else now))

    def write_live_logs(self, writes: Sequence[LiveLogWrite]) -> None:
        """Running attempts' output so far, every task's in one transaction (one flush):
        each write puts ``(seq, text)`` chunks of one stream and deletes chunks by seq."""
        if not writes:
            return
        with self._write() as conn:
            for w in writes:
                conn.executemany("INSERT OR REPLACE INTO live_log_chunks VALUES (?, ?, ?, ?, ?)",
                                 [(w.task_id, w.attempt, w.stream, seq, text) for seq, text in w.chunks])
                conn.executemany("DELETE FROM live_log_chunks WHERE task_id = ? AND attempt = ? AND stream = ?"
                                 " AND seq = ?", [(w.task_id, w.attempt, w.stream, seq) for seq in w.deleted])

    def _live_log(self, task_id: int, attempt: int, stream: str) -> str:
        rows = self._read("SELECT text FROM live_log_chunks WHERE task_id = ? AND attempt = ? AND stream = ?"
                          " ORDER BY seq", (task_id, attempt, stream))
        return "".join(r[0] for r in rows)

    def record_attempt(self, task_id: int, attempt: int, *, outcome: Outcome, started_at: float | None,
                       finished_at: float | None, exit_code: int | None = None, signal: int | None = None,
                       exception: dict | None = None, stdout: str = "", stderr: str = "",
                       artifacts: Sequence[ArtifactRef] = (), outputs: Sequence[dict] = ()) -> None:
        """Record one attempt of a task with its logs, exception and artifacts
        (from the task's manifest). Recording the same attempt again replaces it."""
        _check(outcome, OUTCOMES, "attempt outcome")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is None:
                raise NotFoundError(f"task {task_id} does not exist")
            conn.execute("DELETE FROM artifacts WHERE task_id = ? AND attempt = ?", (task_id, attempt))
            # the final (capped) logs replace the output written while it ran
            for table in ("live_log_chunks", "running_attempts"):
                conn.execute(f"DELETE FROM {table} WHERE task_id = ? AND attempt = ?", (task_id, attempt))
            conn.execute(
                "INSERT OR REPLACE INTO attempts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (task_id, attempt, outcome, started_at, finished_at, exit_code, signal,
                 _json(exception) if exception is not None else None, stdout or "", stderr or "",
                 _json(list(outputs))))
            conn.executemany(
                "INSERT INTO artifacts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(task_id, attempt, r.name, r.type, r.size, r.hash, r.serializer, r.inline)
                 for r in (_as_ref(a) for a in artifacts)])
            conn.execute("UPDATE tasks SET updated_at = ? WHERE task_id = ?", (time.time(), task_id))

    def clone_task(self, task_id: int, run_id: int, state: TaskState = "cloned") -> int:
        """Copy a task into run ``run_id`` of the same flow (resume, step
        cache): same step, index, logs and artifacts (objects shared by hash)."""
        _check(state, TASK_STATES, "task state")
        now = time.time()
        with self._write() as conn:
            row = conn.execute("SELECT flow, step, foreach_index, item FROM tasks WHERE task_id = ?",
                               (task_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"task {task_id} does not exist, so it cannot be cloned")
            flow, step, index, item = row
            new_id = conn.execute(
                "INSERT INTO tasks (flow, run_id, step, foreach_index, item, state, origin_task_id,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (flow, run_id, step, index, item, state, task_id, now, now)).lastrowid
            last = conn.execute("SELECT MAX(attempt) FROM attempts WHERE task_id = ?", (task_id,)).fetchone()[0]
            if last is not None:
                conn.execute("INSERT INTO attempts SELECT ?, 0, outcome, started_at, finished_at, exit_code,"
                             " signal, exception, stdout, stderr, outputs FROM attempts"
                             " WHERE task_id = ? AND attempt = ?", (new_id, task_id, last))
                conn.execute("INSERT INTO artifacts SELECT ?, 0, name, type, size, hash, serializer, inline"
                             " FROM artifacts WHERE task_id = ? AND attempt = ?", (new_id, task_id, last))
        return int(new_id)

    def delete_runs(self, flow: str, run_ids: Sequence[int]) -> list[int]:
        """Remove runs with their tasks, attempts, logs and artifact records
        (gc only; objects are gc's business). Run ids are not reused.

        Live runs and the origins of live runs (a resume clones from its
        origin) are spared, decided inside the same write transaction that a
        new run is created in, so a starting resume and gc cannot interleave
        badly. Returns the ids removed."""
        removed = []
        with self._write() as conn:
            pinned = self._live_runs_and_origins(conn, flow)
            for run_id in run_ids:
                if int(run_id) in pinned:
                    continue
                removed.append(int(run_id))
                tasks = "SELECT task_id FROM tasks WHERE flow = ? AND run_id = ?"
                conn.execute(f"DELETE FROM artifacts WHERE task_id IN ({tasks})", (flow, run_id))
                for table in ("attempts", "running_attempts", "live_log_chunks"):
                    conn.execute(f"DELETE FROM {table} WHERE task_id IN ({tasks})", (flow, run_id))
                conn.execute("DELETE FROM tasks WHERE flow = ? AND run_id = ?", (flow, run_id))
                conn.execute("DELETE FROM run_tags WHERE flow = ? AND run_id = ?", (flow, run_id))
                conn.execute("DELETE FROM notebook_runs WHERE flow = ? AND run_id = ?", (flow, run_id))
                conn.execute("DELETE FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id))
                # a shared store still holds the run's documents: refresh must not bring it back
                conn.execute("INSERT OR REPLACE INTO replica_runs VALUES (?, ?, ?)", (flow, run_id, DELETED_REPLICA))
        return removed

    @staticmethod
    def _live_runs_and_origins(conn: sqlite3.Connection, flow: str) -> set[int]:
        # a partial session run of a kernel that still lives gets more steps: spare it too
        pinned = set()
        for run_id, origin, *owner in conn.execute(
                "SELECT run_id, origin_run_id, orchestrator_pid, orchestrator_started, orchestrator_host,"
                " orchestrator_ticks FROM runs WHERE flow = ? AND status IN ('running', 'partial')", (flow,)):
            if not orchestrator_gone(*owner):
                pinned.add(int(run_id))
                if origin is not None:
                    pinned.add(int(origin))
        return pinned

    def referenced_objects(self, exclude_runs: Sequence[tuple[str, int]] = ()) -> set[str]:
        """Every object key a recorded artifact or stored output refers to
        (ignoring the runs in ``exclude_runs``: what gc would delete)."""
        excluded = {(f, int(r)) for f, r in exclude_runs}
        keys = set()
        for key, flow, run_id in self._read(
                "SELECT a.hash, t.flow, t.run_id FROM artifacts a JOIN tasks t ON a.task_id = t.task_id"
                " WHERE a.serializer NOT IN ('inline', 'unsaved')"):
            if (flow, run_id) not in excluded:
                keys.add(key)
        for outputs, flow, run_id in self._read(
                "SELECT a.outputs, t.flow, t.run_id FROM attempts a JOIN tasks t ON a.task_id = t.task_id"
                " WHERE a.outputs != '[]'"):
            if (flow, run_id) not in excluded:
                keys.update(_OBJECT_KEY_RE.findall(outputs))  # any key-shaped string: conservative
        return keys

    def artifact_locations(self) -> list[tuple[str, str, int, str, int, str]]:
        """``(object, flow, run_id, step, task_id, name)`` of every artifact stored as an object."""
        return self._read(
            "SELECT a.hash, t.flow, t.run_id, t.step, t.task_id, a.name FROM artifacts a"
            " JOIN tasks t ON a.task_id = t.task_id WHERE a.serializer NOT IN ('inline', 'unsaved')"
            " ORDER BY t.flow, t.run_id, t.task_id, a.name")

    def integrity_check(self) -> list[str]:
        """SQLite's own check of the database file: ``["ok"]`` when sound."""
        return [r[0] for r in self._read("PRAGMA integrity_check")]

    # -- read side ---------------------------------------------------------------
    def list_flows(self) -> list[str]:
        return [r[0] for r in self._read("SELECT name FROM flows ORDER BY name")]

    def list_runs(self, flow: str, tag: str | None = None) -> list[RunRecord]:
        """Runs of ``flow``, newest first; with ``tag``, only runs carrying it."""
        sql = f"SELECT {RUN_COLUMNS} FROM runs WHERE flow = ?"
        args: list[Any] = [flow]
        if tag is not None:
            sql += " AND run_id IN (SELECT run_id FROM run_tags WHERE flow = ? AND tag = ?)"
            args += [flow, tag]
        rows = self._read(sql + " ORDER BY run_id DESC", args)
        tags = self._tags_by_run(flow)
        return [_honest(run_record(r, tags.get(r[1], ()))) for r in rows]

    def get_run(self, flow: str, run_id: int) -> RunRecord:
        if not _SQLITE_INT[0] <= int(run_id) <= _SQLITE_INT[1]:  # sqlite3 raises OverflowError: no such run
            raise self._missing_run(flow, run_id)
        rows = self._read(f"SELECT {RUN_COLUMNS} FROM runs WHERE flow = ? AND run_id = ?", (flow, int(run_id)))
        if not rows:
            raise self._missing_run(flow, run_id)
        tags = self._read("SELECT tag FROM run_tags WHERE flow = ? AND run_id = ? ORDER BY tag", (flow, run_id))
        return _honest(run_record(rows[0], tuple(t[0] for t in tags)))

    def tasks(self, flow: str, run_id: int, step: str | None = None) -> list[TaskRecord]:
        """Tasks of a run (of one step), in creation order."""
        sql = f"SELECT {TASK_COLUMNS} FROM tasks WHERE flow = ? AND run_id = ?"
        args: list[Any] = [flow, run_id]
        if step is not None:
            sql += " AND step = ?"
            args.append(step)
        return self._honest_tasks([task_record(r) for r in self._read(sql + " ORDER BY task_id", args)])

    def latest_tasks(self, flow: str, run_id: int, step: str, page: int = 5_000) -> Iterator[TaskRecord]:
        """The tasks of the step's latest execution in the run (schema.latest_generation), in creation
        order, read a page at a time as they are used: a 100,000-task step is never a list of records."""
        where = "flow = ? AND run_id = ? AND step = ?"
        # a generation starts with its first index (all zeros) or its only task (no index)
        first = self._read(f"SELECT MAX(task_id) FROM tasks WHERE {where} AND (foreach_index IS NULL"
                           " OR foreach_index NOT GLOB '*[1-9]*')", (flow, run_id, step))[0][0]
        if first is None:
            first = self._read(f"SELECT MIN(task_id) FROM tasks WHERE {where}", (flow, run_id, step))[0][0]
        after = (first or 0) - 1
        while True:
            rows = self._read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE {where} AND task_id > ?"
                              " ORDER BY task_id LIMIT ?", (flow, run_id, step, after, page))
            yield from self._honest_tasks([task_record(r) for r in rows])
            if len(rows) < page:
                return
            after = rows[-1][0]

    def step_names(self, flow: str, run_id: int) -> list[str]:
        """Steps that have tasks in the run, in the order of their first task."""
        rows = self._read("SELECT step, MIN(task_id) AS first FROM tasks WHERE flow = ? AND run_id = ?"
                          " GROUP BY step ORDER BY first", (flow, run_id))
        return [r[0] for r in rows]

    def get_task(self, task_id: int) -> TaskRecord:
        rows = self._read(f"SELECT {TASK_COLUMNS} FROM tasks WHERE task_id = ?", (task_id,))
        if not rows:
            raise NotFoundError(f"task {task_id} does not exist")
        return self._honest_tasks([task_record(rows[0])])[0]

    def _honest_tasks(self, tasks: list[TaskRecord]) -> list[TaskRecord]:
        """Unfinished tasks of a crashed run read as ``crashed``: nobody will finish them.
        The run is looked up (and its orchestrator checked) only when one is unfinished."""
        runs: dict[tuple[str, int], bool] = {}
        out = []
        for task in tasks:
            if task.state not in TASK_TERMINAL:
                key = (task.flow, task.run_id)
                if key not in runs:
                    runs[key] = self._run_crashed(*key)
                if runs[key]:
                    task = replace(task, state="crashed")
            out.append(task)
        return out

    def _run_crashed(self, flow: str, run_id: int) -> bool:
        rows = self._read("SELECT status, orchestrator_pid, orchestrator_started, orchestrator_host,"
                          " orchestrator_ticks FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id))
        return bool(rows) and rows[0][0] == "running" and orchestrator_gone(*rows[0][1:])

    def attempts(self, task_id: int, unfinished: bool = False) -> list[AttemptRecord]:
        """The task's recorded (finished) attempts, first to last; with ``unfinished``, also
        an attempt that started and has no end record (running, or its orchestrator died):
        ``outcome="running"``, ``complete=False``, its output so far."""
        rows = self._read("SELECT * FROM attempts WHERE task_id = ? ORDER BY attempt", (task_id,))
        done = [AttemptRecord(r[0], r[1], r[2], r[3], r[4], r[5], r[6],
                              json.loads(r[7]) if r[7] else None, r[8], r[9], json.loads(r[10]))
                for r in rows]
        if not unfinished:
            return done
        finished = {a.attempt for a in done}
        started = self._read("SELECT attempt, started_at FROM running_attempts WHERE task_id = ? ORDER BY attempt",
                             (task_id,))
        live = [AttemptRecord(task_id, n, "running", at, None, None, None, None,
                              self._live_log(task_id, n, "stdout"), self._live_log(task_id, n, "stderr"), [],
                              complete=False)
                for n, at in started if n not in finished]
        return sorted(done + live, key=lambda a: a.attempt)

    def artifacts(self, task_id: int) -> list[ArtifactRef]:
        """Artifacts of the task's visible (last recorded) attempt, by name."""
        return self.artifacts_of([task_id])[task_id]

    def artifacts_of(self, task_ids: Sequence[int]) -> dict[int, list[ArtifactRef]]:
        """:meth:`artifacts` of many tasks, a few queries (a join reads 100,000 tasks' refs)."""
        found: dict[int, list[ArtifactRef]] = {task_id: [] for task_id in task_ids}
        ids = list(found)
        for start in range(0, len(ids), 500):   # SQLite's limit on ? parameters
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._read(
                "SELECT a.task_id, a.name, a.type, a.size, a.hash, a.serializer, a.inline FROM artifacts a JOIN"
                f" (SELECT task_id, MAX(attempt) AS last FROM attempts WHERE task_id IN ({marks}) GROUP BY task_id) v"
                " ON a.task_id = v.task_id AND a.attempt = v.last ORDER BY a.task_id, a.name", chunk)
            for task_id, *ref in rows:
                found[task_id].append(ArtifactRef(*ref))
        return found

    def publish(self) -> None:
        """Publish what changed to a shared store (replica.PublishingMetadata); nothing here."""

    # -- replicas (store/replica.py): a run as JSON documents, and back ------------------
    def export_run(self, flow: str, run_id: int, task_ids: Sequence[int] | None = None) -> tuple[dict, list[dict]]:
        """The run's row, tags and task list, and the documents of its tasks
        (``task_ids``: only those), as plain JSON-able dicts of table rows."""
        with self._lock:
            conn = self._connect()
            run = _rows(conn, "SELECT * FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id))
            if not run:
                raise self._missing_run(flow, run_id)
            tasks = _rows(conn, "SELECT * FROM tasks WHERE flow = ? AND run_id = ? ORDER BY task_id", (flow, run_id))
            tags = [r[0] for r in conn.execute("SELECT tag FROM run_tags WHERE flow = ? AND run_id = ? ORDER BY tag",
                                               (flow, run_id))]
            wanted = {t["task_id"] for t in tasks} if task_ids is None else set(task_ids)
            docs = [{"task": t,
                     "attempts": _rows(conn, "SELECT * FROM attempts WHERE task_id = ? ORDER BY attempt",
                                       (t["task_id"],)),
                     "artifacts": _rows(conn, "SELECT * FROM artifacts WHERE task_id = ?", (t["task_id"],))}
                    for t in tasks if t["task_id"] in wanted]
        run_doc = {"format": 1, "run": run[0], "tags": tags,
                   "tasks": {str(t["task_id"]): t["updated_at"] for t in tasks}}
        return run_doc, docs

    def replica_version(self, flow: str, run_id: int) -> str | None:
        """The version a replicated run was imported at; "" for a run recorded here; None if unknown here."""
        rows = self._read("SELECT version FROM replica_runs WHERE flow = ? AND run_id = ?", (flow, run_id))
        if rows:
            return rows[0][0]
        return "" if self._read("SELECT 1 FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id)) else None

    def replica_task_versions(self, flow: str, run_id: int) -> dict[str, float]:
        rows = self._read("SELECT task_id, updated_at FROM tasks WHERE flow = ? AND run_id = ?", (flow, run_id))
        return {str(r[0]): r[1] for r in rows}

    def import_run(self, run_doc: dict, task_docs: Sequence[dict], version: str) -> None:
        """Import a run published by another store's orchestrator (one transaction).
        A run recorded here, or a task id used here by another run, is refused."""
        run = run_doc["run"]
        flow, run_id = run["flow"], run["run_id"]
        with self._write() as conn:
            here = conn.execute("SELECT 1 FROM runs WHERE flow = ? AND run_id = ?", (flow, run_id)).fetchone()
            replica = conn.execute("SELECT 1 FROM replica_runs WHERE flow = ? AND run_id = ?",
                                   (flow, run_id)).fetchone()
            if here and not replica:
                raise StoreError(f"run {flow}/{run_id} in the shared store clashes with a run recorded in "
                                 f"{self.path.parent}: one FLOWMAGIC_HOME writes to a shared store, others read")
            for doc in task_docs:
                task = doc["task"]
                owner = conn.execute("SELECT flow, run_id FROM tasks WHERE task_id = ?", (task["task_id"],)).fetchone()
                if owner is not None and tuple(owner) != (flow, run_id):
                    raise StoreError(f"task {task['task_id']} of {flow}/{run_id} in the shared store clashes "
                                     f"with a task of {owner[0]}/{owner[1]} in {self.path.parent}; read a shared "
                                     "store from a FLOWMAGIC_HOME that runs nothing itself")
            conn.execute("INSERT OR IGNORE INTO flows (name, next_run_id, created_at) VALUES (?, 1, ?)",
                         (flow, run["started_at"]))
            conn.execute("UPDATE flows SET next_run_id = MAX(next_run_id, ?) WHERE name = ?", (run_id + 1, flow))
            _upsert(conn, "runs", run)
            conn.execute("DELETE FROM run_tags WHERE flow = ? AND run_id = ?", (flow, run_id))
            conn.executemany("INSERT INTO run_tags VALUES (?, ?, ?)", [(flow, run_id, t) for t in run_doc["tags"]])
            keep = {int(i) for i in run_doc["tasks"]}
            for (old,) in conn.execute("SELECT task_id FROM tasks WHERE flow = ? AND run_id = ?",
                                       (flow, run_id)).fetchall():
                if old not in keep:
                    _delete_task(conn, old)
            for doc in task_docs:
                task_id = doc["task"]["task_id"]
                _delete_task(conn, task_id)
                _upsert(conn, "tasks", doc["task"])
                for row in doc["attempts"]:
                    _upsert(conn, "attempts", row)
                for row in doc["artifacts"]:
                    _upsert(conn, "artifacts", row)
            conn.execute("INSERT OR REPLACE INTO replica_runs VALUES (?, ?, ?)", (flow, run_id, version))

    def _tags_by_run(self, flow: str) -> dict[int, tuple[str, ...]]:
        out: dict[int, list[str]] = {}
        for run_id, tag in self._read("SELECT run_id, tag FROM run_tags WHERE flow = ? ORDER BY tag", (flow,)):
            out.setdefault(run_id, []).append(tag)
        return {k: tuple(v) for k, v in out.items()}

    def _missing_run(self, flow: str, run_id: int) -> NotFoundError:
        if flow not in self.list_flows():
            flows = self.list_flows()
            return NotFoundError(f"flow '{flow}' has no runs in the store at {self.path.parent}; flows there: "
                                 f"{', '.join(flows) if flows else '(none)'}")
        ids = [r[0] for r in self._read("SELECT run_id FROM runs WHERE flow = ? ORDER BY run_id DESC", (flow,))]
        shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
        return NotFoundError(f"run {flow}/{run_id} does not exist; runs of {flow}: {shown or '(none)'}")


_instances: weakref.WeakSet[Metadata] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for meta in list(_instances):
        meta._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)



def _holds_objects(objects: Path) -> bool:
    """Whether any object file is stored (tmp/ and quarantine/ aside); stops at the first."""
    try:
        shards = [d for d in objects.iterdir() if d.is_dir() and d.name not in ("tmp", "quarantine")]
    except OSError:
        return False
    return any(any(True for _ in shard.iterdir()) for shard in shards)


_SQLITE_INT = (-(1 << 63), (1 << 63) - 1)


def _honest(run: RunRecord) -> RunRecord:
    """A run still marked running whose orchestrator is gone is shown as crashed."""
    if run.status == "running" and orchestrator_gone(run.orchestrator_pid, run.orchestrator_started,
                                                     run.orchestrator_host, run.orchestrator_ticks):
        return replace(run, status="crashed")
    return run


def _rows(conn: sqlite3.Connection, sql: str, args: Sequence[Any]) -> list[dict]:
    cur = conn.execute(sql, args)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, r)) for r in cur.fetchall()]


DELETED_REPLICA = "deleted"   # replica_runs.version of a run gc removed here

_COLUMN_RE = re.compile(r"^[a-z_]+$")


def _upsert(conn: sqlite3.Connection, table: str, row: dict) -> None:
    """INSERT OR REPLACE a row given as a dict (a published document's columns, checked to be names)."""
    have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
    cols = [c for c in row if c in have and _COLUMN_RE.match(c)]   # a newer writer's extra columns are dropped
    conn.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                 [row[c] for c in cols])


def _update_task_state(conn: sqlite3.Connection, task_id: int, state: str, now: float) -> None:
    if conn.execute("UPDATE tasks SET state = ?, updated_at = ? WHERE task_id = ?",
                    (state, now, task_id)).rowcount == 0:
        raise NotFoundError(f"task {task_id} does not exist")


def _delete_task(conn: sqlite3.Connection, task_id: int) -> None:
    for table in ("artifacts", "attempts", "tasks"):
        conn.execute(f"DELETE FROM {table} WHERE task_id = ?", (task_id,))


def _as_ref(a: ArtifactRef | dict) -> ArtifactRef:
    return a if isinstance(a, ArtifactRef) else ArtifactRef.from_dict(a)


def _json(value: Any) -> str:
    return json.dumps(value, default=repr, separators=(",", ":"))


def _check(value: str, allowed: tuple[str, ...], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} '{value}' (expected one of: {', '.join(allowed)})")


def _disk_full(path: Path) -> bool:
    """Less than 1 MiB left for us on the file system holding ``path``."""
    try:
        st = os.statvfs(path.parent)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)


def _current_user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return None
