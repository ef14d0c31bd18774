"""The orchestrator's side of the fork server: start servers, fork tasks, kill them.

:class:`ForkServer` is the handle of one ``python -m flowmagic.runtime.worker.forkserver``
process (see that module for the protocol); :func:`get_server` keeps one warm
server per interpreter and prelude; :func:`prestart` starts one early so its
imports overlap with the caller's own work; :func:`start_base` keeps a base
server (a kernel's) that forks a fresh server for each new prelude.
"""
from __future__ import annotations

import hashlib
import json
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable, Mapping
from pathlib import Path

from flowmagic.runtime.worker.forkserver import (
    _MAX_MESSAGE, DEFAULT_PRELOAD, TASK_ENTRY, ForkServerDied, PreludeError, _close_quietly,
)
from flowmagic.runtime.worker.processes import kill_group


@dataclass
class TaskProcess:
    """A forked task as the orchestrator sees it: its pid and its pipes."""

    pid: int
    stdout: int            # read ends, owned by whoever drives the task
    stderr: int
    status: int            # "exit STATUS" arrives here
    channel: socket.socket  # spec in, manifest and display messages out
    server: ForkServer

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the task's whole process group (through the server, race-free)."""
        self.server.kill(self.pid, sig)

    def close(self) -> None:
        for fd in (self.stdout, self.stderr, self.status):
            _close_quietly(fd)
        self.channel.close()


@dataclass
class ForkServer:
    """Client handle of one fork server process."""

    prelude: str
    python: str = sys.executable
    preload: tuple[str, ...] = field(default_factory=lambda: _server_preload)
    flow_modules: tuple[str, ...] = ()  # imported before the prelude (forkserver.flow_preload)
    cwd: str | None = None
    env: dict[str, str] | None = None
    proc: subprocess.Popen | ForkedProcess | ServerProcess | None = None
    ctrl: socket.socket | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    active: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.python, prelude_hash(self.prelude))

    def start(self) -> ForkServer:
        # PDEATHSIG fires when the *thread* that forked the server exits, so
        # the server is always started by one long-lived thread.
        _on_spawner_thread(self._start)
        return self

    def _start(self) -> None:
        self.proc, self.ctrl = (_take_prestarted(self.python, self.env)
                                or _fork_from_base(self.python, self.preload, self.env)
                                or _launch(self.python, self.preload, self.env))
        parent = self.ctrl
        config = {
            "op": "config",
            "prelude": self.prelude,
            "preload": list(self.flow_modules),
            "sys_path": [p for p in sys.path if p] if self.python == sys.executable else [],
            "cwd": self.cwd,
        }
        parent.send(json.dumps(config).encode())
        reply = self._recv_reply()
        if not reply.get("ok"):
            self.close()
            raise PreludeError(reply.get("error", {}))

    def _recv_reply(self) -> dict:
        assert self.ctrl is not None and self.proc is not None
        self.ctrl.settimeout(0.5)
        try:
            while True:
                try:
                    data = self.ctrl.recv(_MAX_MESSAGE)
                except TimeoutError:
                    if self.proc.poll() is not None:
                        raise ForkServerDied(
                            f"the fork server ({self.python}) exited with status {self.proc.returncode} "
                            "before it was ready"
                        ) from None
                    continue
                if not data:
                    self.proc.wait()
                    raise ForkServerDied(
                        f"the fork server ({self.python}) exited with status {self.proc.returncode} "
                        "before it was ready (see its stderr above)"
                    )
                return json.loads(data)
        finally:
            self.ctrl.settimeout(None)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.ctrl is not None

    def spawn(self, entry: str = TASK_ENTRY) -> TaskProcess:
        """Fork one task; returns once its pid is known."""
        if not self.alive():
            raise ForkServerDied("the fork server is not running")
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        st_r, st_w = os.pipe()
        chan, chan_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self._lock:
                socket.send_fds(
                    self.ctrl, [json.dumps({"op": "spawn", "entry": entry}).encode()],
                    [st_w, out_w, err_w, chan_child.fileno()],
                )
        except OSError as exc:
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            chan.close()
            raise ForkServerDied(f"the fork server is gone ({exc})") from exc
        finally:
            for fd in (out_w, err_w, st_w):
                os.close(fd)
            chan_child.close()
        line = _read_line(st_r)
        if not line.startswith("pid "):
            for fd in (out_r, err_r, st_r):
                os.close(fd)
            chan.close()
            raise ForkServerDied("the fork server died while forking a task")
        return TaskProcess(int(line.split()[1]), out_r, err_r, st_r, chan, self)

    def ensure_preloaded(self, modules: tuple[str, ...]) -> None:
        """Have the server import ``modules`` (if it has not) before the next task forks."""
        with self._lock:
            missing = tuple(m for m in modules if m not in self.flow_modules)
            if not missing or self.ctrl is None:
                return
            self.flow_modules += missing
            try:
                self.ctrl.send(json.dumps({"op": "preload", "modules": list(missing)}).encode())
            except OSError:
                pass  # gone: the next spawn says so

    def hold(self, delta: int) -> None:
        with self._lock:
            self.active += delta

    def kill(self, pid: int, sig: int = signal.SIGKILL) -> None:
        try:
            with self._lock:
                self.ctrl.send(json.dumps({"op": "kill", "pid": pid, "sig": int(sig)}).encode())
        except (OSError, AttributeError):
            kill_group(pid, sig)  # server gone: its tasks die with it anyway

    def close(self) -> None:
        if self.ctrl is not None:
            try:
                self.ctrl.send(json.dumps({"op": "exit"}).encode())
            except OSError:
                pass
            self.ctrl.close()
            self.ctrl = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _read_line(fd: int) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def _launch(python: str, preload_modules, env, role: str = "server") -> tuple[subprocess.Popen, socket.socket]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    proc = subprocess.Popen(
        [python, "-m", "flowmagic.runtime.worker.forkserver", str(child.fileno()), str(os.getpid()),
         ",".join(preload_modules), role],
        pass_fds=[child.fileno()],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,  # a terminal's Ctrl-C goes to the orchestrator only
        env=_server_environ(python, os.environ if env is None else env),
    )
    child.close()
    return proc, parent


