"""Which values a task gets: foreach nesting, gathering, ``input`` and ``inputs``.

Pure functions over the graph and the tasks known so far (no I/O), so the
rules of ARCHITECTURE ("dag.py semantics") are in one place:

* A step's *chain* is the tuple of foreach steps it runs inside: ``()`` for
  an ordinary step, ``(F,)`` for a foreach step F whose list comes from an
  ordinary step, ``chain(P) + (G,)`` for a foreach step G nested in the
  foreach step P that writes G's list. A task's index has one entry per
  element of its step's chain.
* A task of S reading ``v`` from step P uses P's tasks that share S's
  position in their common chain prefix; the remaining dimensions of P's
  chain are gathered into (nested) lists in item order.
"""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

from flowmagic.runtime.orchestrator.tasks import Index, StepTasks, TaskInfo, named
from flowmagic.store.serializers import ArtifactRef

Tasks = Sequence[TaskInfo]   # a step's StepTasks, a range of it, or a plain list (the step cache's)

#: a value gathered from more tasks than this reaches its task as a stored object (:class:`Gathered`)
GATHER_STORED_AT = 1_000


Refs = dict[int, tuple[ArtifactRef, ...]]   # task id -> its refs (refs_of)


def refs_of(tasks: Tasks) -> Refs:
    """Every task's refs, those left in the store read in a few queries."""
    found: Refs = {}
    stored: list[int] = []
    reader = None
    for task in tasks:
        if task.stored is None:
            found[task.task_id] = task.refs
        else:
            stored.append(task.task_id)
            reader = task.stored
    if reader is not None:
        for task_id, refs in reader.many(stored).items():
            found[task_id] = tuple(refs)
    return found


def chains(graph) -> dict[str, tuple[str, ...]]:
    """Step name -> its foreach chain."""
    result: dict[str, tuple[str, ...]] = {}
    for name in graph.topological_order():
        spec = graph.step(name)
        var = spec.options.foreach
        if not var:
            result[name] = ()
            continue
        producer = graph.producers(name).get(var)
        outer = result.get(producer, ()) if producer else ()
        result[name] = outer + (name,)
    return result


