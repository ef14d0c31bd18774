"""Isolated per-step environments: `%%step NAME --pypi "pandas==2.2.3"` / `--conda`.

A step with `--pypi` runs in a virtual environment that holds exactly the
requested packages plus what flowmagic's task code needs to load inputs and
save outputs (:data:`WORKER_REQUIREMENTS`). Environments are built with `uv`
(a PyPI package, so it installs like any dependency) and cached under
``<store_root>/envs/<key>``, where ``key`` is a hash of the *resolved*
specification (every pinned package, the interpreter, the kind), so two
requests that resolve to the same packages share one environment.

Layout of ``<store_root>/envs``::

    <key>/                  a finished environment (exists only when complete)
      bin/python            the interpreter tasks of the step run with
      flowmagic-env.json    the record: request, resolved pins, `uv pip freeze`
      flowmagic-src/flowmagic -> the kernel's flowmagic package (symlink)
    <key>.lock              held while <key> is built (filelock)
    requests/<hash>.json    request -> key, so a second use skips resolution
    .build-<key>-<token>/   a build in progress, renamed to <key> when done

Why flowmagic reaches the environment through a symlink and a ``.pth`` file
instead of being installed into it: the task process speaks the protocol of
the orchestrator that started it (manifest format, serializers), so it must
run the *same* flowmagic code as the kernel, also while that code is being
edited. An installed copy would go stale and would have to be part of the
cache key. Linking the package directory alone (never its parent) keeps
the kernel's other site-packages (its pandas) out of the environment. The
link is re-pointed on every use, so one store can serve several checkouts.

Python version: environments use the kernel's own interpreter (`uv venv
--python <realpath of sys.executable>`). uv could provide other versions only by
downloading a standalone Python build from outside the package registries,
which this workplace cannot reach, so there is no `--python` option.

`--conda` uses micromamba, mamba or conda from PATH (in that order) with the
conda-forge channel, pins Python to the kernel's major.minor version so
pickles and Arrow files cross over, and builds in place under the lock
(conda environments are not relocatable, so the build-then-rename used for
uv environments would break them); the record file is written last and
marks the environment complete.
"""
from __future__ import annotations

import contextvars
import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from collections.abc import Callable, Iterable

from flowmagic.errors import FlowDefinitionError, RunError
from flowmagic.runtime.environments.prelude import prelude_for_environment
from flowmagic.store.environments import recorded_environments

EnvKind = Literal["pypi", "conda"]

# What flowmagic's task code imports inside the environment to load inputs
# and save outputs; a user's own requirement for one of these names wins.
WORKER_REQUIREMENTS: tuple[str, ...] = ("pyarrow", "numpy", "pandas", "xxhash", "ipython", "cloudpickle")
# The same, named as conda-forge names them.
CONDA_WORKER_REQUIREMENTS: tuple[str, ...] = ("pyarrow", "numpy", "pandas", "python-xxhash", "ipython",
                                              "cloudpickle")
# Pinned to the kernel's own versions: a step's magics and shown values behave
# as in the kernel's IPython (another major works too: tested), cloudpickle's by-value
# pickles only load with the version that wrote them, and content hashes must
# agree with the kernel's. numpy/pyarrow/pandas stay free: the user's
# packages decide those, and Arrow files cross versions.
KERNEL_MATCHED: tuple[str, ...] = ("xxhash", "python-xxhash", "ipython", "cloudpickle")
CONDA_TOOLS: tuple[str, ...] = ("micromamba", "mamba", "conda")
CONDA_CHANNEL = "conda-forge"

RECORD_FILE = "flowmagic-env.json"
SOURCE_LINK_DIR = "flowmagic-src"
PTH_FILE = "_flowmagic_source.pth"
# A build holds the lock for as long as it takes; a waiter gives up after this.
LOCK_TIMEOUT_SECONDS = 30 * 60
_RECORD_VERSION = 2   # part of the key: a new layout builds new environments


