"""Several small foreach tasks in one forked process, each as if it had its own.

Forking costs about 1.5 ms of CPU per process on these machines (more for a
big prelude), which is most of a trivial task's cost: a 10,000-task foreach
spent more time forking than running. So the orchestrator hands a task
process a *batch* of specs of one step (attempt.py's ``_BatchPump``) when
that step's tasks are short, and this module runs them one after another.

Each task starts from what a freshly forked one would see (:class:`FreshStart`):
the prelude's namespace as the fork server had it (the same dict object, so
the prelude's functions see it), ``random`` reseeded, numpy's global random
state, the working directory, ``os.environ``, ``sys.path``, the standard
streams and the warning filters as they were. What a process cannot put
back cheaply (a prelude value changed in place, a thread left running) is
refused instead: before the first task, :func:`unbatchable` looks at every
prelude value the step's code can reach; a mutable one (a list, a frame, an
instance of a notebook class) means one process per task for this step. A
task that leaves a thread running ends its batch. State inside imported
modules (a library's cache) is not reset: ``FLOWMAGIC_BATCH=1`` gives every
task its own process.

Channel: the orchestrator sends ``{"batch": [spec, ...]}`` then EOF; this
process sends each task's outputs and manifest in turn; when the rest must
run elsewhere, ``{"type": "batch_stop", "reason": ...}`` comes just before
the manifest of the last task it ran (a refused batch still runs its first).
"""
from __future__ import annotations

import ast
import functools
import json
import os
import random
import socket
import sys
import threading
import types
import warnings
from typing import Any

from flowmagic.runtime.protocol import TaskSpec
from flowmagic.runtime.worker import execute
from flowmagic.runtime.worker.task import ForeachLists, _recv_all, _Sender, flush_std_streams, run_task

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), range, type(Ellipsis), type(NotImplemented))
_CALLABLE_LIBRARY = (types.BuiltinFunctionType, types.BuiltinMethodType, types.MethodWrapperType,
                     types.WrapperDescriptorType, types.MethodDescriptorType, types.ModuleType)


def main(channel: socket.socket, namespace: dict) -> int:
    """Entry point (``flowmagic.runtime.worker.batch:main``) called by the fork server in the child."""
    specs = [TaskSpec.from_json(s) for s in json.loads(_recv_all(channel))["batch"]]
    sender = _Sender(channel)
    refused = unbatchable(specs[0], namespace) if len(specs) > 1 else None   # before a task changes anything
    fresh = FreshStart(namespace)
    lists = ForeachLists()
    for k, spec in enumerate(specs):
        if k:
            fresh.restore()
        manifest = run_task(spec, namespace, sender.send, lists)
        flush_std_streams()
        execute._wait_until_read()   # this task's text is read before its manifest says it ended
        stop = None if k + 1 == len(specs) else (refused or fresh.left_behind())
        if stop is not None:   # said before the manifest: the orchestrator starts no next task
            sender.send({"type": "batch_stop", "reason": stop})
        sender.send({"type": "manifest", **manifest.to_json()})
        if stop is not None:
            break
    channel.close()
    return 0


# -- what a fresh fork would have -------------------------------------------------------


class FreshStart:
    """The process state a task may change and the next task must not see."""

    def __init__(self, namespace: dict) -> None:
        self.namespace = namespace
        self.names = dict(namespace)
        self.cwd = os.getcwd()
        self.environ = dict(os.environ)
        self.path = list(sys.path)
        self.streams = (sys.stdout, sys.stderr, sys.stdin)
        self.filters = list(warnings.filters)
        self.threads = threading.active_count()
        self.numpy_state = _numpy_state()

    def restore(self) -> None:
        self.namespace.clear()
        self.namespace.update(self.names)
        random.seed()   # what the fork's at-fork hook does for every unbatched task
        if self.numpy_state is not None or "numpy.random" in sys.modules:
            _set_numpy_state(self.numpy_state)
        if os.getcwd() != self.cwd:
            os.chdir(self.cwd)
        if os.environ != self.environ:
            os.environ.clear()
            os.environ.update(self.environ)
        sys.path[:] = self.path
        sys.stdout, sys.stderr, sys.stdin = self.streams
        warnings.filters[:] = self.filters
        warnings._filters_mutated()  # type: ignore[attr-defined]  # the registry caches old answers

    def left_behind(self) -> str | None:
        """Why the next task cannot run in this process, or None."""
        if threading.active_count() > self.threads:
            return "a task left a thread running"
        return None