def _server_environ(python: str, base: Mapping[str, str]) -> dict[str, str]:
    """The variables a server runs with: a server on another interpreter (a ``--pypi``
    environment) is "activated" in its own venv, never the kernel's, so IPython does not
    warn that it works in a foreign virtualenv and a step's `python`/`pip` are its own."""
    env = dict(base)
    if python == sys.executable:
        return env
    root = Path(python).parent.parent
    if (root / "pyvenv.cfg").exists():
        env["VIRTUAL_ENV"] = str(root)
        env["PATH"] = os.pathsep.join([str(root / "bin"), env.get("PATH", "")]).rstrip(os.pathsep)
    else:
        env.pop("VIRTUAL_ENV", None)
    return env


_prestarted: dict[str, tuple[subprocess.Popen | ForkedProcess, socket.socket]] = {}   # interpreter -> server


def preload_in_every_server(modules: tuple[str, ...]) -> None:
    """What every server started from now on imports before it knows its flow
    (a kernel: IPython too, whose steps show a value more often than not)."""
    global _server_preload
    _server_preload = tuple(modules)


_server_preload: tuple[str, ...] = DEFAULT_PRELOAD


def prestart(python: str | None = None, preload_modules: tuple[str, ...] | None = None,
             fork: bool = False) -> None:
    """Start a server process now, so its imports overlap with the caller's own
    work (reading the notebook); the next :func:`get_server` for this
    interpreter configures it, adding the modules the flow needs.

    ``fork``: fork this very process instead of starting an interpreter (its
    start-up, ~0.1 s, is then already paid). Only for a process with no other
    thread yet (the console command, first thing): elsewhere it starts an
    interpreter as usual.
    """
    python = python or sys.executable
    preload_modules = _server_preload if preload_modules is None else preload_modules
    if python in _prestarted:
        return
    if fork and python == sys.executable and threading.active_count() == 1:
        _prestarted[python] = _fork_launch(preload_modules)
    else:
        _on_spawner_thread(lambda: _prestarted.setdefault(python, _launch(python, preload_modules, None)))


