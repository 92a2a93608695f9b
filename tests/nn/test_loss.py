"""ff.nn.CrossEntropyLoss / LinearCrossEntropyLoss: same numbers as the functional ops and torch's module."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_loss_matches_torch_module(backend, reduction):
    N, V = 77, 1000
    w = torch.rand(V) + 0.5
    mod = ff.nn.CrossEntropyLoss(weight=w, ignore_index=3, reduction=reduction, label_smoothing=0.1)
    tmod = torch.nn.CrossEntropyLoss(weight=w.double(), ignore_index=3, reduction=reduction, label_smoothing=0.1)
    x = torch.randn(N, V, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::6] = 3
    out = mod(x, t)
    x64 = x.detach().double().requires_grad_(True)
    exp = tmod(x64, t)
    assert_close(out, exp, torch.float32, "loss")
    g = torch.randn_like(exp)
    assert_close(torch.autograd.grad(out, x, g.float())[0], torch.autograd.grad(exp, x64, g)[0], torch.float32, "grad")


def test_cross_entropy_loss_z_loss_and_buffer():
    w = torch.rand(10)
    mod = ff.nn.CrossEntropyLoss(weight=w, z_loss=1e-2)
    assert "weight" in dict(mod.named_buffers())
    assert mod.to(torch.float64).weight.dtype == torch.float64  # follows .to like torch's buffer
    x = torch.randn(5, 10, dtype=torch.float64)
    t = torch.randint(0, 10, (5,))
    exp = F.cross_entropy(x, t, mod.weight) + 1e-2 * torch.logsumexp(x, -1).pow(2).mean()
    assert_close(mod(x, t), exp, torch.float64)
    assert "z_loss=0.01" in repr(mod)


def test_cross_entropy_loss_rejects_bad_reduction():
    with pytest.raises(ValueError, match="reduction"):
        ff.nn.CrossEntropyLoss(reduction="avg")(torch.randn(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("impl", ["reference", "auto", "triton"])
def test_linear_cross_entropy_loss(impl):
    N, H, V = 40, 16, 300
    head = torch.nn.Linear(H, V)
    mod = ff.nn.LinearCrossEntropyLoss(ignore_index=-100, label_smoothing=0.05, chunk_size=8)
    x = torch.randn(N, H, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::3] = -100
    with ff.use_backend(impl):
        out = mod(x, head.weight, t, head.bias)
    exp = F.cross_entropy(head(x), t, label_smoothing=0.05)
    assert_close(out, exp, torch.float32, "loss", factor=10)
    got = torch.autograd.grad(out, (x, head.weight, head.bias))
    ref = torch.autograd.grad(exp, (x, head.weight, head.bias))
    for name, a, e in zip("xWb", got, ref):
        assert_close(a, e, torch.float32, f"grad {name}", factor=10)


def test_cross_entropy_loss_is_torchs_module_with_torchs_constructor():
    """Positional arguments mean what they mean for torch (size_average in second place), the legacy
    size_average/reduce map to `reduction` as in torch, and isinstance/attributes carry over."""
    w = torch.rand(5) + 0.5
    ours = ff.nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)
    theirs = torch.nn.CrossEntropyLoss(w, None, 2, None, "sum", 0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert (ours.ignore_index, ours.reduction, ours.label_smoothing) == (2, "sum", 0.1)
    x, t = torch.randn(7, 5), torch.tensor([0, 2, 4, 1, 2, 3, 0])
    assert_close(ours(x, t), theirs(x, t), torch.float32)
    with pytest.warns(UserWarning):
        legacy = ff.nn.CrossEntropyLoss(size_average=False)
    assert legacy.reduction == "sum"
    assert list(dict(ours.named_buffers())) == list(dict(theirs.named_buffers())) == ["weight"]
