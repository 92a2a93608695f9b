"""torch.autocast for the custom ops, which autocast itself does not see.

Inside an autocast region torch runs scaled_dot_product_attention (and F.linear) in the autocast
dtype, casting float32 / float16 / bfloat16 inputs (never float64), and cross_entropy in float32.
The ops reproduce that with these helpers, then run with autocast off so their own matmuls keep the
dtypes chosen here.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(t) -> Optional[torch.dtype]:
    """The autocast dtype in force for t's device type, or None (autocast off, or t not a tensor)."""
    if not isinstance(t, torch.Tensor):
        return None
    try:
        if not torch.is_autocast_enabled(t.device.type):
            return None
        return torch.get_autocast_dtype(t.device.type)
    except (RuntimeError, ValueError):   # a device type autocast does not know
        return None


def autocast_cast(t, dtype: Optional[torch.dtype]):
    """t in the autocast dtype when autocast would cast it (a float32/16 or bfloat16 tensor), else t."""
    if dtype is not None and isinstance(t, torch.Tensor) and t.dtype in _CASTABLE:
        return t.to(dtype)
    return t


def no_autocast(t: torch.Tensor, dtype: Optional[torch.dtype]):
    """Autocast off for t's device type when it was on (dtype not None); else nothing."""
    return torch.autocast(t.device.type, enabled=False) if dtype is not None else contextlib.nullcontext()
