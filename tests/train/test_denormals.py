"""Denormal floats on CPU: `flush_denormals` (train/resources.py, csrc/cpu_env.cpp) turns on
flush-to-zero / denormals-are-zero on the calling thread *and* the intra-op worker threads (which
torch.set_flush_denormal does not reach), the Trainer holds it for the whole training run, and the
previous mode comes back afterwards. Checked by what the threads compute, not by timing: with the
mode on, a denormal times 1 is 0 on every thread."""

import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastformer as ff
from fastformer import _extension
from fastformer.train.resources import flush_denormals
from fastformer.train.trainer import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="flush-to-zero is an x86 (MXCSR) mode here"
)
DENORMAL = 1e-40  # below torch.finfo(torch.float32).tiny = 1.2e-38
N = 1 << 20  # large enough for torch and the extension to split the work over their threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _zero_fraction(x: torch.Tensor) -> float:
    return (x == 0).float().mean().item()


def test_every_thread_flushes_inside_and_the_mode_comes_back(two_threads):
    if not _extension.has_op("set_denormal_mode_all"):
        pytest.skip(f"extension not built here ({_extension._state['error']})")
    x = torch.full((N,), DENORMAL)
    assert _zero_fraction(x * 1.0) == 0.0  # off: denormals survive
    with flush_denormals() as on:
        assert on
        assert _zero_fraction(x * 1.0) == 1.0  # torch's pool: both threads' halves
        # the extension's own OpenMP loop: AdamW's decay of denormal weights with a zero gradient
        assert _zero_fraction(_adamw_decayed()) == 1.0
    assert _zero_fraction(x * 1.0) == 0.0  # restored on every thread
    assert _zero_fraction(_adamw_decayed()) == 0.0


def _adamw_decayed() -> torch.Tensor:
    """Weights of DENORMAL after one FusedAdamW step with a zero gradient: (1 - lr·wd) · DENORMAL."""
    p = nn.Parameter(torch.full((N,), DENORMAL))
    p.grad = torch.zeros(N)
    ff.optim.FusedAdamW([p], lr=1e-3, weight_decay=0.1).step()
    return p.detach()


def test_the_previous_mode_comes_back_after_an_error(two_threads):
    from fastformer.train.resources import _flushes_here

    try:
        torch.set_flush_denormal(True)  # the user's own setting (the calling thread)
        with pytest.raises(RuntimeError, match="inside"), flush_denormals():
            raise RuntimeError("inside")
        assert _flushes_here()  # still on after the block
    finally:
        torch.set_flush_denormal(False)
        with flush_denormals():  # and back to off on every thread for the other tests
            pass
    assert not _flushes_here() and _zero_fraction(torch.full((N,), DENORMAL) * 1.0) == 0.0


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("FASTFORMER_FLUSH_DENORMAL", "0")
    x = torch.full((N,), DENORMAL)
    with flush_denormals() as on:
        assert not on and _zero_fraction(x * 1.0) == 0.0
    with flush_denormals(enabled=False) as on:
        assert not on


def test_cpu_training_runs_with_the_mode_on(tmp_path, two_threads):
    seen = []
    x_denormal = torch.full((N,), DENORMAL)
    torch.manual_seed(0)
    model = nn.Linear(4, 3)

    def batch_fn(step, micro):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(8, 4, generator=g), "y": torch.randint(0, 3, (8,), generator=g)}

    def step_fn(m, b, train):
        seen.append(_zero_fraction(x_denormal * 1.0))
        return F.cross_entropy(m(b["x"]), b["y"], reduction="sum"), 8, {}

    cfg = TrainConfig(out_dir=str(tmp_path / "run"), steps=3, lr=1e-2, progress=False, device="cpu")
    Trainer(model, cfg, batch_fn=batch_fn, step_fn=step_fn, tokens_fn=lambda b: 8).train()
    full = 1.0 if _extension.has_op("set_denormal_mode_all") else 0.5  # fallback: the calling thread only
    assert len(seen) == 3 and all(s >= full for s in seen), seen
    assert _zero_fraction(x_denormal * 1.0) == 0.0  # off again after training
