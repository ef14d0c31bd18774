"""Run one step's code like a notebook cell, inside the task process.

The code goes through IPython's own input transformer (so ``%time``, ``!cmd``
and line magics work) and runs against a real :class:`InteractiveShell`
created once per process (:func:`prepare_shell`, which the fork server calls
before it forks tasks, so a task pays only for binding its namespace).

What a cell would show is captured and handed to ``emit`` as it happens:
``display()`` calls, the value of the last expression (``execute_result``)
and the matplotlib figures shown with ``plt.show()`` or still open at the
end (PNG, plus SVG when small). Tracebacks show the cell's own lines with
the cell's line numbers, without flowmagic's or IPython's frames.

This module imports IPython (about 0.6 s): import it in the fork server,
not in the kernel-side orchestrator.
"""
from __future__ import annotations

import ast
import asyncio
import builtins
import fcntl
import inspect
import linecache
import os
import stat
import struct
import subprocess
import sys
import termios
import threading
import time
import tokenize
import traceback
from dataclasses import dataclass, field
from importlib.util import find_spec
from io import StringIO
from pathlib import Path
from typing import Any, Callable

import IPython
from IPython.core.displaypub import DisplayPublisher
from IPython.core.formatters import DisplayFormatter
from IPython.core.interactiveshell import DummyMod, InteractiveShell
from traitlets import Type
from traitlets.config import Config

from flowmagic.errors import UsageError
from flowmagic.runtime.outputs import OutputBudget, OutputLimits, make_output, note_output, without_live_widgets

Emit = Callable[[dict], None]

#: matplotlib backend of task processes: IPython's inline backend publishes
#: figures through ``display()`` on ``plt.show()``, as in a kernel (its
#: canvas is Agg, nothing interactive); plain Agg without matplotlib-inline.
INLINE_BACKEND = "module://matplotlib_inline.backend_inline"
#: figures drawing more points than this get no SVG form (big and slow to render)
SVG_MAX_POINTS = 5000

# Frames from these directories are machinery, not the user's code.
_HIDDEN_DIRS = (str(Path(__file__).resolve().parents[1]) + os.sep,
                str(Path(IPython.__file__).resolve().parent) + os.sep)


@dataclass
class ExecutionResult:
    """What a cell run left behind (the names it bound are in the namespace)."""

    ok: bool
    error: dict | None = None       # {"type", "message", "traceback", "traceback_lines", "line"}
    outputs: list[dict] = field(default_factory=list)


# -- capturing outputs ---------------------------------------------------------------


class _Capture:
    """Collects one cell run's outputs, applies the size limits, forwards them live."""

    def __init__(self, emit: Emit, limits: OutputLimits) -> None:
        self.emit = emit
        self.limits = limits
        self.budget = OutputBudget(limits)
        self.outputs: list[dict] = []
        self.shown_figures: list[Any] = []   # drawn by display(); skipped at the end unless changed
        self._emit_failed = False
        # display() may come from the step's own threads: one output at a time on the channel.
        self._lock = threading.Lock()

    def publish(self, kind: str, data: dict, metadata: dict | None, transient: dict | None = None) -> None:
        with self._lock:
            output = self.budget.admit(without_live_widgets(make_output(kind, data, metadata, transient)))
            if output is None:
                return
            self.outputs.append(output)
            # Text printed before this output must reach the orchestrator before it.
            _flush_std_streams()
            _wait_until_read()
            try:
                self.emit(output)
            except Exception as exc:  # noqa: BLE001 - a broken channel must not fail the step
                if not self._emit_failed:
                    self._emit_failed = True
                    print(f"flowmagic: could not forward an output live ({exc}); it is still stored",
                          file=sys.stderr)


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
    capture: _Capture | None = None
    cell_filename: str = ""

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


def prepare_shell() -> TaskShell:
    """Create (once) the process's IPython shell; returns it at once afterwards.

    Call it in the fork server before the prelude runs, so tasks inherit a
    ready shell. It also points matplotlib at a non-interactive backend.
    """
    global _SHELL
    if _SHELL is None:
        _SHELL = _create_shell()
        # One throwaway cell warms the transformer and compiler caches before fork().
        execute_cell("_ = 1\n_\n", {}, filename="<flowmagic warm-up>", first_line=1, emit=lambda _output: None)
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
    _select_matplotlib_backend()
    return shell


