"""Throughput of every mode in both frameworks beside the tools users would pick
instead, on the same model, batch, threads and machine (see README.md, "Benchmarks").

    python benchmarks/run.py                      # the full suite (make bench)
    python benchmarks/run.py --repeat 5           # five paired rounds of the goals' cases (default 3)
    python benchmarks/run.py --only resnet18      # only the cases whose name matches
    python benchmarks/run.py --quick --out DIR    # a smoke run: two tiny cases (make test)

Writes DIR/results.json (every window of every run), DIR/results.md (the
tables the docs show) and DIR/results.png (throughput, efficiencies,
allreduce bandwidth); a full run adds the input pipeline's tables and
DIR/planner_check.md (--mode auto's predictions against measurement).
Each case runs as its own job; its throughput is the median over timed
windows after a warm-up window, with the spread (min-max).
The cases the goals divide run first, in --repeat rounds of one sequence
(benchmarks/pairing.py): each goal's ratio is taken round by round from runs
close together, and its verdict comes from the range over the rounds.
"""

import argparse
import datetime
import json
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

from benchmarks import pairing, report  # noqa: E402
from common.launch import hardware  # noqa: E402

PYTHON = sys.executable
BIN = os.path.dirname(PYTHON)
TIMEOUT = 300


class Settings:
    """A workload: a network on synthetic images, a global batch, timed windows of steps.
    The main table's is the seed CNN on 3x32x32; the zoo section's are larger networks
    with fewer, shorter windows (a ResNet-18 step takes ~100x a seed-CNN step)."""

    def __init__(self, quick, model="cnn", shape="3,32,32", batch=128, windows=4, steps=10):
        self.model, self.shape, self.batch, self.threads = model, shape, batch, 1
        self.windows, self.steps = (2, 2) if quick else (windows, steps)  # the first window is the warm-up

    @property
    def workload(self):
        return f"{self.model} {self.shape.replace(',', 'x')}, batch {self.batch}"

    def entry_flags(self):
        return ["--model", self.model, "--dataset", "synthetic", "--synthetic-shape", self.shape,
                "--synthetic-samples", self.batch * self.steps, "--batch-size", self.batch,
                "--steps-per-epoch", self.steps, "--epochs", self.windows, "--threads", self.threads,
                "--lr", 0.01, "--no-progress"]

    def peer_flags(self):
        return ["--model", self.model, "--shape", self.shape, "--batch-size", self.batch, "--windows",
                self.windows, "--steps", self.steps, "--threads", self.threads, "--lr", 0.01]


def job_env(extra=None):
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1", PATH=BIN + os.pathsep + os.environ.get("PATH", ""))
    env.update(extra or {})
    return env


def mpirun(np_, env_names=()):
    oversubscribe = ["--oversubscribe"] if np_ > (os.cpu_count() or 1) else []
    forwarded = [part for name in env_names for part in ("-x", name)]
    return ["mpirun", "-np", str(np_), *oversubscribe, *forwarded]


class CaseFailed(Exception):
    """A case's job exited non-zero or ran out of time: why, and the end of its output."""

    def __init__(self, reason: str, output: str):
        super().__init__(reason)
        self.reason, self.tail = reason, "\n".join(output.strip().splitlines()[-20:])


def run(command, env, cwd=REPO, timeout=None):
    command = [str(part) for part in command]
    try:
        result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                                timeout=timeout or TIMEOUT)
    except subprocess.TimeoutExpired as expired:
        output = "".join(part.decode() if isinstance(part, bytes) else part
                         for part in (expired.stdout or "", expired.stderr or ""))
        raise CaseFailed(f"timed out after {expired.timeout:.0f} s: {' '.join(command)}", output) from None
    if result.returncode:
        raise CaseFailed(f"exited {result.returncode}: {' '.join(command)}", result.stdout + result.stderr)
    return result.stdout


def summary(rates):
    timed = rates[1:] or rates  # drop the warm-up window
    return {"median": statistics.median(timed), "min": min(timed), "max": max(timed), "windows": rates}


