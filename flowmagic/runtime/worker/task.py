"""The code that runs inside a task process (forked by the fork server).

It reads its *spec* (JSON) from the channel, binds parameters and inputs
(loaded memory-mapped from the object store) into the prelude's namespace,
executes the step's code like a notebook cell, saves every name the step
writes, and sends back a manifest. It never touches metadata: that is the
orchestrator's job (DESIGN section 9).

The spec is a :class:`~flowmagic.runtime.protocol.TaskSpec`. Channel
messages (JSON lines): ``{"type": "output", "output": {"type", "data",
"metadata"}}`` (see store/outputs.py) while running, then ``{"type":
"manifest", ...}``: a :class:`~flowmagic.runtime.protocol.Manifest`.
"""
from __future__ import annotations

import copy
import json
import re
import socket
import sys
import types
from typing import Any
from collections.abc import Callable

from flowmagic.errors import SerializationError, StoreError
from flowmagic.flow.catch import caught_exception
from flowmagic.runtime.protocol import ExceptionRecord, Manifest, TaskSpec, as_sequence, foreach_info
from flowmagic.store.content_hash import content_hash
from flowmagic.store.outputs import save_outputs
from flowmagic.store.objects import ObjectStore
from flowmagic.store.remote import open_objects
from flowmagic.store.serializers import (UNSAVED, ArtifactRef, load_artifact, save_artifact, type_name_of,
                                         unsaved_message, unsaved_ref)

_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, range)


def main(channel: socket.socket, namespace: dict) -> int:
    """Entry point called by the fork server in the forked child."""
    spec = TaskSpec.from_json(json.loads(_recv_all(channel)))
    sender = _Sender(channel)
    manifest = run_task(spec, namespace, sender.send)
    # Output first: the orchestrator treats the manifest as the end of the task
    # and does not wait for this process to finish exiting.
    flush_std_streams()
    sender.send({"type": "manifest", **manifest.to_json()})
    channel.close()
    return 0


def flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (ValueError, OSError):  # the step closed it (sys.stdout.close()): nothing left to flush
            pass


def run_task(spec: TaskSpec, ns: dict, send: Callable[[dict], None],
             lists: ForeachLists | None = None) -> Manifest:
    objects = open_objects(spec.objects_root, spec.store_url)  # a remote store: read and written directly
    step = spec.step
    outputs: list[dict] = []
    warnings: list[str] = []

    def emit(output: dict) -> None:
        # An output is {"type": "display"|"execute_result"|"update_display", "data", "metadata"}.
        outputs.extend(save_outputs(objects, [output]))
        send({"type": "output", "output": output})

    def failed(error: ExceptionRecord | None, not_persisted: list[dict] = ()) -> Manifest:
        return Manifest("failed", [], error, outputs, {}, warnings, list(not_persisted))

    try:
        bound = bind_inputs(spec, ns, objects, lists)
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable input fails the task, clearly
        # flowmagic's own frames would hide the message: it names the input and its step
        return failed(ExceptionRecord.of(exc.with_traceback(None)))
    before = _hashes(bound, spec) if spec.mutation_check else {}
    if spec.catch:
        ns[spec.catch] = None
    ok, error = _execute(spec, ns, emit)
    if not ok and not (spec.catch and spec.catch_now):
        return failed(ExceptionRecord.from_json(error))
    if not ok:  # caught: names bound before the failure keep their values, the rest are None
        for name in spec.writes:
            ns.setdefault(name, None)
        ns[spec.catch] = caught_exception(error)  # a dict that also reads like Metaflow's wrapper
    refs, not_persisted, save_error = _save_writes(spec, ns, objects, warnings)
    if save_error is not None:
        return failed(save_error, not_persisted)
    if ok and before:
        warnings.extend(_mutation_warnings(step, bound, before, spec))
    foreach = {name: foreach_info(ns[name]) for name in spec.foreach_vars if name in ns}
    return Manifest("ok" if ok else "failed", refs, ExceptionRecord.from_json(error), outputs, foreach,
                    warnings, not_persisted, caught=not ok)


# -- inputs ---------------------------------------------------------------------


