"""linear_cross_entropy's CPU chunked path as a torch.library custom op, for torch.compile.

In eager mode the chunked path is `_LinearCrossEntropyFn` (linear_cross_entropy.py). TorchDynamo cannot
trace it: the kept-row count is read on the host, and the CPU row kernel is a compiled extension.
Under torch.compile the same code runs inside two custom ops instead, which the compiler sees as
single nodes with known output shapes (the fake implementations below), so a graph around
`ff.linear_cross_entropy` on CPU tensors stays whole (`fullgraph=True` works) and the numbers are
eager's. (The Triton kernel path stays an opaque call, one graph break: its backward scales the
forward-made gradients in place, which saves a copy of grad_W that a traced backward would make.)

    fastformer::linear_cross_entropy(x, W, b, target, ...) -> (loss, grad_x, grad_W, grad_b)
        "mean" / "sum": the loss and its gradients for a grad_output of 1, made in the same chunk loop as
        eager; backward multiplies them by grad_output (out of place: a traced graph may not scale a
        saved tensor in place, so backward holds the gradients twice, briefly). "none": the loss rows
        only (unneeded gradient slots are empty (0,) tensors).
    fastformer::linear_cross_entropy_rows_backward(g, x, W, b, target, ...) -> (grad_x, grad_W, grad_b)
        "none": backward recomputes the chunks with the per-row grad_output, as eager does.

The gradients are not differentiable again (eager refuses a create_graph backward: errors.refuse_double_backward).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .linear_cross_entropy import _acc_dtype, _LinearCrossEntropyFn, _prepare


class _Ctx:
    """Stands in for autograd's ctx when a custom op runs _LinearCrossEntropyFn's forward or backward."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(grads, x: Tensor, W: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_W, grad_b) with None replaced by (0,) tensors (a custom op returns tensors only)."""
    return tuple(g if g is not None else _empty(like) for g, like in zip(grads, (x, W, W)))


def _fake_grads(gx_like: Tensor, W: Tensor, need_x: bool, need_W: bool, need_b: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The shapes, dtypes and strides of (grad_x, grad_W, grad_b) as the chunk loop makes them."""
    return (
        torch.empty_like(gx_like) if need_x else _empty(gx_like),
        torch.empty_like(W, memory_format=torch.contiguous_format) if need_W else _empty(W),
        W.new_empty(W.shape[0]) if need_b else _empty(W),
    )


@torch.library.custom_op("fastformer::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    ignore_index: int,
    reduction: str,
    eps: float,
    z: float,
    need_x: bool,
    need_W: bool,
    need_b: bool,
    use_kernel: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """x: (N, H); W: (V, H); b: (V,) or None; target: (N,) class indices or (N, V) probabilities.
    Returns the loss (() or (N,) for "none"; float32, float64 for float64 x), then grad_x (N, H),
    grad_W (V, H), grad_b (V,) for a grad_output of 1 ("mean" / "sum" and needed; else (0,))."""
    ctx = _Ctx()
    needs = (need_x, need_W, need_b)
    args = (ignore_index, reduction, eps, z, needs, use_kernel, chunk_size)
    loss = _LinearCrossEntropyFn.forward(ctx, x, W, b, target, *args)
    grads = (None, None, None) if reduction == "none" or not any(needs) else ctx.saved_tensors
    return (loss, *_or_empty(grads, x, W))


@linear_cross_entropy_op.register_fake
def _(x, W, b, target, ignore_index, reduction, eps, z, need_x, need_W, need_b, use_kernel, chunk_size):
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # the forward's _acc_dtype(x)
    loss = x.new_empty((x.shape[0],) if reduction == "none" else (), dtype=dtype)
    grads = reduction != "none" and (need_x or need_W or need_b)
    return (loss, *_fake_grads(x, W, grads and need_x, grads and need_W, grads and need_b))


@torch.library.custom_op("fastformer::linear_cross_entropy_rows_backward", mutates_args=())
def linear_cross_entropy_rows_backward(
    g: Tensor,
    x: Tensor,
    W: Tensor,
    b: Tensor | None,
    target: Tensor,
    ignore_index: int,
    eps: float,
    z: float,
    need_x: bool,
    need_W: bool,
    need_b: bool,
    use_kernel: bool,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of reduction="none" for per-row grad_output g (N,): grad_x (N, H), grad_W (V, H),
    grad_b (V,); (0,) where not needed."""
    ctx = _Ctx()
    needs = (need_x, need_W, need_b)
    keep, _, x_k, t_k, count, _ = _prepare(
        ctx, x, W, target, ignore_index, "none", eps, z, needs, use_kernel, chunk_size
    )
    ctx.save_for_backward(x_k, W, b, t_k, keep)
    ctx.count = count
    return _or_empty(_LinearCrossEntropyFn.grads(ctx, g)[:3], x, W)


@linear_cross_entropy_rows_backward.register_fake
def _(g, x, W, b, target, ignore_index, eps, z, need_x, need_W, need_b, use_kernel, chunk_size):
    return _fake_grads(x.new_empty(x.shape), W, need_x, need_W, need_b)  # backward's grad_x is contiguous


def _setup_context(ctx, inputs, output):
    x, W, b, target, ignore_index, reduction, eps, z, need_x, need_W, need_b, use_kernel, chunk_size = inputs
    ctx.reduction = reduction
    ctx.args = (ignore_index, eps, z, need_x, need_W, need_b, use_kernel, chunk_size)
    if reduction == "none":
        ctx.save_for_backward(x, W, b, target)
    else:
        ctx.save_for_backward(*output[1:])


def _backward(ctx, g, *_):  # the gradient outputs are not differentiated: their grad_outputs are ignored
    need_x, need_W, need_b = ctx.args[3:6]
    if ctx.reduction == "none":
        x, W, b, target = ctx.saved_tensors
        gx, gW, gb = linear_cross_entropy_rows_backward(g.reshape(-1).contiguous(), x, W, b, target, *ctx.args)
    else:
        gx, gW, gb = ctx.saved_tensors
        g = g.to(_acc_dtype(g))
        gx, gW, gb = ((t * g).to(t.dtype) for t in (gx, gW, gb))
    return (
        gx if need_x else None,
        gW if need_W else None,
        gb if need_b else None,
        *([None] * 10),
    )


linear_cross_entropy_op.register_autograd(_backward, setup_context=_setup_context)
