"""The prepared check for one lent GPU: what the entry script reaches against the bare
step, JPEG folders decoded on the CPU and on the GPU, a pipeline of two processes on
the one GPU, and Horovod built there with NCCL. About 7 minutes on one H200.

    make gpu-check-sdist                                # first, where a registry is: Horovod's sdist in .whl/
    python benchmarks/gpu_check.py --out DIR            # on the GPU machine (carry .whl/ there)
    python benchmarks/gpu_check.py --out DIR --dry-run  # anywhere: every command, tiny, on the CPU

It looks first at what the machine has (CUDA, torchvision's nvJPEG, mpirun, a
compiler, CMake, NCCL's headers, Horovod's sdist in .whl/) and skips, with a line
saying why, what it cannot do. Each part runs the project's own entry script or
benchmark as a subprocess, reads its metrics file or BENCH_RESULT line, and the
check writes DIR/gpu_check.json (every figure) and DIR/gpu_check.md (the tables
the docs show), after each part, so a check cut short keeps what it measured.
The dry run runs every command line for a step or two on the CPU (small images,
small networks) so that a typo costs nothing on the lent machine.
"""

import argparse
import datetime
import glob
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks.run import job_env, peer_result  # noqa: E402

PYTHON = sys.executable
SDIST = os.path.join(REPO, ".whl", "horovod-0.28.1.tar.gz")


class Check:
    """The report being written: the machine, then one section per part."""

    def __init__(self, out, dry_run, budget):
        self.out, self.dry_run, self.deadline = out, dry_run, time.monotonic() + budget
        self.report = {"started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                       "dry_run": dry_run, "machine": machine(), "sections": []}
        self.scratch = tempfile.mkdtemp(prefix="gpu-check-")

    @property
    def cuda(self):
        return self.report["machine"]["cuda"]

    def section(self, name):
        section = {"name": name, "cases": [], "dry_run": [], "skipped": None, "notes": []}
        self.report["sections"].append(section)
        return section

    def time_left(self):
        return self.deadline - time.monotonic()

    def run(self, section, label, command, env=None, timeout=300):
        """Run one command; its output's tail, exit status and seconds go into the report."""
        timeout = max(10, min(timeout, self.time_left()))
        started = time.monotonic()
        try:
            result = subprocess.run([str(part) for part in command], cwd=REPO, capture_output=True, text=True,
                                    env=job_env(env), timeout=timeout)
            ok, output = result.returncode == 0, result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            ok, output = False, f"timed out after {timeout:.0f} s\n{expired.stdout or ''}{expired.stderr or ''}"
        entry = {"label": label, "command": " ".join(map(str, command)), "ok": ok,
                 "seconds": round(time.monotonic() - started, 1), "tail": tail(output)}
        (section["dry_run"] if self.dry_run else section.setdefault("runs", [])).append(entry)
        print(f"  {'ok ' if ok else 'FAILED'} {label} ({entry['seconds']} s)", flush=True)
        if not ok:
            print(entry["tail"], flush=True)
        return ok, output

    def write(self):
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "gpu_check.json"), "w") as handle:
            json.dump(self.report, handle, indent=1)
        with open(os.path.join(self.out, "gpu_check.md"), "w") as handle:
            handle.write(markdown(self.report))


def tail(text, lines=25):
    return "\n".join(text.strip().splitlines()[-lines:])


