"""Driving a JupyterLab notebook page: open, run all, wait for the kernel, save."""
from __future__ import annotations

import time
from pathlib import Path

import nbformat
from playwright.sync_api import Error as PlaywrightError

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"

KERNEL_IDLE = '.jp-Notebook-ExecutionIndicator[data-status="idle"]'


def write_notebook(path: Path, cells: list[str | tuple[str, str]]) -> Path:
    """Cells are code sources, or ("markdown", text)."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    for cell in cells:
        if isinstance(cell, tuple):
            nb.cells.append(nbformat.v4.new_markdown_cell(cell[1]))
        else:
            nb.cells.append(nbformat.v4.new_code_cell(cell))
    nbformat.write(nb, path)
    return path


def open_notebook(page, lab, name: str) -> None:
    """Open the notebook and wait until its kernel has started and is idle."""
    page.goto(lab.notebook_url(name))
    page.wait_for_selector(".jp-NotebookPanel .jp-Notebook", timeout=60_000)
    deadline = time.monotonic() + 60
    while not _kernel_idle(lab, name):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no idle kernel for {name} after 60 s")
        time.sleep(0.2)
    wait_idle(page, timeout=60_000)


def _kernel_idle(lab, name: str) -> bool:
    for session in lab.api("/api/sessions"):
        if session.get("path") == name and session.get("kernel"):
            return session["kernel"].get("execution_state") == "idle"
    return False


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(KERNEL_IDLE, timeout=timeout)


def run_all(page) -> None:
    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()


def save(page) -> None:
    page.locator(".jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    page.wait_for_function(
        "() => !document.querySelector('.jp-mod-current .jp-mod-dirty, .lm-TabBar-tab.jp-mod-current.jp-mod-dirty')",
        timeout=10_000)


def screenshot(page, name: str, locator=None) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    for tries in range(3):
        try:
            (locator or page).screenshot(path=str(path))
            return path
        except PlaywrightError as exc:
            # A live view re-renders its element as states arrive: the locator finds the new one.
            if "not attached" not in str(exc) or tries == 2:
                raise
    raise AssertionError("unreachable")


def run_cell(page, source: str) -> None:
    """Execute the code cell whose text contains ``source`` (click into it, Shift+Enter)."""
    editor = page.locator(".jp-CodeCell .jp-InputArea-editor", has_text=source).last
    editor.scroll_into_view_if_needed()
    editor.click()
    page.keyboard.press("Shift+Enter")


def wait_attribute(locator, name: str, value: str, timeout: float = 60_000) -> None:
    from playwright.sync_api import expect

    expect(locator).to_have_attribute(name, value, timeout=timeout)
