"""``%%step``, ``%%params`` and ``%flow``: the notebook's face of the engine.

A thin layer: it keeps the kernel's flow definition (:mod:`flowmagic.magics.session`),
calls the scheduler, streams its events into the cell and binds a step's
outputs into the namespace. Every error a user can cause is shown as one
clear message (never a traceback of this module); a failing step shows its
own traceback, with the cell's line numbers, and makes the cell an error so
Run All stops there.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from flowmagic.errors import FlowDefinitionError
from flowmagic.magics.session import DEFAULT_FLOW_NAME, KernelFlowDefinition, SessionRun, notebook_path
from flowmagic.magics import identity, output
from flowmagic.magics.identity import SavedNotebookWatch
from flowmagic.magics.markers import StaleMarkers


@magics_class
class FlowMagics(Magics):
    """The magics, and the kernel-side state they share."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.definition = KernelFlowDefinition()
        self.session: SessionRun | None = None
        self._current: tuple[str, str | None, int | None] | None = None  # raw, cell id, In[n]
        self._stores: dict[Path, Any] = {}
        self.view: Any = None          # the session run's live DAG view, once shown
        self._graph: tuple[tuple, Any] | None = None   # (flow name + sources, FlowGraph)
        self.saved = SavedNotebookWatch()
        self._identity: tuple[Any, str] | None = None   # (what it was decided from, flow name)
        self._recorded: dict[tuple[str, int], tuple] = {}   # what record_notebook last wrote per run
        self._warned_unnamed = False
        self.loaded_run: tuple[str, int] | None = None   # `%flow load`: the next session run starts from it
        self.markers = StaleMarkers()   # the stale marker atop each step cell's output

    # -- shell events: which cells the kernel executed --------------------
    def pre_run_cell(self, info: Any) -> None:
        self._current = (info.raw_cell, getattr(info, "cell_id", None), running_count(self.shell))

    def post_run_cell(self, result: Any) -> None:
        info = result.info
        if info is None or result.error_before_exec is not None or result.error_in_exec is not None:
            return
        self.record_ordinary(info.raw_cell, getattr(info, "cell_id", None), result.execution_count)
        if self.session is not None and self.session.inputs:
            from flowmagic.magics import staleness

            staleness.after_ordinary_cell(self)   # an edited def/import/constant: the steps using it are stale

    def record_ordinary(self, raw: str, cell_id: str | None, count: int | None) -> None:
        """Keep an ordinary cell that ran (its imports/defs feed the prelude)."""
        first = raw.lstrip().split(None, 1)[:1]
        if not first or first[0] in ("%%step", "%%params"):
            return   # the magics record these themselves, even when they fail
        try:
            self.definition.record(raw, cell_id=cell_id, execution_count=count)
        except FlowDefinitionError:
            pass

    def backfill(self, history: list[str]) -> None:
        """Cells executed before ``%load_ext flowmagic`` still count."""
        for number, raw in enumerate(history, start=1):
            # a flowmagic magic there could not run yet (it was not loaded): skip it
            if raw.strip() and "%flow" not in raw and "%%step" not in raw and "%%params" not in raw:
                self.record_ordinary(raw, None, number)

    # -- where, what --------------------------------------------------------
    def notebook(self) -> Path | None:
        return notebook_path(os.environ, self.shell.user_ns)

    def flow_name(self) -> str:
        """`%flow name`, else the flow earlier runs of this notebook recorded
        (it may have been renamed since), else its file name, else NotebookFlow."""
        explicit = self.definition.explicit_name()
        if explicit:
            return explicit
        notebook = self.notebook()
        if notebook is None and self._identity is not None and self._identity[0][0] is None \
                and self._identity[1] != DEFAULT_FLOW_NAME:
            return self._identity[1]   # a kernel without a path found its notebook once: it stays
        # decided once per notebook path; without one, again as executed cells tell more
        basis = (notebook, None) if notebook else (None, (frozenset(self.definition.cell_ids()),
                                                          frozenset(self.definition.executed_flow_sources())))
        if self._identity is None or self._identity[0] != basis:
            name, note = identity.decide(self.definition, notebook, self._existing_store_meta())
            if note:
                print(f"[flowmagic] {note}")
            self._identity = (basis, name)
        return self._identity[1]

    def _existing_store_meta(self) -> Any:
        """The store's metadata when the store exists (reading must not create one)."""
        from flowmagic.store.paths import store_root_for

        root = store_root_for(self.notebook())
        return self.store().meta if (root / "metadata.sqlite").exists() else None

    def warn_if_unnamed(self) -> None:
        """Runs under the shared default name would mix notebooks: say so, once."""
        if self._warned_unnamed or self.flow_name() != DEFAULT_FLOW_NAME:
            return
        self._warned_unnamed = True
        print(f"[flowmagic] warning: this kernel does not know its notebook file (nbclient, nbconvert and "
              f"papermill do not say), so its runs go to the shared flow {DEFAULT_FLOW_NAME}: "
              "name this notebook's flow with %flow name NAME", file=sys.stderr)

    def record_notebook(self, flow: str, run_id: int | None) -> None:
        """Remember, with the run, where this notebook is and its cells' ids."""
        if run_id is None:
            return
        notebook = self.notebook()
        where = str(notebook.absolute()) if notebook is not None else None
        record = (where, frozenset(self.definition.cell_ids()))
        if self._recorded.get((flow, run_id)) == record:
            return
        try:
            self.store().meta.record_notebook(flow, run_id, where, sorted(record[1]))
            self._recorded[(flow, run_id)] = record
        except Exception as exc:  # noqa: BLE001 - the run itself is recorded; only its identity is not
            print(f"[flowmagic] warning: could not record this notebook with run {flow}/{run_id}: {exc}",
                  file=sys.stderr)

    def follow_saved_notebook(self) -> None:
        """Bring the flow in step with the saved notebook, when it changed on disk."""
        left = self.saved.follow(self.definition, self.notebook())
        for step in left:
            if self.session is not None:
                self.session.forget([step])
            self.markers.forget(step)
            print(f"[flowmagic] step '{step}' left the flow: its cell is no longer in the saved notebook")

    def store(self) -> Any:
        from flowmagic.store import open_store
        from flowmagic.store.paths import store_root_for

        root = store_root_for(self.notebook())
        if root not in self._stores:
            self._stores[root] = open_store(root)
            self._point_client_at(root)
        return self._stores[root]

    @staticmethod
    def _point_client_at(root: Path) -> None:
        """`Flow("X")` in a cell must read the store the magics write, even when
        the kernel's cwd is not the notebook's folder (VS Code)."""
        from flowmagic.store.paths import store_root

        if store_root() != root.absolute():
            from flowmagic.client import namespace_root

            namespace_root(root)

    def graph(self) -> Any:
        """The kernel's flow; rebuilt only when an executed or saved cell changed it."""
        self.follow_saved_notebook()
        key = (self.flow_name(), tuple(self.definition.sources()))
        if self._graph is None or self._graph[0] != key:
            try:
                self._graph = (key, self.definition.build(key[0]))
            finally:
                for note in self.definition.notes:
                    print(f"[flowmagic] note: {note}")
                self.definition.notes.clear()
        return self._graph[1]

    def client_run(self, flow: str, run_id: int) -> Any:
        """The run as the Client API shows it (what `r = %flow run` binds)."""
        from flowmagic.client import Run

        return Run(f"{flow}/{run_id}", root=self.store().root)

    def _cell_text(self, magic: str, line: str, cell: str) -> tuple[str, str | None, int | None]:
        """The executing cell's raw text and id (rebuilt when called from code)."""
        if self._current is not None:
            raw, cell_id, count = self._current
            first = raw.lstrip().split("\n", 1)[0].strip()
            if first.startswith(magic) and first[len(magic):].strip() == line.strip():
                return raw, cell_id, count
        return f"{magic} {line}\n{cell}".replace(f"{magic} \n", f"{magic}\n"), None, None

    # -- %%step ------------------------------------------------------------
    @cell_magic
    def step(self, line: str, cell: str) -> Any:
        """Run this cell as step NAME of the notebook's session run.

        %%step NAME [--retry [N]] [--timeout S] [--foreach VAR] [--catch VAR]
                    [--pypi SPEC] [--conda SPEC] [--cache] [--memory MB]
        """
        from flowmagic.magics import steps as _magic_steps

        return output.guarded(lambda: _magic_steps.run_step_cell(self, line, cell))

    # -- %%params ----------------------------------------------------------
    @cell_magic
    def params(self, line: str, cell: str) -> None:
        """Declare the flow's parameters and bind their defaults.

        name = literal   # help text
        name = Parameter("name", default=..., help="...", type=...)
        """
        from flowmagic.magics import steps as _magic_steps

        return output.guarded(lambda: _magic_steps.define_params(self, line, cell))

    # -- %flow -------------------------------------------------------------
    @line_magic
    def flow(self, line: str) -> Any:
        """The console command's sub-commands on the kernel's flow.

        %flow show | run [--PARAM V] [--max-workers N] [--tag T] | resume [RUN] [--from STEP] | load [RUN]
              | status | dump RUN[/STEP[/TASK]] | tag add|remove|list RUN [TAG...]
              | logs RUN/STEP[/TASK] | new | name NAME | export [-o FILE] | forget STEP
        Add --help to any of them.
        """
        from flowmagic.magics import dispatch as _magic_flow

        return output.guarded(lambda: _magic_flow.flow_command(self, line))


