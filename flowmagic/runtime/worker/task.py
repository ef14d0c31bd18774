"""The code that runs inside a task process (forked by the fork server).

It reads its *spec* (JSON) from the channel, binds parameters and inputs
(loaded memory-mapped from the object store) into the prelude's namespace,
executes the step's code like a notebook cell, saves every name the step
writes, and sends back a manifest. It never touches metadata: that is the
orchestrator's job (DESIGN section 9).

Spec keys: ``objects_root``, ``step``, ``cell``, ``source``, ``code``,
``filename``, ``first_line``, ``params`` (name -> JSON value), ``bindings``
(name -> binding, see :func:`resolve_binding`), ``foreach`` (``{"binding",
"index"}`` or None), ``inputs`` (list of name -> binding, or None),
``catch`` (variable or None), ``catch_now`` (last attempt), ``writes``,
``required`` (names a later step reads), ``foreach_vars`` (names a later
foreach step iterates over), ``mutation_check``.

Channel messages (JSON lines): ``{"type": "output", "output": {"type",
"data", "metadata"}}`` (see runtime/outputs.py) while running, then ``{"type": "manifest", "outcome", "artifacts",
"exception", "outputs", "foreach", "warnings", "not_persisted"}``.
"""
from __future__ import annotations

import json
import socket
import sys
import traceback
import types
from typing import Any, Callable

from flowmagic.errors import SerializationError, StoreError
from flowmagic.store.outputs import save_outputs
from flowmagic.store.objects import ObjectStore
from flowmagic.store.serializers import (UNSAVED, ArtifactRef, load_artifact, save_artifact, type_name_of,
                                         unsaved_message, unsaved_ref, value_hash)

ITEM_REPR_MAX = 60
ITEM_REPRS_MAX = 10_000
_IMMUTABLE = (int, float, complex, str, bytes, bool, type(None), frozenset, range)


def main(channel: socket.socket, namespace: dict) -> int:
    """Entry point called by the fork server in the forked child."""
    spec = json.loads(_recv_all(channel))
    sender = _Sender(channel)
    manifest = run_task(spec, namespace, sender.send)
    # Output first: the orchestrator treats the manifest as the end of the task
    # and does not wait for this process to finish exiting.
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    sender.send({"type": "manifest", **manifest})
    channel.close()
    return 0


def run_task(spec: dict, ns: dict, send: Callable[[dict], None]) -> dict:
    objects = ObjectStore(spec["objects_root"])
    step = spec["step"]
    outputs: list[dict] = []
    warnings: list[str] = []

    def emit(output: dict) -> None:
        # An output is {"type": "display"|"execute_result"|"update_display", "data", "metadata"}.
        outputs.extend(save_outputs(objects, [output]))
        send({"type": "output", "output": output})

    try:
        bound = bind_inputs(spec, ns, objects)
    except Exception as exc:  # noqa: BLE001 - a missing/unreadable input fails the task, clearly
        # flowmagic's own frames would hide the message: it names the input and its step
        return _manifest("failed", [], _exception_record(exc.with_traceback(None)), outputs, {}, warnings, [])
    before = _hashes(bound, spec) if spec.get("mutation_check") else {}
    if spec.get("catch"):
        ns[spec["catch"]] = None
    ok, error = _execute(spec, ns, emit)
    if not ok and not (spec.get("catch") and spec.get("catch_now")):
        return _manifest("failed", [], error, outputs, {}, warnings, [])
    if not ok:  # caught: names bound before the failure keep their values, the rest are None
        for name in spec["writes"]:
            ns.setdefault(name, None)
        ns[spec["catch"]] = error
    refs, not_persisted, save_error = _save_writes(spec, ns, objects, warnings)
    if save_error is not None:
        return _manifest("failed", [], save_error, outputs, {}, warnings, not_persisted)
    if ok and before:
        warnings.extend(_mutation_warnings(step, bound, before, spec))
    foreach = {name: _foreach_info(ns[name]) for name in spec.get("foreach_vars", []) if name in ns}
    manifest = _manifest("ok" if ok else "failed", refs, error, outputs, foreach, warnings, not_persisted)
    manifest["caught"] = not ok
    return manifest


# -- inputs ---------------------------------------------------------------------


def resolve_binding(binding: Any, objects: ObjectStore) -> Any:
    """A binding is ``{"ref": ArtifactRef dict}``, ``{"list": [bindings]}`` (a
    gathered foreach value, nested for nested foreach), ``{"value": JSON}`` or
    ``{"missing": message}``."""
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


