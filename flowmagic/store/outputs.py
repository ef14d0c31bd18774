"""Rich outputs of a task: mimebundles, their size limits, and their storage.

An *output* is what a notebook cell would show: ``{"type", "data",
"metadata"}`` where ``type`` is ``"display"`` (a ``display()`` call or a
matplotlib figure), ``"execute_result"`` (the value of the step's last
expression) or ``"update_display"`` (a display handle updated in place), and
``data`` is a Jupyter mimebundle whose values are JSON-able: binary forms
(PNG, JPEG, PDF) are base64 text, as in a kernel's ``display_data`` message.

Stored, an output keeps small text inline and puts everything else (images,
big HTML) in the content-addressed object store, so the same figure drawn by
many runs is stored once and ``flowmagic dump --outputs`` can print the path
of a real PNG file. A stored output is a *ref*::

    {"type": "display", "metadata": {...},
     "data": {"text/plain": {"inline": "..."},
              "image/png": {"object": "<key>", "size": 1234, "encoding": "base64"}}}
"""
from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field, replace
from typing import Any
from collections.abc import Iterable, Mapping, Sequence

from flowmagic.errors import NotFoundError, UsageError
from flowmagic.store.objects import DamagedObjectError

#: mimetypes whose payload is binary, carried as base64 text in bundles.
BINARY_MIMETYPES = frozenset({"image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"})
#: text payloads up to this many characters stay inline in the stored ref.
INLINE_MAX_CHARS = 4096
_MB = 1024 * 1024
_NOTE_PREFIX = "[flowmagic]"


@dataclass(frozen=True)
class OutputLimits:
    """How much rich output one task may keep (sizes of the JSON payloads)."""

    max_item_bytes: int = 10 * _MB     # one mimetype of one output
    max_total_bytes: int = 50 * _MB    # all outputs of one task attempt
    max_outputs: int = 500             # count of outputs of one task attempt
    svg_max_bytes: int = 256 * 1024    # figures also carry SVG only when it is this small

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OutputLimits:
        """The defaults, or sizes in MB from ``FLOWMAGIC_OUTPUT_MAX_MB`` (one output)
        and ``FLOWMAGIC_OUTPUTS_MAX_MB`` (a task's total)."""
        environ = os.environ if environ is None else environ
        limits = cls()
        for variable, attribute in ((ITEM_LIMIT_VARIABLE, "max_item_bytes"), (TOTAL_LIMIT_VARIABLE, "max_total_bytes")):
            text = environ.get(variable)
            if not text:
                continue
            try:
                megabytes = float(text)
            except ValueError:
                raise UsageError(f"{variable}={text!r} is not a size in MB (for example {variable}=20)") from None
            limits = replace(limits, **{attribute: int(megabytes * _MB)})
        return limits


ITEM_LIMIT_VARIABLE = "FLOWMAGIC_OUTPUT_MAX_MB"
TOTAL_LIMIT_VARIABLE = "FLOWMAGIC_OUTPUTS_MAX_MB"


# -- building bundles ---------------------------------------------------------------


def make_output(kind: str, data: dict, metadata: dict | None = None, transient: dict | None = None) -> dict:
    """A JSON-able output record from what IPython's formatters produced."""
    output = {"type": kind, "data": {mime: _jsonable(mime, value) for mime, value in data.items()},
              "metadata": dict(metadata or {})}
    if transient:
        output["transient"] = dict(transient)
    return output


