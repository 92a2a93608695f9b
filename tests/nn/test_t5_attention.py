"""ff.nn.T5SelfAttention / T5CrossAttention against Hugging Face's T5Attention given the same weights.

Output and every parameter's gradient (including relative_attention_bias.weight, shared by two layers
the way T5 shares it) must agree, for the encoder (bidirectional buckets) and the decoder (causal,
unidirectional buckets), with key padding. HF runs in float64 from a tiny local T5Config (nothing is
downloaded).
"""

import pytest
import torch
from conftest import assert_close

import fastformer as ff

transformers = pytest.importorskip("transformers")
from transformers import T5Config  # noqa: E402
from transformers.models.t5.modeling_t5 import T5Attention  # noqa: E402

D_MODEL, HEADS, D_KV = 32, 2, 16  # head dim 16: the smallest the fused kernels take
NUM_BUCKETS, MAX_DISTANCE = 16, 20  # small max_distance so L=37 reaches the logarithmic buckets


def _precision(backend):
    """(dtype fed to the fastformer module, dtype whose tolerance applies).

    The triton backend runs the kernels, which take fp16/bf16/fp32 (fp32 dots are exact in the CPU
    interpreter, tf32 on a GPU: the conftest fp32 tolerance covers both), so it gets fp32 inputs.
    The reference backend computes in the input dtype, so float64 in, float64 tolerance."""
    if backend == "triton":
        return torch.float32, torch.float32
    return torch.float64, torch.float64


