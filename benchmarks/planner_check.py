"""--mode auto against measurement: for each workload and rank count, the planner's dry run
(under mpirun, so it profiles as a real run does) predicts every layout; a spread of them,
its pick first, then train each; predicted and measured throughput and peak memory side
by side, their rank correlation, and the pick against the fastest measured.

Each layout trains a warm-up epoch and then --timed-epochs more, each long enough (by its
own prediction) to last about --seconds. Four steps of the seed CNN last a few milliseconds,
too short to rank layouts a few percent apart. The layouts are measured in --rounds rounds,
every layout once a round, the order reversed each round, so that a slow spell of the
machine (a shared VM's lasts longer than one layout's run) falls on several layouts and
on none twice; a layout's figure is the median over its rounds of each round's median.

    python benchmarks/planner_check.py --framework torch --out /tmp/planner
    python benchmarks/planner_check.py --framework torch,tf    # both (make bench runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
WORKLOADS = {"cnn": ["--model", "cnn"], "resnet18": ["--model", "resnet18"]}
BATCH = 32
COMMON = ["--dataset", "synthetic", "--batch-size", str(BATCH), "--no-progress"]
PLAN_SAMPLES = 256  # the dry run's synthetic set (it only profiles)


def launch(np_: int, framework: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="3",
               PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    command = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", PYTHON,
               os.path.join(REPO, f"train_{framework}", "main.py"), *COMMON, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def plan(np_: int, framework: str, workload: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "plan.json")
        done = launch(np_, framework, [*workload, "--synthetic-samples", str(PLAN_SAMPLES), "--mode", "auto",
                                       "--plan-only", "--summary-file", path])
        if done.returncode:
            raise SystemExit(f"the plan failed:\n{done.stdout}\n{done.stderr}")
        with open(path) as handle:
            return json.load(handle)["layout_choice"]


def spread(candidates: list[dict], count: int) -> list[dict]:
    """The pick, data parallel, and the rest evenly down the predicted ranking."""
    fitting = [found for found in candidates if not found["rejected"]]
    chosen = [fitting[0]] + [found for found in fitting[1:] if found["layout"].startswith("data")][:1]
    rest = [found for found in fitting if found not in chosen]
    step = max(1, len(rest) // max(1, count - len(chosen)))
    return (chosen + rest[::step])[:count]


def steps_for(predicted_images_per_sec: float, seconds: float, least: int = 4, most: int = 512) -> int:
    """Steps of a batch that the planner predicts to take ``seconds``, within [least, most]."""
    return min(most, max(least, round(seconds * predicted_images_per_sec / BATCH)))


def measure(np_: int, framework: str, workload: list[str], flags: list[str], steps: int, timed_epochs: int) -> dict:
    """The median throughput of the epochs after the first (which warms up), and the largest
    rank's peak memory over the run."""
    with tempfile.TemporaryDirectory() as scratch:
        done = launch(np_, framework, [*workload, *flags, "--epochs", str(1 + timed_epochs),
                                       "--steps-per-epoch", str(steps), "--synthetic-samples", str(steps * BATCH),
                                       "--run-dir", scratch])
        if done.returncode:
            return {"error": (done.stdout + done.stderr)[-2000:]}
        with open(os.path.join(scratch, "metrics.jsonl")) as handle:
            records = [json.loads(line) for line in handle]
        return {"images_per_sec": statistics.median(record["images_per_sec"] for record in records[1:]),
                "peak_memory_bytes": max(record["peak_memory_max_bytes"] for record in records), "steps": steps}


def spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        found = [0.0] * len(values)
        for rank, index in enumerate(order):
            found[index] = float(rank)
        return found
    rx, ry = ranks(xs), ranks(ys)
    n = len(xs)
    if n < 2:
        return float("nan")
    mean = (n - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    var = sum((a - mean) ** 2 for a in rx)
    return cov / var


def round_orders(count: int, rounds: int) -> list[list[int]]:
    """The order the layouts are measured in, each round: forwards, then backwards, and so on."""
    return [list(range(count))[::-1 if turn % 2 else 1] for turn in range(rounds)]


def combined(measured: list[dict]) -> dict:
    """One layout's rounds in one figure: the median of the rounds' throughput, the largest
    peak memory; the first error, if a round failed."""
    failed = [found for found in measured if "error" in found]
    if failed:
        return failed[0]
    return {"images_per_sec": statistics.median(found["images_per_sec"] for found in measured),
            "round_images_per_sec": [found["images_per_sec"] for found in measured],
            "peak_memory_bytes": max(found["peak_memory_bytes"] for found in measured),
            "steps": measured[0]["steps"]}


def check(framework: str, np_: int, name: str, layouts: int, seconds: float, timed_epochs: int,
          rounds: int = 1) -> dict:
    choice = plan(np_, framework, WORKLOADS[name])
    chosen = spread(choice["candidates"], layouts)
    measured: list[list[dict]] = [[] for _ in chosen]
    for order in round_orders(len(chosen), rounds):
        for index in order:
            found = chosen[index]
            measured[index].append(measure(np_, framework, WORKLOADS[name], found["flags"],
                                           steps_for(found["predicted_images_per_sec"], seconds), timed_epochs))
            print(json.dumps({"layout": found["layout"], **measured[index][-1]}), flush=True)
    rows = [{"layout": found["layout"], "flags": found["flags"],
             "predicted_images_per_sec": found["predicted_images_per_sec"],
             "predicted_memory_bytes": max(found["predicted_memory_bytes"]), **combined(runs)}
            for found, runs in zip(chosen, measured)]
    good = [row for row in rows if "error" not in row]
    best = max(good, key=lambda row: row["images_per_sec"])
    pick = next(row for row in good if row["layout"] == choice["chosen"]["layout"])
    profile = {key: choice[key] for key in ("profiled_samples", "layer_seconds", "recomputes_forward", "contention",
                                            "busy_slowdowns", "recompute_forwards", "allreduce_overlaps", "network",
                                            "baseline_bytes", "allocator_bytes")}
    return {"framework": framework, "workload": name, "ranks": np_, "profile": profile, "rows": rows,
            "rank_correlation": spearman([row["predicted_images_per_sec"] for row in good],
                                         [row["images_per_sec"] for row in good]),
            "pick": pick["layout"], "best": best["layout"], "pick_over_best": pick["images_per_sec"] /
            best["images_per_sec"], "memory_errors": [row["predicted_memory_bytes"] / row["peak_memory_bytes"] - 1
                                                      for row in good]}


def markdown(groups: list[dict]) -> str:
    lines = ["| framework | workload | ranks | layout | predicted img/s | measured img/s | predicted MiB | "
             "measured MiB |", "|---|---|---|---|---|---|---|---|"]
    for group in groups:
        for row in group["rows"]:
            if "error" in row:
                lines.append(f"| {group['framework']} | {group['workload']} | {group['ranks']} | {row['layout']} | "
                             "failed | | | |")
                continue
            lines.append(f"| {group['framework']} | {group['workload']} | {group['ranks']} | {row['layout']} | "
                         f"{row['predicted_images_per_sec']:.0f} | {row['images_per_sec']:.0f} | "
                         f"{row['predicted_memory_bytes'] / 2 ** 20:.0f} | {row['peak_memory_bytes'] / 2 ** 20:.0f} |")
    lines += ["", "| framework | workload | ranks | rank correlation | pick | fastest measured | pick / fastest | "
              "memory error (worst) |", "|---|---|---|---|---|---|---|---|"]
    for group in groups:
        worst = max(group["memory_errors"], key=abs)
        lines.append(f"| {group['framework']} | {group['workload']} | {group['ranks']} | "
                     f"{group['rank_correlation']:.2f} | {group['pick']} | "
                     f"{group['best']} | {group['pick_over_best']:.2f} | {worst:+.0%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--framework", default="torch", help="torch, tf, or both: torch,tf")
    parser.add_argument("--workloads", default="cnn,resnet18")
    parser.add_argument("--ranks", default="2,4")
    parser.add_argument("--layouts", type=int, default=10, help="layouts measured per workload and rank count")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="how long each timed epoch should last, by the layout's prediction")
    parser.add_argument("--timed-epochs", type=int, default=2, help="epochs timed after the warm-up one")
    parser.add_argument("--rounds", type=int, default=2, help="times each layout is measured, the layouts taking turns")
    parser.add_argument("--out", default="planner_check")
    args = parser.parse_args(argv)
    frameworks = args.framework.split(",")
    if not set(frameworks) <= {"torch", "tf"}:
        parser.error(f"--framework {args.framework}: give torch, tf or torch,tf")
    os.makedirs(args.out, exist_ok=True)
    groups = [check(framework, int(np_), name, args.layouts, args.seconds, args.timed_epochs, args.rounds)
              for framework in frameworks for name in args.workloads.split(",") for np_ in args.ranks.split(",")]
    with open(os.path.join(args.out, "planner_check.json"), "w") as handle:
        json.dump(groups, handle, indent=1)
    table = markdown(groups)
    with open(os.path.join(args.out, "planner_check.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
