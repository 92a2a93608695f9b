"""ff.cross_entropy in every form torch's takes: K-dimensional input (class dim strided or not),
class-probability targets with weights and label smoothing, the unbatched (C,) form; out-of-range
class indices; ff.linear_cross_entropy with probability targets. Both backends, float64 torch oracle."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff
from fastformer.ops.errors import TargetIndexError

RED = ["mean", "sum", "none"]


def _compare(x, t, dtype, weight=None, z=0.0, **kw):
    """ff vs torch (float64) for the loss and the gradient of x (and of a soft target's oracle)."""
    red = kw.get("reduction", "mean")
    xa = x.detach().to(dtype).requires_grad_(True)
    w = weight.to(dtype) if weight is not None else None
    out = ff.cross_entropy(xa, t, w, z_loss=z, **kw)
    x64 = x.detach().double().requires_grad_(True)
    t64 = t.double() if t.is_floating_point() else t
    want = F.cross_entropy(x64, t64, weight.double() if weight is not None else None, **kw)
    if z:
        lse = torch.logsumexp(x64, dim=1 if x64.dim() > 1 else 0)
        valid = torch.ones_like(lse) if t.is_floating_point() else (t != kw.get("ignore_index", -100)).double()
        zrow = z * lse.pow(2) * valid
        want = want + {"none": zrow, "sum": zrow.sum(), "mean": zrow.sum() / valid.sum()}[red]
    assert out.shape == want.shape
    g = torch.randn_like(want)
    (gx,) = torch.autograd.grad(out, xa, g.to(out.dtype))
    (gw,) = torch.autograd.grad(want, x64, g)
    assert_close(out, want, dtype, "loss")
    assert_close(gx, gw, dtype, "grad input")
    return out


@pytest.mark.parametrize("layout", ["contiguous", "class_last_in_memory", "non_mergeable"])
@pytest.mark.parametrize("reduction", RED)
def test_k_dimensional_class_indices(backend, layout, reduction):
    N, C, d1, d2 = 2, 37, 3, 5
    if layout == "contiguous":  # class dim strided in memory (stride d1*d2)
        x = torch.randn(N, C, d1, d2)
    elif layout == "class_last_in_memory":  # (N, d1, d2, C) logits permuted: unit class stride, no copy
        x = torch.randn(N, d1, d2, C).permute(0, 3, 1, 2)
    else:  # spatial dims that do not merge: one copy
        x = torch.randn(N, C, d2, d1).transpose(2, 3)
    t = torch.randint(0, C, (N, d1, d2))
    t[0, 1] = -100
    w = torch.rand(C) + 0.5
    _compare(x, t, torch.float32, weight=w, reduction=reduction, label_smoothing=0.1, z=1e-3)
    _compare(x, t.masked_fill(t == -100, 3), torch.float32, reduction=reduction, ignore_index=3)


@pytest.mark.parametrize("shape", [(6, 11), (3, 11, 4), (2, 11, 3, 2)])
@pytest.mark.parametrize("reduction", RED)
def test_probability_targets(backend, shape, reduction):
    x = torch.randn(*shape) * 3
    p = torch.softmax(torch.randn(*shape), dim=1)
    w = torch.rand(shape[1]) + 0.5
    _compare(x, p, torch.float32, reduction=reduction)
    _compare(x, p, torch.float32, weight=w, reduction=reduction, label_smoothing=0.2, z=1e-3)
    _compare(x, p, torch.float16, weight=w, reduction=reduction, label_smoothing=0.2)


def test_probability_targets_long_rows_and_promotion(backend):
    x = torch.randn(5, 1500)  # several blocks per row in the interpreter
    p = torch.softmax(torch.randn(5, 1500), 1)
    _compare(x, p, torch.float32, label_smoothing=0.05)
    out = ff.cross_entropy(x.half(), p)  # torch promotes: fp16 logits, fp32 target -> fp32 loss
    assert out.dtype == F.cross_entropy(x.half(), p).dtype == torch.float32
    p = p.requires_grad_(True)  # a target that requires grad gets torch's gradient
    (gp,) = torch.autograd.grad(ff.cross_entropy(x, p), p)
    (want,) = torch.autograd.grad(F.cross_entropy(x, p), p)
    assert_close(gp, want, torch.float32, "grad target")


@pytest.mark.parametrize("reduction", RED)
def test_unbatched(backend, reduction):
    x = torch.randn(9)
    _compare(x, torch.tensor(4), torch.float32, reduction=reduction, label_smoothing=0.1, weight=torch.rand(9) + 0.5)
    _compare(x, torch.softmax(torch.randn(9), 0), torch.float32, reduction=reduction)


def test_out_of_range_targets_raise_like_torch_on_cpu(backend):
    x = torch.randn(4, 5)
    for bad in (5, -3):
        t = torch.tensor([0, 1, bad, 2])
        with pytest.raises(IndexError):
            F.cross_entropy(x, t)
        with pytest.raises(IndexError, match="out of bounds"):  # what torch raises: caught the same way
            ff.cross_entropy(x, t)
        with pytest.raises(ValueError):
            ff.cross_entropy(x, t)
        with pytest.raises(TargetIndexError):
            ff.linear_cross_entropy(torch.randn(4, 3), torch.randn(5, 3), t)
    ff.cross_entropy(x, torch.tensor([0, 1, 7, 2]), ignore_index=7)  # ignore_index may lie outside [0, C)


def test_kernel_marks_an_out_of_range_row_nan():
    """The kernel itself (what runs on CUDA without the debug switch): the bad row's loss and gradient
    are NaN, the others are right, nothing is read out of bounds."""
    from fastformer.kernels import cross_entropy_launch as K

    x = torch.randn(3, 10)
    t = torch.tensor([1, 10, -5])
    grad = torch.empty_like(x)
    loss, _ = K.ce_forward(x, t, grad=grad)
    assert torch.isnan(loss[1:]).all() and torch.isnan(grad[1:]).all()
    assert_close(loss[0], F.cross_entropy(x[:1].double(), t[:1], reduction="sum"), torch.float32)


def test_debug_switch_checks_before_launch(monkeypatch):
    import importlib

    CE = importlib.import_module("fastformer.ops.cross_entropy")
    calls = []
    real = CE._check_range
    monkeypatch.setattr(CE, "_check_range", lambda *a: (calls.append(1), real(*a))[1])
    ff.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]))
    assert calls == [1]  # CPU tensors: always checked
    off_cpu = torch.zeros(3, dtype=torch.long, device="meta")  # stands for a CUDA tensor: no sync by default
    assert not CE._range_check_wanted(off_cpu)
    ff.ops.set_target_checks(True)
    try:
        assert CE._range_check_wanted(off_cpu)
    finally:
        ff.ops.set_target_checks(False)


