"""Tables and plot from benchmarks/run.py's results (pure: no measuring here)."""

import dataclasses
from dataclasses import dataclass

from benchmarks.pairing import CaseKey, Ratio, Run, ratio_range
from common.parallel.schedule import bubble_bound, partition_bound

FRAMEWORKS = ("torch", "tf")
PEERS = {"torch": "DDP np2 (torchrun, gloo)", "tf": "MultiWorkerMirroredStrategy, 2 workers"}
ZOO_PEERS = {"torch": "resnet18 32px DDP np2", "tf": "resnet18 32px MultiWorkerMirrored np2"}


def find(results, name, framework):
    case = find_case(results, name, framework)
    return case["median"] if case else None


def find_case(results, name, framework):
    return next((case for case in results["cases"] if case["name"] == name and case["framework"] == framework),
                None)


def ratio(numerator, denominator, scale=1.0):
    if numerator is None or not denominator:
        return None
    return numerator / (denominator * scale)


def pipeline_bound(microbatches, stages=2, chunks=1):
    """The fraction of time a stage computes under a GPipe/1F1B schedule (chunks 1) or an
    interleaved one over ``chunks`` pieces per stage: common/parallel/schedule.bubble_bound."""
    return bubble_bound("interleaved" if chunks > 1 else "1f1b", stages, microbatches, chunks)


def cut_bound(run_summary: dict) -> float | None:
    """The best efficiency a pipeline's cut and schedule allow (common/parallel/schedule.
    partition_bound), from its run summary: the layer costs it was cut by (forward and
    backward together; the backward taken as twice the forward) summed over each piece, the
    model's last piece by its own costs where the run recorded them (TensorFlow's pieces
    before it pay a recomputed forward). None for a run that was not cut."""
    costs, pieces = run_summary.get("partition_costs") or [], run_summary.get("layer_ranges") or []
    if run_summary.get("pp", 1) < 2 or not costs or not pieces:
        return None
    last_costs = run_summary.get("last_piece_costs") or costs
    piece_costs = [sum(costs[first:end]) for first, end in pieces[:-1]]
    piece_costs.append(sum(last_costs[pieces[-1][0]:pieces[-1][1]]))
    return partition_bound(run_summary["schedule"], run_summary["pp"], run_summary["microbatches"], piece_costs,
                           run_summary["virtual_stages"])


WORKLOADS = (("", "seed CNN", PEERS), ("resnet18 32px ", "ResNet-18 32px", ZOO_PEERS))


@dataclass(frozen=True)
class Goal:
    """A target for one ratio of two cases, per framework (a framework without the ratio
    has no entry)."""

    label: str
    threshold: float
    ratios: dict[str, Ratio]
    cut_bound: bool = False  # divide by the numerator's cut bound where the run recorded one

    def ratio_for(self, framework: str, results) -> Ratio:
        """The framework's ratio, against its pipeline's cut bound when that was measured (the
        median over its runs), else against the bound the ratio states (the bubble's)."""
        ratio = self.ratios[framework]
        measured = (find_case(results, *ratio.numerator) or {}).get("cut_bound") if self.cut_bound else None
        return dataclasses.replace(ratio, bound=measured) if measured else ratio