class EnvironmentBuildError(RunError):
    """An environment could not be resolved or built; the message carries the tool's own output."""

    def __init__(self, message: str, *, step: str | None = None, spec: EnvSpec | None = None) -> None:
        self.step = step
        self.spec = spec
        prefix = f"step '{step}': " if step else ""
        super().__init__(prefix + message)


@dataclass(frozen=True)
class EnvSpec:
    """What a step asked for: its packages, as written, and the kernel's interpreter."""

    kind: EnvKind
    packages: tuple[str, ...]
    python: str = field(default_factory=lambda: ".".join(map(str, sys.version_info[:3])))
    # resolved: `python` and `python3.11` (or a venv's link) are one interpreter, one cache key
    interpreter: str = field(default_factory=lambda: os.path.realpath(sys.executable))

    @classmethod
    def from_options(cls, options: Any, *, step: str | None = None) -> EnvSpec | None:
        """The environment a step's options ask for (``options.pypi`` / ``.conda``), or None."""
        pypi = getattr(options, "pypi", None)
        conda = getattr(options, "conda", None)
        if pypi and conda:
            raise FlowDefinitionError("use either --pypi or --conda, not both", step=step)
        if pypi:
            return cls("pypi", parse_packages(pypi, step=step))
        if conda:
            return cls("conda", parse_packages(conda, step=step))
        return None

    def requirements(self) -> list[str]:
        """The user's packages plus each worker requirement the user did not name (with a remote
        store, ``FLOWMAGIC_STORE``, its file system too: the task reads and writes the bucket)."""
        named = {requirement_name(p) for p in self.packages}
        worker = WORKER_REQUIREMENTS if self.kind == "pypi" else CONDA_WORKER_REQUIREMENTS
        pinned = [_as_kernel_pin(w, self.kind) for w in worker if requirement_name(w) not in named]
        if self.kind == "pypi":
            pinned += [_kernel_pin(d) for d in store_requirements() if requirement_name(d) not in named]
        return list(self.packages) + [p for p in pinned if p]

    def request_key(self) -> str:
        """Hash of the request itself: used to find an already resolved environment."""
        return _digest({"kind": self.kind, "requirements": sorted(self.requirements()),
                        "python": self.python, "interpreter": self.interpreter, "layout": _RECORD_VERSION})

    def describe(self) -> str:
        return f"--{self.kind} \"{' '.join(self.packages)}\""


@dataclass(frozen=True)
class Environment:
    """A finished environment in the cache."""

    spec: EnvSpec
    key: str
    path: Path
    packages: tuple[str, ...]   # `uv pip freeze` of the environment: "name==version"
    created: bool = False       # True when this call built it (False: found in the cache)

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def to_record(self) -> dict:
        """What a run records about the environment a step ran in."""
        return {"kind": self.spec.kind, "requested": list(self.spec.packages), "key": self.key,
                "python": self.spec.python, "packages": list(self.packages)}


@dataclass(frozen=True)
class CachedEnvironment:
    """One entry of `flowmagic env list`."""

    key: str
    path: Path
    kind: str
    requested: tuple[str, ...]
    packages: tuple[str, ...]
    size: int
    last_used: float

    def to_json(self) -> dict:
        return {"key": self.key, "path": str(self.path), "kind": self.kind,
                "requested": list(self.requested), "packages": list(self.packages),
                "size": self.size, "last_used": self.last_used}


# ----------------------------------------------------------------- parsing

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def parse_packages(text: str, *, step: str | None = None) -> tuple[str, ...]:
    """Split `"pandas==2.2.3 'pyarrow >= 15'"` into requirements (shell quoting allowed)."""
    try:
        packages = tuple(p for p in shlex.split(text) if p.strip())
    except ValueError as exc:
        raise FlowDefinitionError(f"cannot read the package list {text!r}: {exc}", step=step) from None
    for package in packages:
        if not _NAME.match(package):
            raise FlowDefinitionError(
                f"{package!r} is not a package requirement (write e.g. \"pandas==2.2.3\")", step=step)
    return packages


def requirement_name(requirement: str) -> str:
    """The normalised distribution name of a requirement (`Pandas>=2` -> `pandas`)."""
    match = _NAME.match(requirement)
    name = match.group(1) if match else requirement
    return re.sub(r"[-_.]+", "-", name).lower()


