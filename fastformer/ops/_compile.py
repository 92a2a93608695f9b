"""How the public ops meet torch.compile.

The kernel paths of the ops launch Triton kernels through launchers that TorchDynamo cannot trace
(it fails inside Triton's launch machinery) and read tensors for host-side checks. The functions that
enter a kernel path are marked `opaque_to_compile`: a model containing fastformer layers compiles,
the compiler fuses the code around them, and the kernels run exactly as in eager mode (same
autograd Function), at the cost of one graph break per call. The validation before them and the
eager reference (CPU tensors) stay traceable, so `fullgraph=True` works on the reference path.
"""

from __future__ import annotations

import torch


def opaque_to_compile(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn
