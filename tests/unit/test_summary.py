"""The run summary: its record, each host's ranks, and a write that is whole or not at all."""

import json

import pytest

from common.core import summary
from common.core.summary import MembershipChange, Outcome, Resumed, RunSummary, Stop


def a_summary(**changes) -> RunSummary:
    fields = dict(framework="torch", mode="hybrid", world_size=4, dp=2, pp=2, epochs=3, dataset="digits",
                  train_samples=1437, test_samples=360, image_shape=[1, 8, 8], layer_ranges=[(0, 3), (3, 7)],
                  stage_ranks=[[0, 2], [1, 3]], schedule="1f1b", microbatches=4, virtual_stages=1,
                  partition_costs=[1.0] * 7, hosts={"node1": [0, 1], "node2": [2, 3]},
                  decoder_processes=[0, 0, 0, 0], decode_on_device=False)
    return RunSummary(**{**fields, **changes})


def test_the_record_is_plain_json_with_named_fields(tmp_path):
    ran = a_summary(outcome=Outcome.STOPPED, epochs_done=1, steps_into_next=5,
                    resumed=Resumed("ckpt-epoch0001", 1, 0), stop=Stop("SIGTERM", 1, 5, "ckpt-epoch0001-step000005"),
                    membership_changes=[MembershipChange(3, 2, 1, 4)])
    path = tmp_path / "summary.json"
    summary.write(str(path), ran)
    read = json.loads(path.read_text())
    assert read["outcome"] == "stopped" and read["mode"] == "hybrid"
    assert read["stop"] == {"cause": "SIGTERM", "epochs_done": 1, "steps_into_next": 5,
                            "checkpoint": "ckpt-epoch0001-step000005"}
    assert read["resumed"] == {"path": "ckpt-epoch0001", "epochs_done": 1, "steps_into_next": 0}
    assert read["membership_changes"] == [{"before": 3, "after": 2, "epochs_done": 1, "steps_into_next": 4}]
    assert read["layer_ranges"] == [[0, 3], [3, 7]] and read["test_accuracy"] is None


def test_host_ranks_lists_each_hosts_ranks_in_order():
    assert summary.host_ranks(["a", "b", "a", "b"]) == {"a": [0, 2], "b": [1, 3]}
    assert summary.host_ranks([]) == {}


def test_a_failed_write_leaves_the_previous_summary_and_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    summary.write(str(path), a_summary(outcome=Outcome.COMPLETED))
    before = path.read_text()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(summary.json, "dump", full_disk)
    with pytest.raises(OSError):
        summary.write(str(path), a_summary(outcome=Outcome.STOPPED))
    assert path.read_text() == before and sorted(entry.name for entry in tmp_path.iterdir()) == ["summary.json"]
