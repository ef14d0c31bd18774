"""The orchestrator's task table (runtime/orchestrator/tasks.py) and the queue that reads it:
a step's pending and settled tasks kept as columns read back as the tasks they were."""
from __future__ import annotations

import random
import tracemalloc

import pytest

from flowmagic.runtime.orchestrator import inputs as plan
from flowmagic.runtime.orchestrator.run_state import RetryQueue
from flowmagic.runtime.orchestrator.tasks import StepTasks, StoredRefs, TaskInfo

from test_runtime_inputs import GRAPH, TASKS, ref, refs_only


def stored_in(refs_by_id: dict) -> StoredRefs:
    """Refs "left in the metadata": a dict standing in for Metadata.artifacts / artifacts_of."""
    return StoredRefs(lambda task_id: list(refs_by_id[task_id]),
                      lambda ids: {i: list(refs_by_id[i]) for i in ids})


def table_of(step: str, tasks: list[TaskInfo], order=None) -> StepTasks:
    """The tasks as the engine leaves them: created pending, run (checked out), settled done."""
    refs_by_id = {t.task_id: t.refs for t in tasks}
    stored = stored_in(refs_by_id)
    table = StepTasks(step, stored)
    tasks = [tasks[k] for k in order] if order else tasks
    for pos in table.add_pending([t.task_id for t in tasks], [t.index for t in tasks]):
        info = table.checkout(pos)
        info.state = "done"
        info.keep_refs(tasks[pos].refs, stored if info.index else None)
        table.settle(info)
    return table


READS = [("rows", (1,), "const", "start"), ("cells", (1, 0), "row", "rows"), ("join", (), "row", "rows"),
         ("join", (), "cell", "cells"), ("cells", (1, 1), "const", "start"), ("both", (), "other", "side")]


@pytest.mark.parametrize("shuffled", [False, True], ids=["in order", "out of order"])
@pytest.mark.parametrize("reader, index, var, producer", READS)
def test_a_table_gives_the_bindings_a_list_of_the_same_tasks_gives(reader, index, var, producer, shuffled):
    chain = plan.chains(GRAPH)
    tasks = TASKS[producer]
    order = random.Random(7).sample(range(len(tasks)), len(tasks)) if shuffled else None
    table = table_of(producer, tasks, order)
    from_list = plan.binding_for(var, producer, chain[reader], index, chain, tasks)
    assert refs_only(plan.binding_for(var, producer, chain[reader], index, chain, table)) == refs_only(from_list)
    assert plan.inputs_for(producer, chain[reader], index, chain, table) == \
        plan.inputs_for(producer, chain[reader], index, chain, tasks)


def test_a_settled_task_reads_back_as_it_finished_and_a_checked_out_one_is_the_same_object():
    refs = {1: TASKS["side"][0].refs, 2: TASKS["side"][1].refs}
    stored = stored_in(refs)
    table = StepTasks("side", stored)
    first, second = table.add_pending([1, 2], [(0,), (1,)])
    assert [(t.task_id, t.index, t.state) for t in table] == [(1, (0,), "pending"), (2, (1,), "pending")]
    info = table.checkout(first)
    assert table.checkout(first) is info and table[first] is info
    info.state = "done"
    info.keep_refs(refs[1], stored)
    table.settle(info)
    back = table[first]
    assert back is not info and (back.task_id, back.index, back.state) == (1, (0,), "done")
    assert back.artifacts == refs[1] and plan.refs_of(table)[1] == refs[1]
    assert [table.finished_ok_at(p) for p in (first, second)] == [True, False]


def test_a_task_with_a_foreach_list_or_an_exception_keeps_them():
    table = StepTasks("rows", stored_in({}))
    a, b = table.add_pending([5, 6], [(0,), (1,)])
    wrote_list = table.checkout(a)
    wrote_list.state, wrote_list.foreach = "done", {"cols": {"length": 2, "items": ["0", "1"]}}
    table.settle(wrote_list)
    caught = table.checkout(b)
    caught.state, caught.exception = "caught", {"type": "ValueError"}
    table.settle(caught)
    assert table[a].foreach == {"cols": {"length": 2, "items": ["0", "1"]}}
    assert table[b].exception == {"type": "ValueError"} and table[b].state == "caught"
    assert list(plan.foreach_indices("cols", table)) == [((0, 0), "0"), ((0, 1), "1")]


