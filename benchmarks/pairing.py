"""Paired, interleaved, repeated measurement of throughput ratios (pure: no measuring here).

A goal is a ratio of two cases' throughputs. On a shared machine the speed drifts
by more over a few minutes than the margins the goals ask for, so one run of each
side, minutes apart, cannot say "met". Here the cases the goals divide run as a
fixed sequence, back to back, in rounds: every other round runs the sequence in
reverse, so a steady drift tilts successive rounds' ratios in opposite directions.
Each round gives each goal one ratio, from its two sides' runs nearest each other
in that round (the sequence puts them at most two runs apart). The verdict reads
the range of those ratios: met only when its lower end clears the goal, not met
when its upper end falls short, within noise otherwise.
"""

import enum
import statistics
from dataclasses import dataclass

CaseKey = tuple[str, str]  # (case name, framework)


class Verdict(enum.StrEnum):
    MET = "met"
    NOT_MET = "not met"
    WITHIN_NOISE = "within noise"


@dataclass(frozen=True)
class Ratio:
    """numerator / (denominator x scale) / bound: a speed-up, an efficiency, or an
    efficiency against its schedule's bound."""

    numerator: CaseKey
    denominator: CaseKey
    scale: float = 1.0
    bound: float = 1.0


@dataclass(frozen=True)
class Run:
    """One case's run inside a round: where in the round it ran, and its throughput."""

    key: CaseKey
    position: int
    images_per_sec: float


@dataclass(frozen=True)
class RatioRange:
    """A goal's ratio over the rounds: the median and the range of the per-round ratios."""

    median: float
    low: float
    high: float
    pairs: int

    def verdict(self, goal: float) -> Verdict:
        # Compared as printed (two decimals), so a row never reads "0.90–0.95, not met" for a goal of 0.90.
        if round(self.low, 2) >= goal:
            return Verdict.MET
        if round(self.high, 2) < goal:
            return Verdict.NOT_MET
        return Verdict.WITHIN_NOISE


def measurement_order(sequence: list[CaseKey], available: set[CaseKey]) -> list[CaseKey]:
    """The sequence restricted to the cases this run measures (``--only``, ``--quick``), with
    a case that would now run twice in a row run once."""
    kept = [key for key in sequence if key in available]
    return [key for index, key in enumerate(kept) if index == 0 or kept[index - 1] != key]


def round_order(sequence: list[CaseKey], round_index: int) -> list[CaseKey]:
    """Round 0 runs the sequence forwards, round 1 backwards, and so on."""
    return list(sequence) if round_index % 2 == 0 else list(reversed(sequence))


def pair_ratio(runs: list[Run], ratio: Ratio) -> float | None:
    """One round's ratio, from the numerator's and denominator's runs nearest each other;
    None when the round has no run of either side."""
    tops = [run for run in runs if run.key == ratio.numerator]
    bottoms = [run for run in runs if run.key == ratio.denominator]
    if not tops or not bottoms:
        return None
    top, bottom = min(((top, bottom) for top in tops for bottom in bottoms),
                      key=lambda pair: abs(pair[0].position - pair[1].position))
    return top.images_per_sec / (bottom.images_per_sec * ratio.scale) / ratio.bound


def ratio_range(rounds: list[list[Run]], ratio: Ratio) -> RatioRange | None:
    """The ratio in every round that measured both sides; None when none did."""
    values = [value for value in (pair_ratio(runs, ratio) for runs in rounds) if value is not None]
    if not values:
        return None
    return RatioRange(statistics.median(values), min(values), max(values), len(values))


def distance(sequence: list[CaseKey], ratio: Ratio) -> int | None:
    """How many runs apart the ratio's two sides come in the sequence (nearest pair);
    None when either side is missing."""
    tops = [index for index, key in enumerate(sequence) if key == ratio.numerator]
    bottoms = [index for index, key in enumerate(sequence) if key == ratio.denominator]
    if not tops or not bottoms:
        return None
    return min(abs(top - bottom) for top in tops for bottom in bottoms)
