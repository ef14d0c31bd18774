"""Isolated per-step environments (`--pypi`, `--conda`), built for real with uv.

Downloads go through uv's cache (UV_CACHE_DIR, default ~/.cache/uv), so only
the first run on a machine is slow. The suite builds two distinct
environments: `pandas==2.2.3` (the kernel has pandas 3) and the resolver
failure, which builds nothing.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

import flowmagic
from flowmagic.errors import FlowDefinitionError
from flowmagic.runtime.environments import (
    EnvironmentBuildError,
    EnvSpec,
    check_environment_tools,
    ensure_environment,
    list_environments,
    parse_packages,
    prelude_for_environment,
    prune_environments,
    python_for,
    requirement_name,
)

PANDAS_PIN = "pandas==2.2.3"   # has wheels for Python 3.11; the kernel runs pandas 3


@pytest.fixture(scope="module")
def store_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("envstore")


@pytest.fixture(scope="module")
def pandas_env(store_root):
    return ensure_environment(EnvSpec("pypi", (PANDAS_PIN,)), store_root)


def _env_dirs(store_root: Path) -> list[str]:
    return sorted(p.name for p in (store_root / "envs").iterdir() if p.is_dir() and p.name != "requests")


# ----------------------------------------------------------------- parsing (pure)


@pytest.mark.parametrize("text, expected", [
    ("pandas==2.2.3", ("pandas==2.2.3",)),
    ("pandas==2.2.3 pyarrow>=15", ("pandas==2.2.3", "pyarrow>=15")),
    ("'pyarrow >= 15'  numpy", ("pyarrow >= 15", "numpy")),
    ("python-Levenshtein==0.12.0", ("python-Levenshtein==0.12.0",)),
    ("  ", ()),
])
def test_parse_packages(text, expected):
    assert parse_packages(text) == expected


@pytest.mark.parametrize("text", ["==2.0", "'unclosed", ">=1 pandas"])
def test_parse_packages_rejects_what_is_not_a_requirement(text):
    with pytest.raises(FlowDefinitionError) as info:
        parse_packages(text, step="train")
    assert "step 'train'" in str(info.value)


@pytest.mark.parametrize("requirement, name", [
    ("pandas==2.2.3", "pandas"), ("Pandas>=2", "pandas"), ("python_Levenshtein", "python-levenshtein"),
    ("zope.interface", "zope-interface"), ("pyarrow >= 15", "pyarrow"), ("numpy[extra]<3", "numpy"),
])
def test_requirement_name(requirement, name):
    assert requirement_name(requirement) == name


def test_user_pin_replaces_the_worker_requirement_of_the_same_name():
    requirements = EnvSpec("pypi", ("Pandas==2.2.3", "requests")).requirements()
    assert requirements[:2] == ["Pandas==2.2.3", "requests"]
    assert "pandas" not in requirements
    assert {"pyarrow", "numpy", "xxhash", "ipython"} <= {requirement_name(r) for r in requirements}
    # the task code runs against the kernel's IPython: the environment gets the same version
    assert f"ipython=={importlib.metadata.version('ipython')}" in requirements


def test_options_select_the_environment_kind():
    assert EnvSpec.from_options(SimpleNamespace(pypi=None, conda=None)) is None
    assert EnvSpec.from_options(SimpleNamespace(pypi="a b", conda=None)).packages == ("a", "b")
    assert EnvSpec.from_options(SimpleNamespace(pypi=None, conda="pandas=1.5")).kind == "conda"
    with pytest.raises(FlowDefinitionError, match="either --pypi or --conda"):
        EnvSpec.from_options(SimpleNamespace(pypi="a", conda="b"), step="s")


def test_request_key_ignores_package_order_but_not_versions():
    a = EnvSpec("pypi", ("pandas==2.2.3", "requests"))
    assert a.request_key() == EnvSpec("pypi", ("requests", "pandas==2.2.3")).request_key()
    assert a.request_key() != EnvSpec("pypi", ("pandas==2.2.2", "requests")).request_key()


# ----------------------------------------------------------------- building with uv


def test_environment_has_the_pinned_pandas_and_the_kernels_flowmagic(pandas_env, store_root):
    assert pandas_env.created
    assert pandas_env.path == store_root / "envs" / pandas_env.key
    probe = subprocess.run(
        [str(pandas_env.python), "-c",
         "import json, os, pandas, pyarrow, xxhash, IPython, flowmagic;"
         "print(json.dumps([pandas.__version__, os.path.realpath(flowmagic.__file__)]))"],
        capture_output=True, text=True, check=True)
    version, flowmagic_file = json.loads(probe.stdout)
    assert version == "2.2.3"
    assert flowmagic_file == os.path.realpath(flowmagic.__file__)
    assert PANDAS_PIN in pandas_env.packages
    names = {requirement_name(p) for p in pandas_env.packages}
    assert {"pyarrow", "numpy", "xxhash", "ipython"} <= names
    assert "flowmagic" not in names   # linked, not installed: always the kernel's code
    try:
        kernel_cloudpickle = importlib.metadata.version("cloudpickle")
    except importlib.metadata.PackageNotFoundError:
        assert "cloudpickle" not in names
    else:   # notebook-defined objects pickled by the kernel must load in the environment
        assert f"cloudpickle=={kernel_cloudpickle}" in pandas_env.packages


def test_environment_does_not_see_the_kernels_site_packages(pandas_env):
    # The kernel has metaflow installed; the environment must not.
    probe = subprocess.run([str(pandas_env.python), "-c", "import metaflow"], capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'metaflow'" in probe.stderr


def test_second_use_is_instant_and_builds_nothing(pandas_env, store_root):
    before = _env_dirs(store_root)
    started = time.perf_counter()
    again = ensure_environment(EnvSpec("pypi", (PANDAS_PIN,)), store_root)
    elapsed = time.perf_counter() - started
    assert not again.created
    assert again.path == pandas_env.path and again.packages == pandas_env.packages
    assert elapsed < 0.05, f"cached lookup took {elapsed:.3f} s"
    assert _env_dirs(store_root) == before


def test_python_for_returns_the_environments_interpreter(pandas_env, store_root):
    assert python_for(SimpleNamespace(pypi=PANDAS_PIN, conda=None), store_root) == str(pandas_env.python)
    assert python_for(SimpleNamespace(pypi=None, conda=None), store_root) is None


def test_record_lists_request_and_frozen_packages(pandas_env):
    record = json.loads((pandas_env.path / "flowmagic-env.json").read_text())
    assert record["requested"] == [PANDAS_PIN]
    assert record["packages"] == list(pandas_env.packages)
    assert pandas_env.to_record()["packages"] == list(pandas_env.packages)


def test_bad_spec_fails_with_the_resolvers_message_and_leaves_nothing(store_root, pandas_env):
    before = _env_dirs(store_root)
    with pytest.raises(EnvironmentBuildError) as info:
        ensure_environment(EnvSpec("pypi", ("nonexistent-pkg-xyz==1",)), store_root, step="train")
    message = str(info.value)
    assert message.startswith("step 'train': cannot resolve")
    assert "nonexistent-pkg-xyz" in message
    assert "No solution found" in message or "not found in the package registry" in message
    assert _env_dirs(store_root) == before
    assert not list((store_root / "envs").glob(".build-*"))


_BUILD_SCRIPT = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from flowmagic.runtime.environments import EnvSpec, ensure_environment
    start_at = float(sys.argv[2])
    while time.time() < start_at:
        time.sleep(0.005)
    env = ensure_environment(EnvSpec("pypi", (sys.argv[3],)), Path(sys.argv[1]))
    print(json.dumps({"key": env.key, "created": env.created, "python": str(env.python)}))
""")