def goal_list() -> list[Goal]:
    """The data- and pipeline-parallel targets, on the seed CNN and ResNet-18 at 32 px."""
    listed = []
    for prefix, label, peer in WORKLOADS:
        one, two = f"{prefix}data np1", f"{prefix}data np2"
        interleaved, one_f_one_b = f"{prefix}model pp2, interleaved M4", f"{prefix}model pp2, 1f1b M4"
        listed.append(Goal(f"{label}: data scaling np2 / (2 x np1)", 0.90,
                           {f: Ratio((two, f), (one, f), scale=2) for f in FRAMEWORKS}))
        listed.append(Goal(f"{label}: Horovod data np2 / peer (DDP; MultiWorkerMirrored)", 1.10,
                           {f: Ratio((two, f), (peer[f], f + " (peer)")) for f in FRAMEWORKS}))
        for schedule in ("gpipe", "1f1b"):
            for microbatches in (4, 8):
                name, bound = f"{prefix}model pp2, {schedule} M{microbatches}", pipeline_bound(microbatches)
                listed.append(Goal(f"{label}: pipeline {schedule} M{microbatches} efficiency / the most its cut "
                                   f"allows (bubble bound {bound:.2f})", 0.90,
                                   {f: Ratio((name, f), (one, f), 2, bound) for f in FRAMEWORKS}, cut_bound=True))
        listed.append(Goal(f"{label}: interleaved M4 efficiency / the 1F1B bound {pipeline_bound(4):.2f}", 1.00,
                           {f: Ratio((interleaved, f), (one, f), 2, pipeline_bound(4)) for f in FRAMEWORKS}))
        listed.append(Goal(f"{label}: interleaved M4 / 1f1b M4 throughput", 1.00,
                           {f: Ratio((interleaved, f), (one_f_one_b, f)) for f in FRAMEWORKS}))
        listed.append(Goal(f"{label}: TensorFlow / PyTorch pipeline, 1f1b M4", 0.90,
                           {"tf": Ratio((one_f_one_b, "tf"), (one_f_one_b, "torch"))}))
        zero_bubble = f"{prefix}model pp2, zb M4"
        listed.append(Goal(f"{label}: ZB-H1 M4 / 1f1b M4 throughput", 1.00,
                           {f: Ratio((zero_bubble, f), (one_f_one_b, f)) for f in FRAMEWORKS}))
        listed.append(Goal(f"{label}: our ZB-H1 M4 / torch.distributed.pipelining's zero bubble on the same cut",
                           1.00, {"torch": Ratio((zero_bubble, "torch"), (peer_zero_bubble(prefix), "torch (peer)"))}))
    return listed


def peer_zero_bubble(prefix: str) -> str:
    return f"{prefix}torch.distributed.pipelining pp2, zb M4"


def goal_sequence() -> list[CaseKey]:
    """The order the goals' cases run in within a round: every goal's two sides at most two
    runs apart (data np1, the denominator of six goals per framework, runs twice), PyTorch's
    cases, then TensorFlow's in mirror order, so the two 1f1b M4 runs that the TF/PyTorch
    goal divides come next to each other. PyTorch's ZB-H1 and its peer come first, beside
    a 1F1B run of their own (PyTorch's 1f1b M4 runs twice)."""
    sequence = []
    for prefix, _, peer in WORKLOADS:
        ours = [f"{prefix}{name}" for name in ("data np2", "data np1", "model pp2, gpipe M4", "model pp2, gpipe M8",
                                               "model pp2, 1f1b M8", "data np1", "model pp2, interleaved M4",
                                               "model pp2, 1f1b M4")]
        zero_bubble, one_f_one_b = f"{prefix}model pp2, zb M4", f"{prefix}model pp2, 1f1b M4"
        # PyTorch's ZB-H1 between the peer's and a second 1F1B run; TensorFlow's just before its 1F1B.
        sequence += [(peer_zero_bubble(prefix), "torch (peer)"), (zero_bubble, "torch"), (one_f_one_b, "torch")]
        sequence += [(peer["torch"], "torch (peer)"), *[(name, "torch") for name in ours]]
        sequence += [(zero_bubble, "tf"), *[(name, "tf") for name in reversed(ours)], (peer["tf"], "tf (peer)")]
    return sequence


def paired_runs(results) -> list[list[Run]]:
    """The rounds of paired runs in ``results`` (benchmarks/run.py's "paired" section)."""
    return [[Run((run["name"], run["framework"]), run["position"], run["median"]) for run in runs]
            for runs in (results.get("paired") or {}).get("rounds", [])]


def goals(results):
    """(goal, {framework: RatioRange or None}) rows: each goal's ratio over the paired rounds."""
    rounds = paired_runs(results)
    return [(goal, {framework: ratio_range(rounds, goal.ratio_for(framework, results))
                    if framework in goal.ratios else None for framework in FRAMEWORKS}) for goal in goal_list()]


