"""How the public ops meet torch.compile.

The ops validate their inputs by reading tensors, choose a backend in Python and launch Triton
kernels through launchers that TorchDynamo cannot trace (it fails on Triton's launch machinery, or
breaks the graph at every data-dependent check). `opaque_to_compile` makes each public op one opaque
call: a model containing fastformer layers compiles, the surrounding code is fused by the compiler,
and the op runs exactly as in eager mode (same kernels, same autograd Function), at the cost of one
graph break per call.
"""
from __future__ import annotations

import torch


def opaque_to_compile(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn
