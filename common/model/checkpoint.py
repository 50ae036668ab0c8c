"""One checkpoint format for both frameworks and every mode, written and read here.

A checkpoint is a directory ``ckpt-epochNNNN[-stepNNNNNN]/`` holding

    shard-000.safetensors ...   tensors in the neutral layout (common/model/weights.py), whole-model
                                names: ``weights/3.conv.kernel``, ``optimizer/3.conv.kernel/exp_avg``
    meta.json                   format, position, architecture, optimizer, config, RNG state
    COMPLETE                    written last: the checkpoint counts only once every shard is in place

Data mode writes one shard; a pipeline writes one per stage, each from the rank
that holds the stage (replica 0), into a shared temporary directory that the
primary renames into place after the last shard: a kill at any moment leaves
the previous checkpoints and either the new complete one or nothing.

Nothing here can run code from a file: safetensors holds raw arrays and a JSON
header, meta.json is JSON, and every tensor's name and shape is checked
against what the run builds before its bytes are read (a crafted header cannot
make us allocate more than the model's own size).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field

import numpy as np

from common.core.errors import UsageError

FORMAT = "cnn-parallel/2"
META, COMPLETE = "meta.json", "COMPLETE"
MAX_META_BYTES = 1 << 20
# ckpt-epoch0003: after 3 epochs; ckpt-epoch0003-step000010: 10 steps into the 4th epoch.
_NAME = re.compile(r"^ckpt-epoch(\d{4,})(?:-step(\d{6,}))?$")
_TEMPORARY_PREFIX = ".tmp-"
WEIGHTS, OPTIMIZER = "weights", "optimizer"
# What each optimizer keeps per parameter (torch.optim's names); "step" is a scalar.
OPTIMIZER_SLOTS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step")}

Position = tuple  # (completed epochs, steps done in the next epoch)


class CheckpointMismatch(UsageError):
    """The checkpoint is sound but does not fit this run: the user's mistake, not a damaged file."""


class ArchitectureMismatch(CheckpointMismatch):
    """It holds another model (or the same for other inputs or classes)."""


class OptimizerMismatch(CheckpointMismatch):
    """It holds another optimizer's state (resuming needs the same --optimizer)."""


@dataclass
class NeutralState:
    """Weights (BatchNorm statistics included) and optimizer state of some layers,
    in the neutral layout: {key: array} and {key: {slot: array}}."""
    weights: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)

    @staticmethod
    def union(states: list) -> NeutralState:
        """One state holding the keys of ``states`` (pieces of one model: no key twice)."""
        union = NeutralState()
        for state in states:
            union.weights.update(state.weights)
            union.optimizer.update(state.optimizer)
        return union

    def shifted(self, offset: int) -> NeutralState:
        """Layer indices moved by ``offset``: a stage's own keys <-> the whole model's."""
        from common.model.weights import shift_keys
        return NeutralState(shift_keys(self.weights, offset), shift_keys(self.optimizer, offset))


# --- names and directories ------------------------------------------------------

def checkpoint_path(directory: str, position: Position) -> str:
    epoch, step = position
    suffix = f"-step{step:06d}" if step else ""
    return os.path.join(directory, f"ckpt-epoch{epoch:04d}{suffix}")


