"""One way for every host-side launcher to start a Triton kernel, so that its launches can be captured.

    launch(Launch(kernel, grid, args, kwargs, name="attention.fwd", config=(128, 64, 8, 3)))

runs `kernel[grid](*args, **kwargs)`. Inside `with capture_launches() as launches:` nothing runs:
each Launch is appended to the list instead. `scripts/kernel_report.py` uses this to take the exact
argument list a launcher builds (from "meta" tensors, with no device) and hand it to Triton's own
launcher path ahead of time (`fastformer.kernels.aot`), so the report's binary is the one that runs.

No triton import here: the reference path imports this module.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

_captured: contextvars.ContextVar[list | None] = contextvars.ContextVar("fastformer_captured_launches", default=None)
_target: contextvars.ContextVar[int | None] = contextvars.ContextVar("fastformer_capture_target", default=None)


@dataclasses.dataclass
class Launch:
    """A kernel launch: `kernel[grid](*args, **kwargs)`. kwargs hold the constexprs and the launch
    options (num_warps, num_stages). name: the kernel's id in the kernel registry and the tuner
    ("attention.fwd"); config: the tile configuration it was built with, if it has one."""

    kernel: Any
    grid: tuple
    args: tuple
    kwargs: dict
    name: str
    config: tuple | None = None


def on_tensor_device(fn: Callable) -> Callable:
    """Decorator for a host-side launcher whose first argument is a tensor: run it with that tensor's
    CUDA device current. Triton launches on the current device (and its stream), so tensors on
    another GPU (cuda:1 while cuda:0 is current, without torch.cuda.set_device) would otherwise be
    launched on the wrong one. The tuner (tuning.choose) runs inside these launchers, so it times on
    that device too."""

    @functools.wraps(fn)
    def inner(t, *args, **kwargs):
        if getattr(t, "is_cuda", False):
            import torch

            if t.device.index is not None and t.device.index != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return fn(t, *args, **kwargs)
        return fn(t, *args, **kwargs)

    return inner


def launch(item: Launch) -> None:
    """Run the launch, or record it inside capture_launches()."""
    captured = _captured.get()
    if captured is not None:
        captured.append(item)
        return
    item.kernel[item.grid](*item.args, **item.kwargs)


def capturing() -> bool:
    """True inside capture_launches(): nothing is launched, so nothing may be timed either."""
    return _captured.get() is not None


@contextlib.contextmanager
def capture_launches():
    """Collect the launches made in this block (in order) instead of running them."""
    launches: list = []
    token = _captured.set(launches)
    try:
        yield launches
    finally:
        _captured.reset(token)


@contextlib.contextmanager
def for_arch(arch: int):
    """Inside the block, host launchers that pick a kernel variant by GPU generation (the attention
    forward's TMA build on Hopper) pick it for sm_<arch>, whatever the tensors' device: the kernel
    report captures each case once per generation it builds."""
    token = _target.set(int(arch))
    try:
        yield
    finally:
        _target.reset(token)


def capture_target() -> int | None:
    """The generation set by for_arch() (e.g. 90), or None."""
    return _target.get()
