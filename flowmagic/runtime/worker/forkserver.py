"""A warm process that has run the flow's prelude once and forks one child per task.

Starting a fresh interpreter and importing numpy/pandas/pyarrow costs ~0.4 s;
``fork()`` of a process that already did costs a few milliseconds. So the
orchestrator starts ``python -m flowmagic.runtime.worker.forkserver`` (any
interpreter that can import flowmagic, which is how isolated environments
reuse it), sends it the prelude, and then asks it for tasks.

Protocol (a ``SOCK_SEQPACKET`` socket pair, messages are JSON):

* orchestrator -> server ``{"op": "config", "prelude", "preload", "sys_path", "cwd"}``;
  server replies ``{"ok": true, "pid"}`` or ``{"ok": false, "error": {...}}``.
  ``preload`` names the heavy modules this flow uses (see :func:`flow_preload`).
* ``{"op": "preload", "modules": [...]}``: import more modules now (a step that
  reads a DataFrame when the server did not load pandas); no reply. The spare
  child, forked before them, is replaced.
* ``{"op": "spawn", "entry": "module:function"}`` with four fds attached
  (SCM_RIGHTS): a status pipe, the task's stdout and stderr pipes and a
  stream socket (the task's channel for its spec and manifest). The server
  forks; it writes ``pid N`` then, when the child is gone, ``exit STATUS``
  (raw wait status) on the status pipe and closes it.
* ``{"op": "kill", "pid", "sig"}`` signals the task's process group, but only
  while the server has not reaped it (so a recycled pid is never hit).
* ``{"op": "exit"}`` or EOF (the orchestrator died): kill every task, exit.

Started with the extra argument ``base``, the process never runs a prelude: it
forks a copy of itself per new server (:func:`serve_as_base`), so a kernel
whose prelude changed does not start and import an interpreter again.

The child calls ``setsid()`` (its own process group, so a timeout can kill its
subprocesses too) and ``PR_SET_PDEATHSIG`` (it dies with the server, which
dies with the orchestrator). When a task's leader exits, the server kills
whatever is left in its group before reaping it. Server and tasks are
subreapers, so descendants that left the group (their own session) re-parent
to the task while it lives and to the server after: the server kills every
child of its that is not a task (``processes.kill_orphans``).
"""
from __future__ import annotations

import gc
import importlib
import json
import linecache
import os
import re
import selectors
import signal
import socket
import sys
import traceback
import types
from typing import Any
from collections.abc import Callable, Iterable

from flowmagic.errors import RunError
from flowmagic.runtime.protocol import ExceptionRecord
from flowmagic.runtime.worker.processes import become_subreaper, children_of, die_with_parent, kill_group, kill_orphans

# What every server imports before it knows the flow. IPython (~0.25 s) and
# numpy/pandas/pyarrow (~0.6 s) only when the flow uses them: see flow_preload
# and _Server.configure. A kernel's warm server loads IPython ahead of time.
IPYTHON = "IPython"
DEFAULT_PRELOAD = ("flowmagic.runtime.worker.task", "flowmagic.runtime.worker.execute")
KERNEL_PRELOAD = (*DEFAULT_PRELOAD, IPYTHON)
# Modules whose values are saved through Arrow: once a process holds one, the
# Arrow codecs are loaded too, or every task that saves an array pays for them.
ARROW_VALUE_MODULES = ("numpy", "pandas", "pyarrow", "polars")
ARROW_CODECS = "flowmagic.store._arrow"
_MENTION = re.compile(r"\b(numpy|pandas|pyarrow|polars)\b")
# Code that will want the IPython shell: magics (the transformer turns them into
# get_ipython() calls), display(), rich-output libraries, matplotlib. A task
# whose code shows none runs without IPython and makes the shell only if it
# turns out to need one (a value to show, a figure left open).
_WANTS_IPYTHON = re.compile(
    r"\b(get_ipython|display|IPython|ipywidgets|matplotlib|pyplot|plt|seaborn|plot|tqdm|HTML|Markdown)\b")