def command_version(command, line=-1):
    """A line of what ``command`` prints (its version), or None where it is not there."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[line] if result.returncode == 0 and text else None


def machine():
    """What this machine has, looked at before anything runs."""
    facts = {"host": platform.node(), "python": platform.python_version(), "cores": os.cpu_count()}
    try:
        import torch
        facts.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda=torch.cuda.is_available())
        if facts["cuda"]:
            facts.update(gpu=torch.cuda.get_device_name(), gpus=torch.cuda.device_count(),
                         gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
    except ImportError:
        facts.update(torch=None, cuda=False)
    facts["driver"] = command_version(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    facts["nvjpeg"] = nvjpeg_available() if facts.get("cuda") else False
    facts["mpirun"] = shutil.which("mpirun") is not None
    facts["mpi_cuda_aware"] = mpi_cuda_aware() if facts["mpirun"] else False
    facts["nvcc"] = command_version(["nvcc", "--version"])
    facts["cmake"] = command_version(["cmake", "--version"], line=0)
    facts["compiler"] = shutil.which("c++") is not None or shutil.which("g++") is not None
    facts["nccl_header"] = nccl_header()
    facts["horovod_sdist"] = os.path.exists(SDIST)
    return facts


def mpi_cuda_aware():
    try:
        from common.parallel.p2p import mpi_reports_cuda_support
        return mpi_reports_cuda_support()
    except Exception:  # noqa: BLE001 - no mpi4py, no MPI library: not CUDA-aware
        return False


def nvjpeg_available():
    import torch

    from train_torch.input import torchvision_decoder
    return torchvision_decoder(torch.device("cuda")) is not None


def nccl_header():
    try:
        import nvidia
    except ImportError:
        return None
    for root in getattr(nvidia, "__path__", []):
        found = glob.glob(os.path.join(root, "nccl", "include", "nccl.h"))
        if found:
            return found[0]
    return None


def metrics_rates(path, skip=1):
    """(median img/s, median data-wait share, train losses) of a metrics file's epochs after ``skip``."""
    with open(path) as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    timed = [record for record in records if "images_per_sec" in record][skip:] or records
    return (statistics.median(record["images_per_sec"] for record in timed),
            statistics.median(record["data_wait_fraction"] for record in timed),
            [record["train_loss"] for record in records if "train_loss" in record])


# --- the parts ---------------------------------------------------------------------------------

def single_process(check):
    """Bare step (benchmarks/gpu.py: one resident batch) against train_torch/main.py on
    synthetic data of the same network, precision and batch; the entry script's figure is
    its training steps' (the metrics file's img/s), epochs after the first."""
    section = check.section("single process")
    cases = [("resnet50-224", "resnet50", "3,224,224", 256, "bf16"),
             ("resnet18-32", "resnet18", "3,32,32", 1024, "bf16"),
             ("resnet18-32", "resnet18", "3,32,32", 1024, "fp32")]
    steps, epochs, windows = 15, 4, 4
    if check.dry_run or not check.cuda:
        section["skipped"] = "no CUDA device: the dry run runs each command for two steps on the CPU" \
            if not check.cuda else None
        cases, steps, epochs, windows = [("cnn-32", "cnn", "3,32,32", 16, "bf16")], 2, 2, 2
    for case, model, shape, batch, precision in cases:
        ok, output = check.run(section, f"bare step {case} {precision}",
                               [PYTHON, "benchmarks/gpu.py", "--case", case, "--precision", precision, "--batch",
                                batch, "--windows", windows, "--steps", steps])
        bare = peer_result(output)["cases"][0]["median"] if ok else None
        metrics = os.path.join(check.scratch, f"{case}-{precision}.jsonl")
        ok, _ = check.run(section, f"entry script {case} {precision}",
                          [PYTHON, "train_torch/main.py", "--no-progress", "--run-dir", "none", "--model", model,
                           "--dataset", "synthetic", "--synthetic-shape", shape, "--synthetic-samples",
                           batch * steps, "--batch-size", batch, "--epochs", epochs, "--lr", 0.01,
                           "--amp", "off" if precision == "fp32" else precision, "--metrics-file", metrics])
        entry = metrics_rates(metrics)[0] if ok else None
        section["cases"].append({"case": case, "precision": precision, "batch": batch, "bare_img_s": bare,
                                 "entry_img_s": entry, "ratio": entry / bare if bare and entry else None})
    check.write()


