"""The compiled CPU cross-entropy rows (csrc/cross_entropy_cpu.cpp) against their torch-math twin in
float64: losses, gradients, column sums, every option, awkward vocabulary sizes, -inf logits."""

import importlib

import pytest
import torch

lce = importlib.import_module("fastformer.ops.linear_cross_entropy")

pytestmark = pytest.mark.skipif(
    not lce._cpp_rows_usable(torch.zeros(1, 1), torch.zeros(1, dtype=torch.int64), None, None, None),
    reason="the compiled extension is not built",
)


def _twin(logits, target, bias, scale, eps, z, want_grad, gscale, dtype=torch.float64, ignore_index=-100):
    """The torch math (in float64 the compiled kernel never takes it; in float32 the caller disables
    the kernel)."""
    x = logits.to(dtype).clone()
    colsum = torch.zeros(x.shape[1], dtype=dtype) if want_grad else None
    loss = lce._ce_rows_torch_(
        x,
        target,
        scale,
        eps,
        z,
        want_grad,
        None if gscale is None else gscale.to(dtype),
        ignore_index,
        colsum=colsum,
        bias=None if bias is None else bias.to(dtype),
    )
    return loss, x, colsum


def _rel(a, ref):
    """Relative error; the denominator has a floor of 1e-6 per element (losses are O(1), gradients
    O(scale)): with one class the exact loss and gradient are 0 and fp32 leaves ~1e-9."""
    return ((a.double() - ref).norm() / (ref.norm() + 1e-6 * ref.numel() ** 0.5)).item()


@pytest.mark.parametrize("V", [1, 7, 8, 9, 1000, 30522])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
@pytest.mark.parametrize("want_grad", [True, False])
def test_rows_are_as_accurate_as_the_torch_math_in_fp32(V, eps, z, want_grad, monkeypatch):
    g = torch.Generator().manual_seed(V)
    c = 13
    logits = torch.randn(c, V, generator=g) * 4
    target = torch.randint(0, V, (c,), generator=g)
    target[2] = -100  # ignored: zero loss and zero gradient
    bias = torch.randn(V, generator=g) if V % 2 else None
    gscale = torch.rand(c, generator=g) if want_grad else None
    ref = _twin(logits, target, bias, 0.25, eps, z, want_grad, gscale)
    x = logits.clone()
    cols = torch.zeros(V) if want_grad else None
    loss = torch.ops.fastformer.ce_rows_cpu(x, target, bias, 0.25, eps, z, -100, want_grad, gscale, cols)
    monkeypatch.setitem(lce._CPP_ROWS, "ok", False)
    t32 = _twin(logits, target, bias, 0.25, eps, z, want_grad, gscale, dtype=torch.float32)
    assert loss.dtype == torch.float32 and loss[2] == 0
    got = (loss, x, cols) if want_grad else (loss,)
    for name, a, r, b in zip(("loss", "grad", "colsum"), got, ref, t32):
        # no worse than torch's own fp32 math (3x its error, or 1e-6 relative)
        assert _rel(a, r) <= max(3 * _rel(b, r), 1e-6), name
    if want_grad:
        assert x[2].abs().max() == 0


def test_rows_with_minus_inf_logits_and_the_dispatch():
    logits = torch.randn(4, 37)
    logits[:, 5:9] = float("-inf")  # masked classes: probability 0, gradient 0
    target = torch.tensor([0, 10, 36, 4])
    ref_loss, ref_grad, _ = _twin(logits, target, None, 1.0, 0.0, 0.0, True, None)
    x = logits.clone()
    rows = lce._ce_rows_torch_(x, target, 1.0, 0.0, 0.0, True)  # fp32: the compiled kernel
    assert _rel(rows, ref_loss) < 1e-6 and _rel(x, ref_grad) < 2e-6
    assert (x[:, 5:9] == 0).all()


def test_rows_refuse_bad_input():
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.fastformer.ce_rows_cpu(
            torch.zeros(2, 5), torch.tensor([0, 5]), None, 1.0, 0.0, 0.0, -100, True, None, None
        )
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.fastformer.ce_rows_cpu(
            torch.zeros(2, 5, dtype=torch.float64), torch.tensor([0, 1]), None, 1.0, 0.0, 0.0, -100, True, None, None
        )


def test_linear_cross_entropy_is_the_same_with_and_without_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g, requires_grad=True)
    W = torch.randn(1001, 24, generator=g, requires_grad=True)
    b = torch.randn(1001, generator=g, requires_grad=True)
    t = torch.randint(0, 1001, (300,), generator=g)
    t[::7] = -100
    out = []
    for ok in (None, False):
        monkeypatch.setitem(lce._CPP_ROWS, "ok", ok)
        loss = lce.linear_cross_entropy(x, W, t, bias=b, label_smoothing=0.1)
        out.append((loss, *torch.autograd.grad(loss, (x, W, b))))
    for a, ref in zip(out[0], out[1]):
        assert _rel(a, ref.double()) < 3e-6
