"""The one vocabulary of states: runs, steps, tasks, and the sets built from them.

Every module that asks "did this task finish OK?" or "is this run over?"
asks it here, so the engine, the Client API, the widgets and the text
report cannot disagree.

One decision is made here for all of them: a **caught** task (``--catch``
recorded its exception) is a *successful* task, as in Metaflow, where a
``@catch`` task succeeds and its artifact holds the exception. Its
downstream steps run, its run can succeed, ``task.successful`` is True.
"""
from __future__ import annotations

from typing import Literal, get_args

RunState = Literal[
    "running",      # tasks are executing (or the run was never finished: the process died)
    "succeeded",    # every step finished OK
    "partial",      # a notebook session run in which some of the flow's steps never ran (or not since a change)
    "failed",       # a task failed and nothing caught it; the run stopped
    "interrupted",  # stopped by the user (Ctrl-C, the notebook's stop button)
    "crashed",      # never written: a `running` run whose orchestrator process is gone (computed on read)
]

TaskState = Literal[
    "pending",      # created, waiting for a worker (or its step's environment)
    "running",      # an attempt is executing
    "retrying",     # an attempt failed, another one is coming (--retry)
    "done",         # the last attempt succeeded
    "caught",       # the last attempt failed, --catch saved the exception; counts as successful
    "failed",       # the last attempt failed and nothing caught it
    "interrupted",  # stopped by the user
    "cancelled",    # never started (or stopped): another task failed, so the run stopped
    "cloned",       # copied from the origin run by resume
    "cached",       # copied from an identical earlier task by the step cache (--cache)
    "crashed",      # never written: an unfinished task of a run whose orchestrator is gone (computed on read)
]

StepState = Literal[
    "pending",      # not started in this run
    "running",      # at least one task is running (or some finished, some to go)
    "retrying",     # a task failed an attempt and runs again
    "done",         # every task finished OK
    "caught",       # every task finished OK, and at least one of them was caught
    "failed",       # a task failed its last attempt
    "interrupted",  # a task was stopped by the user
    "cancelled",    # its tasks were cancelled: another step failed, so the run stopped
    "cloned",       # every task was cloned from the origin run (resume)
    "cached",       # every task was copied from a matching earlier task (--cache)
    "stale",        # ran before, but a step upstream ran again since (notebook session)
]

RUN_STATES: tuple[str, ...] = get_args(RunState)
TASK_STATES: tuple[str, ...] = get_args(TaskState)
STEP_STATES: tuple[str, ...] = get_args(StepState)

# --- runs
RUN_FINISHED: frozenset[str] = frozenset({"succeeded", "partial", "failed", "interrupted", "crashed"})

# --- steps
# Every task finished OK: the step's outputs are there for the steps below.
STEP_FINISHED_OK: frozenset[str] = frozenset({"done", "caught", "cloned", "cached"})

# --- tasks
# Its artifacts are saved: steps downstream may read them; the task is successful.
TASK_FINISHED_OK: frozenset[str] = frozenset({"done", "caught", "cloned", "cached"})
# It ended without saving artifacts: the run cannot succeed.
TASK_FINISHED_BAD: frozenset[str] = frozenset({"failed", "interrupted", "cancelled", "crashed"})
# It will not change state again in this run.
TASK_TERMINAL: frozenset[str] = TASK_FINISHED_OK | TASK_FINISHED_BAD
# An attempt is executing or about to.
TASK_ACTIVE: frozenset[str] = frozenset({"running", "retrying"})
# Its artifacts come from another task (nothing executed).
TASK_REUSED: frozenset[str] = frozenset({"cloned", "cached"})
# Its code started and did not run to its end: counted as "failed" in progress
# bars and listed by the inspector, even when --catch made the task successful.
TASK_WENT_WRONG: frozenset[str] = frozenset({"failed", "interrupted", "caught"})


def task_successful(state: str) -> bool:
    """Whether a task in ``state`` finished OK (``caught`` included: see the module doc)."""
    return state in TASK_FINISHED_OK


def task_finished(state: str) -> bool:
    """Whether a task in ``state`` is over (an unknown state from a newer release counts as over)."""
    return state not in ("pending", *TASK_ACTIVE)
