"""Shared test helpers. Others append fixtures below; keep sections separate."""
from __future__ import annotations

# ---------------------------------------------------------------------------
# Real kernels (H6, magics): jupyter_client kernels with a private store.
# ---------------------------------------------------------------------------
import os
import queue
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_notebooks"


def kernel_env(store_root: Path, **extra: str) -> dict[str, str]:
    """The environment for a test kernel: the tests' store, never the repo's."""
    env = dict(os.environ)
    env["FLOWMAGIC_HOME"] = str(store_root)
    env.pop("JPY_SESSION_NAME", None)
    env.update(extra)
    return env


@dataclass
class Message:
    """One iopub message of an execution, with the time the test received it."""

    received: float
    msg_type: str
    content: dict


@dataclass
class Execution:
    """What executing one cell in a live kernel produced."""

    status: str                      # "ok" | "error" | "aborted"
    reply: dict
    messages: list[Message] = field(default_factory=list)
    started: float = 0.0
    finished: float = 0.0

    @property
    def stdout(self) -> str:
        return "".join(m.content["text"] for m in self.messages
                       if m.msg_type == "stream" and m.content["name"] == "stdout")

    @property
    def stderr(self) -> str:
        return "".join(m.content["text"] for m in self.messages
                       if m.msg_type == "stream" and m.content["name"] == "stderr")

    @property
    def error(self) -> dict | None:
        return next((m.content for m in self.messages if m.msg_type == "error"), None)

    @property
    def error_text(self) -> str:
        """The error output as a user reads it (ANSI colours removed)."""
        import re

        err = self.error
        if err is None:
            return ""
        text = "\n".join(err.get("traceback", [])) + f"\n{err['ename']}: {err['evalue']}"
        return re.sub(r"\x1b\[[0-9;]*m", "", text)

    @property
    def result(self) -> dict | None:
        return next((m.content["data"] for m in self.messages if m.msg_type == "execute_result"), None)

    def displays(self) -> list[dict]:
        return [m.content["data"] for m in self.messages if m.msg_type == "display_data"]


class LiveKernel:
    """A real IPython kernel (jupyter_client) the test drives cell by cell."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        from jupyter_client import KernelManager

        self.cwd = cwd
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(cwd=str(cwd), env=env)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        return self.km.provisioner.process.pid  # type: ignore[union-attr]

    def execute(self, code: str, timeout: float = 120, interrupt_when=None,
                cell_id: str | None = None) -> Execution:
        """Execute one cell; ``interrupt_when(messages)`` -> True sends SIGINT once."""
        content = {"code": code, "silent": False, "store_history": True, "user_expressions": {},
                   "allow_stdin": False, "stop_on_error": False}
        msg = self.kc.session.msg("execute_request", content,
                                  metadata={"cellId": cell_id} if cell_id else {})
        started = time.time()
        self.kc.shell_channel.send(msg)
        msg_id = msg["header"]["msg_id"]
        messages: list[Message] = []
        interrupted = False
        deadline = started + timeout
        idle = False
        while not idle:
            if time.time() > deadline:
                raise TimeoutError(f"cell did not finish in {timeout}s:\n{code}")
            try:
                io = self.kc.get_iopub_msg(timeout=0.1)
            except queue.Empty:
                continue
            if io["parent_header"].get("msg_id") != msg_id:
                continue
            kind = io["header"]["msg_type"]
            if kind == "status":
                idle = io["content"]["execution_state"] == "idle"
                continue
            messages.append(Message(time.time(), kind, io["content"]))
            if interrupt_when is not None and not interrupted and interrupt_when(messages):
                interrupted = True
                self.km.interrupt_kernel()
        reply = self.kc.get_shell_msg(timeout=timeout)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = self.kc.get_shell_msg(timeout=timeout)
        return Execution(reply["content"]["status"], reply["content"], messages, started, time.time())

    def ok(self, code: str, timeout: float = 120) -> Execution:
        """Execute a cell that must succeed; fail the test with its error otherwise."""
        execution = self.execute(code, timeout=timeout)
        assert execution.status == "ok", f"cell failed:\n{code}\n{execution.error_text}\n{execution.stderr}"
        return execution

    def value(self, expression: str) -> Any:
        """Evaluate an expression (a line magic too) in the kernel; its repr,
        printed last, read back with literal_eval."""
        import ast

        execution = self.ok(f"_value_ = {expression}\nprint(repr(_value_))")
        return ast.literal_eval(execution.stdout.strip().splitlines()[-1])

    def shutdown(self) -> None:
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=True)


@pytest.fixture
def live_kernel(tmp_path: Path):
    """A fresh kernel in tmp_path with its own store (tmp_path/store)."""
    kernel = LiveKernel(tmp_path, kernel_env(tmp_path / "store"))
    try:
        yield kernel
    finally:
        kernel.shutdown()


def execute_notebook(path: Path, workdir: Path, env: dict[str, str], *, may_fail: bool = False,
                     timeout: int = 120):
    """Run All with nbclient in a real kernel: stops at the first error, as a
    notebook does. Returns the notebook with its outputs and the error, if any
    (``may_fail``; otherwise the error is raised)."""
    import nbformat
    from jupyter_client import KernelManager
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3")
    client = NotebookClient(nb, km=km, timeout=timeout, resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute(cwd=str(workdir), env=env)
    except CellExecutionError as error:
        if not may_fail:
            raise
        return nb, error
    return nb, None


# ---------------------------------------------------------------------------
# Process-wide state the Client API keeps (lead): a test that points the
# client at its store with namespace_root(path) must not leak it to the next
# test in the same worker.
# ---------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _reset_client_namespace_root():
    yield
    from flowmagic.client import namespace_root

    namespace_root(None)


def pytest_collection_modifyitems(items) -> None:
    """A test that runs the real metaflow package takes seconds (its start-up alone):
    it is slow too, so the quick loop (-m "not slow and not browser") leaves it out."""
    for item in items:
        if item.get_closest_marker("metaflow") and not item.get_closest_marker("slow"):
            item.add_marker(pytest.mark.slow)
