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
    grad_output; a factor of exactly 1 costs no traffic), so forward + backward allocate one (N, V)
    tensor, the gradient itself. Soft targets, label smoothing and class weights are all in the
    kernel (a soft target is distillation's case and keeps the fused path).

linear_cross_entropy (chunked path: Triton kernel on CUDA, the same chunking with torch math on CPU)
    Rows whose target is ignored are dropped first. The kept rows go through the vocabulary
    projection in chunks: logits_chunk = x_chunk @ W^T (+ b), CE + gradient in place in that chunk,
    grad_x_chunk = dlogits @ W, grad_W += dlogits^T @ x_chunk and grad_b += sum(dlogits) (fp32
    accumulators). The (N, V) logits never exist. For "mean"/"sum" the gradients are produced during
    forward and scaled by grad_output in backward; for "none" backward recomputes the chunks with the
    per-row grad_output folded into the kernel. Soft targets (*, V) are taken too.

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
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..backend import get_backend, use_triton
from ._compile import opaque_to_compile
from ._validate import FLOAT_DTYPES, INDEX_DTYPES, check_choice, check_range, check_same_dtype, check_tensor
from .amp import amp_dtype, autocast_cast, no_autocast
from .errors import InputError, InputTypeError, TargetIndexError
import fastformer.reference.cross_entropy as _ref

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
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise InputTypeError(f"label_smoothing must be a float, got {label_smoothing!r}")
    check_range("label_smoothing", float(label_smoothing), 0.0, 1.0, hi_inclusive=True)
    if isinstance(z_loss, bool) or not isinstance(z_loss, numbers.Real) or not math.isfinite(z_loss) or z_loss < 0:
        raise InputError(f"z_loss must be a finite float >= 0, got {z_loss!r}")


def _as_index(value):
    """int(value) for anything integer-like (int, numpy integer, integer 0-d tensor, as torch accepts), else None."""
    try:
        return operator.index(value)
    except TypeError:
        return None


def _amp_result(out: torch.Tensor, amp) -> torch.Tensor:
    # under autocast torch's cross_entropy runs (and returns) in float32: so does the loss here
    return out.float() if amp is not None and out.dtype in (torch.float16, torch.bfloat16) else out


def _check_target(target, input_shape: tuple, device, ignore_index) -> bool:
    """Validate target against an input of shape input_shape ((C,), (N, C) or (N, C, d1, ..., dK)) with
    torch's rules; return whether it holds class probabilities (shaped like input) rather than indices."""
    if not isinstance(target, torch.Tensor):
        raise InputTypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    check_tensor("target", target, device=device)
    if tuple(target.shape) == tuple(input_shape):
        if target.dtype not in FLOAT_DTYPES:
            raise InputError(f"target is shaped like input, so it holds class probabilities: it must have a "
                             f"floating point dtype, got {target.dtype}")
        if _as_index(ignore_index) is not None and _as_index(ignore_index) >= 0:
            raise InputError("ignore_index is not supported for a floating point (class-probability) target")
        return True
    if target.dtype not in INDEX_DTYPES:
        raise InputError(f"target must hold integer class indices (or, shaped like input {tuple(input_shape)}, "
                         f"class probabilities); got dtype {target.dtype} and shape {tuple(target.shape)}")
    expected = () if len(input_shape) == 1 else (input_shape[0],) + tuple(input_shape[2:])
    if tuple(target.shape) != expected:
        if len(input_shape) >= 2 and (target.dim() == 0 or target.shape[0] != input_shape[0]):
            got = target.shape[0] if target.dim() else "none"
            raise InputError(f"Expected input batch_size ({input_shape[0]}) to match target batch_size ({got}): "
                             f"target has shape {tuple(target.shape)}, expected {expected}")
        raise InputError(f"target has shape {tuple(target.shape)}; expected {expected} for input {tuple(input_shape)}")
    return False


def _is_compiling() -> bool:
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn()) if fn is not None else False


def _range_check_wanted(target: torch.Tensor) -> bool:
    """Check class indices before launching: always on CPU (no device sync to pay), elsewhere only with
    the debug switch (set_target_checks / FASTFORMER_CHECK_TARGETS). Not while torch.compile traces
    (a value-dependent branch would break the graph; torch's own checks apply there)."""
    return (target.device.type == "cpu" or _CHECK_TARGETS) and not _is_compiling()


