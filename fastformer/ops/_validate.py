"""Input checks shared by every op. Each raises a ValueError naming the offending argument, before any
kernel launches; the exception is also of the type torch raises for the same mistake (see errors.py)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Sequence

import torch

from .errors import InputError, InputTypeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_tensor(
    name: str,
    t,
    *,
    ndim: int | Sequence[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Check that ``t`` is a tensor with the given rank(s), dtype family and device."""
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise InputError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise InputError(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in dtypes]}")
    if device is not None and t.device != device:
        raise InputError(f"{name} is on {t.device} but must be on {device} like the other inputs")
    return t


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise InputError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; they must match")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise InputError(f"{name} must be one of {list(choices)}, got {value!r}")


def as_real(value):
    """float(value) for a real number or a real 0-d tensor (torch's functions take both), else None."""
    if isinstance(value, torch.Tensor):
        ok = value.dim() == 0 and not value.dtype.is_complex and value.dtype != torch.bool
        return float(value) if ok else None
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def is_finite(value: float) -> bool:
    """math.isfinite by comparisons (NaN fails both). Under torch.compile(dynamic=True) Dynamo cannot
    trace math.isfinite on a float default argument (cross_entropy's z_loss=0.0, t5_attention's
    scale=1.0): it graph-broke there, so fullgraph=True failed. Comparisons trace."""
    return -math.inf < value < math.inf


def check_range(name: str, value: float, lo: float, hi: float, *, hi_inclusive: bool = False) -> None:
    ok = lo <= value <= hi if hi_inclusive else lo <= value < hi
    if not ok:
        bracket = "]" if hi_inclusive else ")"
        raise InputError(f"{name} must be in [{lo}, {hi}{bracket}, got {value}")
