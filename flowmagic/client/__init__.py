"""Client API: read past runs, as Metaflow's client does.

    from flowmagic import Flow, Run
    Flow("MovieFlow").latest_run["join"].task.data.failed
    Run("MovieFlow/12")["start"].task["movies"].data

Objects are light handles named by a *pathspec* (``Flow/run_id/step/task_id
/artifact``); they read the metadata when asked, and load an artifact's value
only when its ``.data`` is read. The store is found as the notebook finds it:
``$FLOWMAGIC_HOME``, else ``./.flowmagic``; :func:`namespace_root` points the
client elsewhere.
"""
from __future__ import annotations

from ._base import namespace_root
from ._runs import Flow, Metaflow, Run, Step
from ._tasks import DataArtifact, Task, TaskArtifacts, TaskData, TaskException

__all__ = ["DataArtifact", "Flow", "Metaflow", "Run", "Step", "Task", "TaskArtifacts", "TaskData",
           "TaskException", "namespace_root"]