def _select_matplotlib_backend() -> None:
    backend = INLINE_BACKEND if find_spec("matplotlib_inline") else "Agg"
    os.environ["MPLBACKEND"] = backend
    if "matplotlib" in sys.modules:  # imported before us: switch it too
        import matplotlib

        matplotlib.use(backend)


# -- running a cell ---------------------------------------------------------------------


def execute_cell(code: str, namespace: dict, *, filename: str, first_line: int, emit: Emit,
                 limits: OutputLimits | None = None) -> ExecutionResult:
    """Run ``code`` (a step body, IPython syntax allowed) in ``namespace``, in place.

    ``first_line`` is the cell line of the body's first line, ``filename``
    the name tracebacks show. Outputs go to ``emit`` as they happen and are
    returned too. Names bound before an error keep their values.
    """
    shell = prepare_shell()
    try:
        limits = limits or OutputLimits.from_env()
    except UsageError as exc:  # a bad FLOWMAGIC_OUTPUT*_MB: the step fails and says which
        return ExecutionResult(ok=False, error=format_error(exc, filename))
    capture = _Capture(emit, limits)
    _bind_namespace(shell, namespace)
    _register_source(filename, code, first_line)
    shell.capture = capture
    shell.cell_filename = filename
    error = None
    try:
        python = shell.input_transformer_manager.transform_cell(code)
        # Blank lines in front give every node (and a SyntaxError) the cell's line numbers.
        tree = ast.parse("\n" * (first_line - 1) + python, filename=filename)
        _run(shell, tree, python, namespace, filename, capture)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: the step's error is its result
        error = format_error(exc, filename)
    finally:
        try:
            _flush_figures(shell, capture)
        finally:
            shell.capture = None
            _flush_std_streams()
    return ExecutionResult(ok=error is None, error=error, outputs=capture.outputs)


def _bind_namespace(shell: TaskShell, namespace: dict) -> None:
    # Magics read and write shell.user_ns (%time binds there): make it the task's globals.
    module = DummyMod()
    module.__dict__ = namespace
    shell.user_module = module
    shell.user_ns = namespace


def _register_source(filename: str, code: str, first_line: int) -> None:
    """Let tracebacks and inspect.getsource() show the cell's lines, magics included."""
    lines = ["\n"] * (first_line - 1) + code.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len("".join(lines)), None, lines, filename)


def _run(shell: TaskShell, tree: ast.Module, python: str, namespace: dict, filename: str,
         capture: _Capture) -> None:
    body, last = tree.body, None
    if body and isinstance(body[-1], ast.Expr):
        body, last = body[:-1], body[-1]
    if body:
        _eval(compile(ast.Module(body=body, type_ignores=[]), filename, "exec", flags=_FLAGS), namespace)
    if last is None:
        return
    value = _eval(compile(ast.Expression(last.value), filename, "eval", flags=_FLAGS), namespace)
    if value is None or _ends_with_semicolon(python):
        return
    data, metadata = shell.display_formatter.format(value)
    if _is_figure(value):
        capture.shown_figures.append(value)
    capture.publish("execute_result", data, metadata)


_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_LOOP: asyncio.AbstractEventLoop | None = None


def _eval(code_obj, namespace: dict) -> Any:
    result = eval(code_obj, namespace)  # noqa: S307 - running the user's step is the point
    if code_obj.co_flags & inspect.CO_COROUTINE:  # top-level await, as IPython allows
        global _LOOP
        if _LOOP is None or _LOOP.is_closed():
            _LOOP = asyncio.new_event_loop()
        result = _LOOP.run_until_complete(result)
    return result


def _ends_with_semicolon(code: str) -> bool:
    """A trailing ``;`` hides the last value, as in a notebook."""
    tokens = []
    try:
        for tok in tokenize.generate_tokens(StringIO(code).readline):
            if tok.type not in (tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.ENDMARKER,
                                tokenize.INDENT, tokenize.DEDENT):
                tokens.append(tok)
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    return bool(tokens) and tokens[-1].type == tokenize.OP and tokens[-1].string == ";"