def flow_preload(sources: Iterable[str] = (), serializers: Iterable[str] = ()) -> tuple[str, ...]:
    """The modules a flow's tasks will use, judged from its code (the prelude,
    the steps, as plain Python) and the serializers of the artifacts they load
    ("arrow-pandas" needs pandas): IPython, when the code shows it will want
    the shell, and the heavy modules it uses. Empty for a flow that needs none."""
    named = set()
    wants_ipython = False
    for text in sources:
        named.update(_MENTION.findall(text))
        wants_ipython = wants_ipython or _WANTS_IPYTHON.search(text) is not None
    for serializer in serializers:
        if serializer.startswith("arrow-"):
            named.add({"arrow-pandas": "pandas", "arrow-polars": "polars"}.get(serializer, "pyarrow"))
    order = ("numpy", "pyarrow", "pandas", "polars")
    heavy = tuple(m for m in order if m in named) + (ARROW_CODECS,) if named else ()
    return ((IPYTHON,) if wants_ipython else ()) + heavy


TASK_ENTRY = "flowmagic.runtime.worker.task:main"
_MAX_MESSAGE = 1 << 20


class ForkServerDied(RunError):
    """The fork server is gone (killed, or it crashed); start a new one."""


class PreludeError(RunError):
    """The prelude (the notebook's ordinary cells) raised in the fork server."""

    def __init__(self, error: dict) -> None:
        self.error = error
        tb = error.get("traceback", "")
        super().__init__(
            f"the prelude (imports, defs and constants of the ordinary cells) failed: "
            f"{error.get('type')}: {error.get('message')}\n{tb}".rstrip()
        )


# --------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------


