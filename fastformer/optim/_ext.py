"""The fused optimizers' view of the compiled extension (loaded by fastformer/_extension.py): which
devices it has kernels for, and the one warning per process when torch's implementation runs instead.
"""

from __future__ import annotations

import warnings

import torch

from .. import _extension
from .._extension import load  # also the optimizers' entry point (adam.py)
from ..backend import compute_capability

_warned = {"done": False}  # one fallback warning per process
_cuda_runnable: dict[int, bool] = {}  # CUDA device index -> whether the built kernels run on it


def supports(device: torch.device) -> bool:
    """True when the extension has kernels for this device type (CUDA kernels need an nvcc build)
    that run on this device (CUDA: code was built for its architecture)."""
    if not load():
        return False
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch._C._dispatch_has_kernel_for_dispatch_key("fastformer::adam_step", "CUDA") and _runs_on(device)
    return False


def _probe(index: int) -> bool:
    """The extension's own answer for CUDA device `index` (an older build cannot tell: assume yes)."""
    if not _extension.has_op("cuda_kernels_runnable"):
        return True
    return bool(torch.ops.fastformer.cuda_kernels_runnable(index))


def _runs_on(device: torch.device) -> bool:
    """Whether the CUDA kernels have code for this GPU, asked once per device. The build has SASS for
    FASTFORMER_CUDA_ARCHS (default sm_80, sm_90) and the PTX of the highest plain one, which newer GPUs
    JIT-compile; on an older GPU (a T4, sm_75; a V100) every launch would fail with "no kernel image is
    available": torch's implementation takes those parameters instead."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _cuda_runnable:
        _cuda_runnable[index] = ok = _probe(index)
        if not ok:
            try:
                cc = f"compute capability {compute_capability(index)}"
            except Exception:  # noqa: BLE001 - only for the message
                cc = "its architecture"
            # its own warning, once per device (the cache above), not the once-per-process fallback
            # warning: another fallback (a dtype, say) said first would hide this reason
            warnings.warn(
                f"fastformer: the extension's CUDA kernels were not built for cuda:{index} ({cc}; rebuild with "
                "FASTFORMER_CUDA_ARCHS set to include it); FusedAdam / FusedAdamW / clip_grad_norm_ on "
                f"cuda:{index} fall back to torch's implementation",
                RuntimeWarning,
                stacklevel=3,
            )
    return _cuda_runnable[index]


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


def bump_versions(tensors) -> None:
    """Increment autograd's version counter of each distinct tensor, as torch's in-place ops do: the
    extension's operators write through raw pointers, which the counter does not see. (Inference
    tensors have no counter.)"""
    distinct = {id(t): t for t in tensors if not t.is_inference()}
    if distinct:
        torch.autograd.graph.increment_version(list(distinct.values()))
