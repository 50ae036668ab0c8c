"""The data section of `make bench`: our image-folder pipeline beside torchvision's
ImageFolder + DataLoader and Keras' image_dataset_from_directory + tf.data, on the
real ELPV images; its memory on a folder ten times larger; the share of a training
step spent waiting for images.

    python benchmarks/input_pipeline.py [--quick] [--out benchmarks/results]

Writes input_pipeline.json and input_pipeline.md beside the main results.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from benchmarks.run import PYTHON, REPO, job_env, machine, mpirun, peer_result, run  # noqa: E402
from common.data import elpv  # noqa: E402

IMPLEMENTATIONS = ("ours", "torchvision", "tf")


def pipeline_case(folder, impl, size, workers, quick):
    windows, batches = (2, 1) if quick else (4, 5)
    result = peer_result(run([PYTHON, os.path.join(HERE, "peers", "input_pipelines.py"), "--impl", impl,
                              "--dir", folder, "--size", size, "--workers", workers, "--windows", windows,
                              "--batches", batches], job_env({"OMP_NUM_THREADS": "1"}),
                             cwd=os.path.join(HERE, "peers")))
    timed = result["images_per_sec"][1:]
    return {"median": statistics.median(timed), "windows": result["images_per_sec"],
            "peak_mib": result["peak_mib"], "peak_mib_with_decoders": result["peak_mib_with_decoders"]}


def tenfold(folder, out):
    """``folder`` ten times over (symbolic links under new names): ten times the files to list."""
    for name in os.listdir(folder):
        os.makedirs(os.path.join(out, name))
        for file in os.listdir(os.path.join(folder, name)):
            for copy in range(10):
                os.symlink(os.path.join(folder, name, file), os.path.join(out, name, f"{copy}_{file}"))


PEAK_RSS = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def rank_memory_case(folder, quick):
    """Peak resident memory of one PyTorch rank training on ``folder`` (its largest process:
    the rank itself; decoders are smaller): 10 steps and the whole evaluation."""
    stdout = run([PYTHON, "-c", PEAK_RSS, PYTHON, os.path.join(REPO, "train_torch", "main.py"), "--dataset", "folder",
                  "--data-dir", folder, "--model", "resnet8", "--image-size", 64, "--epochs", 1,
                  "--steps-per-epoch", 3 if quick else 10, "--batch-size", 64, "--threads", 1, "--data-workers", 1,
                  "--no-progress", "--run-dir", "none"], job_env())
    return {"peak_mib": int(stdout.split("PEAK_KIB")[1].split()[0]) / 1024}


def training_case(folder, framework, quick):
    """2 ranks, ResNet-8 at 64 px on the folder: images/s and the share of time waiting for data."""
    with tempfile.TemporaryDirectory() as scratch:
        metrics = os.path.join(scratch, "metrics.jsonl")
        steps = 3 if quick else 15
        run([*mpirun(2), "--bind-to", "none", PYTHON, os.path.join(REPO, f"train_{framework}", "main.py"),
             "--dataset", "folder", "--data-dir", folder, "--model", "resnet8", "--image-size", 64, "--epochs", 2,
             "--steps-per-epoch", steps, "--batch-size", 64, "--threads", 1, "--data-workers", 1,
             "--no-progress", "--run-dir", "none", "--metrics-file", metrics], job_env())
        with open(metrics) as lines:
            last = [json.loads(line) for line in lines][-1]  # the second epoch: past start-up
        return {"images_per_sec": last["images_per_sec"], "data_wait_fraction": last["data_wait_fraction"]}


def measure(quick):
    results = {"machine": machine(), "pipelines": [], "memory": {}, "training": {}}
    with tempfile.TemporaryDirectory() as scratch:
        folder, big = os.path.join(scratch, "elpv"), os.path.join(scratch, "elpv10x")
        elpv.write_tree(folder, "binary", per_class=100 if quick else 0)
        results["images"] = sum(len(files) for _, _, files in os.walk(folder))
        for size in (224, 64):
            for workers in (1, 2):
                for impl in IMPLEMENTATIONS:
                    if quick and (workers == 2 or size == 224):
                        continue
                    print(f"input pipeline {impl} {size}px, {workers} worker(s) ...", end=" ", flush=True)
                    case = pipeline_case(folder, impl, size, workers, quick)
                    print(f"{case['median']:,.0f} img/s", flush=True)
                    results["pipelines"].append({"impl": impl, "size": size, "workers": workers, **case})
        tenfold(folder, big)
        for label, path in (("folder", folder), ("folder x10", big)):
            print(f"memory on {label} ...", flush=True)
            results["memory"][label] = {"pipeline": pipeline_case(path, "ours", 64, 1, quick),
                                        "rank": rank_memory_case(path, quick)}
        for framework in ("torch", "tf"):
            print(f"training {framework} 2 ranks ...", flush=True)
            results["training"][framework] = training_case(folder, framework, quick)
    return results


def markdown(results):
    lines = [f"# Input pipeline ({results['machine']['cores']} cores, {results['machine']['date']})", "",
             f"{results['images']} real ELPV images (300x300 grayscale PNG, decoded to RGB), random-resized "
             "crop + flip + normalise, batches of 64, images/s (median of the timed windows):", "",
             "| size | decoders | ours | torchvision ImageFolder + DataLoader | image_dataset_from_directory + tf.data "
             "| ours / best other |", "|---|---|---|---|---|---|"]
    cells = {(case["impl"], case["size"], case["workers"]): case["median"] for case in results["pipelines"]}
    for size in (224, 64):
        for workers in (1, 2):
            row = [cells.get((impl, size, workers)) for impl in IMPLEMENTATIONS]
            if row[0] is None:
                continue
            best_other = max(value for value in row[1:] if value)
            lines.append(f"| {size} px | {workers} | " + " | ".join(f"{value:,.0f}" for value in row)
                         + f" | {row[0] / best_other:.2f} |")
    memory = results["memory"]
    lines += ["", "Peak resident memory (MiB): a PyTorch rank training ResNet-8 at 64 px (10 steps and the "
              "whole evaluation, 1 decoder); the pipeline alone in a bare process, and its decoder:", "",
              "| folder | training rank | pipeline alone | its decoder |", "|---|---|---|---|"]
    for label, case in memory.items():
        pipeline = case["pipeline"]
        lines.append(f"| {label} | {case['rank']['peak_mib']:.0f} | {pipeline['peak_mib']:.0f} | "
                     f"{pipeline['peak_mib_with_decoders'] - pipeline['peak_mib']:.0f} |")
    rank, bare = ({label: case[part]["peak_mib"] for label, case in memory.items()} for part in ("rank", "pipeline"))
    lines += ["", f"Ten times the files: {rank['folder x10'] / rank['folder'] - 1:+.1%} for the training rank "
              f"({bare['folder x10'] - bare['folder']:+.0f} MiB in the bare pipeline: the longer file list).", "",
              "Training, 2 ranks x 1 thread + 1 decoder each, ResNet-8 at 64 px:", "",
              "| framework | img/s | waiting for data |", "|---|---|---|"]
    for framework, case in results["training"].items():
        lines.append(f"| {framework} | {case['images_per_sec']:,.0f} | {case['data_wait_fraction']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "input_pipeline.json"), "w") as out:
        json.dump(results, out, indent=1)
    with open(os.path.join(args.out, "input_pipeline.md"), "w") as out:
        out.write(markdown(results))
    print(f"wrote {args.out}/input_pipeline.json, input_pipeline.md")


if __name__ == "__main__":
    main()