def _as_kernel_pin(requirement: str, kind: EnvKind) -> str | None:
    """A worker requirement, pinned to the kernel's version where it must match.

    cloudpickle is left out when the kernel has none (nothing pickles with it then).
    """
    if requirement not in KERNEL_MATCHED:
        return requirement
    version = _kernel_version("xxhash" if requirement == "python-xxhash" else requirement)
    if version is None:
        return None if requirement == "cloudpickle" else requirement
    return f"{requirement}=={version}" if kind == "pypi" else f"{requirement}={version}"


def store_requirements() -> tuple[str, ...]:
    """The distributions a task needs for this process's remote store (``FLOWMAGIC_STORE=s3://...``:
    fsspec and s3fs), or () for a local store."""
    from flowmagic.store.backends import store_modules, store_url

    url = store_url()
    if url is None:
        return ()
    return ("fsspec", *(module.split(".")[0] for module in store_modules(url)))


def _kernel_pin(distribution: str) -> str:
    version = _kernel_version(distribution)
    return f"{distribution}=={version}" if version else distribution


@functools.cache
def _kernel_version(distribution: str) -> str | None:
    """Cached: importlib.metadata scans every path entry, a few ms per call."""
    import importlib.metadata   # here: ~20 ms that a flow without environments never needs

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


# ----------------------------------------------------------------- public entry points


def python_for(options: Any, store_root: Path, *, step: str | None = None) -> str | None:
    """The interpreter a step's tasks must run with, or None for the kernel's own.

    Builds (or finds) the step's environment on first use. Raises
    :class:`EnvironmentBuildError` with the resolver's message when it cannot.
    """
    spec = EnvSpec.from_options(options, step=step)
    if spec is None:
        return None
    return str(ensure_environment(spec, Path(store_root), step=step).python)


def environment_server(step: Any, prelude: str, store_root: Path, *, workdir: str | None = None,
                       stop: threading.Event | None = None) -> tuple[Environment, Any]:
    """The environment of a step and its warm fork server (one per environment),
    built or found, and started on first use: safe to call off the
    orchestrator's thread (it writes no metadata; record the environment with
    :func:`record_environment`). The server's prelude has its imports made
    tolerant of modules the environment lacks. Raises EnvironmentBuildError
    (the resolver's message, or ``stop`` was set during a build) or PreludeError.
    """
    from flowmagic.runtime.worker.forkpool import get_server

    spec = EnvSpec.from_options(step.options, step=step.name)
    token = build_stopped.set(stop)
    try:
        env = ensure_environment(spec, Path(store_root), step=step.name)
    finally:
        build_stopped.reset(token)
    return env, get_server(prelude_for_environment(prelude), python=str(env.python), cwd=workdir)


def prestart_servers(steps: Iterable[Any], store_root: Path) -> None:
    """Start the fork servers of the steps' already-built environments now, so their
    imports overlap with the run's first steps (an environment not built yet is
    built when its step runs, never here)."""
    from flowmagic.runtime.worker import forkpool

    for step in steps:
        spec = EnvSpec.from_options(step.options, step=step.name)
        env = _lookup_request(Path(store_root) / "envs", spec) if spec is not None else None
        if env is not None and not forkpool.has_server(str(env.python)):
            forkpool.prestart(str(env.python))


def record_environment(meta: Any, flow: str, run_id: int, step: str, env: Environment) -> None:
    """Keep ``env.to_record()`` in the run's stored graph document, under ``"environments"``."""
    graph = dict(meta.get_run(flow, run_id).graph or {})
    environments = dict(graph.get("environments") or {})
    if environments.get(step) == env.to_record():
        return
    environments[step] = env.to_record()
    graph["environments"] = environments
    meta.set_run_graph(flow, run_id, graph=graph)