def _common(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    n = 0
    while n < len(a) and n < len(b) and a[n] == b[n]:
        n += 1
    return n


def matching_tasks(tasks: Tasks, depth: int, index: Index) -> Tasks:
    """The tasks whose index starts with ``index[:depth]``, in item order."""
    prefix = index[:depth]
    if isinstance(tasks, StepTasks):
        return tasks.matching(prefix)
    return sorted((t for t in tasks if t.index[:depth] == prefix), key=lambda t: t.index)


def binding_for(var: str, producer: str, reader_chain: tuple[str, ...], index: Index,
                chain_of: dict[str, tuple[str, ...]], tasks: Tasks) -> dict:
    """The binding (see task.resolve_binding) of ``var`` for one task of a reader."""
    depth = _common(reader_chain, chain_of[producer])
    chosen = matching_tasks(tasks, depth, index)
    full = len(chain_of[producer])
    if depth < full and len(chosen) > GATHER_STORED_AT:
        return {"gathered": Gathered(var, producer, chosen, depth, full)}
    # gathering: the refs left in the store read in one query, not one per task
    return _nest(var, producer, chosen, depth, full, refs_of(chosen) if depth < full else None)


def _leaf(var: str, producer: str, task: TaskInfo, ref: ArtifactRef | None) -> dict:
    if ref is None:
        return {"missing": f"name '{var}' is not defined: step '{producer}' (task {task.task_id}) did not assign it"}
    return {"ref": ref.to_dict(), "step": producer}


@dataclass(frozen=True)
class Gathered:
    """A value gathered from many tasks (a 100,000-task join's ``{"list": ...}`` binding was 50 MB of
    dicts in the orchestrator): the engine streams its binding into the object store, one task's ref
    at a time, and the task gets ``{"stored": key}`` (see :meth:`write_json`)."""

    var: str
    producer: str
    tasks: Tasks
    depth: int
    full: int

    @property
    def which(self) -> tuple:
        """The same for every reader task that gets this very value (it is stored once)."""
        return (self.producer, self.var, self.depth, self.tasks[0].index[:self.depth])

    def binding(self) -> dict:
        """The whole binding, as :func:`_nest` makes it for fewer tasks."""
        return _nest(self.var, self.producer, self.tasks, self.depth, self.full, refs_of(self.tasks))

    def write_json(self, fh: BinaryIO) -> set[str]:
        """Write the binding's JSON to ``fh``; return the serializers of the refs in it."""
        if self.full - self.depth > 1:   # nested foreach: built whole (rare at this size)
            binding = self.binding()
            fh.write(json.dumps(binding).encode())
            return binding_serializers(binding)
        found: set[str] = set()

        def leaves() -> Iterator[dict]:
            for _k, task, refs in _with_refs(self.tasks):
                leaf = _nest(self.var, self.producer, [task], self.full, self.full, refs)
                if "ref" in leaf:
                    found.add(leaf["ref"]["serializer"])
                yield leaf
        fh.write(b'{"list": ')
        _write_list(fh, leaves())
        fh.write(b"}")
        return found


@dataclass(frozen=True)
class GatheredInputs:
    """A join's ``inputs`` over many tasks (~0.5 KB of dicts a task), streamed into the object store as
    :class:`Gathered` is: the task gets ``{"stored": key}`` for its list of namespaces."""

    producer: str
    tasks: Tasks
    depth: int

    @property
    def which(self) -> tuple:
        return (self.producer, "<inputs>", self.depth, self.tasks[0].index[:self.depth])

    def namespaces(self) -> list[dict]:
        return _namespaces(self.tasks, refs_of(self.tasks))

    def write_json(self, fh: BinaryIO) -> set[str]:
        found: set[str] = set()

        def namespaces() -> Iterator[dict]:
            for _k, task, refs in _with_refs(self.tasks):
                (namespace,) = _namespaces([task], refs)
                found.update(binding["ref"]["serializer"] for binding in namespace.values())
                yield namespace
        _write_list(fh, namespaces())
        return found


def _write_list(fh: BinaryIO, entries: Iterator[dict]) -> None:
    """A JSON list written one entry at a time (never the whole list in memory)."""
    fh.write(b"[")
    for k, entry in enumerate(entries):
        fh.write(b", " * (k > 0) + json.dumps(entry).encode())
    fh.write(b"]")


def _with_refs(tasks: Tasks, chunk: int = 500) -> Iterator[tuple[int, TaskInfo, Refs]]:
    """Each task with its position and the refs of its chunk (those left in the store: one query a chunk)."""
    for start in range(0, len(tasks), chunk):
        part = tasks[start:start + chunk]
        refs = refs_of(part)
        for k, task in enumerate(part, start):
            yield k, task, refs


def step_refs(tasks: Tasks, depth: int) -> dict[str, Any]:
    """Each name a step's tasks wrote -> its ref (one task) or the refs of its ``depth``-deep foreach,
    nested by index as a join gathers them (None where a task did not assign it); a chunk of
    tasks at a time, so a 100,000-task step costs its refs, not bindings and copies of its tasks."""
    ordered = matching_tasks(tasks, 0, ())
    indices: list[Index] = []
    found: dict[str, list[ArtifactRef | None]] = {}
    for k, task, refs in _with_refs(ordered):
        indices.append(task.index)
        for ref in refs[task.task_id]:
            found.setdefault(ref.name, [None] * k).append(ref)
        for column in found.values():
            if len(column) == k:
                column.append(None)
    if depth == 0:
        return {name: column[0] for name, column in found.items()}
    if depth == 1:   # one index a task, in order: the column is the gathered list
        return found
    return {name: _nested(indices, column, list(range(len(column))), 0, depth) for name, column in found.items()}


def _nested(indices: list[Index], column: list, positions: list[int], level: int, depth: int) -> Any:
    if level == depth:
        return column[positions[0]] if positions else None
    groups: dict[int, list[int]] = {}
    for pos in positions:
        groups.setdefault(indices[pos][level], []).append(pos)
    return [_nested(indices, column, groups[k], level + 1, depth) for k in sorted(groups)]


def _namespaces(tasks: Tasks, refs: Refs) -> list[dict]:
    """``inputs``: per task, name -> binding."""
    return [{ref.name: {"ref": ref.to_dict()} for ref in refs[t.task_id]} for t in tasks]


def binding_serializers(binding: Any) -> set[str]:
    """The serializers of every ref in a binding (an Arrow one needs pyarrow in the task's process)."""
    found: set[str] = set()
    if isinstance(binding, dict):
        ref = binding.get("ref")
        if isinstance(ref, dict) and isinstance(ref.get("serializer"), str):
            found.add(ref["serializer"])
        found.update(binding.get("serializers") or ())   # a stored binding says which it holds
        for value in binding.values():
            if isinstance(value, (dict, list)):
                found |= binding_serializers(value)
    elif isinstance(binding, list):
        for value in binding:
            found |= binding_serializers(value)
    return found


def _nest(var: str, producer: str, tasks: Tasks, depth: int, full: int, refs: Refs | None = None) -> dict:
    """``refs``: the tasks' refs read beforehand (refs_of), else each task is asked for its own."""
    if depth >= full:
        if not tasks:
            return {"missing": f"step '{producer}' has no task for this item, so '{var}' is undefined"}
        task = tasks[0]
        return _leaf(var, producer, task, named(refs[task.task_id], var) if refs else task.artifact(var))
    groups: dict[int, list[TaskInfo]] = {}
    for task in tasks:
        groups.setdefault(task.index[depth], []).append(task)
    return {"list": [_nest(var, producer, groups[k], depth + 1, full, refs) for k in sorted(groups)]}


def inputs_for(producer: str, reader_chain: tuple[str, ...], index: Index,
               chain_of: dict[str, tuple[str, ...]], tasks: Tasks) -> list[dict] | GatheredInputs:
    """``inputs`` of a join: one name -> binding dict per foreach task, in item order."""
    depth = _common(reader_chain, chain_of[producer])
    chosen = matching_tasks(tasks, depth, index)
    if len(chosen) > GATHER_STORED_AT:
        return GatheredInputs(producer, chosen, depth)
    return _namespaces(chosen, refs_of(chosen))


def foreach_indices(var: str, producer_tasks: Tasks) -> Iterator[tuple[Index, str | None]]:
    """The indices (and item reprs) of a foreach step's tasks: per task of the
    producer of its list, one index per item (made as they are read: 100,000 of them are 19 MB)."""
    for task in matching_tasks(producer_tasks, 0, ()):
        info = (task.foreach or {}).get(var) or {}
        items = info.get("items", [])
        for i in range(int(info.get("length") or 0)):
            yield task.index + (i,), items[i] if i < len(items) else None


@dataclass(frozen=True)
class InputPlan:
    """Every value one task reads from earlier steps and parameters: what its
    TaskSpec carries, and what the step cache compares (``fingerprint``), so
    both follow the same rules."""

    bindings: dict[str, dict]          # name -> binding (see task.resolve_binding)
    foreach: dict | None               # {"binding", "index"} for a task of a foreach step
    inputs: list[dict] | GatheredInputs | None   # a join's ``inputs``: one name -> binding per foreach task

    def fingerprint(self) -> dict[str, Any]:
        """The content hashes of everything the task reads from earlier steps
        (parameter values are compared by the cache itself)."""
        found: dict[str, Any] = {var: _hashes(b) for var, b in sorted(self.bindings.items())}
        if self.foreach is not None and "value" not in self.foreach["binding"]:
            found["<foreach>"] = (_hashes(self.foreach["binding"]), self.foreach["index"])
        if self.inputs is not None:
            namespaces = self.inputs.namespaces() if isinstance(self.inputs, GatheredInputs) else self.inputs
            found["<inputs>"] = [{n: _hashes(b) for n, b in sorted(ns.items())} for ns in namespaces]
        return found


def plan_inputs(graph, step: str, index: Index, chain_of: dict[str, tuple[str, ...]],
                tasks: dict[str, Tasks], params: dict) -> InputPlan:
    """The input plan of the task of ``step`` at ``index``, given the tasks known per step."""
    spec = graph.step(step)
    chain = chain_of[step]
    steps = {s.name for s in graph.steps}
    producers = graph.producers(step)
    bindings = {var: binding_for(var, producer, chain, index, chain_of, tasks.get(producer, []))
                for var, producer in producers.items() if producer in steps and var not in ("input", "inputs")}
    foreach = None
    if spec.options.foreach:
        var = spec.options.foreach
        producer = producers.get(var)
        if producer in steps:
            binding = binding_for(var, producer, chain[:-1], index[:-1], chain_of, tasks.get(producer, []))
        else:   # iterating over a parameter
            binding = {"value": params.get(var)}
        foreach = {"binding": binding, "index": index[-1]}
    inputs = None
    joined = graph.foreach_producer(step) if "inputs" in spec.reads else None
    if joined:
        inputs = inputs_for(joined, chain, index, chain_of, tasks.get(joined, []))
    return InputPlan(bindings, foreach, inputs)


def _hashes(binding: dict) -> Any:
    if "gathered" in binding:
        return _hashes(binding["gathered"].binding())
    if "ref" in binding:
        return binding["ref"].get("hash")
    if "list" in binding:
        return [_hashes(b) for b in binding["list"]]
    return ("missing",)


def required_names(graph, step: str) -> set[str]:
    """Names of ``step`` that a later step reads (they must be saved)."""
    names: set[str] = set()
    for edge in graph.edges:
        if edge.source == step:
            names.update(edge.variables)
    return names


def foreach_vars(graph, step: str) -> list[str]:
    """Names of ``step`` that a later foreach step iterates over."""
    found = []
    for child in graph.children(step):
        var = graph.step(child).options.foreach
        if var and graph.producers(child).get(var) == step:
            found.append(var)
    return sorted(set(found))