def _config(is_decoder):
    cfg = T5Config(
        d_model=D_MODEL,
        d_kv=D_KV,
        num_heads=HEADS,
        d_ff=64,
        num_layers=2,
        relative_attention_num_buckets=NUM_BUCKETS,
        relative_attention_max_distance=MAX_DISTANCE,
        dropout_rate=0.0,
        is_decoder=is_decoder,
        vocab_size=50,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _padding(batch, length):
    """bool (B, L), True = real token; batch 0 unpadded, the others right-padded by random amounts."""
    keep = torch.ones(batch, length, dtype=torch.bool)
    for b in range(1, batch):
        keep[b, int(torch.randint(1, length, ())) :] = False
    return keep


def _additive(keep, lq, causal, dtype):
    """HF eager mask: float (B, 1, Lq, Lk), 0 where attending, a huge negative elsewhere."""
    allowed = keep[:, None, None, :].expand(-1, 1, lq, -1)
    if causal:
        allowed = allowed & torch.ones(lq, keep.shape[1], dtype=torch.bool).tril()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


@pytest.mark.parametrize("is_decoder", [False, True], ids=["encoder", "decoder"])
def test_self_attention_matches_hf_with_shared_table(backend, device, is_decoder):
    dtype, tol_dtype = _precision(backend)
    cfg = _config(is_decoder)
    B, L = 3, 37
    hf0 = T5Attention(cfg, has_relative_attention_bias=True, layer_idx=0).double()
    hf1 = T5Attention(cfg, has_relative_attention_bias=False, layer_idx=1).double()
    # std 0.2: scores of std ~2 (sharper than HF's init) that stay well conditioned; measured here,
    # eager fp32 gradients agree with float64 to ~2e-6 (std 0.3 amplified fp32 rounding to ~4e-5)
    for p in list(hf0.parameters()) + list(hf1.parameters()):
        torch.nn.init.normal_(p, std=0.2)
    ours0 = ff.nn.T5SelfAttention(
        D_MODEL,
        HEADS,
        D_KV,
        has_relative_attention_bias=True,
        is_decoder=is_decoder,
        num_buckets=NUM_BUCKETS,
        max_distance=MAX_DISTANCE,
        dtype=torch.float64,
    )
    ours1 = ff.nn.T5SelfAttention(
        D_MODEL,
        HEADS,
        D_KV,
        is_decoder=is_decoder,
        num_buckets=NUM_BUCKETS,
        max_distance=MAX_DISTANCE,
        dtype=torch.float64,
    )
    ours0.load_state_dict(hf0.state_dict())  # HF parameter names load as they are
    ours1.load_state_dict(hf1.state_dict())
    ours0.to(device, dtype), ours1.to(device, dtype)

    keep = _padding(B, L)
    x = torch.randn(B, L, D_MODEL, dtype=torch.float64)
    g0, g1 = torch.randn(B, L, D_MODEL, dtype=torch.float64), torch.randn(B, L, D_MODEL, dtype=torch.float64)

    # HF: the first layer computes the position bias, the second layer receives it (T5's sharing).
    xh = x.clone().requires_grad_()
    mask = _additive(keep, L, is_decoder, torch.float64)
    out0, position_bias = hf0(xh, mask=mask)[:2]
    out1 = hf1(out0, mask=mask, position_bias=position_bias)[0]
    ((out0 * g0).sum() + (out1 * g1).sum()).backward()

    # fastformer: the first layer owns the table, the second gets it as an argument.
    xf = x.to(device, dtype).requires_grad_()
    attn_mask = keep[:, None, None, :].to(device)
    y0 = ours0(xf, attn_mask=attn_mask)
    y1 = ours1(y0, attn_mask=attn_mask, bias_table=ours0.bias_table)
    ((y0 * g0.to(device, dtype)).sum() + (y1 * g1.to(device, dtype)).sum()).backward()

    assert "relative_attention_bias" not in dict(ours1.named_parameters()) and not hasattr(
        ours1, "relative_attention_bias"
    )
    assert_close(y0, out0, tol_dtype, "layer 0 output")
    assert_close(y1, out1, tol_dtype, "layer 1 output")
    assert_close(xf.grad, xh.grad, tol_dtype, "grad hidden_states")
    for ours, hf, tag in ((ours0, hf0, "layer 0"), (ours1, hf1, "layer 1")):
        ours_g, hf_g = _grads(ours), _grads(hf)
        assert ours_g.keys() == hf_g.keys()
        for name in hf_g:
            assert_close(ours_g[name], hf_g[name], tol_dtype, f"{tag} grad {name}")
    assert ours0.relative_attention_bias.weight.grad.abs().sum() > 0


def test_cross_attention_matches_hf(backend, device):
    dtype = torch.float64 if backend == "reference" else torch.float32
    cfg = _config(is_decoder=True)
    B, Lq, Lk = 2, 19, 45
    hf = T5Attention(cfg, has_relative_attention_bias=False, layer_idx=0).double()
    for p in hf.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ours = ff.nn.T5CrossAttention(D_MODEL, HEADS, D_KV, dtype=torch.float64)
    ours.load_state_dict(hf.state_dict())
    ours.to(device, dtype)
    keep = _padding(B, Lk)
    x, enc = torch.randn(B, Lq, D_MODEL, dtype=torch.float64), torch.randn(B, Lk, D_MODEL, dtype=torch.float64)
    g = torch.randn(B, Lq, D_MODEL, dtype=torch.float64)

    xh, eh = x.clone().requires_grad_(), enc.clone().requires_grad_()
    out = hf(xh, mask=_additive(keep, Lq, False, torch.float64), key_value_states=eh)[0]
    (out * g).sum().backward()

    xf, ef = x.to(device, dtype).requires_grad_(), enc.to(device, dtype).requires_grad_()
    y = ours(xf, ef, attn_mask=keep.to(device))  # the (B, Lk) HF-style layout is accepted too
    (y * g.to(device, dtype)).sum().backward()

    assert_close(y, out, dtype, "output")
    assert_close(xf.grad, xh.grad, dtype, "grad hidden_states")
    assert_close(ef.grad, eh.grad, dtype, "grad key_value_states")
    hf_g = _grads(hf)
    for name, grad in _grads(ours).items():
        assert_close(grad, hf_g[name], dtype, f"grad {name}")


def test_bad_input_raises_value_error():
    first = ff.nn.T5SelfAttention(D_MODEL, HEADS, D_KV, has_relative_attention_bias=True)
    later = ff.nn.T5SelfAttention(D_MODEL, HEADS, D_KV)
    x = torch.randn(2, 9, D_MODEL)
    with pytest.raises(ValueError, match="bias_table"):
        later(x)
    with pytest.raises(ValueError, match="bias_table"):
        first(x, bias_table=first.bias_table)
    with pytest.raises(ValueError, match="attn_mask"):
        first(x, attn_mask=torch.ones(2, 1, 9, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        first(x, attn_mask=torch.zeros(2, 9))  # float additive masks are not key-padding masks
    with pytest.raises(ValueError, match="hidden_states"):
        first(torch.randn(2, 9, D_MODEL + 1))
    with pytest.raises(ValueError, match="key_value_states"):
        ff.nn.T5CrossAttention(D_MODEL, HEADS, D_KV)(x, torch.randn(3, 5, D_MODEL))
    with pytest.raises(AttributeError):
        _ = later.bias_table