def graph_with_environments(graph: Any, run: Any) -> dict:
    """``graph.to_json()`` keeping the run's environment records of steps that still have one.

    A session run's graph document is rewritten whenever a cell changes; the
    environments recorded by earlier steps must survive that.
    """
    document = graph.to_json()
    current = {s.name for s in graph.steps if s.options.pypi or s.options.conda}
    kept = {name: record for name, record in recorded_environments(run).items() if name in current}
    if kept:
        document["environments"] = kept
    return document


def check_environment_tools(steps: Iterable[Any]) -> None:
    """Raise FlowDefinitionError, before anything runs, when a step's environment tool is missing.

    ``steps`` are StepSpec-like records (``name``, ``cell``, ``options``).
    """
    for step in steps:
        spec = EnvSpec.from_options(step.options, step=step.name)
        if spec is None:
            continue
        try:
            _tool_for(spec.kind)
        except EnvironmentBuildError as exc:
            raise FlowDefinitionError(str(exc), step=step.name, cell=getattr(step, "cell", None)) from None


def ensure_environment(spec: EnvSpec, store_root: Path, *, step: str | None = None) -> Environment:
    """Find or build the environment for ``spec`` under ``<store_root>/envs``.

    The second call for the same request reads two small files and returns.
    Concurrent callers (threads or processes) building the same environment
    serialise on a file lock; the loser finds the winner's finished build.
    """
    tool = _tool_for(spec.kind, step=step)
    envs = Path(store_root) / "envs"
    envs.mkdir(parents=True, exist_ok=True)
    cached = _lookup_request(envs, spec)
    if cached is not None:
        return cached
    if spec.kind == "pypi":
        pins = _resolve_pypi(tool, spec, step)
        key = _digest({"kind": "pypi", "pins": pins, "python": spec.python, "interpreter": spec.interpreter,
                       "layout": _RECORD_VERSION})
        build = lambda final: _build_pypi(tool, spec, pins, envs, final, step)  # noqa: E731
    else:
        key = spec.request_key()   # the conda tool resolves inside its `create`
        build = lambda final: _build_conda(tool, spec, final, step)  # noqa: E731
    env = _ensure_built(envs, key, spec, build, step)
    _remember_request(envs, spec, key)
    return env


# ----------------------------------------------------------------- locks for other machines (Dask workers)

#: where a Dask worker keeps the environments it builds from locks (see :func:`worker_envs_root`)
ENV_CACHE_VAR = "FLOWMAGIC_ENV_CACHE"
LOCKS_DIR = "locks"   # <store_root>/envs/locks/<request key>.json: a request resolved for other machines


@dataclass(frozen=True)
class Lock:
    """A ``--pypi`` request resolved once, by the orchestrator: the exact pins every worker installs.

    It travels with each attempt (:meth:`to_json`); a worker builds it with
    :func:`environment_from_lock` into a cache of its own. ``key`` hashes the
    pins and the Python version they were resolved for (not the interpreter's
    path, which differs between machines).
    """

    spec: EnvSpec
    pins: tuple[str, ...]

    @property
    def key(self) -> str:
        return _digest({"kind": self.spec.kind, "pins": list(self.pins), "python": self.spec.python,
                        "layout": _RECORD_VERSION})

    @property
    def packages(self) -> tuple[str, ...]:   # what the run records, as for a built environment
        return self.pins

    def to_record(self) -> dict:
        return {"kind": self.spec.kind, "requested": list(self.spec.packages), "key": self.key,
                "python": self.spec.python, "packages": list(self.pins)}

    def to_json(self) -> dict:
        return {"kind": self.spec.kind, "requested": list(self.spec.packages), "pins": list(self.pins),
                "python": self.spec.python}

    @classmethod
    def from_json(cls, data: dict) -> Lock:
        spec = EnvSpec(data["kind"], tuple(data["requested"]), python=data["python"], interpreter="")
        return cls(spec, tuple(data["pins"]))