def write_jpegs(root, numbers, size=(500, 375)):
    """JPEGs ``numbers`` of an ImageNet photo's size in two classes, cut from scikit-learn's two
    bundled photographs (real image statistics, so decoding costs what a photo costs)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    for i in numbers:
        rng = np.random.default_rng(i)
        picture = photos[i % 2]
        height, width = int(rng.integers(200, 420)), int(rng.integers(260, 630))
        top = int(rng.integers(0, picture.shape[0] - height + 1))
        left = int(rng.integers(0, picture.shape[1] - width + 1))
        crop = Image.fromarray(picture[top:top + height, left:left + width])
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        crop.resize(size, Image.Resampling.BILINEAR).save(os.path.join(root, "ab"[i % 2], f"{i:05d}.jpg"), quality=90)


def make_jpeg_folder(root, count):
    from concurrent.futures import ProcessPoolExecutor

    for label in ("a", "b"):
        os.makedirs(os.path.join(root, label), exist_ok=True)
    workers = os.cpu_count() or 1
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_jpegs, [root] * workers, [range(start, count, workers) for start in range(workers)]))


def jpeg_folder(check):
    """ResNet-50 at 224 px in bf16 from a folder of 500x375 JPEGs: decoded on the CPU (a decoder
    process per core), on the GPU (--decode gpu), and torchvision's DataLoader feeding the
    same step; img/s and data wait."""
    section = check.section("JPEG folder")
    count, model, size, batch, steps, epochs = 2048, "resnet50", 224, 256, 10, 3
    if check.dry_run or not check.cuda:
        section["skipped"] = "no CUDA device: the dry run decodes on the CPU, tiny" if not check.cuda else None
        count, model, size, batch, steps, epochs = 24, "cnn", 32, 8, 2, 2
    elif not check.report["machine"]["nvjpeg"]:
        section["notes"].append("torchvision's nvJPEG did not load: --decode gpu decodes with Pillow on the host")
    root = os.path.join(check.scratch, "jpegs")
    started = time.monotonic()
    make_jpeg_folder(root, count)
    section["notes"].append(f"{count} JPEGs of 500x375 written in {time.monotonic() - started:.0f} s")
    workers = max(1, (os.cpu_count() or 2) - 1)
    for decode in ("cpu", "gpu"):
        metrics = os.path.join(check.scratch, f"folder-{decode}.jsonl")
        ok, _ = check.run(section, f"train_torch/main.py --decode {decode}",
                          [PYTHON, "train_torch/main.py", "--no-progress", "--run-dir", "none", "--dataset", "folder",
                           "--data-dir", root, "--image-size", size, "--model", model, "--amp", "bf16",
                           "--batch-size", batch, "--steps-per-epoch", steps, "--epochs", epochs, "--decode", decode,
                           "--data-workers", workers, "--check-images", "header", "--prefetch-batches", 3,
                           "--metrics-file", metrics])
        rate, wait, _ = metrics_rates(metrics) if ok else (None, None, None)
        section["cases"].append({"case": f"--decode {decode}", "img_s": rate, "data_wait": wait,
                                 "workers": workers})
    ok, output = check.run(section, "torchvision DataLoader",
                           [PYTHON, "benchmarks/gpu.py", "--dataloader", root, "--case",
                            "resnet50-224" if check.cuda else "cnn-32", "--precision", "bf16", "--batch", batch,
                            "--windows", epochs, "--steps", steps, "--workers", workers])
    if ok:
        result = peer_result(output)["cases"][0]
        section["cases"].append({"case": "torchvision DataLoader", "img_s": result["median"],
                                 "data_wait": result["data_wait"], "workers": workers})
    check.write()


def pipeline(check):
    """Two processes on the one GPU: a 2-stage pipeline of ResNet-18 at 32 px (1F1B, 4
    micro-batches) and a parameter server with two workers, beside one process training the
    same steps; activations through page-locked host buffers (and as CUDA tensors when the
    MPI takes them)."""
    section = check.section("pipeline on one GPU")
    if not check.report["machine"]["mpirun"]:
        section["skipped"] = "no mpirun on this machine"
        check.write()
        return
    model, shape, batch, steps, epochs = "resnet18", "3,32,32", 256, 20, 3
    if check.dry_run or not check.cuda:
        section["skipped"] = "no CUDA device: the dry run runs the processes on the CPU" if not check.cuda else None
        model, shape, batch, steps, epochs = "cnn", "3,16,16", 16, 2, 2
    common = ["--no-progress", "--run-dir", "none", "--model", model, "--dataset", "synthetic", "--synthetic-shape",
              shape, "--synthetic-samples", batch * steps, "--batch-size", batch, "--epochs", epochs, "--lr", 0.01,
              "--threads", 2]
    layouts = [("one process", None, []),
               ("pipeline, host buffers", 2,
                ["--mode", "model", "--pp", 2, "--microbatches", 4, "--p2p-memory", "host"]),
               ("pipeline, auto", 2, ["--mode", "model", "--pp", 2, "--microbatches", 4]),
               ("parameter server + 2 workers", 3, ["--mode", "ps"])]
    for label, np_, extra in layouts:
        metrics = os.path.join(check.scratch, f"pipeline-{len(section['cases'])}.jsonl")
        launcher = [] if np_ is None else ["mpirun", "-np", np_, "--oversubscribe", "--bind-to", "none"]
        ok, output = check.run(section, label, [*launcher, PYTHON, "train_torch/main.py", *common, *extra,
                                                "--metrics-file", metrics])
        rate, _, losses = metrics_rates(metrics) if ok else (None, None, [])
        section["cases"].append({"case": label, "img_s": rate, "train_losses": losses,
                                 "wire": next((line.split("activations and gradients via ", 1)[1]
                                               for line in output.splitlines()
                                               if "activations and gradients via " in line), None)})
    check.write()


def horovod(check):
    """Horovod 0.28.1 from the carried sdist, built here with PyTorch + NCCL (+ MPI where
    there is one, + Gloo) by common/install/build_horovod.sh, then horovodrun -np 1."""
    section = check.section("Horovod with NCCL")
    facts = check.report["machine"]
    missing = [name for name, there in (("a compiler", facts["compiler"]), ("CMake", facts["cmake"]),
                                        ("NCCL's headers", facts["nccl_header"]), ("nvcc", facts["nvcc"]),
                                        ("Horovod's sdist in .whl/", facts["horovod_sdist"])) if not there]
    if check.dry_run:
        section["skipped"] = ("dry run: the build takes minutes (make gpu-build proves it on a machine without "
                              f"a GPU); missing here: {', '.join(missing) or 'nothing'}")
    elif missing:
        section["skipped"] = f"this machine has no {', '.join(missing)}"
    if section["skipped"]:
        check.write()
        return
    venv = os.path.join(check.scratch, "horovod-venv")
    ok, _ = check.run(section, "a venv beside the machine's packages",
                      [PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", venv])
    nvcc = shutil.which("nvcc")
    env = {"HOROVOD_SDIST": SDIST, "HOROVOD_CUDA_HOME": os.path.dirname(os.path.dirname(os.path.realpath(nvcc))),
           "HOROVOD_WHEEL_CACHE": os.path.join(check.scratch, "wheel"), "HOROVOD_BUILD_CUDA_CC_LIST": "90"}
    started = time.monotonic()
    ok, output = check.run(section, "build_horovod.sh", ["bash", "common/install/build_horovod.sh", venv, 1],
                           env=env, timeout=420)
    section["cases"].append({"case": "build", "ok": ok, "seconds": round(time.monotonic() - started),
                             "check_build": [line.strip() for line in output.splitlines() if "[X]" in line]})
    if ok:
        horovodrun = [os.path.join(venv, "bin", "horovodrun"), "-np", 1, *([] if facts["mpirun"] else ["--gloo"]),
                      "-H", "localhost:1"]
        metrics = os.path.join(check.scratch, "horovod.jsonl")
        venv_python = os.path.join(venv, "bin", "python")  # sees the machine's packages and the new Horovod
        ok, _ = check.run(section, "horovodrun -np 1", [*horovodrun, venv_python, "train_torch/main.py",
                                                        "--no-progress",
                                                        "--run-dir", "none", "--model", "resnet18", "--dataset",
                                                        "synthetic", "--synthetic-shape", "3,32,32",
                                                        "--synthetic-samples", 4096, "--batch-size", 512, "--epochs",
                                                        3, "--amp", "bf16", "--metrics-file", metrics],
                          )
        rate = metrics_rates(metrics)[0] if ok else None
        section["cases"].append({"case": "horovodrun -np 1, ResNet-18 32 px bf16 batch 512", "ok": ok, "img_s": rate})
    check.write()


# --- the report ------------------------------------------------------------------------------------

def figure(value, fmt="{:,.0f}"):
    return "–" if value is None else fmt.format(value)


def share(value):
    return figure(value, "{:.0%}")


TABLES = {
    "single process": (("network", "precision", "batch", "bare step img/s", "entry script img/s", "entry / bare"),
                       lambda case: (case["case"], case["precision"], case["batch"], figure(case["bare_img_s"]),
                                     figure(case["entry_img_s"]), figure(case["ratio"], "{:.2f}"))),
    "JPEG folder": (("input", "img/s", "data wait", "CPU workers"),
                    lambda case: (case["case"], figure(case["img_s"]), share(case["data_wait"]), case["workers"])),
    "pipeline on one GPU": (("layout", "img/s", "activations via", "train loss per epoch"),
                            lambda case: (case["case"], figure(case["img_s"]), case["wire"] or "–",
                                          ", ".join(f"{loss:.4f}" for loss in case["train_losses"]) or "–")),
    "Horovod with NCCL": (("step", "result"),
                          lambda case: (case["case"], "; ".join(filter(None, [
                              None if case.get("ok", True) else "FAILED",
                              f"{case['seconds']} s" if "seconds" in case else None,
                              f"{figure(case['img_s'])} img/s" if case.get("img_s") else None,
                              " ".join(case.get("check_build", []))])) or "ok")),
}


def markdown(report):
    facts = report["machine"]
    lines = [f"GPU check, {report['started']}{' (dry run)' if report['dry_run'] else ''}: "
             f"{facts.get('gpu') or 'no GPU'}, driver {facts.get('driver') or '–'}, PyTorch {facts.get('torch')} "
             f"(CUDA {facts.get('torch_cuda')}), {facts['cores']} cores, Python {facts['python']}; "
             f"nvJPEG {'yes' if facts.get('nvjpeg') else 'no'}, mpirun {'yes' if facts.get('mpirun') else 'no'}, "
             f"CUDA-aware MPI {'yes' if facts.get('mpi_cuda_aware') else 'no'}", ""]
    for section in report["sections"]:
        lines.append(f"**{section['name']}**" + (f" (skipped: {section['skipped']})" if section["skipped"] else ""))
        lines += [f"- {note}" for note in section["notes"]]
        headers, row = TABLES.get(section["name"], ((), None))
        if section["cases"] and row:
            lines += ["", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
            lines += ["| " + " | ".join(map(str, row(case))) + " |" for case in section["cases"]]
        failed = [run["label"] for run in section.get("runs", []) + section["dry_run"] if not run["ok"]]
        if failed:
            lines.append(f"- failed: {', '.join(failed)} (their output is in gpu_check.json)")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="every command, tiny, on the CPU")
    parser.add_argument("--budget", type=float, default=460, help="seconds for the whole check")
    args = parser.parse_args()
    check = Check(args.out, args.dry_run or False, args.budget)
    facts = check.report["machine"]
    print("machine: " + ", ".join(f"{key} {value}" for key, value in facts.items()), flush=True)
    if not facts["cuda"] and not args.dry_run:
        print("no CUDA device here: running the dry run instead", flush=True)
        check.dry_run = check.report["dry_run"] = True
    check.write()
    for part in (single_process, jpeg_folder, pipeline, horovod):
        if check.time_left() < 20:
            check.section(part.__name__.replace("_", " "))["skipped"] = "out of time"
            continue
        print(f"{part.__name__}:", flush=True)
        part(check)
    check.report["seconds"] = round(args.budget - check.time_left())
    check.write()
    print(markdown(check.report))
    shutil.rmtree(check.scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
