"""Forms of input torch accepts at the edges of the ops' contract: narrow integer targets, a one-element
target for an unbatched input, a tensor label_smoothing, no rows or no classes, a 1-D input to
linear_cross_entropy, head dim 0; torch.func transforms; and double backward, which the kernel paths
refuse rather than returning a gradient without its second-order term. Both backends, torch oracle."""

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff
from fastformer.reference.t5_attention import t5_attention_reference


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16])
def test_narrow_integer_targets_are_read_as_written(backend, dtype):
    # uint8(-100) == 156 and int8 compares wrap: the values must be compared as the integers they are
    C = 300 if dtype == torch.int16 else 200
    x = torch.randn(4, C, dtype=torch.float64, requires_grad=True)
    values = [156, 3, 7, 100] if dtype == torch.uint8 else [-100, 3, 7, 100]
    t = torch.tensor(values, dtype=dtype)
    want = F.cross_entropy(x, t.long())
    out = ff.cross_entropy(x, t)
    assert_close(out, want, torch.float64, "loss")
    assert_close(torch.autograd.grad(out, x)[0], torch.autograd.grad(want, x)[0], torch.float64, "grad")
    h, W = torch.randn(4, 5, dtype=torch.float64), torch.randn(C, 5, dtype=torch.float64)
    assert_close(ff.linear_cross_entropy(h, W, t), F.cross_entropy(F.linear(h, W), t.long()), torch.float64, "lce")
    big = torch.tensor([C - 1], dtype=torch.int16 if dtype == torch.int16 else torch.uint8)
    ff.cross_entropy(torch.randn(1, C), big)  # the last class is in range however C compares in 8 bits


def test_one_element_target_and_tensor_label_smoothing(backend):
    x = torch.randn(7)
    for reduction in ("mean", "sum", "none"):
        want = F.cross_entropy(x, torch.tensor([2]), reduction=reduction)
        out = ff.cross_entropy(x, torch.tensor([2]), reduction=reduction)
        assert out.shape == want.shape == ()
        assert_close(out, want, torch.float32, "loss")
    x, t = torch.randn(3, 5), torch.tensor([2, 1, 0])
    eps = torch.tensor(0.1)
    assert_close(ff.cross_entropy(x, t, label_smoothing=eps), F.cross_entropy(x, t, label_smoothing=eps), torch.float32)
    h, W = torch.randn(3, 4), torch.randn(5, 4)
    assert_close(
        ff.linear_cross_entropy(h, W, t, label_smoothing=eps),
        F.cross_entropy(F.linear(h, W), t, label_smoothing=0.1),
        torch.float32,
    )
    with pytest.raises(ValueError, match="label_smoothing"):
        ff.cross_entropy(x, t, label_smoothing=torch.tensor([0.1]))


def test_no_rows_and_no_classes(backend):
    x = torch.randn(0, 5, 3, requires_grad=True)
    out = ff.cross_entropy(x, torch.zeros(0, 3, dtype=torch.long), reduction="sum")
    assert out.item() == 0.0
    out.backward()
    assert x.grad.shape == x.shape
    assert ff.cross_entropy(torch.randn(0, 5, 3), torch.rand(0, 5, 3), reduction="none").shape == (0, 3)
    empty = torch.zeros(0, dtype=torch.long)
    assert ff.cross_entropy(torch.randn(0, 0), empty, reduction="sum").item() == 0.0
    assert ff.cross_entropy(torch.randn(0, 0), empty).item() == 0.0  # "mean" of no rows: 0 (documented)
    assert ff.cross_entropy(torch.randn(0, 0), empty, reduction="none").shape == (0,)
    with pytest.raises(ValueError, match="at least one class"):
        ff.cross_entropy(torch.randn(2, 0), torch.zeros(2, dtype=torch.long))


def test_linear_cross_entropy_unbatched_input(backend):
    h = torch.randn(4, dtype=torch.float64, requires_grad=True)
    W = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(3)
    out = ff.linear_cross_entropy(h, W, t)
    want = F.cross_entropy(F.linear(h, W), t)
    assert out.shape == ()
    assert_close(out, want, torch.float64, "loss")
    for reduction in ("mean", "none"):  # a one-element target, as cross_entropy(F.linear(h, W), t) takes
        one = ff.linear_cross_entropy(h, W, t.reshape(1), reduction=reduction)
        assert one.shape == () and torch.equal(one, ff.linear_cross_entropy(h, W, t, reduction=reduction))
    for a, b in zip(torch.autograd.grad(out, (h, W)), torch.autograd.grad(want, (h, W))):
        assert_close(a, b, torch.float64, "grad")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_hidden_size_zero(backend, reduction):
    # F.linear of an (N, 0) input is the bias alone; torch's cross_entropy of it is finite
    h = torch.randn(2, 3, 0, dtype=torch.float64, requires_grad=True)
    W = torch.randn(10, 0, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[1, 2, 3], [0, 9, -100]])
    out = ff.linear_cross_entropy(h, W, t, b, reduction=reduction)
    want = F.cross_entropy(F.linear(h, W, b).transpose(1, 2), t, reduction=reduction)
    assert out.shape == want.shape
    assert_close(out, want, torch.float64, "loss")
    got = torch.autograd.grad(out.sum(), (h, W, b))
    for a, w in zip(got, torch.autograd.grad(want.sum(), (h, W, b))):
        assert a.shape == w.shape
        assert_close(a, w, torch.float64, "grad")