def _check_range(target: torch.Tensor, C: int, ignore_index: int) -> None:
    """Raise TargetIndexError for a class index outside [0, C) other than ignore_index (reads values)."""
    t = target.reshape(-1)
    bad = (t != ignore_index) & ((t < 0) | (t >= C))
    if bool(bad.any()):
        raise TargetIndexError(f"target {int(t[bad][0])} is out of bounds: class indices must be in [0, {C}) "
                               f"or equal ignore_index={ignore_index}")


def _validate_ce(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, amp) -> bool:
    """All of cross_entropy's checks; returns whether target is soft (probabilities)."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() == 0:
        raise InputError("input must have shape (C,), (N, C) or (N, C, d1, ..., dK), got a 0-d tensor")
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_common(ignore_index, reduction, label_smoothing, z_loss)
    soft = _check_target(target, tuple(input.shape), input.device, ignore_index)
    if C == 0:
        raise TargetIndexError(f"input must have at least one class, got shape {tuple(input.shape)}")
    if weight is not None:
        check_tensor("weight", weight, dtypes=FLOAT_DTYPES, device=input.device)
        if tuple(weight.shape) != (C,):
            raise InputError(f"weight tensor should be defined either for all {C} classes or no classes but got "
                             f"weight tensor of shape {tuple(weight.shape)}")
        if amp is None and weight.dtype != input.dtype:   # under autocast torch casts both to float32
            raise InputError(f"weight has dtype {weight.dtype} but input has {input.dtype}; they must match")
    return soft


def _validate_linear(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss) -> bool:
    """All of linear_cross_entropy's checks; returns whether target is soft (probabilities (*, V))."""
    check_tensor("input", input, dtypes=FLOAT_DTYPES)
    if input.dim() < 2:
        raise InputError(f"input must have shape (N, H) (or (*, H)), got {tuple(input.shape)}")
    check_tensor("weight", weight, ndim=2, device=input.device)
    check_same_dtype("weight", weight, "input", input)
    if weight.shape[1] != input.shape[-1]:
        raise InputError(f"weight has shape {tuple(weight.shape)}; expected (V, {input.shape[-1]}) for input "
                         f"{tuple(input.shape)}")
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
            raise InputError(f"target must hold integer class indices shaped {tuple(input.shape[:-1])}, or class "
                             f"probabilities shaped {logits_shape}; got dtype {target.dtype}, shape "
                             f"{tuple(target.shape)}")
        if tuple(target.shape) != tuple(input.shape[:-1]):
            raise InputError(f"target has shape {tuple(target.shape)}; expected {tuple(input.shape[:-1])} "
                             f"for input {tuple(input.shape)}")
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
    N, C = t.shape[0], t.shape[1]
    try:
        return t.view(N, C, -1)
    except RuntimeError:
        return t.contiguous().view(N, C, -1)


class _CrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction, label_smoothing, z_loss, need_grad, out_shape,
                out_dtype):
        """x: (N, C) or (N, C, D) logits view; target: indices (N*D,) contiguous or probabilities shaped like x."""
        from ..kernels import cross_entropy_launch as K

        soft = target.is_floating_point()
        w32 = weight.to(torch.float32).contiguous() if weight is not None else None
        count = wden = None
        if reduction == "mean":
            if soft:
                count = torch.full((), target.shape[0] * (target.shape[2] if target.dim() == 3 else 1),
                                   dtype=torch.int64, device=x.device)
            else:
                count, wden = _mean_denominators(target, w32, ignore_index, x.shape[1])
        grad = torch.empty_like(x) if need_grad else None
        loss_rows, _ = K.ce_forward(x, target, count=count, weight=w32, weight_den=wden,
                                    ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                                    grad=grad)
        ctx.grad = grad
        out = loss_rows.reshape(out_shape) if reduction == "none" else loss_rows.sum()
        return out.to(out_dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        from ..kernels import cross_entropy_launch as K

        grad = ctx.grad
        if grad is None:
            raise RuntimeError("ff.cross_entropy: backward called twice, or on a forward run without grad; "
                               "the gradient buffer is consumed by the first backward")
        ctx.grad = None
        K.scale_rows_(grad, grad_out.reshape(-1).to(torch.float32).contiguous())
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
    ignore_index = _as_index(ignore_index)
    C = input.shape[0] if input.dim() == 1 else input.shape[1]
    if not soft and _range_check_wanted(target):
        _check_range(target, C, ignore_index)
    grad_on = torch.is_grad_enabled()
    # a class weight (or a soft target) that requires grad goes to the reference, which gives it its
    # gradient exactly as torch does (the kernel path would silently give it none)
    extra_grad = grad_on and ((weight is not None and weight.requires_grad) or (soft and target.requires_grad))
    wide = input.dtype == torch.float64 or (soft and target.dtype == torch.float64)
    if wide or extra_grad or get_backend() == "reference" or not use_triton(input, target, weight):
        return _amp_result(_ref.cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                                              z_loss=z_loss), amp)
    if input.dim() == 1:
        x, t, out_shape = input[None], (target[None] if soft else target.reshape(1)), ()
    elif input.dim() == 2:
        x, t, out_shape = input, (target if soft else target.contiguous()), (input.shape[0],)
    else:
        x = _rows_view(input)
        t = _rows_view(target) if soft else target.reshape(-1).contiguous()
        out_shape = (input.shape[0],) + tuple(input.shape[2:])
    out_dtype = torch.promote_types(input.dtype, target.dtype) if soft else input.dtype
    need_grad = grad_on and input.requires_grad
    return _amp_result(_ce_kernel(x, t, weight, int(ignore_index), reduction, float(label_smoothing), float(z_loss),
                                  need_grad, out_shape, out_dtype), amp)


