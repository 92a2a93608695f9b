"""Fused attention ops: ff.scaled_dot_product_attention and ff.varlen_attention.

    out = ff.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                          scale=None, enable_gqa=False)       # q: (..., H, Lq, D)
    out = ff.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p=0.0, causal=False, scale=None)         # q: (Tq, H, D)

Dispatch (see attention_common.attention_path): CUDA tensors (or any tensor with the backend forced
to "triton") run the Triton kernels when they cover the call; CPU tensors under "auto" run torch's own
SDPA; the rest (float64 or a head dim over 256 on the kernel backend, backend "reference") runs the
eager reference. A query row whose keys are all masked yields zeros, as torch >= 2.5 does.

Dropout in the kernels draws one seed from torch's default generator of the tensor's device
(`torch.manual_seed` reproduces it); the keep-mask is regenerated in the backward. For tests,
`with capture_dropout_masks() as masks:` collects the (B, H, Lq, Lk) keep-mask of every kernel call.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..reference.attention import sdpa_reference, varlen_reference
from ._validate import FLOAT_DTYPES, check_tensor
from .amp import autocast_op
from .attention_common import (
    attention_path,
    capture_dropout_masks,
    check_attn_mask,
    check_dropout,
    check_flag,
    check_scale,
    forget_host_checks,
    fused_attention,
    fused_varlen_attention,
    kernel_covers,
    prepare_mask,
    remembered,
)
from .errors import InputError

__all__ = ["scaled_dot_product_attention", "varlen_attention", "capture_dropout_masks", "forget_host_checks"]


# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention
# ----------------------------------------------------------------------------------------------


class SdpaLayout(NamedTuple):
    """How a validated SDPA call maps onto the kernels' (B, H, L, D) view.

    rank: the inputs' rank after left-padding with 1s (>= 3); batch: the broadcast batch dims (all
    before the heads dim); H: output heads; HK: the key/value heads the kernels see (H, or a divisor
    of H for grouped-query attention and a broadcast single head), None when the kernels cannot take
    the call without copying (GQA with different key and value head counts); out_shape: torch's."""

    rank: int
    batch: tuple
    H: int
    HK: int | None
    out_shape: tuple


def _pad(shape, n: int) -> tuple:
    return (1,) * (n - len(shape)) + tuple(shape)


