"""Fused optimizers over the compiled extension (torch fallback with one warning when it is missing)."""

from .adam import FusedAdam, FusedAdamW, extension_available
from .clip import clip_grad_norm_

__all__ = ["FusedAdam", "FusedAdamW", "clip_grad_norm_", "extension_available"]