def _build_concurrently(root: Path, count: int = 2) -> list[dict]:
    start_at = time.time() + 1.0
    procs = [subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, str(root), str(start_at), PANDAS_PIN],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(count)]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        results.append(json.loads(out))
    return results


def test_two_processes_creating_the_same_environment_both_succeed(tmp_path, pandas_env):
    results = _build_concurrently(tmp_path)
    assert len({r["key"] for r in results}) == 1
    assert sorted(r["created"] for r in results) == [False, True]
    assert results[0]["key"] == pandas_env.key   # same resolution, same hash, another store
    assert _env_dirs(tmp_path) == [results[0]["key"]]
    assert not list((tmp_path / "envs").glob(".build-*"))
    version = subprocess.run([results[0]["python"], "-c", "import pandas; print(pandas.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version == "2.2.3"


def test_list_and_prune(tmp_path, pandas_env):
    env = ensure_environment(EnvSpec("pypi", (PANDAS_PIN,)), tmp_path)
    (tmp_path / "envs" / f".build-{env.key}-deadbeef").mkdir()   # left by a killed build
    listed = list_environments(tmp_path)
    assert [e.key for e in listed] == [env.key]
    assert listed[0].requested == (PANDAS_PIN,) and PANDAS_PIN in listed[0].packages
    assert listed[0].size > 1_000_000

    assert prune_environments(tmp_path, unused_for_days=1) == [tmp_path / "envs" / f".build-{env.key}-deadbeef"]
    assert [e.key for e in list_environments(tmp_path)] == [env.key]   # used just now: kept

    assert prune_environments(tmp_path) == [env.path]
    assert list_environments(tmp_path) == []
    assert not list((tmp_path / "envs" / "requests").iterdir())
    rebuilt = ensure_environment(EnvSpec("pypi", (PANDAS_PIN,)), tmp_path)
    assert rebuilt.created and rebuilt.python.exists()


def test_prune_leaves_an_environment_being_built_alone(tmp_path, pandas_env):
    from filelock import FileLock

    env = ensure_environment(EnvSpec("pypi", (PANDAS_PIN,)), tmp_path)
    with FileLock(str(tmp_path / "envs" / f"{env.key}.lock")):
        assert prune_environments(tmp_path) == []
    assert env.python.exists()


# ----------------------------------------------------------------- conda


def test_conda_without_a_conda_tool_is_an_error_before_anything_runs(tmp_path, monkeypatch):
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))   # no micromamba, mamba or conda
    step = SimpleNamespace(name="end", cell=3, options=SimpleNamespace(pypi=None, conda="pandas=1.5"))
    with pytest.raises(FlowDefinitionError) as info:
        check_environment_tools([step])
    message = str(info.value)
    assert "step 'end'" in message and "cell 3" in message
    assert "micromamba" in message and "--pypi" in message
    with pytest.raises(EnvironmentBuildError, match="micromamba"):
        ensure_environment(EnvSpec("conda", ("pandas=1.5",)), tmp_path / "store")
    assert not (tmp_path / "store" / "envs").exists() or not _env_dirs(tmp_path / "store")


