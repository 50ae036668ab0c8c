"""What each rank did, when: spans recorded over a few steps and written as one
Chrome-trace JSON (open it in https://ui.perfetto.dev or chrome://tracing).

A pipeline rank records, per micro-batch, its forward and backward, the wait for
each received activation or gradient, and per step the wait for its sends, the
replicas' allreduce and the optimizer step; one track per rank. Times are
microseconds since a barrier every rank passed together.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field


@dataclass
class Span:
    name: str
    category: str
    start: float  # seconds since the timeline's origin
    seconds: float
    args: dict = field(default_factory=dict)


_NOT_RECORDING = contextlib.nullcontext()


class Timeline:
    """Spans of one rank during steps [first_step, first_step + steps); free when off."""

    def __init__(self, steps: int = 0, first_step: int = 1):
        self.first_step, self.last_step = first_step, first_step + steps
        self.spans: list[Span] = []
        self.recording, self.step = False, -1
        self.origin = time.perf_counter()

    @property
    def enabled(self) -> bool:
        return self.last_step > self.first_step

    def align(self) -> None:
        """Call right after a barrier on every rank: times count from here."""
        self.origin = time.perf_counter()

    def at_step(self, global_step: int) -> None:
        self.recording = self.first_step <= global_step < self.last_step
        self.step = global_step

    def span(self, name: str, category: str, **args) -> AbstractContextManager:
        """Times its block while recording; outside the recorded steps, a shared no-op (the
        pipeline's hot path opens several per micro-batch)."""
        return self._record(name, category, args) if self.recording else _NOT_RECORDING

    @contextlib.contextmanager
    def _record(self, name: str, category: str, args: dict) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.spans.append(Span(name, category, start - self.origin, time.perf_counter() - start,
                                   {"step": self.step, **args}))


def start_timeline(comm, config) -> Timeline:
    """A rank's timeline for --timeline (model/hybrid/ps), its clock aligned with the other
    ranks' at a barrier; a disabled one otherwise."""
    timeline = Timeline(config.timeline_steps if config.timeline else 0)
    if timeline.enabled:
        comm.Barrier()
        timeline.align()
    return timeline


def gather_timeline(comm, timeline: Timeline, path: str, label: str) -> None:
    """Collective: rank 0 writes every rank's spans to ``path``, one track per rank."""
    if not timeline.enabled:
        return
    tracks = comm.gather((label, timeline.spans), root=0)
    if comm.rank == 0:
        write_trace(path, tracks)


def chrome_trace(tracks: list[tuple[str, list[Span]]]) -> dict:
    """The Chrome trace format: one thread (track) per rank, complete ("X") events."""
    events = []
    for tid, (label, spans) in enumerate(tracks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": label}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": tid, "args": {"sort_index": tid}})
        for span in spans:
            events.append({"name": span.name, "cat": span.category, "ph": "X", "pid": 0, "tid": tid,
                           "ts": round(span.start * 1e6, 3), "dur": round(span.seconds * 1e6, 3), "args": span.args})
    return {"traceEvents": events, "displayTimeUnit": "ms"}


def write_trace(path: str, tracks: list[tuple[str, list[Span]]]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump(chrome_trace(tracks), out)


def read_tracks(path: str) -> dict:
    """{track label: [event, ...] in time order} of a trace this module wrote."""
    with open(path, encoding="utf-8") as handle:
        events = json.load(handle)["traceEvents"]
    labels = {event["tid"]: event["args"]["name"] for event in events if event["name"] == "thread_name"}
    tracks: dict = {label: [] for label in labels.values()}
    for event in events:
        if event["ph"] == "X":
            tracks[labels[event["tid"]]].append(event)
    return {label: sorted(spans, key=lambda event: event["ts"]) for label, spans in tracks.items()}


COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "wait": "#c8c8c8", "allreduce": "#55a868",
           "optimizer": "#8172b3", "data": "#937860", "send": "#222222"}


def plot_traces(paths: list[str], out: str, titles: list[str] | None = None) -> None:
    """A PNG of traces stacked on one time scale: a row per rank, forwards and backwards
    numbered by micro-batch, waits grey, sends as ticks (the step spans are not drawn)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = [read_tracks(path) for path in paths]
    rows = sum(len(tracks) for tracks in traces)
    figure, axes = plt.subplots(len(traces), 1, figsize=(11, 1.2 + 0.5 * rows + 0.5 * len(traces)), squeeze=False,
                                sharex=True)
    shown: list[str | None] = list(titles) if titles else [None] * len(traces)
    for axis, tracks, title in zip(axes[:, 0], traces, shown):
        origin = min(event["ts"] for spans in tracks.values() for event in spans if event["cat"] != "step")
        for row, spans in enumerate(tracks.values()):
            for event in spans:
                if event["cat"] == "step":
                    continue
                height = 0.3 if event["cat"] == "send" else 0.8
                width = max(event["dur"], 150.0) if event["cat"] == "send" else event["dur"]
                axis.broken_barh([((event["ts"] - origin) / 1e3, width / 1e3)], (row - height / 2, height),
                                 color=COLOURS.get(event["cat"], "#999999"))
                if event["cat"] in ("forward", "backward") and "microbatch" in event["args"]:
                    axis.text((event["ts"] - origin + event["dur"] / 2) / 1e3, row, str(event["args"]["microbatch"]),
                              ha="center", va="center", fontsize=7, color="white")
        axis.set_yticks(range(len(tracks)), list(tracks))
        axis.invert_yaxis()
        if title:
            axis.set_title(title, fontsize=10)
    axes[-1, 0].set_xlabel("ms")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colour) for colour in COLOURS.values()]
    figure.legend(handles, list(COLOURS), ncol=len(COLOURS), fontsize=8, loc="lower center")
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(out, dpi=110)
    plt.close(figure)


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Draw --timeline traces as one PNG, a row per rank.")
    parser.add_argument("traces", nargs="+")
    parser.add_argument("-o", "--out", default="timeline.png")
    parser.add_argument("--titles", default="", help="one per trace, separated by |")
    args = parser.parse_args(argv)
    plot_traces(args.traces, args.out, args.titles.split("|") if args.titles else None)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
