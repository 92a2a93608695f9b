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


class InputError(ValueError, RuntimeError):
    """Bad input: a ValueError, and a RuntimeError as torch raises for a bad shape, dtype or device."""


class InputTypeError(ValueError, TypeError):
    """An argument of the wrong Python type (e.g. a list where a tensor is expected): torch raises TypeError."""


class TargetIndexError(InputError, IndexError):
    """A class-index target outside [0, C) that is not ignore_index: torch raises IndexError on CPU."""


class ModuleInputError(InputError, AssertionError):
    """Bad input to an nn module whose torch counterpart asserts (nn.MultiheadAttention)."""


__all__ = ["InputError", "InputTypeError", "TargetIndexError", "ModuleInputError"]
