"""Exceptions for bad input, raised before any kernel launches.

fastformer's rule is a ValueError naming the offending argument. Where torch raises another type for
the same mistake (RuntimeError for a bad shape or dtype, TypeError for a non-tensor, IndexError for a
class index out of range, AssertionError in nn.MultiheadAttention), the exception is also of that
type, so code written against torch catches it unchanged::

    try:
        ff.cross_entropy(logits, target)
    except RuntimeError:      # or ValueError: both catch it
        ...
"""

from __future__ import annotations

import torch


class InputError(ValueError, RuntimeError):
    """Bad input: a ValueError, and a RuntimeError as torch raises for a bad shape, dtype or device."""


class InputTypeError(ValueError, TypeError):
    """An argument of the wrong Python type (e.g. a list where a tensor is expected): torch raises TypeError."""


class TargetIndexError(InputError, IndexError):
    """A class-index target outside [0, C) that is not ignore_index: torch raises IndexError on CPU."""


class ModuleInputError(InputError, AssertionError):
    """Bad input to an nn module whose torch counterpart asserts (nn.MultiheadAttention)."""


def refuse_double_backward(op: str) -> None:
    """Call first in the backward of an autograd.Function whose backward runs a kernel (no graph of its own).

    Autograd runs a backward with grad mode on exactly when the caller asked for create_graph=True
    (a gradient penalty, torch.autograd.gradgradcheck). Without this check such a backward returns a
    first-order gradient that silently carries no second-order term; torch's fused kernels refuse too.
    """
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op}: double backward (create_graph=True) is not supported on this path, whose gradients are "
            "made without an autograd graph (a fused kernel, or chunks computed in the forward pass); run "
            "it under ff.use_backend('reference'), whose torch operations can be differentiated again"
        )


__all__ = ["InputError", "InputTypeError", "TargetIndexError", "ModuleInputError", "refuse_double_backward"]