def _jsonable(mime: str, value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if mime in BINARY_MIMETYPES:
            return base64.b64encode(raw).decode("ascii")
        return raw.decode("utf-8", errors="replace")
    return value


#: forms that only work while a kernel holds the widget's model: a task process has none.
LIVE_WIDGET_MIMETYPES = ("application/vnd.jupyter.widget-view+json",)


def without_live_widgets(output: dict) -> dict:
    """A widget displayed in a step cannot be interactive (its model dies with the
    task): keep its text form, say why."""
    found = [mime for mime in LIVE_WIDGET_MIMETYPES if mime in output["data"]]
    if not found:
        return output
    data = {mime: value for mime, value in output["data"].items() if mime not in found}
    note = (f"{_NOTE_PREFIX} an interactive widget cannot run inside a step (its task process is gone); "
            "showing its text form. Create widgets in ordinary cells, from the step's artifacts.")
    data["text/plain"] = f"{data['text/plain']}\n{note}" if "text/plain" in data else note
    return {**output, "data": data}


def payload_size(value: Any) -> int:
    """Size of a bundle value as it travels (characters of its JSON text)."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return len(str(value))


def _human(size: int) -> str:
    for unit, scale in (("MB", _MB), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def note_output(text: str) -> dict:
    """A plain-text output that tells the user something was left out."""
    return {"type": "display", "data": {"text/plain": f"{_NOTE_PREFIX} {text}"},
            "metadata": {"flowmagic": {"note": True}}}


@dataclass
class OutputBudget:
    """Applies :class:`OutputLimits` to the outputs of one task, in order."""

    limits: OutputLimits = field(default_factory=OutputLimits)
    total: int = 0
    count: int = 0
    dropped: int = 0
    _told_full: bool = False

    def admit(self, output: dict) -> dict | None:
        """The output to keep (trimmed, or a note in its place), or None to drop it silently."""
        output = self._trim_items(output)
        size = sum(payload_size(v) for v in output["data"].values())
        fits = self.total + size <= self.limits.max_total_bytes
        if output["type"] == "update_display" and not self._told_full and fits:
            self.total += size  # a progress display updated many times is still one output
            return output
        if self.count >= self.limits.max_outputs or self.total + size > self.limits.max_total_bytes:
            self.dropped += 1
            if self._told_full:
                return None
            self._told_full = True
            reason = (f"more than {self.limits.max_outputs} outputs" if self.count >= self.limits.max_outputs
                      else f"outputs over {_human(self.limits.max_total_bytes)} in total")
            return note_output(f"this step produced {reason}; further outputs are not shown or stored "
                               f"(raise the limit with {TOTAL_LIMIT_VARIABLE}=<MB> in the environment).")
        self.count += 1
        self.total += size
        return output

    def _trim_items(self, output: dict) -> dict:
        limit = self.limits.max_item_bytes
        data = dict(output["data"])
        dropped = []
        cut = False
        for mime, value in list(data.items()):
            size = payload_size(value)
            if size <= limit:
                continue
            if mime == "text/plain" and isinstance(value, str):
                data[mime] = value[:limit] + f"\n{_NOTE_PREFIX} text cut at {_human(limit)} (of {_human(size)})."
                cut = True
                continue
            del data[mime]
            dropped.append({"mimetype": mime, "size": size})
        if not dropped:
            return {**output, "data": data} if cut else output
        notes = "\n".join(f"{_NOTE_PREFIX} the {d['mimetype']} form of this output was dropped: "
                          f"{_human(d['size'])} is over the {_human(limit)} limit per output "
                          f"(raise it with {ITEM_LIMIT_VARIABLE}=<MB>)." for d in dropped)
        data["text/plain"] = f"{data['text/plain']}\n{notes}" if "text/plain" in data else notes
        metadata = dict(output.get("metadata") or {})
        metadata["flowmagic"] = {**metadata.get("flowmagic", {}), "dropped": dropped}
        return {**output, "data": data, "metadata": metadata}


# -- storing and reading ------------------------------------------------------------


def save_outputs(objects: Any, outputs: Iterable[dict]) -> list[dict]:
    """Store ``outputs`` (bundles as emitted) and return their JSON refs.

    ``objects`` is a :class:`flowmagic.store.objects.ObjectStore`. Images are
    stored as their raw bytes (a real PNG file), big text as UTF-8; display
    handles (``transient``) are not persisted, as in a saved notebook.
    """
    return [_save_one(objects, output) for output in outputs]


def _save_one(objects: Any, output: dict) -> dict:
    data = {}
    for mime, value in output.get("data", {}).items():
        if mime in BINARY_MIMETYPES and isinstance(value, str):
            raw = base64.b64decode(value)
            data[mime] = {"object": objects.put_bytes(raw), "size": len(raw), "encoding": "base64"}
        elif isinstance(value, str) and len(value) > INLINE_MAX_CHARS:
            raw = value.encode("utf-8")
            data[mime] = {"object": objects.put_bytes(raw), "size": len(raw), "encoding": "utf-8"}
        else:
            data[mime] = {"inline": value}
    ref = {"type": output.get("type", "display"), "data": data, "metadata": dict(output.get("metadata") or {})}
    display_id = (output.get("transient") or {}).get("display_id")
    if display_id:  # kept so that reading folds later updates into this output
        ref["display_id"] = str(display_id)
    return ref


def fold_updates(refs: Sequence[dict]) -> list[dict]:
    """Stored refs as a saved notebook would show them: each ``update_display``
    replaces the content of the earlier output with the same display id (and is
    not an output of its own); an update with no such output stays, as a display."""
    folded: list[dict] = []
    by_id: dict[str, int] = {}
    for ref in refs:
        display_id = ref.get("display_id")
        if ref.get("type") == "update_display" and display_id in by_id:
            position = by_id[display_id]
            folded[position] = {**folded[position], "data": ref["data"], "metadata": ref.get("metadata", {})}
            continue
        if ref.get("type") == "update_display":
            ref = {**ref, "type": "display"}
        if display_id:
            by_id.setdefault(display_id, len(folded))
        folded.append(ref)
    return folded


def load_outputs(objects: Any, refs: Sequence[dict]) -> list[dict]:
    """The bundles behind ``refs`` (as :func:`save_outputs` returned them).

    A payload whose object is missing (a pruned or damaged store) becomes a
    note in ``text/plain`` instead of failing the whole read.
    """
    return [_load_one(objects, ref) for ref in fold_updates(refs)]


def _load_one(objects: Any, ref: dict) -> dict:
    data: dict[str, Any] = {}
    missing = []
    for mime, item in ref.get("data", {}).items():
        if "inline" in item:
            data[mime] = item["inline"]
            continue
        try:
            raw = objects.get_bytes(item["object"])
        except DamagedObjectError:
            missing.append(f"{_NOTE_PREFIX} the {mime} form of this output is damaged in the store "
                           f"(object {item['object']}, now quarantined).")
            continue
        except (NotFoundError, OSError):
            missing.append(f"{_NOTE_PREFIX} the {mime} form of this output is missing from the store "
                           f"(object {item['object']}).")
            continue
        data[mime] = base64.b64encode(raw).decode("ascii") if item["encoding"] == "base64" else raw.decode("utf-8")
    if missing:
        note = "\n".join(missing)
        data["text/plain"] = f"{data['text/plain']}\n{note}" if "text/plain" in data else note
    return {"type": ref.get("type", "display"), "data": data, "metadata": dict(ref.get("metadata") or {})}


def describe_outputs(objects: Any, refs: Sequence[dict]) -> list[str]:
    """Text lines for ``dump --outputs``: each output's text/plain form and the
    paths of its stored payloads (images), without loading the images."""
    lines: list[str] = []
    for number, ref in enumerate(fold_updates(refs), 1):
        label = "Out" if ref.get("type") == "execute_result" else "display"
        lines.append(f"[{number}] {label}")
        data = ref.get("data", {})
        text = data.get("text/plain", {})
        if "inline" in text:
            lines.extend("    " + line for line in str(text["inline"]).splitlines() or [""])
        for mime, item in data.items():
            if "object" in item:
                lines.append(f"    {mime}: {objects.path(item['object'])} ({_human(item['size'])})")
        for mime in data:
            if mime != "text/plain" and "inline" in data[mime]:
                lines.append(f"    {mime}: (inline, {_human(payload_size(data[mime]['inline']))})")
    return lines


#: richest first: what the inspector draws for an output
_PREVIEW_ORDER = ("image/png", "image/jpeg", "image/svg+xml", "text/html", "text/markdown", "text/plain")
PREVIEW_MAX_CHARS = 2 * _MB


def output_previews(objects: Any, refs: Sequence[dict]) -> list[dict]:
    """One drawable record per stored output, for the artifact inspector:
    ``{"type", "label", "kind": "image"|"html"|"text", "mimetype", "src"|"html"|"text"}``."""
    previews = []
    for number, bundle in enumerate(load_outputs(objects, refs), 1):
        data = bundle["data"]
        label = f"Out [{number}]" if bundle["type"] == "execute_result" else f"display [{number}]"
        record = {"type": bundle["type"], "label": label, "kind": "text", "mimetype": "text/plain",
                  "text": str(data.get("text/plain", ""))}
        for mime in _PREVIEW_ORDER:
            value = data.get(mime)
            if not isinstance(value, str) or len(value) > PREVIEW_MAX_CHARS:
                continue
            if mime.startswith("image/"):
                encoded = value if mime in BINARY_MIMETYPES else base64.b64encode(value.encode()).decode("ascii")
                record.update(kind="image", mimetype=mime, src=f"data:{mime};base64,{encoded}")
            elif mime == "text/html":
                record.update(kind="html", mimetype=mime, html=value)
            else:
                record.update(mimetype=mime, text=value)
            break
        previews.append(record)
    return previews


class Output:
    """One stored output, as the Client API hands it back (``task.outputs``).

    Displaying it in a notebook shows the rich form again.
    """

    def __init__(self, type: str, data: dict, metadata: dict | None = None) -> None:  # noqa: A002 - Jupyter's name
        self.type = type
        self.data = data
        self.metadata = metadata or {}

    @property
    def text(self) -> str:
        """The plain-text form ("" if the output has none)."""
        return str(self.data.get("text/plain", ""))

    @property
    def mimetypes(self) -> list[str]:
        return sorted(self.data)

    def _repr_mimebundle_(self, include=None, exclude=None) -> tuple[dict, dict]:
        return dict(self.data), dict(self.metadata)

    def __repr__(self) -> str:
        return f"Output(type={self.type!r}, mimetypes={self.mimetypes})"
