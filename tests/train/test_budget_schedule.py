"""`--max-minutes` without `--steps`: the learning rate follows the elapsed fraction of the time budget
(warmup, then decay to zero when the clock runs out), checked against a fake clock; with `--steps` the
minutes stay a safety cap."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastformer.train.schedules import TimeBudget, budget_lr_factor
from fastformer.train.trainer import TrainConfig, Trainer

SECONDS_PER_STEP = 3.0


def test_budget_lr_factor():
    assert budget_lr_factor(0.0, warmup=0.1) == 0.0
    assert budget_lr_factor(0.05, warmup=0.1) == pytest.approx(0.5)
    assert budget_lr_factor(0.1, warmup=0.1) == pytest.approx(1.0)
    assert budget_lr_factor(0.55, warmup=0.1) == pytest.approx(0.5)
    assert budget_lr_factor(1.0, warmup=0.1) == 0.0
    assert budget_lr_factor(7.0, warmup=0.1) == 0.0  # past the budget: still zero
    assert budget_lr_factor(0.55, warmup=0.1, kind="cosine") == pytest.approx(0.5)
    assert budget_lr_factor(0.9, warmup=0.1, kind="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        budget_lr_factor(0.5, kind="exp")
    with pytest.raises(ValueError, match="budget"):
        TimeBudget(0.0)


def _trainer(out, clock_now, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    w = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))

    def batch_fn(step, micro):
        clock_now[0] += SECONDS_PER_STEP  # every step "takes" 3 s of the fake clock
        g = torch.Generator().manual_seed(step)
        x = torch.randn(8, 6, generator=g)
        return {"x": x, "y": (x @ w).argmax(-1)}

    def step_fn(m, b, train):
        return F.cross_entropy(m(b["x"]), b["y"], reduction="sum"), b["y"].numel(), {}

    kw.setdefault("progress", False)
    cfg = TrainConfig(out_dir=str(out), lr=1e-2, log_every=1, optimizer="adamw", **kw)
    return Trainer(model, cfg, batch_fn=batch_fn, step_fn=step_fn, tokens_fn=lambda b: 8, clock=lambda: clock_now[0])


def _lrs(out):
    return [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_time_budget_spreads_warmup_and_decay_over_the_minutes(tmp_path):
    now = [0.0]
    res = _trainer(tmp_path / "a", now, steps=None, max_minutes=1.0).train()
    n = round(60 / SECONDS_PER_STEP)
    assert res.step == n and not res.stopped_early  # ran until the clock said the minute was over
    want = [1e-2 * budget_lr_factor(k * SECONDS_PER_STEP / 60) for k in range(1, n + 1)]
    assert _lrs(tmp_path / "a") == pytest.approx(want)
    assert want[0] > 0 and max(want) == pytest.approx(1e-2, rel=0.1) and want[-1] == 0.0  # decay finished

    # interrupted after 8 steps and resumed in a "new process" (a clock restarting at 0): the budget
    # continues where it stopped, so the learning rates are those of the uninterrupted run
    now = [0.0]
    first = _trainer(tmp_path / "b", now, steps=None, max_minutes=1.0, stop_at=8).train()
    assert first.step == 8 and first.stopped_early
    now = [0.0]
    _trainer(tmp_path / "b", now, steps=None, max_minutes=1.0, resume=True).train()
    assert _lrs(tmp_path / "b") == pytest.approx(want)


def test_with_steps_the_minutes_are_a_safety_cap(tmp_path):
    now = [0.0]
    res = _trainer(tmp_path, now, steps=100, max_minutes=1.0).train()
    assert res.step == 20 and res.stopped_early
    lrs = _lrs(tmp_path)
    assert lrs[-1] > 0.5e-2  # the step schedule had barely begun to decay


def test_budget_flags_are_checked(tmp_path):
    with pytest.raises(ValueError, match="--steps is required"):
        TrainConfig(steps=None).validate()
    with pytest.raises(ValueError, match="--warmup-steps needs --steps"):
        TrainConfig(steps=None, max_minutes=5, warmup_steps=10).validate()


def test_budget_progress_bar_counts_steps_without_a_doubled_colon(tmp_path, capsys):
    """With no step count, tqdm's default format for an open total reads "desc: : 20it"; the budget
    bar names the steps instead."""
    now = [0.0]
    _trainer(tmp_path, now, steps=None, max_minutes=1.0, progress=True).train()
    bar = capsys.readouterr().err.replace("\r", "\n")
    assert "(1 min budget): 20 steps [" in bar
    assert ": :" not in bar and "it/s" not in bar