def list_checkpoints(directory: str) -> list:
    """[((epoch, step), path)] of the checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2) or 0)), os.path.join(directory, name)))
    return sorted(found)


def prepare_directory(directory: str, resume: bool) -> None:
    """Create the checkpoint directory and clear what a killed save left; refuse to
    train over existing checkpoints (without --resume a new run would overwrite them)."""
    if resume and not list_checkpoints(directory):
        raise UsageError(f"--resume: no checkpoint (ckpt-epochNNNN[-stepNNNNNN]) in {directory}; "
                         "drop --resume to start fresh or point --checkpoint-dir at the run to continue")
    if not resume and list_checkpoints(directory):
        raise UsageError(f"{directory} already holds checkpoints; pass --resume to continue that run "
                         "or choose an empty --checkpoint-dir")
    try:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):
            if name.startswith(_TEMPORARY_PREFIX + "ckpt-"):
                _remove(os.path.join(directory, name))
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write checkpoints to {directory} ({error.strerror}); "
                         "choose a writable --checkpoint-dir") from None


def temporary_path(path: str) -> str:
    """Where every shard of ``path`` is written before the rename (the same name on every rank)."""
    return os.path.join(os.path.dirname(path), _TEMPORARY_PREFIX + os.path.basename(path))


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


def prune(directory: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in list_checkpoints(directory)[:-keep]:
        _remove(path)


# --- writing ----------------------------------------------------------------------

def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def shard_name(index: int) -> str:
    return f"shard-{index:03d}.safetensors"


def to_tensors(state: NeutralState) -> dict:
    """The flat {name: array} a shard stores."""
    tensors = {f"{WEIGHTS}/{key}": value for key, value in state.weights.items()}
    for key, slots in state.optimizer.items():
        tensors.update({f"{OPTIMIZER}/{key}/{slot}": value for slot, value in slots.items()})
    return {name: np.asarray(value, dtype=np.float32, order="C") for name, value in tensors.items()}  # keeps 0-d


def shard_bytes(state: NeutralState) -> int:
    """About what a shard of ``state`` takes on disk (its float32 tensors; headers are small)."""
    return sum(tensor.nbytes for tensor in to_tensors(state).values())


def free_space(path: str) -> str:
    """'N MB are free in DIR', DIR being the directory ``path`` is (to be) written in."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = 0
    return f"{free / 2**20:.1f} MB are free in {directory}"


def write_shard(temporary: str, index: int, state: NeutralState) -> None:
    """One rank's part of a checkpoint, into the shared temporary directory, a tensor at a
    time: the safetensors header, then each tensor's bytes straight from its array, so a
    save holds nothing beyond the state's copy (safetensors' own save serialises the whole
    shard in memory first, nearly twice the state again). Written by Python, so a full
    disk is an OSError with its errno."""
    tensors = to_tensors(state)
    os.makedirs(temporary, exist_ok=True)
    with open(os.path.join(temporary, shard_name(index)), "wb") as handle:
        handle.write(_safetensors_header(tensors))
        for tensor in tensors.values():
            handle.write(tensor.data)
        handle.flush()
        os.fsync(handle.fileno())


