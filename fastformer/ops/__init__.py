"""Functional API: validation, backend dispatch and torch.autograd.Functions over the kernels."""
from .attention import scaled_dot_product_attention, varlen_attention
from .cross_entropy import cross_entropy, linear_cross_entropy
from .t5_attention import t5_attention

__all__ = [
    "scaled_dot_product_attention",
    "varlen_attention",
    "t5_attention",
    "cross_entropy",
    "linear_cross_entropy",
]