def test_an_index_of_another_depth_is_refused():
    table = StepTasks("cells")
    table.add_pending([1], [(0, 0)])
    with pytest.raises(ValueError, match="step 'cells'"):
        table.add_pending([2], [(1,)])


def test_a_100000_task_step_queued_run_and_settled_takes_a_few_megabytes():
    """~17 bytes a task in columns; TaskInfo objects and (info, attempt) pairs were ~260 bytes each."""
    n = 100_000
    stored = stored_in({})
    tracemalloc.start()
    try:
        table, queue = StepTasks("fit", stored), RetryQueue(delay=0)
        queue.add_pending(table, table.add_pending(range(1000, 1000 + n), [(i,) for i in range(n)]))
        queued = tracemalloc.get_traced_memory()[0]
        assert queue.ready_count() == n
        while queue.has_ready():
            for info, attempt in queue.pop_alike("fit", 0, 64):
                assert attempt == 0
                info.state = "done"
                info.keep_refs((), stored)
                table.settle(info)
        settled = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert queued < 3_000_000 and settled < 3_000_000, (queued, settled)
    assert len(table) == n and all(table.finished_ok_at(p) for p in range(n))
    assert table[n - 1].task_id == 1000 + n - 1 and table[n - 1].index == (n - 1,)


def test_the_queue_keeps_its_order_across_pending_ranges_retries_and_a_drain():
    fit, end = StepTasks("fit"), StepTasks("end")
    queue = RetryQueue(delay=0)
    queue.add_pending(fit, fit.add_pending([1, 2, 3], [(0,), (1,), (2,)]))
    queue.add_pending(end, end.add_pending([9], [()]))
    first, attempt = queue.pop()
    assert (first.task_id, attempt) == (1, 0)
    queue.add_first([(first, 1)])   # back at the head: a retry is not a first attempt
    assert queue.ready_count() == 4
    assert queue.pop_alike("fit", 0, 10) == []
    assert queue.pop() == (first, 1)
    assert [(i.task_id, a) for i, a in queue.pop_alike("fit", 0, 10)] == [(2, 0), (3, 0)]
    assert [(i.task_id, i.step) for i, _a in queue.drain()] == [(9, "end")]
    assert not queue.has_ready() and queue.ready_count() == 0


def test_tasks_finished_before_the_run_are_settled_as_they_come():
    """A resume's clones and a session's earlier steps: columns at once; a task with refs in memory stays."""
    refs = {1: TASKS["side"][0].refs, 2: TASKS["side"][1].refs}

    class Meta:   # as Metadata: two bound methods, so two StoredRefs.of it are equal
        def artifacts(self, task_id):
            return list(refs[task_id])

        def artifacts_of(self, ids):
            return {i: list(refs[i]) for i in ids}

    meta = Meta()
    assert StoredRefs.of(meta) == StoredRefs.of(meta)
    clones = (TaskInfo(i, "side", (i - 1,), "cloned", stored=StoredRefs.of(meta)) for i in (1, 2))
    table = StepTasks.of("side", clones, StoredRefs.of(meta))
    assert [(t.task_id, t.state, t.artifacts) for t in table] == [(1, "cloned", refs[1]), (2, "cloned", refs[2])]
    start = TaskInfo(7, "start", (), "done", TASKS["start"][0].refs)
    assert StepTasks.of("start", [start], StoredRefs.of(meta))[0] is start


def test_a_steps_refs_are_gathered_by_index_with_none_where_a_task_did_not_assign():
    """What a %%step cell binds in the kernel (scheduler.run_step): StepResult.artifacts."""
    cells = TASKS["cells"]
    hashes = [[r.hash for r in row] for row in plan.step_refs(table_of("cells", cells), 2)["cell"]]
    assert hashes == [[ref("x00")], [ref("x10"), ref("x11")]]
    side = [TaskInfo(1, "side", (0,), "done", TASKS["side"][0].refs),
            TaskInfo(2, "side", (1,), "done", ()),                     # assigned nothing
            TaskInfo(3, "side", (2,), "done", TASKS["side"][1].refs)]
    gathered = plan.step_refs(StepTasks.of("side", side), 1)
    assert [r and r.hash for r in gathered["other"]] == [ref("o0"), None, ref("o1")]
    assert plan.step_refs(StepTasks.of("start", TASKS["start"]), 0)["const"].hash == ref("const")