@opaque_to_compile
def _ce_kernel(*args):
    """The kernel path of cross_entropy, opaque to torch.compile (see fastformer/ops/_compile.py)."""
    return _CrossEntropyFn.apply(*args)


# ------------------------------------------------------------------------------ linear_cross_entropy
def _ce_rows_torch_(logits, target, scale: float, label_smoothing: float, z_loss: float, want_grad: bool,
                    gscale=None):
    """Torch-math twin of kernels.cross_entropy.ce_forward for rows that are all valid and no class weight.

    logits: (c, V), owned by the caller; with want_grad it is overwritten by d loss / d logits (times
    gscale: (c,) or None). target: (c,) class indices or (c, V) probabilities. scale: 1 / #rows for
    "mean", else 1. Returns fp32 (c,) scaled per-row losses."""
    V = logits.shape[1]
    xf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    sA = sB = scale   # no class weights: the CE and z parts share the denominator
    eps = label_smoothing
    lse = torch.logsumexp(xf, dim=1)
    if target.is_floating_point():
        y = target.to(xf.dtype)
        if eps > 0.0:
            y = (1.0 - eps) * y + eps / V
        mass = y.sum(dim=1)
        ce = mass * lse - (y * xf).sum(dim=1)
    else:
        t = target.long()[:, None]
        mass = None
        ce = (1.0 - eps) * (lse - xf.gather(1, t)[:, 0])
        if eps > 0.0:
            ce = ce + eps * lse - (eps / V) * xf.sum(dim=1)
    loss = sA * ce
    if z_loss != 0.0:
        loss = loss + sB * z_loss * lse * lse
    if want_grad:
        g = gscale.to(xf.dtype) if gscale is not None else torch.ones_like(lse)
        if mass is not None:
            coef = g * (sA * mass + sB * 2.0 * z_loss * lse)
            xf.sub_(lse[:, None]).exp_().mul_(coef[:, None]).sub_((g * sA)[:, None] * y)
        else:
            coef = g * (sA + sB * 2.0 * z_loss * lse)  # (1 - eps) + eps / V * V == 1 without class weights
            xf.sub_(lse[:, None]).exp_().mul_(coef[:, None])
            if eps > 0.0:
                xf.sub_((g * sA * (eps / V))[:, None])
            xf.scatter_add_(1, t, (-(g * sA * (1.0 - eps)))[:, None])
        if xf is not logits:
            logits.copy_(xf)
    return loss.to(torch.float32)


