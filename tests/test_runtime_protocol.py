"""The typed protocol keeps the wire and the store format of earlier releases."""
from __future__ import annotations

import json

from flowmagic.runtime.protocol import ExceptionRecord, Manifest, TaskSpec
from runtime_helpers import attempts, flowmagic, tasks, write_notebook

SPEC_KEYS = {"objects_root", "flow", "run_id", "task_id", "attempt", "step", "cell", "index", "source", "code",
             "first_line", "filename", "params", "bindings", "foreach", "inputs", "catch", "catch_now", "writes",
             "required", "foreach_vars", "mutation_check"}


def spec_json() -> dict:
    return {"objects_root": "/tmp/objects", "flow": "F", "run_id": 3, "task_id": 9, "attempt": 1, "step": "fit",
            "cell": 4, "index": [2], "source": "%%step fit\nm = input", "code": "m = input", "first_line": 2,
            "filename": "<cell 4: step fit>", "params": {"alpha": 0.5},
            "bindings": {"x": {"ref": {"name": "x", "hash": "ab"}, "step": "start"}},
            "foreach": {"binding": {"value": [1, 2, 3]}, "index": 2}, "inputs": None, "catch": None,
            "catch_now": True, "writes": ["m"], "required": ["m"], "foreach_vars": [], "mutation_check": True}


def test_task_spec_round_trips_the_22_keys_of_the_wire():
    wire = spec_json()
    spec = TaskSpec.from_json(json.loads(json.dumps(wire)))
    assert spec.index == (2,) and spec.writes == ("m",) and spec.bindings["x"]["step"] == "start"
    assert set(spec.to_json()) == SPEC_KEYS and spec.to_json() == wire


def test_exception_records_of_every_historic_shape_read_and_write_unchanged():
    plain = {"type": "TimeoutError", "message": "too slow", "traceback": "TimeoutError: too slow\n"}
    cell = {"type": "ValueError", "message": "bad", "traceback": "Traceback ...\nValueError: bad\n",
            "traceback_lines": ["Traceback ...", "ValueError: bad"], "line": 3}
    for stored in (plain, cell):
        assert ExceptionRecord.from_json(stored).to_json() == stored
    assert ExceptionRecord.plain("TimeoutError", "too slow").to_json() == plain
    assert ExceptionRecord.from_json(cell).last_line == "ValueError: bad"
    assert ExceptionRecord.from_json(None) is None and ExceptionRecord.from_json({}) is None


def test_manifest_keeps_caught_only_when_the_task_set_it():
    failed = Manifest("failed", exception=ExceptionRecord.plain("E", "m"))
    assert "caught" not in failed.to_json()
    wire = {"outcome": "ok", "artifacts": [{"name": "x"}], "exception": None, "outputs": [], "foreach": {},
            "warnings": ["w"], "not_persisted": [], "caught": False}
    assert Manifest.from_json(wire).to_json() == wire


def test_a_real_failing_task_stores_the_record_a_cell_exception_always_had(tmp_path):
    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "boom.ipynb", ["%%step start\nx = 1\nraise ValueError('no x')"])
    proc = flowmagic("run", nb, store=store)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [task] = tasks(store, "Boom", 1, "start")
    [attempt] = attempts(store, task.task_id)
    exc = attempt.exception
    assert set(exc) == {"type", "message", "traceback", "traceback_lines", "line"}
    assert (exc["type"], exc["message"], exc["line"]) == ("ValueError", "no x", 3)
    assert exc["traceback"].splitlines() == exc["traceback_lines"]
