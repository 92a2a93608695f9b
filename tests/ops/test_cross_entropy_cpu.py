"""ff.cross_entropy's CPU row-kernel path (backend "auto", float32 CPU logits, class-index targets):
against torch in float64, with a spy proving the kernel ran; and which calls keep the reference."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff
from fastformer.ops import cross_entropy_cpu

pytestmark = pytest.mark.skipif(
    not cross_entropy_cpu.has_op("ce_rows_cpu"), reason="the fastformer._C extension is not built"
)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the row kernel's calls."""
    calls = []
    real = cross_entropy_cpu.cross_entropy_rows

    def spy(*args, **kw):
        calls.append(args[0].shape)
        return real(*args, **kw)

    monkeypatch.setattr(cross_entropy_cpu, "cross_entropy_rows", spy)
    return calls


def _oracle(x, t, ignore_index=-100, reduction="mean", eps=0.0, z=0.0):
    """torch's cross_entropy in float64 plus the z-loss term; "mean" of no rows is 0 (fastformer's rule)."""
    x64 = x.to(torch.float64)
    out = F.cross_entropy(x64, t.long(), ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    valid = (t != ignore_index).to(torch.float64)
    if z:
        zrow = z * torch.logsumexp(x64, 1).pow(2) * valid
        out = out + {"none": zrow, "sum": zrow.sum(), "mean": zrow.sum() / valid.sum().clamp_min(1)}[reduction]
    if reduction == "mean" and valid.sum() == 0:
        out = out.nan_to_num(0.0) * 0
    return out


def _check(x, t, reduction="mean", **kw):
    g = torch.randn(t.shape, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    a = x.detach().clone().requires_grad_(True)
    loss = ff.cross_entropy(
        a, t, None, kw.get("ignore_index", -100), reduction, kw.get("eps", 0.0), z_loss=kw.get("z", 0.0)
    )
    (gx,) = torch.autograd.grad(loss, a, g.to(torch.float32))
    b = x.detach().to(torch.float64).requires_grad_(True)
    want = _oracle(b, t, reduction=reduction, **kw)
    (wgx,) = torch.autograd.grad(want, b, g)
    assert loss.dtype == torch.float32 and loss.shape == want.shape and gx.shape == x.shape
    assert_close(loss, want, torch.float32, "loss")
    assert_close(gx, wgx, torch.float32, "grad input")


@pytest.mark.parametrize("N,V", [(1, 1), (1, 10), (77, 1000), (130, 7), (3, 32003)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-3)])
def test_rows_vs_torch(kernel_calls, N, V, reduction, eps, z):
    x = torch.randn(N, V) * 3
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    _check(x, t, reduction, eps=eps, z=z)
    assert kernel_calls


def test_unbatched_k_dim_and_strided_inputs(kernel_calls):
    x = torch.randn(11) * 2
    _check(x, torch.tensor(4), "none")
    x = torch.randn(3, 9, 5, 4)  # (N, C, d1, d2)
    t = torch.randint(0, 9, (3, 5, 4), dtype=torch.int32)
    t[0, 1] = -100
    for reduction in ("mean", "sum", "none"):
        _check(x, t, reduction, eps=0.05)
    wide = torch.randn(40, 70)
    _check(wide[:, ::2], torch.randint(0, 35, (40,)), "mean")  # a non-contiguous (N, C) view
    _check(torch.randn(70, 40).t(), torch.randint(0, 70, (40,)), "sum")  # class dim strided
    assert len(kernel_calls) == 6


def test_every_target_ignored_gives_zero_and_custom_ignore_index(kernel_calls):
    x = torch.randn(6, 5, requires_grad=True)
    loss = ff.cross_entropy(x, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0.0 and x.grad.abs().sum() == 0
    _check(torch.randn(20, 5), torch.randint(0, 5, (20,)), "mean", ignore_index=3, eps=0.2)
    assert len(kernel_calls) == 2


def test_extreme_logits_match_torch(kernel_calls):
    """Large logits are shifted by the row maximum before the loss is formed: a row of -1e4 used to lose
    2e-5 of its loss to rounding in lse - x_t (the kernel's rows are also linear_cross_entropy's)."""
    x = torch.randn(8, 50) * 3
    x[0, 3] = 80.0  # exp would overflow without the max shift
    x[1] = -1e4
    x[2, :10] = float("-inf")  # masked classes, the target among the live ones
    x[3] = 3e4 + torch.randn(50)
    t = torch.randint(10, 50, (8,))
    _check(x, t, "none", z=1e-6)
    _check(x[[0, 1, 3]], t[:3], "mean", eps=0.1)
    # label smoothing over a masked class is infinite, as in torch
    loss = ff.cross_entropy(x[2:3], t[2:3], reduction="none", label_smoothing=0.1)
    assert loss.isinf().all()
    assert len(kernel_calls) == 3


def test_no_grad_leaves_the_input_and_a_retained_graph_backs_up_twice(kernel_calls):
    x = torch.randn(30, 17)
    before = x.clone()
    t = torch.randint(0, 17, (30,))
    with torch.no_grad():
        loss = ff.cross_entropy(x.requires_grad_(), t, reduction="sum")
    assert torch.equal(x.detach(), before) and not loss.requires_grad
    loss = ff.cross_entropy(x, t, reduction="none")
    g1 = torch.randn(30)
    (a,) = torch.autograd.grad(loss, x, g1, retain_graph=True)
    (b,) = torch.autograd.grad(loss, x, 2 * g1)
    assert_close(b, 2 * a, torch.float32, "second backward")
    with pytest.raises(RuntimeError, match="ff.cross_entropy"):
        torch.autograd.grad(ff.cross_entropy(x, t), x, create_graph=True)


def test_out_of_range_targets_are_refused_before_the_kernel(kernel_calls):
    with pytest.raises(IndexError, match="out of bounds"):
        ff.cross_entropy(torch.randn(4, 5), torch.tensor([0, 1, 5, 2]))
    assert not kernel_calls


@pytest.mark.parametrize(
    "case",
    ["float64", "bfloat16", "weight", "probabilities", "reference backend", "no extension", "autocast"],
)
def test_other_calls_keep_the_reference(kernel_calls, monkeypatch, case):
    x, t, w = torch.randn(5, 7), torch.randint(0, 7, (5,)), None
    backend = "auto"
    if case == "float64":
        x = x.double()
    elif case == "bfloat16":
        x = x.bfloat16()
    elif case == "weight":
        w = torch.rand(7)
    elif case == "probabilities":
        t = torch.softmax(torch.randn(5, 7), 1)
    elif case == "reference backend":
        backend = "reference"
    elif case == "no extension":
        monkeypatch.setattr(cross_entropy_cpu, "has_op", lambda name: False)
    with ff.use_backend(backend), torch.autocast("cpu", enabled=case == "autocast"):
        loss = ff.cross_entropy(x, t, w)
    assert torch.isfinite(loss) and not kernel_calls
