"""The environment records (--pypi/--conda) a run keeps in its stored graph document.

The runtime writes them (``runtime/environments/builder.record_environment``);
``dump``, the inspector and the Client read them from here, without the runtime.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def recorded_environments(run: Any) -> dict[str, dict]:
    """step -> environment record (kind, requested, key, python, packages) of a RunRecord."""
    return dict((getattr(run, "graph", None) or {}).get("environments") or {})


def environments_of_run(meta: Any, flow: str, run_id: int, steps: Iterable[str] | None = None) -> dict[str, dict]:
    """The recorded environments of a run (optionally only of ``steps``), for `dump` and the inspector."""
    recorded = recorded_environments(meta.get_run(flow, run_id))
    wanted = None if steps is None else set(steps)
    return {step: record for step, record in sorted(recorded.items()) if wanted is None or step in wanted}
