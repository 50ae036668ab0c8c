"""Checkpoint files: naming, atomic saves, keep-last-N, and finding the newest.

A checkpoint is written under a temporary name and renamed into place, so a
kill at any moment leaves either the previous set or the new complete file,
never a half-written one under a checkpoint name. The framework folders
decide what goes inside (torch.save, tf.train.Checkpoint).
"""

import os
import re
import shutil

from common.errors import UsageError

# ckpt-epoch0003.pt: after 3 epochs; ckpt-epoch0003-step000010.pt: 10 steps into the
# 4th epoch (written when a stop signal arrived mid-epoch).
_NAME = re.compile(r"^ckpt-epoch(\d{4,})(?:-step(\d{6,}))?\.(\w+)$")


def checkpoint_path(directory, position, extension):
    """``position`` is (completed epochs, steps done in the next epoch)."""
    epoch, step = position
    suffix = f"-step{step:06d}" if step else ""
    return os.path.join(directory, f"ckpt-epoch{epoch:04d}{suffix}.{extension}")


def list_checkpoints(directory, extension):
    """[((epoch, step), path)] of complete checkpoints in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        match = _NAME.match(name)
        if match and match.group(3) == extension:
            found.append(((int(match.group(1)), int(match.group(2) or 0)), os.path.join(directory, name)))
    return sorted(found)


def prepare_directory(directory, extension, resume):
    """Create the checkpoint directory; refuse to train over existing checkpoints.

    Without --resume, a new run would overwrite the epochs already saved there.
    """
    if resume and not list_checkpoints(directory, extension):
        raise UsageError(f"--resume: no checkpoint (ckpt-epochNNNN[-stepNNNNNN].{extension}) in {directory}; "
                         "drop --resume to start fresh or point --checkpoint-dir at the run to continue")
    if not resume and list_checkpoints(directory, extension):
        raise UsageError(f"{directory} already holds checkpoints; pass --resume to continue that run "
                         "or choose an empty --checkpoint-dir")
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as error:
        raise UsageError(f"cannot write checkpoints to {directory} ({error.strerror}); "
                         "choose a writable --checkpoint-dir") from None


def _fsync_directory(directory):
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_save(path, write, before_rename=None):
    """Call ``write(temporary_path)``, then rename the result to ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".tmp-{os.getpid()}-{os.path.basename(path)}")
    try:
        write(temporary)
        if before_rename is not None:
            before_rename()
        if os.path.isfile(temporary):
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(directory)
    finally:
        if os.path.isdir(temporary):
            shutil.rmtree(temporary, ignore_errors=True)
        elif os.path.exists(temporary):
            os.remove(temporary)


def prune(directory, extension, keep):
    """Delete all but the newest ``keep`` checkpoints."""
    for _, path in list_checkpoints(directory, extension)[:-keep]:
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def architecture(model_name, input_shape, num_classes):
    """What a checkpoint's weights fit; checked before loading them."""
    return {"model": model_name, "input_shape": list(input_shape), "num_classes": int(num_classes)}


def check_architecture(saved, expected, path):
    if saved != expected:
        raise UsageError(f"checkpoint {path} holds model {saved.get('model')!r} for input "
                         f"{tuple(saved.get('input_shape', ()))} with {saved.get('num_classes')} classes, "
                         f"but this run builds {expected['model']!r} for input "
                         f"{tuple(expected['input_shape'])} with {expected['num_classes']} classes; "
                         "use matching --model/--dataset flags or another checkpoint")
