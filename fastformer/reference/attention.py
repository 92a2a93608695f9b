"""Eager reference attention: the executable spec of fastformer's attention ops, their CPU fallback
and the tests' oracle.

Semantics are torch SDPA's (bool mask True = may attend, float mask added, is_causal top-left aligned,
GQA by repeating kv heads, batch dims broadcast); a query row whose keys are all masked gives zeros
with zero gradients, as torch >= 2.5 does (older torch gives NaN). Computation runs in float64 for
float64 inputs and float32 otherwise; the result has the input dtype. Dropout either uses torch's RNG
or an explicit keep-mask (so a test can replay the kernels' Philox mask).
"""

from __future__ import annotations

import math

import torch


def default_scale(head_dim: int) -> float:
    """torch's default softmax scale 1/sqrt(D). With D = 0 every score is 0 whatever the scale, and torch
    returns the uniform average of the values: any finite scale gives that, so 1.0 (no division by 0)."""
    return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0


def sdpa_reference(
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    *,
    bias: torch.Tensor | None = None,
    dropout_mask: torch.Tensor | None = None,
    return_weights: bool = False,
):
    """query: (..., H, Lq, D), key: (..., H_kv, Lk, D), value: (..., H_kv, Lk, Dv) -> (..., H, Lq, Dv).

    Any rank >= 2; batch dims broadcast as in torch's matmul (and so as in torch's SDPA).

    bias: float, broadcastable to (..., H, Lq, Lk), added to the scores (T5 relative-position bias).
    dropout_mask: bool keep-mask broadcastable to the attention weights; replaces torch's RNG.
    return_weights: also return the (post-softmax, pre-dropout) weights.
    """
    dtype = query.dtype
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    q, k, v = query.to(cdt), key.to(cdt), value.to(cdt)
    if enable_gqa and min(q.dim(), k.dim(), v.dim()) >= 3:
        # torch's grouped-query attention: each key/value head serves a group of consecutive query heads
        if k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        if v.shape[-3] != q.shape[-3]:
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = default_scale(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(cdt)
    Lq, Lk = scores.shape[-2], scores.shape[-1]
    visible = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    if is_causal:
        visible = visible.tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            visible = visible & attn_mask
        else:
            scores = scores + attn_mask.to(cdt)
    scores = scores.masked_fill(~visible, float("-inf"))
    # rows with no visible key: softmax over zeros then zeroed, so neither value nor gradient is NaN
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    p = weights
    if dropout_mask is not None:
        p = p * dropout_mask.to(cdt) / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        p = torch.nn.functional.dropout(p, dropout_p)
    out = (p @ v).to(dtype)
    return (out, weights.to(dtype)) if return_weights else out


def varlen_reference(
    q,
    k,
    v,
    cu_seqlens_q,
    cu_seqlens_k,
    max_seqlen_q=None,
    max_seqlen_k=None,
    *,
    dropout_p=0.0,
    causal=False,
    scale=None,
    dropout_mask=None,
):
    """Packed q: (Tq, H, D), k/v: (Tk, H_kv, D) with cu_seqlens (B + 1,): attention per sequence.
    dropout_mask: (B, H, max_q, max_k) keep-mask indexed by positions within each sequence."""
    outs = []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(cq) - 1):
        qs = q[cq[i] : cq[i + 1]].transpose(0, 1)
        ks = k[ck[i] : ck[i + 1]].transpose(0, 1)
        vs = v[ck[i] : ck[i + 1]].transpose(0, 1)
        dm = None
        if dropout_mask is not None:
            dm = dropout_mask[i, :, : qs.shape[1], : ks.shape[1]]
        o = sdpa_reference(
            qs,
            ks,
            vs,
            dropout_p=dropout_p,
            is_causal=causal,
            scale=scale,
            enable_gqa=ks.shape[0] != qs.shape[0],
            dropout_mask=dm,
        )
        outs.append(o.transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty((0,) + tuple(q.shape[1:-1]) + (v.shape[-1],))
