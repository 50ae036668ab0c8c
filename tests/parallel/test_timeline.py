"""--timeline: what each rank did, recorded as it ran, against the schedule it was meant to run."""

import json

import pytest
from PIL import Image

from common.observe import timeline
from common.parallel import schedule
from tests.helpers import assert_ok, run_training

STEPS = ["--epochs", 1, "--steps-per-epoch", 4, "--batch-size", 32, "--timeline-steps", 2]


def assert_spans_nest(spans, slack=2.0):
    """On one track, any two spans are disjoint or one holds the other (microseconds)."""
    for a in spans:
        for b in spans:
            a_end, b_end = a["ts"] + a["dur"], b["ts"] + b["dur"]
            disjoint = a_end <= b["ts"] + slack or b_end <= a["ts"] + slack
            nested = (a["ts"] >= b["ts"] - slack and a_end <= b_end + slack) or \
                     (b["ts"] >= a["ts"] - slack and b_end <= a_end + slack)
            assert disjoint or nested, (a, b)


@pytest.mark.parametrize("framework,layout,np_", [
    ("torch", ["--mode", "model", "--pp", 2, "--microbatches", 4, "--schedule", "gpipe"], 2),
    ("tf", ["--mode", "hybrid", "--pp", 2, "--dp", 2, "--microbatches", 4, "--schedule", "1f1b"], 4),
])
def test_a_pipeline_timeline_follows_its_schedule_and_its_spans_nest(tmp_path, framework, layout, np_):
    trace = tmp_path / "trace.json"
    assert_ok(run_training([*STEPS, *layout, "--timeline", trace], np_=np_, framework=framework))
    tracks = timeline.read_tracks(str(trace))
    assert len(tracks) == np_
    chosen = layout[layout.index("--schedule") + 1]
    for label, spans in tracks.items():
        stage = int(label.split("stage ")[1].split(",")[0])
        steps = sorted({span["args"]["step"] for span in spans})
        assert steps == [1, 2]  # the first step (warm-up) is left out, then --timeline-steps
        assert_spans_nest(spans)
        for step in steps:
            ran = [(span["cat"], span["args"]["microbatch"]) for span in spans
                   if span["args"]["step"] == step and span["cat"] in ("forward", "backward")]
            planned = [("forward" if action.kind == schedule.FORWARD else "backward", action.microbatch)
                       for action in schedule.compute_actions(chosen, stage, 2, 4)]
            assert ran == planned, label
            whole = [span for span in spans if span["args"]["step"] == step and span["cat"] == "step"]
            assert len(whole) == 1  # one step span holds everything the rank did in the step
        categories = {span["cat"] for span in spans}
        assert {"forward", "backward", "optimizer", "step"} <= categories
        assert ("wait" in categories) and ("data" in categories) == (stage == 0)
        if "--dp" in layout:
            assert "allreduce" in categories
    timeline.plot_traces([str(trace)], str(tmp_path / "trace.png"))
    with Image.open(tmp_path / "trace.png") as image:
        image.verify()


def test_parameter_server_and_data_mode_timelines(tmp_path):
    trace = tmp_path / "ps.json"
    assert_ok(run_training([*STEPS, "--mode", "ps", "--timeline", trace], np_=3))
    tracks = timeline.read_tracks(str(trace))
    assert sorted(tracks) == ["rank 0: server", "rank 1: worker", "rank 2: worker"]
    assert {span["name"] for span in tracks["rank 0: server"]} >= {"receive gradients", "optimizer step"}
    assert {span["name"] for span in tracks["rank 1: worker"]} >= {"forward", "backward", "receive parameters"}

    # Under horovodrun (which would take --timeline as its own) a bare --timeline-file: the run directory's.
    assert_ok(run_training([*STEPS, "--run-dir", tmp_path / "run", "--timeline-file"], np_=2, launcher="horovodrun"))
    text = (tmp_path / "run" / "timeline.json").read_text()
    assert "ALLREDUCE" in text and json.loads(text.rstrip().rstrip(",") + "]" if not text.rstrip().endswith("]")
                                              else text)