def resolve_binding(binding: Any, objects: ObjectStore) -> Any:
    """A binding is ``{"ref": ArtifactRef dict}``, ``{"list": [bindings]}`` (a
    gathered foreach value, nested for nested foreach), ``{"stored": object key}``
    (such a binding from many tasks, kept in the store), ``{"value": JSON}`` or
    ``{"missing": message}``."""
    if "stored" in binding:
        return resolve_binding(_from_store(binding, objects), objects)
    if "ref" in binding:
        ref = ArtifactRef.from_dict(binding["ref"])
        if ref.serializer == UNSAVED:   # the producer could not save it: name that step
            raise SerializationError(unsaved_message(ref, binding.get("step")), variable=ref.name,
                                     type_name=ref.type, step=binding.get("step"))
        return load_artifact(objects, ref, step=binding.get("step"))
    if "list" in binding:
        return [resolve_binding(b, objects) for b in binding["list"]]
    if "value" in binding:
        return binding["value"]
    raise NameError(binding["missing"])


def _from_store(stored: dict, objects: ObjectStore) -> Any:
    """What the engine streamed into the store for a wide join (``{"stored": key}``)."""
    return json.loads(objects.get_bytes(stored["stored"]))


class ForeachLists:
    """The foreach lists a batch of tasks (worker/batch.py) loaded, kept for the next task of the batch:
    every task of a foreach takes its ``input`` from the same list. Only a list the step's code
    never binds by name is kept (a bound one could be changed in place by the task)."""

    def __init__(self) -> None:
        self._lists: dict[str, Any] = {}

    def get(self, binding: dict, objects: ObjectStore) -> Any:
        key = json.dumps(binding, sort_keys=True, default=str)
        if key not in self._lists:
            self._lists = {key: as_sequence(resolve_binding(binding, objects))}   # one step's list at a time
        return self._lists[key]


def bind_inputs(spec: TaskSpec, ns: dict, objects: ObjectStore, lists: ForeachLists | None = None) -> dict[str, Any]:
    """Put parameters, inputs, ``input`` and ``inputs`` into ``ns``; return the inputs."""
    ns.update(spec.params)
    bound: dict[str, Any] = {}
    listed = _foreach_list_name(spec)
    # A foreach step's list is among its inputs, but a step whose code never names it needs only its
    # item: loading the whole list in each of N tasks made a foreach O(N^2).
    unnamed_list = listed is not None and not _names(spec.code, listed)
    for name, binding in spec.bindings.items():
        if unnamed_list and name == listed:
            continue
        try:
            bound[name] = ns[name] = resolve_binding(binding, objects)
        except ModuleNotFoundError as exc:  # pickled in another --pypi/--conda environment
            raise _missing_module(spec.step, name, binding, exc) from None
    if spec.foreach is not None:
        if listed in bound:
            sequence = as_sequence(bound[listed])
        elif lists is not None:
            sequence = lists.get(spec.foreach["binding"], objects)
        else:
            sequence = as_sequence(resolve_binding(spec.foreach["binding"], objects))
        item = sequence[spec.foreach["index"]]
        # a kept list is shared with the next task of the batch: it gets its own copy of a mutable item
        ns["input"] = item if lists is None or _plainly_immutable(item) else copy.deepcopy(item)
    if spec.inputs is not None:
        namespaces = spec.inputs
        if isinstance(namespaces, dict):   # {"stored": key}: a join of many tasks
            namespaces = _from_store(namespaces, objects)
        ns["inputs"] = [_LazyNamespace(b, objects) for b in namespaces]
    return bound


def _plainly_immutable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_plainly_immutable(v) for v in value)
    return isinstance(value, _IMMUTABLE)


class _LazyNamespace(types.SimpleNamespace):
    """One foreach task's artifacts (``inputs[i].x``), loaded on first access."""

    def __init__(self, bindings: dict, objects: ObjectStore) -> None:
        super().__init__()
        object.__setattr__(self, "_bindings", bindings)
        object.__setattr__(self, "_objects", objects)

    def __getattr__(self, name: str) -> Any:
        bindings = object.__getattribute__(self, "_bindings")
        if name not in bindings:
            raise AttributeError(f"this foreach task has no artifact '{name}' (it has: {', '.join(sorted(bindings))})")
        value = resolve_binding(bindings[name], object.__getattribute__(self, "_objects"))
        object.__setattr__(self, name, value)
        return value

    def __repr__(self) -> str:
        return f"namespace({', '.join(sorted(object.__getattribute__(self, '_bindings')))})"

    def __reduce__(self):
        # Saved (a join's loop variable `for inp in inputs`) as a plain namespace of values.
        values = {name: getattr(self, name) for name in object.__getattribute__(self, "_bindings")}
        return (types.SimpleNamespace, (), values)


