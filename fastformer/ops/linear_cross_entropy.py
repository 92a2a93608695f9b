"""ff.linear_cross_entropy: cross_entropy(F.linear(x, W, b), target) without the (N, V) logits.

Chunked over rows of tokens (Triton CE kernel per chunk on CUDA, the same chunking with torch math on
CPU). Rows whose target is ignored are dropped first (one host sync for their count; under CUDA graph
capture, where a sync is impossible, every row is kept and the ignored ones get zero gradients). For
each chunk of kept rows:

    logits = x_c @ W^T (+ b)                     (c, V), the only chunk-sized buffer
    CE and d loss / d logits in place in it      (kernel: one read, one write per element)
    grad_x[rows of c] = dlogits @ W              (complete: no accumulation across chunks)
    grad_W += dlogits^T @ x_c                    (straight into the returned gradient, in W's dtype)
    grad_b += column sums of dlogits             (fp32, V numbers; fp64 for fp64 input)

grad_W is accumulated in the returned tensor itself: no fp32 (V, H) accumulator (2 GB at V=131072,
H=4096). Each chunk's GEMM sums in fp32 and rounds once into it, so a 16-bit grad_W takes one
rounding per chunk; the default chunking keeps that to at most MAX_CHUNKS chunks (the error stays
within 2x of the unfused path's, which rounds the whole product once). FLOPs are exactly the
unfused path's (6 N V H): nothing is recomputed for "mean"/"sum". For "none" the gradients depend on
the per-row grad_output, so backward recomputes the chunks with it folded into the kernel.
"""

from __future__ import annotations

import math

import torch

import fastformer.reference.cross_entropy as _ref

from ..backend import get_backend, under_functorch, use_triton
from . import forward_grads
from ._compile import opaque_to_compile
from ._validate import as_real
from .amp import amp_dtype, autocast_cast, no_autocast
from .cross_entropy import (
    _as_index,
    _check_range,
    _index_target,
    _is_compiling,
    _loss_dtype,
    _range_check_wanted,
    _validate_linear,
)
from .errors import InputError, refuse_double_backward

# a 16-bit grad_W takes one rounding per chunk: at most this many chunks by default. With K chunks
# its rounding error is sqrt((K + 1) / 2) times the unfused path's single rounding at worst (the
# partial sums grow like sqrt(k / K)): 1.87 for K = 6, and the bf16 rounding of d loss / d logits,
# which both paths share, makes the measured ratio smaller
MAX_CHUNKS = 6
# CUDA: chunk logits of at most this many elements (256 MB in bf16) unless MAX_CHUNKS needs more
CUDA_CHUNK_ELEMENTS = 1 << 27
# torch-math path: rows converted to fp32 at a time (8 MB per temporary)
TORCH_SUB_ELEMENTS = 1 << 21


# the compiled row kernel (csrc/cross_entropy_cpu.cpp) for fp32 CPU rows with class-index targets:
# None = not looked up yet; tests set it to False to run the torch math below instead
_CPP_ROWS: dict = {"ok": None}


def _cpp_rows_usable(logits, target, gscale, colsum, bias) -> bool:
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or not logits.is_contiguous():
        return False
    if target.is_floating_point():
        return False
    for t in (gscale, colsum, bias):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
            return False
    if _CPP_ROWS["ok"] is None:
        _CPP_ROWS["ok"] = _load_cpp_rows()
    return bool(_CPP_ROWS["ok"])


def _load_cpp_rows() -> bool:
    """Whether the extension's row kernel is loaded (FASTFORMER_DISABLE_EXT=1 turns it off)."""
    from .._extension import has_op

    return has_op("ce_rows_cpu")


