"""Drive one attempt of one task: fork it, feed it its spec, pump its output,
enforce its timeout, and collect its manifest and exit status.

Runs on a worker thread of the orchestrator; it never touches metadata (the
orchestrator's thread records what this returns).
"""
from __future__ import annotations

import codecs
import json
import os
import selectors
import signal
import threading
import time
from dataclasses import dataclass, field
from collections.abc import Callable

from flowmagic.runtime.orchestrator.logs import CappedLog, LogLimits
from flowmagic.runtime.protocol import ExceptionRecord, Manifest, TaskSpec
from flowmagic.runtime.worker.forkpool import ForkServer, TaskProcess
from flowmagic.runtime.worker.processes import describe_wait_status, signal_name

TERM_GRACE = 1.0      # seconds between SIGTERM and SIGKILL on a timeout
DRAIN_AFTER_EXIT = 2.0  # how long to wait for pipes to close after the task exited

OutputCallback = Callable[[str, str], None]      # (stream, text)
MessageCallback = Callable[[dict], None]         # display messages from the task


@dataclass
class AttemptExit:
    """What happened to one attempt, as seen from outside the process."""

    outcome: str                      # Outcome: ok | failed | timeout | killed | interrupted
    manifest: Manifest | None
    exit_code: int | None
    signal: int | None
    stdout: str                       # what the store keeps: head, a marker line, tail (logs.py)
    stderr: str
    started_at: float
    finished_at: float
    pid: int | None = None
    exception: ExceptionRecord | None = None
    messages: list[dict] = field(default_factory=list)


def run_attempt(
    server: ForkServer,
    spec: TaskSpec,
    *,
    timeout: float | None = None,
    on_output: OutputCallback | None = None,
    on_message: MessageCallback | None = None,
    cancel: threading.Event | None = None,
    on_start: Callable[[TaskProcess], None] | None = None,
    log_limits: LogLimits | None = None,
) -> AttemptExit:
    started = time.time()
    limits = log_limits or LogLimits.from_env()
    server.hold(+1)  # a server with running tasks is never closed for a newer prelude
    try:
        proc = server.spawn()
        if on_start is not None:
            on_start(proc)
        try:
            _send_spec(proc, spec)
            return _Pump(proc, timeout, on_output, on_message, cancel, started, limits).run()
        finally:
            proc.close()
    finally:
        server.hold(-1)


def _send_spec(proc: TaskProcess, spec: TaskSpec) -> None:
    try:
        proc.channel.sendall(json.dumps(spec.to_json()).encode())
        proc.channel.shutdown(1)  # SHUT_WR: the task reads until EOF
    except OSError:
        pass  # the task died before reading; its exit status tells why