def check_sdpa(query, key, value, attn_mask, enable_gqa) -> SdpaLayout:
    """Validate an SDPA call with torch's shape rules: (..., L, E) inputs of rank >= 2 whose batch dims
    (everything before the last two, heads included) broadcast, or with enable_gqa a key/value head
    count that divides the query's. Raises InputError (a ValueError and a RuntimeError, as torch)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
        if t.dim() < 2:
            raise InputError(f"{name} must have at least 2 dimensions (..., L, E), got shape {tuple(t.shape)}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise InputError(f"{name} has dtype {t.dtype} but query has {query.dtype}; they must match")
        if t.device != query.device:
            raise InputError(f"{name} is on {t.device} but query is on {query.device}")
    if key.shape[-1] != query.shape[-1]:
        raise InputError(f"key head dim {key.shape[-1]} != query head dim {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise InputError(f"value length {value.shape[-2]} != key length {key.shape[-2]}")
    m = max(query.dim(), key.dim(), value.dim())
    n = max(m, 3)
    qs, ks, vs = _pad(query.shape, n), _pad(key.shape, n), _pad(value.shape, n)
    try:
        batch = tuple(torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3]))
    except RuntimeError:
        raise InputError(
            f"the batch dims of query {tuple(query.shape)}, key {tuple(key.shape)} and value "
            f"{tuple(value.shape)} do not broadcast"
        ) from None
    Hq, Hk, Hv = qs[-3], ks[-3], vs[-3]
    if enable_gqa and (Hk != Hq or Hv != Hq):
        if Hk == 0 or Hv == 0 or Hq % Hk or Hq % Hv:
            raise InputError(
                f"enable_gqa: the number of heads in key ({Hk}) and value ({Hv}) must divide the "
                f"number of heads in query ({Hq})"
            )
        H, HK = Hq, (Hk if Hk == Hv else None)
    else:
        try:
            H = torch.broadcast_shapes((Hq,), (Hk,), (Hv,))[0]
        except RuntimeError:
            raise InputError(
                f"key has {Hk} heads and value {Hv} but query has {Hq}; they must be equal (or 1), "
                "or pass enable_gqa=True for grouped-query attention"
            ) from None
        HK = Hk if Hk == Hv else H
    full = batch + (H, qs[-2], vs[-1])
    out_shape = full[len(full) - m :]
    scores = (batch + (H, qs[-2], ks[-2]))[len(full) - m :]
    check_attn_mask(attn_mask, query, scores)
    return SdpaLayout(n, batch, H, HK, out_shape)


def _fold_point(parts, nb: int) -> int:
    """The first batch dim j from which dims j..nb-1 of every tensor in parts merge into one (a view:
    no copy); the dims before j are looped over. 0 for contiguous or plainly broadcast inputs."""
    for j in range(nb):
        try:
            for t in parts:
                t[(0,) * j].view((-1,) + tuple(t.shape[nb:]))
            return j
        except RuntimeError:
            continue
    return nb


def _sdpa_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, lay: SdpaLayout):
    """Kernel path: inputs broadcast to (*batch, H|HK, L, D) views (stride 0 where broadcast), the batch
    dims folded into the kernels' B where the strides allow (else looped over), output reshaped."""
    n, batch, H, HK = lay.rank, lay.batch, lay.H, lay.HK
    q, k, v = (t.reshape(_pad(t.shape, n)) for t in (query, key, value))
    Lq, Lk, Dv = q.shape[-2], k.shape[-2], v.shape[-1]
    q = q.expand(batch + (H, Lq, q.shape[-1]))
    k = k.expand(batch + (HK, Lk, k.shape[-1]))
    v = v.expand(batch + (HK, Lk, Dv))
    mask, klen = prepare_mask(attn_mask, batch, H, Lq, Lk)
    parts = [q, k, v] + ([mask] if mask is not None else [])
    nb = len(batch)
    j = _fold_point(parts, nb)
    outs = []
    for idx in itertools.product(*(range(s) for s in batch[:j])):
        q4, k4, v4, *m4 = (t[idx].view((-1,) + tuple(t.shape[nb:])) for t in parts)
        kl = klen[idx].reshape(-1) if klen is not None else None
        outs.append(
            fused_attention(
                q4, k4, v4, mask=m4[0] if m4 else None, klen=kl, dropout_p=dropout_p, is_causal=is_causal, scale=scale
            )
        )
    out = torch.stack(outs) if j else outs[0]
    return out.reshape(lay.out_shape)


def _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """torch's own SDPA (the CPU fast path). A mask together with is_causal is combined here, so that
    every torch version that passes torch_sdpa_usable() takes it. A mask of fewer than 2 dims, which
    broadcasts but torch's SDPA refuses, gets leading 1s (the other paths broadcast it as it is)."""
    if attn_mask is not None and attn_mask.dim() < 2:
        attn_mask = attn_mask.reshape((1,) * (2 - attn_mask.dim()) + tuple(attn_mask.shape))
    if attn_mask is not None and is_causal:
        Lq, Lk = query.shape[-2], key.shape[-2]
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=query.device).tril()
        attn_mask = (
            attn_mask & causal if attn_mask.dtype == torch.bool else attn_mask.masked_fill(~causal, float("-inf"))
        )
        is_causal = False
    kw = {"enable_gqa": True} if enable_gqa else {}
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw
    )


