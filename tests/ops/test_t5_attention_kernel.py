"""ff.t5_attention: in-kernel T5 relative-position bias vs a float64 reference built with Hugging Face's
own bucket function; gradients of q, k, v and the bias table; deterministic table gradient."""
import pytest
import torch

import fastformer as ff
from conftest import assert_close
from fastformer.ops.attention import capture_dropout_masks
from fastformer.ops.t5_attention import bucket_lut
from fastformer.reference.attention import sdpa_reference
from fastformer.reference.t5_attention import relative_position_bucket

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


def _hf_reference(q, k, v, table, *, bidirectional, num_buckets, max_distance, attn_mask=None, is_causal=False,
                  scale=1.0, dropout_mask=None, dropout_p=0.0):
    """float64 reference whose bias comes from HF's static bucket method."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    rel = torch.arange(Lk, device=q.device)[None, :] - torch.arange(Lq, device=q.device)[:, None]
    bucket = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                                   max_distance=max_distance)
    bias = table[bucket].permute(2, 0, 1).unsqueeze(0)
    return sdpa_reference(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale, bias=bias,
                          dropout_p=dropout_p, dropout_mask=dropout_mask)


def _run(q, k, v, table, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with ff.use_backend("triton"):
        out = ff.t5_attention(*leaves[:3], leaves[3], **kw)
    return out, leaves


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 20)])
def test_bucket_function_matches_hf(bidirectional, num_buckets, max_distance):
    rel = torch.arange(-700, 700)[:, None] + torch.zeros(1, 3, dtype=torch.long)
    ours = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    hf = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=num_buckets,
                                               max_distance=max_distance)
    assert torch.equal(ours, hf)
    # the kernel's lookup table agrees with HF on every distance it covers, and beyond (clamped)
    lut = bucket_lut(bidirectional, num_buckets, max_distance, "cpu").long()
    d = torch.arange(0, 700)
    half = num_buckets // 2 if bidirectional else 0
    assert torch.equal(lut[d.clamp(max=lut.numel() - 1)], hf[700 - d, 0])
    if bidirectional:
        assert torch.equal(half + lut[d[1:].clamp(max=lut.numel() - 1)], hf[700 + d[1:], 0])


@pytest.mark.parametrize("bidirectional,causal,B,H,Lq,Lk,D", [
    (True, False, 2, 2, 17, 17, 16),
    (True, False, 1, 2, 130, 130, 80),
    (False, True, 1, 2, 130, 130, 16),
    (True, False, 2, 1, 17, 130, 16),    # cross lengths
    (True, False, 1, 1, 300, 300, 16),   # distances past max_distance
])
def test_t5_forward_backward(bidirectional, causal, B, H, Lq, Lk, D, device):
    nb, md = 32, 128
    q, k, v = (torch.randn(B, H, L, D, device=device) for L in (Lq, Lk, Lk))
    table = torch.randn(nb, H, device=device)
    out, leaves = _run(q, k, v, table, bidirectional=bidirectional, num_buckets=nb, max_distance=md,
                       is_causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_padding_and_deterministic_table_grad(device):
    B, H, L, D, nb, md = 2, 2, 77, 16, 16, 40
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    table = torch.randn(nb, H, device=device)
    mask = (torch.arange(L)[None, :] < torch.tensor([77, 31])[:, None]).to(device)[:, None, None, :]
    dout = torch.randn(B, H, L, D, device=device)
    runs = []
    for _ in range(2):
        out, leaves = _run(q, k, v, table, num_buckets=nb, max_distance=md, attn_mask=mask)
        runs.append(torch.autograd.grad(out, leaves, dout))
    assert torch.equal(runs[0][3], runs[1][3])
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=True, num_buckets=nb, max_distance=md, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), runs[0], ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_dropout_and_scale(device):
    B, H, L, D, p = 1, 2, 33, 16, 0.2
    q, k, v = (torch.randn(B, H, L, D, device=device) for _ in range(3))
    table = torch.randn(32, H, device=device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.t5_attention(*leaves, is_causal=True, bidirectional=False, scale=0.5, dropout_p=p)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=False, num_buckets=32, max_distance=128, is_causal=True,
                        scale=0.5, dropout_p=p, dropout_mask=masks[0])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), grads, ref_grads):
        assert_close(g, rg, torch.float32, name)


def test_t5_cpu_auto_reference_matches_hf():
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=torch.float64) for _ in range(3))
    table = torch.randn(32, 2, dtype=torch.float64)
    mask = torch.ones(2, 1, 1, 9, dtype=torch.bool)
    mask[1, ..., 5:] = False
    out = ff.t5_attention(q, k, v, table, attn_mask=mask)
    ref = _hf_reference(q, k, v, table, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=mask)
    assert_close(out, ref, torch.float64)


def test_t5_bad_input():
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="bias_table"):
        ff.t5_attention(q, q, q, torch.randn(32, 3))
    with pytest.raises(ValueError, match="bias_table"):
        ff.t5_attention(q, q, q, torch.randn(32))
    with pytest.raises(ValueError, match="num_buckets"):
        ff.t5_attention(q, q, q, torch.randn(2, 2), num_buckets=2)
    with pytest.raises(ValueError, match="k"):
        ff.t5_attention(q, q[:, :1], q, torch.randn(32, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_t5_cuda(dtype):
    B, H, L, D = 2, 12, 1024, 64
    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype) for _ in range(3))
    table = torch.randn(32, H, device="cuda", dtype=torch.float32)
    mask = (torch.arange(L, device="cuda")[None, :] < torch.tensor([L, 700], device="cuda")[:, None])[:, None, None]
    dout = torch.randn_like(q)
    runs = []
    for _ in range(2):
        out, leaves = _run(q, k, v, table, attn_mask=mask)
        runs.append(torch.autograd.grad(out, leaves, dout))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v, table)]
    ref = _hf_reference(*ref_leaves, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=mask)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    assert_close(out, ref, dtype, "out", 2.0)
    for name, g, rg in zip(("dq", "dk", "dv", "dtable"), runs[0], ref_grads):
        assert_close(g, rg, dtype, name, 2.0)
