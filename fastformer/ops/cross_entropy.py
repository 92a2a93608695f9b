"""ff.cross_entropy and ff.linear_cross_entropy: validation, backend dispatch, autograd.

cross_entropy takes everything torch.nn.functional.cross_entropy takes: input (C,), (N, C) or
(N, C, d1, ..., dK); class-index targets (), (N,) or (N, d1, ..., dK), or class-probability
("soft") targets shaped like input; weight, ignore_index, reduction, label_smoothing; plus z_loss.

cross_entropy (kernel path)
    The kernel sees rows = (batch entry, position): (N·d1···dK, C) through strides, so a
    K-dimensional input is never copied (its class dim is strided unless it is last in memory, as
    for logits.transpose(1, 2) of (B, L, C) logits). The forward reads each row once for the online
    softmax and, when a gradient will be needed, again to write d loss / d logits into a buffer laid
    out like the input. That buffer *is* the gradient backward returns (scaled in place by
    grad_output by a persistent kernel that skips factors of exactly 1: the usual
    grad_output of 1 moves no bytes), so forward + backward allocate one (N, V)
    tensor, the gradient itself (a later backward through a retained graph: forward_grads.py).
    Soft targets, label smoothing and class weights are all in the kernel (a soft target is
    distillation's case and keeps the fused path).

cross_entropy (CPU path)
    float32 CPU logits with class-index targets and no class weight, under backend "auto": the
    extension's row kernel, same gradient-in-forward design (cross_entropy_cpu.py).

linear_cross_entropy: the checks are here, the chunked path in linear_cross_entropy.py.

Under torch.autocast both return a float32 loss as torch's cross_entropy does, and
linear_cross_entropy casts input / weight / bias to the autocast dtype as F.linear would.

Out-of-range class indices (not in [0, C), not ignore_index): on CPU tensors they raise
TargetIndexError (a ValueError and an IndexError, as torch) before anything runs; on CUDA the check
would cost a host sync, so the kernel instead makes that row's loss and gradient NaN (the reduced
loss is NaN), unless `set_target_checks(True)` or FASTFORMER_CHECK_TARGETS=1 asks for the synchronous
check (a debug switch).

Deviations from torch, documented in docs/ops.md: "mean" with every target ignored (or no rows) gives
0.0 and zero gradients (torch: NaN); any integer dtype is taken for class indices (torch: int64 or
uint8); float64 inputs, a class weight or soft target that requires grad take the reference path.
"""

from __future__ import annotations

import math
import numbers
import operator
import os

import torch

import fastformer.reference.cross_entropy as _ref

from ..backend import get_backend, under_functorch, use_triton
from . import cross_entropy_cpu as _cpu
from . import forward_grads
from ._compile import opaque_to_compile
from ._validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    as_real,
    check_choice,
    check_range,
    check_same_dtype,
    check_tensor,
    is_finite,
)
from .amp import amp_dtype
from .errors import InputError, InputTypeError, TargetIndexError, refuse_double_backward

REDUCTIONS = ("mean", "sum", "none")

_CHECK_TARGETS = os.environ.get("FASTFORMER_CHECK_TARGETS", "0") not in ("", "0")


def set_target_checks(enabled: bool) -> None:
    """Check class indices against [0, C) on CUDA tensors too, before launching (one host sync per
    call; a debug switch, also FASTFORMER_CHECK_TARGETS=1). CPU tensors are always checked."""
    global _CHECK_TARGETS
    _CHECK_TARGETS = bool(enabled)


# --------------------------------------------------------------------------------------------- checks
def _check_common(ignore_index, reduction, label_smoothing, z_loss) -> None:
    check_choice("reduction", reduction, REDUCTIONS)
    if isinstance(ignore_index, bool) or _as_index(ignore_index) is None:
        raise InputTypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if as_real(label_smoothing) is None:
        raise InputTypeError(f"label_smoothing must be a float, got {label_smoothing!r}")
    check_range("label_smoothing", as_real(label_smoothing), 0.0, 1.0, hi_inclusive=True)
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real) or not is_finite(z_loss) or z_loss < 0:
        raise InputError(f"z_loss must be a finite float >= 0, got {z_loss!r}")


