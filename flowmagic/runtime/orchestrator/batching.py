"""How many tasks of a step share one forked process (worker/batch.py).

A trivial task costs a few milliseconds, and forking a process for it about
as much again (fork, exit, reaping, relaying). So once a step's tasks are
known to be short, the engine hands a process several of them: as many as
fill about ``TARGET_SECONDS`` of work, at most ``$FLOWMAGIC_BATCH`` (1: every
task has its own process), and never so many that a core goes idle while
another has a queue. A step's first tasks run alone, so a slow step is never
batched, and a step whose batch process refused (a mutable prelude value, a
thread left running) is not batched again in this run.
"""
from __future__ import annotations

import math

from flowmagic.runtime.orchestrator.logs import number_from_env

BATCH_VAR = "FLOWMAGIC_BATCH"
DEFAULT_MAX = 64
TARGET_SECONDS = 0.1


def max_batch() -> int:
    return number_from_env(BATCH_VAR, DEFAULT_MAX, convert=int, accept=lambda v: v >= 1,
                           expected="a whole number of tasks per process, 1 or more (1: one process per task)")


class BatchSizer:
    """Per step: the mean time of its finished tasks, and whether it may be batched at all."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._time: dict[str, tuple[float, int]] = {}    # step -> (seconds, tasks)
        self.refused: dict[str, str] = {}                 # step -> why its batch process refused

    def observe(self, step: str, seconds: float) -> None:
        total, count = self._time.get(step, (0.0, 0))
        self._time[step] = (total + max(seconds, 0.0), count + 1)

    def refuse(self, step: str, reason: str) -> None:
        self.refused.setdefault(step, reason)

    def size(self, step: str, waiting: int, slots: int) -> int:
        """How many of ``waiting`` ready tasks of ``step`` (this one included) one process takes."""
        if self.limit <= 1 or step in self.refused or step not in self._time:
            return 1
        total, count = self._time[step]
        mean = total / count
        wanted = self.limit if mean <= 0 else int(TARGET_SECONDS / mean)
        spread = math.ceil(waiting / max(slots, 1))   # every slot gets a share of what is left
        return max(1, min(wanted, self.limit, spread))
