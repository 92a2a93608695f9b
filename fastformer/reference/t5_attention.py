"""Eager reference of T5 relative-position attention.

`relative_position_bucket` reproduces Hugging Face T5Attention._relative_position_bucket operation for
operation (the tests check it against that static method); `t5_attention_reference` builds the
(1, H, Lq, Lk) bias from the table and runs the reference SDPA with it.

`query_offset` is the absolute position of query row 0 when the keys start at position 0 (incremental
decoding: Lq new tokens against a cache of Lk keys, query_offset = Lk − Lq): the relative position of
(i, j) is j − (i + query_offset), and causal masking keeps j <= i + query_offset.
"""
from __future__ import annotations

import math

import torch

from .attention import sdpa_reference


def relative_position_bucket(relative_position: torch.Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> torch.Tensor:
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
        torch.log(relative_position.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).to(torch.long)
    if_large = torch.min(if_large, torch.full_like(if_large, num_buckets - 1))
    buckets += torch.where(is_small, relative_position, if_large)
    return buckets


def t5_bias(bias_table: torch.Tensor, Lq: int, Lk: int, *, bidirectional: bool = True, num_buckets: int = 32,
            max_distance: int = 128, query_offset: int = 0) -> torch.Tensor:
    """bias_table: (num_buckets, H) -> bias (1, H, Lq, Lk) with
    bias[0, h, i, j] = table[bucket(j − (i + query_offset)), h]."""
    dev = bias_table.device
    rel = torch.arange(Lk, device=dev)[None, :] - (torch.arange(Lq, device=dev)[:, None] + query_offset)
    bucket = relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    return bias_table[bucket].permute(2, 0, 1).unsqueeze(0)


def t5_attention_reference(q, k, v, bias_table, *, bidirectional=True, num_buckets=32, max_distance=128,
                           attn_mask=None, is_causal=False, scale=1.0, dropout_p=0.0, dropout_mask=None,
                           query_offset=0):
    """q: (B, H, Lq, D), k/v: (B, H, Lk, D), bias_table: (num_buckets, H) -> (B, H, Lq, D).
    query_offset: absolute position of query row 0 (keys at 0..Lk-1); is_causal keeps j <= i + query_offset."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    bias = t5_bias(bias_table, Lq, Lk, bidirectional=bidirectional, num_buckets=num_buckets,
                   max_distance=max_distance, query_offset=query_offset)
    if is_causal and query_offset:
        # causal at an offset: -inf in the bias where j > i + query_offset (sdpa's is_causal is top-left)
        dev = q.device
        hidden = torch.arange(Lk, device=dev)[None, :] > torch.arange(Lq, device=dev)[:, None] + query_offset
        bias = bias.masked_fill(hidden, float("-inf"))
        is_causal = False
    return sdpa_reference(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                          bias=bias, dropout_mask=dropout_mask)