def entry_case(settings, framework, np_, flags=(), env=None):
    """One of our entry scripts; each epoch (--steps-per-epoch steps) is a timed window. A
    pipeline's figure carries the best efficiency its cut allows (report.cut_bound), from the
    layer costs it was cut by (--balance time: measured) in its run summary."""
    with tempfile.TemporaryDirectory() as scratch:
        metrics, run_summary = os.path.join(scratch, "metrics.jsonl"), os.path.join(scratch, "summary.json")
        launcher = mpirun(np_, (env or {}).keys()) if np_ > 1 else []
        run([*launcher, PYTHON, os.path.join(REPO, f"train_{framework}", "main.py"), *settings.entry_flags(),
             *flags, "--run-dir", "none", "--metrics-file", metrics, "--summary-file", run_summary], job_env(env))
        with open(metrics) as lines:
            figure = summary([json.loads(line)["images_per_sec"] for line in lines])
        with open(run_summary) as handle:
            bound = report.cut_bound(json.load(handle))
        return {**figure, "cut_bound": bound} if bound is not None else figure


def peer_result(stdout):
    line = next(line for line in stdout.splitlines() if line.startswith("BENCH_RESULT "))
    return json.loads(line[len("BENCH_RESULT "):])


def torchrun_case(settings, script, np_, flags=()):
    command = [os.path.join(BIN, "torchrun"), "--nproc_per_node", np_, "--master_port", free_port(),
               os.path.join(HERE, "peers", script), *settings.peer_flags(), *flags]
    return summary(peer_result(run(command, job_env({"OMP_NUM_THREADS": "1"}), cwd=os.path.join(HERE, "peers")))
                   ["images_per_sec"])