def derived(results):
    """(measure, {framework: value}) rows: ratios the README quotes."""
    rows = []

    def row(label, value_of):
        rows.append((label, {framework: value_of(framework) for framework in FRAMEWORKS}))

    row("scaling efficiency: data np2 / (2 x data np1)",
        lambda f: ratio(find(results, "data np2", f), find(results, "data np1", f), 2))
    row("Horovod data np2, shipped defaults / peer (DDP; MultiWorkerMirrored)",
        lambda f: ratio(find(results, "data np2", f), find(results, PEERS[f], f + " (peer)")))
    row("Horovod data np2, Horovod's own defaults / peer",
        lambda f: ratio(find(results, "data np2, Horovod defaults", f), find(results, PEERS[f], f + " (peer)")))
    for schedule, chunks in (("gpipe", 1), ("1f1b", 1), ("interleaved", 2), ("zb", 1)):
        for microbatches in ((4, 8) if chunks > 1 or schedule == "zb" else (1, 4, 8)):
            name = f"model pp2, {schedule} M{microbatches}"
            bubble = bubble_bound(schedule, 2, microbatches, chunks)
            row(f"pipeline efficiency {schedule} M{microbatches}: pp2 / (2 x np1) (bound {bubble:.2f})",
                lambda f, n=name: ratio(find(results, n, f), find(results, "data np1", f), 2))
            row(f"  the most its cut allows (layer times; bubble bound {bubble:.2f})",
                lambda f, n=name: (find_case(results, n, f) or {}).get("cut_bound"))
    for schedule, counts in (("gpipe", (4, 8)), ("1f1b", (4, 8)), ("interleaved", (4,)), ("zb", (4,))):
        for microbatches in counts:
            peer = f"torch.distributed.pipelining pp2, {schedule} M{microbatches}"
            row(f"our pp2 {schedule} M{microbatches} / torch.distributed.pipelining",
                lambda f, p=peer, n=f"model pp2, {schedule} M{microbatches}":
                ratio(find(results, n, f), find(results, p, "torch (peer)")) if f == "torch" else None)
    row("parameter server (1 + 2 workers) / ring allreduce np2",
        lambda f: ratio(find(results, "ps 1 server + 2 workers", f), find(results, "data np2", f)))
    row("parameter server (1 + 2 workers) / ring allreduce np3 (same 3 processes)",
        lambda f: ratio(find(results, "ps 1 server + 2 workers", f), find(results, "data np3", f)))
    return rows


def zoo_derived(results):
    """(measure, {framework: value}) rows of the zoo section."""
    rows = []

    def row(label, value_of):
        rows.append((label, {framework: value_of(framework) for framework in FRAMEWORKS}))

    for size in (32, 64):
        row(f"ResNet-18 {size}px scaling efficiency: np2 / (2 x np1)",
            lambda f, s=size: ratio(find(results, f"resnet18 {s}px data np2", f),
                                    find(results, f"resnet18 {s}px data np1", f), 2))
    row("ResNet-18 32px Horovod np2 / peer (DDP; MultiWorkerMirrored)",
        lambda f: ratio(find(results, "resnet18 32px data np2", f), find(
            results, "resnet18 32px DDP np2" if f == "torch" else "resnet18 32px MultiWorkerMirrored np2",
            f + " (peer)")))
    row("ResNet-18 64px Horovod np2 / DDP np2",
        lambda f: ratio(find(results, "resnet18 64px data np2", f), find(results, "resnet18 64px DDP np2",
                                                                           "torch (peer)")) if f == "torch" else None)
    row("--sync-bn cost: np2 with / np2 without",
        lambda f: ratio(find(results, "resnet18 32px data np2 --sync-bn", f),
                        find(results, "resnet18 32px data np2", f)))
    row("--amp bf16 gain: np1 bf16 / np1 fp32",
        lambda f: ratio(find(results, "resnet18 32px data np1 --amp bf16", f),
                        find(results, "resnet18 32px data np1", f)))
    row(f"ResNet-18 32px pipeline 1f1b M4: pp2 / (2 x np1) (bound {pipeline_bound(4):.2f})",
        lambda f: ratio(find(results, "resnet18 32px model pp2, 1f1b M4", f),
                        find(results, "resnet18 32px data np1", f), 2))
    row(f"  the most its cut allows (layer times; bubble bound {pipeline_bound(4):.2f})",
        lambda f: (find_case(results, "resnet18 32px model pp2, 1f1b M4", f) or {}).get("cut_bound"))
    for schedule in ("1f1b", "interleaved", "zb"):
        row(f"ResNet-18 32px our pp2 {schedule} M4 / torch.distributed.pipelining",
            lambda f, s=schedule: ratio(find(results, f"resnet18 32px model pp2, {s} M4", f), find(
                results, f"resnet18 32px torch.distributed.pipelining pp2, {s} M4", "torch (peer)"))
            if f == "torch" else None)
    row("VGG-16 32px model parallel pp2 / data parallel np2",
        lambda f: ratio(find(results, "vgg16 32px model pp2, 1f1b M4", f), find(results, "vgg16 32px data np2", f)))
    return rows


