"""ff.varlen_attention on packed sequences vs per-sequence float64 SDPA."""

import pytest
import torch
from conftest import assert_close

import fastformer as ff
from fastformer.ops.attention import capture_dropout_masks
from fastformer.reference.attention import sdpa_reference, varlen_reference


def _packed(lens_q, lens_k, H, Hk, D, device, dtype=torch.float32):
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32, device=device)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(sum(lens_q), H, D, device=device, dtype=dtype)
    k = torch.randn(sum(lens_k), Hk, D, device=device, dtype=dtype)
    v = torch.randn(sum(lens_k), Hk, D, device=device, dtype=dtype)
    return q, k, v, cu_q, cu_k


def _per_sequence(q, k, v, cu_q, cu_k, causal):
    """Independent oracle: torch SDPA in float64 on each sequence."""
    outs = []
    for i in range(cu_q.numel() - 1):
        qs = q[cu_q[i] : cu_q[i + 1]].transpose(0, 1)
        ks = k[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        vs = v[cu_k[i] : cu_k[i + 1]].transpose(0, 1)
        outs.append(sdpa_reference(qs, ks, vs, is_causal=causal, enable_gqa=True).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(
    "lens_q,lens_k,H,Hk,D,causal",
    [
        ([17, 1, 77], [17, 1, 77], 2, 2, 16, False),
        ([40, 5, 33], [40, 5, 33], 2, 1, 80, True),  # GQA, padded head dim
        ([9, 30], [50, 3], 1, 1, 16, True),  # cross lengths per sequence
    ],
)
def test_varlen_matches_per_sequence(lens_q, lens_k, H, Hk, D, causal, device):
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, H, Hk, D, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with ff.use_backend("triton"):
        out = ff.varlen_attention(*leaves, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = _per_sequence(*ref_leaves, cu_q, cu_k, causal)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.float32, "d" + name)


def test_varlen_dropout_replayed(device):
    lens, p = [20, 7], 0.25
    q, k, v, cu_q, cu_k = _packed(lens, lens, 2, 2, 16, device)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.varlen_attention(*leaves, cu_q, cu_k, 20, 20, dropout_p=p)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = varlen_reference(*ref_leaves, cu_q, cu_k, 20, 20, dropout_p=p, dropout_mask=masks[0])
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.float32, "d" + name)


def test_varlen_cpu_reference_path():
    q, k, v, cu_q, cu_k = _packed([5, 9], [5, 9], 2, 2, 16, "cpu")
    out = ff.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal=True)
    assert_close(out, _per_sequence(q.double(), k.double(), v.double(), cu_q, cu_k, True), torch.float32)


def test_varlen_bad_input():
    q, k, v, cu_q, cu_k = _packed([5, 9], [5, 9], 2, 2, 16, "cpu")
    with pytest.raises(ValueError, match="cu_seqlens_q"):
        ff.varlen_attention(q, k, v, cu_q[:-1], cu_k, 9, 9)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        ff.varlen_attention(q, k, v, cu_q, cu_k, 9, 4)
    with pytest.raises(ValueError, match="q"):
        ff.varlen_attention(q[None], k, v, cu_q, cu_k, 9, 9)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ff.varlen_attention(q, k, v, cu_q, cu_k.float(), 9, 9)
    with pytest.raises(ValueError, match="causal must be a bool"):
        ff.varlen_attention(q, k, v, cu_q, cu_k, 9, 9, causal="no")


@pytest.mark.cuda
def test_varlen_cuda_bf16():
    lens = [512, 64, 300, 1000]
    q, k, v, cu_q, cu_k = _packed(lens, lens, 8, 8, 128, "cuda", torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ff.varlen_attention(*leaves, cu_q, cu_k, 1000, 1000, causal=True)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = _per_sequence(*ref_leaves, cu_q, cu_k, True)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    assert_close(out, ref, torch.bfloat16, "out", 2.0)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert_close(g, rg, torch.bfloat16, "d" + name, 2.0)
