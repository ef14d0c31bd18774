"""execute_cell: a step body run like a notebook cell, in a forked task process.

Every test runs its body in a child forked from the test process, exactly as
a task is forked from the warm fork server, twice: once with the IPython
shell made before the fork (a flow whose code shows it wants IPython) and once
without one (a plain-Python flow: the task makes the shell only when a cell
needs it). The shell's changes to builtins and to matplotlib stay out of pytest.
"""
from __future__ import annotations

import base64
import builtins
import os
import pickle
import sys
import traceback
from typing import Any
from collections.abc import Callable

import pytest

import matplotlib.pyplot  # noqa: F401 - preloaded, as the fork server does: children start warm
import pandas  # noqa: F401

from flowmagic.runtime.worker import execute
from flowmagic.runtime.worker.execute import ExecutionResult, execute_cell, prepare_shell
from flowmagic.store.outputs import OutputLimits

CELL = "<step demo>"
SHELL_MODES = ("shell made before fork", "shell made when needed")
_mode = SHELL_MODES[0]


@pytest.fixture(autouse=True, params=SHELL_MODES)
def shell_mode(request):
    global _mode
    _mode = request.param
    yield request.param
    _mode = SHELL_MODES[0]


def forget_the_shell() -> None:
    """In a forked child: no shell, no IPython builtins, as in a server that did not load IPython."""
    shell_module = sys.modules.get("flowmagic.runtime.worker.shell")
    if shell_module is not None:
        shell_module.TaskShell.clear_instance()
        shell_module._SHELL = None
    for name in ("display", "get_ipython", "__IPYTHON__"):
        builtins.__dict__.pop(name, None)
    execute._PROCESS_READY = False


