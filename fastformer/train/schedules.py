"""Learning-rate schedules: linear warmup, then linear or cosine decay to zero (or constant)."""
from __future__ import annotations

import math

import torch

SCHEDULES = ("linear", "cosine", "constant")


def lr_factor(step: int, *, total: int, warmup: int, kind: str = "linear") -> float:
    """Multiplier of the peak LR after `step` optimizer steps (LambdaLR convention: step 0 = first)."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, *, total: int, warmup: int, kind: str = "linear"):
    """A LambdaLR (its state_dict holds the step, so it checkpoints with the optimizer)."""
    lr_factor(0, total=total, warmup=warmup, kind=kind)  # validate `kind` now
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, kind=kind))