def test_pypi_steps_pass_the_tool_check():
    step = SimpleNamespace(name="s", cell=1, options=SimpleNamespace(pypi=PANDAS_PIN, conda=None))
    check_environment_tools([step])   # uv is a dependency of flowmagic


# ----------------------------------------------------------------- the prelude inside an environment

_PRELUDE = '''from __future__ import annotations
import json
import nosuch_module_q as nq, os.path
from nosuch_pkg_q import (a,
    b as bee)
def f():
    import inner_missing_q   # inside a function: untouched, fails only when called
X = json.dumps([1])
'''


def test_prelude_imports_missing_in_the_environment_become_placeholders():
    namespace: dict = {}
    exec(compile(prelude_for_environment(_PRELUDE), "<prelude>", "exec"), namespace)
    assert namespace["X"] == "[1]" and namespace["os"].path.join("a", "b") == "a/b"
    for name, module in (("nq", "nosuch_module_q"), ("a", "nosuch_pkg_q"), ("bee", "nosuch_pkg_q")):
        with pytest.raises(ModuleNotFoundError) as info:
            namespace[name].anything
        assert module in str(info.value) and "--pypi" in str(info.value) and repr(name) in str(info.value)
    with pytest.raises(ModuleNotFoundError):
        namespace["f"]()


@pytest.mark.parametrize("prelude", ["x = 1\n", "def broken(:\n", "import json; import nosuch_q\n"])
def test_prelude_without_a_wrappable_import_is_left_as_it_is(prelude):
    assert prelude_for_environment(prelude) == prelude