def resolve_lock(step: Any, store_root: Path, *, stop: threading.Event | None = None) -> Lock:
    """The lock of a step's ``--pypi`` environment, for tasks that run on other machines.

    Resolved as a local build resolves (``uv pip compile`` for this
    interpreter), once: kept under ``<store_root>/envs/locks``, and taken from
    the step's local environment when one was built. Nothing is installed
    here. Raises EnvironmentBuildError (the resolver's message).
    """
    spec = EnvSpec.from_options(step.options, step=step.name)
    if spec is None or spec.kind != "pypi":
        raise EnvironmentBuildError("only --pypi environments have a lock for other machines", step=step.name)
    envs = Path(store_root) / "envs"
    path = envs / LOCKS_DIR / f"{spec.request_key()}.json"
    try:
        lock = Lock(spec, tuple(json.loads(path.read_text())["pins"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    else:
        _touch(path)   # its last use: `env prune` forgets locks as it removes environments
        return lock
    pins = _local_pins(envs, spec)
    if pins is None:
        token = build_stopped.set(stop)
        try:
            pins = _resolve_pypi(_uv_binary(step.name), spec, step.name)
        finally:
            build_stopped.reset(token)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps({"pins": pins}))
    return Lock(spec, tuple(pins))


def _local_pins(envs: Path, spec: EnvSpec) -> list[str] | None:
    """The pins of this request's environment built here before, if any."""
    env = _lookup_request(envs, spec)
    if env is None:
        return None
    try:
        pins = json.loads((env.path / RECORD_FILE).read_text()).get("pins")
    except (OSError, ValueError):
        return None
    return list(pins) if pins else None


def worker_envs_root(env: dict[str, str] | None = None) -> Path:
    """Where a Dask worker builds environments from locks: ``$FLOWMAGIC_ENV_CACHE``, else
    ``$FLOWMAGIC_HOME/envs``, else ``$XDG_CACHE_HOME/flowmagic/envs`` (``~/.cache/flowmagic/envs``).
    The layout is a store's ``envs/`` folder (``flowmagic env list`` reads it with the parent as home)."""
    env = os.environ if env is None else env
    if env.get(ENV_CACHE_VAR, "").strip():
        return Path(env[ENV_CACHE_VAR].strip()).expanduser().absolute()
    if env.get("FLOWMAGIC_HOME", "").strip():
        return Path(env["FLOWMAGIC_HOME"].strip()).expanduser().absolute() / "envs"
    base = env.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base).absolute() / "flowmagic" / "envs"


def environment_from_lock(lock: Lock, envs: Path, *, step: str | None = None,
                          on_build: Callable[[], None] | None = None) -> Environment:
    """This machine's environment for ``lock``, built (exactly its pins, nothing resolved) or found.

    Cached in ``envs`` under a key of the pins and *this* interpreter (the
    formula of a local build, so the same pins share one environment);
    concurrent callers, threads or processes, build once (a file lock).
    ``on_build`` is called by the one caller that builds, before it does.
    Raises EnvironmentBuildError: no uv, another Python version than the
    lock's, or the installer's message.
    """
    here = EnvSpec(lock.spec.kind, lock.spec.packages)   # this machine's interpreter
    if here.python.split(".")[:2] != lock.spec.python.split(".")[:2]:
        raise EnvironmentBuildError(
            f"{lock.spec.describe()} was resolved for Python {lock.spec.python} (the orchestrator's) but this "
            f"machine runs Python {here.python}: run the workers on the orchestrator's Python version",
            step=step, spec=here)
    pins = list(lock.pins)
    key = _digest({"kind": "pypi", "pins": pins, "python": here.python, "interpreter": here.interpreter,
                   "layout": _RECORD_VERSION})
    envs = Path(envs)
    found = _load_finished(envs / key, here, key)
    if found is not None:
        return found
    uv = _uv_binary(step)
    envs.mkdir(parents=True, exist_ok=True)

    def build(final: Path) -> list[str]:
        if on_build is not None:
            on_build()
        return _build_pypi(uv, here, pins, envs, final, step)

    return _ensure_built(envs, key, here, build, step)


# ----------------------------------------------------------------- cache lookup


def _lookup_request(envs: Path, spec: EnvSpec) -> Environment | None:
    """The environment this exact request resolved to before, when it still exists."""
    try:
        key = json.loads((envs / "requests" / f"{spec.request_key()}.json").read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None
    return _load_finished(envs / key, spec, key)


def _load_finished(path: Path, spec: EnvSpec, key: str, *, created: bool = False) -> Environment | None:
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, ValueError):
        return None   # absent, or a conda build still in progress
    _link_flowmagic(path)
    _touch(path / RECORD_FILE)
    return Environment(spec=spec, key=key, path=path, packages=tuple(record.get("packages", ())),
                       created=created)


def _remember_request(envs: Path, spec: EnvSpec, key: str) -> None:
    requests = envs / "requests"
    requests.mkdir(exist_ok=True)
    _write_atomic(requests / f"{spec.request_key()}.json", json.dumps({"key": key}))


def _ensure_built(envs: Path, key: str, spec: EnvSpec, build: Callable[[Path], object],
                  step: str | None) -> Environment:
    final = envs / key
    found = _load_finished(final, spec, key)
    if found is not None:
        return found
    from filelock import FileLock, Timeout   # here: ~40 ms of imports a flow without environments never needs

    lock = FileLock(str(envs / f"{key}.lock"))
    stop = build_stopped.get()   # a waiter polls it: a stopped run (a cancelled attempt) waits no longer
    deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
    while True:
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_SECONDS if stop is None else min(0.25, LOCK_TIMEOUT_SECONDS))
            break
        except Timeout:
            if stop is not None and stop.is_set():
                raise EnvironmentBuildError(f"building {spec.describe()} was stopped: the run ended first",
                                            step=step, spec=spec) from None
            if stop is None or time.monotonic() >= deadline:
                raise EnvironmentBuildError(f"waited {LOCK_TIMEOUT_SECONDS} s for another process building "
                                            f"{final}", step=step, spec=spec) from None
    try:
        found = _load_finished(final, spec, key)   # built by whoever held the lock
        if found is not None:
            return found
        if final.exists():                        # left over by a killed conda build
            shutil.rmtree(final, ignore_errors=True)
        build(final)   # writes the record last: from then on the environment is complete
    finally:
        lock.release()
    env = _load_finished(final, spec, key, created=True)
    if env is None:   # pruned between the build and this line
        raise EnvironmentBuildError(f"the environment {final} was removed right after it was built; run again",
                                    step=step, spec=spec)
    return env


