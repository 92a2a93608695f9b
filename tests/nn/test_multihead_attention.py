"""ff.nn.MultiheadAttention vs torch.nn.MultiheadAttention after load_state_dict (kernels interpreted on CPU)."""

import pytest
import torch
from conftest import assert_close

import fastformer as ff


def _pair(E, H, device, **kw):
    ref = torch.nn.MultiheadAttention(E, H, **kw).to(device)
    ours = ff.nn.MultiheadAttention(E, H, **kw).to(device)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_matches_torch(batch_first, device):
    E, H, N, L = 32, 2, 2, 17
    ref, ours = _pair(E, H, device, batch_first=batch_first)
    x = torch.randn(N, L, E, device=device) if batch_first else torch.randn(L, N, E, device=device)
    kpm = torch.zeros(N, L, dtype=torch.bool, device=device)
    kpm[1, 11:] = True  # padding at the end: per-batch key-length fast path
    with ff.use_backend("triton"):
        out, w = ours(x, x, x, key_padding_mask=kpm, need_weights=False)
    expect, _ = ref(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert w is None
    assert_close(out, expect, torch.float32, "out")
    # parameter gradients agree too
    g = torch.randn_like(out)
    out.backward(g)
    expect.backward(g)
    for (name, p), (_, rp) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close(p.grad, rp.grad, torch.float32, name)


def test_mha_masks_kdim_and_causal(device):
    E, H, N, L, S = 32, 4, 2, 9, 13
    ref, ours = _pair(E, H, device, batch_first=True, kdim=24, vdim=20)
    q = torch.randn(N, L, E, device=device)
    k = torch.randn(N, S, 24, device=device)
    v = torch.randn(N, S, 20, device=device)
    attn_mask = torch.rand(L, S, device=device) > 0.7  # bool, True = blocked
    attn_mask[:, 0] = False
    kpm = torch.rand(N, S, device=device) > 0.8
    kpm[:, 0] = False
    with ff.use_backend("triton"):
        out, _ = ours(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    expect, _ = ref(q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, need_weights=False)
    assert_close(out, expect, torch.float32, "bool masks")
    fmask = torch.randn(N * H, L, S, device=device)
    with ff.use_backend("triton"):
        out, _ = ours(q, k, v, attn_mask=fmask, need_weights=False)
    expect, _ = ref(q, k, v, attn_mask=fmask, need_weights=False)
    assert_close(out, expect, torch.float32, "float 3-D mask")
    # causal self-attention with the is_causal hint
    ref2, ours2 = _pair(E, H, device, batch_first=True)
    x = torch.randn(N, L, E, device=device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)
    with ff.use_backend("triton"):
        out, _ = ours2(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    expect, _ = ref2(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)
    assert_close(out, expect, torch.float32, "causal")


def test_mha_need_weights_uses_reference():
    ref, ours = _pair(16, 2, "cpu")
    x = torch.randn(5, 2, 16)
    out, w = ours(x, x, x)
    expect, ew = ref(x, x, x)
    assert_close(out, expect, torch.float32)
    assert_close(w, ew, torch.float32)


@pytest.mark.parametrize("need_weights", [False, True])
def test_bad_masks_raise_like_torch(need_weights):
    """An integer key_padding_mask or a mask of the wrong shape raises a ValueError naming it that is
    also the exception type torch's module raises (AssertionError / RuntimeError), on the fused path
    and on torch's (need_weights=True) alike."""
    import fastformer as ff

    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    fm = ff.nn.MultiheadAttention(16, 4, batch_first=True)
    kpm = torch.zeros(2, 6, dtype=torch.long)
    kw = dict(need_weights=need_weights)
    with pytest.raises(AssertionError, match="key_padding_mask"):
        fm(x, x, x, key_padding_mask=kpm, **kw)
    with pytest.raises(ValueError, match="key_padding_mask"):
        fm(x, x, x, key_padding_mask=kpm.bool()[:, :5], **kw)
    with pytest.raises(RuntimeError, match="attn_mask"):
        fm(x, x, x, attn_mask=torch.zeros(6, 5, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="attn_mask"):
        fm(x, x, x, attn_mask=torch.zeros(6, 6, dtype=torch.int32), **kw)
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(S,\)"):
        fm(x[0], x[0], x[0], key_padding_mask=torch.zeros(1, 6, dtype=torch.bool), **kw)
