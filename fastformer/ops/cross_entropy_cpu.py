"""ff.cross_entropy's CPU path: the compiled row kernel of the extension (csrc/cross_entropy_cpu.cpp).

For float32 CPU logits with class-index targets and no class weight, under backend "auto" in eager
mode, each row is read once from memory: the kernel finds its maximum, sums its exponentials (kept
in place of the logits) and, when a gradient will be needed, overwrites them with d loss / d logits,
the other passes running in cache. As on the kernel path (cross_entropy.py), that buffer is the
gradient backward returns, scaled by grad_output in place, so forward + backward allocate one (R, C)
tensor (torch's eager cross_entropy keeps its log-softmax and makes the gradient besides).

Everything else takes the eager reference, as before: float64, half-precision or autocast inputs,
probability targets, class weights, no rows, backend "reference", a build without the extension,
torch.compile tracing (the reference traces into the graph, where the kernel would break it) and
torch.func transforms.
"""

from __future__ import annotations

import torch

from .._extension import has_op
from ..backend import get_backend, under_functorch
from . import forward_grads
from .errors import refuse_double_backward


def usable(input: torch.Tensor, target: torch.Tensor, weight, amp) -> bool:
    """Whether cross_entropy(input, target, weight) takes the row kernel (target already validated)."""
    return (
        input.device.type == "cpu"
        and input.dtype == torch.float32
        and amp is None
        and not target.is_floating_point()
        and weight is None
        and input.numel() > 0
        and get_backend() == "auto"
        and not torch.compiler.is_compiling()
        and not under_functorch(input)
        and has_op("ce_rows_cpu")
    )


def cross_entropy_rows(
    input: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    label_smoothing: float,
    z_loss: float,
) -> torch.Tensor:
    """input: (C,), (N, C) or (N, C, d1, ..., dK) float32 logits; target: class indices shaped like the
    loss ((), (N,) or (N, d1, ..., dK)), in range or ignore_index. Returns the loss as cross_entropy."""
    need_grad = torch.is_grad_enabled() and input.requires_grad
    return _CrossEntropyRowsFn.apply(input, target, ignore_index, reduction, label_smoothing, z_loss, need_grad)


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    """The logits as (R, C) rows in the order of the target's positions (a view of a 2-D input)."""
    if x.dim() == 1:
        return x[None]
    if x.dim() == 2:
        return x
    return x.movedim(1, -1).reshape(-1, x.shape[1])


def _from_rows(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(R, C) rows back in the input's shape (inverse of _as_rows)."""
    if len(shape) <= 2:
        return g.reshape(shape)
    return g.reshape(shape[0], *shape[2:], shape[1]).movedim(-1, 1)


class _CrossEntropyRowsFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, ignore_index, reduction, label_smoothing, z_loss, need_grad):
        rows = _as_rows(x.detach())
        t = target.reshape(-1).to(torch.int64).contiguous()
        scale = 1.0
        if reduction == "mean":
            # torch's divisor: the rows not ignored ("mean" with every row ignored gives 0.0, see docs/ops.md)
            scale = 1.0 / max(int((t != ignore_index).sum()), 1)
        # the kernel overwrites its rows with the gradient: a copy of the logits, which becomes the gradient
        buf = rows.clone(memory_format=torch.contiguous_format) if need_grad else rows.contiguous()
        losses = torch.ops.fastformer.ce_rows_cpu(
            buf, t, None, scale, float(label_smoothing), float(z_loss), int(ignore_index), need_grad, None, None
        )
        forward_grads.save(ctx, buf if need_grad else None)
        ctx.shape = x.shape
        return losses.reshape(target.shape) if reduction == "none" else losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("ff.cross_entropy")
        g = grad_out.to(torch.float32).reshape(-1, 1)  # one factor, or one per row ("none")
        (grad,) = forward_grads.scaled(ctx, g, lambda t, f: t.mul_(f), "ff.cross_entropy")
        if grad is None:
            return (None,) * 7
        return _from_rows(grad, ctx.shape), None, None, None, None, None, None