def multiworker_case(settings, workers=2):
    ports = [free_port() for _ in range(workers)]
    processes = []
    for index in range(workers):
        config = {"cluster": {"worker": [f"localhost:{port}" for port in ports]},
                  "task": {"type": "worker", "index": index}}
        processes.append(subprocess.Popen(
            [PYTHON, os.path.join(HERE, "peers", "tf_multiworker.py"), *map(str, settings.peer_flags())],
            cwd=os.path.join(HERE, "peers"), env=job_env({"TF_CONFIG": json.dumps(config)}),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outputs = [process.communicate(timeout=TIMEOUT) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        raise CaseFailed(f"timed out after {TIMEOUT} s: tf_multiworker.py", "") from None
    if any(process.returncode for process in processes):
        raise CaseFailed("tf_multiworker.py exited non-zero", "\n".join(err for _, err in outputs))
    return summary(peer_result(outputs[0][0])["images_per_sec"])


def allreduce_case(quick, env=None):
    command = [*mpirun(2, (env or {}).keys()), PYTHON, os.path.join(HERE, "allreduce.py"),
               *(["--quick"] if quick else [])]
    return peer_result(run(command, job_env(env)))


def gpu_case(quick):
    """benchmarks/gpu.py in this environment: a record saying why when there is no CUDA device."""
    return peer_result(run([PYTHON, os.path.join(HERE, "gpu.py"), *(["--quick"] if quick else [])], job_env()))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HOROVOD_DEFAULTS = {"OMPI_MCA_mpi_yield_when_idle": "0"}  # undo our shipped default (common/launch/)
# Pipelines (ours and torch.distributed.pipelining's) cut where each layer's measured time
# says, not its FLOPs: on CPUs FLOPs misjudge pooling and small convolutions (README,
# "Where a step's time goes").
BALANCE = ["--balance", "time"]


def zoo_cases():
    """The zoo section: ResNet-18 at 32 and 64 px (data parallel beside DDP and
    MultiWorkerMirrored, a 2-stage pipeline beside torch.distributed.pipelining, the
    cost of --sync-bn and the gain of --amp bf16) and VGG-16 at 32 px, whose 19 M
    dense parameters make model parallelism worth a look."""
    resnet32 = Settings(False, "resnet18", "3,32,32", 32, windows=3, steps=3)
    resnet64 = Settings(False, "resnet18", "3,64,64", 32, windows=3, steps=3)
    vgg32 = Settings(False, "vgg16", "3,32,32", 32, windows=3, steps=4)
    def pipeline(schedule, microbatches):
        return ["--mode", "model", "--pp", 2, "--schedule", schedule, "--microbatches", microbatches, *BALANCE]
    listed = []
    for framework in ("torch", "tf"):
        def ours(settings, np_, flags=(), framework=framework):
            return settings, lambda: entry_case(settings, framework, np_, flags)
        listed += [
            ("resnet18 32px data np1", "zoo", framework, 1, False, *ours(resnet32, 1)),
            ("resnet18 32px data np2", "zoo", framework, 2, False, *ours(resnet32, 2)),
            ("resnet18 32px data np2 --sync-bn", "zoo", framework, 2, False, *ours(resnet32, 2, ["--sync-bn"])),
            ("resnet18 32px data np1 --amp bf16", "zoo", framework, 1, False,
             *ours(resnet32, 1, ["--amp", "bf16"])),
            *[(f"resnet18 32px model pp2, {schedule} M{microbatches}", "zoo", framework, 2, False,
               *ours(resnet32, 2, pipeline(schedule, microbatches)))
              for schedule, microbatches in (("gpipe", 4), ("gpipe", 8), ("1f1b", 4), ("1f1b", 8), ("interleaved", 4),
                                             ("zb", 4), ("zb", 8))],
            ("resnet18 64px data np1", "zoo", framework, 1, False, *ours(resnet64, 1)),
            ("resnet18 64px data np2", "zoo", framework, 2, False, *ours(resnet64, 2)),
            ("vgg16 32px data np2", "zoo", framework, 2, False, *ours(vgg32, 2)),
            ("vgg16 32px model pp2, 1f1b M4", "zoo", framework, 2, False, *ours(vgg32, 2, pipeline("1f1b", 4))),
        ]
    listed += [
        ("resnet18 32px DDP np2", "zoo", "torch (peer)", 2, False, resnet32,
         lambda: torchrun_case(resnet32, "ddp.py", 2)),
        ("resnet18 64px DDP np2", "zoo", "torch (peer)", 2, False, resnet64,
         lambda: torchrun_case(resnet64, "ddp.py", 2)),
        ("resnet18 32px MultiWorkerMirrored np2", "zoo", "tf (peer)", 2, False, resnet32,
         lambda: multiworker_case(resnet32)),
        *[(f"resnet18 32px torch.distributed.pipelining pp2, {schedule} M4", "zoo", "torch (peer)", 2, False,
           resnet32, lambda s=schedule: torchrun_case(resnet32, "torch_pipelining.py", 2,
                                                      ["--schedule", s, "--microbatches", 4, *BALANCE]))
          for schedule in ("1f1b", "interleaved", "zb")],
    ]
    return listed


@dataclass(frozen=True)
class Case:
    """One benchmark case: what it is, for the tables, and how to measure it once."""

    name: str
    group: str
    framework: str
    ranks: int
    oversubscribed: bool
    settings: Settings
    measure: Callable[[], dict]

    @property
    def key(self) -> pairing.CaseKey:
        return self.name, self.framework

    def record(self, throughput: dict) -> dict:
        return {"name": self.name, "group": self.group, "framework": self.framework, "ranks": self.ranks,
                "oversubscribed": self.oversubscribed, "workload": self.settings.workload, **throughput}


def cases(settings, quick):
    """Every case: the seed CNN's, then (unless quick) the zoo's."""
    return ([Case(*case[:5], settings, case[5]) for case in main_cases(settings, quick)] +
            ([] if quick else [Case(*case) for case in zoo_cases()]))


def main_cases(settings, quick):
    """(name, group, framework, ranks, oversubscribed, function): the seed CNN's cases."""
    if quick:
        return [("data np1", "data", "torch", 1, False, lambda: entry_case(settings, "torch", 1)),
                ("data np2", "data", "torch", 2, False, lambda: entry_case(settings, "torch", 2))]
    listed = []
    for framework in ("torch", "tf"):
        def ours(np_, flags=(), env=None, framework=framework):
            return lambda: entry_case(settings, framework, np_, flags, env)
        listed += [
            ("data np1", "data", framework, 1, False, ours(1)),
            ("data np2", "data", framework, 2, False, ours(2)),
            ("data np2, Horovod defaults", "data", framework, 2, False, ours(2, env=HOROVOD_DEFAULTS)),
            ("data np3", "ps", framework, 3, True, ours(3)),
            ("ps 1 server + 2 workers", "ps", framework, 3, True, ours(3, ["--mode", "ps"])),
            ("hybrid dp2 x pp2, 1f1b M4", "hybrid", framework, 4, True,
             ours(4, ["--mode", "hybrid", "--pp", 2, "--dp", 2, "--microbatches", 4])),
        ]
        for schedule, counts in (("gpipe", (1, 4, 8)), ("1f1b", (1, 4, 8)), ("interleaved", (4, 8)), ("zb", (4, 8))):
            for microbatches in counts:
                listed.append((f"model pp2, {schedule} M{microbatches}", "model", framework, 2, False,
                               ours(2, ["--mode", "model", "--pp", 2, "--schedule", schedule,
                                        "--microbatches", microbatches, *BALANCE])))
    listed += [("DDP np2 (torchrun, gloo)", "data", "torch (peer)", 2, False,
                lambda: torchrun_case(settings, "ddp.py", 2)),
               ("MultiWorkerMirroredStrategy, 2 workers", "data", "tf (peer)", 2, False,
                lambda: multiworker_case(settings))]
    for schedule, counts in (("gpipe", (4, 8)), ("1f1b", (4, 8)), ("interleaved", (4,)), ("zb", (4,))):
        for microbatches in counts:
            listed.append((f"torch.distributed.pipelining pp2, {schedule} M{microbatches}", "model",
                           "torch (peer)", 2, False,
                           lambda s=schedule, m=microbatches: torchrun_case(
                               settings, "torch_pipelining.py", 2, ["--schedule", s, "--microbatches", m, *BALANCE])))
    return listed


def machine():
    return {"host": socket.gethostname(), "cores": os.cpu_count(), "cpu": hardware.cpu_model(),
            "cpu_features": hardware.cpu_features().names(), "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def measure_case(name, measure, features):
    """A case's throughput, or why it has none: {"skipped": ...} for a bf16 case on a CPU that
    would emulate bf16 (it would take twenty times as long), {"failed": ..., "tail": ...}
    for a job that exited non-zero or timed out. The run goes on either way."""
    if "--amp bf16" in name and not features.native_bf16:
        return {"skipped": f"this CPU has no native bf16 ({features.describe()}): bf16 would be emulated"}
    try:
        return measure()
    except CaseFailed as failure:
        return {"failed": failure.reason, "tail": failure.tail}
    except Exception as error:  # noqa: BLE001 - a broken case is recorded; the others still run
        return {"failed": f"{type(error).__name__}: {error}", "tail": ""}


def measure_rounds(sequence, by_key, repeat, features, results):
    """The goals' cases, ``repeat`` rounds of ``sequence`` (reversed every other round):
    {case key: [one summary per run]}. Each round's runs go into results["paired"], with
    their positions, for benchmarks/pairing.py to pair; a case that fails is recorded once
    and not run again."""
    rounds, summaries, given_up = [], {}, set()
    for index in range(repeat):
        runs = []
        for position, key in enumerate(pairing.round_order(sequence, index)):
            if key in given_up:
                continue
            case = by_key[key]
            print(f"round {index + 1}/{repeat} {case.framework:14s} {case.name} ...", end=" ", flush=True)
            throughput = measured(case, features, results)
            if throughput is None:
                given_up.add(key)
                continue
            runs.append({"name": case.name, "framework": case.framework, "position": position, **throughput})
            summaries.setdefault(key, []).append(throughput)
        rounds.append(runs)
    results["paired"] = {"repeat": repeat, "sequence": [list(key) for key in sequence], "rounds": rounds}
    return summaries


def measured(case, features, results):
    """One run of a case, printed: its summary, or None once recorded as skipped or failed."""
    throughput = measure_case(case.name, case.measure, features)
    for kind in ("skipped", "failed"):
        if kind in throughput:
            print(f"{'skipped' if kind == 'skipped' else 'FAILED'}: {throughput[kind]}", flush=True)
            results[kind].append(case.record(throughput))
            return None
    print(f"{throughput['median']:,.0f} img/s", flush=True)
    return throughput


def over_runs(summaries):
    """A repeated case's figure: the median of its runs' medians, their spread, every run."""
    medians = [summary["median"] for summary in summaries]
    bounds = [summary["cut_bound"] for summary in summaries if "cut_bound" in summary]
    return {"median": statistics.median(medians), "min": min(medians), "max": max(medians),
            "runs": len(summaries), "windows": [summary["windows"] for summary in summaries],
            **({"cut_bound": statistics.median(bounds)} if bounds else {})}


def measure_all(listed, repeat, features, results):
    """The goals' cases in paired rounds, then every other case once, into results["cases"]
    in the listed order."""
    by_key = {case.key: case for case in listed}
    sequence = pairing.measurement_order(report.goal_sequence(), set(by_key))
    paired = measure_rounds(sequence, by_key, repeat, features, results)
    figures = {key: over_runs(summaries) for key, summaries in paired.items()}
    for case in listed:
        if case.key not in sequence:
            print(f"{case.framework:20s} {case.name} ...", end=" ", flush=True)
            figures[case.key] = measured(case, features, results)
    results["cases"] = [case.record(figures[case.key]) for case in listed if figures.get(case.key)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: two tiny cases")
    parser.add_argument("--only", default="", help="run only cases whose name matches this regex")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds of the goals' paired cases (default 3; 2 with --quick)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (2 if args.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    settings = Settings(args.quick)
    results = {"machine": machine(), "settings": {"model": "seed CNN", "image_shape": settings.shape,
                                                  "global_batch": settings.batch, "threads_per_rank": settings.threads,
                                                  "windows": settings.windows, "steps_per_window": settings.steps,
                                                  "repeat": repeat},
               "cases": [], "failed": [], "skipped": [], "allreduce": {}}
    features = hardware.cpu_features()
    print(f"machine: {results['machine']['cpu'] or 'unknown CPU'} ({features.describe()}), "
          f"{results['machine']['cores']} cores", flush=True)
    listed = [case for case in cases(settings, args.quick) if not args.only or re.search(args.only, case.name)]
    measure_all(listed, repeat, features, results)
    for label, env in (("shipped", None), ("horovod_defaults", None if args.quick else HOROVOD_DEFAULTS)):
        if args.quick and label != "shipped":
            continue
        print(f"allreduce bandwidth ({label}) ...", flush=True)
        measured_bandwidth = measure_case(f"allreduce bandwidth ({label})",
                                          lambda env=env: allreduce_case(args.quick, env), features)
        if "failed" in measured_bandwidth:
            results["failed"].append({"name": f"allreduce bandwidth ({label})", **measured_bandwidth})
        else:
            results["allreduce"][label] = measured_bandwidth
    print("GPU section ...", flush=True)
    results["gpu"] = measure_case("GPU section", lambda: gpu_case(args.quick), features)
    if "failed" in results["gpu"]:
        results["failed"].append({"name": "GPU section", **results["gpu"]})
    results["machine"]["gpu"] = results["gpu"].get("gpu")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as out:
        json.dump(results, out, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as out:
        out.write(report.markdown(results))
    report.plot(results, os.path.join(args.out, "results.png"))
    print(f"wrote {args.out}/results.json, results.md, results.png")
    if not args.quick and not args.only:
        from benchmarks import input_pipeline  # the data section: its own table
        input_pipeline.main(["--out", args.out])
        from benchmarks import planner_check  # --mode auto against measurement: its own table
        planner_check.main(["--framework", "torch,tf", "--out", args.out])
    if results["failed"]:
        print(f"{len(results['failed'])} case(s) failed: " + "; ".join(case["name"] for case in results["failed"]),
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