# ----------------------------------------------------------------- building with uv


def _resolve_pypi(uv: str, spec: EnvSpec, step: str | None) -> list[str]:
    """Pin every package (transitively) for the kernel's interpreter: `uv pip compile`."""
    out = _run_tool(
        [uv, "pip", "compile", "-", "--python", spec.interpreter, "--no-header", "--no-annotate", "--quiet"],
        spec, step, stdin="\n".join(spec.requirements()) + "\n", action="resolve")
    return sorted(line.strip() for line in out.splitlines() if line.strip() and not line.startswith("#"))


def _build_pypi(uv: str, spec: EnvSpec, pins: list[str], envs: Path, final: Path, step: str | None) -> list[str]:
    """Create the venv in a temporary folder, install exactly ``pins``, rename it into place."""
    temp = envs / f".build-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        _run_tool([uv, "venv", "--quiet", "--relocatable", "--python", spec.interpreter, str(temp)],
                  spec, step, action="create the environment for")
        requirements = temp / "flowmagic-requirements.txt"
        requirements.write_text("\n".join(pins) + "\n")
        # Compiled now, once: a fork server must not compile pandas on every start (and
        # with PYTHONDONTWRITEBYTECODE set, as here, it would never be cached).
        _run_tool([uv, "pip", "sync", "--quiet", "--compile-bytecode", "--python", str(temp / "bin" / "python"),
                   str(requirements)], spec, step, action="install the packages of")
        packages = _freeze(uv, temp, spec, step)
        _install_source_link(temp)
        _write_record(temp, spec, final.name, pins, packages)
        os.rename(temp, final)
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    return packages


