"""Loads the compiled extension `fastformer._C` (fused optimizer; CPU dropout and cross-entropy rows,
used by models/_cpu_attention.py and ops/linear_cross_entropy.py) once, and remembers why it failed.

Any failure (not built, built for another torch, missing symbols) is caught: the optimizers then use
torch's implementation and warn once. FASTFORMER_DISABLE_EXT=1 forces the fallback.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

_state = {"loaded": None, "error": None, "warned": False}


def load() -> bool:
    """True when the operators torch.ops.fastformer.* are registered (CPU kernels at least)."""
    if _state["loaded"] is None:
        try:
            if os.environ.get("FASTFORMER_DISABLE_EXT"):
                raise ImportError("disabled by FASTFORMER_DISABLE_EXT")
            importlib.import_module("fastformer._C")
            torch.ops.fastformer.adam_step  # noqa: B018 - raises if the operator is not registered
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any load failure means: use the fallback
            _state["loaded"], _state["error"] = False, e
    return bool(_state["loaded"])


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
    if _state["warned"]:
        return
    _state["warned"] = True
    if why is None:
        err = _state["error"] if _state["error"] is not None else "no kernels for this device"
        why = f"fused optimizer extension not available ({err})"
    warnings.warn(f"fastformer: {why}; {what} falls back to torch's implementation", RuntimeWarning, stacklevel=3)