def test_head_dim_zero_with_the_default_scale(backend):
    q, k, v = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 4, 0), torch.randn(1, 2, 4, 5)
    want = F.scaled_dot_product_attention(q, k, v)  # every score 0: the average of the values
    assert_close(ff.scaled_dot_product_attention(q, k, v), want, torch.float32)
    out = ff.t5_attention(q, k, v, torch.zeros(32, 2), scale=None)
    assert_close(out, want, torch.float32)


def test_t5_attention_checks_scale_and_bidirectional():
    q = torch.randn(1, 2, 4, 8)
    table = torch.randn(32, 2)
    for scale in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale"):
            ff.t5_attention(q, q, q, table, scale=scale)
    with pytest.raises(ValueError, match="bidirectional"):
        ff.t5_attention(q, q, q, table, bidirectional="False")  # a non-empty string would read as True


def test_torch_func_transforms(backend):
    x, t = torch.randn(3, 4, 6, dtype=torch.float64), torch.randint(0, 6, (3, 4))
    assert_close(torch.vmap(ff.cross_entropy)(x, t), torch.vmap(F.cross_entropy)(x, t), torch.float64)
    h, W = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    tt = torch.randint(0, 7, (5,))
    got = torch.func.grad(lambda z: ff.linear_cross_entropy(z, W, tt))(h)
    assert_close(got, torch.func.grad(lambda z: F.cross_entropy(F.linear(z, W), tt))(h), torch.float64)
    got = torch.func.grad(lambda w: ff.linear_cross_entropy(h, w, tt))(W)
    assert_close(got, torch.func.grad(lambda w: F.cross_entropy(F.linear(h, w), tt))(W), torch.float64)
    q = torch.randn(2, 2, 5, 8)
    assert_close(
        torch.vmap(ff.scaled_dot_product_attention)(q, q, q),
        torch.vmap(F.scaled_dot_product_attention)(q, q, q),
        torch.float32,
    )
    table = torch.randn(32, 2)
    got = torch.func.grad(lambda z: ff.t5_attention(z, q, q, table).sum())(q)
    assert_close(got, torch.func.grad(lambda z: t5_attention_reference(z, q, q, table).sum())(q), torch.float32)


def _gradient_penalty(loss_fn, x0):
    """d/dx (loss + |d loss/dx|²): needs the second derivative of the loss."""
    x = x0.clone().requires_grad_()
    loss = loss_fn(x)
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    return torch.autograd.grad(loss + g.pow(2).sum(), x)[0]


def test_double_backward_is_refused_by_the_kernel_paths(triton_backend):
    x, t = torch.randn(5, 7), torch.randint(0, 7, (5,))
    q = torch.randn(1, 2, 4, 8)
    for op, fn, x0 in [
        ("ff.cross_entropy", lambda z: ff.cross_entropy(z, t), x),
        ("ff attention", lambda z: ff.scaled_dot_product_attention(z, q, q).sum(), q),
    ]:
        with pytest.raises(RuntimeError, match=f"{op}.*double backward"):
            _gradient_penalty(fn, x0)


def test_double_backward_of_linear_cross_entropy():
    h, W = torch.randn(5, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    t = torch.randint(0, 7, (5,))
    with pytest.raises(RuntimeError, match="ff.linear_cross_entropy.*double backward.*reference"):
        _gradient_penalty(lambda z: ff.linear_cross_entropy(z, W, t), h)
    want = _gradient_penalty(lambda z: F.cross_entropy(F.linear(z, W), t), h)
    with ff.use_backend("reference"):  # what the error says to do
        got = _gradient_penalty(lambda z: ff.linear_cross_entropy(z, W, t), h)
    assert_close(got, want, torch.float64, "gradient penalty")
    # a plain create_graph backward whose result is not differentiated again is refused as well:
    # it would carry no graph, which the caller asked for
    hh = h.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(ff.linear_cross_entropy(hh, W, t), hh, create_graph=True)


def _values_and_grads(fn, *tensors):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, [t for t in tensors if t.requires_grad], torch.ones_like(out))
    return [out.detach(), *grads]