@autocast_op("query", "key", "value", "attn_mask")
def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    query: (..., Hq, Lq, E), key: (..., H_kv, Lk, E), value: (..., H_kv, Lk, Ev): any rank >= 2; the
    batch dims broadcast as in torch (e.g. a (Hq, Lq, E) query against (B, H, Lk, E) keys), without
    materialising the broadcast; with enable_gqa, H_kv divides Hq.
    attn_mask: bool (True = attend) or float (added; float32 or the query's dtype), broadcastable to
    (..., Hq, Lq, Lk); a bool key-padding mask (only batch dims and Lk vary) takes the per-batch
    key-length fast path. Returns (..., Hq, Lq, Ev). Rows whose keys are all masked give 0. Under
    torch.autocast, query/key/value and a float mask run in the autocast dtype, as torch's SDPA does.
    """
    lay = check_sdpa(query, key, value, attn_mask, enable_gqa)
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    check_flag("is_causal", is_causal)
    covered = lay.HK is not None and all(lay.batch) and kernel_covers(query, key, value)
    path = attention_path(query, key, value, attn_mask, covered=covered, dropout_p=dropout_p)
    if path == "kernel":
        return _sdpa_kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, lay)
    if path == "torch":
        return _torch_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    return sdpa_reference(
        query,
        key,
        value,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        enable_gqa=enable_gqa,
    )


# ----------------------------------------------------------------------------------------------
# varlen_attention
# ----------------------------------------------------------------------------------------------


def check_cu_seqlens(name: str, cu: torch.Tensor, total: int) -> int:
    """Validate cumulative lengths (one device-to-host copy) and return the longest sequence."""
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise InputError(f"{name} must start at 0, be non-decreasing and end at {total}")
    return max((b - a for a, b in zip(c, c[1:])), default=0)


def _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, causal, scale):
    """The CPU fast path: torch's SDPA per sequence (q: (Tq, H, D) -> (Tq, H, D))."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    gqa = k.shape[1] != q.shape[1]
    outs = []
    for i in range(len(cq) - 1):
        # (1, H, L, D): torch takes its fused CPU kernel for 4-D inputs (its math path for 3-D ones)
        qs, ks, vs = (
            t[a:b].transpose(0, 1)[None]
            for t, a, b in ((q, cq[i], cq[i + 1]), (k, ck[i], ck[i + 1]), (v, ck[i], ck[i + 1]))
        )
        outs.append(_torch_sdpa(qs, ks, vs, None, dropout_p, causal, scale, gqa)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty((0,) + tuple(q.shape[1:-1]) + (v.shape[-1],))


@autocast_op("q", "k", "v")
def varlen_attention(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0, causal=False, scale=None
):
    """Attention over packed variable-length sequences, no padding computed.

    q: (Tq, H, D), k/v: (Tk, H_kv, D) (H a multiple of H_kv), cu_seqlens_q/k: (B + 1,) int, cumulative
    lengths starting at 0; max_seqlen_q/k: the longest sequence. causal is top-left aligned per
    sequence. Returns (Tq, H, D). Under torch.autocast q/k/v run in the autocast dtype.
    """
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"k/v dtypes ({k.dtype}, {v.dtype}) must equal q's {q.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise InputError(f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise InputError(f"v shape {tuple(v.shape)} must match k's first dims {tuple(k.shape[:2])}")
    if q.shape[1] % k.shape[1] != 0:
        raise InputError(f"q heads {q.shape[1]} must be a multiple of k heads {k.shape[1]}")
    longest = {}
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if cu.numel() < 1:
            raise InputError(f"{name} must hold at least one offset")
        longest[name] = remembered(
            cu, ("cu_seqlens", total), lambda cu=cu, total=total, name=name: check_cu_seqlens(name, cu, total)
        )
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise InputError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    lq, lk = longest["cu_seqlens_q"], longest["cu_seqlens_k"]
    if int(max_seqlen_q) < lq:
        raise InputError(f"max_seqlen_q={max_seqlen_q} is smaller than the longest query sequence {lq}")
    if int(max_seqlen_k) < lk:
        raise InputError(f"max_seqlen_k={max_seqlen_k} is smaller than the longest key sequence {lk}")
    dropout_p = check_dropout(dropout_p)
    scale = check_scale(scale)
    check_flag("causal", causal)
    path = attention_path(q, k, v, covered=kernel_covers(q, k, v), dropout_p=dropout_p)
    if path == "kernel":
        return fused_varlen_attention(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale
        )
    if path == "torch":
        return _varlen_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, dropout_p, causal, scale)
    return varlen_reference(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=dropout_p, causal=causal, scale=scale
    )