class _Server:
    def __init__(self, ctrl: socket.socket) -> None:
        self.ctrl = ctrl
        self.children: dict[int, int] = {}  # pid -> status pipe fd
        self.spare: tuple[int, socket.socket] | None = None  # a forked child waiting for a task
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        self.namespace: dict[str, Any] = {}
        self.own: set[int] = set()  # children the prelude started: not orphans of a task

    # -- setup ------------------------------------------------------------
    def configure(self, config: dict) -> dict:
        for path in reversed(config.get("sys_path", [])):
            if path not in sys.path:
                sys.path.insert(0, path)
        if config.get("cwd"):
            os.chdir(config["cwd"])
        preload(config.get("preload", ()))
        from flowmagic.runtime.worker.execute import prepare_process
        from flowmagic.store.backends import warm_up

        warm_up()  # FLOWMAGIC_STORE: s3fs/botocore imported once here, not in every task

        prepare_process()  # before the prelude: it may import matplotlib
        # The prelude runs in a fresh ``__main__`` module, as notebook cells do in
        # a kernel: classes it defines pickle as ``__main__.X`` and load in the kernel.
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = __builtins__
        sys.modules["__main__"] = main
        self.namespace = main.__dict__
        try:
            prelude = config.get("prelude", "")
            # Tracebacks through the prelude's functions show their source lines.
            linecache.cache["<prelude>"] = (len(prelude), None, prelude.splitlines(keepends=True), "<prelude>")
            code = compile(prelude, "<prelude>", "exec")
            exec(code, self.namespace)
        except BaseException as exc:  # noqa: BLE001 - report anything, SystemExit included
            return {"ok": False, "error": _error_record(exc)}
        if any(m in sys.modules for m in ARROW_VALUE_MODULES):  # e.g. a library the prelude imported uses numpy
            preload((ARROW_CODECS,))
        return {"ok": True, "pid": os.getpid()}

    def preload_more(self, modules: list[str]) -> None:
        """Import modules a coming task needs; the spare child lacks them, so replace it."""
        missing = [m for m in modules if not _loaded(m)]
        if not missing:
            return
        preload(missing)
        gc.collect()
        gc.freeze()
        if self.spare is not None:
            self._discard_spare(*self.spare)
            self.spare = None
        self.prepare_spare()

    # -- main loop --------------------------------------------------------
    def serve(self) -> None:
        # Objects that exist now are shared with every task; keeping the
        # cyclic GC off them spares each task copying their pages on write.
        gc.collect()
        gc.freeze()
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self._orchestrator_died)
        sel = selectors.DefaultSelector()
        sel.register(self.ctrl, selectors.EVENT_READ)
        sel.register(self.wake_r, selectors.EVENT_READ)
        self.own = children_of(os.getpid())
        self.prepare_spare()
        while True:
            for key, _ in sel.select(timeout=1.0):
                if key.fileobj is self.wake_r:
                    try:
                        os.read(self.wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif not self._handle_message():
                    self.shutdown()
                    return
            self.reap()

    def _handle_message(self) -> bool:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.ctrl, _MAX_MESSAGE, 8)
        except (ConnectionResetError, OSError):
            return False
        if not data:
            for fd in fds:
                os.close(fd)
            return False
        msg = json.loads(data)
        op = msg.get("op")
        if op == "spawn":
            self.spawn(msg.get("entry", TASK_ENTRY), fds)
        elif op == "kill":
            pid = int(msg["pid"])
            if pid in self.children:  # not reaped yet: the group id is still ours
                kill_group(pid, int(msg.get("sig", signal.SIGKILL)))
        elif op == "preload":
            self.preload_more(list(msg.get("modules", ())))
        elif op == "exit":
            return False
        return True

    def spawn(self, entry: str, fds: list[int]) -> None:
        status_w, out_w, err_w, chan = fds
        pid = self._hand_to_spare(entry, [out_w, err_w, chan])
        if pid is None:
            pid = os.fork()
            if pid == 0:
                os.close(status_w)
                self._task_child(lambda: (self._detach(), self._run_entry(entry, out_w, err_w, chan))[1])
        for fd in (out_w, err_w, chan):
            os.close(fd)
        self.children[pid] = status_w
        _write_line(status_w, f"pid {pid}")
        self.prepare_spare()  # after the reply: the next task's fork is off its critical path

    # -- a spare child, forked ahead of time ---------------------------------
    def prepare_spare(self) -> None:
        """Fork a child that waits for its task: a spawn then costs a message, not a fork."""
        if self.spare is not None:
            return
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            parent.close()
            self._task_child(lambda: self._wait_as_spare(child))
        child.close()
        self.spare = (pid, parent)

    def _wait_as_spare(self, sock: socket.socket) -> int:
        self._detach()
        data, fds, _flags, _addr = socket.recv_fds(sock, 4096, 3)
        sock.close()
        if not data or len(fds) != 3:
            return 0  # the server is closing: never used
        return self._run_entry(data.decode(), *fds)

    def _hand_to_spare(self, entry: str, fds: list[int]) -> int | None:
        if self.spare is None:
            return None
        pid, sock = self.spare
        self.spare = None
        try:
            socket.send_fds(sock, [entry.encode()], fds)
        except OSError:  # it died while waiting: fork directly instead
            self._discard_spare(pid, sock)
            return None
        sock.close()
        return pid

    def _discard_spare(self, pid: int, sock: socket.socket) -> None:
        sock.close()
        kill_group(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass

    def _reap_spare(self) -> None:
        if self.spare is None:
            return
        pid, sock = self.spare
        try:
            done = os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            done = True
        if done:
            sock.close()
            self.spare = None

    # -- inside a task process -------------------------------------------------
    @staticmethod
    def _task_child(body: Callable[[], int]) -> None:
        code = 1
        try:
            code = body()
        except BaseException:  # noqa: BLE001 - last resort: say why, then exit
            try:
                traceback.print_exc()
                sys.stderr.flush()
            except BaseException:  # noqa: BLE001
                pass
        finally:
            os._exit(code)

    def _detach(self) -> None:
        """Own session and process group; die with the server; drop its descriptors."""
        server_pid = os.getppid()
        os.setsid()
        die_with_parent(server_pid)
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)   # not the server's handler
        become_subreaper()  # descendants in their own session re-parent here, not to init
        # Drop every descriptor that belongs to the server or to other tasks,
        # or the orchestrator would never see EOF on them.
        for fd in (self.wake_r, self.wake_w, *self.children.values()):
            _close_quietly(fd)
        if self.spare is not None:
            self.spare[1].close()
        self.ctrl.close()

    def _run_entry(self, entry: str, out_w: int, err_w: int, chan: int) -> int:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(out_w, 1)
        os.dup2(err_w, 2)
        for fd in (devnull, out_w, err_w):
            os.close(fd)
        sys.stdin = open(0, closefd=False)
        # Line buffered, so output streams live to the orchestrator.
        sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
        sys.__stdout__, sys.__stderr__, sys.__stdin__ = sys.stdout, sys.stderr, sys.stdin
        module_name, _, func_name = entry.partition(":")
        func: Callable[[socket.socket, dict], int] = getattr(importlib.import_module(module_name), func_name)
        channel = socket.socket(fileno=chan)
        try:
            code = int(func(channel, self.namespace) or 0)
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - a closed pipe must not hide the exit code
                    pass
        return code

    def reap(self) -> None:
        self._reap_spare()
        for pid in list(self.children):
            try:
                info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                info = None
                self._report_exit(pid, 0)
                continue
            if info is None:
                continue
            # The leader is a zombie, so its group id cannot be recycled yet:
            # kill the leftovers (a subprocess that ignored SIGTERM) before reaping.
            kill_group(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            self._report_exit(pid, status)
        self._kill_orphans()

    def _kill_orphans(self) -> None:
        """Kill what ended tasks left: live tasks are subreapers of their own
        descendants, so any other child of ours belongs to a task that ended."""
        keep = self.own | set(self.children) | ({self.spare[0]} if self.spare else set())
        kill_orphans(keep)

    def _report_exit(self, pid: int, status: int) -> None:
        fd = self.children.pop(pid)
        _write_line(fd, f"exit {status}")
        _close_quietly(fd)

    def _orchestrator_died(self, *_: object) -> None:
        """PDEATHSIG: the kernel/orchestrator is gone; so must every task be."""
        self.shutdown()
        os._exit(0)

    def shutdown(self) -> None:
        if self.spare is not None:
            self._discard_spare(*self.spare)
            self.spare = None
        for pid in list(self.children):
            kill_group(pid, signal.SIGKILL)
        for pid in list(self.children):
            try:
                _, status = os.waitpid(pid, 0)
            except ChildProcessError:
                status = 0
            self._report_exit(pid, status)
        self._kill_orphans()


def _write_line(fd: int, text: str) -> None:
    try:
        os.write(fd, (text + "\n").encode())
    except OSError:  # the orchestrator closed its end: nobody is listening
        pass


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _error_record(exc: BaseException) -> dict:
    return ExceptionRecord.of(exc).to_json()


def run_source(channel: socket.socket, namespace: dict) -> int:
    """A minimal task entry: execute the Python source sent on the channel.

    Used by tests and for debugging an environment's interpreter; real tasks
    use :data:`TASK_ENTRY`.
    """
    source = _recv_all(channel).decode()
    exec(compile(source, "<task>", "exec"), namespace)
    return 0


def _recv_all(channel: socket.socket) -> bytes:
    chunks = []
    while True:
        chunk = channel.recv(1 << 16)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _loaded(module: str) -> bool:
    if module == IPYTHON:  # imported is not enough: the shell must be made
        from flowmagic.runtime.worker.execute import shell_made

        return shell_made() is not None
    return module in sys.modules


def preload(modules) -> None:
    """Import the modules tasks will use; for "IPython", make the shell tasks inherit."""
    for name in modules:
        try:
            if name == IPYTHON:
                from flowmagic.runtime.worker.execute import prepare_shell

                prepare_shell()
            else:
                importlib.import_module(name)
        except Exception:  # an optional module may be missing in an environment
            pass


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ctrl_fd, orchestrator_pid = int(argv[0]), int(argv[1])
    # SIGTERM, not SIGKILL: serve() handles it by killing every task's process
    # group (subprocesses a step started included) before exiting (small edit by H6).
    die_with_parent(orchestrator_pid, signal.SIGTERM)
    become_subreaper()  # tasks' orphaned descendants come here to be killed (processes.py)
    # Imports first, before the prelude is known: a server can be started
    # while the orchestrator is still reading the notebook.
    preload(argv[2].split(",") if len(argv) > 2 and argv[2] else ())
    ctrl = socket.socket(fileno=ctrl_fd)
    if len(argv) > 3 and argv[3] == "base":
        serve_as_base(ctrl)
    else:
        serve_one_prelude(ctrl)


def serve_as_base(ctrl: socket.socket) -> None:
    """The "base" role: never runs a prelude; on ``{"op": "fork", "env"}`` with one fd
    attached (a new server's control socket) it forks a copy of itself that serves
    as a fresh server on that socket, and replies ``{"pid": N}``; on
    ``{"op": "preload", "modules"}`` it imports them and replies ``{"preloaded": true}``. A copy is in the
    very state of a newly started interpreter waiting for its config, so a kernel
    whose prelude changed gets a server without paying the interpreter and its imports again.
    """
    ctrl.settimeout(1.0)   # wake up now and then to reap the servers that exited
    _freeze_heap()
    while True:
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctrl, _MAX_MESSAGE, 1)
        except TimeoutError:
            data, fds = None, []
        except OSError:
            data, fds = b"", []
        _reap_any()
        if data is None:
            continue
        msg = json.loads(data) if data else {"op": "exit"}
        if msg.get("op") == "preload":   # the flow's heavy modules: every later server has them
            preload(msg.get("modules", ()))
            _freeze_heap()
            ctrl.send(json.dumps({"preloaded": True}).encode())
        if msg.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            if msg.get("op") == "exit":
                os._exit(0)   # the servers it forked die with it (their PDEATHSIG)
            continue
        ctrl.send(json.dumps({"pid": _fork_server(ctrl, fds[0], msg.get("env"))}).encode())