@pytest.mark.parametrize("impl", ["reference", "auto", "triton"])
@pytest.mark.parametrize("reduction", RED)
def test_linear_cross_entropy_probability_targets(impl, reduction):
    N, H, V = 37, 16, 50
    x, W, b = torch.randn(N, H), torch.randn(V, H) / 4, torch.randn(V)
    p = torch.softmax(torch.randn(N, V), 1)
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    with ff.use_backend(impl):
        out = ff.linear_cross_entropy(
            leaves[0], leaves[1], p, leaves[2], reduction=reduction, label_smoothing=0.1, chunk_size=16
        )
    leaves64 = [a.double().requires_grad_(True) for a in (x, W, b)]
    want = F.cross_entropy(
        F.linear(leaves64[0], leaves64[1], leaves64[2]), p.double(), reduction=reduction, label_smoothing=0.1
    )
    assert_close(out, want, torch.float32, "loss")
    g = torch.randn_like(want)
    for name, a, e in zip("xWb", torch.autograd.grad(out, leaves, g.float()), torch.autograd.grad(want, leaves64, g)):
        assert_close(a, e, torch.float32, "grad " + name)


@pytest.mark.parametrize(
    "call,exc",
    [
        (lambda x, t: ff.cross_entropy(x, t.long()), RuntimeError),  # same shape: must be probabilities
        (lambda x, t: ff.cross_entropy(x, t, ignore_index=1), RuntimeError),  # no ignore_index with probabilities
        (lambda x, t: ff.cross_entropy(x, t[:, 0]), RuntimeError),  # float class indices
        (lambda x, t: ff.cross_entropy(x, torch.tensor([0, 1, 2])), ValueError),  # batch size mismatch
        (lambda x, t: ff.cross_entropy(x, torch.tensor([0, 1]), torch.ones(2)), RuntimeError),
        (lambda x, t: ff.cross_entropy(x, torch.tensor([0, 1]), torch.ones(3).double()), RuntimeError),
        (lambda x, t: ff.cross_entropy(x, torch.tensor([0, 1]), label_smoothing=1.5), RuntimeError),
        (
            lambda x, t: ff.cross_entropy(x[..., None].expand(2, 3, 5), torch.zeros(2, 4, dtype=torch.long)),
            RuntimeError,
        ),
        (lambda x, t: ff.cross_entropy(x, torch.tensor([0, 1]), ignore_index=1.0), TypeError),
        (lambda x, t: ff.cross_entropy(x[0, 0], torch.tensor(0)), RuntimeError),  # 0-d input
    ],
)
def test_errors_are_torchs_types_and_value_errors(backend, call, exc):
    x = torch.randn(2, 3)
    t = torch.softmax(torch.randn(2, 3), 1)
    with pytest.raises(exc) as info:
        call(x, t)
    assert isinstance(info.value, ValueError)
