"""Parameter values for a run: defaults, overrides, validated against their types."""
from __future__ import annotations

import json
from typing import Any

from flowmagic.errors import UsageError

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}


def coerce(name: str, type_name: str, value: Any) -> Any:
    """``value`` as the parameter's type; strings (from a command line) are parsed."""
    try:
        if type_name == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise ValueError("expected true or false")
        if type_name == "int":
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(value)
        if type_name == "float":
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if type_name == "str":
            return str(value)
        if type_name == "json":
            return json.loads(value) if isinstance(value, str) else value
    except (TypeError, ValueError) as exc:
        raise UsageError(f"parameter '{name}' ({type_name}): cannot use {value!r}: {exc}") from None
    return value


def resolve_params(graph, given: dict[str, Any] | None) -> dict[str, Any]:
    """Defaults of every parameter, overridden by ``given`` (validated)."""
    given = dict(given or {})
    known = {p.name: p for p in graph.params}
    unknown = sorted(set(given) - set(known))
    if unknown:
        listed = ", ".join(sorted(known)) or "none"
        raise UsageError(f"unknown parameter {', '.join(repr(u) for u in unknown)} "
                         f"(the flow's parameters: {listed})")
    values = {}
    for name, param in known.items():
        if name in given:
            values[name] = coerce(name, param.type, given[name])
        else:
            values[name] = param.default
    return values
