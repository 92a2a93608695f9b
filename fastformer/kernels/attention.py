"""Fused attention kernels (FlashAttention-2 style) in Triton: forward, Delta pre-pass, dK/dV, dQ.

One family of kernels serves every attention op of fastformer:

- dense (B, H, L, D) tensors with any strides on B/H/L (last dim contiguous), GQA (H_q = G·H_kv),
- packed variable-length sequences (total, H, D) with cu_seqlens (IS_VARLEN),
- top-left aligned causal masking, per-batch key lengths (key-padding fast path: blocks past the
  length are never visited), a general bool/float mask read per tile through broadcast strides,
- T5 relative-position bias: score += table[bucket(j − i), h], with no (Lq, Lk) tensor. Each tile
  first checks (one scalar branch) whether every j − i in it lies past the saturation distance on
  one side ("far": most tiles at long L); a far tile adds one constant and sends its Σ dS to one
  bucket. A "near" tile reads each element's bias from a per-head vector over the clamped relative
  position r = clamp(j − i, −R, R) (built by the caller, fp32, log2 units), and for the table's
  gradient takes row prefix sums of dS gathered at the change points of the bucket function (a
  fixed ±1 matrix turns those into per-bucket sums). Partials go to [B, H, n_key_blocks, NB] per
  program (no atomics) and the caller sums them in a fixed order,
- dropout with Philox (tl.rand) keyed by (seed, batch·head) and counted by (row, col): the keep-mask
  is regenerated in the backward and by `dropout_keep_mask` for tests, never stored.

Scores are kept in log2 units (scale·log2 e folded in) so the softmax uses exp2; the forward saves
lse2 = log2 Σ exp2(s) per row (+inf for a row with no visible key, which makes P = 0 there and the
output 0). The backward is deterministic: dK/dV programs own a key block and loop over query blocks
(and over the query heads of a GQA group); dQ programs own a query block; nothing is accumulated
with atomics.

This file holds only `@triton.jit` code. The host side (argument lists, tile configurations,
tuning, `attention_forward` / `attention_backward`) is `attention_launch.py`, which knows nothing of
autograd either: it takes and returns tensors.
"""
from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# shared jit helpers
# ----------------------------------------------------------------------------------------------


@triton.jit
def _keep_tile(seed, bh, offs_m, offs_n, rng_stride, dropout_p):
    """Dropout keep-mask of one tile: (BLOCK_M, BLOCK_N) bool. Philox key = (seed, bh); counter =
    row·rng_stride + col, so every (b, h, i, j) draws its own number in forward and backward alike."""
    key = (bh.to(tl.int64) << 32) + seed
    offs = offs_m[:, None] * rng_stride + offs_n[None, :]
    return tl.rand(key, offs) >= dropout_p


@triton.jit
def _t5_rel_index(offs_m, offs_n, RD_MAX):
    """(BM, BN) int32 index of each element into the relative-position vectors: clamp(j − i, −R, R) + R."""
    rel = offs_n[None, :] - offs_m[:, None]
    return tl.minimum(tl.maximum(rel, -RD_MAX), RD_MAX) + RD_MAX


@triton.jit
def _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """T5 class of the tile rows [m0, m0 + BLOCK_M) x keys [n0, n0 + BLOCK_N): (far, far_left, c).
    far: every j − i of the tile is <= −SAT_L (far left) or >= SAT_R (far right), so the whole tile
    sees the one bias c and its dS goes to one bucket; otherwise the tile is near the diagonal and reads
    its bias per element. A uniform scalar branch per tile: no per-element test on far tiles."""
    far_left = n0 + (BLOCK_N - 1) - m0 <= -SAT_L
    far_right = n0 - (m0 + BLOCK_M - 1) >= SAT_R
    c = tl.load(brd_h + tl.where(far_left, 0, 2 * RD_MAX))
    return far_left | far_right, far_left, c


