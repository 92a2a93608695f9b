"""CPU micro-benchmarks (pytest-benchmark), run by `make bench` as `pytest bench --benchmark-only`.

Eager providers only: on CPU ff.cross_entropy is the reference path and ff.linear_cross_entropy the
chunked torch path (the Triton interpreter is never timed). Nothing here asserts a speed.
"""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fastformer as ff

N, V, H = 256, 8192, 128


@pytest.fixture
def logits():
    torch.manual_seed(0)
    return torch.randn(N, V, requires_grad=True), torch.randint(0, V, (N,))


@pytest.mark.parametrize("provider", ["fastformer", "torch"])
def test_cross_entropy_fwd_bwd(benchmark, logits, provider):
    x, t = logits
    f = (
        (lambda: ff.cross_entropy(x, t, label_smoothing=0.1))
        if provider == "fastformer"
        else (lambda: F.cross_entropy(x, t, label_smoothing=0.1))
    )
    with ff.use_backend("auto"):
        benchmark(lambda: torch.autograd.grad(f(), x))


@pytest.mark.parametrize("provider", ["fastformer", "unfused"])
def test_linear_cross_entropy_fwd_bwd(benchmark, provider):
    torch.manual_seed(0)
    x = torch.randn(N, H, requires_grad=True)
    W = (torch.randn(V, H) / H**0.5).requires_grad_(True)
    t = torch.randint(0, V, (N,))
    t[::2] = -100  # a sparse MLM-like head: half the rows ignored
    f = (
        (lambda: ff.linear_cross_entropy(x, W, t))
        if provider == "fastformer"
        else (lambda: F.cross_entropy(F.linear(x, W), t))
    )
    with ff.use_backend("auto"):
        benchmark(lambda: torch.autograd.grad(f(), (x, W)))