def _zoo_markdown(results):
    zoo = [case for case in results["cases"] if case.get("group") == "zoo"]
    if not zoo:
        return []
    lines = ["", "The zoo (one thread per rank, 2 timed windows after a warm-up):", "",
             "| case | framework | workload | images/sec | spread | runs |", "|---|---|---|---|---|---|"]
    for case in zoo:
        lines.append(f"| {case['name']} | {case['framework']} | {case.get('workload', '')} | "
                     f"{case['median']:,.1f} | {case['min']:,.1f}–{case['max']:,.1f} | {case.get('runs', 1)} |")
    return lines + _measures_table("zoo measure", zoo_derived(results))


def _measures_table(heading, rows):
    lines = ["", f"| {heading} | PyTorch | TensorFlow |", "|---|---|---|"]
    for label, values in rows:
        if any(value is not None for value in values.values()):
            lines.append(f"| {label} | {_number(values['torch'])} | {_number(values['tf'])} |")
    return lines


def _number(value, digits=2):
    return "–" if value is None else f"{value:.{digits}f}"


def _goal_cell(spread, goal):
    if spread is None:
        return "–"
    return f"{spread.median:.2f} ({spread.low:.2f}–{spread.high:.2f}) {spread.verdict(goal)}"


def goals_markdown(results):
    rows = [(goal, values) for goal, values in goals(results) if any(value is not None for value in values.values())]
    if not rows:
        return []
    pairs = max(value.pairs for _, values in rows for value in values.values() if value is not None)
    lines = ["", f"The goals for data and pipeline parallelism: each ratio taken in each of {pairs} rounds from "
             "runs at most two cases apart, the order reversed every other round; the median ratio, its range "
             "over the rounds, and the verdict: met when the range's lower end clears the goal, not met when "
             "its upper end falls short, within noise otherwise.", "",
             "| measure | goal | PyTorch | TensorFlow |", "|---|---|---|---|"]
    for goal, values in rows:
        lines.append(f"| {goal.label} | ≥ {goal.threshold:.2f} | {_goal_cell(values['torch'], goal.threshold)} | "
                     f"{_goal_cell(values['tf'], goal.threshold)} |")
    return lines


def markdown(results):
    machine, settings = results["machine"], results["settings"]
    features = ", ".join(machine.get("cpu_features") or []) or "features not recorded"
    lines = [f"Measured {machine['date']} on `{machine['host']}`: {machine['cores']} cores "
             f"({machine['cpu'] or 'unknown CPU'}; {features}), Python {machine['python']}, "
             f"{machine.get('gpu') or 'no GPU'}. "
             f"Workload: the {settings['model']}, synthetic {settings['image_shape']} images, global batch "
             f"{settings['global_batch']}, {settings['threads_per_rank']} thread per rank; images/sec is the "
             f"median of {settings['windows'] - 1} timed windows of {settings['steps_per_window']} steps after "
             "a warm-up window, with the spread (min–max); a case the goals divide ran once a round (runs): its "
             "figure is the median of its runs' medians, the spread theirs. * = more processes than cores.", "",
             "| case | framework | ranks | images/sec | spread | per rank | runs |", "|---|---|---|---|---|---|---|"]
    for case in (case for case in results["cases"] if case.get("group") != "zoo"):
        flag = " *" if case["oversubscribed"] else ""
        lines.append(f"| {case['name']}{flag} | {case['framework']} | {case['ranks']} | {case['median']:,.0f} | "
                     f"{case['min']:,.0f}–{case['max']:,.0f} | {case['median'] / case['ranks']:,.0f} | "
                     f"{case.get('runs', 1)} |")
    lines += _measures_table("measure", derived(results))
    lines += _zoo_markdown(results)
    lines += goals_markdown(results)
    for label, run in results["allreduce"].items():
        lines += ["", f"Allreduce bandwidth, {run['world_size']} ranks ({label.replace('_', ' ')}): "
                  "bytes / median seconds, MB/s", "", "| size | mpi4py Allreduce | Horovod allreduce |",
                  "|---|---|---|"]
        for size in run["sizes"]:
            lines.append(f"| {_size(size['bytes'])} | {size['mpi4py_bytes_per_sec'] / 1e6:,.0f} | "
                         f"{size['horovod_bytes_per_sec'] / 1e6:,.0f} |")
    lines += ["", *gpu_markdown(results.get("gpu") or {})]
    lines += not_measured_markdown(results)
    return "\n".join(lines) + "\n"


