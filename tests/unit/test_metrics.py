"""common/core/metrics.py: what a metrics file already holds, read back for a resume."""

import json

from common.core.metrics import last_epoch_recorded


def test_the_last_epoch_recorded_skips_evaluations_and_lines_that_do_not_parse(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert last_epoch_recorded(str(path)) == 0  # no file yet
    lines = [json.dumps({"epoch": 1}), json.dumps({"epoch": 2}), '{"epoch": 3, "cut sh',
             json.dumps({"epoch": 9, "evaluation_only": True}), json.dumps(["not", "a", "record"]),
             json.dumps({"epoch": "4"})]
    path.write_text("\n".join(lines) + "\n")
    assert last_epoch_recorded(str(path)) == 2


def test_a_call_is_timed_after_a_warm_up_at_least_so_many_times_and_so_long_and_its_median_taken(monkeypatch):
    from common.core import metrics

    class Clock:  # each call lasts 1/512 s (about 2 ms, exact in binary) of this clock, whatever else runs
        now = 0.0

        @classmethod
        def perf_counter(cls):
            return cls.now

    calls = []

    def call(seconds=1 / 512):
        calls.append(1)
        Clock.now += seconds
    monkeypatch.setattr(metrics, "time", Clock)
    assert metrics.median_call_seconds(call, 5, 0.0) == 1 / 512 and len(calls) == 6  # a warm-up, then five
    calls.clear()
    assert metrics.median_call_seconds(call, 2, 10 / 512) == 1 / 512
    assert len(calls) == 1 + 10  # two calls do not last 10/512 s: it goes on until they do

    durations = iter([9.0] + [1.0] * 4 + [50.0])  # a slow warm-up, then one slow call of five: the median holds

    def uneven():
        Clock.now += next(durations)
    assert metrics.median_call_seconds(uneven, 5, 0.0) == 1.0