def _as_index(value):
    """int(value) for anything integer-like (int, numpy integer, integer 0-d tensor, as torch accepts), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _loss_dtype(input: torch.Tensor, target: torch.Tensor, amp) -> torch.dtype:
    """The loss's dtype: the input's (promoted with a probability target's, as torch), but float32 for
    a half-precision one under autocast, where torch runs cross_entropy in float32. The loss is
    computed in float32 and rounded to this dtype once: under autocast it is not rounded to bf16."""
    natural = torch.promote_types(input.dtype, target.dtype) if target.is_floating_point() else input.dtype
    return torch.float32 if amp is not None and natural in (torch.float16, torch.bfloat16) else natural


def _check_target(target, input_shape: tuple, device, ignore_index) -> bool:
    """Validate target against an input of shape input_shape ((C,), (N, C) or (N, C, d1, ..., dK)) with
    torch's rules; return whether it holds class probabilities (shaped like input) rather than indices."""
    if not isinstance(target, torch.Tensor):
        raise InputTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_tensor("target", target, device=device)
    if tuple(target.shape) == tuple(input_shape):
        if target.dtype not in FLOAT_DTYPES:
            raise InputError(
                f"target is shaped like input, so it holds class probabilities: it must have a "
                f"floating point dtype, got {target.dtype}"
            )
        if _as_index(ignore_index) is not None and _as_index(ignore_index) >= 0:
            raise InputError("ignore_index is not supported for a floating point (class-probability) target")
        return True
    if target.dtype not in INDEX_DTYPES:
        raise InputError(
            f"target must hold integer class indices (or, shaped like input {tuple(input_shape)}, "
            f"class probabilities); got dtype {target.dtype} and shape {tuple(target.shape)}"
        )
    expected = () if len(input_shape) == 1 else (input_shape[0],) + tuple(input_shape[2:])
    if len(input_shape) == 1 and tuple(target.shape) == (1,):
        return False  # torch takes a one-element target for an unbatched input too
    if tuple(target.shape) != expected:
        if len(input_shape) >= 2 and (target.dim() == 0 or target.shape[0] != input_shape[0]):
            got = target.shape[0] if target.dim() else "none"
            raise InputError(
                f"Expected input batch_size ({input_shape[0]}) to match target batch_size ({got}): "
                f"target has shape {tuple(target.shape)}, expected {expected}"
            )
        raise InputError(f"target has shape {tuple(target.shape)}; expected {expected} for input {tuple(input_shape)}")
    return False


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _range_check_wanted(target: torch.Tensor) -> bool:
    """Check class indices before launching: always on CPU (no device sync to pay), elsewhere only with
    the debug switch (set_target_checks / FASTFORMER_CHECK_TARGETS). Not while torch.compile traces
    (a value-dependent branch would break the graph; torch's own checks apply there), nor inside a
    torch.func transform (vmap cannot branch on values)."""
    return (target.device.type == "cpu" or _CHECK_TARGETS) and not _is_compiling() and not under_functorch(target)


def _check_range(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Raise TargetIndexError for a class index outside [0, C) other than ignore_index (reads values)."""
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise TargetIndexError(
            f"target {int(t[bad][0])} is out of bounds: class indices must be in [0, {C}) "
            f"or equal ignore_index={ignore_index}"
        )


def _rows(input: torch.Tensor) -> int:
    """How many (batch entry, position) rows of C classes an input (C,) or (N, C, d1, ..., dK) holds."""
    return 1 if input.dim() == 1 else input.shape[0] * math.prod(input.shape[2:])


def _index_target(target: torch.Tensor, unbatched: bool) -> torch.Tensor:
    """Class indices as int32 / int64: a narrower dtype is widened (as torch reads a uint8 target), so that
    comparisons with C and ignore_index (-100 is 156 as a uint8) are made on the values as written. For
    an unbatched input, shaped () like its loss (torch takes a one-element (1,) target there too)."""
    t = target if target.dtype in (torch.int64, torch.int32) else target.long()
    return t.reshape(()) if unbatched else t


def _validate_ce(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, amp) -> bool:
    """All of cross_entropy's checks; returns whether target is soft (probabilities)."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() == 0:
        raise InputError("input must have shape (C,), (N, C) or (N, C, d1, ..., dK), got a 0-d tensor")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_common(ignore_index, reduction, label_smoothing, z_loss)
    soft = _check_target(target, tuple(input.shape), input.device, ignore_index)
    if C == 0 and _rows(input) > 0:
        raise TargetIndexError(f"input must have at least one class, got shape {tuple(input.shape)}")
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=input.device)
        if tuple(weight.shape) != (C,):
            raise InputError(
                f"weight tensor should be defined either for all {C} classes or no classes but got "
                f"weight tensor of shape {tuple(weight.shape)}"
            )
        if amp is None and weight.dtype != input.dtype:  # under autocast torch casts both to float32
            raise InputError(f"weight has dtype {weight.dtype} but input has {input.dtype}; they must match")
    return soft


def _validate_linear(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss) -> bool:
    """All of linear_cross_entropy's checks; returns whether target is soft (probabilities (*, V))."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() < 1:
        raise InputError(f"input must have shape (N, H) (or (*, H)), got {tuple(input.shape)}")
    check_tensor("weight", weight, ndim=2, device=input.device)
    check_same_dtype("weight", weight, "input", input)
    if weight.shape[1] != input.shape[-1]:
        raise InputError(
            f"weight has shape {tuple(weight.shape)}; expected (V, {input.shape[-1]}) for input {tuple(input.shape)}"
        )
    _check_common(ignore_index, reduction, label_smoothing, z_loss)
    logits_shape = tuple(input.shape[:-1]) + (weight.shape[0],)
    if not isinstance(target, torch.Tensor):
        raise InputTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_tensor("target", target, device=input.device)
    soft = tuple(target.shape) == logits_shape and target.dtype in FLOAT_DTYPES
    if soft:
        if _as_index(ignore_index) >= 0:
            raise InputError("ignore_index is not supported for a floating point (class-probability) target")
    else:
        if target.dtype not in INDEX_DTYPES:
            raise InputError(
                f"target must hold integer class indices shaped {tuple(input.shape[:-1])}, or class "
                f"probabilities shaped {logits_shape}; got dtype {target.dtype}, shape "
                f"{tuple(target.shape)}"
            )
        if tuple(target.shape) != tuple(input.shape[:-1]) and not (input.dim() == 1 and tuple(target.shape) == (1,)):
            raise InputError(
                f"target has shape {tuple(target.shape)}; expected {tuple(input.shape[:-1])} "
                f"for input {tuple(input.shape)}"
            )
    if bias is not None:
        check_tensor("bias", bias, ndim=1, device=input.device)
        check_same_dtype("bias", bias, "input", input)
        if bias.shape[0] != weight.shape[0]:
            raise InputError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
    return soft


# ------------------------------------------------------------------------------------- cross_entropy
def _mean_denominators(target, weight32, ignore_index: int, V: int):
    """Device 0-d tensors (no host sync): number of non-ignored rows, and sum of weight[t] over them."""
    valid = target != ignore_index
    count = valid.sum()
    if weight32 is None:
        return count, None
    safe = torch.where(valid, target, torch.zeros_like(target)).clamp_(0, V - 1)
    return count, (weight32[safe] * valid).sum()


def _rows_view(t: torch.Tensor) -> torch.Tensor:
    """(N, C, d1, ..., dK) -> the (N, C, D) view the kernel reads (a copy only when d1..dK do not merge)."""
    N, C, D = t.shape[0], t.shape[1], math.prod(t.shape[2:])  # not -1: ambiguous when N or C is 0
    try:
        return t.view(N, C, D)
    except RuntimeError:
        return t.contiguous().view(N, C, D)


_CLASS_OFFSET_LIMIT = 2**31


def _class_offsets_fit(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy with the class dim (1) of unit stride: the kernels offset a row's classes in int32
    (row offsets are int64), so (C - 1) x class stride must stay below 2^31; a transposed (N, C) or a
    large (N, C, D) input may not (the gradient buffer takes the same layout, so it fits too)."""
    if (t.shape[1] - 1) * abs(t.stride(1)) < _CLASS_OFFSET_LIMIT:
        return t
    return t.movedim(1, -1).contiguous().movedim(-1, 1)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, target, weight, ignore_index, reduction, label_smoothing, z_loss, need_grad, out_shape, out_dtype
    ):
        """x: (N, C) or (N, C, D) logits view; target: indices (N*D,) contiguous or probabilities shaped like x."""
        from ..kernels import cross_entropy_launch as K

        soft = target.is_floating_point()
        w32 = weight.to(torch.float32).contiguous() if weight is not None else None
        count = wden = None
        if reduction == "mean":
            if soft:
                count = torch.full(
                    (),
                    target.shape[0] * (target.shape[2] if target.dim() == 3 else 1),
                    dtype=torch.int64,
                    device=x.device,
                )
            else:
                count, wden = _mean_denominators(target, w32, ignore_index, x.shape[1])
        grad = torch.empty_like(x) if need_grad else None
        loss_rows, _ = K.ce_forward(
            x,
            target,
            count=count,
            weight=w32,
            weight_den=wden,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            grad=grad,
        )
        forward_grads.save(ctx, grad)
        out = loss_rows.reshape(out_shape) if reduction == "none" else loss_rows.sum()
        return out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from ..kernels import cross_entropy_launch as K

        refuse_double_backward("ff.cross_entropy")

        (grad,) = forward_grads.scaled(
            ctx, grad_out.reshape(-1).to(torch.float32).contiguous(), K.scale_rows_, "ff.cross_entropy"
        )
        return grad, None, None, None, None, None, None, None, None, None


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """Softmax cross-entropy with torch.nn.functional.cross_entropy's semantics, plus z-loss.

    input: logits (C,), (N, C) or (N, C, d1, ..., dK) (fp16/bf16/fp32/fp64).
    target: class indices (), (N,) or (N, d1, ..., dK) (any integer dtype; ignore_index positions
    contribute nothing), or class probabilities shaped like input (floating point; no ignore_index).
    weight: (C,) class weights or None; reduction "mean" | "sum" | "none"; label_smoothing in [0, 1].
    z_loss >= 0 adds z_loss * logsumexp(row)^2 per non-ignored row, reduced like the loss ("mean":
    averaged over the non-ignored rows, unweighted).
    Returns a scalar, or the per-position losses shaped like the class-index target for "none"; in
    input's dtype (probabilities: the promoted dtype of input and target, as torch; float32 under
    autocast). "mean" with every target ignored -> 0.0 and zero gradients (torch gives NaN).
    Triton kernel for CUDA tensors (see fastformer.backend); targets outside [0, C): see module doc.
    """
    amp = amp_dtype(input)
    soft = _validate_ce(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, amp)
    ignore_index, label_smoothing = _as_index(ignore_index), as_real(label_smoothing)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not soft:
        target = _index_target(target, input.dim() == 1)
    if not soft and _range_check_wanted(target):
        _check_range(target, C, ignore_index)
    grad_on = torch.is_grad_enabled()
    # a class weight (or a soft target) that requires grad goes to the reference, which gives it its
    # gradient exactly as torch does (the kernel path would silently give it none)
    extra_grad = grad_on and ((weight is not None and weight.requires_grad) or (soft and target.requires_grad))
    wide = input.dtype == torch.float64 or (soft and target.dtype == torch.float64)
    out_dtype = _loss_dtype(input, target, amp)
    empty = C == 0  # no rows either (checked above): the reference returns the empty reduction
    if not soft and not extra_grad and _cpu.usable(input, target, weight, amp):
        return _cpu.cross_entropy_rows(input, target, ignore_index, reduction, label_smoothing, z_loss)
    if wide or extra_grad or empty or get_backend() == "reference" or not use_triton(input, target, weight):
        return _ref.cross_entropy(
            input, target, weight, ignore_index, reduction, label_smoothing, z_loss=z_loss, out_dtype=out_dtype
        )
    if input.dim() == 1:
        x, t, out_shape = input[None], (target[None] if soft else target.reshape(1)), ()
    elif input.dim() == 2:
        x, t, out_shape = input, (target if soft else target.contiguous()), (input.shape[0],)
    else:
        x = _rows_view(input)
        t = _rows_view(target) if soft else target.reshape(-1).contiguous()
        out_shape = (input.shape[0],) + tuple(input.shape[2:])
    x = _class_offsets_fit(x)
    if soft:
        t = _class_offsets_fit(t)
    need_grad = grad_on and input.requires_grad
    return _ce_kernel(
        x,
        t,
        weight,
        int(ignore_index),
        reduction,
        label_smoothing,
        float(z_loss),
        need_grad,
        out_shape,
        out_dtype,
    )


@opaque_to_compile
def _ce_kernel(*args):
    """The kernel path of cross_entropy, opaque to torch.compile (see fastformer/ops/_compile.py)."""
    return _CrossEntropyFn.apply(*args)


# linear_cross_entropy lives in its own module (it uses the checks above)
from .linear_cross_entropy import linear_cross_entropy  # noqa: E402,F401
