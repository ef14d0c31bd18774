"""Run one step's code like a notebook cell, inside the task process.

Code that is plain Python runs as it is, without IPython; a cell with IPython
syntax (``%time``, ``!cmd``) goes through IPython's own input transformer and
runs against a real :class:`~flowmagic.runtime.worker.shell.TaskShell`. The shell
(IPython costs ~0.25 s to import) is made when a cell first needs it: for that
syntax, a value to show, a ``display()`` or ``get_ipython()`` call, or a
figure left open; or by the fork server before it forks, for a flow whose
code shows it will (tasks then inherit it ready).

What a cell would show is captured and handed to ``emit`` as it happens:
``display()`` calls, the value of the last expression (``execute_result``)
and the matplotlib figures shown with ``plt.show()`` or still open at the
end (PNG, plus SVG when small). Tracebacks show the cell's own lines with
the cell's line numbers, without flowmagic's or IPython's frames.
"""
from __future__ import annotations

import ast
import builtins
import contextlib
import fcntl
import functools
import linecache
import os
import stat
import struct
import sys
import termios
import threading
import time
import tokenize
import traceback
import types
from dataclasses import dataclass, field
from importlib.util import find_spec
from io import StringIO
from pathlib import Path
from typing import TYPE_CHECKING, Any
from collections.abc import Callable

from flowmagic.errors import UsageError
from flowmagic.runtime.protocol import ExceptionRecord
from flowmagic.store.outputs import OutputBudget, OutputLimits, make_output, note_output, without_live_widgets

if TYPE_CHECKING:
    from flowmagic.runtime.worker.shell import TaskShell

Emit = Callable[[dict], None]

#: matplotlib backend of task processes: IPython's inline backend (it publishes
#: figures through ``display()`` on ``plt.show()``, as in a kernel; its canvas
#: is Agg, nothing interactive), loaded after the shell it needs; plain Agg
#: without matplotlib-inline.
INLINE_BACKEND = "module://flowmagic.runtime.worker.mpl_backend"


@functools.cache
def _hidden_dirs() -> tuple[str, ...]:
    """Frames from these directories are machinery, not the user's code."""
    dirs = [str(Path(__file__).resolve().parents[1]) + os.sep]
    spec = find_spec("IPython")  # where it is, without importing it
    if spec is not None and spec.submodule_search_locations:
        dirs.append(str(Path(list(spec.submodule_search_locations)[0]).resolve()) + os.sep)
    return tuple(dirs)


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


# -- running a cell ---------------------------------------------------------------------


@dataclass
class _Cell:
    """The cell running now: where a shell made in the middle of it must send things."""

    namespace: dict
    capture: _Capture
    filename: str


_CELL: _Cell | None = None


def execute_cell(code: str, namespace: dict, *, filename: str, first_line: int, emit: Emit,
                 limits: OutputLimits | None = None) -> ExecutionResult:
    """Run ``code`` (a step body, IPython syntax allowed) in ``namespace``, in place.

    ``first_line`` is the cell line of the body's first line, ``filename``
    the name tracebacks show. Outputs go to ``emit`` as they happen and are
    returned too. Names bound before an error keep their values.
    """
    global _CELL
    prepare_process()
    try:
        limits = limits or OutputLimits.from_env()
    except UsageError as exc:  # a bad FLOWMAGIC_OUTPUT*_MB: the step fails and says which
        return ExecutionResult(ok=False, error=format_error(exc, filename))
    capture = _Capture(emit, limits)
    _register_source(filename, code, first_line)
    _CELL = _Cell(namespace, capture, filename)
    error = None
    try:
        tree, python = _parse(code, first_line, filename)
        _run(tree, python, namespace, filename, capture)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit too: the step's error is its result
        error = format_error(exc, filename)
    finally:
        try:
            _flush_figures(capture)
        finally:
            shell = _shell(create=False)
            _CELL = None
            if shell is not None:
                shell.capture = None
            _flush_std_streams()
    return ExecutionResult(ok=error is None, error=error, outputs=capture.outputs)


def _parse(code: str, first_line: int, filename: str) -> tuple[ast.Module, str]:
    """The cell's tree and its Python text: the code as written when it is plain
    Python and no shell exists yet; otherwise through IPython's transformer."""
    # Blank lines in front give every node (and a SyntaxError) the cell's line numbers.
    padding = "\n" * (first_line - 1)
    if _shell(create=False) is None:
        try:
            return ast.parse(padding + code, filename=filename), code
        except SyntaxError:
            pass  # IPython syntax, or an error that IPython's path reports just the same
    python = _shell(create=True).input_transformer_manager.transform_cell(code)
    return ast.parse(padding + python, filename=filename), python


def shell_made() -> TaskShell | None:
    """The process's IPython shell if one was made (without importing IPython)."""
    module = sys.modules.get("flowmagic.runtime.worker.shell")
    return module.current() if module is not None else None


