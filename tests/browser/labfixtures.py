"""Fixtures: a real JupyterLab server and Debian's Chromium, driven by Playwright.

Not a conftest.py: tests/ has one, and both would be imported as the module
`conftest` (tests/test_magics_kernel.py does `from conftest import ...`).
The browser test modules import these fixtures by name.

The server runs on a free local port with a temporary root, its own
settings (no news pop-up) and its own FLOWMAGIC_HOME; the browser is
/usr/bin/chromium (Playwright's own browser download cannot work here).
Screenshots go to test-artifacts/ at the repository root.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

CHROMIUM_FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("FLOWMAGIC_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Lab:
    url: str
    token: str
    root: Path
    settings: Path
    process: subprocess.Popen

    def api(self, path: str, method: str = "GET") -> object:
        request = urllib.request.Request(f"{self.url}{path}", method=method,
                                         headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            body = response.read()
        return json.loads(body) if body else None

    def notebook_url(self, name: str) -> str:
        return f"{self.url}/lab/tree/{name}?token={self.token}&reset"

    def set_theme(self, theme: str) -> None:
        """Takes effect at the next page load (the server reads the file per request)."""
        write_setting(self.settings, "@jupyterlab/apputils-extension", "themes", {"theme": theme})


def write_setting(settings: Path, package: str, plugin: str, value: dict) -> None:
    folder = settings / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{plugin}.jupyterlab-settings").write_text(json.dumps(value))


def _wait_ready(lab: Lab, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if lab.process.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {lab.process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            lab.api("/api/status")
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("jupyter lab did not answer within 60 s")


def _stop(lab: Lab) -> None:
    """Kernels live in their own sessions: end them by pid, then the server."""
    try:
        server = psutil.Process(lab.process.pid)
        family = server.children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    try:
        for kernel in lab.api("/api/kernels"):
            lab.api(f"/api/kernels/{kernel['id']}", method="DELETE")
    except OSError:
        pass
    lab.process.send_signal(signal.SIGTERM)
    try:
        lab.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        lab.process.kill()
        lab.process.wait(timeout=5)
    for proc in family:
        try:
            for child in proc.children(recursive=True):
                child.kill()
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def start_lab(base: Path) -> Lab:
    """Start a JupyterLab server in ``base`` (root/, settings/, home/ made there) and wait for it.

    Used by the ``lab`` fixture and by benchmarks/bench_prelude_edit_lab.py;
    stop it with ``stop_lab``. Its log is ``base/server.log``.
    """
    root, settings, home = base / "root", base / "settings", base / "home"
    for folder in (root, settings, home):
        folder.mkdir(parents=True, exist_ok=True)
    write_setting(settings, "@jupyterlab/apputils-extension", "notification", {"fetchNews": "false"})
    write_setting(settings, "@jupyterlab/apputils-extension", "themes", {"theme": "JupyterLab Light"})
    # start the notebook's kernel without asking; keep every cell in the DOM
    write_setting(settings, "@jupyterlab/notebook-extension", "tracker",
                  {"autoStartDefaultKernel": True, "windowingMode": "none"})
    token = uuid.uuid4().hex
    port = free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(base / "workspaces"),
               JUPYTER_RUNTIME_DIR=str(base / "runtime"),
               FLOWMAGIC_HOME=str(home / ".flowmagic"), PYTHONUNBUFFERED="1")
    log = (base / "server.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
         f"--ServerApp.root_dir={root}", f"--IdentityProvider.token={token}",
         "--ServerApp.port_retries=0", "--allow-root", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()   # the child holds its own copy of the descriptor
    instance = Lab(f"http://127.0.0.1:{port}", token, root, settings, process)
    try:
        _wait_ready(instance, time.monotonic() + 60, base / "server.log")
    except BaseException:
        _stop(instance)
        raise
    return instance


def stop_lab(lab: Lab) -> None:
    """Shut the server and every kernel it started down."""
    _stop(lab)


def launch_chromium(playwright):
    """Debian's Chromium, headless, through a started sync Playwright."""
    path = chromium_path()
    if path is None:
        raise RuntimeError("Debian's chromium is missing: run scripts/install-browser-deps.sh")
    return playwright.chromium.launch(executable_path=path, args=CHROMIUM_FLAGS, headless=True)


@pytest.fixture(scope="session")
def lab(tmp_path_factory) -> Lab:
    """One JupyterLab server for the browser tests (each test uses its own notebook)."""
    base = tmp_path_factory.mktemp("lab")
    instance = start_lab(base)
    try:
        yield instance
    finally:
        stop_lab(instance)
        if os.environ.get("FLOWMAGIC_SHOW_LAB_LOG"):
            print((base / "server.log").read_text())


# Each test module that imports these fixtures defines them anew, so a
# session fixture can be set up once per module; a second sync Playwright in
# one process fails ("Sync API inside the asyncio loop"): share the first.
_SHARED: dict[str, object] = {}


@pytest.fixture(scope="session")
def chromium():
    if "chromium" in _SHARED:
        yield _SHARED["chromium"]
        return
    if chromium_path() is None:
        pytest.fail("Debian's chromium is missing: run scripts/install-browser-deps.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        _SHARED["chromium"] = browser
        try:
            yield browser
        finally:
            _SHARED.pop("chromium", None)
            browser.close()


@pytest.fixture
def lab_page(chromium, request):
    """A fresh page; on failure its screenshot and console go to test-artifacts/."""
    context = chromium.new_context(viewport={"width": 1280, "height": 1000}, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.js_errors = errors  # type: ignore[attr-defined]
    console: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    failed_before = request.session.testsfailed
    try:
        yield page
    finally:
        if request.session.testsfailed > failed_before:  # the call phase of this test failed
            from labpage import screenshot

            path = screenshot(page, f"FAILED-{request.node.name}")
            path.with_suffix(".console.txt").write_text("\n".join(console + errors))
        context.close()