def _freeze(uv: str, env: Path, spec: EnvSpec, step: str | None) -> list[str]:
    out = _run_tool([uv, "pip", "freeze", "--python", str(env / "bin" / "python")], spec, step,
                    action="list the packages of")
    return sorted(line.strip() for line in out.splitlines() if line.strip())


# ----------------------------------------------------------------- building with conda


def _build_conda(tool: str, spec: EnvSpec, final: Path, step: str | None) -> list[str]:
    """`<tool> create --prefix <final>`: built in place (conda prefixes are not relocatable)."""
    major_minor = ".".join(spec.python.split(".")[:2])
    command = [tool, "create", "--yes", "--quiet", "--prefix", str(final), "--channel", CONDA_CHANNEL,
               f"python={major_minor}", *spec.requirements()]
    try:
        _run_tool(command, spec, step, action="create the conda environment for")
        packages = _freeze(_uv_binary(step), final, spec, step)
        _install_source_link(final)
        _write_record(final, spec, final.name, [], packages)
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise
    return packages


# ----------------------------------------------------------------- flowmagic inside the environment


def _install_source_link(env: Path) -> None:
    """Put the kernel's flowmagic package (only it) on the environment's path."""
    site_packages = _site_packages(env)
    relative = os.path.relpath(env / SOURCE_LINK_DIR, site_packages)   # relative: survives the rename
    (site_packages / PTH_FILE).write_text(relative + "\n")
    (env / SOURCE_LINK_DIR).mkdir(exist_ok=True)
    _link_flowmagic(env)


def _link_flowmagic(env: Path) -> None:
    """Point ``<env>/flowmagic-src/flowmagic`` at this process's flowmagic, atomically."""
    target = str(Path(__file__).resolve().parents[2])   # flowmagic/, found without importing the facade
    link = env / SOURCE_LINK_DIR / "flowmagic"
    try:
        if os.readlink(link) == target:
            return
    except OSError:
        pass
    temp = link.with_name(f".flowmagic-{uuid.uuid4().hex[:8]}")
    os.symlink(target, temp)
    os.replace(temp, link)


def _site_packages(env: Path) -> Path:
    candidates = sorted((env / "lib").glob("python3*/site-packages"))
    if not candidates:
        raise EnvironmentBuildError(f"no site-packages folder in {env}")
    return candidates[0]


# ----------------------------------------------------------------- listing and pruning


def list_environments(store_root: Path) -> list[CachedEnvironment]:
    """Every finished environment in the store, most recently used first."""
    envs = Path(store_root) / "envs"
    found = []
    for path in sorted(envs.glob("*/" + RECORD_FILE)) if envs.is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        found.append(CachedEnvironment(
            key=path.parent.name, path=path.parent, kind=record.get("kind", "?"),
            requested=tuple(record.get("requested", ())), packages=tuple(record.get("packages", ())),
            size=_tree_size(path.parent), last_used=path.stat().st_mtime))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def prune_environments(store_root: Path, *, unused_for_days: float = 0.0) -> list[Path]:
    """Delete environments not used for ``unused_for_days`` (0: all), abandoned builds, and the
    locks (requests resolved for Dask workers) not used for as long.

    An environment being built right now (its lock is held) is left alone.
    Returns the removed folders.
    """
    envs = Path(store_root) / "envs"
    if not envs.is_dir():
        return []
    cutoff = time.time() - unused_for_days * 86400
    removed = []
    for env in list_environments(store_root):
        if env.last_used <= cutoff and _remove_unless_locked(envs, env.key, [env.path]):
            removed.append(env.path)
    for temp in envs.glob(".build-*"):
        key = temp.name[len(".build-"):].rsplit("-", 1)[0]
        if _remove_unless_locked(envs, key, [temp]):
            removed.append(temp)
    _forget_missing_requests(envs)
    for lock in (envs / LOCKS_DIR).glob("*.json"):   # the next run on Dask resolves its request again
        try:
            if lock.stat().st_mtime <= cutoff:
                lock.unlink()
        except OSError:
            pass
    return removed