def _fork_launch(preload_modules) -> tuple[ForkedProcess, socket.socket]:
    """The fork server as a child of this process, set up as _launch's would be."""
    from flowmagic.runtime.worker.forkserver import main

    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    orchestrator = os.getpid()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()   # or the child would write the pending text again
    pid = os.fork()
    if pid == 0:
        try:
            parent.close()
            os.setsid()   # as start_new_session: a terminal's Ctrl-C goes to the orchestrator only
            devnull = os.open(os.devnull, os.O_RDWR)
            os.dup2(devnull, 0)
            os.dup2(devnull, 1)
            main([str(child.detach()), str(orchestrator), ",".join(preload_modules)])
        finally:
            os._exit(1)   # main() leaves through os._exit(0): here only if it raised
    child.close()
    return ForkedProcess(pid), parent


class ForkedProcess:
    """The part of Popen's interface the handle uses, for a server forked from this process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:   # reaped elsewhere
                self.returncode = 0
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout)
            time.sleep(0.005)
        return self.returncode

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- a base server: forks a fresh server per prelude ------------------------

@dataclass
class _Base:
    proc: subprocess.Popen
    ctrl: socket.socket
    preload: tuple[str, ...]
    lock: threading.Lock = field(default_factory=threading.Lock)
    learned: set[str] = field(default_factory=set)   # flow modules it was asked to import
    importing: int = 0   # preload requests not answered yet

    def learn(self, modules: tuple[str, ...]) -> None:
        """Import the modules a server of this kernel needed, so the servers forked
        after the next prelude edit have them already (pandas: ~0.6-2 s each)."""
        with self.lock:
            missing = [m for m in modules if m not in self.learned]
            if not missing:
                return
            self.learned.update(missing)
            try:
                self.ctrl.send(json.dumps({"op": "preload", "modules": missing}).encode())
                self.importing += 1
            except OSError:
                pass   # gone: the next fork falls back to launching

    def idle(self) -> bool:
        """Whether it has finished importing (call with the lock held): a fork
        asked of a base still importing pandas would wait longer than a launch."""
        while self.importing and select.select([self.ctrl], [], [], 0)[0]:
            if not self.ctrl.recv(_MAX_MESSAGE):
                raise ConnectionError("the base server is gone")
            self.importing -= 1
        return self.importing == 0


_bases: dict[str, _Base] = {}   # interpreter -> its base


def start_base(python: str | None = None) -> None:
    """Start a base server for this interpreter (a kernel: its prelude changes as
    cells are edited). It imports what every server imports and then only forks
    copies of itself, so each new prelude costs running the prelude, not an
    interpreter's start-up and imports (forkserver.serve_as_base)."""
    python = python or sys.executable
    preload_modules = _server_preload
    if python in _bases:
        return

    def launch() -> None:
        proc, ctrl = _launch(python, preload_modules, None, role="base")
        _bases.setdefault(python, _Base(proc, ctrl, preload_modules))
    _on_spawner_thread(launch)   # the base must outlive the thread that forks it (PDEATHSIG)


def _fork_from_base(python: str, preload_modules, env) -> tuple[ServerProcess, socket.socket] | None:
    """A new server forked by the base, or None (no base, another preload, a custom env)."""
    base = _bases.get(python) if env is None else None
    if base is None or base.preload != tuple(preload_modules):
        return None
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    request = {"op": "fork", "env": _server_environ(python, os.environ)}
    try:
        with base.lock:
            if not base.idle():
                parent.close()
                return None
            socket.send_fds(base.ctrl, [json.dumps(request).encode()], [child.fileno()])
            reply = base.ctrl.recv(_MAX_MESSAGE)
        pid = json.loads(reply)["pid"]
        proc = ServerProcess(pid)
    except (OSError, ValueError, KeyError):   # the base is gone: launch as before
        _bases.pop(python, None)
        parent.close()
        return None
    finally:
        child.close()
    return proc, parent


