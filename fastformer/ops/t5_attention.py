"""T5 relative-position attention fused into the attention kernels.

    out = ff.t5_attention(q, k, v, bias_table, bidirectional=True, num_buckets=32, max_distance=128,
                          attn_mask=None, is_causal=False, scale=1.0, dropout_p=0.0)

score[b, h, i, j] = scale · q_i · k_j + bias_table[bucket(j − i), h], with `bucket` exactly Hugging
Face T5's `_relative_position_bucket`. The kernels look the bucket of each distance up in a tiny
(max(max_distance, num_buckets) + 1)-entry table built here with the reference bucket function on the
tensors' device, so no (Lq, Lk) bias exists; `bias_table` gets a deterministic gradient (per-tile
partial sums per bucket, reduced in a fixed order; no atomics).
"""
from __future__ import annotations

import functools

import torch

from ..backend import use_triton
from ..reference.t5_attention import relative_position_bucket, t5_attention_reference
from ._amp import autocast_cast, autocast_dtype, no_autocast
from ._validate import FLOAT_DTYPES, check_range, check_tensor
from .attention import _check_mask, _kernel_covers, fused_attention_4d

__all__ = ["t5_attention", "relative_position_bucket", "bucket_lut"]


@functools.lru_cache(maxsize=64)
def _bucket_lut_cached(bidirectional: bool, num_buckets: int, max_distance: int, device: str) -> torch.Tensor:
    n = max(max_distance, num_buckets) + 1
    # distance d >= 0 looked at from the "non-positive relative position" side: for bidirectional
    # buckets the kernel adds num_buckets // 2 when j > i, exactly as HF does
    dist = torch.arange(n, device=device)
    return relative_position_bucket(-dist, bidirectional, num_buckets, max_distance).to(torch.int32)


def bucket_lut(bidirectional: bool, num_buckets: int, max_distance: int, device) -> torch.Tensor:
    """(max(max_distance, num_buckets) + 1,) int32: the bucket of each distance |j − i| (within one
    direction); every larger distance shares the last entry's bucket."""
    return _bucket_lut_cached(bool(bidirectional), int(num_buckets), int(max_distance), str(torch.device(device)))


def t5_attention(q, k, v, bias_table, *, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=None,
                 is_causal=False, scale=1.0, dropout_p=0.0):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias_table: (num_buckets, H) -> (B, H, Lq, D).

    attn_mask: bool (True = attend) or float, broadcastable to (B, H, Lq, Lk); a (B, 1, 1, Lk) bool
    key-padding mask takes the per-batch-length fast path. Rows with every key masked give zeros.
    Under torch.autocast q/k/v and a float mask run in the autocast dtype (bias_table stays as is).
    """
    amp = autocast_dtype(q)
    if amp is not None:
        q, k, v, attn_mask = (autocast_cast(t, amp) for t in (q, k, v, attn_mask))
        with no_autocast(q, amp):
            return t5_attention(q, k, v, bias_table, bidirectional=bidirectional, num_buckets=num_buckets,
                                max_distance=max_distance, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                dropout_p=dropout_p)
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("bias_table", bias_table, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v dtypes ({k.dtype}, {v.dtype}) must equal q's {q.dtype}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k shape {tuple(k.shape)} must be (B={B}, H={H}, Lk, D={D})")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k's (B, H, Lk) {tuple(k.shape[:3])}")
    if not isinstance(num_buckets, int) or num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"num_buckets must be an int >= 2 (>= 4 bidirectional), got {num_buckets!r}")
    if not isinstance(max_distance, int) or max_distance < 1:
        raise ValueError(f"max_distance must be a positive int, got {max_distance!r}")
    if tuple(bias_table.shape) != (num_buckets, H):
        raise ValueError(f"bias_table must have shape (num_buckets, H) = ({num_buckets}, {H}), "
                         f"got {tuple(bias_table.shape)}")
    _check_mask(attn_mask, B, H, Lq, k.shape[2], q.device)
    check_range("dropout_p", float(dropout_p), 0.0, 1.0, hi_inclusive=True)   # 1.0: zeros, as torch
    kw = dict(bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance)
    if not (use_triton(q, k, v, bias_table, attn_mask) and _kernel_covers(q, k, v)) or dropout_p >= 1.0:
        return t5_attention_reference(q, k, v, bias_table, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                      dropout_p=dropout_p, **kw)
    lut = bucket_lut(bidirectional, num_buckets, max_distance, q.device)
    table = bias_table if bias_table.stride(-1) == 1 else bias_table.contiguous()
    return fused_attention_4d(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              t5_table=table, t5_lut=lut, t5_bidirectional=bool(bidirectional))
