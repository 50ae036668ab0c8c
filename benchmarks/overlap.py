"""How much of data mode's allreduce hides behind the backward, read from Horovod's timeline.

Runs an entry script in data mode on 2 ranks with --timeline (Horovod's own
timeline: when each rank handed each gradient to Horovod, and when each
allreduce ran) and reports, per step after the first: the backward as Horovod
sees it (from the first gradient handed over to the last, on any rank), the
time some gradient allreduce was running, and the share of that time that fell
inside the backward, i.e. overlapped it. A framework that reduces its gradients
only after its backward shows 0%.

    python benchmarks/overlap.py --framework tf [--model resnet18 --shape 3,32,32 --batch 32 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.run import PYTHON, REPO, job_env, mpirun, run  # noqa: E402

# Allreduces of the trainer's own, not of gradients.
NOT_GRADIENTS = ("flag_sum", "train_sums", "eval_sums", "step_loss", "save", "batch_norm", "hosts")


def read_timeline(path: str) -> list[dict]:
    """Horovod's timeline events (a JSON array its writer may leave unclosed)."""
    with open(path) as handle:
        text = handle.read().strip().rstrip(",")
    return json.loads(text if text.endswith("]") else text + "]")


def gradient_reductions(events: list[dict], steps: int) -> dict[str, list[dict]]:
    """Per gradient tensor (one reduced once per step, each of ``steps``), one entry per
    allreduce of it: its negotiation (``handed``: from the first rank handing it to Horovod
    to the last) and the allreduce's span (``start``, ``end``), in µs."""
    names = {event["pid"]: event["args"]["name"] for event in events
             if event.get("ph") == "M" and event.get("name") == "process_name" and "name" in event.get("args", {})}
    found: dict[str, list[dict]] = {}
    open_spans: dict[int, list[tuple[str, int]]] = {}
    for event in events:
        pid, phase = event.get("pid"), event.get("ph")
        name = names.get(pid, "")
        if pid is None or not name or any(part in name for part in NOT_GRADIENTS):
            continue
        stack = open_spans.setdefault(pid, [])
        if phase == "B":
            stack.append((event["name"], event["ts"]))
        elif phase == "E" and stack:
            kind, began = stack.pop()
            if kind == "NEGOTIATE_ALLREDUCE":
                found.setdefault(name, []).append({"handed": (began, event["ts"]), "start": None, "end": None})
            elif kind == "ALLREDUCE" and name in found:
                found[name][-1].update(start=began, end=event["ts"])
    return {name: reductions for name, reductions in found.items()
            if len(reductions) == steps and all(r["end"] for r in reductions)}


def union_length(spans: list[tuple[float, float]], within: tuple[float, float] | None = None) -> float:
    """The length of the union of ``spans`` (clipped to ``within``)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(spans):
        if within:
            start, end = max(start, within[0]), min(end, within[1])
        if end <= start:
            continue
        start = max(start, reach)
        if end > start:
            total, reach = total + end - start, end
    return total


def step_overlaps(reductions: dict[str, list[dict]]) -> list[dict]:
    """Per step (the n-th allreduce of every gradient), in ms: the backward, the allreduce
    time and the share of it inside the backward."""
    steps = min(len(entries) for entries in reductions.values())
    results = []
    for step in range(steps):
        entries = [entries[step] for entries in reductions.values()]
        # The backward as Horovod sees it: from the first gradient any rank hands over to the
        # last gradient the last rank hands over.
        backward = (min(entry["handed"][0] for entry in entries), max(entry["handed"][1] for entry in entries))
        spans = [(entry["start"], entry["end"]) for entry in entries]
        busy = union_length(spans)
        hidden = union_length(spans, backward)
        results.append({"backward_ms": (backward[1] - backward[0]) / 1e3, "allreduce_ms": busy / 1e3,
                        "overlapped": hidden / busy if busy else 0.0, "tensors": len(entries)})
    return results


def measure(framework: str, model: str, shape: str, batch: int, steps: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = os.path.join(scratch, "run")
        run([*mpirun(2), PYTHON, os.path.join(REPO, f"train_{framework}", "main.py"), "--model", model,
             "--dataset", "synthetic", "--synthetic-shape", shape, "--synthetic-samples", batch * steps,
             "--batch-size", batch, "--steps-per-epoch", steps, "--epochs", 1, "--threads", 1, "--lr", 0.01,
             "--no-progress", "--run-dir", run_dir, "--timeline"], job_env())
        return step_overlaps(gradient_reductions(read_timeline(os.path.join(run_dir, "timeline.json")), steps))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--framework", choices=("torch", "tf"), default="tf")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--shape", default="3,32,32")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    steps = measure(args.framework, args.model, args.shape, args.batch, args.steps)[1:]  # the first warms up
    for number, step in enumerate(steps, start=2):
        print(f"step {number}: backward {step['backward_ms']:.0f} ms, allreduce {step['allreduce_ms']:.0f} ms, "
              f"{step['overlapped']:.0%} of it inside the backward ({step['tensors']} tensors)")
    print(f"{args.framework} {args.model} {args.shape} batch {args.batch}: median "
          f"{statistics.median(step['overlapped'] for step in steps):.0%} of the allreduce overlaps the backward")


if __name__ == "__main__":
    main()
