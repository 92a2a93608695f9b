"""Triton kernels for softmax cross-entropy over a large vocabulary (no autograd here).

One program per row of the logits (N, V). The row is never held whole in registers: an online
softmax walks it in blocks of BLOCK_V columns, so V = 256k works, and accumulates in fp32 whatever
the input dtype. Row offsets are computed in int64 (row * stride), so N * V > 2^31 is safe.

Per row i with target t (w = class weights, all ones when absent; W = sum(w); eps = label smoothing;
z = z-loss coefficient; sA, sB the reduction scales of the CE and the z parts: 1 for "sum"/"none",
1 / sum_{valid} w[t] and 1 / #valid for "mean"):

    lse     = log(sum_c exp(x_c))
    ce_i    = (1 - eps) * w_t * (lse - x_t) + eps / V * (W * lse - sum_c w_c x_c)
    loss_i  = sA * ce_i + sB * z * lse^2                     (0 when t == ignore_index)
    dloss_i / dx_c = p_c * (sA * ((1 - eps) * w_t + eps / V * W) + sB * 2 z lse)
                     - sA * eps / V * w_c - sA * (1 - eps) * w_t * [c == t]

With COMPUTE_GRAD the same program writes that gradient (times an optional per-row or scalar factor
g) into `grad`, which may alias `logits`: every element is read before it is written by the same
program, so the gradient can overwrite the logits in place. When the whole row fits one block
(ONE_BLOCK, V <= 32768 on GPUs) the row is read once and kept in registers: one read and one write
per element, the floor of any fused fwd+bwd. Longer rows make a second pass over the row for the
gradient, walking its blocks last-to-first so that the most recently read blocks, the likeliest
still in L2, are read again first.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(
    logits_ptr, stride_l,      # (N, V) logits, row stride
    grad_ptr, stride_g,        # (N, V) gradient output (may alias logits); unused without COMPUTE_GRAD
    target_ptr,                # (N,) integer targets
    weight_ptr,                # (V,) class weights; unused without HAS_WEIGHT
    wsum_ptr,                  # fp32 0-d: sum of the class weights; unused without HAS_WEIGHT
    count_ptr,                 # 0-d: number of non-ignored rows; unused unless MEAN
    wden_ptr,                  # fp32 0-d: sum of w[t] over non-ignored rows; unused unless MEAN and HAS_WEIGHT
    gscale_ptr, stride_gs,     # gradient factor per row (stride 1) or scalar (stride 0); unused without HAS_GSCALE
    loss_ptr, lse_ptr,         # (N,) fp32 outputs: scaled per-row loss, log-sum-exp
    V, ignore_index, eps, z,
    HAS_WEIGHT: tl.constexpr, HAS_GSCALE: tl.constexpr, COMPUTE_GRAD: tl.constexpr, SMOOTH: tl.constexpr,
    MEAN: tl.constexpr, BLOCK_V: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_l
    grad_row = grad_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    t = tl.load(target_ptr + row).to(tl.int64)

    # 1. Ignored row: zero loss and, if asked, a zero gradient row; nothing of the row is read.
    if t == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, V, BLOCK_V):
                offs = start + cols
                tl.store(grad_row + offs, tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty),
                         mask=offs < V)
        return

    # reduction scales; a zero denominator (every row ignored) divides 0 by 1: loss 0, grad 0
    sA = 1.0
    sB = 1.0
    if MEAN:
        n = tl.load(count_ptr).to(tl.float32)
        sB = 1.0 / tl.maximum(n, 1.0)
        if HAS_WEIGHT:
            den = tl.load(wden_ptr)
            sA = 1.0 / tl.where(den == 0.0, 1.0, den)
        else:
            sA = sB
    if HAS_WEIGHT:
        w_sum = tl.load(wsum_ptr)
    else:
        w_sum = V * 1.0
    in_range = (t >= 0) & (t < V)   # out-of-range targets are undefined behaviour; never read out of bounds
    x_t = tl.load(logits_row + t, mask=in_range, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t, mask=in_range, other=0.0).to(tl.float32)
    else:
        w_t = 1.0

    # 2. One pass of online softmax: running max m and running sum s of exp(x - m), block by block;
    #    with label smoothing also sum_c w_c * x_c. ONE_BLOCK: the row is one block, kept for step 4.
    m = -float("inf")
    s = 0.0
    wx = 0.0
    if ONE_BLOCK:
        mask = cols < V
        x_row = tl.load(logits_row + cols, mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x_row, axis=0)
        s = tl.sum(tl.exp(x_row - m), axis=0)
        if SMOOTH:
            wx = _smooth_term(x_row, cols, mask, weight_ptr, HAS_WEIGHT)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(logits_row + offs, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
            if SMOOTH:
                wx += _smooth_term(x, offs, mask, weight_ptr, HAS_WEIGHT)
    lse = m + tl.log(s)

    # 3. Per-row loss, already multiplied by the reduction scales.
    ce = (1.0 - eps) * w_t * (lse - x_t) + (eps / V) * (w_sum * lse - wx)
    tl.store(loss_ptr + row, sA * ce + sB * z * lse * lse)
    tl.store(lse_ptr + row, lse)

    # 4. The gradient p_c * coef - smoothing term - target term, times the factor g: from the kept
    #    row (ONE_BLOCK) or from a second pass, last block first (those are the likeliest in L2).
    if COMPUTE_GRAD:
        g = 1.0
        if HAS_GSCALE:
            g = tl.load(gscale_ptr + row * stride_gs).to(tl.float32)
        coef = g * (sA * ((1.0 - eps) * w_t + (eps / V) * w_sum) + sB * 2.0 * z * lse)
        smooth = g * sA * (eps / V)
        hit = g * sA * (1.0 - eps) * w_t
        if ONE_BLOCK:
            _ce_grad_block(x_row, cols, cols < V, t, lse, coef, smooth, hit, grad_row, weight_ptr, HAS_WEIGHT)
        else:
            n_blocks = tl.cdiv(V, BLOCK_V)
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK_V + cols
                mask = offs < V
                x = tl.load(logits_row + offs, mask=mask, other=0.0).to(tl.float32)
                _ce_grad_block(x, offs, mask, t, lse, coef, smooth, hit, grad_row, weight_ptr, HAS_WEIGHT)


@triton.jit
def _smooth_term(x, offs, mask, weight_ptr, HAS_WEIGHT: tl.constexpr):
    """sum_c w_c * x_c over one block (label smoothing's term); masked columns count 0."""
    xz = tl.where(mask, x, 0.0)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.sum(w * xz, axis=0)
    return tl.sum(xz, axis=0)


@triton.jit
def _ce_grad_block(x, offs, mask, t, lse, coef, smooth, hit, grad_row, weight_ptr, HAS_WEIGHT: tl.constexpr):
    """Write d loss / d x for one block of columns `offs` of a row (x: fp32 logits of the block)."""
    d = tl.exp(x - lse) * coef
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d -= smooth * w
    else:
        d -= smooth
    d = tl.where(offs == t, d - hit, d)
    tl.store(grad_row + offs, d.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(grad_ptr, stride_g, g_ptr, stride_gs, V, BLOCK_V: tl.constexpr):
    """grad[i, :] *= g[i * stride_gs] in place; a row whose factor is exactly 1 is left untouched, so
    the usual backward of a scalar loss (grad_output == 1) costs a launch and no traffic."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.load(g_ptr + row * stride_gs).to(tl.float32)
    if g == 1.0:
        return
    grad_row = grad_ptr + row * stride_g
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(grad_row + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_row + offs, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)


# rows up to this many columns are read once and kept in registers (32 per thread at 32 warps)
ONE_BLOCK_MAX_V = 32768


def _block_and_warps(V: int, device: torch.device, keep_row: bool = True) -> tuple[int, int, bool]:
    """(BLOCK_V, num_warps, ONE_BLOCK). keep_row=False: always stream in 4096-wide blocks."""
    if device.type != "cuda":
        # The interpreter runs whole blocks as numpy arrays: a modest block keeps tests quick while
        # still exercising the multi-block online softmax for V > 1024 (and one block below that).
        block = min(1024, triton.next_power_of_2(V))
        return block, 1, keep_row and block >= V
    if keep_row and 4096 < V <= ONE_BLOCK_MAX_V:
        block = triton.next_power_of_2(V)
        # compiled for sm_90 (Triton 3.6): 32 warps keep the 32k row at 64 registers a thread
        return block, (32 if block >= 16384 else 16), True
    block = min(4096, triton.next_power_of_2(V))
    return block, (16 if block >= 4096 else 8 if block >= 2048 else 4), keep_row and block >= V


def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_den: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    grad: torch.Tensor | None = None,
    gscale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the cross-entropy kernel.

    logits: (N, V), unit stride along V.  target: (N,) integers.
    count: 0-d number of non-ignored rows for reduction "mean" (None: rows unscaled, as for "sum"/"none").
    weight: (V,) fp32 class weights or None; weight_den: 0-d fp32 sum of weight[t] over non-ignored rows
    (needed for "mean" with weights).  grad: (N, V) buffer to receive d loss / d logits (may be
    `logits` itself) or None for the loss only.  gscale: (N,) or one-element factor applied to grad.
    Returns (loss_rows, lse): fp32 (N,) each; loss_rows already carries the "mean" scaling.
    """
    N, V = logits.shape
    assert logits.stride(1) == 1, "logits must have unit stride along the vocabulary"
    loss = torch.empty(N, dtype=torch.float32, device=logits.device)
    lse = torch.empty(N, dtype=torch.float32, device=logits.device)
    if N == 0:
        return loss, lse
    if grad is not None:
        assert grad.shape == logits.shape and grad.stride(1) == 1
    mean = count is not None
    if mean and weight is not None:
        assert weight_den is not None, "reduction mean with class weights needs weight_den"
    wsum = weight.sum(dtype=torch.float32) if weight is not None else None
    block, warps, one_block = _block_and_warps(V, logits.device)
    dummy = loss   # any valid pointer for the arguments a specialisation never reads
    _ce_fwd_kernel[(N,)](
        logits, logits.stride(0),
        grad if grad is not None else logits, grad.stride(0) if grad is not None else 0,
        target,
        weight if weight is not None else dummy,
        wsum if wsum is not None else dummy,
        count if mean else dummy,
        weight_den if (mean and weight is not None) else dummy,
        gscale if gscale is not None else dummy, (gscale.stride(0) if gscale.numel() > 1 else 0) if gscale is not None else 0,
        loss, lse,
        V, int(ignore_index), float(label_smoothing), float(z_loss),
        HAS_WEIGHT=weight is not None, HAS_GSCALE=gscale is not None, COMPUTE_GRAD=grad is not None,
        SMOOTH=float(label_smoothing) > 0.0, MEAN=mean,
        BLOCK_V=block, ONE_BLOCK=one_block, num_warps=warps,
    )
    return loss, lse


def scale_rows_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad: (N, V), unit stride along V, scaled in place by g: (N,) per row or a one-element tensor."""
    N, V = grad.shape
    if N == 0:
        return grad
    block, warps, _ = _block_and_warps(V, grad.device, keep_row=False)
    g = g.reshape(-1)
    _scale_rows_kernel[(N,)](grad, grad.stride(0), g, g.stride(0) if g.numel() > 1 else 0, V,
                             BLOCK_V=block, num_warps=warps)
    return grad