def _ce_rows_torch_(
    logits,
    target,
    scale,
    label_smoothing: float,
    z_loss: float,
    want_grad: bool,
    gscale=None,
    ignore_index: int = -100,
    colsum=None,
    bias=None,
):
    """Torch-math twin of kernels.cross_entropy_launch.ce_forward for rows without class weights; fp32
    CPU rows with class-index targets go to the compiled row kernel (csrc/cross_entropy_cpu.cpp: each
    row read from memory once, the other passes in cache), whose reference this torch math is.

    logits: (c, V), owned by the caller; with want_grad it is overwritten by d loss / d logits (times
    gscale: (c,) or None). target: (c,) class indices (ignore_index rows: loss 0, gradient 0) or
    (c, V) probabilities. scale: 0-d tensor or float, 1 / #rows for "mean", else 1. Returns (c,) scaled
    per-row losses in _acc_dtype(logits) (fp32, fp64 for fp64 logits); colsum (V,) in that dtype, if
    given, gets the gradient's column sums added. bias
    (V,), if given, is added to the logits first, block by block (fp32/fp64 logits only). Works on
    blocks of rows so that the fp32 temporaries stay small."""
    if _cpp_rows_usable(logits, target, gscale, colsum, bias):
        return torch.ops.fastformer.ce_rows_cpu(
            logits,
            target.to(torch.int64).contiguous(),
            bias,
            float(scale),
            label_smoothing,
            z_loss,
            ignore_index,
            want_grad,
            gscale,
            colsum,
        )
    c, V = logits.shape
    sub = max(1, TORCH_SUB_ELEMENTS // max(V, 1))
    out = torch.empty(c, dtype=_acc_dtype(logits), device=logits.device)
    for s in range(0, c, sub):
        e = min(c, s + sub)
        if bias is not None:
            logits[s:e].add_(bias)
        out[s:e] = _ce_block_torch_(
            logits[s:e],
            target[s:e],
            scale,
            label_smoothing,
            z_loss,
            want_grad,
            gscale[s:e] if gscale is not None else None,
            ignore_index,
            colsum,
        )
    return out


def _ce_block_torch_(
    logits, target, scale, eps: float, z_loss: float, want_grad: bool, gscale, ignore_index: int, colsum
):
    V = logits.shape[1]
    xf = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()
    sA = sB = scale  # no class weights: the CE and z parts share the denominator
    valid = None
    # what the loss needs from the raw logits, taken before xf is overwritten below
    soft = target.is_floating_point()
    if soft:
        y = target.to(xf.dtype)
        if eps > 0.0:
            y = (1.0 - eps) * y + eps / V
        mass = y.sum(dim=1)
        yx = (y * xf).sum(dim=1)
    else:
        valid = target != ignore_index
        t = torch.where(valid, target, torch.zeros_like(target)).long()[:, None]
        mass = None
        xt = xf.gather(1, t)[:, 0]
        xsum = xf.sum(dim=1) if eps > 0.0 else None
    m = xf.amax(dim=1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # as logsumexp: all -inf rows stay -inf
    if want_grad:
        # exp once: xf <- exp(xf - rowmax) in place; its row sums give lse, and rescaled it is the
        # softmax the gradient needs (logsumexp, then exp(xf - lse), would take every exp twice)
        xf.sub_(m[:, None]).exp_()
        sumexp = xf.sum(dim=1)
        log_s = sumexp.log()
    else:
        log_s = torch.logsumexp(xf - m[:, None], dim=1)
    lse = m + log_s
    # the loss from differences to the row max, as torch's log_softmax (and the kernels): lse - x_t
    # as (m - x_t) + log_s, since lse itself rounds log_s away next to a large m
    if soft:
        ce = mass * log_s - (yx - mass * m)
    else:
        ce = (1.0 - eps) * ((m - xt) + log_s)
        if eps > 0.0:
            ce = ce + eps * log_s - (eps / V) * (xsum - V * m)
    loss = sA * ce
    if z_loss != 0.0:
        loss = loss + sB * z_loss * lse * lse
    if valid is not None:
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    if want_grad:
        g = gscale.to(xf.dtype) if gscale is not None else torch.ones_like(lse)
        if valid is not None:
            g = torch.where(valid, g, torch.zeros_like(g))
        if mass is not None:
            coef = g * (sA * mass + sB * 2.0 * z_loss * lse)
            xf.mul_((coef / sumexp)[:, None]).sub_((g * sA)[:, None] * y)
        else:
            coef = g * (sA + sB * 2.0 * z_loss * lse)  # (1 - eps) + eps / V * V == 1 without class weights
            xf.mul_((coef / sumexp)[:, None])
            if eps > 0.0:
                xf.sub_((g * sA * (eps / V))[:, None])
            xf.scatter_add_(1, t, (-(g * sA * (1.0 - eps)))[:, None])
        if colsum is not None:
            colsum.add_(xf.sum(dim=0, dtype=colsum.dtype))
        if xf is not logits:
            logits.copy_(xf)
    return loss.to(_acc_dtype(xf))


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype of the loss rows, the 1/count scale and the bias-gradient sums: float64 for float64
    input (so that float64 gives float64 results), else float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _colsum_(acc: torch.Tensor, m: torch.Tensor) -> None:
    """acc (V,) += column sums of m (c, V) in acc's dtype; on CPU in blocks of rows (a whole-matrix sum
    there converts all of m to acc's dtype first)."""
    if m.is_cuda:
        acc.add_(m.sum(dim=0, dtype=acc.dtype))
        return
    sub = max(1, TORCH_SUB_ELEMENTS // max(m.shape[1], 1))
    for s in range(0, m.shape[0], sub):
        acc.add_(m[s : s + sub].sum(dim=0, dtype=acc.dtype))


def _chunk_rows(n: int, H: int, V: int, device: torch.device, chunk_size: int | None, itemsize: int) -> int:
    """Rows of tokens per chunk.

    CUDA: chunk logits of up to CUDA_CHUNK_ELEMENTS (at least 1024 rows), so the per-chunk read and
    write of grad_W (2 V H elements) stays small next to the chunk's 6 c H V matmul flops. CPU: the
    chunk's logits about as large as the kept hidden states (n, H), at least 256 rows, then split evenly
    over the chunks that needs. 16-bit inputs:
    at least n / MAX_CHUNKS rows, for grad_W's accuracy. `chunk_size` overrides all of it."""
    if chunk_size is not None:
        return max(1, int(chunk_size))
    if device.type == "cuda":
        rows = 1 << max(0, int(math.floor(math.log2(max(1, CUDA_CHUNK_ELEMENTS // V)))))
        rows = max(1024, rows)
    else:
        rows = max(256, 1 << max(0, math.ceil(math.log2(max(1, math.ceil(n * H / V))))))
        # as many chunks as that needs, of equal size: a thin remainder chunk runs its three GEMMs at a
        # fraction of the full ones' rate (bert-mini MLM, 303 rows: 2 x 152 is 8% faster than 256 + 47)
        rows = -(-n // max(1, -(-n // rows)))
    if itemsize < 4:
        per = -(-n // MAX_CHUNKS)
        rows = max(rows, -(-per // 128) * 128)  # rounded up to a multiple of 128 for the GEMMs
    return max(1, min(n, rows))


def _run_chunks(
    x_k,
    W,
    b,
    t_k,
    count,
    eps,
    z,
    ignore_index,
    use_kernel,
    chunk,
    *,
    loss_rows=None,
    gscale=None,
    grad_x=None,
    keep=None,
    gW=None,
    gb=None,
):
    """The chunk loop shared by forward and the "none" backward. x_k: (n, H) rows; t_k: (n,) class
    indices or (n, V) probabilities; keep: (n,) the rows' indices among all rows, None when x_k holds
    every row in order. gW: (V, H) in W's dtype (the returned gradient); gb: (V,) in _acc_dtype(x_k)."""
    if use_kernel:
        from ..kernels import cross_entropy_launch as K  # lazily: the CPU path must not need (or load) triton

    n = x_k.shape[0]
    want_grad = grad_x is not None or gW is not None or gb is not None
    scale = None
    if not use_kernel:
        scale = 1.0 / count.clamp_min(1).to(_acc_dtype(x_k)) if count is not None else 1.0
    # CPU, fp32/fp64: the bias is added inside the CE rows (a pass over the logits either way, but
    # addmm first writes the broadcast bias over the whole chunk, then reads it back in the GEMM)
    late_bias = b is not None and not use_kernel and x_k.dtype in (torch.float32, torch.float64)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc = x_k[s:e]
        logits = torch.addmm(b, xc, W.t()) if b is not None and not late_bias else xc @ W.t()  # (c, V)
        gs = gscale[s:e] if gscale is not None else None
        if use_kernel:
            rows, _ = K.ce_forward(
                logits,
                t_k[s:e],
                count=count,
                ignore_index=ignore_index,
                label_smoothing=eps,
                z_loss=z,
                grad=logits if want_grad else None,
                gscale=gs,
            )
        else:
            rows = _ce_rows_torch_(
                logits, t_k[s:e], scale, eps, z, want_grad, gs, ignore_index, colsum=gb, bias=b if late_bias else None
            )
        if loss_rows is not None:
            loss_rows[s:e] = rows
        if grad_x is not None:
            if keep is None:
                torch.mm(logits, W, out=grad_x[s:e])
            else:
                grad_x.index_copy_(0, keep[s:e], logits @ W)
        if gW is not None:  # fp32 sums inside the GEMM, one rounding into gW
            if s == 0:
                torch.mm(logits.t(), xc, out=gW)  # gW starts uninitialised (_grad_W): no zero fill
            else:
                gW.addmm_(logits.t(), xc)
        if gb is not None and use_kernel:
            _colsum_(gb, logits)
        del logits  # before the next chunk's is made: one chunk buffer alive, not two


def _grad_W(W: torch.Tensor, n_kept: int) -> torch.Tensor:
    """The buffer for grad_W: uninitialised when some row is kept (the first chunk's GEMM writes all of
    it), zeros when none is (the chunk loop does not run)."""
    return torch.empty_like(W, memory_format=torch.contiguous_format) if n_kept > 0 else torch.zeros_like(W)


def _sync_free(x: torch.Tensor) -> bool:
    """Keep every row instead of counting the kept ones on the host (CUDA graph capture forbids it)."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


def _scale_(t: torch.Tensor, g: torch.Tensor, use_kernel: bool) -> torch.Tensor:
    """t *= g (0-d tensor) in place; on CUDA with the kernel, a factor of exactly 1 moves no bytes."""
    if use_kernel and t.is_cuda and t.dim() == 2 and t.is_contiguous():
        from ..kernels import cross_entropy_launch as K

        return K.scale_rows_(t, g.reshape(1).to(torch.float32))
    return t.mul_(g)


def _kept_rows(x: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str):
    """The rows the chunks run over: (keep, n, x_k, t_k, count). keep: (n,) their indices among x's N
    rows, None when all N are kept in order; x_k: (n, H); t_k: (n,) or (n, V); count: the 0-d divisor
    of "mean" (the kept-row count; N for probability targets), None for the other reductions."""
    N = x.shape[0]
    soft = target.is_floating_point()
    if soft or _sync_free(x):  # every row (ignored ones get zero loss and gradients)
        count = None
        if reduction == "mean":
            count = torch.full((), N, dtype=torch.int64, device=x.device) if soft else (target != ignore_index).sum()
        return None, N, x, target, count
    keep = (target != ignore_index).nonzero().squeeze(1)  # host sync: the kept-row count sizes the loop
    n = keep.numel()
    x_k = x if n == N else x.index_select(0, keep)  # no copy when nothing is ignored
    t_k = (target if n == N else target.index_select(0, keep)).contiguous()
    # "mean": the kernel divides by the kept-row count (0 -> 1: all ignored gives 0 and zero grads)
    count = torch.full((), n, dtype=torch.int64, device=x.device) if reduction == "mean" else None
    return (None if n == N else keep), n, x_k, t_k, count


def _prepare(ctx, x, W, target, ignore_index, reduction, eps, z, needs, use_kernel, chunk_size):
    """_kept_rows plus the chunk size; sets ctx.meta, which backward reads. Returns (keep, n, x_k, t_k,
    count, chunk)."""
    keep, n, x_k, t_k, count = _kept_rows(x, target, ignore_index, reduction)
    chunk = _chunk_rows(n, x.shape[1], W.shape[0], x.device, chunk_size, x.element_size())
    ctx.meta = (reduction, eps, z, ignore_index, use_kernel, chunk, x.shape[0], needs)
    return keep, n, x_k, t_k, count, chunk


class _LinearCrossEntropyFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, target, ignore_index, reduction, eps, z, needs, use_kernel, chunk_size):
        N = x.shape[0]
        V = W.shape[0]
        keep, n, x_k, t_k, count, chunk = _prepare(
            ctx, x, W, target, ignore_index, reduction, eps, z, needs, use_kernel, chunk_size
        )
        need_x, need_W, need_b = needs
        acc = _acc_dtype(x)
        loss_rows = torch.empty(n, dtype=acc, device=x.device)
        if reduction == "none" or not any(needs):
            _run_chunks(x_k, W, b, t_k, count, eps, z, ignore_index, use_kernel, chunk, loss_rows=loss_rows)
            ctx.save_for_backward(x_k, W, b, t_k, keep)
            ctx.count = count
        else:
            grad_x = (torch.zeros_like(x) if keep is not None else torch.empty_like(x)) if need_x else None
            gW = _grad_W(W, n) if need_W else None
            gb = torch.zeros(V, dtype=acc, device=x.device) if need_b else None
            _run_chunks(
                x_k,
                W,
                b,
                t_k,
                count,
                eps,
                z,
                ignore_index,
                use_kernel,
                chunk,
                loss_rows=loss_rows,
                grad_x=grad_x,
                keep=keep,
                gW=gW,
                gb=gb,
            )
            forward_grads.save(ctx, grad_x, gW, gb.to(W.dtype) if gb is not None else None)
        if reduction == "none":
            out = (
                loss_rows
                if keep is None
                else torch.zeros(N, dtype=acc, device=x.device).index_copy_(0, keep, loss_rows)
            )
        else:
            out = loss_rows.sum()
        return out  # in _acc_dtype(x): the caller rounds it to the loss dtype (float32 under autocast)

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("ff.linear_cross_entropy")
        return _LinearCrossEntropyFn.grads(ctx, g)

    @staticmethod
    def grads(ctx, g):
        """backward's body, also run by the compiled path's custom op (linear_cross_entropy_op.py)."""
        reduction, eps, z, ignore_index, use_kernel, chunk, N, (need_x, need_W, need_b) = ctx.meta
        if reduction != "none":
            # the gradients were made in forward for grad_output 1: scale them
            grads = forward_grads.scaled(
                ctx, g.to(_acc_dtype(g)), lambda t, f: _scale_(t, f, use_kernel), "ff.linear_cross_entropy"
            )
            return (*grads, None, None, None, None, None, None, None, None)
        x_k, W, b, t_k, keep = ctx.saved_tensors
        count = ctx.count
        g = g.reshape(-1)
        gscale = (g if keep is None else g.index_select(0, keep)).to(_acc_dtype(x_k)).contiguous()
        grad_x = None
        if need_x:
            grad_x = (
                torch.zeros((N, x_k.shape[1]), dtype=x_k.dtype, device=x_k.device)
                if keep is not None
                else torch.empty((N, x_k.shape[1]), dtype=x_k.dtype, device=x_k.device)
            )
        gW = _grad_W(W, x_k.shape[0]) if need_W else None
        gb = torch.zeros(W.shape[0], dtype=_acc_dtype(x_k), device=W.device) if need_b else None
        _run_chunks(
            x_k,
            W,
            b,
            t_k,
            count,
            eps,
            z,
            ignore_index,
            use_kernel,
            chunk,
            gscale=gscale,
            grad_x=grad_x,
            keep=keep,
            gW=gW,
            gb=gb,
        )
        return (grad_x, gW, gb.to(W.dtype) if gb is not None else None, None, None, None, None, None, None, None, None)


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
    bias, in their own dtypes. chunk_size: rows of tokens per chunk (default: chosen from N, H, V
    and the dtype). Backend "reference" computes the full logits with eager torch, as does a
    probability target that requires grad; otherwise the chunked path runs (Triton kernel on CUDA,
    torch math on CPU), so CPU memory is saved too.
    """
    amp = amp_dtype(input)
    if amp is not None:
        # the projection is F.linear, which autocast runs in its low precision dtype: do the same
        input, weight, bias = (autocast_cast(t, amp) for t in (input, weight, bias))
    soft = _validate_linear(input, weight, target, bias, ignore_index, reduction, label_smoothing, z_loss)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise InputError(f"chunk_size must be None or an int >= 1 (rows per chunk), got {chunk_size!r}")
    ignore_index, label_smoothing = _as_index(ignore_index), as_real(label_smoothing)
    if not soft:
        target = _index_target(target, input.dim() == 1)
    if not soft and _range_check_wanted(target):
        _check_range(target, weight.shape[0], ignore_index)
    grad_on = torch.is_grad_enabled()
    out_dtype = _loss_dtype(input, target, amp)
    if (
        get_backend() == "reference"
        or (soft and grad_on and target.requires_grad)
        or under_functorch(input, weight, target, bias)
    ):
        with no_autocast(input, amp):
            return _ref.linear_cross_entropy(
                input,
                weight,
                target,
                bias,
                ignore_index,
                reduction,
                label_smoothing,
                z_loss=z_loss,
                out_dtype=out_dtype,
            )
    use_kernel = use_triton(input, weight, target, bias) and input.dtype != torch.float64
    lead = input.shape[:-1]
    x = input.reshape(lead.numel(), input.shape[-1])
    t = target.reshape(lead.numel(), target.shape[-1]) if soft else target.reshape(-1)
    needs = (
        grad_on and input.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    with no_autocast(input, amp):  # the chunks' matmuls in the dtype chosen above
        # the kernel path stays an opaque call under torch.compile (its backward scales the gradients
        # made in forward in place, which a traced backward could not); the CPU path is a custom op
        chunked = _lce_traced if _is_compiling() and not use_kernel else _lce_kernel
        out = chunked(
            x,
            weight,
            bias,
            t,
            int(ignore_index),
            reduction,
            label_smoothing,
            float(z_loss),
            needs,
            use_kernel,
            chunk_size,
        )
    out = out.to(out_dtype)  # computed in float32 (float64 for float64): rounded once, here
    return out.reshape(lead) if reduction == "none" else out


@opaque_to_compile
def _lce_kernel(*args):
    """The chunked path of linear_cross_entropy (Triton kernel or torch math per chunk), opaque to
    torch.compile (see fastformer/ops/_compile.py)."""
    return _LinearCrossEntropyFn.apply(*args)


def _lce_traced(x, W, b, target, ignore_index, reduction, eps, z, needs, use_kernel, chunk_size):
    """The chunked torch-math path (CPU) under torch.compile: one custom op node, so the graph stays
    whole (linear_cross_entropy_op.py)."""
    from .linear_cross_entropy_op import linear_cross_entropy_op

    return linear_cross_entropy_op(x, W, b, target, ignore_index, reduction, eps, z, *needs, use_kernel, chunk_size)[0]
