"""torch.compile over code that calls fastformer ops: each op is one opaque call (a graph break), so
compiling works and gives what eager gives, on the kernel path (interpreted here) and the reference."""

import pytest
import torch
from conftest import assert_close

import fastformer as ff


def _loss(q, k, v, table, x, t, w):
    a = ff.scaled_dot_product_attention(q, k, v, is_causal=True)
    b = ff.t5_attention(q, k, v, table)
    c = ff.varlen_attention(
        q[0].transpose(0, 1),
        k[0].transpose(0, 1),
        v[0].transpose(0, 1),
        torch.tensor([0, 5, 12], dtype=torch.int32),
        torch.tensor([0, 5, 12], dtype=torch.int32),
        7,
        7,
    )
    return a.square().sum() + b.sum() + c.sum() + ff.cross_entropy(x, t) + ff.linear_cross_entropy(x, w, t)


@pytest.mark.parametrize("backend_name", ["triton", "reference"])
def test_ops_under_torch_compile(backend_name):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 12, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(32, 2, requires_grad=True)
    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    t = torch.randint(0, 16, (6,))
    leaves = (q, k, v, table, x, w)
    with ff.use_backend(backend_name):
        eager = _loss(q, k, v, table, x, t, w)
        g_eager = torch.autograd.grad(eager, leaves)
        torch._dynamo.reset()
        compiled = torch.compile(_loss, backend="eager")(q, k, v, table, x, t, w)
        g_comp = torch.autograd.grad(compiled, leaves)
    assert_close(compiled, eager, torch.float32, "loss")
    for a, b in zip(g_comp, g_eager):
        assert_close(a, b, torch.float32, "grad")


def test_bert_mlm_under_torch_compile():
    from fastformer.models.bert import BertConfig, BertForMaskedLM
    from fastformer.models.presets import get_preset

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**dict(get_preset("bert-tiny"), vocab_size=300))).eval()
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, ::2] = -100
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    torch._dynamo.reset()
    eager = model(ids, mask, labels)
    compiled = torch.compile(model, backend="eager")(ids, mask, labels)
    assert compiled[1] == eager[1]  # predicted rows
    assert_close(compiled[0], eager[0], torch.float32, "loss sum")


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_cpu_paths_compile_as_one_graph(backend):
    """Only the kernel paths are opaque: on CPU tensors (torch's fused CPU kernels or the eager
    reference) sdpa, t5_attention, cross_entropy and nn.MultiheadAttention trace into one graph, so
    fullgraph=True keeps working (README, docs/design.md), forward and backward."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    x, t = torch.randn(6, 10, requires_grad=True), torch.randint(0, 10, (6,))
    table = torch.randn(32, 2)
    mha = ff.nn.MultiheadAttention(16, 2, batch_first=True)

    def f(q, x, t):
        seq = q[0].transpose(0, 1).reshape(1, 8, 32)[..., :16]
        return (
            ff.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
            + ff.t5_attention(q, q, q, table, bidirectional=False).sum()
            + ff.cross_entropy(x, t)
            + mha(seq, seq, seq, need_weights=False)[0].sum()
        )

    torch._dynamo.reset()
    with ff.use_backend(backend):
        out = torch.compile(f, backend="aot_eager", fullgraph=True)(q, x, t)
        want = f(q, x, t)
        assert_close(out, want, torch.float32)
        got_grads = torch.autograd.grad(out, (q, x))
        want_grads = torch.autograd.grad(want, (q, x))
    for g, w in zip(got_grads, want_grads):
        assert_close(g, w, torch.float32, "gradient")
