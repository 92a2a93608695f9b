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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("target_kind", ["index", "probabilities"])
def test_linear_cross_entropy_cpu_compiles_as_one_graph(dtype, reduction, target_kind):
    """On CPU tensors linear_cross_entropy's chunked path is a custom op under torch.compile
    (ops/linear_cross_entropy_op.py): fullgraph=True traces it, and loss and gradients are eager's,
    bit for bit (the same chunk loop runs), with ignored rows, smoothing, z-loss and several chunks."""
    torch.manual_seed(1)
    # a non-contiguous input: (3, 7, 16) seen through a transpose
    x = torch.randn(7, 3, 16, dtype=dtype).transpose(0, 1).requires_grad_()
    w = torch.randn(40, 16, dtype=dtype, requires_grad=True)
    b = torch.randn(40, dtype=dtype, requires_grad=True)
    if target_kind == "index":
        t = torch.randint(0, 40, (3, 7))
        t[0, 3] = t[2, :4] = -100
    else:
        t = torch.softmax(torch.randn(3, 7, 40), -1).to(dtype)

    def f(x, w, b, t):
        loss = ff.linear_cross_entropy(x, w, t, b, reduction=reduction, label_smoothing=0.1, z_loss=1e-3, chunk_size=5)
        # a per-row grad_output that is not all ones, for "none"
        return (
            (loss * torch.linspace(0.5, 2.0, loss.numel()).reshape(loss.shape)).sum()
            if reduction == "none"
            else 3 * loss
        )

    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w, b, t)
    want = f(x, w, b, t)
    assert torch.equal(got, want)
    for g, w_ in zip(torch.autograd.grad(got, (x, w, b)), torch.autograd.grad(want, (x, w, b))):
        assert g.dtype == w_.dtype and torch.equal(g, w_)


def test_linear_cross_entropy_cpu_compiles_with_inductor_and_frozen_inputs():
    """Inductor too, with only the projection trainable (no grad_x is made) and no bias."""
    torch.manual_seed(2)
    x, w = torch.randn(20, 8), torch.randn(30, 8, requires_grad=True)
    t = torch.randint(0, 30, (20,))

    def f(x, w, t):
        return ff.linear_cross_entropy(torch.tanh(x), w, t)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True)(x, w, t)
    want = f(x, w, t)
    assert_close(got, want, torch.float32, "loss")
    assert_close(torch.autograd.grad(got, w)[0], torch.autograd.grad(want, w)[0], torch.float32, "grad_W")


def test_linear_cross_entropy_custom_ops_pass_opcheck():
    """torch.library.opcheck: schema, fake (meta) shapes against the real outputs, autograd registration."""
    from fastformer.ops.linear_cross_entropy_op import linear_cross_entropy_op, linear_cross_entropy_rows_backward

    torch.manual_seed(3)
    x, w, b = torch.randn(9, 16, requires_grad=True), torch.randn(40, 16, requires_grad=True), torch.randn(40)
    t = torch.randint(0, 40, (9,))
    t[2] = -100
    probs = torch.softmax(torch.randn(9, 40), -1)
    for reduction in ("mean", "sum", "none"):
        for target, bias in ((t, b), (probs, None)):
            torch.library.opcheck(
                linear_cross_entropy_op, (x, w, bias, target, -100, reduction, 0.1, 0.0, True, True, False, False, 4)
            )
    x_t = torch.randn(16, 9).t().requires_grad_()  # (9, 16) with strides (1, 9): strides the fakes must give
    for reduction in ("mean", "none"):
        torch.library.opcheck(
            linear_cross_entropy_op, (x_t, w, b, t, -100, reduction, 0.0, 0.0, True, True, True, False, None)
        )
    torch.library.opcheck(
        linear_cross_entropy_rows_backward,
        (torch.randn(9), x_t.detach(), w.detach(), b, t, -100, 0.0, 0.0, True, True, True, False, 2),
    )
    torch.library.opcheck(
        linear_cross_entropy_rows_backward,
        (torch.randn(9), x.detach(), w.detach(), b, t, -100, 0.0, 1e-3, True, False, True, False, None),
    )