def _fork_server(base_ctrl: socket.socket, fd: int, env: dict | None) -> int:
    base_pid = os.getpid()
    pid = os.fork()
    if pid:
        os.close(fd)
        return pid
    try:
        base_ctrl.close()
        os.setsid()   # as start_new_session for a launched server
        die_with_parent(base_pid, signal.SIGTERM)   # the base dies with the orchestrator
        become_subreaper()   # not inherited through fork
        if env is not None:   # the orchestrator's variables now, not when the base started
            os.environ.clear()
            os.environ.update(env)
        serve_one_prelude(socket.socket(fileno=fd))
    finally:
        os._exit(1)   # serve_one_prelude leaves through os._exit(0): here only if it raised


def _freeze_heap() -> None:
    # What the imports made is never garbage: a server forked later then starts
    # with it out of the cyclic GC's way (its own gc.collect before serving is cheap).
    gc.collect()
    gc.freeze()


def _reap_any() -> None:
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def serve_one_prelude(ctrl: socket.socket) -> None:
    """Wait for the config, run the prelude, fork tasks until told to exit."""
    data = ctrl.recv(_MAX_MESSAGE)
    if not data:
        return
    server = _Server(ctrl)
    reply = server.configure(json.loads(data))
    ctrl.send(json.dumps(reply).encode())
    if reply["ok"]:
        server.serve()
    # No interpreter shutdown: atexit hooks (IPython's shell) have nothing to
    # save here and fail noisily when the working directory is gone.
    sys.stderr.flush()
    os._exit(0)

if __name__ == "__main__":
    main()