def in_task_process(func: Callable[[], Any]) -> Any:
    """Run ``func`` in a forked child set up as the current shell mode says;
    return its (picklable) result."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the task process
        os.close(read_fd)
        try:
            if _mode == SHELL_MODES[0]:
                prepare_shell()
            else:
                forget_the_shell()
            result = ("ok", func())
        except BaseException:  # noqa: BLE001 - everything goes back to the test
            result = ("error", traceback.format_exc())
        with os.fdopen(write_fd, "wb") as pipe:
            pickle.dump(result, pipe)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        payload = pipe.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(payload)
    if status == "error":
        pytest.fail(f"the task process raised:\n{value}")
    return value


def run(code: str, namespace: dict | None = None, first_line: int = 2, **kwargs) -> tuple[ExecutionResult, dict, list]:
    """execute_cell in a task process; returns the result, the plain names bound, the live emits."""
    def body():
        ns = {"__name__": "__main__"} if namespace is None else dict(namespace)
        emitted: list[dict] = []
        ns["_emitted"] = emitted
        result = execute_cell(code, ns, filename=CELL, first_line=first_line, emit=emitted.append, **kwargs)
        names = {k: v for k, v in ns.items() if not k.startswith("__") and _picklable(v)}
        return result, names, emitted
    return in_task_process(body)


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
        return True
    except Exception:  # noqa: BLE001
        return False


def kinds(result: ExecutionResult) -> list[str]:
    return [o["type"] for o in result.outputs]


# -- the shell -------------------------------------------------------------------------------


def test_prepare_shell_is_fork_safe_and_leaves_the_process_main_module_alone():
    def body():
        import threading

        from flowmagic.runtime.worker import shell as shell_module

        shell_module.TaskShell.clear_instance()  # a fresh process, as the fork server is before its prelude
        shell_module._SHELL = None
        main = sys.modules["__main__"]
        threads = threading.active_count()
        shell = prepare_shell()
        return (prepare_shell() is shell, sys.modules["__main__"] is main, threading.active_count() == threads,
                os.environ["MPLBACKEND"], shell.history_manager.enabled)
    same, main_kept, no_new_thread, backend, history = in_task_process(body)
    assert same and main_kept and no_new_thread
    assert backend == "module://flowmagic.runtime.worker.mpl_backend"
    assert history is False  # no SQLite connection or saving thread may cross fork()


# -- display and the last value ---------------------------------------------------------


def test_display_of_a_data_frame_is_an_html_table_emitted_while_the_step_runs():
    result, names, emitted = run(
        "import pandas as pd\n"
        "display(pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']}))\n"
        "seen_live = len(_emitted)\n")
    assert result.ok, result.error
    assert kinds(result) == ["display"]
    data = result.outputs[0]["data"]
    assert "<table" in data["text/html"] and "a  b" in data["text/plain"]
    assert names["seen_live"] == 1  # emitted before the next line ran
    assert emitted == result.outputs


def test_the_last_expression_is_the_execute_result_and_only_it():
    result, _, _ = run("x = 20\nx + 1\nx * 2\n")
    assert kinds(result) == ["execute_result"]
    assert result.outputs[0]["data"] == {"text/plain": "40"}


@pytest.mark.parametrize("code", ["x = 1\nx;\n", "x = 1\nx ;  # quiet\n", "None\n", "print('hi')\n", "x = 3\n"])
def test_no_execute_result_for_none_a_semicolon_or_a_statement(code):
    result, _, _ = run(code)
    assert result.ok and result.outputs == []


def test_rich_reprs_keep_their_forms():
    result, _, _ = run(
        "class Html:\n"
        "    def _repr_html_(self): return '<b>bold</b>'\n"
        "class Bundle:\n"
        "    def _repr_mimebundle_(self, include=None, exclude=None):\n"
        "        return {'text/plain': 'plain', 'application/vnd.custom+json': {'k': 1}}, {}\n"
        "display(Html())\n"
        "Bundle()\n")
    assert result.ok, result.error
    html, bundle = result.outputs
    assert html["data"]["text/html"] == "<b>bold</b>"
    assert bundle["type"] == "execute_result"
    assert bundle["data"]["application/vnd.custom+json"] == {"k": 1}


def test_display_of_png_bytes_is_base64_text():
    png = b"\x89PNG\r\n\x1a\nfake"
    result, _, _ = run(f"from IPython.display import Image\ndisplay(Image(data={png!r}, format='png'))\n")
    assert base64.b64decode(result.outputs[0]["data"]["image/png"]) == png


def test_a_broken_repr_html_falls_back_to_text_and_the_step_goes_on(capfd):
    result, names, _ = run(
        "class Bad:\n"
        "    def _repr_html_(self): raise ValueError('no html')\n"
        "    def __repr__(self): return 'Bad()'\n"
        "display(Bad())\n"
        "after = True\n")
    assert result.ok, result.error
    assert result.outputs[0]["data"] == {"text/plain": "Bad()"}
    assert names["after"] is True
    reported = capfd.readouterr().err  # the task's stderr: where the problem is, as a notebook shows it
    assert "in _repr_html_" in reported and "raise ValueError('no html')" in reported
    assert "ValueError: no html" in reported and "IPython" not in reported


def test_display_handles_can_be_updated():
    result, _, _ = run("h = display('one', display_id=True)\nh.update('two')\n")
    first, update = result.outputs
    assert first["type"] == "display" and update["type"] == "update_display"
    assert first["transient"]["display_id"] == update["transient"]["display_id"]
    assert update["data"]["text/plain"] == "'two'"


def test_a_widget_keeps_its_text_form_and_says_why():
    result, _, _ = run("import ipywidgets\ndisplay(ipywidgets.IntSlider(value=3))\n")
    assert result.ok, result.error
    data = result.outputs[0]["data"]
    assert set(data) == {"text/plain"}
    assert "IntSlider" in data["text/plain"] and "cannot run inside a step" in data["text/plain"]


def test_displays_from_threads_arrive_whole():
    result, _, emitted = run(
        "import threading\n"
        "def show(k):\n"
        "    for i in range(50):\n"
        "        display({'thread': k, 'i': i}, raw=True)\n"
        "threads = [threading.Thread(target=show, args=(k,)) for k in range(4)]\n"
        "for t in threads: t.start()\n"
        "for t in threads: t.join()\n")
    assert result.ok, result.error
    assert len(result.outputs) == 200 and emitted == result.outputs


def test_an_emit_that_fails_does_not_fail_the_step():
    def body():
        def broken(_output):
            raise BrokenPipeError("orchestrator gone")
        ns: dict = {}
        result = execute_cell("display(1)\nx = 2\n", ns, filename=CELL, first_line=2, emit=broken)
        return result.ok, ns["x"], len(result.outputs)
    assert in_task_process(body) == (True, 2, 1)


# -- matplotlib -------------------------------------------------------------------------


def _png(output: dict) -> bytes:
    return base64.b64decode(output["data"]["image/png"])


def test_a_figure_still_open_at_the_end_is_captured_as_png_and_small_svg():
    result, _, _ = run("import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('t')\n")
    assert result.ok, result.error
    # the last expression is a Text: shown as the value, then the figure
    assert kinds(result) == ["execute_result", "display"]
    figure = result.outputs[1]["data"]
    assert _png(result.outputs[1]).startswith(b"\x89PNG")
    assert figure["image/svg+xml"].lstrip().startswith("<?xml")
    assert figure["text/plain"].startswith("<Figure size")


def test_plt_show_captures_each_figure_in_order_and_closes_it():
    result, names, _ = run(
        "import matplotlib.pyplot as plt\n"
        "for k in range(2):\n"
        "    plt.plot([0, k])\n"
        "    plt.show()\n"
        "    display(f'after {k}')\n"
        "open_after = plt.get_fignums()\n")
    assert result.ok, result.error
    texts = [o["data"]["text/plain"] for o in result.outputs]
    assert [t.startswith("<Figure") for t in texts] == [True, False, True, False]
    assert texts[1] == "'after 0'" and texts[3] == "'after 1'"
    assert _png(result.outputs[0]) != _png(result.outputs[2])
    assert names["open_after"] == []


def test_a_figure_shown_as_the_value_is_not_shown_twice():
    result, _, _ = run("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\nfig\n")
    assert kinds(result) == ["execute_result"]
    assert _png(result.outputs[0]).startswith(b"\x89PNG")


def test_a_figure_changed_after_display_is_shown_again_at_the_end():
    result, _, _ = run("import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.plot([1, 2])\n"
                       "display(fig)\nax.plot([2, 1]);\n")
    assert kinds(result) == ["display", "display"]
    assert _png(result.outputs[0]) != _png(result.outputs[1])


def test_a_big_figure_gets_png_only():
    result, _, _ = run("import numpy as np, matplotlib.pyplot as plt\nplt.scatter(np.arange(20000), np.arange(20000));\n")
    assert result.ok, result.error
    assert set(result.outputs[0]["data"]) == {"text/plain", "image/png"}


def test_figures_are_captured_even_when_the_step_fails():
    result, _, _ = run("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nraise ValueError('late')\n")
    assert not result.ok and result.error["type"] == "ValueError"
    assert "image/png" in result.outputs[0]["data"]


def test_matplotlib_is_non_interactive_in_the_task():
    result, names, _ = run("import matplotlib\nbackend = matplotlib.get_backend()\n")
    assert result.ok, result.error
    assert names["backend"] in ("module://flowmagic.runtime.worker.mpl_backend", "agg")


# -- IPython syntax -----------------------------------------------------------------------


def test_time_magic_binds_the_name_in_the_namespace():
    result, names, _ = run("def f():\n    return 41\n%time x = f()\ny = x + 1\n")
    assert result.ok, result.error
    assert names["x"] == 41 and names["y"] == 42


def test_time_magic_on_the_last_line_is_the_value():
    result, _, _ = run("%time 6 * 7\n")
    assert result.outputs[0]["data"]["text/plain"] == "42"


def test_get_ipython_works_in_the_step_and_in_its_functions():
    result, names, _ = run(
        "ip = type(get_ipython()).__name__\n"
        "def inner():\n"
        "    return get_ipython() is not None\n"
        "ok = inner()\n"
        "shell_sees_namespace = get_ipython().user_ns['ok']\n")
    assert result.ok, result.error
    assert names["ip"] == "TaskShell" and names["ok"] is True and names["shell_sees_namespace"] is True


def test_getoutput_and_line_magics():
    result, names, _ = run("who = 'world'\nlines = !echo hello {who}\ngreeting = list(lines)\n%env FM_TEST=1\n"
                           "import os\nenv = os.environ['FM_TEST']\n")
    assert result.ok, result.error
    assert names["greeting"] == ["hello world"] and names["env"] == "1"


def test_shell_commands_write_to_the_task_stdout_descriptor_in_order():
    """The task's stdout is a pipe: `!cmd` output must land there, between the prints."""
    def body():
        read_fd, write_fd = os.pipe()
        os.dup2(write_fd, 1)
        os.close(write_fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # line buffered, as in a task
        ns: dict = {}
        result = execute_cell("print('before')\nn = 3\n!echo shell $n\nprint('after')\n", ns,
                              filename=CELL, first_line=2, emit=lambda o: None)
        sys.stdout.flush()
        os.close(1)
        with os.fdopen(read_fd) as pipe:
            return result.ok, pipe.read(), ns.get("_exit_code")
    ok, text, exit_code = in_task_process(body)
    assert ok
    assert text.splitlines() == ["before", "shell 3", "after"]
    assert exit_code == 0


def test_a_cell_magic_on_the_first_line_runs_the_whole_body():
    result, names, _ = run("%%time\na = 2\nb = a * 3\n")
    assert result.ok, result.error
    assert names["a"] == 2 and names["b"] == 6


def test_exit_in_a_step_is_an_error_not_a_missing_name():
    result, _, _ = run("exit(4)\n")
    assert not result.ok and result.error["type"] == "SystemExit"


def test_unknown_magic_is_a_clear_error():
    result, _, _ = run("%nosuchmagic 1\n")
    assert not result.ok
    assert "nosuchmagic" in result.error["message"]


def test_top_level_await():
    result, names, _ = run("import asyncio\nawait asyncio.sleep(0)\nv = await asyncio.sleep(0, result=5)\nv\n")
    assert result.ok, result.error
    assert names["v"] == 5 and result.outputs[0]["data"]["text/plain"] == "5"


def test_functions_defined_in_the_step_have_their_source():
    result, names, _ = run("import inspect\ndef f(a):\n    return a\nsrc = inspect.getsource(f)\n")
    assert names["src"] == "def f(a):\n    return a\n"


def test_the_namespace_gets_only_the_steps_names():
    result, names, _ = run("a = 1\na\n%time b = 2\n")
    assert set(names) == {"a", "b", "_emitted"}


# -- errors -------------------------------------------------------------------------------


def test_an_error_in_a_helper_shows_the_cells_lines_with_cell_numbers():
    code = ("import json\n"                 # cell line 2
            "def helper(v):\n"              # 3
            "    return json.loads(v)\n"    # 4
            "ready = 1\n"                   # 5
            "parsed = helper('{oops')\n"    # 6
            "never = 2\n")                  # 7
    result, names, _ = run(code)
    assert not result.ok
    error = result.error
    assert error["type"] == "json.decoder.JSONDecodeError"
    assert error["line"] == 4
    text = error["traceback"]
    assert f'File "{CELL}", line 6, in <module>' in text and "parsed = helper('{oops')" in text
    assert f'File "{CELL}", line 4, in helper' in text and "return json.loads(v)" in text
    assert "flowmagic" not in text and "IPython" not in text and "execute.py" not in text
    assert error["traceback_lines"] == text.splitlines()
    assert names["ready"] == 1 and "parsed" not in names and "never" not in names


def test_an_error_inside_time_fails_the_step_and_points_at_the_magic_line():
    result, names, _ = run("def f():\n    raise KeyError('k')\nbefore = 1\n%time x = f()\nafter = 2\n", first_line=3)
    assert not result.ok and result.error["type"] == "KeyError"
    assert "%time x = f()" in result.error["traceback"] and ', line 6, in <module>' in result.error["traceback"]
    assert "raise KeyError('k')" in result.error["traceback"]
    assert "IPython" not in result.error["traceback"]
    assert names["before"] == 1 and "after" not in names


def test_a_syntax_error_names_the_cell_line():
    result, _, _ = run("a = 1\nb = (2,\n", first_line=2)
    assert result.error["type"] == "SyntaxError"
    assert result.error["line"] == 3
    assert f'File "{CELL}", line 3' in result.error["traceback"]
    assert "flowmagic" not in result.error["traceback"]


def test_chained_exceptions_keep_both_parts_without_machinery():
    result, _, _ = run("try:\n    1 / 0\nexcept ZeroDivisionError as e:\n    raise RuntimeError('wrapped') from e\n")
    text = result.error["traceback"]
    assert "ZeroDivisionError" in text and "RuntimeError: wrapped" in text
    assert "direct cause" in text and "flowmagic" not in text


def test_system_exit_is_the_steps_error():
    result, names, _ = run("x = 1\nraise SystemExit(3)\n")
    assert not result.ok and result.error["type"] == "SystemExit" and names["x"] == 1


def test_an_exception_whose_str_fails_is_still_reported():
    result, _, _ = run("class Odd(Exception):\n    def __str__(self):\n        raise RuntimeError('no')\nraise Odd()\n")
    assert result.error["type"] == "Odd" and "str() failed" in result.error["message"]


def test_a_user_exception_class_is_named_plainly():
    result, _, _ = run("class Oops(Exception):\n    pass\nraise Oops('no')\n")
    assert result.error["type"] == "Oops" and result.error["message"] == "no"
    assert result.error["traceback"].rstrip().endswith("Oops: no")


# -- size limits ----------------------------------------------------------------------------


def test_an_oversized_form_is_dropped_with_a_note():
    limits = OutputLimits(max_item_bytes=1000)
    result, _, _ = run("from IPython.display import HTML\ndisplay(HTML('<p>' + 'x' * 5000 + '</p>'))\n", limits=limits)
    data = result.outputs[0]["data"]
    assert "text/html" not in data
    assert "text/html form of this output was dropped" in data["text/plain"]
    assert result.outputs[0]["metadata"]["flowmagic"]["dropped"][0]["mimetype"] == "text/html"


def test_limits_come_from_the_environment_and_a_bad_value_fails_the_step_clearly():
    def body():
        os.environ["FLOWMAGIC_OUTPUT_MAX_MB"] = "0.001"
        small = execute_cell("display('x' * 5000)\n", {}, filename=CELL, first_line=2, emit=lambda o: None)
        os.environ["FLOWMAGIC_OUTPUT_MAX_MB"] = "lots"
        bad = execute_cell("x = 1\n", {}, filename=CELL, first_line=2, emit=lambda o: None)
        return small, bad
    small, bad = in_task_process(body)
    assert "text cut at 1.0 KB" in small.outputs[0]["data"]["text/plain"]
    assert not bad.ok and "FLOWMAGIC_OUTPUT_MAX_MB='lots' is not a size in MB" in bad.error["message"]


def test_outputs_beyond_the_total_limit_leave_one_note():
    limits = OutputLimits(max_outputs=3)
    result, names, emitted = run("for i in range(10):\n    display(i)\ndone = True\n", limits=limits)
    assert result.ok and names["done"]
    texts = [o["data"]["text/plain"] for o in result.outputs]
    assert texts[:3] == ["0", "1", "2"]
    assert len(texts) == 4 and "further outputs are not shown or stored" in texts[3]
    assert emitted == result.outputs
