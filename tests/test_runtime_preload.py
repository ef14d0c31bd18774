"""Start-up cost: heavy modules (numpy, pyarrow, pandas) are imported only by
the processes and flows that use them. Real subprocesses and fork servers."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flowmagic.runtime.worker import forkpool
from flowmagic.runtime.worker.forkpool import ForkServer
from flowmagic.runtime.worker.forkserver import ARROW_CODECS, IPYTHON, flow_preload

pytestmark = pytest.mark.slow   # runs whole flows in subprocesses: not in the quick loop

HEAVY = ("numpy", "pyarrow", "pandas")
ENTRY = "flowmagic.runtime.worker.forkserver:run_source"
REPORT = "import sys, json\nprint(json.dumps({m: m in sys.modules for m in %r}))\n" % ((HEAVY + (ARROW_CODECS,)),)


@pytest.fixture(autouse=True)
def _no_shared_servers(monkeypatch):
    """Start every server here from a fresh interpreter. An in-process kernel test
    that ran earlier in this pytest worker may have left a prestarted server or a
    base that learned pandas: a server taken from those has pandas whatever the flow."""
    monkeypatch.setattr(forkpool, "_prestarted", {})
    monkeypatch.setattr(forkpool, "_bases", {})
    monkeypatch.setattr(forkpool, "_server_preload", forkpool.DEFAULT_PRELOAD)


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_plain_values_save_and_load_without_numpy_or_arrow(tmp_path):
    out = _python(f"""
import sys
from flowmagic.store import open_store, save_artifact, load_artifact, value_hash
store = open_store({str(tmp_path)!r})
values = [1, "text", list(range(5000)), {{"a": {{1, 2}}}}, b"raw" * 1000]
for v in values:
    assert load_artifact(store.objects, save_artifact(store.objects, "v", v)) == v
    value_hash(v)
print([m for m in {HEAVY!r} if m in sys.modules])
""")
    assert out.strip() == "[]"


def test_arrays_and_frames_still_go_through_arrow(tmp_path):
    out = _python(f"""
import numpy as np, pandas as pd
from flowmagic.store import open_store, save_artifact, load_artifact, value_hash
store = open_store({str(tmp_path)!r})
arr = np.arange(10.0)
df = pd.DataFrame({{"a": [1, 2], "b": ["x", "y"]}})
refs = [save_artifact(store.objects, "arr", arr), save_artifact(store.objects, "df", df),
        save_artifact(store.objects, "s", df["a"]), save_artifact(store.objects, "m", np.memmap)]
assert (load_artifact(store.objects, refs[0]) == arr).all()
assert load_artifact(store.objects, refs[1]).equals(df)
assert load_artifact(store.objects, refs[2]).equals(df["a"])
assert value_hash(arr) == value_hash(arr.copy()) != value_hash(arr + 1)
print(" ".join(r.serializer for r in refs))
""")
    assert out.split() == ["arrow-numpy", "arrow-pandas", "arrow-pandas", "pickle"]


def test_loading_an_arrow_object_in_a_fresh_process_imports_what_it_needs(tmp_path):
    _python(f"""
import pandas as pd
from flowmagic.store import open_store, save_artifact
import json
store = open_store({str(tmp_path)!r})
ref = save_artifact(store.objects, "df", pd.DataFrame({{"a": [1.5, None]}}))
open({str(tmp_path / "ref.json")!r}, "w").write(json.dumps(ref.to_dict()))
""")
    out = _python(f"""
