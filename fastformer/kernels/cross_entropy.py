"""Triton kernels for softmax cross-entropy over a large vocabulary (no autograd; host side in
`cross_entropy_launch.py`).

Rows. A row is one batch entry of (N, V) logits, or one position (n, d) of K-dimensional logits
(N, V, d1, ..., dK) seen as (N, V, D), D = d1···dK: it starts at n·s_n + d·s_d and its classes are
s_c apart (unit stride when the class dim is last; strided, with no copy, when it is not). Offsets
are int64, so N·V > 2^31 is safe; every sum is fp32 whatever the input dtype.

Persistent programs. A launch has a few programs per SM; program p takes rows p, p + P, p + 2P, ...
so the loads of its next row (or next block) are issued while the current one is reduced and written
(`tl.range(..., num_stages=NUM_STAGES)`: asynchronous copies into shared memory on sm_80+).

Per row with class-index target t (w = class weights, all ones when absent; W = sum(w); eps = label
smoothing; z = z-loss coefficient; sA, sB the reduction scales of the CE and z parts: 1 for
"sum"/"none", 1 / sum_{valid} w[t] and 1 / #valid for "mean"; g the gradient factor):

    lse     = log(sum_c exp(x_c)),   p_c = exp(x_c - lse)
    ce      = (1 - eps) * w_t * (lse - x_t) + eps / V * (W * lse - sum_c w_c x_c)
    loss    = sA * ce + sB * z * lse^2                                 (0 when t == ignore_index)
    grad_c  = g * (p_c * (sA * ((1 - eps) * w_t + eps / V * W) + sB * 2 z lse)
                   - sA * eps / V * w_c - sA * (1 - eps) * w_t * [c == t])

With a probability target y (SOFT; torch's semantics: y' = (1 - eps) y + eps / V, no ignored rows,
"mean" divides by the number of rows, sA = sB), A = sum_c w_c y'_c:

    ce      = A * lse - sum_c w_c y'_c x_c,   grad_c = g * (p_c * (sA * A + sB * 2 z lse) - sA * w_c y'_c)

A class index outside [0, V) that is not ignore_index is never read out of bounds: its row's lse,
loss and gradient are NaN (the reduced loss is NaN). An ignored row's logits are not read (masked
copies fetch nothing) and its gradient row is written as zeros.

Two row shapes (constexpr ONE_BLOCK):
- the row fits one block (V <= BLOCK_V): loaded once, e_c = exp(x_c - max) computed once and kept,
  s = sum(e), and the gradient is e_c * (coef / s) - ...: one read, one exponential and one write per
  element. The row loop itself is software-pipelined, so the next row is in flight.
- longer rows stream twice. Pass 1 keeps a running max and sum per lane (no reduction across threads
  inside the loop): d = x - m_lane; e = exp(-|d|); s_lane = d > 0 ? s_lane * e + 1 : s_lane + e;
  m_lane = max(m_lane, x) -- one exponential per element whichever of the two is larger. The lanes are
  combined once per row. Pass 2 walks the row's blocks last to first (the most recently read are the
  likeliest still in L2) and writes p_c = exp(x_c - lse) times the coefficients: one exponential per
  element again. Both loops are pipelined.
The gradient (times the per-row or scalar factor g when given) goes to `grad`, which may alias
`logits`: each element is read before the same program writes it.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
FLT_MAX = tl.constexpr(3.4028234663852886e38)
X_MAX = tl.constexpr(2.35e38)  # below FLT_MAX / log2 e: x log2 e stays finite


@triton.jit
def _ce_rows_kernel(
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
    weight_ptr,  # (V,) fp32 class weights; unused without HAS_WEIGHT
    wsum_ptr,  # fp32 0-d: sum of the class weights; unused without HAS_WEIGHT
    count_ptr,  # 0-d: number of non-ignored rows (SOFT: of rows); unused unless MEAN
    wden_ptr,  # fp32 0-d: sum of w[t] over non-ignored rows; MEAN, HAS_WEIGHT, not SOFT
    gscale_ptr,
    stride_gs,  # gradient factor per row (stride 1) or scalar (stride 0); HAS_GSCALE
    loss_ptr,
    lse_ptr,  # (rows,) fp32 outputs: scaled per-row loss, log-sum-exp
    rows,
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
    NUM_STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    # per-launch scalars, folded so that few stay live in the row loop (a zero denominator: every
    # row ignored, or class weights of the targets that sum to 0, makes the CE part 0, smoothing's
    # too): k_hit = sA (1 - eps), k_smooth = sA eps / V, k_w = k_smooth W, k_z = sB z (SOFT: k_hit = sA)
    sA = 1.0
    sB = 1.0
    if MEAN:
        sB = 1.0 / tl.maximum(tl.load(count_ptr).to(tl.float32), 1.0)
        if HAS_WEIGHT and not SOFT:
            den = tl.load(wden_ptr)
            sA = tl.where(den == 0.0, 0.0, 1.0 / tl.where(den == 0.0, 1.0, den))
        else:
            sA = sB
    if HAS_WEIGHT:
        w_sum = tl.load(wsum_ptr)
    else:
        w_sum = V * 1.0
    if SOFT:
        k_hit = sA
    else:
        k_hit = sA * (1.0 - eps)
    k_smooth = sA * (eps / V)
    k_w = k_smooth * w_sum
    k_z = sB * z

    mine = tl.cdiv(rows - pid, nprog)  # rows of this program: pid, pid + nprog, ...
    if ONE_BLOCK:
        for i in tl.range(0, mine, num_stages=NUM_STAGES):
            row = pid + i * nprog
            lrow, grow, trow, t, valid, bad, lim = _row_start(
                row, D, s_ln, s_ld, s_gn, s_gd, s_tn, s_td, logits_ptr, grad_ptr, target_ptr, ignore_index, V, SOFT
            )
            mask = cols < V
            rmask = cols < lim  # nothing of an ignored row is read
            x = tl.load(lrow + cols * s_lc, mask=rmask, other=-float("inf")).to(tl.float32)
            m = tl.where(valid, tl.max(x, axis=0), 0.0)  # an ignored row is all -inf: keep it finite
            # x - m before the scaling: exact near the max at any offset, and no x·log2 e overflow
            xm = x - m
            e = tl.exp2(xm * LOG2E)  # the row's only exponential per element
            s = tl.sum(e, axis=0)
            log_s = tl.where(bad, float("nan"), tl.log(s))
            wy = tl.zeros([BLOCK_V], dtype=tl.float32)
            mass = 0.0
            wx = 0.0  # sum_c w_c (x_c - m)
            if SOFT:
                # the logits as they are, then relative to m, as the streamed path does
                wy = _soft_weights(trow, s_tc, cols, rmask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
                mass = tl.sum(wy, axis=0)
                wx = tl.sum(wy * tl.where(mask, x, 0.0), axis=0) - mass * m
            elif SMOOTH:
                if HAS_WEIGHT:
                    wx = tl.sum(tl.load(weight_ptr + cols, mask=rmask, other=0.0) * tl.where(rmask, xm, 0.0), axis=0)
                else:
                    wx = tl.sum(tl.where(rmask, xm, 0.0), axis=0)
            coef, smooth, hit = _row_out(
                row,
                lrow,
                s_lc,
                t,
                valid,
                bad,
                m,
                log_s,
                mass,
                wx,
                k_hit,
                k_smooth,
                k_w,
                k_z,
                weight_ptr,
                gscale_ptr,
                stride_gs,
                loss_ptr,
                lse_ptr,
                HAS_WEIGHT,
                HAS_GSCALE,
                SOFT,
            )
            if COMPUTE_GRAD:
                # p_c = e_c / s: the kept exponentials, scaled once per row
                f = tl.where(valid, coef / s, 0.0)
                _store_grad(grow, s_gc, cols, mask, e * f, wy, t, smooth, hit, weight_ptr, HAS_WEIGHT, SOFT)
    else:
        for i in range(0, mine):
            row = pid + i * nprog
            lrow, grow, trow, t, valid, bad, lim = _row_start(
                row, D, s_ln, s_ld, s_gn, s_gd, s_tn, s_td, logits_ptr, grad_ptr, target_ptr, ignore_index, V, SOFT
            )
            # pass 1: per-lane running max and sum (one exponential per element, no cross-thread step)
            m_l = tl.full([BLOCK_V], -FLT_MAX, dtype=tl.float32)
            s_l = tl.zeros([BLOCK_V], dtype=tl.float32)
            wx_l = tl.zeros([BLOCK_V], dtype=tl.float32)
            mass_l = tl.zeros([BLOCK_V], dtype=tl.float32)
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                offs = start + cols
                mask = offs < V
                rmask = offs < lim
                x = tl.load(lrow + offs * s_lc, mask=rmask, other=-float("inf")).to(tl.float32)
                d = x - m_l
                e = tl.exp2(-tl.abs(d) * LOG2E)
                s_l = tl.where(d > 0.0, s_l * e + 1.0, s_l + e)
                m_l = tl.maximum(m_l, x)
                if SOFT:
                    wy = _soft_weights(trow, s_tc, offs, rmask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
                    mass_l += wy
                    wx_l += wy * tl.where(mask, x, 0.0)
                elif SMOOTH:
                    if HAS_WEIGHT:
                        wx_l += tl.load(weight_ptr + offs, mask=rmask, other=0.0) * tl.where(rmask, x, 0.0)
                    else:
                        wx_l += tl.where(rmask, x, 0.0)
            m = tl.where(valid, tl.max(m_l, axis=0), 0.0)
            s = tl.sum(s_l * tl.exp2((m_l - m) * LOG2E), axis=0)
            log_s = tl.where(bad, float("nan"), tl.log(s))
            mass = tl.sum(mass_l, axis=0)
            # the logits were summed as they are (the row max was not known yet): relative to it now,
            # exact only where the row's offset is small against its spread
            wx = tl.sum(wx_l, axis=0)
            if SOFT:
                wx -= mass * m
            elif SMOOTH:
                wx -= w_sum * m
            coef, smooth, hit = _row_out(
                row,
                lrow,
                s_lc,
                t,
                valid,
                bad,
                m,
                log_s,
                mass,
                wx,
                k_hit,
                k_smooth,
                k_w,
                k_z,
                weight_ptr,
                gscale_ptr,
                stride_gs,
                loss_ptr,
                lse_ptr,
                HAS_WEIGHT,
                HAS_GSCALE,
                SOFT,
            )
            if COMPUTE_GRAD:
                # pass 2, last block first: p_c = exp(x_c - m) / s, the 1 / s folded into the row's
                # coefficient (exp(x_c - lse) rounds log s away next to a large m: a row at 1e30 got
                # p = 1); an ignored row writes zeros, a bad one NaN (its log_s). A probability target
                # keeps exp(x_c - lse): the folded form costs it a row vector of registers (74 -> 106,
                # one block per SM less in the kernel report)
                if SOFT:
                    m2 = tl.where(valid, m + log_s, 0.0)
                    coef = tl.where(valid, coef, 0.0)
                else:
                    m2 = tl.where(valid, m, 0.0)
                    coef = tl.where(valid, coef * tl.exp(-log_s), 0.0)
                m2 = tl.minimum(tl.maximum(m2, -X_MAX), X_MAX) * LOG2E
                n_blocks = tl.cdiv(V, BLOCK_V)
                for j in tl.range(0, n_blocks, num_stages=NUM_STAGES):
                    offs = (n_blocks - 1 - j) * BLOCK_V + cols
                    mask = offs < V
                    rmask = offs < lim
                    x = tl.load(lrow + offs * s_lc, mask=rmask, other=0.0).to(tl.float32)
                    wy = tl.zeros([BLOCK_V], dtype=tl.float32)
                    if SOFT:
                        wy = _soft_weights(trow, s_tc, offs, rmask, weight_ptr, eps, V, HAS_WEIGHT, SMOOTH)
                    # m2 = m log2 e (SOFT: lse log2 e); m and x clamped to X_MAX, where x log2 e would
                    # overflow (inf - inf: NaN). x is not clamped from below (one more operation per
                    # element cost sm_90 occupancy with Triton 3.9): a row whose every logit is below
                    # -X_MAX (finfo.min) gets p = 0 here instead of 1 / V
                    p = tl.exp2(tl.minimum(x, X_MAX) * LOG2E - m2)
                    _store_grad(grow, s_gc, offs, mask, p * coef, wy, t, smooth, hit, weight_ptr, HAS_WEIGHT, SOFT)


@triton.jit
def _row_start(
    row, D, s_ln, s_ld, s_gn, s_gd, s_tn, s_td, logits_ptr, grad_ptr, target_ptr, ignore_index, V, SOFT: tl.constexpr
):
    """(logits row, grad row, target row pointers, class index t (SOFT: -1), valid: not ignored,
    bad: a class index outside [0, V) that is not ignored, lim: V, or 0 for an ignored row (the bound
    of the row's loads: its logits are never read))."""
    r = row.to(tl.int64)
    n = r // D
    d = r - n * D
    if SOFT:
        t = r * 0 - 1
        valid = r >= 0
        bad = r < 0
    else:
        t = tl.load(target_ptr + r).to(tl.int64)
        valid = t != ignore_index
        bad = valid & ((t < 0) | (t >= V))
    return (
        logits_ptr + n * s_ln + d * s_ld,
        grad_ptr + n * s_gn + d * s_gd,
        target_ptr + n * s_tn + d * s_td,
        t,
        valid,
        bad,
        tl.where(valid, V, 0),
    )


@triton.jit
def _row_out(
    row,
    lrow,
    s_lc,
    t,
    valid,
    bad,
    m,
    log_s,
    mass,
    wx,
    k_hit,
    k_smooth,
    k_w,
    k_z,
    weight_ptr,
    gscale_ptr,
    stride_gs,
    loss_ptr,
    lse_ptr,
    HAS_WEIGHT: tl.constexpr,
    HAS_GSCALE: tl.constexpr,
    SOFT: tl.constexpr,
):
    """Store the row's loss (already scaled for the reduction) and lse = m + log_s; return the gradient's
    (coef, smooth, hit): grad_c = p_c * coef - smooth * w_c (SOFT: * w_c y'_c) - hit * [c == t].
    m: the row max, log_s: log sum_c exp(x_c - m), wx: sum_c w_c (x_c - m) (SOFT: w_c y'_c). The loss
    is formed from differences to the max, as torch's log_softmax: lse - x_t = (m - x_t) + log_s
    (lse itself would round log_s away next to a large m).
    k_hit = sA (1 - eps) (SOFT: sA), k_smooth = sA eps / V, k_w = k_smooth W, k_z = sB z."""
    g = 1.0
    if HAS_GSCALE:
        g = tl.load(gscale_ptr + row.to(tl.int64) * stride_gs).to(tl.float32)
    lse = m + log_s
    if SOFT:
        loss = k_hit * (mass * log_s - wx) + k_z * lse * lse
        coef = g * (k_hit * mass + 2.0 * k_z * lse)
        smooth = g * k_hit
        hit = 0.0
    else:
        ok = valid & (bad == 0)
        x_t = tl.load(lrow + t * s_lc, mask=ok, other=0.0).to(tl.float32)
        w_t = 1.0
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + t, mask=ok, other=0.0)
        a_t = k_hit * w_t
        loss = a_t * ((m - x_t) + log_s) + k_w * log_s - k_smooth * wx + k_z * lse * lse
        coef = g * (a_t + k_w + 2.0 * k_z * lse)
        smooth = tl.where(valid, g * k_smooth, 0.0)
        hit = tl.where(valid, g * a_t, 0.0)
    r = row.to(tl.int64)
    tl.store(loss_ptr + r, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + r, tl.where(valid, lse, 0.0))
    return coef, smooth, hit


@triton.jit
def _soft_weights(target_row, s_tc, offs, mask, weight_ptr, eps, V, HAS_WEIGHT: tl.constexpr, SMOOTH: tl.constexpr):
    """w_c * y'_c for one block of a probability target, y' = (1 - eps) * y + eps / V; 0 on masked columns."""
    y = tl.load(target_row + offs * s_tc, mask=mask, other=0.0).to(tl.float32)
    if SMOOTH:
        y = tl.where(mask, (1.0 - eps) * y + eps / V, 0.0)
    if HAS_WEIGHT:
        y = y * tl.load(weight_ptr + offs, mask=mask, other=0.0)
    return y


@triton.jit
def _store_grad(
    grad_row, s_gc, offs, mask, pc, wy, t, smooth, hit, weight_ptr, HAS_WEIGHT: tl.constexpr, SOFT: tl.constexpr
):
    """grad_c = pc - smooth * (SOFT: w_c y'_c; else w_c) - hit * [c == t], pc = p_c * coef."""
    if SOFT:
        d = pc - smooth * wy
    else:
        if HAS_WEIGHT:
            d = pc - smooth * tl.load(weight_ptr + offs, mask=mask, other=0.0)
        else:
            d = pc - smooth
        # offs == t, compared as (group of 8, index in group): `offs == t` made the compiler keep every
        # column index of the thread in a register for the whole row loop (spills at 64 registers)
        t32 = t.to(tl.int32)
        d = tl.where(((offs // 8) == (t32 // 8)) & ((offs % 8) == (t32 % 8)), d - hit, d)
    tl.store(grad_row + offs * s_gc, d.to(grad_row.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    grad_ptr,
    s_gn,
    s_gd,
    s_gc,
    g_ptr,
    stride_gs,
    rows,
    V,
    D,
    BLOCK_V: tl.constexpr,
    SCALAR: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    """grad[row, :] *= g[row * stride_gs] in place (rows laid out as in _ce_rows_kernel), persistent over
    rows. A factor of exactly 1 is skipped: with a scalar g == 1 (SCALAR: the backward of an unscaled
    loss) each program reads one number and returns, so no gradient byte moves."""
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_V)
    if SCALAR:
        if tl.load(g_ptr).to(tl.float32) == 1.0:
            return
    for i in range(0, tl.cdiv(rows - pid, nprog)):
        r = (pid + i * nprog).to(tl.int64)
        g = tl.load(g_ptr + r * stride_gs).to(tl.float32)
        if g != 1.0:
            n = r // D
            grad_row = grad_ptr + n * s_gn + (r - n * D) * s_gd
            for start in tl.range(0, V, BLOCK_V, num_stages=NUM_STAGES):
                offs = start + cols
                mask = offs < V
                x = tl.load(grad_row + offs * s_gc, mask=mask, other=0.0).to(tl.float32)
                tl.store(grad_row + offs * s_gc, (x * g).to(grad_ptr.dtype.element_ty), mask=mask)