def _numpy_state() -> Any:
    module = sys.modules.get("numpy.random")
    return module.get_state() if module is not None else None


def _set_numpy_state(state: Any) -> None:
    module = sys.modules["numpy.random"]
    if state is None:   # numpy was first imported by a task: a fresh import's state is a fresh seed
        module.seed()
    else:
        module.set_state(state)


# -- which steps may share a process ------------------------------------------------------


def unbatchable(spec: TaskSpec, namespace: dict) -> str | None:
    """Why tasks of this step must each have their own process, or None.

    The step's code may change in place any mutable value it reaches through
    the prelude (directly or through the prelude's functions and classes);
    a batch would hand the change to the next task, so such a step is not batched.
    """
    try:
        tree = ast.parse(spec.code)
    except SyntaxError:
        return "its code uses IPython syntax"
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    seen: set[int] = set()
    for name in sorted(names):
        if name in namespace:
            problem = _reach(namespace[name], namespace, seen)
            if problem is not None:
                return f"it uses '{name}' from the prelude, which holds {problem} a task could change"
    return None


def _reach(value: Any, namespace: dict, seen: set[int], depth: int = 0) -> str | None:
    """What mutable value ``value`` leads to (a description), or None when it is safe to share."""
    if isinstance(value, _IMMUTABLE) or id(value) in seen:
        return None
    if depth > 30:
        return f"a deeply nested {type(value).__name__}"
    seen.add(id(value))
    if isinstance(value, (tuple, frozenset)):
        return _first(_reach(item, namespace, seen, depth + 1) for item in value)
    if isinstance(value, _CALLABLE_LIBRARY):
        return None
    if isinstance(value, types.FunctionType):
        return _reach_function(value, namespace, seen, depth)
    if isinstance(value, functools.partial):
        return _first(_reach(part, namespace, seen, depth + 1)
                      for part in (value.func, *value.args, *value.keywords.values()))
    if isinstance(value, type):
        if value.__module__ != "__main__":
            return None   # a library's class: its own state is module state (documented)
        return _first(_reach(attr, namespace, seen, depth + 1) for key, attr in vars(value).items()
                      if not key.startswith("__"))
    if isinstance(value, (staticmethod, classmethod)):
        return _reach(value.__func__, namespace, seen, depth + 1)
    if isinstance(value, property):
        return _first(_reach(f, namespace, seen, depth + 1) for f in (value.fget, value.fset, value.fdel) if f)
    if isinstance(value, types.MethodType):
        return _reach(value.__self__, namespace, seen, depth + 1) or \
            _reach(value.__func__, namespace, seen, depth + 1)
    return f"a {type(value).__name__}"


def _reach_function(func: types.FunctionType, namespace: dict, seen: set[int], depth: int) -> str | None:
    if func.__globals__ is not namespace:
        return None   # a library's function
    parts: list[Any] = [namespace[name] for name in _global_names(func.__code__) if name in namespace]
    parts.extend(func.__defaults__ or ())
    parts.extend((func.__kwdefaults__ or {}).values())
    for cell in func.__closure__ or ():
        try:
            parts.append(cell.cell_contents)
        except ValueError:   # an empty cell
            pass
    return _first(_reach(part, namespace, seen, depth + 1) for part in parts)


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def _first(problems) -> str | None:
    return next((p for p in problems if p is not None), None)