import json
from flowmagic.store import open_store, load_artifact, ArtifactRef
store = open_store({str(tmp_path)!r})
ref = ArtifactRef.from_dict(json.load(open({str(tmp_path / "ref.json")!r})))
df = load_artifact(store.objects, ref)
print(type(df).__name__, df["a"].isna().tolist())
""")
    assert out.strip() == "DataFrame [False, True]"


@pytest.mark.parametrize("sources, serializers, expected", [
    (["import os\nx = 1", "y = x + 1"], [], ()),
    (["import pandas as pd", "df = pd.DataFrame()"], [], ("pandas", ARROW_CODECS)),
    (["x = 1", "import numpy\ny = numpy.zeros(3)"], ["inline", "pickle"], ("numpy", ARROW_CODECS)),
    (["x = 1"], ["arrow-pandas"], ("pandas", ARROW_CODECS)),
    (["x = 1"], ["arrow-numpy"], ("pyarrow", ARROW_CODECS)),
    (["mypandas_helper = 1\npandasish = 2"], [], ()),
])
def test_flow_preload_follows_the_code_and_the_inputs(sources, serializers, expected):
    assert flow_preload(sources, serializers) == expected


def _run_in_task(server: ForkServer, source: str) -> str:
    """What a task running ``source`` printed."""
    proc = server.spawn(ENTRY)
    proc.channel.sendall(source.encode())
    proc.channel.shutdown(1)
    chunks = []
    while chunk := os.read(proc.stdout, 65536):
        chunks.append(chunk)
    os.read(proc.status, 4096)
    proc.close()
    return b"".join(chunks).decode()


def _task_modules(server: ForkServer) -> dict:
    return json.loads(_run_in_task(server, REPORT))


def test_a_flow_without_pandas_gets_a_server_without_it():
    server = ForkServer("import os\nBASE = 1\n", flow_modules=flow_preload(["import os", "x = BASE"])).start()
    try:
        assert _task_modules(server) == {m: False for m in HEAVY + (ARROW_CODECS,)}
    finally:
        server.close()


def test_a_flow_that_names_pandas_gets_it_preloaded():
    sources = ["import os", "import pandas as pd\ndf = pd.DataFrame({'a': [1]})"]
    server = ForkServer("import os\n", flow_modules=flow_preload(sources)).start()
    try:
        assert all(_task_modules(server).values())
    finally:
        server.close()


def test_a_prelude_that_imports_numpy_brings_the_arrow_codecs():
    server = ForkServer("import numpy as np\n").start()
    try:
        loaded = _task_modules(server)
        assert loaded["numpy"] and loaded["pyarrow"] and loaded[ARROW_CODECS] and not loaded["pandas"]
    finally:
        server.close()


def test_a_running_server_loads_more_modules_and_replaces_its_spare_child():
    server = ForkServer("x = 1\n").start()
    try:
        assert not _task_modules(server)["pandas"]   # this task was the spare; a new spare is forked
        server.ensure_preloaded(flow_preload(serializers=["arrow-pandas"]))
        assert all(_task_modules(server).values())   # not the stale spare: it has pandas already
        assert all(_task_modules(server).values())
    finally:
        server.close()


def test_a_resumed_step_that_loads_a_frame_runs_with_pandas_preloaded(tmp_path):
    """The re-run step's code names no pandas, but its input is an Arrow frame."""
    from runtime_helpers import write_notebook
    from flowmagic.notebook import load_flow
    from flowmagic.runtime.worker import forkpool
    from flowmagic.runtime.orchestrator.scheduler import resume_flow, run_flow
    from flowmagic.store import load_artifact, open_store

    flag = tmp_path / "fail.flag"
    flag.touch()
    end = f"%%step end\nif os.path.exists({str(flag)!r}):\n    raise RuntimeError('on purpose')\ntotal = int(df['a'].sum())"
    nb = write_notebook(tmp_path / "frames_flow.ipynb", [
        "%load_ext flowmagic\nimport os", "%%step start\nimport pandas\ndf = pandas.DataFrame({'a': [1, 2, 3]})", end])
    graph = load_flow(nb)
    store = open_store(tmp_path / "store")
    forkpool.close_all()
    try:
        assert run_flow(graph, store, workdir=str(tmp_path)).status == "failed"
        flag.unlink()
        forkpool.close_all()   # a fresh server, as the console's `resume` gets
        # start is cloned; the code the server is started for now names no pandas anywhere
        write_notebook(nb, ["%load_ext flowmagic\nimport os", "%%step start\ndf = None", end])
        graph = load_flow(nb)
        result = resume_flow(graph, store, workdir=str(tmp_path))
        assert result.status == "succeeded"
        server = forkpool.get_server(graph.prelude, cwd=str(tmp_path))
        assert "pandas" in server.flow_modules
        task = store.meta.tasks(graph.name, result.run_id, "end")[0]
        refs = {r.name: r for r in store.meta.artifacts(task.task_id)}
        assert load_artifact(store.objects, refs["total"]) == 6
    finally:
        forkpool.close_all()


def test_the_server_loads_ipython_without_its_terminal_parts_and_steps_can_still_import_them():
    server = ForkServer("x = 1\n", flow_modules=(IPYTHON,)).start()
    try:
        printed = _run_in_task(server, """import sys
before = [m for m in ("jedi", "prompt_toolkit", "IPython.terminal.embed") if m in sys.modules]
shell = type(get_ipython()).__name__
import jedi
from IPython.terminal.embed import InteractiveShellEmbed
import IPython
print(before, shell, callable(IPython.embed), InteractiveShellEmbed.__name__, bool(jedi.__version__))
""")
        assert printed.strip() == "[] TaskShell True InteractiveShellEmbed True"
    finally:
        server.close()
