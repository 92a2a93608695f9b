"""Autocast helper shared by the models' sparse LM heads."""
from __future__ import annotations

import torch


def autocast_dtype(t: torch.Tensor) -> torch.dtype:
    """Dtype matmuls run in: the autocast dtype when autocast is on for t's device, else t's.

    ff.linear_cross_entropy is a custom op that autocast does not see, so the heads cast its inputs
    to this dtype themselves."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype
