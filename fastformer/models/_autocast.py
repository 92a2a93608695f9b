"""Re-export of fastformer.ops.amp.autocast_dtype, the package's one autocast helper, for model code."""

from ..ops.amp import autocast_dtype

__all__ = ["autocast_dtype"]
