"""The IPython shell a task process runs magics and formats values with.

Importing this module imports IPython (~0.25 s without its terminal parts):
:mod:`flowmagic.runtime.worker.execute` loads it only for a cell that needs it
(``%magics``, ``!cmd``, a value to show, ``display()``), or the fork server
loads it before forking when the flow's code shows it will
(:func:`flowmagic.runtime.worker.forkserver.flow_preload`), so tasks inherit a
ready shell.
"""
from __future__ import annotations

import builtins
import os
import subprocess
import sys
from typing import Any

from IPython.core.displaypub import DisplayPublisher
from IPython.core.formatters import DisplayFormatter
from IPython.core.interactiveshell import InteractiveShell
from traitlets import Type
from traitlets.config import Config

from flowmagic.runtime.worker.execute import (
    _flush_std_streams, _is_figure, execute_cell, format_error,
)
from flowmagic.runtime.worker.ipython_compat import NamespaceModule
from flowmagic.store.outputs import OutputLimits

#: figures drawing more points than this get no SVG form (big and slow to render)
SVG_MAX_POINTS = 5000


class CapturingDisplayPublisher(DisplayPublisher):
    """Sends ``display()`` data to the running cell's capture (dropped between cells)."""

    def publish(self, data, metadata=None, source=None, *, transient=None, update=False, **kwargs) -> None:
        capture = getattr(self.shell, "capture", None)
        if capture is not None:
            capture.publish("update_display" if update else "display", data, metadata, transient)

    def clear_output(self, wait: bool = False) -> None:
        """Outputs are a record; clearing them would lose it."""


class FigureFormatter(DisplayFormatter):
    """Formats matplotlib figures ourselves: PNG always, SVG only when small.

    Doing it here (not through the registered figure formatters) keeps the
    choice stable whichever backend the step selects.
    """

    def format(self, obj, include=None, exclude=None):
        if _is_figure(obj):
            return _figure_bundle(obj, self.parent)
        return super().format(obj, include=include, exclude=exclude)


class TaskShell(InteractiveShell):
    """An InteractiveShell for task processes: captured display, fd-level ``!cmd``,
    and errors inside magics (``%time``) that fail the step instead of being printed."""

    display_pub_class = Type(CapturingDisplayPublisher)
    capture: Any = None          # the running cell's execute._Capture
    cell_filename: str = ""

    def bind(self, namespace: dict, capture: Any, filename: str) -> None:
        """Run what comes next in ``namespace`` (magics read and write ``user_ns``:
        ``%time x = 1`` binds there) and send its outputs to ``capture``."""
        self.user_module = NamespaceModule.over(namespace)
        self.user_ns = namespace
        self.capture = capture
        self.cell_filename = filename

    def init_display_formatter(self) -> None:
        self.display_formatter = FigureFormatter(parent=self)
        self.configurables.append(self.display_formatter)

    def system(self, cmd: str) -> None:
        """``!cmd``: the command writes straight to the task's stdout/stderr descriptors."""
        cmd = self.var_expand(cmd, depth=1)
        _flush_std_streams()
        status = subprocess.call(cmd, shell=True, executable=os.environ.get("SHELL") or None)
        # IPython's convention: a command killed by signal N leaves -N.
        self.user_ns["_exit_code"] = -(status - 128) if status > 128 else status

    def showtraceback(self, exc_tuple=None, filename=None, tb_offset=None,
                      exception_only=False, running_compiled_code=False) -> None:
        etype, value, tb = exc_tuple if exc_tuple else sys.exc_info()
        if value is None:
            return
        if _inside_magic():
            # %time and friends print the error and carry on; a step must fail instead.
            raise value.with_traceback(tb)
        # Elsewhere (a broken _repr_html_): report it and go on, as a notebook does.
        print(format_error(value, self.cell_filename)["traceback"], file=sys.stderr, end="")

    def showsyntaxerror(self, filename=None, running_compiled_code=False) -> None:
        self.showtraceback()


def _inside_magic() -> bool:
    magic_code = {InteractiveShell.run_line_magic.__code__, InteractiveShell.run_cell_magic.__code__}
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in magic_code:
            return True
        frame = frame.f_back
    return False


_SHELL: TaskShell | None = None


def current() -> TaskShell | None:
    """The process's shell, if one was made."""
    return _SHELL


def make_shell(warm: bool = True) -> TaskShell:
    """Create (once) the process's IPython shell; returns it at once afterwards.

    The fork server calls it before it forks tasks (``warm``: one throwaway
    cell fills the transformer and compiler caches first), so tasks inherit
    a ready shell.
    """
    global _SHELL
    if _SHELL is None:
        _SHELL = _create_shell()
        if warm:
            execute_cell("_ = 1\n_\n", {}, filename="<flowmagic warm-up>", first_line=1,
                         emit=lambda _output: None)
    return _SHELL


def _create_shell() -> TaskShell:
    config = Config()
    # No history database: a SQLite connection and a saving thread must not cross fork().
    config.HistoryManager.enabled = False
    config.HistoryAccessor.enabled = False
    if InteractiveShell.initialized() and not isinstance(InteractiveShell.instance(), TaskShell):
        InteractiveShell.clear_instance()  # e.g. forked from a kernel: never publish to its sockets
    main_module = sys.modules.get("__main__")
    shell = TaskShell.instance(config=config)
    if main_module is not None:  # the shell installs a __main__ of its own; keep the process's
        sys.modules["__main__"] = main_module
    # get_ipython() as a builtin, for the step and for the code that IPython's
    # transformer writes (``get_ipython().run_line_magic(...)``); display() is one already.
    builtins.get_ipython = shell.get_ipython
    return shell


# -- matplotlib figures ----------------------------------------------------------------


def _figure_bundle(fig: Any, shell: TaskShell) -> tuple[dict, dict]:
    from IPython.core.pylabtools import print_figure

    capture = shell.capture
    if capture is not None:
        capture.shown_figures.append(fig)
    data: dict[str, Any] = {"text/plain": repr(fig)}
    png = print_figure(fig, "png")
    if png is None:  # an empty figure: nothing to draw, as in a notebook
        return data, {}
    data["image/png"] = png
    svg_limit = capture.limits.svg_max_bytes if capture is not None else OutputLimits().svg_max_bytes
    if _drawn_points(fig) <= SVG_MAX_POINTS:
        svg = print_figure(fig, "svg")
        if svg is not None and len(svg) <= svg_limit:
            data["image/svg+xml"] = svg
    fig.stale = False  # shown as it is now; a later change marks it stale again
    return data, {}


def _drawn_points(fig: Any) -> int:
    """A cheap estimate of the SVG's size: points of lines and collections; images count as many."""
    points = 0
    for ax in fig.axes:
        points += sum(len(line.get_xydata()) for line in ax.lines)
        points += sum(max(len(c.get_offsets()), len(c.get_paths())) for c in ax.collections)
        points += SVG_MAX_POINTS * len(ax.images) + len(ax.patches)
    return points
