"""Gradients computed in the forward pass, scaled by grad_output in backward.

cross_entropy's kernel path and linear_cross_entropy ("mean" / "sum") make d loss / d input in the
forward pass, for a grad_output of 1, so that backward only has to scale them. Two things make that
behave like any autograd op:

- The buffers are saved tensors (`ctx.save_for_backward`), so autograd frees them after a backward
  that does not retain the graph, and keeps them for one that does. A plain attribute would keep
  them alive for as long as the caller holds the loss.
- The first backward scales them in place (no copy: the memory saving of making them in forward).
  A later backward through a retained graph (`loss.backward(retain_graph=True)` twice, or
  `torch.autograd.grad(loss, ..., retain_graph=True)` and then `loss.backward()`) gets new tensors,
  scaled by g_now / g_first. The tensors handed out by the first backward are not touched again.
  Under saved-tensor hooks (`torch.autograd.graph.save_on_cpu`) an unpack is a fresh copy of what
  forward saved, unscaled: a mark on the tensor the first backward scaled tells the two apart.

Only case that cannot be served: the first grad_output had zeros, which wiped those rows in place.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Scaler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def save(ctx, *grads: torch.Tensor | None) -> None:
    """Keep the forward-made gradients (None for an input that needs none) for backward."""
    ctx.save_for_backward(*grads)
    ctx.first_grad_out = None
    ctx.later = None


def _unpack(ctx, op: str) -> tuple[torch.Tensor | None, ...]:
    """ctx.saved_tensors, with torch's in-place error said in this op's terms."""
    try:
        return ctx.saved_tensors  # torch's own error if the graph was not retained
    except RuntimeError as err:
        if "inplace" not in str(err):
            raise
        raise RuntimeError(
            f"{op}: a second backward through the same graph needs the gradient the first backward "
            "returned, and that tensor was modified in place since (it became a leaf's .grad, which "
            "was then zeroed or clipped in place); compute the loss again"
        ) from err


def scaled(ctx, g: torch.Tensor, scale_: Scaler, op: str) -> tuple[torch.Tensor | None, ...]:
    """The saved gradients times g. g: float32 grad_output, one element or one per row;
    scale_(t, factor) multiplies t by factor in place and returns t."""
    if ctx.later is None:
        grads = _unpack(ctx, op)
        if ctx.first_grad_out is None:  # the first backward
            ctx.first_grad_out = g.detach().clone()
            for t in grads:
                if t is not None:
                    # through .data: scaling in place must not bump the saved tensor's version counter,
                    # or a second backward through a retained graph would be refused as an in-place change
                    scale_(t.data, g)
                    t._ff_scaled_in_place = True  # kept on the tensor for as long as autograd holds it
            return grads
        # a later backward (the graph was retained): a private copy of each gradient and the factor it
        # carries, since the first backward's tensors may now be a leaf's .grad, accumulated into
        first = ctx.first_grad_out
        later = []
        for t in grads:
            if t is None:
                later.append(None)
            elif getattr(t, "_ff_scaled_in_place", False):
                if bool((first == 0).any()):
                    raise RuntimeError(
                        f"{op}: a second backward through the same graph needs the gradient made in forward, "
                        "but the first backward's grad_output had zeros and scaled it to zero in place; "
                        "compute the loss again"
                    )
                later.append((t.clone(), first))
            else:  # a fresh tensor from a saved-tensor hook (save_on_cpu, ...): as forward made it
                later.append((t.clone(), None))
        ctx.later = tuple(later)
    return tuple(None if e is None else scale_(e[0].clone(), g if e[1] is None else g / e[1]) for e in ctx.later)
