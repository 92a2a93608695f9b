"""A backward through a retained graph, more than once, as torch's cross-entropy allows.

cross_entropy's kernel path and linear_cross_entropy make their gradients in forward and scale them
in backward (fastformer/ops/forward_grads.py). Compared with torch in float64 over three backwards
with different grad_outputs; "auto" on CPU is the reference for cross_entropy (checked all the same)
and the chunked path for linear_cross_entropy; "triton" runs the kernels in the interpreter. The
inputs are computed from leaves (as logits and hidden states are), except where a test says so.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff

BACKENDS = ["auto", "triton"]
SCALES = [1.0, 3.0, 0.5]


def _weighted(out, w):
    """A scalar from the loss: out itself, or a weighted sum of per-row losses (a per-row grad_output)."""
    return out if w is None else (out * w).sum()


def _backward_three_times(loss, w):
    for k, s in enumerate(SCALES):
        (_weighted(loss, w) * s).backward(retain_graph=k < len(SCALES) - 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(9, 13), (3, 13, 5)])
def test_cross_entropy_three_backwards(backend, reduction, shape):
    x = torch.randn(shape)
    t = torch.randint(0, 13, (shape[0], *shape[2:]))
    t.view(-1)[1] = -100
    w = torch.rand(t.shape, dtype=torch.float64) + 0.5 if reduction == "none" else None
    leaf = x.clone().requires_grad_(True)
    with ff.use_backend(backend):
        _backward_three_times(ff.cross_entropy(leaf * 1.0, t, reduction=reduction), None if w is None else w.float())
    leaf64 = x.double().requires_grad_(True)
    _backward_three_times(F.cross_entropy(leaf64, t, reduction=reduction), w)
    assert_close(leaf.grad, leaf64.grad, torch.float32, "accumulated gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_cross_entropy_three_backwards(backend, reduction):
    x, W, b = torch.randn(11, 8), torch.randn(17, 8), torch.randn(17)
    t = torch.randint(0, 17, (11,))
    t[3] = -100
    w = torch.rand(11, dtype=torch.float64) + 0.5 if reduction == "none" else None
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    with ff.use_backend(backend):
        x_, W_, b_ = (a * 1.0 for a in leaves)
        loss = ff.linear_cross_entropy(x_, W_, t, b_, reduction=reduction, chunk_size=4)
        _backward_three_times(loss, None if w is None else w.float())
    leaves64 = [a.double().requires_grad_(True) for a in (x, W, b)]
    _backward_three_times(F.cross_entropy(F.linear(leaves64[0], leaves64[1], leaves64[2]), t, reduction=reduction), w)
    for name, a, ref in zip("xWb", leaves, leaves64):
        assert_close(a.grad, ref.grad, torch.float32, f"accumulated gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_leaf_inputs_twice_then_right_or_refused(backend):
    """With leaf inputs autograd may make the first backward's gradient the leaf's .grad itself and
    accumulate the second into it: two backwards are right, a third is right or refused with the
    reason, never silently wrong."""
    x, W = torch.randn(6, 8), torch.randn(10, 8)
    t = torch.randint(0, 10, (6,))
    leaves = [a.clone().requires_grad_(True) for a in (x, W)]
    leaves64 = [a.double().requires_grad_(True) for a in (x, W)]
    with ff.use_backend(backend):
        loss = ff.linear_cross_entropy(*leaves, t)
    ref = F.cross_entropy(F.linear(*leaves64), t)
    loss.backward(retain_graph=True)
    (2 * loss).backward(retain_graph=True)
    ref.backward(retain_graph=True)
    (2 * ref).backward(retain_graph=True)
    for a, r in zip(leaves, leaves64):
        assert_close(a.grad, r.grad, torch.float32, "two backwards")
    try:
        loss.backward()
    except RuntimeError as err:
        assert "leaf input's .grad, which was then accumulated into" in str(err)
    else:
        ref.backward()
        for a, r in zip(leaves, leaves64):
            assert_close(a.grad, r.grad, torch.float32, "three backwards")


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_grad_then_backward(backend):
    """GradNorm's pattern: torch.autograd.grad with retain_graph, then backward. The gradient the first
    call returned is not changed by the second."""
    x, W = torch.randn(6, 8, requires_grad=True), torch.randn(10, 8, requires_grad=True)
    t = torch.randint(0, 10, (6,))
    with ff.use_backend(backend):
        for loss in (ff.linear_cross_entropy(x, W, t), ff.cross_entropy(x @ W.T, t)):
            x.grad = W.grad = None
            gx, gW = torch.autograd.grad(loss * 2, (x, W), retain_graph=True)
            first = (gx.clone(), gW.clone())
            loss.backward()
            xr, Wr = x.detach().double().requires_grad_(True), W.detach().double().requires_grad_(True)
            F.cross_entropy(xr @ Wr.T, t).backward()
            assert torch.equal(gx, first[0]) and torch.equal(gW, first[1])
            assert_close(gx, 2 * xr.grad, torch.float32, "autograd.grad of 2·loss")
            assert_close(x.grad, xr.grad, torch.float32, "x.grad")
            assert_close(W.grad, Wr.grad, torch.float32, "W.grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_without_retain_is_torchs_error(backend):
    x, W = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    with ff.use_backend(backend):
        loss = ff.linear_cross_entropy(x, W, torch.randint(0, 5, (4,)))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_refused_cases_say_why():
    """The two cases the in-place first backward cannot serve again: a zero first grad_output, and
    the saved gradient changed in place after the first backward returned it."""
    x, W = torch.randn(4, 8, requires_grad=True), torch.randn(5, 8, requires_grad=True)
    t = torch.randint(0, 5, (4,))
    loss = ff.linear_cross_entropy(x, W, t)
    (loss * 0).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="grad_output had zero or non-finite entries"):
        loss.backward()
    x.grad = W.grad = None
    loss = ff.linear_cross_entropy(x, W, t)
    loss.backward(retain_graph=True)
    loss.grad_fn.saved_tensors[0].zero_()  # what a leaf's .grad that is this very tensor may go through
    with pytest.raises(RuntimeError, match="accumulated into .* or changed in place"):
        loss.backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_saved_tensor_hooks(backend):
    """Under saved-tensor hooks an unpack can be a fresh copy of what forward saved (not the tensor the
    first backward scaled): later backwards still get the right gradients."""
    x, W = torch.randn(7, 8), torch.randn(13, 8)
    t = torch.randint(0, 13, (7,))
    leaves = [a.clone().requires_grad_(True) for a in (x, W)]
    # pack and unpack copy (as save_on_cpu does on a GPU): every unpack is a fresh tensor
    with ff.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(torch.clone, torch.clone):
        loss = ff.linear_cross_entropy(*leaves, t) + ff.cross_entropy(leaves[0] @ leaves[1].T, t)
    for k, s in enumerate(SCALES):
        (loss * s).backward(retain_graph=k < len(SCALES) - 1)
    leaves64 = [a.double().requires_grad_(True) for a in (x, W)]
    ref = 2 * F.cross_entropy(leaves64[0] @ leaves64[1].T, t)
    for k, s in enumerate(SCALES):
        (ref * s).backward(retain_graph=k < len(SCALES) - 1)
    for name, a, r in zip("xW", leaves, leaves64):
        assert_close(a.grad, r.grad, torch.float32, f"accumulated gradient of {name}")