_ADDMM_OUT_DTYPE = [True]  # flips to False the first time torch.addmm(..., out_dtype=) is unavailable


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32 (or a's own dtype); for fp16/bf16 a, b on CUDA without a temporary."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _ADDMM_OUT_DTYPE[0]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _ADDMM_OUT_DTYPE[0] = False
    acc.add_(a @ b)


def _chunk_rows(n: int, H: int, V: int, device: torch.device, chunk_size: int | None) -> int:
    """Rows of tokens per chunk.

    CPU: the chunk's logits about as large as the kept hidden states (n, H), at least 256 rows.
    CUDA: every chunk re-reads and re-writes the fp32 grad_W accumulator (8 * V * H bytes) on top of
    its 6 * rows * H * V matmul flops, so the chunk must be tall for that traffic to stay small next to
    the matmuls (~300 / rows of their time on an H100): chunk logits of up to 2^28 elements (512 MB
    in bf16), at least 1024 rows. `chunk_size` overrides both (time/memory trade-off)."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if device.type == "cuda":
        rows = 1 << max(0, int(math.floor(math.log2(max(1, (1 << 28) // V)))))
        lo = 1024
    else:
        rows = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n * H / V)))))
        lo = 256
    return max(1, min(n, max(lo, rows)))


def _run_chunks(x_k, W, b, t_k, count, eps, z, use_kernel, chunk, *, loss_rows=None, gscale=None,
                grad_x=None, keep=None, gW=None, gb=None):
    """The chunk loop shared by forward and the "none" backward. x_k: (n, H) kept rows; t_k: (n,) class
    indices or (n, V) probabilities; keep: (n,) the kept rows' indices among all rows, None for all."""
    if use_kernel:
        from ..kernels import cross_entropy_launch as K   # lazily: the CPU path must not need (or load) triton

    n = x_k.shape[0]
    want_grad = grad_x is not None or gW is not None or gb is not None
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc = x_k[s:e]
        logits = torch.addmm(b, xc, W.t()) if b is not None else xc @ W.t()   # (c, V), owned here
        gs = gscale[s:e] if gscale is not None else None
        if use_kernel:
            rows, _ = K.ce_forward(logits, t_k[s:e], count=count, label_smoothing=eps, z_loss=z,
                                   grad=logits if want_grad else None, gscale=gs)
        else:
            scale = 1.0 / max(1, int(count)) if count is not None else 1.0
            rows = _ce_rows_torch_(logits, t_k[s:e], scale, eps, z, want_grad, gs)
        if loss_rows is not None:
            loss_rows[s:e] = rows
        if grad_x is not None:
            if keep is None:   # every row kept (soft targets): rows in place
                grad_x[s:e] = logits @ W
            else:
                grad_x.index_copy_(0, keep[s:e], logits @ W)
        if gW is not None:
            _addmm_fp32_(gW, logits.t(), xc)
        if gb is not None:
            gb.add_(logits.sum(dim=0, dtype=gb.dtype))


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, target, ignore_index, reduction, eps, z, needs, use_kernel, chunk_size):
        N, H = x.shape
        V = W.shape[0]
        ctx.wdtype = W.dtype
        if target.is_floating_point():   # probabilities: no ignored rows, no host sync
            keep, n, x_k, t_k = None, N, x, target
        else:
            keep = (target != ignore_index).nonzero().squeeze(1)   # host sync: the kept-row count sizes the loop
            n = keep.numel()
            x_k = x if n == N else x.index_select(0, keep)   # no copy when nothing is ignored
            t_k = target if n == N else target.index_select(0, keep)
            t_k = t_k.contiguous()
        # "mean": the kernel divides by the kept-row count (0 -> 1: all ignored gives 0 and zero grads)
        count = torch.full((), n, dtype=torch.int64, device=x.device) if reduction == "mean" else None
        chunk = _chunk_rows(n, H, V, x.device, chunk_size)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        need_x, need_W, need_b = needs
        loss_rows = torch.empty(n, dtype=torch.float32, device=x.device)
        ctx.meta = (reduction, eps, z, use_kernel, chunk, N, acc, needs)
        if reduction == "none" or not any(needs):
            _run_chunks(x_k, W, b, t_k, count, eps, z, use_kernel, chunk, loss_rows=loss_rows)
            ctx.save_for_backward(x_k, W, b, t_k, keep)
            ctx.count = count
            ctx.grads = None
        else:
            grad_x = torch.zeros_like(x) if need_x else None
            gW = torch.zeros(W.shape, dtype=acc, device=x.device) if need_W else None
            gb = torch.zeros(V, dtype=acc, device=x.device) if need_b else None
            _run_chunks(x_k, W, b, t_k, count, eps, z, use_kernel, chunk, loss_rows=loss_rows,
                        grad_x=grad_x, keep=keep, gW=gW, gb=gb)
            ctx.grads = (grad_x, gW, gb)
        if reduction == "none":
            out = loss_rows if keep is None else \
                torch.zeros(N, dtype=torch.float32, device=x.device).index_copy_(0, keep, loss_rows)
        else:
            out = loss_rows.sum()
        return out.to(torch.promote_types(x.dtype, target.dtype) if target.is_floating_point() else x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        reduction, eps, z, use_kernel, chunk, N, acc, (need_x, need_W, need_b) = ctx.meta
        if reduction != "none":
            if ctx.grads is None:
                raise RuntimeError("ff.linear_cross_entropy: backward called twice")
            grad_x, gW, gb = ctx.grads
            ctx.grads = None
            # cast the fp32 accumulators first, then scale in place: one pass less over (V, H) than
            # scaling in fp32 (g is almost always exactly 1, so nothing is lost)
            wdtype = ctx.wdtype
            grad_x = grad_x.mul_(g) if grad_x is not None else None
            gW = gW.to(wdtype).mul_(g) if gW is not None else None
            gb = gb.to(wdtype).mul_(g) if gb is not None else None
            return grad_x, gW, gb, None, None, None, None, None, None, None, None
        else:
            x_k, W, b, t_k, keep = ctx.saved_tensors
            count = ctx.count
            g = g.reshape(-1)
            gscale = (g if keep is None else g.index_select(0, keep)).to(torch.float32).contiguous()
            grad_x = torch.zeros((N, x_k.shape[1]), dtype=x_k.dtype, device=x_k.device) if need_x else None
            gW = torch.zeros(W.shape, dtype=acc, device=W.device) if need_W else None
            gb = torch.zeros(W.shape[0], dtype=acc, device=W.device) if need_b else None
            _run_chunks(x_k, W, b, t_k, count, eps, z, use_kernel, chunk, gscale=gscale,
                        grad_x=grad_x, keep=keep, gW=gW, gb=gb)
        wdtype = ctx.wdtype
        return (grad_x, gW.to(wdtype) if gW is not None else None, gb.to(wdtype) if gb is not None else None,
                None, None, None, None, None, None, None, None)


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """cross_entropy(F.linear(input, weight, bias), target, ...) without materialising the logits.

    input: (N, H) hidden states (or (*, H), flattened); weight: (V, H) as nn.Linear.weight, same dtype;
    bias: (V,) or None; target: (N,) (or (*)) integer class indices, or class probabilities (N, V)
    (or (*, V); no ignore_index). Other arguments as ff.cross_entropy (no class weights: `weight`
    here is the projection). Returns a scalar, or the per-row losses shaped (*) for "none", in
    input's dtype (probabilities: promoted with the target's, as torch). Gradients for input, weight,
    bias. chunk_size: rows of tokens per chunk (default: chosen from N, H, V). Backend "reference"
    computes the full logits with eager torch, as does a probability target that requires grad;
    otherwise the chunked path runs (Triton kernel on CUDA, torch math on CPU), so CPU memory is
    saved too.
    """
    amp = amp_dtype(input)
    if amp is not None:
        # the projection is F.linear, which autocast runs in its low precision dtype: do the same
        input, weight, bias = (autocast_cast(t, amp) for t in (input, weight, bias))
    soft = _validate_linear(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss)
    ignore_index = _as_index(ignore_index)
    if not soft and _range_check_wanted(target):
        _check_range(target, weight.shape[0], ignore_index)
    grad_on = torch.is_grad_enabled()
    if get_backend() == "reference" or (soft and grad_on and target.requires_grad):
        with no_autocast(input, amp):
            return _amp_result(_ref.linear_cross_entropy(input, weight, target, bias, ignore_index, reduction,
                                                         label_smoothing, z_loss=z_loss), amp)
    use_kernel = use_triton(input, weight, target, bias) and input.dtype != torch.float64
    lead = input.shape[:-1]
    x = input.reshape(-1, input.shape[-1])
    t = target.reshape(-1, target.shape[-1]) if soft else target.reshape(-1)
    needs = (grad_on and input.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    with no_autocast(input, amp):   # the chunks' matmuls in the dtype chosen above
        out = _lce_kernel(x, weight, bias, t, int(ignore_index), reduction, float(label_smoothing),
                          float(z_loss), needs, use_kernel, chunk_size)
    out = _amp_result(out, amp)
    return out.reshape(lead) if reduction == "none" else out


@opaque_to_compile
def _lce_kernel(*args):
    """The chunked path of linear_cross_entropy (Triton kernel or torch math per chunk), opaque to
    torch.compile (see fastformer/ops/_compile.py)."""
    return _LinearCrossEntropyFn.apply(*args)