def _missing_module(step: str, name: str, binding: dict, exc: ModuleNotFoundError) -> ModuleNotFoundError:
    writer = f" (written by step '{binding['step']}')" if binding.get("step") else ""
    return ModuleNotFoundError(
        f"step '{step}' cannot load its input '{name}'{writer}: the value is an object of module "
        f"'{exc.name}', which is not installed where this step runs. Add that package to this step's "
        "--pypi list, or hand on plain data (numbers, lists, dicts, a data frame) instead.", name=exc.name)


# -- execution --------------------------------------------------------------------


def _execute(spec: TaskSpec, ns: dict, emit: Callable[[dict], None]) -> tuple[bool, dict | None]:
    from flowmagic.runtime.worker.execute import execute_cell

    result = execute_cell(spec.source, ns, filename=spec.filename, first_line=spec.first_line, emit=emit)
    return result.ok, result.error


# -- outputs ----------------------------------------------------------------------


def _save_writes(spec: TaskSpec, ns: dict, objects: ObjectStore, warnings: list[str]):
    names = list(spec.writes)
    if spec.catch and spec.catch not in names:
        names.append(spec.catch)
    required = set(spec.required)
    refs: list[dict] = []
    not_persisted: list[dict] = []
    for name in names:
        if name not in ns:
            continue  # never bound (a branch not taken): a reader gets a clear NameError
        value = ns[name]
        try:
            refs.append(save_artifact(objects, name, value, step=spec.step).to_dict())
        except StoreError as exc:  # the disk, not the value (ENOSPC, EIO): fail, never skip the name
            return refs, not_persisted, ExceptionRecord.plain("StoreError", str(exc))
        except Exception as exc:  # noqa: BLE001 - SerializationError and anything a writer raises
            type_name = type_name_of(value)
            if name in required:
                message = str(exc) if isinstance(exc, SerializationError) else (
                    f"step '{spec.step}': variable '{name}' of type {type_name} cannot be saved ({exc})")
                return refs, not_persisted, ExceptionRecord.plain("SerializationError", message)
            not_persisted.append({"name": name, "type": type_name})
            refs.append(unsaved_ref(name, type_name).to_dict())
            if _closed_handle(value):
                continue  # `with open(...) as f`: a closed file is of no use to anyone later
            warnings.append(f"step '{spec.step}': '{name}' ({type_name}) cannot be saved; "
                            "it is not persisted (fine while no later step reads it)")
    return refs, not_persisted, None


def _closed_handle(value: Any) -> bool:
    try:
        return getattr(value, "closed", False) is True
    except Exception:  # noqa: BLE001 - a property that raises is not a closed file
        return False


def _foreach_list_name(spec: TaskSpec) -> str | None:
    """The input name bound to the list this foreach task takes its item from, if any."""
    if spec.foreach is None:
        return None
    return next((name for name, b in spec.bindings.items() if b == spec.foreach["binding"]), None)


def _names(code: str, name: str) -> bool:
    return re.search(rf"\b{re.escape(name)}\b", code) is not None


def _hashes(bound: dict[str, Any], spec: TaskSpec) -> dict[str, str]:
    writes = set(spec.writes)
    hashes = {}
    for name, value in bound.items():   # a foreach list the code never names is not bound (bind_inputs)
        if name in writes or isinstance(value, _IMMUTABLE):
            continue
        try:
            hashes[name] = content_hash(value)  # by content: a read may re-layout a frame
        except Exception:  # noqa: BLE001 - an unhashable input just is not checked
            pass
    return hashes


def _mutation_warnings(step: str, bound: dict, before: dict[str, str], spec: TaskSpec) -> list[str]:
    changed = []
    for name, digest in before.items():
        try:
            if content_hash(bound[name]) != digest:
                changed.append(name)
        except Exception:  # noqa: BLE001
            pass
    return [f"step '{step}' changed '{name}' in place (a method call such as .append() or "
            f"inplace=True); the change is not saved: assign the result (`{name} = ...`) "
            "to make it an output of this step" for name in changed]


# -- plumbing -----------------------------------------------------------------------


class _Sender:
    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel

    def send(self, message: dict) -> None:
        try:
            self.channel.sendall(json.dumps(message, default=str).encode() + b"\n")
        except OSError:
            pass  # the orchestrator is gone; the exit status is all that matters now


def _recv_all(channel: socket.socket) -> bytes:
    chunks = []
    while chunk := channel.recv(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)
