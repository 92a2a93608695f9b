"""Count the CUDA kernels a call launches (used by the optimizer's launch test and its benchmark)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def cuda_kernels_launched(fn: Callable[[], object]) -> list[str]:
    """Names of the CUDA kernels fn() launches, in order. Memcpy/memset are not kernels, and the GPU-side
    mirror of a user annotation (e.g. torch's 'Optimizer.step#FusedAdamW.step' range) is not a launch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = []
    for e in prof.events():
        if e.device_type != DeviceType.CUDA or getattr(e, "is_user_annotation", False):
            continue
        low = e.name.lower()
        if "memcpy" in low or "memset" in low or e.name.startswith("Optimizer."):
            continue
        names.append(e.name)
    return names