def _shell(create: bool) -> TaskShell | None:
    """The process's IPython shell bound to the running cell; made now if ``create``."""
    shell = shell_made()
    if shell is None:
        if not create:
            return None
        shell = prepare_shell(warm=False)
    cell = _CELL
    if cell is not None and shell.capture is not cell.capture:
        shell.bind(cell.namespace, cell.capture, cell.filename)
    return shell


def prepare_shell(warm: bool = True) -> TaskShell:
    """Import IPython (without its terminal parts) and make the process's shell,
    once. The fork server calls it before forking, for a flow that needs it."""
    with _lean_ipython():   # the shell's completer would import jedi too
        from flowmagic.runtime.worker.shell import make_shell

        return make_shell(warm=warm)


_PROCESS_READY = False


def prepare_process() -> None:
    """What every task process has, shell or not: ``display()`` and ``get_ipython()``
    builtins (the first call makes the shell) and a non-interactive matplotlib."""
    global _PROCESS_READY
    if _PROCESS_READY:
        return
    _PROCESS_READY = True
    if not hasattr(builtins, "display"):
        builtins.display = _display_with_a_shell  # type: ignore[attr-defined]
    if not hasattr(builtins, "get_ipython"):
        builtins.get_ipython = _get_ipython_with_a_shell  # type: ignore[attr-defined]
    _select_matplotlib_backend()


def _display_with_a_shell(*objs: Any, **kwargs: Any) -> Any:
    _shell(create=True)   # replaces this builtin with IPython's display()
    from IPython.display import display

    return display(*objs, **kwargs)


def _get_ipython_with_a_shell() -> TaskShell:
    return _shell(create=True)


def _select_matplotlib_backend() -> None:
    backend = INLINE_BACKEND if find_spec("matplotlib_inline") else "Agg"
    os.environ["MPLBACKEND"] = backend
    if "matplotlib" in sys.modules:  # imported before us: switch it too
        import matplotlib

        matplotlib.use(backend)


@contextlib.contextmanager
def _lean_ipython():
    """Load IPython without what only its terminal uses (~0.2 s): jedi (tab
    completion: while IPython loads, ``import jedi`` fails, so it sets
    completion aside) and ``IPython.terminal.embed`` (which pulls in
    prompt_toolkit; ``IPython.embed`` stays, loading it on call).
    Afterwards a step can import either as usual."""
    lean = "IPython" not in sys.modules and "jedi" not in sys.modules
    if lean:
        sys.modules["jedi"] = None  # type: ignore[assignment]  # the import system's "not available"
        sys.modules[_EMBED] = _embed_stub()
        try:
            import IPython  # noqa: F401
        except Exception:  # an IPython that wants more of its terminal: load it whole
            del sys.modules[_EMBED]
    try:
        yield
    finally:
        if lean:
            if sys.modules.get("jedi", 0) is None:
                del sys.modules["jedi"]
            if getattr(sys.modules.get(_EMBED), "_flowmagic_stub", False):
                del sys.modules[_EMBED]


_EMBED = "IPython.terminal.embed"


def _embed_stub() -> types.ModuleType:
    stub = types.ModuleType(_EMBED)
    stub._flowmagic_stub = True  # type: ignore[attr-defined]

    def embed(*args: Any, **kwargs: Any) -> Any:
        from IPython.terminal.embed import embed as real_embed

        return real_embed(*args, **kwargs)

    stub.embed = embed  # type: ignore[attr-defined]
    return stub


def _register_source(filename: str, code: str, first_line: int) -> None:
    """Let tracebacks and inspect.getsource() show the cell's lines, magics included."""
    lines = ["\n"] * (first_line - 1) + code.splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines[-1] += "\n"
    linecache.cache[filename] = (len("".join(lines)), None, lines, filename)


def _run(tree: ast.Module, python: str, namespace: dict, filename: str, capture: _Capture) -> None:
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
    data, metadata = _shell(create=True).display_formatter.format(value)
    if _is_figure(value):
        capture.shown_figures.append(value)
    capture.publish("execute_result", data, metadata)


_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
_CO_COROUTINE = 0x0080   # inspect.CO_COROUTINE, without importing inspect
_LOOP = None   # asyncio's event loop for top-level await, made on first use


def _eval(code_obj, namespace: dict) -> Any:
    result = eval(code_obj, namespace)  # noqa: S307 - running the user's step is the point
    if code_obj.co_flags & _CO_COROUTINE:  # top-level await, as IPython allows
        import asyncio   # here: ~20 ms that a cell without await never needs

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


def _flush_figures(capture: _Capture) -> None:
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
                data, metadata = _shell(create=True).display_formatter.format(fig)
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
    return ExceptionRecord(_type_name(type(exc)), _safe_str(exc), text, tuple(text.splitlines()),
                           _cell_line(exc, summary, filename)).to_json()


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
    return path.startswith(_hidden_dirs()) or path.startswith("<decorator-gen-")


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
