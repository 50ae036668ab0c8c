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
