"""The CPU training path of BERT's attention (models/_cpu_attention.py) against a float64 reference
with the same dropout mask, and the one-pass CPU dropout of the compiled extension."""

import math

import pytest
import torch

from fastformer.models import _cpu_attention as ca
from fastformer.models.bert import BertConfig, BertForMaskedLM, Dropout

needs_ext = pytest.mark.skipif(not ca.has_fused_dropout(), reason="the compiled extension is not built")


@pytest.fixture(params=["fused", "lanes"])
def mask_source(request, monkeypatch):
    """Run a test with the extension's dropout and with the pure-torch lanes."""
    if request.param == "fused":
        if not ca.has_fused_dropout():
            pytest.skip("the compiled extension is not built")
    else:
        monkeypatch.setitem(ca._FUSED, "ok", False)
    return request.param


def _keep_for(shape, p, seed, source):
    """The 0 or 1/(1-p) factors the attention draws after torch.manual_seed(seed), in float64."""
    torch.manual_seed(seed)
    if source == "fused":
        _, keep = torch.ops.fastformer.dropout_cpu(torch.ones(shape), p, ca._seed(torch.device("cpu")))
        return keep.double() * ca.keep_scale(p)
    return ca.keep_mask(shape, p, "cpu").double() * ca.keep_scale(p)


def _reference(qkv, h, keep, lengths):
    """softmax(q k^T / sqrt(d) + key mask) * keep @ v in float64; keep: (h, B, L, L) or None."""
    B, L, H3 = qkv.shape
    d = H3 // (3 * h)
    q, k, v = qkv.view(B, L, 3, h, d).permute(2, 3, 0, 1, 4).unbind(0)  # (h, B, L, d)
    s = q @ k.transpose(-1, -2) / math.sqrt(d)
    if lengths is not None:
        valid = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]  # (B, L)
        s = s.masked_fill(~valid[None, :, None, :], float("-inf"))
    w = torch.softmax(s, -1)
    if keep is not None:
        w = w * keep
    return (w @ v).permute(1, 2, 0, 3).reshape(B, L, h * d)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("lengths", [None, (7, 3, 1)])
def test_attention_matches_float64_reference_with_the_same_mask(p, lengths, mask_source):
    B, L, h, d = 3, 7, 3, 5
    torch.manual_seed(0)
    qkv = torch.randn(B, L, 3 * h * d, dtype=torch.float64, requires_grad=True)
    mask = None if lengths is None else (torch.arange(L)[None, :] < torch.tensor(lengths)[:, None])[:, None, None, :]
    assert ca.usable(qkv, mask)
    torch.manual_seed(11)
    out = ca.self_attention_dropout(qkv, h, p, mask)
    keep = _keep_for((h, B, L, L), p, 11, mask_source) if p > 0 else None
    ref = _reference(qkv, h, keep, lengths)
    g = torch.randn_like(out)
    (gx,) = torch.autograd.grad(out, qkv, g)
    (gr,) = torch.autograd.grad(ref, qkv, g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gr, rtol=1e-11, atol=1e-11)
    if p > 0:
        kept = (keep != 0).double().mean().item()
        assert 0.5 < kept < 0.9  # 441 draws around 0.7


def test_attention_refuses_what_it_cannot_do():
    qkv = torch.randn(2, 4, 12)
    assert not ca.usable(qkv.bfloat16(), None)
    empty_row = torch.tensor([[True, True, False, False], [False] * 4])[:, None, None, :]
    assert not ca.usable(qkv, empty_row)  # a sequence without keys: ff's attention gives zeros there


def test_model_training_on_cpu_takes_the_path_and_stays_finite(monkeypatch):
    calls = []
    real = ca.self_attention_dropout

    def spy(*a, **k):
        calls.append(a[0].shape)
        return real(*a, **k)

    monkeypatch.setattr(ca, "self_attention_dropout", spy)
    cfg = BertConfig(vocab_size=97, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=40, max_position=32)
    model = BertForMaskedLM(cfg).train()
    ids = torch.randint(5, 97, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask[2, 14:] = False  # little padding: the padded layout, with a key mask
    mask[1, 0:] = True
    labels = torch.where(torch.rand(3, 16) < 0.3, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    loss, n, _, _ = model(ids, mask, labels)
    (loss / n).backward()
    assert len(calls) == 2 and torch.isfinite(loss)
    assert all(torch.isfinite(p.grad.to_dense()).all() for p in model.parameters() if p.grad is not None)
    calls.clear()
    model.eval()
    model(ids, mask, labels)
    assert not calls  # no dropout: torch's SDPA


@needs_ext
@pytest.mark.parametrize("n", [1, 3, 4, 4097, 100003])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_dropout_rate_scale_tail_and_backward(n, dtype):
    p = 0.25
    x = torch.randn(n, dtype=dtype)
    out, keep = torch.ops.fastformer.dropout_cpu(x, p, torch.tensor(12345))
    assert keep.dtype == torch.bool and keep.shape == x.shape
    scale = ca.keep_scale(p)
    torch.testing.assert_close(out, torch.where(keep, x * scale, torch.zeros_like(x)), rtol=0, atol=0)
    if n > 4096:
        assert abs(keep.double().mean().item() - 0.75) < 5 * math.sqrt(0.75 * 0.25 / n)
    g = torch.randn(n, dtype=dtype)
    gb = torch.ops.fastformer.dropout_cpu_backward(g, keep, scale)
    torch.testing.assert_close(gb, torch.where(keep, g * scale, torch.zeros_like(g)), rtol=0, atol=0)


@needs_ext
def test_fused_dropout_masks_follow_the_seed_not_the_threads():
    x = torch.randn(64, 1000)
    seed = torch.tensor(-7)
    a = torch.ops.fastformer.dropout_cpu(x, 0.1, seed)[1]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = torch.ops.fastformer.dropout_cpu(x, 0.1, seed)[1]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.ops.fastformer.dropout_cpu(x, 0.1, torch.tensor(8))[1])
    # neighbouring lanes and groups are not correlated: the 4 lanes of a group keep at the same rate,
    # and pairs of neighbours are kept together as often as independence says
    m = torch.ops.fastformer.dropout_cpu(torch.ones(400_000), 0.5, torch.tensor(3))[1].double()
    per_lane = m.view(-1, 4).mean(0)
    assert (per_lane - 0.5).abs().max() < 0.01
    assert abs((m[1:] * m[:-1]).mean().item() - 0.25) < 0.005


@needs_ext
def test_fused_dropout_refuses_bad_input():
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.fastformer.dropout_cpu(torch.ones(4, dtype=torch.bfloat16), 0.1, torch.tensor(1))
    with pytest.raises(RuntimeError, match="p must be"):
        torch.ops.fastformer.dropout_cpu(torch.ones(4), 1.0, torch.tensor(1))
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.fastformer.dropout_cpu(torch.ones(4, 4).t(), 0.1, torch.tensor(1))


def test_dropout_module_is_reproducible_and_its_gradient_is_the_mask(mask_source):
    drop = Dropout(0.2).train()
    x = torch.randn(33, 17, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    assert torch.equal(y, drop(x))
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    torch.testing.assert_close(g, (y != 0).double() * ca.keep_scale(0.2), rtol=0, atol=0)
