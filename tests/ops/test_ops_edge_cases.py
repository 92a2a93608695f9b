"""Edge cases of the functional ops that code dropping them into a real model reaches: compiling them
with dynamic shapes, as torch.compile does by itself once a batch or sequence length changes."""

import pytest
import torch
import torch.nn.functional as F

import fastformer as ff


def _compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True, dynamic=True)


@pytest.mark.parametrize("op", ["cross_entropy", "linear_cross_entropy", "t5_attention"])
def test_fullgraph_dynamic_compile_with_default_float_arguments(op):
    """The argument checks ran math.isfinite on z_loss (default 0.0) and T5's scale (default 1.0);
    with dynamic=True Dynamo cannot trace that on a float default and graph-broke, so fullgraph=True
    raised for a call that passes no float at all."""
    torch.manual_seed(0)
    if op == "cross_entropy":
        x, t = torch.randn(6, 5), torch.randint(0, 5, (6,))
        got = _compiled(lambda a, b: ff.cross_entropy(a, b))(x, t)
        want = F.cross_entropy(x, t)
    elif op == "linear_cross_entropy":
        h, w, t = torch.randn(6, 4), torch.randn(5, 4), torch.randint(0, 5, (6,))
        got = _compiled(lambda a, b, c: ff.linear_cross_entropy(a, b, c))(h, w, t)
        want = F.cross_entropy(F.linear(h, w), t)
    else:
        q, table = torch.randn(1, 2, 4, 8), torch.randn(32, 2)
        got = _compiled(lambda a, b: ff.t5_attention(a, a, a, b))(q, table)
        want = ff.t5_attention(q, q, q, table)
    torch.testing.assert_close(got, want)


def test_non_finite_scalars_still_refused():
    """The comparison form of the finiteness check still refuses NaN and infinities."""
    x, t = torch.randn(3, 4), torch.randint(0, 4, (3,))
    q = torch.randn(1, 1, 2, 4)
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ValueError, match="z_loss"):
            ff.cross_entropy(x, t, z_loss=bad)
        with pytest.raises(ValueError, match="scale"):
            ff.scaled_dot_product_attention(q, q, q, scale=bad)
