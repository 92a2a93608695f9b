"""Functional API: validation, backend dispatch and torch.autograd.Functions over the kernels.

Bad input raises the exceptions of fastformer.ops.errors (ValueErrors that are also torch's types).
`set_target_checks(True)` (or FASTFORMER_CHECK_TARGETS=1) checks class indices on CUDA too (docs/ops.md).
"""

from . import errors
from .attention import scaled_dot_product_attention, varlen_attention
from .cross_entropy import cross_entropy, linear_cross_entropy, set_target_checks
from .t5_attention import t5_attention

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    "t5_attention",
    "cross_entropy",
    "linear_cross_entropy",
    "set_target_checks",
    "errors",
]