def _remove_unless_locked(envs: Path, key: str, paths: list[Path]) -> bool:
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(envs / f"{key}.lock")).acquire(timeout=0):
            for path in paths:
                shutil.rmtree(path, ignore_errors=True)
    except Timeout:
        return False
    (envs / f"{key}.lock").unlink(missing_ok=True)
    return True


def _forget_missing_requests(envs: Path) -> None:
    for request in (envs / "requests").glob("*.json"):
        try:
            key = json.loads(request.read_text())["key"]
        except (OSError, ValueError, KeyError):
            key = None
        if key is None or not (envs / key / RECORD_FILE).exists():
            request.unlink(missing_ok=True)


def _tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


# ----------------------------------------------------------------- tools and small helpers


def _tool_for(kind: EnvKind, *, step: str | None = None) -> str:
    return _uv_binary(step) if kind == "pypi" else _conda_binary(step)


_find_uv_lock = threading.Lock()


def _uv_binary(step: str | None = None) -> str:
    try:
        from uv import find_uv_bin

        # one thread at a time: find_uv_bin reads sysconfig, whose first use is not thread-safe
        # (two tasks of a Dask worker got None for "EXE" from its half-filled variables)
        with _find_uv_lock:
            return find_uv_bin()
    except (ImportError, FileNotFoundError):
        pass
    found = shutil.which("uv")
    if found is None:
        raise EnvironmentBuildError("--pypi needs uv: install it with `pip install uv`", step=step)
    return found


def _conda_binary(step: str | None = None) -> str:
    for name in CONDA_TOOLS:
        found = shutil.which(name)
        if found:
            return found
    raise EnvironmentBuildError(
        "--conda needs micromamba, mamba or conda on PATH, and none was found: install micromamba "
        "(https://mamba.readthedocs.io) or use --pypi with the same packages", step=step)


def _run_tool(command: list[str], spec: EnvSpec, step: str | None, *, action: str, stdin: str | None = None) -> str:
    # NO_COLOR: uv then writes plain "error: ... / cause: ..." lines, not a wrapped, decorated report.
    with subprocess.Popen(command, stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "NO_COLOR": "1"}) as proc:
        stdout, stderr = _communicate_until_stopped(proc, stdin, spec, step)
    if proc.returncode != 0:
        message = (stderr.strip() or stdout.strip() or f"exit status {proc.returncode}")
        # A report wrapped to the terminal's width continues on deeper-indented
        # lines: join them, so the last line of the error is a whole sentence.
        message = re.sub(r"\n {4,}", " ", message)
        raise EnvironmentBuildError(f"cannot {action} {spec.describe()}:\n{message}", step=step, spec=spec)
    return stdout


#: set by whoever builds on a background thread (the engine): the build stops when it is set
build_stopped: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "flowmagic_build_stopped", default=None)


def _communicate_until_stopped(proc: subprocess.Popen, stdin: str | None, spec: EnvSpec,
                               step: str | None) -> tuple[str, str]:
    """The tool's output once it exits; killed (and an error) if the build is stopped first."""
    stop = build_stopped.get()
    while True:
        try:
            return proc.communicate(stdin, timeout=None if stop is None else 0.2)
        except subprocess.TimeoutExpired:
            stdin = None   # already being sent: communicate() refuses it a second time
            if stop.is_set():
                proc.kill()
                proc.communicate()
                raise EnvironmentBuildError(f"building {spec.describe()} was stopped: the run ended first",
                                            step=step, spec=spec) from None


def _write_record(env: Path, spec: EnvSpec, key: str, pins: list[str], packages: list[str]) -> None:
    record = {"version": _RECORD_VERSION, "key": key, "kind": spec.kind, "requested": list(spec.packages),
              "requirements": spec.requirements(), "python": spec.python, "interpreter": spec.interpreter,
              "pins": pins, "packages": packages, "created_at": time.time()}
    _write_atomic(env / RECORD_FILE, json.dumps(record, indent=1))


def _write_atomic(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    temp.write_text(text)
    os.replace(temp, path)


def _touch(path: Path) -> None:
    try:
        os.utime(path)
    except OSError:
        pass


def _digest(value: dict) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]
