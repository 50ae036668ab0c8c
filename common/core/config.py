"""One run configuration for both frameworks, and the CLI generated from it.

Every flag is a field of ``RunConfig``, in one of the groups of ``GROUPS`` (shown as
such by --help, and as tables in a --config file); ``parse_config`` builds the argparse
parser from the fields, so train_torch/main.py and train_tf/main.py accept exactly the
same command line. ``--config FILE`` (TOML) gives values for any of them; flags on the
command line override the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import os
import tomllib
import types as types_module
import typing
from dataclasses import dataclass, field

from common.core.errors import UsageError
from common.launch.memory_budget import parse_size
from common.model import networks
from common.observe.run_dir import NO_RUN_DIR, TIMELINE_IN_RUN_DIR


class Mode(enum.StrEnum):
    DATA = "data"
    MODEL = "model"
    HYBRID = "hybrid"
    PS = "ps"
    AUTO = "auto"


class Schedule(enum.StrEnum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED = "interleaved"
    ZERO_BUBBLE = "zb"


class Balance(enum.StrEnum):
    FLOPS = "flops"
    PARAMS = "params"
    TIME = "time"


class DatasetName(enum.StrEnum):
    DIGITS = "digits"
    CIFAR10 = "cifar10"
    SYNTHETIC = "synthetic"
    FOLDER = "folder"


class Amp(enum.StrEnum):
    OFF = "off"
    BF16 = "bf16"
    FP16 = "fp16"


IMAGE_CHECKS = ("full", "header", "none")
MODELS = (*networks.ARCHITECTURES, *networks.ALIASES)
DECODERS = ("cpu", "gpu")
P2P_MEMORY = ("auto", "host", "device")
OPTIMIZERS = ("sgd", "adam")


def _flag(default, help, **argparse_kwargs):
    return field(default=default, metadata={"help": help, **argparse_kwargs})


@dataclass(frozen=True)
class RunConfig:
    mode: Mode = _flag(Mode.DATA, "parallelism: data (Horovod allreduce), model (pipeline of --pp "
                      "stages over MPI), hybrid (--dp replicas of a --pp stage pipeline) or ps "
                      "(parameter server over MPI: rank 0 updates, the others compute gradients); auto: "
                      "the fastest of data, model and hybrid layouts that fits --memory-per-rank, by a "
                      "time and memory model of this hardware (measured at the start)",
                      choices=list(Mode))
    memory_per_rank: str = _flag("", "--mode auto: the most memory a rank may hold, e.g. 8G (default: the "
                                 "node's memory, or its cgroup's limit, shared by the job's ranks on it)")
    plan_only: bool = _flag(False, "--mode auto: print the layouts ranked by predicted speed, with their memory, "
                            "and exit without training")
    plan_ranks: int = _flag(0, "--plan-only: plan for this many ranks (default: those launched)")
    pp: int = _flag(0, "pipeline stages (model: = ranks; hybrid: ranks = pp x dp)")
    dp: int = _flag(0, "hybrid: data-parallel replicas of the pipeline (0: ranks / pp)")
    microbatches: int = _flag(1, "model/hybrid: micro-batches per replica per step")
    schedule: Schedule = _flag(Schedule.ONE_F_ONE_B, "model/hybrid: pipeline schedule (interleaved: 1F1B over "
                               "--virtual-stages model pieces per rank, a smaller bubble for more messages; "
                               "zb: ZB-H1, 1F1B whose weight gradients wait to fill the bubble)",
                               choices=list(Schedule))
    virtual_stages: int = _flag(2, "--schedule interleaved: model pieces each rank holds (the model is cut "
                                "into pp x this many stages, dealt round the ranks)")
    balance: Balance = _flag(Balance.FLOPS, "model/hybrid: balance stages by layer flops, params, or time "
                         "(measured once)", choices=list(Balance))
    p2p_memory: str = _flag("auto", "model/hybrid on GPUs: where activations and gradients are handed to MPI: "
                            "host (through page-locked host buffers), device (CUDA tensors, for a CUDA-aware MPI; "
                            "PyTorch), or auto (device when the MPI reports CUDA support, else host)",
                            choices=P2P_MEMORY)
    split: str = _flag("", "model/hybrid: explicit stage boundaries, e.g. 2,4 (first layer of "
                       "stages 1, 2, ...); overrides --balance")
    dataset: DatasetName = _flag(DatasetName.DIGITS, "digits (bundled with scikit-learn), cifar10 (from --data-dir), "
                         "synthetic (random images) or folder (your images in --data-dir, streamed from disk)",
                         choices=list(DatasetName))
    data_dir: str = _flag("", "cifar10: the python batches (cifar-10-batches-py); folder: DIR/<class>/*.jpg|png|bmp "
                          "or DIR/train/<class>/* with DIR/val/<class>/*")
    val_fraction: float = _flag(0.2, "folder without train/ and val/: the share of each class held out for "
                                "evaluation (a fixed draw, the same whatever --seed)")
    image_size: int = _flag(224, "folder: training crops and evaluation images are this many pixels square")
    channels: int = _flag(0, "folder: 1 (grayscale) or 3 (RGB); 0: 1 if the images are grayscale, else 3")
    augment: bool = _flag(True, "folder: train on random-resized crops with horizontal flips (--no-augment: "
                          "resize + centre crop, as evaluation does)")
    data_workers: int = _flag(-1, "folder: decoder processes per rank (-1: the CPUs per rank; 0: decode in "
                              "the rank itself)")
    prefetch_batches: int = _flag(2, "batches read ahead of the one training, by a thread of each rank (folder: "
                                  "decoded ahead; bounds memory)")
    check_images: str = _flag("full", "folder: before training, decode every image (full), read every "
                              "header (header: faster, corrupt pixels then stop the job when read) or none",
                              choices=IMAGE_CHECKS)
    decode: str = _flag("cpu", "folder: where JPEGs are decoded: cpu (decoder processes) or gpu (PyTorch: nvJPEG "
                        "on the rank's GPU, crops resampled there; other formats stay on the CPU)", choices=DECODERS)
    skip_bad_images: bool = _flag(False, "folder: an image that fails to decode during training is replaced "
                                  "by a blank one and counted, instead of stopping the job")
    synthetic_shape: str = _flag("3,32,32", "synthetic image shape as C,H,W")
    synthetic_samples: int = _flag(2048, "synthetic training-set size (test set: a quarter of it)")
    num_classes: int = _flag(10, "synthetic number of classes")
    model: str = _flag("cnn", "cnn (the seed's conv32-pool-conv64-pool-dense64-dense), resnet8 (small, "
                       "BatchNorm; alias resnet), or torchvision's resnet18/34/50, vgg11/16[_bn], mobilenet_v2",
                       choices=MODELS)
    stem: str = _flag("auto", "resnet18+/vgg/mobilenet_v2: imagenet stem (7x7/2 conv + max-pool; VGG "
                      "pools to 7x7) or cifar stem (3x3/1 conv, no pool); auto: cifar for images up to "
                      f"{networks.SMALL_INPUT} px", choices=networks.STEMS)
    recompute: bool = _flag(False, "activation recomputation: the backward keeps only each layer's (each "
                            "block's) input and runs the layer's forward again, for about one more forward "
                            "of time; in every mode")
    sync_bn: bool = _flag(False, "BatchNorm statistics over the global batch: across all ranks (data) or "
                          "a stage's replicas (hybrid); one extra allreduce per BatchNorm layer per step")
    amp: Amp = _flag(Amp.OFF, "mixed precision: bf16 autocast (CPU and GPU; --amp alone) or fp16 with "
                     "dynamic loss scaling (GPU, --mode data); weights, optimizer and checkpoints stay fp32",
                     choices=list(Amp), nargs="?", const=Amp.BF16)
    loss_scale: float = _flag(65536.0, "--amp fp16: the initial dynamic loss scale (halved after "
                              "each overflow, doubled after 2000 clean steps)")
    dropout: float | None = _flag(None, "the share of units dropped while training, before the classifier (VGG: "
                                  "also after each hidden dense layer), with masks drawn from (--seed, epoch, "
                                  "sample), the same in every mode; default: the model's own (VGG 0.5, "
                                  "mobilenet_v2 0.2, the others 0)")
    channels_last: bool | None = _flag(None, "PyTorch: NHWC memory format (faster convolutions with --amp on "
                                          "a GPU; default: on exactly then, i.e. with --amp on CUDA)")
    epochs: int = _flag(10, "training epochs (0: only evaluate)")
    batch_size: int = _flag(64, "GLOBAL batch size, shared by all ranks; --lr applies to it")
    batch_size_per_rank: int = _flag(0, "instead of --batch-size: per-rank batch (Horovod's weak "
                                     "scaling); --lr is then scaled by the world size with warmup")
    lr: float = _flag(0.05, "learning rate for the global batch")
    lr_schedule: str = _flag("constant", "after the warmup: constant, or cosine (decays to 0 at the last "
                             "step of --epochs)", choices=("constant", "cosine"))
    warmup_epochs: float = _flag(-1.0, "linear LR warmup epochs (default: 0, or 1 with "
                                 "--batch-size-per-rank on more than one rank)")
    optimizer: str = _flag("sgd", "optimizer", choices=OPTIMIZERS)
    momentum: float = _flag(0.9, "SGD momentum")
    weight_decay: float = _flag(0.0, "L2 weight decay")
    fp16_allreduce: bool = _flag(False, "compress gradients to fp16 for the allreduce")
    accumulation_steps: int = _flag(1, "split each rank's share of a batch into this many backward "
                                    "passes before one allreduce (same result, less memory)")
    adasum: bool = _flag(False, "reduce gradients with Adasum instead of a sum (changes the maths)")
    seed: int = _flag(0, "seed for weights and data order")
    threads: int = _flag(0, "compute threads per rank (0: cores / ranks on this node)")
    steps_per_epoch: int = _flag(0, "stop each epoch after this many steps (0: full epoch)")
    run_dir: str = _flag("", "this run's directory: its command line and resolved configuration, and (unless "
                         "pointed elsewhere) its metrics, TensorBoard events, checkpoints and timeline; default "
                         "runs/<time>-<framework>-<mode>; none: write only what the flags below ask for")
    checkpoint_dir: str = _flag("", "save a checkpoint here after every epoch (rank 0, atomic; default: "
                                "RUN_DIR/checkpoints)")
    keep_checkpoints: int = _flag(3, "how many recent checkpoints to keep")
    keep_going_on_save_error: bool = _flag(False, "when a checkpoint, the metrics file or TensorBoard events "
                                           "cannot be written (a full disk): warn and train on (default: stop "
                                           "with one line; earlier checkpoints are kept either way)")
    resume: bool = _flag(False, "continue the run in --run-dir (or --checkpoint-dir) from its newest checkpoint")
    init_from: str = _flag("", "start from the weights of this checkpoint directory (ckpt-epochNNNN, "
                           "written by either framework in any mode); with --epochs 0 it only evaluates")
    metrics_file: str = _flag("", "append one JSON object per epoch to this file (default: RUN_DIR/metrics.jsonl)")
    summary_file: str = _flag("", "write what the run did as one JSON object at its end: how it ended, the final "
                              "test loss and accuracy, where it resumed from, where it stopped and what it saved, "
                              "its layout and hosts (default: RUN_DIR/summary.json)")
    tensorboard: str = _flag("", "write TensorBoard events (losses, accuracy, LR, throughput, step time, data "
                             "wait, the configuration) to this directory (default: RUN_DIR): tensorboard --logdir runs")
    timeline: str = _flag("", "record what each rank does over a few steps into FILE (bare --timeline: "
                          "RUN_DIR/timeline.json): data mode writes Horovod's own timeline; model/hybrid/ps a "
                          "Chrome-trace JSON, one track per rank (open in ui.perfetto.dev or chrome://tracing). "
                          "Under horovodrun spell it --timeline-file: horovodrun takes --timeline for its own "
                          "--timeline-filename", nargs="?", const=TIMELINE_IN_RUN_DIR, metavar="FILE",
                          aliases=("--timeline-file",))
    timeline_steps: int = _flag(3, "with --timeline in model/hybrid/ps mode: steps recorded (after the first)")
    log_every: int = _flag(10, "with --tensorboard: log the global batch's loss every N steps (0: never)")
    progress: bool = _flag(True, "one progress bar on the reporting rank, when there is a terminal")
    allow_nonfinite: bool = _flag(False, "keep training when the loss is NaN or infinite (default: "
                                  "stop, keeping the last good checkpoint)")
    connect_timeout: float = _flag(300.0, "end the job with a clear line when its ranks have not all reached "
                                   "each other this many seconds after start-up (a wrong network interface "
                                   "makes MPI and Gloo wait forever; 0: wait forever)")
    elastic: bool = _flag(False, "data mode: Horovod elastic training, workers may leave and "
                          "join (launch with horovodrun --min-np/--max-np --host-discovery-script); "
                          "the global batch and LR stay fixed")
    elastic_commit_steps: int = _flag(20, "--elastic: commit the training state every N steps (a "
                                      "failed worker costs at most N steps of redone work)")

    def __post_init__(self):
        # Normalised once, at construction (the config is frozen after): a value given as text
        # (a flag, a file, a test) becomes its enum member; checkpoints record one name per network.
        for name, kind in ENUM_FIELDS.items():
            object.__setattr__(self, name, kind(getattr(self, name)))
        object.__setattr__(self, "model", networks.canonical_name(self.model))

    @property
    def weak_scaling(self):
        return self.batch_size_per_rank > 0

    def global_batch_size(self, world_size):
        if self.weak_scaling:
            return self.batch_size_per_rank * world_size
        return self.batch_size

    def synthetic_image_shape(self):
        try:
            shape = tuple(int(part) for part in self.synthetic_shape.split(","))
        except ValueError:
            shape = ()
        if len(shape) != 3 or min(shape) < 1:
            raise UsageError(f"--synthetic-shape {self.synthetic_shape!r} is not C,H,W with "
                             "positive integers; use e.g. --synthetic-shape 3,32,32")
        return shape


# The flags by what they are about: --help's sections and a --config file's tables.
GROUPS = {
    "parallel": ("mode", "memory_per_rank", "plan_only", "plan_ranks", "pp", "dp", "microbatches", "schedule",
                 "virtual_stages", "balance", "split", "p2p_memory",
                 "fp16_allreduce", "accumulation_steps", "adasum", "elastic", "elastic_commit_steps", "threads"),
    "data": ("dataset", "data_dir", "val_fraction", "image_size", "channels", "augment", "data_workers",
             "prefetch_batches", "check_images", "decode", "skip_bad_images", "synthetic_shape", "synthetic_samples",
             "num_classes"),
    "model": ("model", "stem", "dropout", "sync_bn", "channels_last", "recompute"),
    "training": ("epochs", "batch_size", "batch_size_per_rank", "steps_per_epoch", "seed"),
    "optimiser": ("optimizer", "lr", "lr_schedule", "warmup_epochs", "momentum", "weight_decay"),
    "precision": ("amp", "loss_scale"),
    "outputs": ("run_dir", "checkpoint_dir", "keep_checkpoints", "resume", "init_from", "metrics_file", "summary_file",
                "tensorboard", "timeline", "timeline_steps", "log_every", "progress", "keep_going_on_save_error"),
    "faults": ("allow_nonfinite", "connect_timeout"),
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
MAX_CONFIG_FILE_BYTES = 1 << 20  # a run's settings take a few kilobytes

_POSITIVE = ("epochs", "batch_size", "batch_size_per_rank", "synthetic_samples", "num_classes",
             "accumulation_steps", "threads", "steps_per_epoch", "keep_checkpoints", "pp", "dp",
             "microbatches", "elastic_commit_steps", "prefetch_batches", "log_every", "timeline_steps",
             "connect_timeout", "plan_ranks")


def _validate_interleaving(config: RunConfig) -> None:
    if config.schedule != "interleaved":
        return
    if config.virtual_stages < 2:
        raise UsageError(f"--schedule interleaved needs --virtual-stages >= 2 (got {config.virtual_stages}); "
                         "with one piece per rank use --schedule 1f1b")
    if config.pp < 2:
        raise UsageError("--schedule interleaved deals model pieces round several ranks; use --pp >= 2")
    if config.microbatches % config.pp:
        raise UsageError(f"--schedule interleaved runs micro-batches in rounds of --pp {config.pp}; "
                         f"use --microbatches a multiple of {config.pp} (got {config.microbatches}), "
                         f"e.g. {2 * config.pp}")


def validate(config: RunConfig) -> RunConfig:
    """Checks that need no data and no other rank, group by group; UsageError naming the fix."""
    _validate_ranges(config)
    for check in GROUP_CHECKS:
        check(config)
    return config


def _validate_ranges(config: RunConfig) -> None:
    """The numbers of every group that must not be negative, or must be at least 1."""
    for name in _POSITIVE:
        if getattr(config, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative (got {getattr(config, name)})")
    for name in ("accumulation_steps", "keep_checkpoints", "num_classes", "synthetic_samples", "microbatches",
                 "elastic_commit_steps"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")


def _validate_training(config: RunConfig) -> None:
    if not config.weak_scaling and config.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")


def _validate_optimiser(config: RunConfig) -> None:
    if not (config.lr > 0):
        raise UsageError(f"--lr must be positive (got {config.lr})")
    if not (0 <= config.momentum < 1):
        raise UsageError(f"--momentum must be in [0, 1) (got {config.momentum})")
    if config.weight_decay < 0:
        raise UsageError("--weight-decay must not be negative")


def _validate_auto(config: RunConfig) -> None:
    if config.mode != Mode.AUTO:
        for flag, value in (("--memory-per-rank", config.memory_per_rank), ("--plan-only", config.plan_only),
                            ("--plan-ranks", config.plan_ranks)):
            if value:
                raise UsageError(f"{flag} is for --mode auto; add --mode auto (or drop it)")
        return
    for flag, value in (("--pp", config.pp), ("--dp", config.dp), ("--microbatches", config.microbatches > 1),
                        ("--split", config.split), ("--elastic", config.elastic)):
        if value:
            raise UsageError(f"--mode auto chooses the layout itself; drop {flag} (or name a --mode)")
    if config.plan_ranks and not config.plan_only:
        raise UsageError("--plan-ranks says how many ranks --plan-only plans for; add --plan-only (or drop it)")
    if config.memory_per_rank:
        parse_size(config.memory_per_rank)


def _validate_parallel(config: RunConfig) -> None:
    _validate_auto(config)
    if config.mode == Mode.AUTO:
        return
    if config.mode == Mode.PS:
        for flag, value in (("--pp", config.pp > 1), ("--dp", config.dp), ("--microbatches", config.microbatches > 1),
                            ("--split", config.split), ("--adasum", config.adasum),
                            ("--fp16-allreduce", config.fp16_allreduce),
                            ("--accumulation-steps", config.accumulation_steps > 1)):
            if value:
                raise UsageError(f"{flag} does not apply to --mode ps (one server, the other ranks "
                                 "workers); drop it")
    elif config.mode != Mode.DATA:
        if config.pp < 1:
            raise UsageError(f"--mode {config.mode} needs --pp K, the number of pipeline stages")
        for flag, value in (("--adasum", config.adasum), ("--fp16-allreduce", config.fp16_allreduce),
                            ("--accumulation-steps", config.accumulation_steps > 1)):
            if value:
                raise UsageError(f"{flag} is for --mode data; pipelines accumulate over --microbatches")
        _validate_interleaving(config)
    elif config.dp or config.microbatches > 1 or config.split:
        raise UsageError("--dp, --microbatches and --split are for --mode model/hybrid; "
                         "add --mode hybrid --pp K (or drop them)")
    if config.mode == Mode.MODEL and config.dp > 1:
        raise UsageError("--dp is for --mode hybrid; --mode model runs one pipeline")
    if config.elastic and config.mode != Mode.DATA:
        raise UsageError("--elastic is for --mode data (a pipeline cannot lose a stage); drop --elastic")
    if config.elastic and config.weak_scaling:
        raise UsageError("--elastic keeps the global batch fixed while workers come and go; use "
                         "--batch-size instead of --batch-size-per-rank")
    if config.elastic and not config.run_dir:
        raise UsageError("--elastic needs --run-dir DIR (or --run-dir none): the default name is the time "
                         "the run started, which a worker joining later cannot know")
    if config.adasum and config.fp16_allreduce:
        raise UsageError("--adasum and --fp16-allreduce cannot be combined; drop one")


def _validate_outputs(config: RunConfig) -> None:
    if config.resume and not config.checkpoint_dir and config.run_dir in ("", NO_RUN_DIR):
        raise UsageError("--resume needs the run to continue: --run-dir DIR (or --checkpoint-dir DIR)")
    if config.init_from and config.resume:
        raise UsageError("--init-from and --resume exclude each other: --resume continues a run "
                         "(weights, optimizer, epoch), --init-from starts a new one from weights")
    if config.init_from and not os.path.exists(config.init_from):
        raise UsageError(f"--init-from: {config.init_from} does not exist; pass a checkpoint directory "
                         "(ckpt-epochNNNN) from a --checkpoint-dir")
    for flag, path in (("--metrics-file", config.metrics_file), ("--summary-file", config.summary_file)):
        parent = os.path.dirname(os.path.abspath(path))
        if path and not os.path.isdir(parent):
            raise UsageError(f"{flag}: directory {parent} does not exist; create it first")


def _validate_data(config: RunConfig) -> None:
    if config.num_classes < 2:
        raise UsageError("--num-classes must be at least 2")
    if config.dataset == DatasetName.CIFAR10 and not config.data_dir:
        raise UsageError("--dataset cifar10 needs --data-dir DIR holding data_batch_1..5 and "
                         "test_batch (the python version from https://www.cs.toronto.edu/~kriz/cifar.html)")
    if config.dataset == DatasetName.SYNTHETIC:
        config.synthetic_image_shape()
    if config.dataset == DatasetName.FOLDER:
        _validate_folder_options(config)
    elif config.decode == "gpu":
        raise UsageError("--decode gpu decodes image files: it is for --dataset folder (drop it)")


def _validate_folder_options(config: RunConfig) -> None:
    if not config.data_dir:
        raise UsageError("--dataset folder needs --data-dir DIR (DIR/<class>/*.jpg, or DIR/train/<class>/* "
                         "with DIR/val/<class>/*)")
    if not 0 < config.val_fraction < 1:
        raise UsageError(f"--val-fraction must be between 0 and 1 (got {config.val_fraction})")
    if config.image_size < 1:
        raise UsageError(f"--image-size must be positive (got {config.image_size})")
    if config.channels not in (0, 1, 3):
        raise UsageError(f"--channels must be 1 (grayscale) or 3 (RGB), or 0 to follow the images "
                         f"(got {config.channels})")
    if config.data_workers < -1:
        raise UsageError(f"--data-workers must be -1 (automatic), 0 or more (got {config.data_workers})")
    if config.prefetch_batches < 1:
        raise UsageError("--prefetch-batches must be at least 1")


def _validate_model(config: RunConfig) -> None:
    if config.sync_bn and config.mode in (Mode.MODEL, Mode.PS):
        raise UsageError(f"--sync-bn synchronises BatchNorm across data-parallel replicas; --mode "
                         f"{config.mode} has none (use --mode data or hybrid, or drop --sync-bn)")
    if config.recompute and config.schedule == Schedule.ZERO_BUBBLE and config.mode in (Mode.MODEL, Mode.HYBRID):
        raise UsageError("--recompute does not combine with --schedule zb (its split backward needs the "
                         "layers' own outputs); use --schedule 1f1b, or drop --recompute")
    if config.dropout is not None and not (0 <= config.dropout < 1):
        raise UsageError(f"--dropout must be in [0, 1) (got {config.dropout}); e.g. --dropout 0.5")


def _validate_precision(config: RunConfig) -> None:
    if config.amp == Amp.FP16 and config.mode not in (Mode.DATA, Mode.AUTO):  # auto: then data mode only
        raise UsageError("--amp fp16 scales the loss of one whole model (--mode data); pipelines and the "
                         "parameter server take --amp bf16, which needs no loss scaling")
    if not config.loss_scale > 0:
        raise UsageError(f"--loss-scale must be positive (got {config.loss_scale})")
    if config.amp == Amp.FP16 and config.adasum:
        raise UsageError("--amp fp16 and --adasum cannot be combined (Adasum needs unscaled gradients); drop one")


# Each group's own checks, in the order they run (after _validate_ranges).
GROUP_CHECKS = (_validate_training, _validate_optimiser, _validate_parallel, _validate_model, _validate_precision,
                _validate_outputs, _validate_data)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line and exit code 2, like every other usage error.
        raise UsageError(f"{message} (see --help)")


def field_types() -> dict[str, type]:
    """Each flag's type, from RunConfig's annotations: bool, int, float, str or one of the
    enums (``bool | None`` as bool)."""
    types = {}
    for name, hint in typing.get_type_hints(RunConfig).items():
        if isinstance(hint, types_module.UnionType):
            hint = next(kind for kind in typing.get_args(hint) if kind is not type(None))
        types[name] = hint
    return types


FIELD_TYPES = field_types()
ENUM_FIELDS = {name: kind for name, kind in FIELD_TYPES.items() if issubclass(kind, enum.Enum)}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Train a CNN data parallel (Horovod), model parallel (pipeline "
                     "over MPI) or hybrid. Launch with horovodrun, mpirun or srun; runs as one process too.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default="",
                        help="read flags from this TOML file (one table per group below, or flat keys; a run "
                             "directory's config.toml repeats its run); flags given here override it")
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for spec in dataclasses.fields(RunConfig):
        flag = "--" + spec.name.replace("_", "-")
        meta = dict(spec.metadata)
        help_text = meta.pop("help")
        flags = (flag, *meta.pop("aliases", ()))
        group, kind = groups[GROUP_OF[spec.name]], FIELD_TYPES[spec.name]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=spec.default, help=help_text)
        else:
            group.add_argument(*flags, dest=spec.name, type=str if spec.name in ENUM_FIELDS else kind,
                               default=spec.default, help=help_text, **meta)
    return parser


def parse_config(argv: list[str] | None = None, prog: str | None = None) -> RunConfig:
    parser = build_parser(prog)
    find_file = argparse.ArgumentParser(add_help=False)  # the file's values become the flags' defaults
    find_file.add_argument("--config", default="")
    config_file = find_file.parse_known_args(argv)[0].config
    if config_file:
        parser.set_defaults(**read_config_file(config_file))
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    return validate(RunConfig(**namespace))


def read_config_file(path: str) -> dict:
    """The values a --config file gives: TOML (a table per group, or flat keys), or a run
    directory's config.json (its "config"); each checked against the field's type. The file
    is the user's: its size is checked before it is read, and nothing in it is executed."""
    try:
        if os.path.getsize(path) > MAX_CONFIG_FILE_BYTES:
            raise UsageError(f"--config {path}: {os.path.getsize(path):,} bytes is not a settings file "
                             f"(at most {MAX_CONFIG_FILE_BYTES:,}); pass the TOML file of the run")
        with open(path, "rb") as handle:
            if path.endswith(".json"):
                loaded = json.load(handle).get("config", {})
            else:
                loaded = tomllib.load(handle)
    except OSError as error:
        raise UsageError(f"--config {path}: cannot read it ({error.strerror}); pass a TOML file") from None
    except (tomllib.TOMLDecodeError, ValueError, AttributeError) as error:
        kind = "JSON with a \"config\" object" if path.endswith(".json") else "TOML"
        raise UsageError(f"--config {path}: not valid {kind} ({error}); fix the file or write it again") from None
    flat = {}
    for key, value in loaded.items():
        if isinstance(value, dict) and key in GROUPS:
            flat.update(value)
        else:
            flat[key] = value
    values = {}
    for key, value in flat.items():
        name = key.replace("-", "_")
        if name not in FIELD_TYPES:
            raise UsageError(f"--config {path}: {key!r} is not a flag of these scripts; see --help")
        values[name] = _checked(path, key, value, FIELD_TYPES[name])
    return values


def _checked(path: str, key: str, value, kind):
    if value is None:  # config.json's record of an unset optional flag
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    choice = issubclass(kind, enum.Enum)
    wanted = str if choice else kind
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        raise UsageError(f"--config {path}: {key} must be {wanted.__name__} (got {value!r})")
    if choice and value not in list(kind):
        raise UsageError(f"--config {path}: {key} must be one of {', '.join(kind)} (got {value!r})")
    return value


def as_toml(config: RunConfig) -> str:
    """``config`` as a --config file: one table per group, every flag's value (an unset
    optional one left out)."""
    lines = ["# Repeat this run: python train_torch/main.py --config config.toml [flags that override it]",
             "# (or train_tf/main.py; under the same launcher and ranks)"]
    for group, names in GROUPS.items():
        lines += ["", f"[{group}]"]
        for name in names:
            value = getattr(config, name)
            if value is None:
                continue
            text = ("true" if value else "false") if isinstance(value, bool) else \
                json.dumps(str(value)) if isinstance(value, str) else repr(value)
            lines.append(f"{name} = {text}")
    return "\n".join(lines) + "\n"
