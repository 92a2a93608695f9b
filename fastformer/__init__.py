"""fastformer: fused Triton / CUDA kernels and a thin training API for Transformers in plain PyTorch.

import fastformer as ff
loss = ff.cross_entropy(logits, target)
out = ff.scaled_dot_product_attention(q, k, v, attn_mask=mask)
"""

import os as _os

# Without a GPU the Triton kernels can only run in Triton's CPU interpreter, which must be switched on
# before triton is first imported (importing fastformer imports it). With a CPU-only build of torch,
# switch it on here, so that the "triton" backend works on CPU tensors however it is chosen
# (FASTFORMER_BACKEND, ff.set_backend, ff.use_backend). An explicit TRITON_INTERPRET wins; if triton
# is already imported it is too late (fastformer.backend then says how to fix it). The check reads
# how torch was built, so it never initialises CUDA (fork-safe on GPU machines).
import sys as _sys

try:
    import torch as _torch

    if _torch.version.cuda is None and getattr(_torch.version, "hip", None) is None and "triton" not in _sys.modules:
        _os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover - torch is a hard dependency
    pass

__version__ = "0.1.0"

from . import integrations, models, nn, optim
from .backend import get_backend, set_backend, use_backend
from .ops import (
    cross_entropy,
    linear_cross_entropy,
    scaled_dot_product_attention,
    t5_attention,
    varlen_attention,
)

__all__ = [
    "cross_entropy",
    "linear_cross_entropy",
    "scaled_dot_product_attention",
    "varlen_attention",
    "t5_attention",
    "get_backend",
    "set_backend",
    "use_backend",
    "nn",
    "optim",
    "integrations",
    "models",
]
