"""Loss and accuracy per epoch of one or more runs, overlaid (from their --metrics-file).

    python -m common.observe.plot runs/a.jsonl runs/b.jsonl -o curves.png [--labels "1 process,2 ranks"]

Runs that compute the same thing (one process, 2 data-parallel ranks, a pipeline,
the other framework) draw coinciding curves: each run gets its own dash and marker
so the ones underneath stay visible.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the checkout

from common.core.errors import UsageError  # noqa: E402

PANELS = (("train_loss", "train loss"), ("test_loss", "test loss"),
          ("train_accuracy", "train accuracy"), ("test_accuracy", "test accuracy"))
STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1)), "v"), ((0, (1, 1)), "x"))


def read_run(path: str) -> list[dict]:
    """The epoch records of a metrics file (evaluation-only records left out)."""
    try:
        with open(path, encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle if line.strip()]
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot read metrics file {path} ({error}); pass files written by --metrics-file") from None
    epochs = [record for record in records if not record.get("evaluation_only") and "train_loss" in record]
    if not epochs:
        raise UsageError(f"{path} holds no epoch records; pass a --metrics-file of a run that trained")
    return epochs


def describe(records: list[dict]) -> str:
    last = records[-1]
    ranks = last.get("world_size", 1)
    return f"{last.get('framework', '?')} {last.get('mode', '?')}, {ranks} rank{'s' if ranks != 1 else ''}"


def plot_runs(paths: list[str], out: str, labels: list[str] | None = None) -> dict:
    """Write the figure to ``out``; {panel title: number of lines drawn}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(path) for path in paths]
    labels = labels or [describe(records) for records in runs]
    if len(labels) != len(runs):
        raise UsageError(f"--labels gives {len(labels)} names for {len(runs)} runs; give one per run")
    figure, axes = plt.subplots(2, 2, figsize=(10, 7), sharex=True)
    drawn = {}
    for axis, (key, title) in zip(axes.flat, PANELS):
        for number, (records, label) in enumerate(zip(runs, labels)):
            dash, marker = STYLES[number % len(STYLES)]
            axis.plot([record["epoch"] for record in records], [record[key] for record in records], linestyle=dash,
                      marker=marker, markersize=4, linewidth=1.5, label=label, alpha=0.85)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        drawn[title] = len(axis.get_lines())
    for axis in axes[1]:
        axis.set_xlabel("epoch")
    axes[0][0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return drawn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="metrics files (--metrics-file) of the runs to overlay")
    parser.add_argument("-o", "--out", default="curves.png")
    parser.add_argument("--labels", default="", help="comma-separated names, one per run (default: framework, "
                                                     "mode and ranks from each file)")
    args = parser.parse_args(argv)
    plot_runs(args.runs, args.out, [label.strip() for label in args.labels.split(",")] if args.labels else None)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    from common.launch.entry import run_entry  # the command's outer frame (it can MPI_Abort)

    run_entry(main)
