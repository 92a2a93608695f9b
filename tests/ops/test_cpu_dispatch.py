"""Backend "auto" on CPU tensors runs torch's own fused CPU attention (SDPA) instead of the eager
reference: same values and gradients as the reference, and the reference stays what "reference" runs."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff


def _both(fn, *tensors):
    """fn under auto and under reference on fresh leaves: [(out, grads)] x 2, one upstream gradient."""
    results = []
    g = None
    for backend in ("auto", "reference"):
        leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in tensors]
        torch.manual_seed(0)
        with ff.use_backend(backend):
            out = fn(*leaves)
        g = torch.randn_like(out) if g is None else g
        wrt = [t for t in leaves if t.requires_grad]
        results.append((out, torch.autograd.grad(out, wrt, g, allow_unused=True)))
    return results


def _match(fn, *tensors, dtype=torch.float32):
    (out, grads), (ref, ref_grads) = _both(fn, *tensors)
    assert_close(out, ref, dtype, "out")
    for i, (a, b) in enumerate(zip(grads, ref_grads)):
        if b is None:
            assert a is None or not a.any()
        else:
            assert_close(a, b, dtype, f"grad {i}")


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of torch's SDPA from fastformer's ops."""
    from fastformer.ops.attention_common import torch_sdpa_usable

    assert torch_sdpa_usable()  # torch >= 2.5 here
    n = {"sdpa": 0}
    real = F.scaled_dot_product_attention

    def counting(*a, **k):
        n["sdpa"] += 1
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)  # the ops call it as F.<name>
    return n


def test_auto_on_cpu_runs_torchs_sdpa_and_reference_does_not(calls):
    q = torch.randn(2, 3, 9, 8)
    table = torch.randn(32, 3, requires_grad=True)
    with ff.use_backend("auto"):
        ff.scaled_dot_product_attention(q, q, q)
        assert calls["sdpa"] == 1
        ff.t5_attention(q, q, q, table)  # a trainable table: the reference (torch has no fused grad)
        assert calls["sdpa"] == 1
        ff.t5_attention(q, q, q, table.detach())
    assert calls["sdpa"] == 2
    with ff.use_backend("reference"):
        ff.scaled_dot_product_attention(q, q, q)
        ff.t5_attention(q, q, q, torch.randn(32, 3))
    assert calls["sdpa"] == 2


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "causal",
        "key_padding",
        "bool_mask",
        "float_mask_grad",
        "gqa",
        "broadcast_batch",
        "mask_and_causal",
        "empty_rows",
        "3d",
        "cross_lengths",
    ],
)
def test_sdpa_auto_matches_reference(case):
    q, k, v = torch.randn(2, 4, 13, 16), torch.randn(2, 4, 21, 16), torch.randn(2, 4, 21, 16)
    kw, extra = {}, []
    if case == "causal":
        kw["is_causal"] = True
    elif case == "key_padding":
        m = torch.ones(2, 1, 1, 21, dtype=torch.bool)
        m[1, ..., 11:] = False
        kw["attn_mask"] = m
    elif case in ("bool_mask", "mask_and_causal", "empty_rows"):
        m = torch.rand(2, 1, 13, 21) > 0.3
        if case == "empty_rows":
            m[:, :, 4] = False
        kw["attn_mask"] = m
        kw["is_causal"] = case == "mask_and_causal"
    elif case == "float_mask_grad":
        extra = [torch.randn(1, 4, 13, 21)]
    elif case == "gqa":
        k, v = k[:, :2], v[:, :2]
        kw["enable_gqa"] = True
    elif case == "broadcast_batch":
        q = q[0]  # (H, Lq, D) against (B, H, Lk, D)
    elif case == "3d":
        q, k, v = q[0], k[0], v[0]
    elif case == "cross_lengths":
        kw["is_causal"] = True
        q = torch.randn(2, 4, 30, 16)
    if extra:
        _match(lambda a, b, c, m: ff.scaled_dot_product_attention(a, b, c, attn_mask=m, **kw), q, k, v, *extra)
    else:
        _match(lambda a, b, c: ff.scaled_dot_product_attention(a, b, c, **kw), q, k, v)


@pytest.mark.parametrize("decoder", [False, True])
def test_t5_auto_matches_reference(decoder):
    q, k, v = torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8), torch.randn(2, 3, 11, 8)
    table = torch.randn(32, 3)
    m = torch.ones(2, 1, 1, 11, dtype=torch.bool)
    m[0, ..., 7:] = False
    _match(
        lambda a, b, c, t: ff.t5_attention(a, b, c, t, bidirectional=not decoder, is_causal=decoder, attn_mask=m),
        q,
        k,
        v,
        table,
    )
    fm = torch.randn(1, 3, 11, 11)
    _match(lambda a, b, c, t: ff.t5_attention(a, b, c, t, attn_mask=fm, scale=0.5), q, k, v, table)
    _match(
        lambda a, b, c: ff.t5_attention(a, b, c, table, bidirectional=not decoder, is_causal=decoder, attn_mask=m),
        q,
        k,
        v,
    )  # frozen table: torch's SDPA


def test_varlen_auto_matches_reference():
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32)
    q, k = torch.randn(17, 4, 8), torch.randn(17, 2, 8)
    _match(lambda a, b, c: ff.varlen_attention(a, b, c, cu, cu, 12, 12, causal=True), q, k, k.clone())


def test_bf16_auto_matches_reference():
    q, k, v = (torch.randn(2, 2, 9, 16, dtype=torch.bfloat16) for _ in range(3))
    _match(lambda a, b, c: ff.scaled_dot_product_attention(a, b, c, is_causal=True), q, k, v, dtype=torch.bfloat16)


def test_dropout_on_cpu_auto():
    q = torch.randn(1, 2, 64, 16, requires_grad=True)
    with ff.use_backend("auto"):
        out = ff.scaled_dot_product_attention(q, q, q, dropout_p=1.0)
        assert not out.any()
        torch.manual_seed(1)
        a = ff.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
        torch.manual_seed(1)
        b = F.scaled_dot_product_attention(q, q, q, dropout_p=0.3)
    assert torch.equal(a, b)  # torch's own dropout, reproducible with torch.manual_seed


def test_cross_entropy_auto_matches_reference():
    x = torch.randn(33, 50)
    t = torch.randint(0, 50, (33,))
    _match(lambda a: ff.cross_entropy(a, t, label_smoothing=0.1, z_loss=1e-3), x)


def test_the_fast_path_rests_on_torchs_empty_row_semantics():
    """The version gate of torch_sdpa_usable stands for this behaviour: a row with no visible key gives
    zeros and finite gradients in torch's SDPA."""
    q = torch.ones(1, 1, 2, 4, requires_grad=True)
    mask = torch.tensor([[True, True], [False, False]])
    out = F.scaled_dot_product_attention(q, q, q, attn_mask=mask, enable_gqa=False)
    out.sum().backward()
    assert torch.equal(out[0, 0, 1], torch.zeros(4)) and torch.isfinite(q.grad).all()


def test_auto_on_cpu_compiles_as_one_graph():
    q = torch.randn(1, 2, 8, 16)
    m = torch.rand(1, 1, 8, 8) > 0.2
    f = lambda q: ff.scaled_dot_product_attention(q, q, q, attn_mask=m).sum()
    torch._dynamo.reset()
    with ff.use_backend("auto"):
        assert_close(torch.compile(f, backend="eager", fullgraph=True)(q), f(q), torch.float32)
