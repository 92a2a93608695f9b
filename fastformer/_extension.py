"""Loads the compiled extension `fastformer._C` once for every layer that uses it, and remembers why
it failed: the fused optimizers (optim/), the CPU cross-entropy rows (ops/linear_cross_entropy.py),
the one-pass CPU dropout (models/_cpu_attention.py) and the trainer's denormal mode for every CPU
thread (train/resources.py).

Any failure (not built, built for another torch, missing symbols) is caught; each user then runs its
torch fallback. FASTFORMER_DISABLE_EXT=1 forces the fallbacks everywhere (0 / false / off / no: not set).
"""

from __future__ import annotations

import importlib
import os

import torch

# loaded: None = not tried yet; error: the exception that stopped it
_state = {"loaded": None, "error": None}

_OFF = ("", "0", "false", "off", "no")


def env_flag(name: str) -> bool:
    """Whether the environment variable `name` is set to something other than "", 0, false, off or
    no (case-insensitive): FASTFORMER_DISABLE_EXT=0 must leave the extension on. setup.py parses
    FASTFORMER_NO_EXT / FASTFORMER_PORTABLE the same way."""
    return os.environ.get(name, "").strip().lower() not in _OFF


def load() -> bool:
    """True when the operators torch.ops.fastformer.* are registered (CPU kernels at least)."""
    if _state["loaded"] is None:
        try:
            if env_flag("FASTFORMER_DISABLE_EXT"):
                raise ImportError("disabled by FASTFORMER_DISABLE_EXT")
            importlib.import_module("fastformer._C")
            torch.ops.fastformer.adam_step  # noqa: B018 - raises if the operator is not registered
            _state["loaded"] = True
        except Exception as e:  # noqa: BLE001 - any load failure means: use the fallback
            _state["loaded"], _state["error"] = False, e
    return bool(_state["loaded"])


def has_op(name: str) -> bool:
    """True when the extension is loaded and registers torch.ops.fastformer.<name> (an older build may not)."""
    return load() and hasattr(torch.ops.fastformer, name)
