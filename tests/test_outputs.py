"""Output bundles: size limits, and storage through the real content-addressed ObjectStore."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from flowmagic.store.outputs import (
    INLINE_MAX_CHARS,
    Output,
    OutputBudget,
    OutputLimits,
    describe_outputs,
    load_outputs,
    make_output,
    save_outputs,
)
from flowmagic.errors import UsageError
from flowmagic.store.objects import ObjectStore

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 40


@pytest.fixture
def objects(tmp_path):
    return ObjectStore(tmp_path / "objects")


def figure_output(png: bytes = PNG) -> dict:
    return make_output("display", {"text/plain": "<Figure size 640x480 with 1 Axes>", "image/png": png})


# -- building ------------------------------------------------------------------------


def test_make_output_turns_binary_into_base64_and_text_bytes_into_str():
    output = make_output("display", {"image/png": PNG, "text/html": b"<b>x</b>"}, None, {"display_id": "d1"})
    assert base64.b64decode(output["data"]["image/png"]) == PNG
    assert output["data"]["text/html"] == "<b>x</b>"
    assert output["metadata"] == {} and output["transient"] == {"display_id": "d1"}
    json.dumps(output)  # what a task sends over its channel


# -- limits ----------------------------------------------------------------------------


def test_budget_keeps_small_outputs_untouched():
    budget = OutputBudget(OutputLimits())
    output = make_output("display", {"text/plain": "1"})
    assert budget.admit(output) is output


def test_budget_drops_an_oversized_form_and_says_so_in_text():
    budget = OutputBudget(OutputLimits(max_item_bytes=100))
    kept = budget.admit(make_output("display", {"image/png": PNG}))
    assert "image/png" not in kept["data"]
    assert "image/png form of this output was dropped" in kept["data"]["text/plain"]
    assert "over the 100 bytes limit" in kept["data"]["text/plain"]


def test_budget_cuts_long_plain_text_instead_of_dropping_it():
    budget = OutputBudget(OutputLimits(max_item_bytes=50))
    kept = budget.admit(make_output("execute_result", {"text/plain": "y" * 500}))
    text = kept["data"]["text/plain"]
    assert text.startswith("y" * 50) and "text cut at 50 bytes" in text


def test_budget_total_size_gives_one_note_then_silence():
    budget = OutputBudget(OutputLimits(max_total_bytes=1000))
    admitted = [budget.admit(make_output("display", {"text/plain": "z" * 400})) for _ in range(5)]
    assert [a is not None for a in admitted] == [True, True, True, False, False]
    assert "outputs over 1000 bytes in total" in admitted[2]["data"]["text/plain"]
    assert budget.dropped == 3


def test_limits_from_the_environment():
    limits = OutputLimits.from_env({"FLOWMAGIC_OUTPUT_MAX_MB": "0.5", "FLOWMAGIC_OUTPUTS_MAX_MB": "2"})
    assert limits.max_item_bytes == 512 * 1024 and limits.max_total_bytes == 2 * 1024 * 1024
    assert OutputLimits.from_env({}) == OutputLimits()
    with pytest.raises(UsageError, match="FLOWMAGIC_OUTPUT_MAX_MB='big' is not a size in MB"):
        OutputLimits.from_env({"FLOWMAGIC_OUTPUT_MAX_MB": "big"})


# -- storing ---------------------------------------------------------------------------


def test_images_are_stored_as_real_files_once(objects):
    refs = save_outputs(objects, [figure_output(), figure_output()])
    first, second = (ref["data"]["image/png"] for ref in refs)
    assert first == second and first["encoding"] == "base64" and first["size"] == len(PNG)
    assert objects.path(first["object"]).read_bytes() == PNG
    assert refs[0]["data"]["text/plain"] == {"inline": "<Figure size 640x480 with 1 Axes>"}
    json.dumps(refs)  # what Metadata.record_attempt keeps


def test_round_trip_gives_back_the_same_bundles(objects):
    big_html = "<table>" + "<tr><td>1</td></tr>" * 1000 + "</table>"
    outputs = [
        figure_output(),
        make_output("display", {"text/plain": "df", "text/html": big_html}, {"isolated": True}),
        make_output("execute_result", {"text/plain": "42", "application/json": {"a": [1, 2]}}),
    ]
    refs = save_outputs(objects, outputs)
    assert "object" in refs[1]["data"]["text/html"] and len(big_html) > INLINE_MAX_CHARS
    assert refs[2]["data"]["application/json"] == {"inline": {"a": [1, 2]}}
    assert load_outputs(objects, refs) == [{k: o[k] for k in ("type", "data", "metadata")} for o in outputs]


def test_display_handles_are_not_persisted(objects):
    output = make_output("display", {"text/plain": "x"}, None, {"display_id": "abc"})
    assert "transient" not in save_outputs(objects, [output])[0]


def test_updates_of_a_display_handle_fold_into_it_when_read(objects):
    refs = save_outputs(objects, [
        make_output("display", {"text/plain": "0%"}, None, {"display_id": "bar"}),
        make_output("display", {"text/plain": "other"}),
        *(make_output("update_display", {"text/plain": f"{p}%"}, None, {"display_id": "bar"}) for p in (50, 100)),
        make_output("update_display", {"text/plain": "orphan"}, None, {"display_id": "gone"}),
    ])
    loaded = load_outputs(objects, refs)
    assert [(o["type"], o["data"]["text/plain"]) for o in loaded] == [
        ("display", "100%"), ("display", "other"), ("display", "orphan")]
    assert describe_outputs(objects, refs)[:2] == ["[1] display", "    100%"]


def test_updates_do_not_use_up_the_output_count():
    budget = OutputBudget(OutputLimits(max_outputs=2))
    assert budget.admit(make_output("display", {"text/plain": "0%"}, None, {"display_id": "bar"})) is not None
    for p in range(100):
        assert budget.admit(make_output("update_display", {"text/plain": f"{p}%"}, None, {"display_id": "bar"}))
    assert budget.admit(make_output("display", {"text/plain": "next"}))["data"]["text/plain"] == "next"


def test_a_missing_payload_becomes_a_note(objects):
    refs = save_outputs(objects, [figure_output()])
    objects.path(refs[0]["data"]["image/png"]["object"]).unlink()
    loaded = load_outputs(objects, refs)[0]
    assert "image/png" not in loaded["data"]
    assert "image/png form of this output is missing from the store" in loaded["data"]["text/plain"]


def test_describe_outputs_prints_text_and_image_paths(objects):
    refs = save_outputs(objects, [make_output("display", {"text/plain": "   a\n0  1", "text/html": "<table/>"}),
                                  figure_output(),
                                  make_output("execute_result", {"text/plain": "42"})])
    lines = describe_outputs(objects, refs)
    png_path = objects.path(refs[1]["data"]["image/png"]["object"])
    assert lines[:3] == ["[1] display", "       a", "    0  1"]
    assert f"    image/png: {png_path} ({len(PNG) / 1024:.1f} KB)" in lines
    assert lines[-2:] == ["[3] Out", "    42"]


def test_output_objects_render_again_in_a_notebook(objects):
    loaded = load_outputs(objects, save_outputs(objects, [figure_output()]))[0]
    output = Output(**loaded)
    data, metadata = output._repr_mimebundle_()
    assert base64.b64decode(data["image/png"]) == PNG
    assert output.text.startswith("<Figure") and output.mimetypes == ["image/png", "text/plain"]
    assert "image/png" in repr(output)


# -- the console command ---------------------------------------------------------------


@pytest.mark.slow
def test_flowmagic_dump_outputs_prints_text_and_image_paths(tmp_path):
    from runtime_helpers import flowmagic, flowmagic_json, write_notebook

    store = tmp_path / "store"
    nb = write_notebook(tmp_path / "plots.ipynb", [
        "import matplotlib.pyplot as plt",
        "%%step start\nvalues = [3, 1, 2]\ndisplay(f'{len(values)} values')\nplt.plot(values)\nsum(values)",
        "%%step end\ntotal = sum(values)",
    ])
    assert flowmagic("run", nb, store=store).returncode == 0
    text = flowmagic("dump", nb, "1/start", "--outputs", store=store)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert any(line.startswith("Outputs of start/") for line in lines)
    assert "    '3 values'" in lines and "[2] Out" in lines and "    6" in lines
    (png_line,) = [line for line in lines if line.strip().startswith("image/png: ")]
    png_path = Path(png_line.split("image/png: ")[1].rsplit(" (", 1)[0])
    assert png_path.read_bytes().startswith(b"\x89PNG") and str(store) in str(png_path)

    doc = flowmagic_json("dump", nb, "1", "--outputs", store=store)
    (start,) = doc["outputs"]
    assert start["step"] == "start" and [o["type"] for o in start["outputs"]] == ["display", "execute_result", "display"]
    assert "artifacts" in doc
    assert "outputs" not in flowmagic_json("dump", nb, "1", store=store)  # the stable document, unchanged


# -- the artifact inspector ------------------------------------------------------------------


@pytest.mark.slow
def test_the_inspector_shows_a_tasks_outputs(tmp_path):
    from flowmagic.flow.graph import build_flow
    from flowmagic.runtime.orchestrator.scheduler import run_flow
    from flowmagic.store import open_store
    from flowmagic.widgets.inspector import Inspector

    store = open_store(tmp_path / "store")
    graph = build_flow(["import pandas as pd\nimport matplotlib.pyplot as plt",
                        "%%step start\ndisplay(pd.DataFrame({'a': [1]}))\nplt.plot([1, 2])\n6 * 7"], name="Shown")
    assert run_flow(graph, store).status == "succeeded"
    inspector = Inspector(store, "Shown", step="start")
    outputs = inspector.detail["outputs"]
    assert [(o["label"], o["kind"]) for o in outputs] == [
        ("display [1]", "html"), ("Out [2]", "text"), ("display [3]", "image")]
    assert "<table" in outputs[0]["html"] and outputs[1]["text"] == "42"
    assert base64.b64decode(outputs[2]["src"].split(",", 1)[1]).startswith(b"\x89PNG")
    text = inspector.inspector_text()
    assert "  Out [2]: 42" in text and "  display [3]: image/png" in text


def test_a_cloned_task_shows_its_origins_outputs(tmp_path):
    from flowmagic.client import Flow
    from flowmagic.flow.graph import build_flow
    from flowmagic.runtime.orchestrator.scheduler import resume_flow, run_flow
    from flowmagic.store import open_store

    store = open_store(tmp_path / "store")
    cells = ["%%step start\nvalues = [1, 2]\ndisplay('from start')\nlen(values)",
             "%%step end\ntotal = sum(values) / 0"]
    assert run_flow(build_flow(cells, name="Resumed"), store).status == "failed"
    cells[1] = "%%step end\ntotal = sum(values)"
    resumed = resume_flow(build_flow(cells, name="Resumed"), store)
    assert resumed.status == "succeeded"
    clone = Flow("Resumed", root=store.root)[resumed.run_id]["start"].task
    assert clone.origin is not None
    assert [o.text for o in clone.outputs] == ["'from start'", "2"]


def test_outputs_reach_the_ui_in_order_with_the_printed_text(tmp_path):
    """A task's text (prints and `!cmd`) and its outputs travel on different pipes;
    the UI must still see them in the order the step produced them."""
    from flowmagic.flow.graph import build_flow
    from flowmagic.runtime.orchestrator.scheduler import run_flow
    from flowmagic.store import open_store

    body = "".join(f"print('line {i}')\ndisplay('shown {i}')\n!echo shell {i}\n" for i in range(25))
    graph = build_flow(["%%step start\n" + body + "done = True"], name="Ordered")
    seen: list[str] = []

    def on_event(event) -> None:
        if event.kind == "display":
            seen.append(event.data["data"]["text/plain"].strip("'"))
        elif event.kind == "output" and event.stream == "stdout":
            seen.extend(line for line in event.text.splitlines() if line)

    assert run_flow(graph, open_store(tmp_path / "store"), on_event=on_event).status == "succeeded"
    assert seen == [text for i in range(25) for text in (f"line {i}", f"shown {i}", f"shell {i}")]
