"""--mode auto against measurement: for each workload and rank count, the planner's dry run
(under mpirun, so it profiles as a real run does) predicts every layout; a spread of them,
its pick first, then train for a few steps each; predicted and measured throughput and peak
memory side by side, their rank correlation, and the pick against the fastest measured.

    python benchmarks/planner_check.py --framework torch --out /tmp/planner
    python benchmarks/planner_check.py --framework torch,tf    # both (make bench runs this)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
WORKLOADS = {"cnn": ["--model", "cnn"], "resnet18": ["--model", "resnet18"]}
COMMON = ["--dataset", "synthetic", "--synthetic-samples", "256", "--batch-size", "32", "--no-progress"]


def launch(np_: int, framework: str, args: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", TF_CPP_MIN_LOG_LEVEL="3",
               PATH=os.path.dirname(PYTHON) + os.pathsep + os.environ.get("PATH", ""))
    command = ["mpirun", "-np", str(np_), "--oversubscribe", "--bind-to", "none", PYTHON,
               os.path.join(REPO, f"train_{framework}", "main.py"), *COMMON, *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def plan(np_: int, framework: str, workload: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        path = os.path.join(scratch, "plan.json")
        done = launch(np_, framework, [*workload, "--mode", "auto", "--plan-only", "--summary-file", path])
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


def measure(np_: int, framework: str, workload: list[str], flags: list[str], steps: int) -> dict:
    """Throughput of the second epoch (the first warms up) and the largest rank's peak memory."""
    with tempfile.TemporaryDirectory() as scratch:
        done = launch(np_, framework, [*workload, *flags, "--epochs", "2", "--steps-per-epoch", str(steps),
                                       "--run-dir", scratch])
        if done.returncode:
            return {"error": (done.stdout + done.stderr)[-2000:]}
        with open(os.path.join(scratch, "metrics.jsonl")) as handle:
            last = [json.loads(line) for line in handle][-1]
        return {"images_per_sec": last["images_per_sec"], "peak_memory_bytes": last["peak_memory_max_bytes"]}


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


def check(framework: str, np_: int, name: str, layouts: int, steps: int) -> dict:
    choice = plan(np_, framework, WORKLOADS[name])
    rows = []
    for found in spread(choice["candidates"], layouts):
        measured = measure(np_, framework, WORKLOADS[name], found["flags"], steps)
        rows.append({"layout": found["layout"], "flags": found["flags"],
                     "predicted_images_per_sec": found["predicted_images_per_sec"],
                     "predicted_memory_bytes": max(found["predicted_memory_bytes"]), **measured})
        print(json.dumps(rows[-1]), flush=True)
    good = [row for row in rows if "error" not in row]
    best = max(good, key=lambda row: row["images_per_sec"])
    pick = next(row for row in good if row["layout"] == choice["chosen"]["layout"])
    return {"framework": framework, "workload": name, "ranks": np_, "rows": rows,
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
    parser.add_argument("--steps", type=int, default=4, help="steps per epoch (two epochs, the second timed)")
    parser.add_argument("--out", default="planner_check")
    args = parser.parse_args(argv)
    frameworks = args.framework.split(",")
    if not set(frameworks) <= {"torch", "tf"}:
        parser.error(f"--framework {args.framework}: give torch, tf or torch,tf")
    os.makedirs(args.out, exist_ok=True)
    groups = [check(framework, int(np_), name, args.layouts, args.steps) for framework in frameworks
              for name in args.workloads.split(",") for np_ in args.ranks.split(",")]
    with open(os.path.join(args.out, "planner_check.json"), "w") as handle:
        json.dump(groups, handle, indent=1)
    table = markdown(groups)
    with open(os.path.join(args.out, "planner_check.md"), "w") as handle:
        handle.write(table)
    print(table)


if __name__ == "__main__":
    main()
