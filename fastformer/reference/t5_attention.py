"""Eager reference of T5 relative-position attention.

`relative_position_bucket` reproduces Hugging Face T5Attention._relative_position_bucket operation for
operation (the tests check it against that static method); `t5_attention_reference` builds the
(1, H, Lq, Lk) bias from the table and runs the reference SDPA with it.

`query_offset` is the absolute position of query row 0 when the keys start at position 0 (incremental
decoding: Lq new tokens against a cache of Lk keys, query_offset = Lk − Lq): the relative position of
(i, j) is j − (i + query_offset), and causal masking keeps j <= i + query_offset.
"""

from __future__ import annotations

import functools
import math

import torch

from .attention import default_scale, sdpa_reference


def relative_position_bucket(
    relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32, max_distance: int = 128
) -> torch.Tensor:
    """relative_position (= key position − query position), any shape, integer -> bucket (long)."""
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.long) * num_buckets
        relative_position = torch.abs(relative_position)
    else:
        relative_position = -torch.min(relative_position, torch.zeros_like(relative_position))
    max_exact = num_buckets // 2
    is_small = relative_position < max_exact
    # same float32 ops, same order as HF, so the truncation lands on the same side of every boundary
    if_large = max_exact + (
        torch.log(relative_position.float() / max_exact)
        / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    buckets += torch.where(is_small, relative_position, if_large)
    return buckets


def _bucket_grid(
    Lq: int, Lk: int, query_offset: int, bidirectional: bool, num_buckets: int, max_distance: int, device: torch.device
) -> torch.Tensor:
    """(Lq, Lk) long: bucket(j − (i + query_offset))."""
    rel = torch.arange(Lk, device=device)[None, :] - (torch.arange(Lq, device=device)[:, None] + query_offset)
    return relative_position_bucket(rel, bidirectional, num_buckets, max_distance)


_CACHED_GRID_MAX = 1 << 14  # elements: at most 128 KiB per cached grid


@functools.lru_cache(maxsize=128)
def _bucket_grid_cached(Lq, Lk, query_offset, bidirectional, num_buckets, max_distance, device):
    # a normal tensor even when first asked for under inference_mode: later autograd calls index with it
    with torch.inference_mode(False):
        return _bucket_grid(Lq, Lk, query_offset, bidirectional, num_buckets, max_distance, torch.device(device))


def t5_bias(
    bias_table: torch.Tensor,
    Lq: int,
    Lk: int,
    *,
    bidirectional: bool = True,
    num_buckets: int = 32,
    max_distance: int = 128,
    query_offset: int = 0,
) -> torch.Tensor:
    """bias_table: (num_buckets, H) -> bias (1, H, Lq, Lk) with
    bias[0, h, i, j] = table[bucket(j − (i + query_offset)), h]."""
    args = (int(Lq), int(Lk), int(query_offset), bool(bidirectional), int(num_buckets), int(max_distance))
    if Lq * Lk <= _CACHED_GRID_MAX and not torch.compiler.is_compiling():
        # small grids (decode steps: one row) depend only on shapes and config: computed once, not in
        # every layer of every step
        bucket = _bucket_grid_cached(*args, str(bias_table.device))
    else:
        bucket = _bucket_grid(*args, bias_table.device)
    return bias_table[bucket].permute(2, 0, 1).unsqueeze(0)


def t5_attention_reference(
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
    dropout_mask=None,
    query_offset=0,
):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias_table: (num_buckets, H) -> (B, H, Lq, D).
    query_offset: absolute position of query row 0 (keys at 0..Lk-1); is_causal keeps j <= i + query_offset."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    bias = t5_bias(
        bias_table,
        Lq,
        Lk,
        bidirectional=bidirectional,
        num_buckets=num_buckets,
        max_distance=max_distance,
        query_offset=query_offset,
    )
    if is_causal:
        # causal as -inf in the (1, H, Lq, Lk) bias where j > i + query_offset; nothing to hide when the
        # keys end at the last query's position (decoding one token against a cache)
        if Lk - 1 > query_offset:
            dev = q.device
            hidden = torch.arange(Lk, device=dev)[None, :] > torch.arange(Lq, device=dev)[:, None] + query_offset
            bias = bias.masked_fill(hidden, float("-inf"))
        is_causal = False
    if attn_mask is None and dropout_p == 0.0 and dropout_mask is None:
        # no row can lose all its keys (causal keeps key 0 for every row): sdpa_reference's formula
        # without its mask bookkeeping, the same values in a few calls (a decode step makes many)
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        scale = default_scale(q.shape[-1]) if scale is None else scale
        scores = torch.matmul(q.to(cdt), k.to(cdt).transpose(-2, -1))
        if scale != 1.0:  # T5 does not scale
            scores = scores * scale
        scores = scores + bias.to(cdt)
        return torch.matmul(torch.softmax(scores, dim=-1), v.to(cdt)).to(q.dtype)
    return sdpa_reference(
        q,
        k,
        v,
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        is_causal=is_causal,
        scale=scale,
        bias=bias,
        dropout_mask=dropout_mask,
    )
