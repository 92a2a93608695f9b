"""INTERIM eager implementation so dependent layers can be built; replaced by the fused op (issue 3)."""
import torch
import torch.nn.functional as F


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
                     causal=False, scale=None):
    outs = []
    for i in range(cu_seqlens_q.numel() - 1):
        qs = q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        vs = v[cu_seqlens_k[i]:cu_seqlens_k[i + 1]].transpose(0, 1)[None]
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p, is_causal=causal, scale=scale)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)