@triton.jit
def _scores(q, k, offs_m, offs_n, q_len, k_len, b, h, qk_scale,
            M, s_mb, s_mh, s_mm, s_mn,
            brd_h, t5_far, t5_c, RD_MAX,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_T5: tl.constexpr,
            MASKED: tl.constexpr, PREC: tl.constexpr):
    """Scores of one tile in log2 units, -inf where a key is not visible. q: (BM, BD), k: (BN, BD).
    MASKED=False: the caller guarantees every key of the tile is in range and visible to every row
    (no mask tensor, below the causal diagonal), so no per-element test is made.
    HAS_T5: a far tile (t5_far) adds the constant t5_c, a near one this head's bias at each element's
    clamped relative position from the vector brd_h."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if HAS_T5:
        if t5_far:
            s += t5_c
        else:
            s += tl.load(brd_h + _t5_rel_index(offs_m, offs_n, RD_MAX))
    if MASKED:
        inb = (offs_m[:, None] < q_len) & (offs_n[None, :] < k_len)
        valid = inb
        if IS_CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        if MASK_KIND != 0:
            m_ptrs = (M + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh + offs_m[:, None] * s_mm
                      + offs_n[None, :] * s_mn)
            if MASK_KIND == 1:
                keep = tl.load(m_ptrs, mask=inb, other=0)
                valid = valid & (keep != 0)
            else:
                s += tl.load(m_ptrs, mask=inb, other=0.0).to(tl.float32) * 1.4426950408889634
        s = tl.where(valid, s, float("-inf"))
    return s


@triton.jit
def _seq_bounds(b, CU_Q, CU_K, KLEN, Lq, Lk, IS_VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr):
    """(q_start, q_len, k_start, k_len) of batch entry b: packed offsets for varlen, else 0 and the
    (possibly per-batch) lengths."""
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k_start
    else:
        # `b * 0 + ...` keeps these tensors even when Triton specialises a length of 1 to a constant
        q_start = b * 0
        q_len = b * 0 + Lq
        k_start = b * 0
        if HAS_KLEN:
            k_len = tl.load(KLEN + b)
        else:
            k_len = b * 0 + Lk
    return q_start, q_len, k_start, k_len


@triton.jit
def _head_dim_mask(D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """(BLOCK_D,) bool: the head-dim columns that exist. EVEN_D (D == BLOCK_D) gives a constant mask,
    which keeps the row loads vectorised."""
    if EVEN_D:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = tl.arange(0, BLOCK_D) < D
    return d_ok


@triton.jit
def _key_block_bounds(m0, k_len, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    """(full_hi, hi): the keys the query block [m0, m0 + BLOCK_M) visits. Keys from hi on are never
    visible (past the length or, causal, past the block's last row); key blocks below full_hi lie wholly
    inside the length and below the causal diagonal, so they run without per-element masking (none do
    when a mask tensor is given)."""
    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M)
    full_hi = (k_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + 1) // BLOCK_N) * BLOCK_N)
    if MASK_KIND != 0:
        full_hi = 0
    return full_hi, hi


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
              q_len, k_len, b, h, bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
              brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
              IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_T5: tl.constexpr,
              DROPOUT: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the forward: scores, online-softmax update, acc += P V."""
    offs_n = n0 + offs_n0
    if MASKED:
        kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    t5_far = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, BLOCK_M, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _scores(q, k, offs_m, offs_n, q_len, k_len, b, h, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                brd_h, t5_far, t5_c, RD_MAX, IS_CAUSAL, MASK_KIND, HAS_T5, MASKED, PREC)
    # a row that has seen no visible key yet keeps m = -inf: use 0 as its exponent base
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, offs_n, rng_stride, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seed"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh,
    CU_Q, CU_K, KLEN,
    M, s_mb, s_mh, s_mm, s_mn,
    BRD, s_brd, ZPTS, ZW, RD_MAX, SAT_L, SAT_R, BK_L, BK_R,
    seed, rng_stride, dropout_p,
    H, GROUP, Lq, Lk, D, qk_scale,
    IS_VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # 1. which (query block, batch, head) this program owns, and that sequence's bounds
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, KLEN, Lq, Lk, IS_VARLEN, HAS_KLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(D, BLOCK_D, EVEN_D)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh + q_start.to(tl.int64) * s_qm
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn

    # 2. the query tile stays in registers for the whole key loop
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :], mask=(offs_m[:, None] < q_len) & d_ok[None, :],
                other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 3. keys past the sequence length (and, causal, past the last row of this block) are skipped;
    #    blocks wholly inside the length and below the diagonal run without per-element masking
    full_hi, hi = _key_block_bounds(m0, k_len, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
    for n0 in range(0, full_hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
                                  q_len, k_len, b, h, pid_bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                                  brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
                                  IS_CAUSAL, MASK_KIND, HAS_T5, DROPOUT, False, PREC, BLOCK_M, BLOCK_N)
    for n0 in range(full_hi, hi, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
                                  q_len, k_len, b, h, pid_bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                                  brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
                                  IS_CAUSAL, MASK_KIND, HAS_T5, DROPOUT, True, PREC, BLOCK_M, BLOCK_N)

    # 4. normalise; rows with no visible key give 0 and lse = +inf (so the backward's P is 0)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    o_base = O + b64 * s_ob + h.to(tl.int64) * s_oh + q_start.to(tl.int64) * s_om
    tl.store(o_base + offs_m[:, None] * s_om + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < q_len) & d_ok[None, :])
    tl.store(LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_start + offs_m, lse, mask=offs_m < q_len)


