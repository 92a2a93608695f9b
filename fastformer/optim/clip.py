"""clip_grad_norm_: torch.nn.utils.clip_grad_norm_ as one fused multi-tensor norm + one scale.

The 2-norm and the inf-norm run in the extension (CPU: one OpenMP loop; CUDA: two small launches for
the norm, one for the scale, no host synchronisation). Other norm types, gradients spread over
several devices or dtypes the kernels do not take go to torch's implementation.
"""

from __future__ import annotations

import functools
import math

import torch

from . import _ext

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@torch.no_grad()  # as torch's: after backward(create_graph=True) the norm must not join the graph
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None) -> torch.Tensor:
    """Scale the gradients of `parameters` in place so that their joint norm is at most max_norm.

    parameters: a tensor or an iterable of tensors (their .grad is used); norm_type: 2.0 or inf run
    fused, any other value goes to torch. Returns the total norm before clipping (a 0-d tensor on the
    gradients' device, dtype promoted over the gradients' dtypes, as torch returns it).
    """
    params = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    fused = (
        (norm_type == 2.0 or math.isinf(norm_type) and norm_type > 0)
        and _ext.supports(device)
        and all(
            g.device == device and g.layout == torch.strided and g.is_contiguous() and g.dtype in _KERNEL_DTYPES
            for g in grads
        )
    )
    if not fused:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite, foreach)
    # the norm in the gradients' (promoted) dtype, as torch computes it, before the check and the
    # scaling: fp16 gradients whose norm passes 65,504 have an infinite norm there, as in torch
    total = torch.ops.fastformer.multi_norm(grads, norm_type).to(
        functools.reduce(torch.promote_types, (g.dtype for g in grads))
    )
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`"
        )
    torch.ops.fastformer.clip_scale_(grads, total, max_norm)
    _ext.bump_versions(grads)  # written through raw pointers: tell autograd, as torch's in-place mul_ does
    return total