def _safetensors_header(tensors: dict) -> bytes:
    """The safetensors header for float32 ``tensors`` laid out one after another in their
    order: the JSON's length (8 bytes, little-endian), then the JSON, padded with spaces
    to 8 bytes so that the data that follows stays aligned."""
    entries, offset = {}, 0
    for name, tensor in tensors.items():
        entries[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(entries, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    return len(encoded).to_bytes(8, "little") + encoded


def _write_json(path: str, value) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=1, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())


def commit(temporary: str, path: str, meta: dict, before_rename=None) -> None:
    """Primary only, after every shard is written: meta, the COMPLETE marker, then
    the rename that makes the checkpoint visible."""
    missing = [shard_name(i) for i in range(meta["shards"]) if not os.path.isfile(os.path.join(temporary,
                                                                                              shard_name(i)))]
    if missing:
        raise RuntimeError(f"checkpoint {path}: shards {missing} were not written")
    _write_json(os.path.join(temporary, META), meta)
    _write_json(os.path.join(temporary, COMPLETE), {"format": FORMAT})
    _fsync(temporary)
    if before_rename is not None:
        before_rename()
    if os.path.exists(path):  # the same position saved again (e.g. a resumed run stopped at once)
        _remove(path)
    os.replace(temporary, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def abandon(temporary: str) -> None:
    _remove(temporary)


def make_meta(position: Position, architecture: dict, config: dict, shards: int, framework: str,
              layout: dict, rng: dict, loss_scale: dict | None = None, dropout: float = 0.0) -> dict:
    """``loss_scale``: --amp fp16's dynamic scale (common/model/loss_scale.DynamicLossScale.record);
    ``dropout``: the rate the weights were trained with (--dropout, or the model's default)."""
    epoch, step = position
    meta = {"format": FORMAT, "epoch": int(epoch), "step": int(step), "architecture": architecture,
            "optimizer": config["optimizer"], "config": config, "shards": int(shards), "written_by": framework,
            "layout": layout, "rng": rng, "dropout": float(dropout)}
    return {**meta, "loss_scale": loss_scale} if loss_scale else meta


# --- reading ----------------------------------------------------------------------

def architecture(model_name: str, input_shape, num_classes: int, stem: str | None = None) -> dict:
    """What a checkpoint's weights fit; checked before loading them. ``stem`` ('cifar' or
    'imagenet') is recorded for the networks that have one: MobileNetV2's two stems
    hold tensors of the same shapes but compute different things."""
    found = {"model": model_name, "input_shape": list(input_shape), "num_classes": int(num_classes)}
    return {**found, "stem": stem} if stem else found


def _describe(architecture: dict) -> str:
    stem = f" ({architecture['stem']} stem)" if architecture.get("stem") else ""
    return (f"model {architecture.get('model')!r}{stem} for input {tuple(architecture.get('input_shape', ()))} "
            f"with {architecture.get('num_classes')} classes")


def check_architecture(saved: dict, expected: dict, path: str) -> None:
    if saved != expected:
        raise ArchitectureMismatch(
            f"checkpoint {path} holds {_describe(saved)}, but this run builds {_describe(expected)}; "
            "use matching --model/--stem/--dataset flags or another checkpoint")


class _Unusable(Exception):
    """Why a checkpoint cannot be read; becomes one UsageError line naming the file."""


class Checkpoint:
    """A complete checkpoint, opened and checked: meta, marker, shards, and the name
    and shape of every tensor this run needs. Reads tensors by name, any layout."""

    def __init__(self, path: str, expected_architecture: dict, expected_shapes: dict):
        self.path = path
        try:
            self.meta = self._read_meta()
            check_architecture(self.meta["architecture"], expected_architecture, path)
            self._where = self._index_shards()
            self._check_tensors(expected_shapes)
        except UsageError:
            raise
        except Exception as error:  # truncated, corrupt or foreign files
            detail = str(error).splitlines()[0] if str(error) else ""
            reason = detail if isinstance(error, _Unusable) else f"{type(error).__name__}: {detail}"
            raise UsageError(f"cannot load checkpoint {path} ({reason}); move it away to resume from the "
                             "previous one, or start fresh") from None
        self.expected_shapes = expected_shapes  # what this run builds: every key it may ask for

    @property
    def position(self) -> Position:
        return self.meta["epoch"], self.meta["step"]

    def _read_meta(self) -> dict:
        if not os.path.isdir(self.path):
            raise _Unusable(f"not a {FORMAT} checkpoint directory; files of earlier versions (.pt, .tf) are "
                            "not read, since loading them could run code")
        if not os.path.isfile(os.path.join(self.path, COMPLETE)):
            raise _Unusable(f"incomplete: no {COMPLETE} marker, the save did not finish")
        meta_path = os.path.join(self.path, META)
        if os.path.getsize(meta_path) > MAX_META_BYTES:
            raise _Unusable(f"{META} is larger than {MAX_META_BYTES} bytes")
        with open(meta_path, encoding="utf-8") as handle:
            meta = json.load(handle)
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise _Unusable(f"{META} does not describe a {FORMAT} checkpoint")
        for key, kind in (("epoch", int), ("step", int), ("shards", int), ("architecture", dict),
                          ("optimizer", str)):
            if not isinstance(meta.get(key), kind):
                raise _Unusable(f"{META} has no valid {key!r}")
        if not 1 <= meta["shards"] <= 4096:
            raise _Unusable(f"{META} names {meta['shards']} shards")
        return meta

    def _index_shards(self) -> dict:
        """{tensor name: (shard path, shape)} from the shards' headers alone."""
        from safetensors import safe_open

        where = {}
        for index in range(self.meta["shards"]):
            shard = os.path.join(self.path, shard_name(index))
            if not os.path.isfile(shard):
                raise _Unusable(f"{shard_name(index)} is missing")
            with safe_open(shard, framework="numpy") as handle:
                for name in handle.keys():
                    where[name] = (shard, tuple(handle.get_slice(name).get_shape()))
        return where

    def _check_tensors(self, expected_shapes: dict) -> None:
        """Every weight this run needs is there with its shape, and the optimizer state
        there is has the shapes its parameters give it (before a byte of data is read)."""
        slots = OPTIMIZER_SLOTS.get(self.meta["optimizer"], ())
        for key, shape in expected_shapes.items():
            found = self._where.get(f"{WEIGHTS}/{key}")
            if found is None:
                raise _Unusable(f"it has no tensor {key!r}")
            if found[1] != tuple(shape):
                raise _Unusable(f"tensor {key!r} has shape {found[1]}, expected {tuple(shape)}")
            for slot in slots:
                name = f"{OPTIMIZER}/{key}/{slot}"
                expected = () if slot == "step" else tuple(shape)
                if name in self._where and self._where[name][1] != expected:
                    raise _Unusable(f"optimizer tensor {name!r} has shape {self._where[name][1]}, "
                                    f"expected {expected}")

    def _read(self, names) -> dict:
        """{name: array}, opening each shard once."""
        from safetensors import safe_open

        by_shard: dict[int, list[str]] = {}
        for name in names:
            by_shard.setdefault(self._where[name][0], []).append(name)
        arrays = {}
        for shard, group in by_shard.items():
            with safe_open(shard, framework="numpy") as handle:
                arrays.update({name: handle.get_tensor(name) for name in group})
        return arrays

    def check_optimizer(self, optimizer: str) -> None:
        if self.meta["optimizer"] != optimizer:
            raise OptimizerMismatch(f"checkpoint {self.path} holds {self.meta['optimizer']} optimizer state but this "
                                    f"run uses --optimizer {optimizer}; pass --optimizer {self.meta['optimizer']} "
                                    "to resume it, or start a new run from its weights with --init-from")

    def state(self, keys, optimizer: str | None) -> NeutralState:
        """Weights (whole-model keys) and, if ``optimizer`` is given, that optimizer's state
        for ``keys``; refuses another optimizer's state. Shapes were checked on opening."""
        keys = list(keys)
        slot_names = {}
        if optimizer:
            self.check_optimizer(optimizer)
            slot_names = {(key, slot): f"{OPTIMIZER}/{key}/{slot}" for key in keys
                          for slot in OPTIMIZER_SLOTS[optimizer]
                          if f"{OPTIMIZER}/{key}/{slot}" in self._where}  # plain SGD keeps nothing
        read = self._read([f"{WEIGHTS}/{key}" for key in keys] + list(slot_names.values()))
        slots: dict[str, dict[str, np.ndarray]] = {}
        for (key, slot), name in slot_names.items():
            slots.setdefault(key, {})[slot] = read[name]
        return NeutralState({key: read[f"{WEIGHTS}/{key}"] for key in keys}, slots)


# --- RNG state as plain numbers -----------------------------------------------------

def rng_state() -> dict:
    """numpy's and Python's global generators (the frameworks' draw nothing in training:
    weights and data order come from the seed)."""
    import random

    _, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"numpy": {"keys": [int(k) for k in keys], "pos": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def restore_rng(state: dict) -> None:
    import random

    try:
        numpy_state, python_state = state["numpy"], state["python"]
        np.random.set_state(("MT19937", np.array(numpy_state["keys"], dtype=np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss"]))
    except (KeyError, TypeError, ValueError):
        pass  # a checkpoint without usable RNG state: training draws nothing from these generators