def test_more_heads_than_a_launch_grid_holds(triton_backend, monkeypatch):
    """CUDA grids hold at most 65535 blocks in y / z, where the kernels put batch x heads: more run in
    batch slices (the limit lowered here, so the interpreter takes the same path)."""
    from fastformer.ops import attention_common

    q, k, v = (torch.randn(5, 2, 9, 16, requires_grad=True) for _ in range(3))
    bias = torch.randn(5, 1, 9, 9, requires_grad=True)
    table = torch.randn(32, 2, requires_grad=True)
    pad = torch.ones(5, 1, 1, 9, dtype=torch.bool)
    pad[1, ..., 6:] = False
    cases = [
        (lambda q, k, v, m: ff.scaled_dot_product_attention(q, k, v, attn_mask=m), (q, k, v, bias)),
        (lambda q, k, v: ff.scaled_dot_product_attention(q, k, v, attn_mask=pad), (q, k, v)),
        (lambda q, k, v, t: ff.t5_attention(q, k, v, t, is_causal=True), (q, k, v, table)),
    ]
    tq = torch.randn(23, 2, 16, requires_grad=True)
    cu = torch.tensor([0, 4, 9, 9, 17, 23], dtype=torch.int32)
    cases.append((lambda x: ff.varlen_attention(x, x, x, cu, cu, 8, 8, causal=True), (tq,)))
    seed = attention_common.seed_dropout
    for fn, tensors in cases:
        want = _values_and_grads(fn, *tensors)
        launches = []
        monkeypatch.setattr(attention_common, "MAX_GRID_HEADS", 4)  # two batch entries of 2 heads a slice
        monkeypatch.setattr(attention_common, "seed_dropout", lambda *a, n=launches: n.append(1) or seed(*a))
        got = _values_and_grads(fn, *tensors)
        monkeypatch.undo()
        assert len(launches) == 3  # 5 entries (sequences) in slices of 2
        for a, b in zip(got, want):
            assert_close(a, b, torch.float32)


def test_offsets_beyond_32_bits_copy_or_refuse(triton_backend, monkeypatch):
    """Rows whose offsets would wrap the kernels' int32 arithmetic are copied to contiguous rows, or, if
    even those do not fit, refused (the limit lowered here; on a GPU it is 2^31)."""
    import importlib

    from fastformer.ops import attention_common

    cross_entropy = importlib.import_module("fastformer.ops.cross_entropy")  # the module, not the function
    big = torch.randn(2, 2, 9, 64)
    q = big[..., :16]  # rows 64 apart: 8 x 64 + 15 = 527 > 300, contiguous rows 8 x 16 + 15 = 143
    want = ff.scaled_dot_product_attention(q.contiguous(), q.contiguous(), q.contiguous())
    monkeypatch.setattr(attention_common, "_I32", 300)
    strides = []
    rows = attention_common._int32_rows
    monkeypatch.setattr(attention_common, "_int32_rows", lambda *a: strides.append(rows(*a).stride()) or rows(*a))
    assert_close(ff.scaled_dot_product_attention(q, q, q), want, torch.float32)
    assert strides == [(288, 144, 16, 1)] * 3  # the launch got contiguous copies
    with pytest.raises(ValueError, match="attn_mask of 9 x 9"):
        mask = torch.randn(2, 2, 9, 40)[..., :9]  # rows 40 apart: 8 x 40 + 8 > 300
        ff.scaled_dot_product_attention(q, q, q, attn_mask=mask)
    monkeypatch.setattr(attention_common, "_I32", 100)
    with pytest.raises(ValueError, match="beyond the attention kernels' 32-bit offsets"):
        ff.scaled_dot_product_attention(q, q, q)
    # varlen's backward is refused at tokens x heads beyond the sizes it is tested at
    packed = torch.randn(60, 2, 4, requires_grad=True)
    cu = torch.tensor([0, 30, 60], dtype=torch.int32)
    with pytest.raises(ValueError, match="60 tokens x 2 heads are beyond the sizes the attention backward"):
        ff.varlen_attention(packed, packed, packed, cu, cu, 30, 30)
    with torch.no_grad():  # no backward: nothing to refuse (rows of 29 x 8 + 3 < 300 fit)
        monkeypatch.setattr(attention_common, "_I32", 300)
        ff.varlen_attention(packed, packed, packed, cu, cu, 30, 30)
    # cross-entropy: a transposed (N, C) input whose class stride would wrap goes through a copy
    logits = torch.randn(37, 50).t().requires_grad_()  # (50, 37), class stride 50: 36 x 50 = 1800
    t = torch.randint(0, 37, (50,))
    want = _values_and_grads(lambda x: ff.cross_entropy(x, t, reduction="none"), logits)
    monkeypatch.setattr(cross_entropy, "_CLASS_OFFSET_LIMIT", 1000)
    fit, seen = cross_entropy._class_offsets_fit, []
    monkeypatch.setattr(cross_entropy, "_class_offsets_fit", lambda x: seen.append(fit(x).stride()) or fit(x))
    got = _values_and_grads(lambda x: ff.cross_entropy(x, t, reduction="none"), logits)
    assert seen == [(37, 1)]  # the kernel read a copy whose classes are adjacent
    for a, b in zip(got, want):
        assert_close(a, b, torch.float32)