def bind_inputs(spec: dict, ns: dict, objects: ObjectStore) -> dict[str, Any]:
    """Put parameters, inputs, ``input`` and ``inputs`` into ``ns``; return the inputs."""
    ns.update(spec.get("params", {}))
    bound: dict[str, Any] = {}
    for name, binding in spec.get("bindings", {}).items():
        try:
            bound[name] = ns[name] = resolve_binding(binding, objects)
        except ModuleNotFoundError as exc:  # pickled in another --pypi/--conda environment
            raise _missing_module(spec["step"], name, binding, exc) from None
    foreach = spec.get("foreach")
    if foreach is not None:
        items = _as_sequence(resolve_binding(foreach["binding"], objects))
        ns["input"] = items[foreach["index"]]
    if spec.get("inputs") is not None:
        ns["inputs"] = [_LazyNamespace(b, objects) for b in spec["inputs"]]
    return bound


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


def _as_sequence(value: Any) -> Any:
    if isinstance(value, (list, tuple, range, str)):
        return value
    return list(value)


# -- execution --------------------------------------------------------------------


def _execute(spec: dict, ns: dict, emit: Callable[[dict], None]) -> tuple[bool, dict | None]:
    from flowmagic.runtime.worker.execute import execute_cell

    result = execute_cell(spec["source"], ns, filename=spec["filename"], first_line=spec["first_line"], emit=emit)
    return result.ok, result.error


def _exception_record(exc: BaseException) -> dict:
    return {
        "type": type(exc).__name__,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


# -- outputs ----------------------------------------------------------------------


def _save_writes(spec: dict, ns: dict, objects: ObjectStore, warnings: list[str]):
    names = list(spec["writes"])
    if spec.get("catch") and spec["catch"] not in names:
        names.append(spec["catch"])
    required = set(spec.get("required", ()))
    refs: list[dict] = []
    not_persisted: list[dict] = []
    for name in names:
        if name not in ns:
            continue  # never bound (a branch not taken): a reader gets a clear NameError
        value = ns[name]
        try:
            refs.append(save_artifact(objects, name, value, step=spec["step"]).to_dict())
        except StoreError as exc:  # the disk, not the value (ENOSPC, EIO): fail, never skip the name
            return refs, not_persisted, {"type": "StoreError", "message": str(exc),
                                         "traceback": f"StoreError: {exc}\n"}
        except Exception as exc:  # noqa: BLE001 - SerializationError and anything a writer raises
            type_name = type_name_of(value)
            if name in required:
                message = str(exc) if isinstance(exc, SerializationError) else (
                    f"step '{spec['step']}': variable '{name}' of type {type_name} cannot be saved ({exc})")
                return refs, not_persisted, {"type": "SerializationError", "message": message,
                                             "traceback": f"SerializationError: {message}\n"}
            not_persisted.append({"name": name, "type": type_name})
            refs.append(unsaved_ref(name, type_name).to_dict())
            warnings.append(f"step '{spec['step']}': '{name}' ({type_name}) cannot be saved; "
                            "it is not persisted (fine while no later step reads it)")
    return refs, not_persisted, None


def _foreach_info(value: Any) -> dict:
    try:
        items = _as_sequence(value)
        length = len(items)
    except TypeError:
        return {"length": None, "items": [], "error": f"a {type(value).__name__} cannot be iterated"}
    reprs = []
    for item in items[:ITEM_REPRS_MAX] if not isinstance(items, str) else items[:ITEM_REPRS_MAX]:
        text = repr(item)
        reprs.append(text if len(text) <= ITEM_REPR_MAX else text[: ITEM_REPR_MAX - 3] + "...")
    return {"length": length, "items": reprs}


def _hashes(bound: dict[str, Any], spec: dict) -> dict[str, str]:
    writes = set(spec["writes"])
    hashes = {}
    for name, value in bound.items():
        if name in writes or isinstance(value, _IMMUTABLE):
            continue
        try:
            hashes[name] = value_hash(value)
        except Exception:  # noqa: BLE001 - an unhashable input just is not checked
            pass
    return hashes


def _mutation_warnings(step: str, bound: dict, before: dict[str, str], spec: dict) -> list[str]:
    changed = []
    for name, digest in before.items():
        try:
            if value_hash(bound[name]) != digest:
                changed.append(name)
        except Exception:  # noqa: BLE001
            pass
    return [f"step '{step}' changed '{name}' in place (a method call such as .append() or "
            f"inplace=True); the change is not saved: assign the result (`{name} = ...`) "
            "to make it an output of this step" for name in changed]


def _manifest(outcome, refs, exception, outputs, foreach, warnings, not_persisted) -> dict:
    return {"outcome": outcome, "artifacts": refs, "exception": exception,
            "outputs": outputs, "foreach": foreach, "warnings": warnings, "not_persisted": not_persisted}


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
