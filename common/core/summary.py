"""What a run did, as one JSON object written whole at its end (``--summary-file``;
``summary.json`` in the run directory): how it ended, its final evaluation, where it
resumed from and which checkpoints it passed over, where it stopped and what it saved,
its layout, its hosts, and each change of membership under elastic training.

Scripts (and this project's tests) read it instead of the log, whose wording is for
people. A start that resumes a run directory writes it again for that start.
"""

from __future__ import annotations

import enum
import json
import os
from dataclasses import asdict, dataclass, field


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # every epoch trained (or only evaluated) and the final evaluation done
    STOPPED = "stopped"      # a signal (or the launcher's end) stopped it at a step boundary
    FAILED = "failed"        # stopped without saving (a non-finite loss)


@dataclass(frozen=True)
class Resumed:
    path: str
    epochs_done: int
    steps_into_next: int


@dataclass(frozen=True)
class Stop:
    cause: str               # SIGTERM, SIGUSR1, ... or "a signal to another rank"
    epochs_done: int
    steps_into_next: int
    checkpoint: str | None   # what it saved (None: nothing could be)


@dataclass(frozen=True)
class MembershipChange:
    """Elastic training: the workers went from ``before`` to ``after``; training went on
    from ``epochs_done`` epochs and ``steps_into_next`` steps."""
    before: int
    after: int
    epochs_done: int
    steps_into_next: int


@dataclass(frozen=True)
class ElasticRestart:
    """Elastic training started its loop again with ``workers`` workers at this position:
    ``rolled_back`` after a worker failed (back to the last commit), else because the hosts
    changed (where it was). A restart may keep the number of workers."""
    workers: int
    epochs_done: int
    steps_into_next: int
    rolled_back: bool


@dataclass
class RunSummary:
    framework: str
    mode: str
    world_size: int
    dp: int
    pp: int
    epochs: int
    dataset: str                             # --dataset: digits, cifar10, synthetic or folder
    train_samples: int
    test_samples: int
    image_shape: list[int]                   # channels, height, width
    layer_ranges: list[tuple[int, int]]      # each model piece's layers [first, end), in model order
    stage_ranks: list[list[int]]             # model and hybrid mode: each stage's ranks (its replicas)
    schedule: str                            # model and hybrid mode: gpipe, 1f1b or interleaved
    microbatches: int
    virtual_stages: int                      # model pieces per stage (interleaved)
    partition_costs: list[float]             # each layer's cost the cut was made by (--balance), else []
    hosts: dict[str, list[int]]              # host -> its ranks (empty under elastic training)
    decoder_processes: list[int]             # each rank's image decoder processes (none on a rank that
                                             # reads no images, or for a set in memory; empty under elastic)
    decode_on_device: bool
    # The last piece's own layer costs where they differ from partition_costs (--balance time
    # in TensorFlow: the pieces before it pay a recomputed forward as well), else [].
    last_piece_costs: list[float] = field(default_factory=list)
    memory_kind: str = ""                    # what the memory figures count: "resident" or a GPU's allocator
    predicted_memory: list[dict] = field(default_factory=list)  # each rank's peak in bytes as predicted at
                                             # the start, by what holds it, and its "total"
                                             # (common/parallel/memory_model.py); empty under elastic
    peak_memory: list[int] = field(default_factory=list)  # each rank's peak in bytes, measured (last epoch)
    layout_choice: dict | None = None        # --mode auto: the layouts weighed, their predictions, the choice
    outcome: Outcome | None = None
    error: str = ""
    epochs_done: int = 0
    steps_into_next: int = 0
    test_loss: float | None = None
    test_accuracy: float | None = None
    resumed: Resumed | None = None
    skipped_checkpoints: list[str] = field(default_factory=list)
    stop: Stop | None = None
    membership_changes: list[MembershipChange] = field(default_factory=list)
    elastic_restarts: list[ElasticRestart] = field(default_factory=list)

    def record(self) -> dict:
        return asdict(self)


def host_ranks(hosts: list[str]) -> dict[str, list[int]]:
    """Each host's ranks, from the host of every rank in rank order."""
    placed: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        placed.setdefault(host, []).append(rank)
    return placed


def write(path: str, summary: RunSummary) -> None:
    """Write the summary whole or not at all (a full disk leaves the previous one)."""
    temporary = f"{path}.partial"
    try:
        with open(temporary, "w", encoding="utf-8") as handle:
            json.dump(summary.record(), handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(temporary, path)
    except OSError:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
