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


def test_a_call_is_timed_after_a_warm_up_at_least_so_many_times_and_so_long_and_its_median_taken():
    import time

    from common.core.metrics import median_call_seconds

    calls = []
    assert median_call_seconds(lambda: calls.append(1), 5, 0.0) >= 0 and len(calls) == 6  # a warm-up, then five

    def busy(seconds=2e-3):
        calls.append(1)
        until = time.perf_counter() + seconds
        while time.perf_counter() < until:
            pass
    calls.clear()
    assert median_call_seconds(busy, 2, 0.02) >= 2e-3
    assert len(calls) >= 1 + 10  # two calls are not 20 ms: it goes on until they are
