"""ff.optim.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ (norm value and clipped gradients)."""

import math

import pytest
import torch
from conftest import assert_close

import fastformer as ff

SHAPES = [(), (7,), (33, 65), (129,), (3, 1000)]


def params_with_grads(dtype=torch.float32, device="cpu", seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for s in SHAPES:
        p = torch.zeros(s, dtype=dtype, device=device, requires_grad=True)
        p.grad = (scale * torch.randn(s, generator=gen)).to(device=device, dtype=dtype)
        out.append(p)
    return out


def twin(params):
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_(True)
        q.grad = p.grad.clone()
        out.append(q)
    return out


@pytest.mark.parametrize("norm_type", [2.0, math.inf, "inf"])
@pytest.mark.parametrize("max_norm", [0.5, 1e6], ids=["clips", "no-clip"])
def test_matches_torch(norm_type, max_norm):
    ours = params_with_grads(seed=1)
    ref = twin(ours)
    n1 = ff.optim.clip_grad_norm_(ours, max_norm, norm_type=float(norm_type))
    n2 = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type=float(norm_type))
    assert n1.dtype == n2.dtype and n1.shape == n2.shape
    assert_close(n1, n2, torch.float32, "total norm")
    for p, q in zip(ours, ref):
        assert_close(p.grad, q.grad, torch.float32, "clipped grad")
    if max_norm > 1e5:  # nothing to clip: gradients untouched
        for p, q in zip(ours, ref):
            assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_grads(dtype):
    ours = params_with_grads(dtype, seed=2)
    ref = twin(ours)
    n1 = ff.optim.clip_grad_norm_(ours, 1.0)
    n2 = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert n1.dtype == n2.dtype == dtype
    assert_close(n1, n2, dtype, "total norm")
    for p, q in zip(ours, ref):
        assert_close(p.grad, q.grad, dtype, "clipped grad")


def test_other_norm_types_and_single_tensor_follow_torch():
    ours = params_with_grads(seed=3)
    ref = twin(ours)
    assert_close(
        ff.optim.clip_grad_norm_(ours, 0.3, norm_type=1.0),
        torch.nn.utils.clip_grad_norm_(ref, 0.3, norm_type=1.0),
        torch.float32,
        "1-norm",
    )
    assert_close(
        ff.optim.clip_grad_norm_(ours[2], 0.1),
        torch.nn.utils.clip_grad_norm_(ref[2], 0.1),
        torch.float32,
        "single tensor",
    )
    assert float(ff.optim.clip_grad_norm_([torch.zeros(3, requires_grad=True)], 1.0)) == 0.0  # no grads


def test_nonfinite():
    ours = params_with_grads(seed=4)
    ours[1].grad[3] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        ff.optim.clip_grad_norm_(ours, 1.0, error_if_nonfinite=True)
    assert torch.isnan(ff.optim.clip_grad_norm_(ours, 1.0))
    inf_case = params_with_grads(seed=4)
    inf_case[4].grad[2, 999] = float("nan")  # NaN propagates through the max as in torch
    assert torch.isnan(ff.optim.clip_grad_norm_(inf_case, 1.0, norm_type=math.inf))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_cuda_matches_torch(dtype, norm_type):
    ours = params_with_grads(dtype, device="cuda", seed=5)
    ref = twin(ours)
    n1 = ff.optim.clip_grad_norm_(ours, 0.5, norm_type)
    n2 = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)
    assert_close(n1, n2, dtype, "total norm")
    for p, q in zip(ours, ref):
        assert_close(p.grad, q.grad, dtype, "clipped grad")


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph")  # the cycle is broken below
def test_norm_after_create_graph_is_a_plain_tensor():
    """After backward(create_graph=True) the gradients carry a graph; torch's clip returns a norm
    without one (it runs under no_grad), ff's fused norm carried a grad_fn."""
    ours = [torch.randn(s, requires_grad=True) for s in ((5, 3), (7,))]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]
    for ps in (ours, ref):
        sum((p**3).sum() for p in ps).backward(create_graph=True)
    n1 = ff.optim.clip_grad_norm_(ours, 0.5)
    n2 = torch.nn.utils.clip_grad_norm_(ref, 0.5)
    assert n1.grad_fn is None and not n1.requires_grad and n2.grad_fn is None
    assert_close(n1, n2, torch.float32, "total norm")
    for p, q in zip(ours, ref):
        assert_close(p.grad, q.grad, torch.float32, "clipped grad")
    for p in ours + ref:
        p.grad = None


def test_fp16_norm_beyond_fp16_range_is_inf_as_torch():
    """The norm was checked and applied in fp32, then returned cast to fp16 (inf): error_if_nonfinite
    passed a norm it returned as inf, and the gradients were scaled by the finite fp32 norm where
    torch scales them by the infinite one (to zero)."""
    ours, ref = (torch.nn.Parameter(torch.zeros(100, dtype=torch.float16)) for _ in range(2))
    for p in (ours, ref):
        p.grad = torch.full((100,), 1e4, dtype=torch.float16)  # norm 1e5 > 65,504
    want = torch.nn.utils.clip_grad_norm_([ref], 1.0)
    got = ff.optim.clip_grad_norm_([ours], 1.0)
    assert got.dtype == want.dtype == torch.float16
    assert torch.isinf(got) and torch.isinf(want)
    assert torch.equal(ours.grad, ref.grad)
    for fn in (torch.nn.utils.clip_grad_norm_, ff.optim.clip_grad_norm_):
        ours.grad = torch.full((100,), 1e4, dtype=torch.float16)
        with pytest.raises(RuntimeError, match="non-finite"):
            fn([ours], 1.0, error_if_nonfinite=True)


def test_clipping_bumps_the_grads_version_as_torch():
    """The fused scaling writes through raw pointers: autograd must still see that the gradients
    changed (a graph from backward(create_graph=True) may have saved them)."""
    for fn in (torch.nn.utils.clip_grad_norm_, ff.optim.clip_grad_norm_):
        p = torch.nn.Parameter(torch.zeros(4))
        p.grad = torch.full((4,), 10.0)
        v = p.grad._version
        fn([p], 1.0)
        assert p.grad._version > v, fn
