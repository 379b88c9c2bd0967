"""Checkpoints: atomic writes (temporary file, fsync, rename) and safe loading
(torch.load(weights_only=True): a checkpoint can hold tensors and plain containers, never
code)."""
import os
import tempfile

import torch


def save_atomic(obj, path):
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(text, path):
    """Write text to a temporary file, then rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, phrased for the user."""
    pass


def load_safe(path, map_location="cpu"):
    """torch.load of a checkpoint, raising CheckpointError with the path when it cannot be read."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # pickle payloads are refused by the weights-only unpickler
        raise CheckpointError(f"{path}: refused to load (not a plain weights checkpoint: "
                              f"{str(err).splitlines()[0]})") from None
