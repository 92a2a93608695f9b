"""torch.autocast for the custom ops and models, which autocast itself does not see.

Inside an autocast region torch runs scaled_dot_product_attention (and F.linear) in the autocast
dtype, casting float32 / float16 / bfloat16 inputs (never float64), and cross_entropy in float32.
The ops reproduce that with these helpers, then run with autocast off so their own matmuls keep the
dtypes chosen here. This is the one autocast helper of the package: ops, nn and models use it.

    amp_dtype(t)        the autocast dtype in force for t's device, or None when autocast is off
    autocast_dtype(t)   the dtype a matmul on t runs in: the autocast dtype, else t.dtype (never None)
    autocast_cast(t, d) t cast to d when autocast would cast it
    no_autocast(t, d)   a context that switches autocast off for t's device (when d is not None)
    autocast_op(*names) decorator: under autocast, cast the named arguments and run the op with it off
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def amp_dtype(t) -> torch.dtype | None:
    """The autocast dtype in force for t's device type, or None (autocast off, or t not a tensor)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        if not torch.is_autocast_enabled(t.device.type):
            return None
        return torch.get_autocast_dtype(t.device.type)
    except (RuntimeError, ValueError):  # a device type autocast does not know
        return None


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on t runs in: the autocast dtype when autocast is on for t's device, else
    t's own. (A custom op that autocast does not see, such as ff.linear_cross_entropy, needs its
    inputs cast to this by the caller or by autocast_op.)"""
    amp = amp_dtype(t)
    return t.dtype if amp is None else amp


def autocast_cast(t, dtype: torch.dtype | None):
    """t in the autocast dtype when autocast would cast it (a float32/16 or bfloat16 tensor), else t."""
    if dtype is not None and isinstance(t, torch.Tensor) and t.dtype in _CASTABLE:
        return t.to(dtype)
    return t


def no_autocast(t: torch.Tensor, dtype: torch.dtype | None):
    """Autocast off for t's device type when it was on (dtype not None); else nothing."""
    return torch.autocast(t.device.type, enabled=False) if dtype is not None else contextlib.nullcontext()


def autocast_op(*names: str):
    """Decorator for an op that autocast runs in its low-precision dtype (as torch does SDPA): when
    autocast is on for the first argument's device, the arguments `names` (by parameter name,
    positional or keyword) are cast with autocast_cast and the op runs with autocast off, so its
    own matmuls keep those dtypes. With autocast off it costs one check."""

    def deco(fn):
        params = list(inspect.signature(fn).parameters)
        first = params[0]
        where = {n: params.index(n) for n in names}

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            lead = args[0] if args else kwargs.get(first)
            amp = amp_dtype(lead)
            if amp is None:
                return fn(*args, **kwargs)
            args = list(args)
            for n, i in where.items():
                if i < len(args):
                    args[i] = autocast_cast(args[i], amp)
                elif n in kwargs:
                    kwargs[n] = autocast_cast(kwargs[n], amp)
            with no_autocast(lead, amp):
                return fn(*args, **kwargs)

        return wrapper

    return deco
