"""Long runs stay flat: memory and descriptors per epoch over 100+ epochs, and ten
stop-and-resume cycles that end where an uninterrupted run ends.

    python benchmarks/soak.py [--epochs 120] [--quick] [--out DIR]     (make soak)

1. Growth: data (2 ranks) and pipeline (pp 2, M 2) mode in both frameworks train the
   digits CNN for --epochs epochs into a default run directory (metrics, TensorBoard
   events, a checkpoint every epoch, the newest 3 kept). At every epoch line this script
   reads each rank's resident memory and open descriptors from /proc; after a warm-up
   (the first fifth of the epochs) it fits a line through them: the slope, per 100
   epochs, should be about 0.
2. Stop and resume: the same data- and pipeline-mode jobs (PyTorch), interrupted ten
   times by SIGUSR1 to one rank (the ranks agree on a step, save, exit 0) and continued
   with --resume, end with weights that differ from an uninterrupted run's by at most
   1e-6 (relative, over the whole model).

Writes DIR/soak.json and DIR/soak.md (default benchmarks/results).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.run import PYTHON, job_env, machine, mpirun  # noqa: E402

LAYOUTS = {"data": ["--mode", "data"], "pipeline": ["--mode", "model", "--pp", "2", "--microbatches", "2"]}
CYCLES = 10
RESUME_EPOCHS = 30  # of 20 steps: room for ten stops (each one lands an epoch or so after its start)


def entry(framework):
    return os.path.join(REPO, f"train_{framework}", "main.py")


def ranks_of(launcher):
    return [child for child in launcher.children(recursive=True) if "main.py" in " ".join(child.cmdline())]


def sample(process):
    try:
        return process.memory_info().rss / 2**20, process.num_fds()
    except psutil.NoSuchProcess:
        return None


def growth_run(framework, layout, epochs, workdir):
    """Per epoch, each rank's (RSS MB, descriptors); the run's own lines on failure."""
    command = [*mpirun(2), "--bind-to", "none", PYTHON, entry(framework), *LAYOUTS[layout], "--epochs", epochs,
               "--batch-size", 64, "--threads", 1, "--no-progress"]
    job = subprocess.Popen([str(part) for part in command], cwd=workdir, env=job_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    launcher, samples, output = psutil.Process(job.pid), [], []
    for line in job.stdout:
        output.append(line)
        if line.startswith("epoch "):
            samples.append([sample(rank) for rank in sorted(ranks_of(launcher), key=lambda rank: rank.pid)])
    if job.wait():
        raise RuntimeError(f"{framework} {layout} exited {job.returncode}:\n{''.join(output[-20:])}")
    return samples


def slope_per_100_epochs(values):
    warm = len(values) // 5
    tail = np.asarray(values[warm:], dtype=np.float64)
    return float(np.polyfit(np.arange(len(tail)), tail, 1)[0] * 100)


def summarise_growth(samples):
    per_rank = []
    for rank in range(len(samples[0])):
        rss = [epoch[rank][0] for epoch in samples if epoch[rank]]
        fds = [epoch[rank][1] for epoch in samples if epoch[rank]]
        warm = len(rss) // 5
        per_rank.append({"rss_mb_first": rss[0], "rss_mb_after_warmup": rss[warm], "rss_mb_last": rss[-1],
                         "rss_mb_per_100_epochs": slope_per_100_epochs(rss),
                         "fds_after_warmup": fds[warm], "fds_max_after_warmup": max(fds[warm:]),
                         "fds_last": fds[-1], "fds_per_100_epochs": slope_per_100_epochs(fds)})
    return per_rank


def resume_cycles(layout, epochs, workdir):
    """Interrupt a run CYCLES times, resume it each time; the largest relative difference of
    its final weights from an uninterrupted run's."""
    from tests.helpers import DIGITS_CNN, checkpoint_path, checkpoint_weights, relative_difference

    flags = [*LAYOUTS[layout], "--epochs", epochs, "--steps-per-epoch", 20, "--batch-size", 32, "--threads", 1,
             "--no-progress", "--run-dir", "none", "--keep-checkpoints", 2]
    base = [*mpirun(2), "--bind-to", "none", PYTHON, entry("torch"), *flags]
    straight, interrupted = os.path.join(workdir, "straight"), os.path.join(workdir, "interrupted")
    subprocess.run([str(part) for part in [*base, "--checkpoint-dir", straight]], cwd=workdir, env=job_env(),
                   check=True, capture_output=True)
    stops = []
    for cycle in range(CYCLES + 1):
        resume = ["--resume"] if cycle else []
        job = subprocess.Popen([str(part) for part in [*base, "--checkpoint-dir", interrupted, *resume]], cwd=workdir,
                               env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        launcher, output = psutil.Process(job.pid), []
        for line in job.stdout:
            output.append(line)
            if cycle < CYCLES and line.startswith("epoch ") and not any("stopped by" in seen for seen in output):
                time.sleep(0.05 * (cycle % 4))  # vary where in the next epoch the stop lands
                try:
                    sorted(ranks_of(launcher), key=lambda rank: rank.pid)[cycle % 2].send_signal(signal.SIGUSR1)
                except (psutil.NoSuchProcess, IndexError):
                    pass  # the run ended first: counted below by its missing "stopped by" line
                break
        output += job.stdout.readlines()
        if job.wait():
            raise RuntimeError(f"resume cycle {cycle} exited {job.returncode}:\n{''.join(output[-20:])}")
        stops += [line.strip() for line in output if "stopped by" in line]
    ours, theirs = (checkpoint_weights(checkpoint_path(path, epochs), DIGITS_CNN) for path in (interrupted, straight))
    return stops, max(relative_difference(ours[key], theirs[key]) for key in theirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--quick", action="store_true", help="10 epochs, 3 resume cycles' worth: a smoke run")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    epochs = 10 if args.quick else args.epochs
    results = {"machine": machine(), "epochs": epochs, "growth": {}, "resume": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for framework in ("torch", "tf"):
            for layout in LAYOUTS:
                started = time.monotonic()
                samples = growth_run(framework, layout, epochs, workdir)
                results["growth"][f"{framework} {layout}"] = {"ranks": summarise_growth(samples),
                                                             "seconds": time.monotonic() - started}
                print(f"{framework} {layout}: {json.dumps(results['growth'][f'{framework} {layout}'])}", flush=True)
        for layout in LAYOUTS:
            os.makedirs(os.path.join(workdir, layout))
            stops, difference = resume_cycles(layout, RESUME_EPOCHS, os.path.join(workdir, layout))
            results["resume"][layout] = {"stops": stops, "max_relative_difference": difference}
            print(f"resume {layout}: {len(stops)} stops, weights differ by {difference:.2e}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "soak.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(args.out, "soak.md"), "w") as handle:
        handle.write(report_markdown(results))
    print(report_markdown(results))


def report_markdown(results):
    lines = [f"Soak, {results['epochs']} epochs per run, {results['machine']['date']}, {results['machine']['cores']} "
             f"cores. Per rank: resident memory after the warm-up (first fifth) and last, the fitted slope after the "
             "warm-up, and open descriptors.", "",
             "| run | rank | RSS after warm-up → last (MB) | RSS slope (MB / 100 epochs) | descriptors after warm-up → "
             "max → last | descriptor slope (/ 100 epochs) | wall (s) |", "|---|---|---|---|---|---|---|"]
    for name, run in results["growth"].items():
        for rank, values in enumerate(run["ranks"]):
            lines.append(f"| {name} | {rank} | {values['rss_mb_after_warmup']:.1f} → {values['rss_mb_last']:.1f} | "
                         f"{values['rss_mb_per_100_epochs']:+.2f} | {values['fds_after_warmup']} → "
                         f"{values['fds_max_after_warmup']} → {values['fds_last']} | "
                         f"{values['fds_per_100_epochs']:+.2f} | {run['seconds']:.0f} |")
    lines += ["", f"Stop and resume, PyTorch, {CYCLES} SIGUSR1 stops then --resume, {RESUME_EPOCHS} epochs of "
              "20 steps:", "",
              "| mode | stops | final weights vs uninterrupted (max relative difference) |", "|---|---|---|"]
    for layout, run in results["resume"].items():
        lines.append(f"| {layout} | {len(run['stops'])} | {run['max_relative_difference']:.2e} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
