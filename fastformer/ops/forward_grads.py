"""Gradients computed in the forward pass, scaled by grad_output in backward.

cross_entropy's kernel path and linear_cross_entropy ("mean" / "sum") make d loss / d input in the
forward pass, for a grad_output of 1, so that backward only has to scale them. Two things make that
behave like any autograd op:

- The buffers are saved tensors (`ctx.save_for_backward`), so autograd frees them after a backward
  that does not retain the graph, and keeps them for one that does. Nothing else holds them: a plain
  attribute would keep them alive for as long as the caller holds the loss.
- The first backward scales them in place (no copy: the memory saving of making them in forward).
  A later backward through a retained graph (`loss.backward(retain_graph=True)` twice, or
  `torch.autograd.grad(loss, ..., retain_graph=True)` and then `loss.backward()`) returns new
  tensors, the saved ones times g_now / g_first; the saved ones are not changed again. Under
  saved-tensor hooks (`torch.autograd.graph.saved_tensors_hooks`) an unpack may be a fresh copy of
  what forward saved, unscaled: a mark on the tensor the first backward scaled tells the two apart.

Refused (RuntimeError, saying why): a first grad_output with zeros or non-finite entries (the rows
it scaled cannot be recovered), and a saved gradient changed since the first backward returned it
(autograd may hand that very tensor to a leaf input as its .grad, and accumulating into that .grad
changes it). With 16-bit buffers a later backward also carries the first backward's rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Scaler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def save(ctx, *grads: torch.Tensor | None) -> None:
    """Keep the forward-made gradients (None for an input that needs none) for backward."""
    ctx.save_for_backward(*grads)
    ctx.first_grad_out = None


def _unpack(ctx, op: str) -> tuple[torch.Tensor | None, ...]:
    """ctx.saved_tensors, with torch's in-place error said in this op's terms."""
    try:
        return ctx.saved_tensors  # torch's own error if the graph was not retained
    except RuntimeError as err:
        if "inplace" not in str(err):
            raise
        raise RuntimeError(
            f"{op}: a second backward through the same graph needs the gradient the first backward "
            "returned, and that tensor was changed since: autograd made it a leaf input's .grad, which "
            "was then accumulated into (another backward) or changed in place; compute the loss again"
        ) from err


def scaled(ctx, g: torch.Tensor, scale_: Scaler, op: str) -> tuple[torch.Tensor | None, ...]:
    """The saved gradients times g. g: grad_output in the op's accumulation dtype (float32; float64 for
    float64 input), one element or one per row; scale_(t, factor) multiplies t by factor in place and
    returns t."""
    grads = _unpack(ctx, op)
    first = ctx.first_grad_out
    if first is None:  # the first backward: no host sync here (CUDA graph capture)
        ctx.first_grad_out = g.detach().clone()
        for t in grads:
            if t is not None:
                # through .data: scaling in place must not bump the saved tensor's version counter,
                # or a second backward through a retained graph would be refused as an in-place change
                scale_(t.data, g)
                t._ff_scaled_in_place = True  # kept on the tensor for as long as autograd holds it
        return grads
    # a later backward through the retained graph: new tensors, the saved ones are left as they are;
    # unmarked ones are fresh unscaled copies from a saved-tensor hook
    marked = [t is not None and getattr(t, "_ff_scaled_in_place", False) for t in grads]
    if any(marked) and not bool(torch.isfinite(first).all() and (first != 0).all()):
        raise RuntimeError(
            f"{op}: a second backward through the same graph needs the gradient made in forward, but the "
            "first backward's grad_output had zero or non-finite entries and scaled it in place; "
            "compute the loss again"
        )
    return tuple(None if t is None else scale_(t.clone(), g / first if m else g) for t, m in zip(grads, marked))
