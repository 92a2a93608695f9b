"""INTERIM eager implementation so dependent layers can be built; replaced by the fused op (issue 4)."""
import math

import torch


def _bucket(rel, bidirectional, num_buckets, max_distance):
    ret = 0
    if bidirectional:
        num_buckets //= 2
        ret = (rel > 0).long() * num_buckets
        rel = rel.abs()
    else:
        rel = -torch.clamp(rel, max=0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    large = max_exact + (torch.log(rel.float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).long()
    large = torch.clamp(large, max=num_buckets - 1)
    return ret + torch.where(is_small, rel, large)


def t5_attention(q, k, v, bias_table, *, bidirectional=True, num_buckets=32, max_distance=128, attn_mask=None,
                 is_causal=False, scale=1.0, dropout_p=0.0):
    Lq, Lk = q.shape[-2], k.shape[-2]
    rel = torch.arange(Lk, device=q.device)[None, :] - torch.arange(Lq, device=q.device)[:, None]
    bias = bias_table[_bucket(rel, bidirectional, num_buckets, max_distance)].permute(2, 0, 1)[None]
    scores = scale * q @ k.transpose(-1, -2) + bias.to(q.dtype)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    if is_causal:
        scores = scores.masked_fill(torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    p = torch.softmax(scores.float(), -1).to(q.dtype)
    p = torch.nn.functional.dropout(p, dropout_p) if dropout_p else p
    return p @ v
