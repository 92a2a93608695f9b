"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the old one.

A crash, an exception or a second Ctrl-C during the write leaves the previous checkpoint untouched and
loadable. A failed write (disk full, read-only folder, a file size limit) raises the OSError itself,
with its errno, not the RuntimeError torch's zip writer wraps it in.

Checkpoints hold only tensors, numbers, strings and containers of those (numpy's random state is
stored as a tensor), so they load with torch's default `torch.load(path, weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
from pathlib import Path

import numpy as np
import torch

from fastformer.models.loading import CHECKPOINT_NAME, RunFolderError, load_state_file
from fastformer.models.presets import canonical_preset

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "save_checkpoint", "load_checkpoint", "rng_state", "set_rng_state"]


class CheckpointError(ValueError):
    """A missing, unreadable or mismatched checkpoint."""


class _RecordingWriter:
    """File wrapper that remembers the OSError of a failed write: torch's zip writer turns it into a
    RuntimeError ("PytorchStreamWriter failed writing file ..."), which says nothing about the cause."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        try:
            return self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


@contextlib.contextmanager
def replaced_atomically(path: str | Path):
    """`with replaced_atomically(path) as tmp:` write tmp (beside path); when the block ends without an
    error, tmp is renamed over path (atomic on POSIX: a reader, a crash or another rank sees the old
    file or the new one, never half of one). tmp never stays behind, and an OSError that names no
    file or names tmp is given path's name, the file the user knows."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp)):
            e.filename = str(path)
        raise
    finally:
        tmp.unlink(missing_ok=True)


def save_checkpoint(state: dict, path: str | Path) -> None:
    with replaced_atomically(path) as tmp, open(tmp, "wb") as f:
        w = _RecordingWriter(f)
        try:
            torch.save(state, w)
        except RuntimeError as e:
            cause = w.error or (e.__context__ if isinstance(e.__context__, OSError) else None)
            if cause is not None:
                raise cause from None
            raise
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: str | Path) -> dict:
    """The checkpoint's dict, its fingerprint in today's preset names (see `current_fingerprint`)."""
    try:
        state = load_state_file(path)
    except RunFolderError as e:
        raise CheckpointError(str(e)) from None
    if isinstance(state.get("fingerprint"), dict):
        state["fingerprint"] = current_fingerprint(state["fingerprint"])
    return state


def checkpoint_step(path: str | Path) -> int:
    """The step a checkpoint was written at, read without loading its tensors (memory-mapped); an
    older format that cannot be mapped is loaded in full."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_checkpoint says what is wrong with the file
        state = load_checkpoint(path)
    return int(state.get("step", 0))


# the preset a fine-tuning `source` names: "random init (NAME)", "init DIR (NAME, objective)"
_SOURCE_PRESET = re.compile(r"\((?P<name>[^(),\s]+)(?P<rest>(, [^()]*)?)\)$")


def current_fingerprint(fp: dict) -> dict:
    """A checkpoint's fingerprint with a deprecated preset name (a run recorded as 't5-small') replaced by
    its current one, so `--resume` compares it with this run's, which always records the current name."""
    fp = dict(fp)
    if isinstance(fp.get("model"), str):
        fp["model"] = canonical_preset(fp["model"], warn=False)
    if isinstance(fp.get("source"), str):
        fp["source"] = _SOURCE_PRESET.sub(
            lambda m: f"({canonical_preset(m['name'], warn=False)}{m['rest']})", fp["source"]
        )
    return fp


def rng_state(device: torch.device | str | None = None) -> dict:
    """Every random generator the run draws from, as tensors and plain Python values. device: the
    CUDA device the run trains on, whose generator (dropout) is also kept as "cuda_device"."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
        # the current device's generator: under torchrun (set_device) the rank's own; the trainer saves
        # this whole dict for every rank, and each rank restores its own
        state["cuda_current"] = torch.cuda.get_rng_state()
        if device is not None and torch.device(device).type == "cuda":
            # the training device's own generator, by role rather than by index: a run that trained on
            # cuda:1 and resumes on cuda:0 (another machine, CUDA_VISIBLE_DEVICES) continues its stream
            state["cuda_device"] = torch.cuda.get_rng_state(torch.device(device))
    return state


def set_rng_state(state: dict, device: torch.device | str | None = None) -> None:
    """Restore what rng_state saved; device: the CUDA device this run trains on, which gets the saved
    training device's generator ("cuda_device") whatever its index."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    np.random.set_state(n)  # older checkpoints: numpy's own tuple
    if not torch.cuda.is_available():
        return
    if "cuda" in state:
        # only the devices this machine has: a checkpoint from a machine with more GPUs (or resumed under
        # a narrower CUDA_VISIBLE_DEVICES) would make set_rng_state_all index past the last one (IndexError)
        for index, gen_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(gen_state, index)
        if "cuda_current" in state:  # absent in older checkpoints
            torch.cuda.set_rng_state(state["cuda_current"])
    if device is not None and torch.device(device).type == "cuda" and "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"], torch.device(device))