#: longest wait for the orchestrator to read the task's pipes before an output is sent
READ_WAIT_SECONDS = 0.1


def _wait_until_read(timeout: float = READ_WAIT_SECONDS) -> None:
    """Wait, briefly, until whoever reads this process's stdout/stderr pipes has
    read everything written so far (``!cmd`` output included), so an output sent
    now on another channel cannot overtake that text."""
    deadline = None
    for fd in (1, 2):
        while _unread_pipe_bytes(fd) > 0:
            now = time.monotonic()
            deadline = deadline or now + timeout
            if now > deadline:
                return
            time.sleep(0.0002)


def _unread_pipe_bytes(fd: int) -> int:
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed stream must not fail the step
            pass


# -- matplotlib --------------------------------------------------------------------


def _is_figure(obj: Any) -> bool:
    figure_module = sys.modules.get("matplotlib.figure")
    return figure_module is not None and isinstance(obj, figure_module.Figure)


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


def _flush_figures(shell: TaskShell, capture: _Capture) -> None:
    """Show the figures still open at the end of the cell, then close them all."""
    pyplot = sys.modules.get("matplotlib.pyplot")
    if pyplot is None:
        return
    from matplotlib._pylab_helpers import Gcf

    managers = Gcf.get_all_fig_managers()
    if not managers:
        return  # close("all") would run a garbage collection for nothing
    try:
        for manager in managers:
            fig = manager.canvas.figure
            if any(fig is shown for shown in capture.shown_figures) and not fig.stale:
                continue  # already shown, unchanged since
            try:
                data, metadata = shell.display_formatter.format(fig)
            except Exception as exc:  # noqa: BLE001 - a figure that cannot draw must not fail the step
                capture.publish("display", note_output(f"a figure could not be drawn: {exc!r}")["data"], {})
                continue
            if "image/png" in data:
                capture.publish("display", data, metadata)
    finally:
        pyplot.close("all")
        inline = sys.modules.get("matplotlib_inline.backend_inline")
        if inline is not None:  # its pending-draw list would grow across cells
            inline.show._to_draw = []
            inline.show._draw_called = False


# -- errors ------------------------------------------------------------------------


def format_error(exc: BaseException, filename: str) -> dict:
    """The step's exception record: type, message, and a traceback whose frames
    start at the cell and skip flowmagic's and IPython's own."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    if tb is None:  # not raised through the cell (a library's _repr_html_): keep every non-machinery frame
        tb = exc.__traceback__
    summary = traceback.TracebackException(type(exc), exc, tb, compact=True)
    _drop_machinery_frames(summary)
    text = "".join(summary.format())
    return {
        "type": _type_name(type(exc)),
        "message": _safe_str(exc),
        "traceback": text,
        "traceback_lines": text.splitlines(),
        "line": _cell_line(exc, summary, filename),
    }


def _drop_machinery_frames(summary: traceback.TracebackException, seen: set[int] | None = None) -> None:
    seen = set() if seen is None else seen
    if id(summary) in seen:
        return
    seen.add(id(summary))
    summary.stack = traceback.StackSummary.from_list(
        [frame for frame in summary.stack if not _is_machinery(frame.filename)])
    for linked in (summary.__cause__, summary.__context__, *(getattr(summary, "exceptions", None) or ())):
        if linked is not None:
            _drop_machinery_frames(linked, seen)


def _is_machinery(path: str) -> bool:
    return path.startswith(_HIDDEN_DIRS) or path.startswith("<decorator-gen-")


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:  # noqa: BLE001 - a broken __str__ must not hide the error itself
        return f"<{type(exc).__name__}: str() failed>"


def _type_name(cls: type) -> str:
    if cls.__module__ in ("builtins", "__main__"):
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def _cell_line(exc: BaseException, summary: traceback.TracebackException, filename: str) -> int | None:
    """The cell line where the error happened (the deepest frame in the cell)."""
    if isinstance(exc, SyntaxError) and exc.filename == filename:
        return exc.lineno
    lines = [frame.lineno for frame in summary.stack if frame.filename == filename]
    return lines[-1] if lines else None