def running_count(shell: Any) -> int | None:
    """The ``In [n]`` of the cell now executing, seen from ``pre_run_cell``.

    IPython 9 adds one to ``execution_count`` before ``pre_run_cell``, IPython
    8 after the cell ran; both store the cell's input after ``pre_run_cell``,
    so the input history (``''`` first) then holds exactly n entries.
    """
    history = getattr(shell.history_manager, "input_hist_raw", None) if shell.history_manager else None
    return len(history) if history else shell.execution_count


def load(shell: Any) -> FlowMagics:
    """Register the magics and the shell hooks on ``shell`` (idempotent)."""
    existing = getattr(shell, "_flowmagic", None)
    if existing is not None:
        return existing
    magics = FlowMagics(shell)
    shell.register_magics(magics)
    shell.events.register("pre_run_cell", magics.pre_run_cell)
    shell.events.register("post_run_cell", magics.post_run_cell)
    history = list(getattr(shell.history_manager, "input_hist_raw", [])[1:-1]) if shell.history_manager else []
    magics.backfill(history)
    shell._flowmagic = magics
    magics.follow_saved_notebook()   # after a restart: the saved notebook's steps, not executed yet
    if magics.notebook() is not None:
        magics.flow_name()   # says so now when the notebook continues a flow of another name
    keep_a_warm_server()
    return magics


def keep_a_warm_server() -> None:
    """Every fork server of this kernel makes the IPython shell before it forks
    (steps in a notebook show values more often than not), and a base server
    that did starts now: each prelude's server (the first, and a new one after
    every edit of an ordinary cell) is forked from it, so no step waits for an
    interpreter and its imports (~0.25 s; numpy/pandas follow once the flow is
    known). Only one: an idle spare costs memory."""
    try:
        from flowmagic.runtime.worker.forkpool import preload_in_every_server, start_base
        from flowmagic.runtime.worker.forkserver import KERNEL_PRELOAD

        preload_in_every_server(KERNEL_PRELOAD)
        start_base()
    except Exception:  # an optimisation only: a step starts its own server anyway
        pass


def unload(shell: Any) -> None:
    magics = getattr(shell, "_flowmagic", None)
    if magics is None:
        return
    for event, callback in (("pre_run_cell", magics.pre_run_cell), ("post_run_cell", magics.post_run_cell)):
        try:
            shell.events.unregister(event, callback)
        except ValueError:
            pass
    del shell._flowmagic
