"""The fused optimizers' view of the compiled extension (loaded by fastformer/_extension.py): which
devices it has kernels for, and the one warning per process when torch's implementation runs instead.
"""

from __future__ import annotations

import warnings

import torch

from .. import _extension
from .._extension import load  # also the optimizers' entry point (adam.py)

_warned = {"done": False}  # one fallback warning per process


def supports(device: torch.device) -> bool:
    """True when the extension has kernels for this device type (CUDA kernels need an nvcc build)."""
    if not load():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastformer::adam_step", "CUDA")
    return False


def warn_fallback(what: str, why: str | None = None) -> None:
    """One warning per process that torch's implementation is used instead of the extension.
    why: the reason when it is not the extension itself (e.g. a parameter dtype it has no kernel for)."""
    if _warned["done"]:
        return
    _warned["done"] = True
    if why is None:
        err = _extension._state["error"]
        err = err if err is not None else "no kernels for this device"
        why = f"fused optimizer extension not available ({err})"
    warnings.warn(f"fastformer: {why}; {what} falls back to torch's implementation", RuntimeWarning, stacklevel=3)
