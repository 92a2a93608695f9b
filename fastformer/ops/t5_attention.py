"""T5 relative-position attention fused into the attention kernels.

    out = ff.t5_attention(q, k, v, bias_table, bidirectional=True, num_buckets=32, max_distance=128,
                          attn_mask=None, is_causal=False, scale=1.0, dropout_p=0.0)

score[b, h, i, j] = scale · q_i · k_j + bias_table[bucket(j − i), h], with `bucket` exactly Hugging
Face T5's `_relative_position_bucket`. The kernels get the bucket of every relative position
r = clamp(j − i, −R, R), R = max(max_distance, num_buckets), as a tiny (2R + 1)-entry vector built
here with the reference bucket function (past ±R the bucket no longer changes), so no (Lq, Lk) bias
exists; `bias_table` gets a deterministic gradient (per-tile partial sums per bucket, reduced in a
fixed order; no atomics). CPU tensors under backend "auto" run torch's SDPA with the bias as a float
mask when the table needs no gradient (inference, a frozen table), else the eager reference, which
backend "reference" always runs. Only the kernel path imports triton.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..reference.t5_attention import relative_position_bucket, t5_attention_reference, t5_bias
from ._compile import opaque_to_compile
from ._validate import FLOAT_DTYPES, check_tensor
from .amp import autocast_op
from .attention_common import (
    attention_kernels,
    attention_path,
    check_attn_mask,
    check_dropout,
    check_flag,
    check_scale,
    fused_attention,
    kernel_covers,
    prepare_mask,
)
from .errors import InputError

__all__ = ["t5_attention", "relative_position_bucket", "relative_position_buckets"]


def check_bucket_config(bidirectional: bool, num_buckets, max_distance) -> None:
    """num_buckets >= 2 (>= 4 bidirectional), max_distance a positive int beyond the exact-bucket range
    (at or below it, Hugging Face's log formula decreases with distance and leaves [0, num_buckets))."""
    if (
        isinstance(num_buckets, bool)
        or not isinstance(num_buckets, int)
        or num_buckets < 2
        or (bidirectional and num_buckets < 4)
    ):
        raise InputError(f"num_buckets must be an int >= 2 (>= 4 bidirectional), got {num_buckets!r}")
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 1:
        raise InputError(f"max_distance must be a positive int, got {max_distance!r}")
    max_exact = (num_buckets // 2 if bidirectional else num_buckets) // 2
    if max_distance <= max_exact:
        raise InputError(
            f"max_distance={max_distance} must exceed the exact-bucket range {max_exact} of "
            f"num_buckets={num_buckets} ({'bi' if bidirectional else 'uni'}directional)"
        )


@functools.lru_cache(maxsize=64)
def _rel_pos_cached(bidirectional: bool, num_buckets: int, max_distance: int, device: str):
    check_bucket_config(bidirectional, num_buckets, max_distance)
    radius = max(max_distance, num_buckets)
    # on the tensors' device, as Hugging Face computes it there (float32 log on that device); the
    # host copy below is made once per configuration and device
    rel = torch.arange(-radius, radius + 1, device=device)
    bucket = relative_position_bucket(rel, bidirectional, num_buckets, max_distance).cpu()
    if bool((bucket < 0).any()) or bool((bucket >= num_buckets).any()):
        raise InputError(
            f"max_distance={max_distance} with num_buckets={num_buckets} gives buckets outside [0, {num_buckets})"
        )
    b = bucket.tolist()
    # the constant runs at both ends: r <= -sat_left all map to b[0], r >= sat_right all to b[-1]
    i = 0
    while i + 1 < len(b) and b[i + 1] == b[0]:
        i += 1
    j = len(b) - 1
    while j - 1 >= 0 and b[j - 1] == b[-1]:
        j -= 1
    sat_left = max(radius - i, 0)  # index i is relative position i - radius
    sat_right = max(j - radius, 1)
    zpts, zweights = _change_point_weights(b, radius, num_buckets)
    return attention_kernels().T5RelPos(
        bucket=bucket.to(device=device, dtype=torch.int32),
        radius=radius,
        sat_left=sat_left,
        sat_right=sat_right,
        bucket_left=b[0],
        bucket_right=b[-1],
        zpts=zpts.to(device),
        zweights=zweights.to(device),
    )


def _change_point_weights(b, radius, num_buckets):
    """Change points z of the bucket function (bucket(z) != bucket(z - 1), b[i] = bucket(i - radius)),
    padded to a power of two > their count, and the ±1 matrix W with per-bucket sum = Σ_t A[t] W[t]
    where A[t] = Σ dS over j − i < z_t (padding z = huge, so A = the total there)."""
    z = [i - radius for i in range(1, len(b)) if b[i] != b[i - 1]]
    m = len(z)
    nz = 1 << m.bit_length()  # a power of two > m: one padded entry at least holds the total
    nb_pad = 1 << max(num_buckets - 1, 0).bit_length()
    w = torch.zeros(nz, nb_pad, dtype=torch.float32)
    for t in range(m + 1):
        before = b[0] if t == 0 else b[z[t - 1] + radius]  # the run that ends at z_t (or at the total)
        w[t, before] += 1.0
        if t < m:
            w[t, b[z[t] + radius]] -= 1.0  # the run that starts at z_t
    pts = torch.full((nz,), 1 << 29, dtype=torch.int32)
    pts[:m] = torch.tensor(z, dtype=torch.int32)
    return pts, w


def relative_position_buckets(bidirectional: bool, num_buckets: int, max_distance: int, device):
    """The kernels' view of T5's bucket function (a T5RelPos of the attention kernels), cached per
    config and device; imports the kernels. Raises a ValueError for a configuration whose buckets
    leave [0, num_buckets): max_distance at or below the exact range (checked first without the
    kernels; the second check inside guards the same property on the device's arithmetic)."""
    return _rel_pos_cached(bool(bidirectional), num_buckets, max_distance, str(torch.device(device)))


# The kernel path's bucket tables, looked up outside torch.compile's graph: traced, the cached
# lookup's Python loops would become graph ops that build the tables again on every call.
_rel_pos_outside_graph = opaque_to_compile(relative_position_buckets)


def _t5_torch(q, k, v, bias_table, attn_mask, is_causal, scale, dropout_p, query_offset, kw):
    """The CPU fast path: torch's SDPA with the (1, H, Lq, Lk) T5 bias (and the mask, and the causal
    structure) folded into one float mask; the table's gradient flows through the bias gather."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    mdt = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32  # torch takes fp32 masks
    bias = t5_bias(bias_table, Lq, Lk, query_offset=query_offset, **kw).to(mdt)
    if attn_mask is not None:
        bias = bias.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else bias + attn_mask
    if is_causal:  # keeps j <= i + query_offset
        causal = torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(diagonal=query_offset)
        bias = bias.masked_fill(~causal, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


@autocast_op("q", "k", "v", "attn_mask")
def t5_attention(
    q,
    k,
    v,
    bias_table,
    *,
    bidirectional=True,
    num_buckets=32,
    max_distance=128,
    attn_mask=None,
    is_causal=False,
    scale=1.0,
    dropout_p=0.0,
    query_offset=0,
):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias_table: (num_buckets, H) -> (B, H, Lq, D).

    query_offset: absolute position of query row 0, keys sitting at positions 0..Lk-1 (incremental
    decoding: Lq new tokens against a cache, query_offset = Lk − Lq). Buckets use j − (i + query_offset)
    and is_causal keeps j <= i + query_offset; 0 is the usual aligned case.

    attn_mask: bool (True = attend) or float, broadcastable to (B, H, Lq, Lk); a (B, 1, 1, Lk) bool
    key-padding mask takes the per-batch-length fast path. Rows with every key masked give zeros.
    Under torch.autocast q/k/v and a float mask run in the autocast dtype (bias_table stays as is).
    """
    check_tensor("q", q, ndim=4, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=4, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("bias_table", bias_table, ndim=2, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"k/v dtypes ({k.dtype}, {v.dtype}) must equal q's {q.dtype}")
    B, H, Lq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise InputError(f"k shape {tuple(k.shape)} must be (B={B}, H={H}, Lk, D={D})")
    if v.shape[:3] != k.shape[:3]:
        raise InputError(f"v shape {tuple(v.shape)} must match k's (B, H, Lk) {tuple(k.shape[:3])}")
    check_flag("bidirectional", bidirectional)
    check_bucket_config(bidirectional, num_buckets, max_distance)
    if tuple(bias_table.shape) != (num_buckets, H):
        raise InputError(
            f"bias_table must have shape (num_buckets, H) = ({num_buckets}, {H}), got {tuple(bias_table.shape)}"
        )
    Lk = k.shape[2]
    check_attn_mask(attn_mask, q, (B, H, Lq, Lk))
    dropout_p = check_dropout(dropout_p)
    check_flag("is_causal", is_causal)
    scale = check_scale(scale)
    if isinstance(query_offset, bool) or not isinstance(query_offset, int) or query_offset < 0:
        raise InputError(f"query_offset must be an int >= 0, got {query_offset!r}")
    kw = dict(bidirectional=bool(bidirectional), num_buckets=num_buckets, max_distance=max_distance)
    path = attention_path(q, k, v, bias_table, attn_mask, covered=kernel_covers(q, k, v), dropout_p=dropout_p)
    if path == "kernel":
        rel = _rel_pos_outside_graph(bidirectional, num_buckets, max_distance, q.device)
        mask, klen = prepare_mask(attn_mask, (B,), H, Lq, Lk)
        return fused_attention(
            q,
            k,
            v,
            mask=mask,
            klen=klen,
            dropout_p=dropout_p,
            is_causal=is_causal,
            scale=scale,
            t5_table=bias_table,
            t5_rel=rel,
            query_offset=query_offset,
        )
    if path == "torch" and not (torch.is_grad_enabled() and bias_table.requires_grad):
        # torch's fused CPU kernel takes the bias as a float mask but has no gradient for it: with a
        # trainable table torch would run its math path, no faster than the reference (measured)
        return _t5_torch(q, k, v, bias_table, attn_mask, is_causal, scale, dropout_p, query_offset, kw)
    return t5_attention_reference(
        q,
        k,
        v,
        bias_table,
        attn_mask=attn_mask,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        query_offset=query_offset,
        **kw,
    )
