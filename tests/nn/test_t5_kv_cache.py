"""ff.nn.T5SelfAttention(kv_cache=...): incremental decoding equals the full causal forward."""

import pytest
import torch
from conftest import assert_close

import fastformer as ff
from fastformer.models.generation import KVCache


@pytest.mark.parametrize("chunks", [(1,) * 7, (3, 1, 3), (7,)])
def test_kv_cache_decoding_equals_full_causal_forward(backend, chunks):
    dt = torch.float64 if backend == "reference" else torch.float32
    torch.manual_seed(0)
    attn = (
        ff.nn.T5SelfAttention(
            24, 3, 8, has_relative_attention_bias=True, is_decoder=True, num_buckets=8, max_distance=16
        )
        .to(dt)
        .eval()
    )
    x = torch.randn(2, sum(chunks), 24, dtype=dt)
    with torch.no_grad():
        full = attn(x)
        cache, parts, start = KVCache(capacity=4), [], 0
        for n in chunks:
            parts.append(attn(x[:, start : start + n], kv_cache=cache))
            start += n
    assert cache.length == x.shape[1]
    assert_close(torch.cat(parts, 1), full, dt, "incremental")


def test_kv_cache_with_key_padding_mask_covers_all_keys():
    attn = ff.nn.T5SelfAttention(16, 2, 8, has_relative_attention_bias=True, is_decoder=True).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 1] = False
    with torch.no_grad():
        full = attn(x, attn_mask=mask)
        cache = KVCache()
        a = attn(x[:, :3], attn_mask=mask[:, :3], kv_cache=cache)
        b = attn(x[:, 3:], attn_mask=mask, kv_cache=cache)  # the mask covers all 5 keys now
    assert_close(torch.cat([a, b], 1), full, torch.float64, "masked incremental")
    with pytest.raises(ValueError, match="attn_mask"):
        attn(x[:, :1], attn_mask=mask[:, :3], kv_cache=KVCache())