class ServerProcess:
    """The part of Popen's interface the handle uses, for a server the base forked:
    not our child, so it is watched through a pidfd (no pid reuse) and its exit
    status is the base's to reap (``returncode`` -1 once it is gone)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        try:
            self.fd: int | None = os.pidfd_open(pid)
        except ProcessLookupError:   # already exited and reaped
            self.fd, self.returncode = None, -1

    def _gone(self, timeout: float) -> bool:
        if self.returncode is None and select.select([self.fd], [], [], timeout)[0]:
            self.returncode = -1
            os.close(self.fd)
            self.fd = None
        return self.returncode is not None

    def poll(self) -> int | None:
        self._gone(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._gone(timeout):
            raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout)
        return self.returncode

    def kill(self) -> None:
        if self.fd is not None:
            signal.pidfd_send_signal(self.fd, signal.SIGKILL)


def _take_prestarted(python: str, env: dict[str, str] | None):
    found = _prestarted.pop(python, None) if env is None else None
    if found is not None and found[0].poll() is None:
        return found
    return None


def prelude_hash(prelude: str) -> str:
    return hashlib.sha256(prelude.encode()).hexdigest()[:16]


# -- one long-lived thread starts every server --------------------------------

_spawn_requests: queue.Queue[tuple[Callable[[], None], queue.Queue]] = queue.Queue()
_spawner: threading.Thread | None = None
_spawner_lock = threading.Lock()


def _spawner_loop() -> None:
    while True:
        func, reply = _spawn_requests.get()
        try:
            func()
            reply.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            reply.put(exc)


def _on_spawner_thread(func: Callable[[], None]) -> None:
    global _spawner
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():
            _spawner = threading.Thread(target=_spawner_loop, name="flowmagic-forkserver-starter", daemon=True)
            _spawner.start()
    reply: queue.Queue = queue.Queue()
    _spawn_requests.put((func, reply))
    exc = reply.get()
    if exc is not None:
        raise exc


# -- a cache of warm servers, keyed by interpreter and prelude ---------------

_servers: dict[tuple[str, str], ForkServer] = {}
_servers_lock = threading.Lock()


def get_server(prelude: str, *, python: str | None = None, cwd: str | None = None,
               env: dict[str, str] | None = None, preload: tuple[str, ...] = ()) -> ForkServer:
    """A running fork server for this prelude, started if needed; it has
    imported ``preload`` (the flow's heavy modules) before forking tasks.

    When the prelude changes, the servers of the old prelude on the same
    interpreter are closed once no task uses them.
    """
    python = python or sys.executable
    key = (python, prelude_hash(prelude))
    with _servers_lock:
        server = _servers.get(key)
        if server is not None and server.alive() and server.cwd == cwd:
            server.ensure_preloaded(preload)
        else:
            for other_key, other in list(_servers.items()):
                if other_key[0] == python and other.active == 0:
                    other.close()
                    del _servers[other_key]
            server = ForkServer(prelude, python=python, cwd=cwd, env=env, flow_modules=tuple(preload)).start()
            _servers[key] = server
    base = _bases.get(python) if env is None else None
    if base is not None:
        base.learn(tuple(preload))   # after the server is ready: off this step's critical path
    return server


def close_all() -> None:
    with _servers_lock:
        for server in _servers.values():
            server.close()
        _servers.clear()


def close_bases() -> None:
    """Stop every base server (the servers it forked die with it)."""
    while _bases:
        _python, base = _bases.popitem()
        try:
            base.ctrl.send(json.dumps({"op": "exit"}).encode())
        except OSError:
            pass
        base.ctrl.close()
        base.proc.wait()


def has_server(python: str) -> bool:
    """Whether a live (or prestarted) server runs this interpreter: then prestarting one is waste."""
    with _servers_lock:
        if any(key[0] == python and server.alive() for key, server in _servers.items()):
            return True
    return python in _prestarted or python in _bases
