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
