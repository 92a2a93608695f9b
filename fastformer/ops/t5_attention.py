"""T5 relative-position attention fused into the attention kernels.

    out = ff.t5_attention(q, k, v, bias_table, bidirectional=True, num_buckets=32, max_distance=128,
                          attn_mask=None, is_causal=False, scale=1.0, dropout_p=0.0)

score[b, h, i, j] = scale · q_i · k_j + bias_table[bucket(j − i), h], with `bucket` exactly Hugging
Face T5's `_relative_position_bucket`. The kernels get the bucket of every relative position
r = clamp(j − i, −R, R), R = max(max_distance, num_buckets), as a tiny (2R + 1)-entry vector built
here with the reference bucket function (past ±R the bucket no longer changes), so no (Lq, Lk) bias
exists; `bias_table` gets a deterministic gradient (per-tile partial sums per bucket, reduced in a
fixed order; no atomics).
"""
from __future__ import annotations

import functools

import torch

from ..backend import use_triton
from ..reference.t5_attention import relative_position_bucket, t5_attention_reference
from ._amp import autocast_cast, autocast_dtype, no_autocast
from ._validate import FLOAT_DTYPES, check_range, check_tensor
from .attention import _check_mask, _kernel_covers, fused_attention_4d

__all__ = ["t5_attention", "relative_position_bucket", "relative_position_buckets"]


@functools.lru_cache(maxsize=64)
def _rel_pos_cached(bidirectional: bool, num_buckets: int, max_distance: int, device: str):
    from ..kernels.attention_launch import T5RelPos

    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= max_exact:
        # HF's log formula then decreases with distance and leaves [0, num_buckets) (negative buckets)
        raise ValueError(f"max_distance={max_distance} must exceed the exact-bucket range {max_exact} of "
                         f"num_buckets={num_buckets} ({'bi' if bidirectional else 'uni'}directional)")
    radius = max(max_distance, num_buckets)
    # on the tensors' device, as Hugging Face computes it there (float32 log on that device); the
    # host copy below is made once per configuration and device
    rel = torch.arange(-radius, radius + 1, device=device)
    bucket = relative_position_bucket(rel, bidirectional, num_buckets, max_distance).cpu()
    if bool((bucket < 0).any()) or bool((bucket >= num_buckets).any()):
        raise ValueError(f"max_distance={max_distance} with num_buckets={num_buckets} gives buckets outside "
                         f"[0, {num_buckets})")
    b = bucket.tolist()
    # the constant runs at both ends: r <= -sat_left all map to b[0], r >= sat_right all to b[-1]
    i = 0
    while i + 1 < len(b) and b[i + 1] == b[0]:
        i += 1
    j = len(b) - 1
    while j - 1 >= 0 and b[j - 1] == b[-1]:
        j -= 1
    sat_left = max(radius - i, 0)     # index i is relative position i - radius
    sat_right = max(j - radius, 1)
    zpts, zweights = _change_point_weights(b, radius, num_buckets)
    return T5RelPos(bucket=bucket.to(device=device, dtype=torch.int32), radius=radius, sat_left=sat_left,
                    sat_right=sat_right, bucket_left=b[0], bucket_right=b[-1], zpts=zpts.to(device),
                    zweights=zweights.to(device))


def _change_point_weights(b, radius, num_buckets):
    """Change points z of the bucket function (bucket(z) != bucket(z - 1), b[i] = bucket(i - radius)),
    padded to a power of two > their count, and the ±1 matrix W with per-bucket sum = Σ_t A[t] W[t]
    where A[t] = Σ dS over j − i < z_t (padding z = huge, so A = the total there)."""
    z = [i - radius for i in range(1, len(b)) if b[i] != b[i - 1]]
    m = len(z)
    nz = 1 << m.bit_length()           # a power of two > m: one padded entry at least holds the total
    nb_pad = 1 << max(num_buckets - 1, 0).bit_length()
    w = torch.zeros(nz, nb_pad, dtype=torch.float32)
    for t in range(m + 1):
        before = b[0] if t == 0 else b[z[t - 1] + radius]   # the run that ends at z_t (or at the total)
        w[t, before] += 1.0
        if t < m:
            w[t, b[z[t] + radius]] -= 1.0                   # the run that starts at z_t
    pts = torch.full((nz,), 1 << 29, dtype=torch.int32)
    pts[:m] = torch.tensor(z, dtype=torch.int32)
    return pts, w


def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int, device):
    """The kernels' view of T5's bucket function (kernels.attention.T5RelPos), cached per config and
    device. Raises ValueError for a configuration whose buckets leave [0, num_buckets): max_distance at
    or below the exact range (the second check inside guards the same property directly)."""
    return _rel_pos_cached(bool(bidirectional), int(num_buckets), int(max_distance), str(torch.device(device)))


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
    rel = relative_position_buckets(bidirectional, num_buckets, max_distance, q.device)  # validates the config
    if not (use_triton(q, k, v, bias_table, attn_mask) and _kernel_covers(q, k, v)) or dropout_p >= 1.0:
        return t5_attention_reference(q, k, v, bias_table, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                      dropout_p=dropout_p, **kw)
    return fused_attention_4d(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                              t5_table=bias_table, t5_rel=rel)
