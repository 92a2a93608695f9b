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
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total=total, warmup=warmup, kind=kind))


# -- time-budgeted schedule -----------------------------------------------------------------------
# With a time budget and no step count (`--max-minutes M` without `--steps`) the number of steps is
# unknown in advance, so a step-based schedule cannot end its decay when the clock runs out. Instead
# the learning rate is a function of the elapsed *fraction of the budget* (Cramming's budgeted
# schedule): warmup over the first `warmup` of the time, then decay to zero at the end of the budget.

BUDGET_WARMUP = 0.06  # fraction of the time budget spent warming up


def budget_lr_factor(fraction: float, *, warmup: float = BUDGET_WARMUP, kind: str = "linear") -> float:
    """Multiplier of the peak LR when `fraction` (0..1) of the time budget has elapsed."""
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup must be a fraction in [0, 1), got {warmup}")
    fraction = min(max(fraction, 0.0), 1.0)
    if warmup > 0 and fraction < warmup:
        return fraction / warmup
    if kind == "constant":
        return 1.0
    progress = (fraction - warmup) / (1.0 - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class TimeBudget:
    """The clock of a time-budgeted run: `elapsed` seconds of `seconds`, and the LR multiplier now.

    The trainer sets `elapsed` (wall time of training so far, kept in the checkpoint so that a
    resumed run continues the same budget) before each optimizer step, so the step's learning rate
    follows the time actually spent."""

    def __init__(self, seconds: float, *, warmup: float = BUDGET_WARMUP, kind: str = "linear"):
        if not seconds > 0:
            raise ValueError(f"time budget must be positive, got {seconds} s")
        budget_lr_factor(0.0, warmup=warmup, kind=kind)  # validate now
        self.seconds, self.warmup, self.kind = float(seconds), warmup, kind
        self.elapsed = 0.0

    @property
    def fraction(self) -> float:
        return min(1.0, self.elapsed / self.seconds)

    @property
    def exhausted(self) -> bool:
        return self.elapsed >= self.seconds

    def factor(self) -> float:
        return budget_lr_factor(self.fraction, warmup=self.warmup, kind=self.kind)


def make_budget_scheduler(optimizer: torch.optim.Optimizer, budget: TimeBudget):
    """A LambdaLR whose multiplier is the budget's current factor (whatever the step count): it
    checkpoints like the step-based one, and `lr = base_lr * budget.factor()` at any time."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _step: budget.factor())