def not_measured_markdown(results):
    """The cases this run has no figure for: skipped (and why) or failed (and how it ended)."""
    lines = []
    for kind in ("skipped", "failed"):
        for case in results.get(kind, []):
            reason = case[kind] + (f"; last line: `{case['tail'].splitlines()[-1]}`"
                                   if kind == "failed" and case.get("tail") else "")
            lines.append(f"- {case.get('framework', '')} {case['name']}: {kind}, {reason}".replace("-  ", "- "))
    return ["", "Cases without a figure in this run:", "", *lines] if lines else []


def gpu_markdown(gpu):
    if gpu.get("failed"):
        return ["GPU section (benchmarks/gpu.py): failed, see below."]
    if not gpu.get("gpu"):
        return ["GPU section (benchmarks/gpu.py: the zoo's ResNet-50/18 and the seed CNN, fp32 vs bf16 vs fp16): "
                f"not run here, {gpu.get('reason', 'no CUDA device')}."]
    lines = [f"GPU section: {gpu['gpu']}, torch {gpu['torch']}, one device.", "",
             "| model | precision | batch | images/sec | spread |", "|---|---|---|---|---|"]
    for case in gpu["cases"]:
        lines.append(f"| {case['name']} | {case['precision']} | {case['batch']} | {case['median']:,.0f} | "
                     f"{case['min']:,.0f}–{case['max']:,.0f} |")
    return lines


def _size(count):
    for unit, scale in (("MB", 1 << 20), ("KB", 1 << 10)):
        if count >= scale:
            return f"{count // scale} {unit}"
    return f"{count} B"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, efficiency, bandwidth) = plt.subplots(1, 3, figsize=(20, 8),
                                                           gridspec_kw={"width_ratios": [2.2, 1.3, 1]})
    cases = [case for case in results["cases"] if case.get("group") != "zoo"]  # the zoo: its own scale, in the table
    labels = [f"{case['framework']}: {case['name']}{' *' if case['oversubscribed'] else ''}" for case in cases]
    colours = ["tab:blue" if case["framework"] == "torch" else "tab:orange" if case["framework"] == "tf"
               else "tab:gray" for case in cases]
    positions = range(len(cases))
    medians = [case["median"] for case in cases]
    spreads = [[case["median"] - case["min"] for case in cases], [case["max"] - case["median"] for case in cases]]
    bars.barh(positions, medians, xerr=spreads, color=colours)
    bars.set_yticks(list(positions), labels, fontsize=7)
    bars.invert_yaxis()
    bars.set_xlabel("images/sec (median, min-max)")
    bars.set_title("Throughput (blue PyTorch, orange TensorFlow, grey peers)")

    rows = [(label, values) for label, values in derived(results) if any(v is not None for v in values.values())]
    for offset, framework, colour in ((-0.2, "torch", "tab:blue"), (0.2, "tf", "tab:orange")):
        efficiency.barh([i + offset for i in range(len(rows))], [values[framework] or 0 for _, values in rows],
                        height=0.4, color=colour, label=framework)
    for i, (label, _) in enumerate(rows):
        if "bound" in label:
            bound = float(label.split("bound ")[1].rstrip(")"))
            efficiency.plot([bound, bound], [i - 0.45, i + 0.45], color="black")
    efficiency.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=6)
    efficiency.invert_yaxis()
    efficiency.axvline(1.0, color="gray", linestyle=":")
    efficiency.set_title("Ratios (black ticks: bubble bound M/(M+K-1))")
    efficiency.legend(fontsize=7)

    for label, run in results["allreduce"].items():
        sizes = [size["bytes"] for size in run["sizes"]]
        bandwidth.loglog(sizes, [size["horovod_bytes_per_sec"] / 1e6 for size in run["sizes"]], marker="o",
                         label=f"Horovod ({label.replace('_', ' ')})")
        if label == "shipped":
            bandwidth.loglog(sizes, [size["mpi4py_bytes_per_sec"] / 1e6 for size in run["sizes"]], marker="s",
                             label="mpi4py Allreduce")
    bandwidth.set_xlabel("message size (bytes)")
    bandwidth.set_ylabel("MB/s")
    bandwidth.set_title("Allreduce bandwidth, 2 ranks")
    bandwidth.legend(fontsize=7)
    figure.suptitle(f"{results['machine']['date']}, {results['machine']['cores']} cores")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
