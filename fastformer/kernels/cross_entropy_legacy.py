"""The first softmax cross-entropy kernel, kept as a tuning candidate (no autograd here).

`cross_entropy.py` holds the kernel the library launches by default; this one stays selectable
(configuration kind 0 in `cross_entropy_launch.py`), so the self-tuning can keep it on a GPU where it
is faster. Its host code (block size, warps) is `cross_entropy_launch.legacy_config`.

One program per row. A row is one batch entry of (N, V) logits, or one position (n, d) of
K-dimensional logits (N, V, d1, ..., dK) seen as (N, V, D), D = d1···dK: the row starts at
n·s_n + d·s_d and its classes are s_c apart (unit stride when the class dim is last; strided, with
no copy, when it is not). The row is never held whole in registers: an online softmax walks it in
blocks of BLOCK_V columns, so V = 256k works, and accumulates in fp32 whatever the input dtype. Row
offsets are computed in int64, so N * V > 2^31 is safe.

Per row i with class-index target t (w = class weights, all ones when absent; W = sum(w); eps = label
smoothing; z = z-loss coefficient; sA, sB the reduction scales of the CE and the z parts: 1 for
"sum"/"none", 1 / sum_{valid} w[t] and 1 / #valid for "mean"):

    lse     = m + log_s,  m = max_c x_c,  log_s = log(sum_c exp(x_c - m))   (the loss and p_c use
              the differences to m: lse - x_t = (m - x_t) + log_s, p_c = exp((x_c - m) - log_s))
    ce_i    = (1 - eps) * w_t * (lse - x_t) + eps / V * (W * lse - sum_c w_c x_c)
    loss_i  = sA * ce_i + sB * z * lse^2                     (0 when t == ignore_index)
    dloss_i / dx_c = p_c * (sA * ((1 - eps) * w_t + eps / V * W) + sB * 2 z lse)
                     - sA * eps / V * w_c - sA * (1 - eps) * w_t * [c == t]

With a probability target y (SOFT; torch's semantics: y' = (1 - eps) y + eps / V, no ignored rows,
"mean" divides by the number of rows, sA = sB):

    ce_i    = sum_c w_c y'_c (lse - x_c) = A * lse - sum_c w_c y'_c x_c,   A = sum_c w_c y'_c
    dloss_i / dx_c = p_c * (sA * A + sB * 2 z lse) - sA * w_c y'_c

A class index outside [0, V) that is not ignore_index is never read out of bounds: that row's lse,
loss and gradient are NaN (so the reduced loss is NaN), which is how the kernel reports it.

With COMPUTE_GRAD the same program writes that gradient (times an optional per-row or scalar factor
g) into `grad`, which may alias `logits`: every element is read before it is written by the same
program, so the gradient can overwrite the logits in place. When the whole row fits one block
(ONE_BLOCK, V <= 32768 on GPUs) the row is read once and kept in registers: one read and one write
per element, the floor of any fused fwd+bwd. Longer rows make a second pass over the row for the
gradient, walking its blocks last-to-first so that the most recently read blocks, the likeliest
still in L2, are read again first.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    s_ln,
    s_ld,
    s_lc,  # logits: row (n, d) starts at n*s_ln + d*s_ld, class c at c*s_lc
    grad_ptr,
    s_gn,
    s_gd,
    s_gc,  # gradient output (may alias logits), same layout; unused without COMPUTE_GRAD
    target_ptr,
    s_tn,
    s_td,
    s_tc,  # class indices: (rows,) contiguous; SOFT: probabilities laid out as logits
    weight_ptr,  # (V,) class weights; unused without HAS_WEIGHT
    wsum_ptr,  # fp32 0-d: sum of the class weights; unused without HAS_WEIGHT
    count_ptr,  # 0-d: number of non-ignored rows (SOFT: of rows); unused unless MEAN
    wden_ptr,  # fp32 0-d: sum of w[t] over non-ignored rows; unused unless MEAN, HAS_WEIGHT, not SOFT
    gscale_ptr,
    stride_gs,  # gradient factor per row (stride 1) or scalar (stride 0); unused without HAS_GSCALE
    loss_ptr,
    lse_ptr,  # (rows,) fp32 outputs: scaled per-row loss, log-sum-exp
    V,
    D,
    ignore_index,
    eps,
    z,  # D: positions per batch entry (d1*...*dK; 1 for (N, C) input)
    HAS_WEIGHT: tl.constexpr,
    HAS_GSCALE: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    SMOOTH: tl.constexpr,
    MEAN: tl.constexpr,
    SOFT: tl.constexpr,
    BLOCK_V: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    n = row // D
    d = row - n * D
    logits_row = logits_ptr + n * s_ln + d * s_ld
    grad_row = grad_ptr + n * s_gn + d * s_gd
    target_row = target_ptr + n * s_tn + d * s_td
    cols = tl.arange(0, BLOCK_V)
    if SOFT:
        t = -1  # no class index, no ignored row
    else:
        t = tl.load(target_ptr + row).to(tl.int64)

    # 1. Ignored row: zero loss and, if asked, a zero gradient row; nothing of the row is read.
    if not SOFT:
        if t == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
            if COMPUTE_GRAD:
                for start in range(0, V, BLOCK_V):
                    offs = start + cols
                    tl.store(
                        grad_row + offs * s_gc,
                        tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty),
                        mask=offs < V,
                    )
            return

    # reduction scales; a zero denominator (every row ignored) divides 0 by 1: loss 0, grad 0
    sA = 1.0
    sB = 1.0
    if MEAN:
        cnt = tl.load(count_ptr).to(tl.float32)
        sB = 1.0 / tl.maximum(cnt, 1.0)
        if HAS_WEIGHT and not SOFT:
            den = tl.load(wden_ptr)
            # a zero denominator: the CE part is 0 (not only its target term: label smoothing's too)
            sA = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        else:
            sA = sB
    if HAS_WEIGHT:
        w_sum = tl.load(wsum_ptr)
    else:
        w_sum = V * 1.0
    # a class index outside [0, V) is never read out of bounds: its row's loss and gradient become NaN
    in_range = (t >= 0) & (t < V)
    x_t = 0.0
    w_t = 1.0
    if not SOFT:
        x_t = tl.load(logits_row + t * s_lc, mask=in_range, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=in_range, other=0.0).to(tl.float32)

    # 2. One pass of online softmax: running max m and running sum s of exp(x - m), block by block;
    #    with label smoothing also sum_c w_c * x_c; SOFT: the target mass A = sum_c w_c y'_c and
    #    sum_c w_c y'_c x_c (y' = (1 - eps) y + eps / V). ONE_BLOCK: the row is one block, kept for step 4.
    m = -float("inf")
    s = 0.0
    wx = 0.0
    mass = 0.0
    if ONE_BLOCK:
        mask = cols < V
        x_row = tl.load(logits_row + cols * s_lc, mask=mask, other=-float("inf")).to(tl.float32)
        m = tl.max(x_row, axis=0)
        s = tl.sum(tl.exp(x_row - m), axis=0)
        if SOFT:
            wy_row = _soft_weights(target_row, s_tc, cols, mask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
            mass = tl.sum(wy_row, axis=0)
            wx = tl.sum(wy_row * tl.where(mask, x_row, 0.0), axis=0)
        elif SMOOTH:
            wx = _smooth_term(x_row, cols, mask, weight_ptr, HAS_WEIGHT)
    else:
        for start in range(0, V, BLOCK_V):
            offs = start + cols
            mask = offs < V
            x = tl.load(logits_row + offs * s_lc, mask=mask, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # while every logit so far is -inf (a masked range of the vocabulary first), m_new is
            # -inf too and x - m_new, m - m_new would be -inf + inf = NaN: shift by 0 instead (s stays 0)
            m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
            m = m_new
            if SOFT:
                wy = _soft_weights(target_row, s_tc, offs, mask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
                mass += tl.sum(wy, axis=0)
                wx += tl.sum(wy * tl.where(mask, x, 0.0), axis=0)
            elif SMOOTH:
                wx += _smooth_term(x, offs, mask, weight_ptr, HAS_WEIGHT)
    log_s = tl.log(s)
    if not SOFT:
        log_s = tl.where(in_range, log_s, float("nan"))
    lse = m + log_s

    # 3. Per-row loss, already multiplied by the reduction scales; formed from differences to the max
    #    m, as torch's log_softmax (lse - x_t = (m - x_t) + log_s: lse rounds log_s away next to a
    #    large m). m_f: the max, 0 for a row of -inf (its lse and loss stay -inf / NaN, as torch's)
    m_f = tl.where(m == -float("inf"), 0.0, m)
    if SOFT:
        ce = mass * log_s - (wx - mass * m_f)
    else:
        ce = (1.0 - eps) * w_t * ((m_f - x_t) + log_s)
        if SMOOTH:  # (w_sum m_f alone may overflow: 0 times it would be NaN)
            ce += (eps / V) * (w_sum * log_s - (wx - w_sum * m_f))
    tl.store(loss_ptr + row, sA * ce + sB * z * lse * lse)
    tl.store(lse_ptr + row, lse)

    # 4. The gradient p_c * coef - smoothing term - target term, times the factor g: from the kept
    #    row (ONE_BLOCK) or from a second pass, last block first (those are the likeliest in L2).
    if COMPUTE_GRAD:
        g = 1.0
        if HAS_GSCALE:
            g = tl.load(gscale_ptr + row * stride_gs).to(tl.float32)
        if SOFT:
            coef = g * (sA * mass + sB * 2.0 * z * lse)
            smooth = g * sA  # times w_c y'_c
            hit = 0.0
        else:
            coef = g * (sA * ((1.0 - eps) * w_t + (eps / V) * w_sum) + sB * 2.0 * z * lse)
            smooth = g * sA * (eps / V)
            hit = g * sA * (1.0 - eps) * w_t
        if ONE_BLOCK:
            if SOFT:
                _soft_grad_block(x_row, wy_row, cols, cols < V, m_f, log_s, coef, smooth, grad_row, s_gc)
            else:
                _ce_grad_block(
                    x_row, cols, cols < V, t, m_f, log_s, coef, smooth, hit, grad_row, s_gc, weight_ptr, HAS_WEIGHT
                )
        else:
            n_blocks = tl.cdiv(V, BLOCK_V)
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK_V + cols
                mask = offs < V
                x = tl.load(logits_row + offs * s_lc, mask=mask, other=0.0).to(tl.float32)
                if SOFT:
                    wy = _soft_weights(target_row, s_tc, offs, mask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
                    _soft_grad_block(x, wy, offs, mask, m_f, log_s, coef, smooth, grad_row, s_gc)
                else:
                    _ce_grad_block(
                        x, offs, mask, t, m_f, log_s, coef, smooth, hit, grad_row, s_gc, weight_ptr, HAS_WEIGHT
                    )


@triton.jit
def _smooth_term(x, offs, mask, weight_ptr, HAS_WEIGHT: tl.constexpr):
    """sum_c w_c * x_c over one block (label smoothing's term); masked columns count 0."""
    xz = tl.where(mask, x, 0.0)
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.sum(w * xz, axis=0)
    return tl.sum(xz, axis=0)


@triton.jit
def _soft_weights(target_row, s_tc, offs, mask, weight_ptr, eps, V, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """w_c * y'_c for one block of a probability target, y' = (1 - eps) * y + eps / V; 0 on masked columns."""
    y = tl.load(target_row + offs * s_tc, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        y = tl.where(mask, (1.0 - eps) * y + eps / V, 0.0)
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _ce_grad_block(x, offs, mask, t, m, log_s, coef, smooth, hit, grad_row, s_gc, weight_ptr, HAS_WEIGHT: tl.constexpr):
    """Write d loss / d x for one block of columns `offs` of a row (x: fp32 logits of the block;
    p = exp((x - m) - log_s), the difference to the row max m first)."""
    d = tl.exp((x - m) - log_s) * coef
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d -= smooth * w
    else:
        d -= smooth
    d = tl.where(offs == t, d - hit, d)
    tl.store(grad_row + offs * s_gc, d.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _soft_grad_block(x, wy, offs, mask, m, log_s, coef, smooth, grad_row, s_gc):
    """Probability target: d loss / d x_c = p_c * coef - smooth * w_c y'_c for one block."""
    d = tl.exp((x - m) - log_s) * coef - smooth * wy
    tl.store(grad_row + offs * s_gc, d.to(grad_row.dtype.element_ty), mask=mask)
