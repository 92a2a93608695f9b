"""ff.t5_attention(query_offset=P): Lq queries at absolute positions P..P+Lq-1 against keys at 0..Lk-1
(decoding against a cache). The oracle is the aligned call on the full query block, rows P..P+Lq-1,
with a bias built from Hugging Face's bucket function; gradients included. Both backends: the kernels
add the offset to their bucket and causal indexing (far and near tiles, the table's gradient)."""

import pytest
import torch
from conftest import assert_close

import fastformer as ff
from fastformer.reference.attention import sdpa_reference
from fastformer.reference.t5_attention import t5_attention_reference

T5Attention = pytest.importorskip("transformers.models.t5.modeling_t5").T5Attention


def _hf_bias(table, Lq, Lk, offset, bidirectional, num_buckets, max_distance):
    rel = torch.arange(Lk)[None, :] - (torch.arange(Lq)[:, None] + offset)
    bucket = T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return table[bucket].permute(2, 0, 1).unsqueeze(0)


@pytest.mark.parametrize("bidirectional,is_causal", [(False, True), (True, False), (False, False)])
@pytest.mark.parametrize("Lq,Lk,offset", [(1, 1, 0), (1, 23, 22), (3, 19, 16), (4, 30, 9), (2, 7, 12)])
def test_offset_matches_rows_of_the_full_call(backend, Lq, Lk, offset, bidirectional, is_causal):
    B, H, D, nb, md = 2, 3, 16, 8, 20
    dt = torch.float64 if backend == "reference" else torch.float32
    q = torch.randn(B, H, Lq, D, dtype=dt)
    k, v = torch.randn(B, H, Lk, D, dtype=dt), torch.randn(B, H, Lk, D, dtype=dt)
    table = torch.randn(nb, H, dtype=dt)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    out = ff.t5_attention(
        *leaves, bidirectional=bidirectional, num_buckets=nb, max_distance=md, is_causal=is_causal, query_offset=offset
    )
    ref_leaves = [t.double().clone().requires_grad_() for t in (q, k, v, table)]
    q64, k64, v64, t64 = ref_leaves
    bias = _hf_bias(t64, Lq, Lk, offset, bidirectional, nb, md)
    if is_causal:
        hidden = torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + offset
        bias = bias.masked_fill(hidden, float("-inf"))
    ref = sdpa_reference(q64, k64, v64, scale=1.0, bias=bias)
    assert_close(out, ref, dt, "out")
    g = torch.randn_like(ref)
    out.backward(g.to(dt))
    ref.backward(g)
    for name, a, b in zip("q k v table".split(), leaves, ref_leaves):
        assert_close(a.grad, b.grad, dt, f"d{name}")


@pytest.mark.parametrize(
    "bidirectional,is_causal,Lq,Lk,offset,padded,p",
    [
        (False, True, 1, 150, 149, False, 0.0),  # one decoding step: far-left tiles, the last near one
        (False, True, 37, 150, 113, True, 0.0),  # several query blocks against a cache, padded keys
        (True, False, 40, 97, 30, False, 0.2),  # far tiles on both sides, dropout
        (False, False, 20, 64, 200, True, 0.0),  # offset beyond the keys: every tile far left, one bucket
    ],
)
def test_offset_through_the_kernels(bidirectional, is_causal, Lq, Lk, offset, padded, p, monkeypatch):
    """A non-zero query_offset runs the fused kernels (not the reference) with a small max_distance, so
    that far and near tiles, the causal bound and the table's gradient all see the offset; checked
    against the float64 reference with the same offset (dropout: fed the kernels' keep-mask)."""
    import sys

    from fastformer.ops.attention import capture_dropout_masks

    T = sys.modules["fastformer.ops.t5_attention"]  # the package re-exports the function under that name

    calls = []
    real = T.fused_attention
    monkeypatch.setattr(T, "fused_attention", lambda *a, **kw: (calls.append(kw["query_offset"]), real(*a, **kw))[1])
    torch.manual_seed(0)
    B, H, D, nb, md = 2, 2, 16, 8, 12
    q = torch.randn(B, H, Lq, D)
    k, v = torch.randn(B, H, Lk, D), torch.randn(B, H, Lk, D)
    table = torch.randn(nb, H)
    mask = None
    if padded:
        mask = (torch.arange(Lk)[None, :] < torch.tensor([Lk, Lk - 23])[:, None])[:, None, None, :]
    kw = dict(
        bidirectional=bidirectional,
        num_buckets=nb,
        max_distance=md,
        is_causal=is_causal,
        query_offset=offset,
        attn_mask=mask,
        dropout_p=p,
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
    with ff.use_backend("triton"), capture_dropout_masks() as masks:
        out = ff.t5_attention(*leaves, **kw)
    assert calls == [offset]
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v, table)]
    kw.pop("dropout_p")
    ref = t5_attention_reference(*ref_leaves, dropout_p=p, dropout_mask=masks[0] if p else None, **kw)
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.double())
    assert_close(out, ref, torch.float32, "out")
    for name, a, b in zip("q k v table".split(), grads, ref_grads):
        if b.norm() < 1e-9:
            # one bucket for every score: its gradient is Σ dS = 0 per row, up to rounding
            assert (a.double() - b).abs().max() < 1e-5, name
        else:
            assert_close(a, b, torch.float32, f"d{name}")


def test_offset_rows_equal_aligned_call_rows():
    """The last Lq rows of an aligned causal call are the offset call on those rows alone."""
    B, H, L, D = 2, 2, 12, 8
    q, k, v = (torch.randn(B, H, L, D, dtype=torch.float64) for _ in range(3))
    table = torch.randn(32, H, dtype=torch.float64)
    full = ff.t5_attention(q, k, v, table, bidirectional=False, is_causal=True)
    for P in (0, 5, 11):
        part = ff.t5_attention(q[:, :, P:], k, v, table, bidirectional=False, is_causal=True, query_offset=P)
        assert_close(part, full[:, :, P:], torch.float64, f"rows from {P}")


def test_mask_free_reference_equals_masked_reference():
    """The reference's path without a mask and sdpa_reference's (given an all-True mask) agree,
    forward and backward, causal or not."""
    B, H, Lq, Lk, D = 2, 3, 5, 9, 8
    for causal, offset in ((False, 0), (True, 0), (True, 4), (True, 2)):
        inputs = [
            torch.randn(B, H, Lq, D, dtype=torch.float64),
            torch.randn(B, H, Lk, D, dtype=torch.float64),
            torch.randn(B, H, Lk, D, dtype=torch.float64),
            torch.randn(16, H, dtype=torch.float64),
        ]
        outs, grads = [], []
        for mask in (None, torch.ones(B, 1, 1, Lk, dtype=torch.bool)):
            leaves = [t.clone().requires_grad_() for t in inputs]
            o = t5_attention_reference(
                *leaves,
                bidirectional=not causal,
                num_buckets=16,
                max_distance=30,
                attn_mask=mask,
                is_causal=causal,
                query_offset=offset,
            )
            o.sum().backward()
            outs.append(o)
            grads.append([t.grad for t in leaves])
        assert_close(outs[0], outs[1], torch.float64, f"out causal={causal} offset={offset}")
        for a, b in zip(*grads):
            assert_close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_bad_query_offset_raises_value_error(bad):
    q = torch.randn(1, 2, 1, 8)
    k = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="query_offset"):
        ff.t5_attention(q, k, k, torch.randn(32, 2), query_offset=bad)
