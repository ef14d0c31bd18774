"""What a run or a step execution returns to its caller (CLI, magics)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunResult:
    flow: str
    run_id: int
    status: str                      # RunStatus
    origin_run_id: int | None
    failed: list[tuple[str, str]] = field(default_factory=list)   # (step, last line of exception)
    duration: float = 0.0
    tasks: int = 0                   # tasks executed (not cloned)
    cloned: int = 0
    cached: int = 0                  # tasks reused by the step cache
    caught: int = 0                  # tasks whose failure --catch saved

    def to_json(self) -> dict:
        return {"flow": self.flow, "run_id": self.run_id, "status": self.status,
                "origin_run_id": self.origin_run_id}


@dataclass
class StepResult:
    step: str
    status: str                      # "succeeded" | "failed" | "interrupted"
    task_ids: list[int]
    artifacts: dict[str, Any]        # name -> ArtifactRef, or (nested) lists of them for a foreach step
    exception: dict | None = None
    outputs: list[dict] = field(default_factory=list)
    task_states: list[str] = field(default_factory=list)   # TaskState of each task, in task order