class _Pump:
    def __init__(self, proc, timeout, on_output, on_message, cancel, started, limits: LogLimits) -> None:
        self.proc = proc
        self.timeout = timeout
        self.deadline = started + timeout if timeout else None
        self.late: float | None = None       # it finished, but after its deadline: how long it took
        self.on_output = on_output or (lambda stream, text: None)
        self.on_message = on_message or (lambda msg: None)
        self.cancel = cancel
        self.started = started
        self.logs = {"stdout": CappedLog(limits), "stderr": CappedLog(limits)}  # bounded: a step may print GBs
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in self.logs}
        self.channel_buf = b""
        self.messages: list[dict] = []
        self.manifest: Manifest | None = None
        self.manifest_at: float | None = None   # when the task reported its result
        self.status_buf = b""
        self.wait_status: int | None = None
        self.killed_for: str | None = None   # "timeout" | "interrupted"
        self.term_sent_at: float | None = None

    def run(self) -> AttemptExit:
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ, "stdout")
        sel.register(self.proc.stderr, selectors.EVENT_READ, "stderr")
        sel.register(self.proc.status, selectors.EVENT_READ, "status")
        sel.register(self.proc.channel, selectors.EVENT_READ, "channel")
        exited_at = None
        while sel.get_map():
            if exited_at is not None and time.monotonic() - exited_at > DRAIN_AFTER_EXIT:
                break  # something outside the group holds a pipe open: stop waiting
            # Outputs first: a task sends one only once its earlier text was read (execute.py),
            # so text waiting beside it in this round was written after it.
            for key, _ in sorted(sel.select(timeout=0.1), key=lambda event: event[0].data != "channel"):
                if not self._read(key.data, key.fileobj):
                    sel.unregister(key.fileobj)
            if self.manifest is not None and self.wait_status is None:
                # The task flushed its output, then sent its manifest: it is done.
                # Tearing down a big forked process takes tens of milliseconds;
                # the fork server reaps it (and kills its group) without us.
                self._drain_available(sel)
                self.wait_status = 0
                break
            if self.wait_status is not None and exited_at is None:
                exited_at = time.monotonic()
            self._enforce_limits()
        sel.close()
        self._note_if_late()
        return self._result()

    def _note_if_late(self) -> None:
        """A task that reported its result after its deadline timed out all the same: a limit
        shorter than one poll, or a result read in the same round as the task's exit, is no
        deadline met."""
        if self.killed_for is None and self.manifest_at is not None and self.deadline is not None \
                and self.manifest_at >= self.deadline:
            self.killed_for = "timeout"
            self.late = self.manifest_at - self.started

    def _drain_available(self, sel) -> None:
        for key in list(sel.get_map().values()):
            if key.data not in ("stdout", "stderr"):
                continue
            os.set_blocking(key.fileobj, False)
            try:
                while self._read(key.data, key.fileobj):
                    pass
            except BlockingIOError:
                pass

    def _read(self, what: str, fileobj) -> bool:
        if what == "channel":
            try:
                data = fileobj.recv(1 << 16)
            except OSError:
                data = b""
        else:
            data = os.read(fileobj, 1 << 16)
        if what in ("stdout", "stderr"):
            self.logs[what].append(data)
            text = self.decoders[what].decode(data, final=not data)
            if text:
                self.on_output(what, text)
        elif what == "status":
            self.status_buf += data
            for line in self.status_buf.decode().splitlines():
                if line.startswith("exit "):
                    self.wait_status = int(line.split()[1])
            if not data and self.wait_status is None:
                self.wait_status = -1  # the fork server died: the task died with it
        else:
            self._channel(data)
        return bool(data)

    def _channel(self, data: bytes) -> None:
        self.channel_buf += data
        *lines, self.channel_buf = self.channel_buf.split(b"\n")
        for line in lines:
            if not line.strip():
                continue
            msg = json.loads(line)
            if msg.get("type") == "manifest":
                self._manifest(Manifest.from_json(msg))
            else:
                self._message(msg)

    def _message(self, msg: dict) -> None:
        self.messages.append(msg)
        self.on_message(msg)

    def _manifest(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.manifest_at = time.time()

    def _enforce_limits(self) -> None:
        if self.wait_status is not None:
            return
        now = time.time()
        if self.cancel is not None and self.cancel.is_set() and self.killed_for != "interrupted":
            self.killed_for = "interrupted"
            self.proc.kill(signal.SIGKILL)
            return
        if self.deadline is not None and now >= self.deadline:
            if self.term_sent_at is None:
                self.killed_for = "timeout"
                self.term_sent_at = now
                self.proc.kill(signal.SIGTERM)
            elif now - self.term_sent_at >= TERM_GRACE:
                self.proc.kill(signal.SIGKILL)

    def _result(self) -> AttemptExit:
        exit_code, sig = (None, None)
        if self.wait_status is not None and self.wait_status >= 0:
            exit_code, sig = describe_wait_status(self.wait_status)
        return self._exit(exit_code, sig)

    def _exit(self, exit_code: int | None, sig: int | None) -> AttemptExit:
        outcome, exception = self._judge(exit_code, sig)
        return AttemptExit(
            outcome=outcome,
            manifest=self.manifest,
            exit_code=exit_code,
            signal=sig,
            stdout=self.logs["stdout"].text(),
            stderr=self.logs["stderr"].text(),
            started_at=self.started,
            finished_at=time.time(),
            pid=self.proc.pid,
            exception=exception,
            messages=self.messages,
        )

    def _judge(self, exit_code, sig) -> tuple[str, ExceptionRecord | None]:
        if self.killed_for == "interrupted":
            return "interrupted", _record("KeyboardInterrupt", "the run was interrupted")
        if self.killed_for == "timeout":
            if self.late is not None:
                return "timeout", _record("TimeoutError", f"the task took {self.late:.3g} s, past its timeout "
                                          f"of {self.timeout:g} s (its results are discarded)")
            return "timeout", _record("TimeoutError", f"the task exceeded its timeout of {self.timeout:g} s "
                                      "and was killed")
        if self.manifest is not None and exit_code == 0:
            return self.manifest.outcome, self.manifest.exception
        if sig is not None:
            # flowmagic's own kills are labelled elsewhere (timeout, interrupt, memory.py's limit)
            return "killed", _record("ProcessKilled", f"the task process was killed by {signal_name(sig)}"
                                     + (_FROM_OUTSIDE if sig == signal.SIGKILL else ""))
        if self.wait_status == -1 or self.wait_status is None:
            return "killed", _record("ProcessKilled", "the task process vanished (the fork server died)")
        return "failed", _record("ProcessExited", f"the task process exited with status {exit_code} "
                                 "before reporting its result")


_record = ExceptionRecord.plain
_FROM_OUTSIDE = " from outside flowmagic (another process, or the system's out-of-memory killer)"


# -- a batch of tasks in one process (worker/batch.py) --------------------------------------


@dataclass
class BatchTask:
    """One task of a batch: its spec and where its output goes."""

    spec: TaskSpec
    on_output: OutputCallback
    on_message: MessageCallback


@dataclass
class BatchEnd:
    """How a batch ended: ``done`` tasks have a result (passed to ``on_finished``); the rest never
    started, because the batch process stopped (``reason``) or the task before them failed."""

    done: int
    reason: str | None = None


BATCH_ENTRY = "flowmagic.runtime.worker.batch:main"


def run_batch(
    server: ForkServer,
    tasks: list[BatchTask],
    *,
    timeout: float | None,
    on_started: Callable[[int], None],
    on_finished: Callable[[int, AttemptExit], None],
    on_start: Callable[[TaskProcess], None] | None = None,
    judge_last: Callable[[AttemptExit], AttemptExit] = lambda result: result,
    cancel: threading.Event | None = None,
    log_limits: LogLimits | None = None,
) -> BatchEnd:
    """Run ``tasks`` (of one step, first attempts) one after another in one forked process.

    Each task is timed, logged and judged as if it had a process of its own:
    ``on_started(k)`` when task k begins (task 0: now), ``on_finished(k, exit)``
    when it ends. A process that dies (a crash, a timeout, an interrupt) ends
    the task it was running (``judge_last`` sees that result first: the
    memory watchdog's verdict) and the tasks after it never start.
    """
    limits = log_limits or LogLimits.from_env()
    server.hold(+1)
    try:
        proc = server.spawn(entry=BATCH_ENTRY)
        if on_start is not None:
            on_start(proc)
        try:
            _send_batch(proc, [task.spec for task in tasks])
            pump = _BatchPump(proc, tasks, timeout, on_started, on_finished, cancel, limits)
            last = pump.run()
            if pump.manifest is None:   # the process ended before the task it ran reported: judge it
                on_finished(pump.current, judge_last(last))
                return BatchEnd(pump.current + 1, pump.stop_reason)
            return BatchEnd(pump.done, pump.stop_reason)
        finally:
            proc.close()
    finally:
        server.hold(-1)


def _send_batch(proc: TaskProcess, specs: list[TaskSpec]) -> None:
    try:
        proc.channel.sendall(json.dumps({"batch": [spec.to_json() for spec in specs]}).encode())
        proc.channel.shutdown(1)
    except OSError:
        pass


class _BatchPump(_Pump):
    """A _Pump whose task changes at each manifest: output, messages and the deadline are per task."""

    def __init__(self, proc, tasks: list[BatchTask], timeout, on_started, on_finished, cancel,
                 limits: LogLimits) -> None:
        super().__init__(proc, timeout, None, None, cancel, time.time(), limits)
        self.tasks, self.limits = tasks, limits
        self.on_started, self.on_finished = on_started, on_finished
        self.current = 0      # the task running now
        self.done = 0         # how many tasks reported their result
        self.stop_reason: str | None = None
        self._begin(0)

    def _begin(self, k: int) -> None:
        self.current = k
        task = self.tasks[k]
        self.on_output, self.on_message = task.on_output, task.on_message
        self.started = time.time()
        self.deadline = self.started + self.timeout if self.timeout else None
        self.logs = {"stdout": CappedLog(self.limits), "stderr": CappedLog(self.limits)}
        self.decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in self.logs}
        self.messages = []
        self.manifest = self.manifest_at = None
        self.late = self.killed_for = None
        if k:
            self.on_started(k)

    def _message(self, msg: dict) -> None:
        if msg.get("type") == "batch_stop":   # sent before the manifest of the last task it runs
            self.stop_reason = str(msg.get("reason"))
        else:
            super()._message(msg)

    def _manifest(self, manifest: Manifest) -> None:
        super()._manifest(manifest)
        for stream, decoder in self.decoders.items():   # a character split across tasks: not this one's
            if tail := decoder.decode(b"", final=True):
                self.on_output(stream, tail)
        self._note_if_late()
        self.on_finished(self.current, self._exit(0, None))
        self.done = self.current + 1
        if self.stop_reason is None and self.done < len(self.tasks):
            self._begin(self.done)
        # else the batch is over: run() ends as it does after one task's manifest
