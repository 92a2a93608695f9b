"""Edge cases of the functional ops that code dropping them into a real model reaches: compiling them
with dynamic shapes, as torch.compile does by itself once a batch or sequence length changes."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fastformer as ff


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy", "t5_attention"])
def test_fullgraph_dynamic_compile_with_default_float_arguments(op):
    """The argument checks ran math.isfinite on z_loss (default 0.0) and T5's scale (default 1.0);
    with dynamic=True Dynamo cannot trace that on a float default and graph-broke, so fullgraph=True
    raised for a call that passes no float at all."""
    torch.manual_seed(0)
    if op == "cross_entropy":
        x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
        got = _compiled(lambda a, b: ff.cross_entropy(a, b))(x, t)
        want = F.cross_entropy(x, t)
    elif op == "linear_cross_entropy":
        h, w, t = torch.randn(6, 4), torch.randn(5, 4), torch.randint(0, 5, (6,))
        got = _compiled(lambda a, b, c: ff.linear_cross_entropy(a, b, c))(h, w, t)
        want = F.cross_entropy(F.linear(h, w), t)
    else:
        q, table = torch.randn(1, 2, 4, 8), torch.randn(32, 2)
        got = _compiled(lambda a, b: ff.t5_attention(a, a, a, b))(q, table)
        want = ff.t5_attention(q, q, q, table)
    torch.testing.assert_close(got, want)


def test_non_finite_scalars_still_refused():
    """The comparison form of the finiteness check still refuses NaN and infinities."""
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    q = torch.randn(1, 1, 2, 4)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="z_loss"):
            ff.cross_entropy(x, t, z_loss=bad)
        with pytest.raises(ValueError, match="scale"):
            ff.scaled_dot_product_attention(q, q, q, scale=bad)


@pytest.mark.parametrize("low", [torch.finfo(torch.float32).min, torch.finfo(torch.bfloat16).min, -2.4e38])
def test_finfo_min_float_mask_rows_average_as_in_torch(low):
    """Hugging Face builds float masks with torch.finfo(dtype).min. The kernels add the mask in log2
    units, where such a value overflowed to -inf: a row with every key at finfo.min came out as zeros
    on the kernel path, where torch averages the values uniformly. A true -inf row still gives zeros.
    The gradients are the average's (float64 math)."""
    torch.manual_seed(0)
    B, H, Lq, Lk, D = 2, 2, 9, 13, 16
    q = torch.randn(B, H, Lq, D, requires_grad=True)
    k, v = (torch.randn(B, H, Lk, D, requires_grad=True) for _ in range(2))
    mask = torch.zeros(B, 1, Lq, Lk)
    mask[0, :, 2, :] = low  # every key at finfo.min: uniform average in torch
    mask[1, :, :, 5:] = low  # a padding-style mask: the usual case, unaffected
    mask[1, :, 4, :] = float("-inf")  # a truly fully-masked row: zeros (documented)
    with ff.use_backend("triton"):
        out = ff.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    # torch's math path: its default pick here, the fused CPU kernel (float64 too), recomputes P from one
    # log-sum-exp and gives the finfo.min row's gradients Lk times too large (docs/attention.md)
    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    live = torch.ones(B, 1, Lq, 1, dtype=torch.bool)
    live[1, :, 4] = False
    assert out[1, :, 4].abs().max() == 0
    torch.testing.assert_close(out.double().where(live, 0), want.where(live, 0), atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out).where(live, 0)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = torch.autograd.grad(want, (q, k, v), grad_out.double())
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_a_nan_in_a_float_mask_stays_nan_on_the_kernel_path():
    """The clamp of very negative mask values used a maximum that returns the other operand for NaN, so a
    NaN mask entry silently masked its key on the kernel path, where torch and the reference give NaN."""
    torch.manual_seed(0)
    q = torch.randn(1, 1, 3, 16)
    mask = torch.zeros(1, 1, 3, 3)
    mask[0, 0, 1, 2] = float("nan")
    with ff.use_backend("triton"):
        out = ff.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    want = F.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    assert torch.isnan(want[0, 0, 1]).all() and torch.isnan(out[0, 0, 1]).all()
    torch.testing.assert_close(out[0, 0, [0, 2]], want[0, 0, [0, 2]])