# ----------------------------------------------------------------------------------------------
# backward: Delta pre-pass, dK/dV (+ T5 table partials), dQ (+ float-mask gradient)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA, s_ob, s_oh, s_om, s_db, s_dh, s_dm, s_lb, s_lh,
    CU_Q, H, Lq, D,
    IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Delta_i = Σ_d dO_id · O_id, the row term of softmax's backward
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q_start
    else:
        q_start = 0
        q_len = Lq
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < D)
    b64 = b.to(tl.int64)
    rows = (q_start + offs_m)[:, None].to(tl.int64)
    o = tl.load(O + b64 * s_ob + h * s_oh + rows * s_om + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * s_db + h * s_dh + rows * s_dm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * s_lb + h * s_lh + q_start + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit
def _dkdv_tile(dk, dv, dt, far_l, far_r, zpts, k, v, q_base, do_base, l_base, d_base, s_qm, s_om, m0, offs_m0, n0,
               offs_n, offs_d, d_ok, q_len, k_len, b, h, bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
               brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
               IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, HAS_T5: tl.constexpr, T5_GRAD: tl.constexpr,
               DROPOUT: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One query block against the program's key block: dV += P_dropᵀ dO, dK += dSᵀ Q, and the T5
    table's gradient: a far tile adds Σ dS to far_l or far_r (its one bucket), a near tile adds to
    dt (NZ,) its Σ dS below each change point of the bucket function."""
    # recompute P from the saved lse; rows past q_len load lse = +inf, so their P is 0 without a mask
    offs_m = m0 + offs_m0
    q_mask = (offs_m[:, None] < q_len) & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * s_om + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(l_base + offs_m, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(d_base + offs_m, mask=offs_m < q_len, other=0.0)
    t5_far = False
    far_left = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, BLOCK_M, BLOCK_N)
    s = _scores(q, k, offs_m, offs_n, q_len, k_len, b, h, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                brd_h, t5_far, t5_c, RD_MAX, IS_CAUSAL, MASK_KIND, HAS_T5, MASKED, PREC)
    p = tl.exp2(s - lse[:, None])
    # dP = dO Vᵀ (dropped like P) ; dS = P (dP − Delta)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, offs_n, rng_stride, dropout_p)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    if T5_GRAD:
        if t5_far:
            tot = tl.sum(tl.sum(ds, 1), 0)
            far_l += tl.where(far_left, tot, 0.0)
            far_r += tl.where(far_left, 0.0, tot)
        else:
            # for every change point z of the bucket function, Σ dS over the elements with j − i < z:
            # row prefix sums, then per row the one column just before z (a gather inside the row).
            # The caller turns these into per-bucket sums with a fixed ±1 matrix.
            pre = tl.cumsum(ds, 1)
            col = zpts[None, :] - (n0 - m0) + offs_m0[:, None] - 1   # (BM, NZ): last column with j − i < z
            g = tl.gather(pre, tl.minimum(tl.maximum(col, 0), BLOCK_N - 1), 1)
            dt += tl.sum(tl.where(col >= 0, g, 0.0), 0)
    return dk, dv, dt, far_l, far_r


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DT,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh,
    s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, s_dtb, s_dth, s_dtn,
    CU_Q, CU_K, KLEN,
    M, s_mb, s_mh, s_mm, s_mn,
    BRD, s_brd, ZPTS, ZW, RD_MAX, SAT_L, SAT_R, BK_L, BK_R,
    seed, rng_stride, dropout_p,
    H, HK, GROUP, Lq, Lk, D, qk_scale, sm_scale,
    IS_VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr, T5_GRAD: tl.constexpr, NB_PAD: tl.constexpr, T5_NZ: tl.constexpr,
    DROPOUT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # 1. this program owns one key block of one (batch, kv head); it loops over the GQA group's
    #    query heads and over query blocks, so dK/dV are summed in registers (no atomics)
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HK
    hk = pid_bh % HK
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, KLEN, Lq, Lk, IS_VARLEN, HAS_KLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= k_len:
        return  # dK/dV of keys past the length were zero-filled by the caller
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(D, BLOCK_D, EVEN_D)
    b64 = b.to(tl.int64)
    kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    k = tl.load(K + b64 * s_kb + hk.to(tl.int64) * s_kh + (k_start + offs_n)[:, None].to(tl.int64) * s_kn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b64 * s_vb + hk.to(tl.int64) * s_vh + (k_start + offs_n)[:, None].to(tl.int64) * s_vn
                + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    nb_idx = tl.arange(0, NB_PAD)
    # 2. query blocks [lo, full_lo) touch the causal diagonal or a key past the length and need the
    #    per-element mask; [full_lo, q_len) do not (rows past q_len get P = 0 from lse = +inf)
    lo = 0
    full_lo = 0
    if IS_CAUSAL:
        lo = (n0 // BLOCK_M) * BLOCK_M  # earlier query rows cannot see these keys
        full_lo = tl.cdiv(n0 + BLOCK_N - 1, BLOCK_M) * BLOCK_M
    if (MASK_KIND != 0) or (n0 + BLOCK_N > k_len):
        full_lo = q_len
    full_lo = tl.minimum(tl.maximum(full_lo, lo), q_len)
    if HAS_T5:
        zpts = tl.load(ZPTS + tl.arange(0, T5_NZ))
    else:
        zpts = tl.zeros([T5_NZ], tl.int32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh + q_start.to(tl.int64) * s_qm
        do_base = DO + b64 * s_ob + h.to(tl.int64) * s_oh + q_start.to(tl.int64) * s_om
        l_base = LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_start
        d_base = DELTA + b64 * s_lb + h.to(tl.int64) * s_lh + q_start
        brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
        dt = tl.zeros([T5_NZ], tl.float32)  # T5 near tiles: Σ dS below each change point
        far_l = 0.0                         # T5 far tiles: Σ dS of the far-left / far-right bucket
        far_r = 0.0
        for m0 in range(lo, full_lo, BLOCK_M):
            dk, dv, dt, far_l, far_r = _dkdv_tile(dk, dv, dt, far_l, far_r, zpts, k, v, q_base, do_base, l_base,
                                                  d_base, s_qm, s_om, m0, offs_m0, n0, offs_n, offs_d, d_ok, q_len,
                                                  k_len, b, h, bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                                                  brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
                                                  IS_CAUSAL, MASK_KIND, HAS_T5, T5_GRAD, DROPOUT, True, PREC,
                                                  BLOCK_M, BLOCK_N)
        for m0 in range(full_lo, q_len, BLOCK_M):
            dk, dv, dt, far_l, far_r = _dkdv_tile(dk, dv, dt, far_l, far_r, zpts, k, v, q_base, do_base, l_base,
                                                  d_base, s_qm, s_om, m0, offs_m0, n0, offs_n, offs_d, d_ok, q_len,
                                                  k_len, b, h, bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                                                  brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p,
                                                  IS_CAUSAL, MASK_KIND, HAS_T5, T5_GRAD, DROPOUT, False, PREC,
                                                  BLOCK_M, BLOCK_N)
        if T5_GRAD:
            # per bucket: near tiles through the change-point weights, far tiles into their one bucket
            zw = tl.load(ZW + tl.arange(0, T5_NZ)[:, None] * NB_PAD + nb_idx[None, :])
            dtb = tl.sum(dt[:, None] * zw, 0)
            dtb += tl.where(nb_idx == BK_L, far_l, 0.0) + tl.where(nb_idx == BK_R, far_r, 0.0)
            tl.store(DT + b64 * s_dtb + h.to(tl.int64) * s_dth + pid_n * s_dtn + nb_idx, dtb)
    # 3. write dK (scale folded back in) and dV of this key block
    tl.store(DK + b64 * s_dkb + hk.to(tl.int64) * s_dkh + (k_start + offs_n)[:, None].to(tl.int64) * s_dkn
             + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b64 * s_dvb + hk.to(tl.int64) * s_dvh + (k_start + offs_n)[:, None].to(tl.int64) * s_dvn
             + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
             q_len, k_len, b, h, bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
             brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p, DM, s_dmb, s_dmh, s_dmm,
             IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, HAS_T5: tl.constexpr,
             DROPOUT: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the dQ pass: recompute P, dP, dS; dQ += dS K."""
    offs_n = n0 + offs_n0
    if MASKED:
        kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    t5_far = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, BLOCK_M, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _scores(q, k, offs_m, offs_n, q_len, k_len, b, h, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                brd_h, t5_far, t5_c, RD_MAX, IS_CAUSAL, MASK_KIND, HAS_T5, MASKED, PREC)
    p = tl.exp2(s - lse[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = _keep_tile(seed, bh, offs_m, offs_n, rng_stride, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if MASK_GRAD:
        # the float mask's gradient is dS itself (full-size buffer, reduced over broadcast dims by
        # the caller)
        tl.store(DM + b.to(tl.int64) * s_dmb + h.to(tl.int64) * s_dmh + offs_m[:, None] * s_dmm + offs_n[None, :],
                 ds, mask=(offs_m[:, None] < q_len) & (offs_n[None, :] < k_len))
    return dq


@triton.jit(do_not_specialize=["seed"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, DM,
    s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh,
    s_dqb, s_dqh, s_dqm, s_dmb, s_dmh, s_dmm,
    CU_Q, CU_K, KLEN,
    M, s_mb, s_mh, s_mm, s_mn,
    BRD, s_brd, ZPTS, ZW, RD_MAX, SAT_L, SAT_R, BK_L, BK_R,
    seed, rng_stride, dropout_p,
    H, GROUP, Lq, Lk, D, qk_scale, sm_scale,
    IS_VARLEN: tl.constexpr, HAS_KLEN: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
    MASK_GRAD: tl.constexpr, HAS_T5: tl.constexpr, DROPOUT: tl.constexpr,
    PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    # 1. this program owns one query block of one (batch, head) and loops over the key blocks
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, KLEN, Lq, Lk, IS_VARLEN, HAS_KLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= q_len:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = _head_dim_mask(D, BLOCK_D, EVEN_D)
    b64 = b.to(tl.int64)
    q_mask = (offs_m[:, None] < q_len) & d_ok[None, :]
    rows = (q_start + offs_m)[:, None].to(tl.int64)
    q = tl.load(Q + b64 * s_qb + h.to(tl.int64) * s_qh + rows * s_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + b64 * s_ob + h.to(tl.int64) * s_oh + rows * s_om + offs_d[None, :], mask=q_mask, other=0.0)
    l_off = b64 * s_lb + h.to(tl.int64) * s_lh + q_start + offs_m
    lse = tl.load(LSE + l_off, mask=offs_m < q_len, other=float("inf"))
    delta = tl.load(DELTA + l_off, mask=offs_m < q_len, other=0.0)
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # 2. key blocks: unmasked while wholly in range and below the diagonal, masked after
    full_hi, hi = _key_block_bounds(m0, k_len, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
    for n0 in range(0, full_hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
                      q_len, k_len, b, h, pid_bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                      brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p, DM, s_dmb, s_dmh, s_dmm,
                      IS_CAUSAL, MASK_KIND, MASK_GRAD, HAS_T5, DROPOUT, False, PREC, BLOCK_M, BLOCK_N)
    for n0 in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, s_kn, s_vn, m0, n0, offs_m, offs_n0, offs_d, d_ok,
                      q_len, k_len, b, h, pid_bh, qk_scale, M, s_mb, s_mh, s_mm, s_mn,
                      brd_h, RD_MAX, SAT_L, SAT_R, seed, rng_stride, dropout_p, DM, s_dmb, s_dmh, s_dmm,
                      IS_CAUSAL, MASK_KIND, MASK_GRAD, HAS_T5, DROPOUT, True, PREC, BLOCK_M, BLOCK_N)
    tl.store(DQ + b64 * s_dqb + h.to(tl.int64) * s_dqh + rows * s_dqm + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, seed, H, Lq, Lk, rng_stride, dropout_p,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: write the keep-mask (B, H, Lq, Lk) the attention kernels use for this seed."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_tile(seed, bh, offs_m, offs_n, rng_stride, dropout_p)
    ptrs = OUT + bh.to(tl.int64) * Lq * Lk + offs_m[:, None] * Lk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(offs_m[:, None] < Lq) & (offs_n[None, :] < Lk))


# the host-side names, importable from here as well as from attention_launch
from .attention_launch import (  # noqa: E402,F401
    LOG2E,
    TILES_ENV,
    AttnSpec,
    T5RelPos,
    attention_backward,
    attention_forward,
    dropout_keep_mask,
)
