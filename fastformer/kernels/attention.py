"""Fused attention kernels in Triton: forward, Delta pre-pass, the five-GEMM backward, dQ, dropout mask.

One family of kernels serves every attention op of fastformer:

- dense (B, H, L, D) tensors with any strides on B/H/L (last dim contiguous), GQA (H_q = G·H_kv),
- packed variable-length sequences (total, H, D) with cu_seqlens (IS_VARLEN),
- top-left aligned causal masking shifted by a query offset (QOFF: query row i sits at position
  i + QOFF, key j is visible when j <= i + QOFF; 0 for SDPA, the cache length when a T5 decoder runs
  new tokens against a cache), per-batch key lengths (key-padding fast path: blocks past the length
  are never visited), a general bool/float mask read per tile through broadcast strides,
- T5 relative-position bias: score += table[bucket(j − i − QOFF), h], with no (Lq, Lk) tensor. Each
  tile first checks (one scalar branch) whether every relative position in it lies past the
  saturation distance on one side ("far": most tiles at long L); a far tile adds one constant and
  sends its Σ dS to one bucket. A "near" tile reads each element's bias from a per-head vector over
  the clamped relative position r = clamp(j − i − QOFF, −R, R) (built by the caller, fp32, log2
  units), and for the table's gradient takes prefix sums of dS over the keys gathered at the change
  points of the bucket function (a fixed ±1 matrix turns those into per-bucket sums). Partials go to
  [B, H, n_key_blocks, NB] per program (no atomics) and the caller sums them in a fixed order,
- dropout with Philox (tl.philox) keyed by (seed, batch·head), its counter the pair (col, row): the
  keep-mask is regenerated in the backward and by `dropout_keep_mask` for tests, never stored.

Scores are kept in log2 units (scale·log2 e folded into one multiply-add with the row's offset) so
the softmax uses exp2; the forward saves lse2 = log2 Σ exp2(s) per row (+inf for a row with no
visible key, which makes P = 0 there and the output 0). With a float mask it saves the row max m and
log2 Σ exp2(s − m) apart instead, and the backward recomputes P = exp2((s − m) − log2 Σ): m + log2 Σ
would round log2 Σ away where the row's scores sit at a huge common value (finfo.min on every key:
a uniform average whose P would come back as 1 instead of 1 / Lk). See `_load_row_stats`.

The forward has two builds of one loop (`_fwd_tile`): K/V tiles by pointer loads (cp.async on
Ampere, every GPU, the interpreter), or through tensor descriptors (TMA) with the key loop warp
specialised (a producer warp group issues the copies, two consumer warp groups run the MMAs and the
softmax), on Hopper with a Triton that supports both (attention_launch decides).

The backward (`_attn_bwd_kernel`) is key-stationary: a program owns one key block of one (batch, kv
head), keeps K and V, computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ per query block, so Pᵀ and dSᵀ come out as
the A operand of dV += Pᵀ·dO and dK += dSᵀ·Q, and — five GEMMs per tile — dQ_partial = dS·K, which it
adds into an fp32 dQ buffer. The additions are ordered: a per-(head, query block) counter lets the
program of key block n add only after key blocks 0 … n−1 have, so every dQ element is summed in the
same order on every run (bitwise reproducible, no atomics race). Programs take their work by ticket
(an atomic counter) so a program only ever waits for programs that started before it. With
COMPUTE_DQ off the same loop is the four-GEMM dK/dV pass; `_attn_bwd_dq_kernel` is the query-
stationary dQ pass (three GEMMs, recomputing S and dP): with it the two make the seven-GEMM backward,
which tuning may still pick, and it alone serves calls that need dQ but not dK/dV.

This file holds only `@triton.jit` code. The host side (argument lists, tile configurations,
tuning, `attention_forward` / `attention_backward`) is `attention_launch.py`, which knows nothing of
autograd either: it takes and returns tensors.
"""

from __future__ import annotations

import triton
import triton.language as tl

# ----------------------------------------------------------------------------------------------
# shared jit helpers: every main loop below builds its scores with these
# ----------------------------------------------------------------------------------------------


@triton.jit
def _keep_tile(seed, bh, om, on, dropout_p):
    """Dropout keep-mask of one tile: bool, broadcast of om (query rows) and on (key columns). Philox
    key = (seed, bh), counter = (col, row, 0, 0): every (b, h, i, j) draws its own number in the
    forward and in either layout of the backward, for any length (a flat row·Lk + col counter in 32
    bits wraps at 2^32 elements per head). Philox's first round mixes the row and the column words
    separately, so it costs a vector op per row or column, not per element."""
    key = (bh.to(tl.int64) << 32) + seed
    bits, _, _, _ = tl.philox(key, on.to(tl.uint32), om.to(tl.uint32), 0, 0)
    return tl.uint_to_uniform_float(bits) >= dropout_p


@triton.jit
def _t5_rel_index(om, on, QOFF, RD_MAX):
    """Index of each element into the relative-position vectors: clamp(j − i − QOFF, −R, R) + R."""
    rel = on - om - QOFF
    return tl.minimum(tl.maximum(rel, -RD_MAX), RD_MAX) + RD_MAX


@triton.jit
def _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, QOFF, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """T5 class of the tile rows [m0, m0 + BLOCK_M) x keys [n0, n0 + BLOCK_N): (far, far_left, c).
    far: every j − i − QOFF of the tile is <= −SAT_L (far left) or >= SAT_R (far right), so the whole
    tile sees the one bias c and its dS goes to one bucket; otherwise the tile is near the diagonal and
    reads its bias per element. A uniform scalar branch per tile: no per-element test on far tiles."""
    p0 = m0 + QOFF
    far_left = n0 + (BLOCK_N - 1) - p0 <= -SAT_L
    far_right = n0 - (p0 + BLOCK_M - 1) >= SAT_R
    c = tl.load(brd_h + tl.where(far_left, 0, 2 * RD_MAX))
    return far_left | far_right, far_left, c


@triton.jit
def _score_tile(
    s,
    om,
    on,
    q_len,
    k_len,
    b,
    h,
    qk_scale,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    brd_h,
    t5_far,
    t5_c,
    RD_MAX,
    QOFF,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr,
    MASKED: tl.constexpr,
):
    """The dot products s of one tile -> scores in log2 units, -inf where a key is not visible.
    om / on: query rows and key columns, shaped to broadcast to s ((BM, 1), (1, BN) for S = Q·Kᵀ;
    (1, BM), (BN, 1) for Sᵀ = K·Qᵀ), so one body serves both layouts.
    MASKED=False: the caller guarantees every key of the tile is in range and visible to every row
    (no mask tensor, below the causal diagonal), so no per-element test is made.
    HAS_T5: a far tile (t5_far) adds the constant t5_c, a near one this head's bias at each element's
    clamped relative position from the vector brd_h."""
    s = s * qk_scale
    if HAS_T5:
        if t5_far:
            s += t5_c
        else:
            s += tl.load(brd_h + _t5_rel_index(om, on, QOFF, RD_MAX))
    if MASKED:
        inb = (om < q_len) & (on < k_len)
        valid = inb
        if IS_CAUSAL:
            valid = valid & (on <= om + QOFF)
        if MASK_KIND != 0:
            m_ptrs = M + b.to(tl.int64) * s_mb + h.to(tl.int64) * s_mh + om * s_mm + on * s_mn
            if MASK_KIND == 1:
                keep = tl.load(m_ptrs, mask=inb, other=0)
                valid = valid & (keep != 0)
            else:
                # in log2 units a finite value below -FLT_MAX / log2(e) (Hugging Face's finfo(dtype).min
                # masks) would overflow to -inf and turn a row torch averages uniformly into a fully
                # masked one: clamp it first (-2.35e38 * log2(e) is still finite); a true -inf stays -inf,
                # and a NaN stays NaN (maximum's default returns the other operand: a silent mask)
                add = tl.load(m_ptrs, mask=inb, other=0.0).to(tl.float32)
                low = tl.maximum(add, -2.35e38, propagate_nan=tl.PropagateNan.ALL)
                s += tl.where(add == float("-inf"), add, low * 1.4426950408889634)
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
def _key_block_bounds(
    m0, k_len, QOFF, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):
    """(full_hi, hi): the keys the query block [m0, m0 + BLOCK_M) visits. Keys from hi on are never
    visible (past the length or, causal, past the block's last row + QOFF); key blocks below full_hi lie
    wholly inside the length and below the causal diagonal, so they run without per-element masking
    (none do when a mask tensor is given)."""
    hi = k_len
    if IS_CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + QOFF)
    full_hi = (k_len // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + QOFF + 1) // BLOCK_N) * BLOCK_N)
    if MASK_KIND != 0:
        full_hi = 0
    return full_hi, hi


@triton.jit
def _query_block_bounds(
    n0,
    q_len,
    k_len,
    QOFF,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(lo, full_lo): the query blocks the key block [n0, n0 + BLOCK_N) is visible to start at lo
    (causal: earlier rows cannot see these keys); blocks from full_lo on see every key of the block
    and run without per-element masking (rows past q_len get P = 0 from row max = +inf). The set of
    blocks visited, [lo, q_len), only grows as n0 decreases: the dQ ordering relies on it."""
    lo = 0
    full_lo = 0
    if IS_CAUSAL:
        lo = (tl.maximum(n0 - QOFF, 0) // BLOCK_M) * BLOCK_M
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - QOFF, 0), BLOCK_M) * BLOCK_M
    if (MASK_KIND != 0) or (n0 + BLOCK_N > k_len):
        full_lo = q_len
    full_lo = tl.minimum(tl.maximum(full_lo, lo), q_len)
    return lo, full_lo


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(
    acc,
    l_i,
    m_i,
    q,
    k_src,
    v_src,
    s_kn,
    s_vn,
    m0,
    n0,
    offs_m,
    offs_n0,
    offs_d,
    d_ok,
    q_len,
    k_len,
    b,
    h,
    bh,
    qk_scale,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    brd_h,
    RD_MAX,
    SAT_L,
    SAT_R,
    QOFF,
    seed,
    dropout_p,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of the forward: scores, online-softmax update, acc += P V. k_src / v_src: tensor
    descriptors (TMA: rows past the length and columns past D arrive as zeros) or base pointers."""
    offs_n = n0 + offs_n0
    t5_far = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, QOFF, BLOCK_M, BLOCK_N)
    if TMA:
        k = k_src.load([n0, 0])
    else:
        if MASKED:
            kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
        else:
            kv_mask = d_ok[None, :]
        k = tl.load(k_src + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    s = _score_tile(
        tl.dot(q, tl.trans(k), input_precision=PREC),
        offs_m[:, None],
        offs_n[None, :],
        q_len,
        k_len,
        b,
        h,
        qk_scale,
        M,
        s_mb,
        s_mh,
        s_mm,
        s_mn,
        brd_h,
        t5_far,
        t5_c,
        RD_MAX,
        QOFF,
        IS_CAUSAL,
        MASK_KIND,
        HAS_T5,
        MASKED,
    )
    # a row that has seen no visible key yet keeps m = -inf: use 0 as its exponent base
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _keep_tile(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    if TMA:
        v = v_src.load([n0, 0])
    else:
        v = tl.load(v_src + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seed", "QOFF"])
def _attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    s_qb,
    s_qh,
    s_qm,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_ob,
    s_oh,
    s_om,
    s_lb,
    s_lh,
    s_lx,
    CU_Q,
    CU_K,
    KLEN,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    BRD,
    s_brd,
    ZPTS,
    ZW,
    RD_MAX,
    SAT_L,
    SAT_R,
    BK_L,
    BK_R,
    QOFF,
    seed,
    dropout_p,
    H,
    GROUP,
    Lq,
    Lk,
    D,
    qk_scale,
    IS_VARLEN: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    TMA: tl.constexpr,
    WS: tl.constexpr,
    WS_MASKED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # 1. which (query block, batch, head) this program owns, and that sequence's bounds
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    q_start, q_len, k_start, k_len = _seq_bounds(b, CU_Q, CU_K, KLEN, Lq, Lk, IS_VARLEN, HAS_KLEN)
    m0 = pid_m * BLOCK_M
    if not WS:
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
    o_base = O + b64 * s_ob + h.to(tl.int64) * s_oh + q_start.to(tl.int64) * s_om

    # 2. the query tile stays in registers for the whole key loop. TMA: one descriptor per
    #    (sequence, head) whose shape is that sequence's length, so the copy engine zero-fills what lies
    #    past it (and never reads the next packed sequence)
    if TMA:
        q_src = tl.make_tensor_descriptor(q_base, [q_len, D], [s_qm, 1], [BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, [k_len, D], [s_kn, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [k_len, D], [s_vn, 1], [BLOCK_N, BLOCK_D])
        q = q_src.load([m0, 0])
    else:
        k_src = k_base
        v_src = v_base
        q = tl.load(
            q_base + offs_m[:, None] * s_qm + offs_d[None, :], mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0
        )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # 3. keys past the sequence length (and, causal, past the last row of this block) are skipped
    full_hi, hi = _key_block_bounds(m0, k_len, QOFF, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
    if WS:
        # one loop, no branch in or after it, descriptor loads only (what Triton's warp specialiser
        # takes): every tile is masked per element when the call needs any masking (WS_MASKED), none
        # otherwise; a block past this sequence's queries visits no key and its stores fall outside
        # the descriptor / LSE mask (no early return: it would leave the structured control flow)
        for n0 in tl.range(0, tl.where(m0 < q_len, hi, 0), BLOCK_N, warp_specialize=True):
            acc, l_i, m_i = _fwd_tile(
                acc,
                l_i,
                m_i,
                q,
                k_src,
                v_src,
                s_kn,
                s_vn,
                m0,
                n0,
                offs_m,
                offs_n0,
                offs_d,
                d_ok,
                q_len,
                k_len,
                b,
                h,
                pid_bh,
                qk_scale,
                M,
                s_mb,
                s_mh,
                s_mm,
                s_mn,
                brd_h,
                RD_MAX,
                SAT_L,
                SAT_R,
                QOFF,
                seed,
                dropout_p,
                IS_CAUSAL,
                MASK_KIND,
                HAS_T5,
                DROPOUT,
                WS_MASKED,
                PREC,
                TMA,
                BLOCK_M,
                BLOCK_N,
            )
    else:
        # blocks wholly inside the length and below the diagonal run without per-element masking
        for n0 in range(0, full_hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc,
                l_i,
                m_i,
                q,
                k_src,
                v_src,
                s_kn,
                s_vn,
                m0,
                n0,
                offs_m,
                offs_n0,
                offs_d,
                d_ok,
                q_len,
                k_len,
                b,
                h,
                pid_bh,
                qk_scale,
                M,
                s_mb,
                s_mh,
                s_mm,
                s_mn,
                brd_h,
                RD_MAX,
                SAT_L,
                SAT_R,
                QOFF,
                seed,
                dropout_p,
                IS_CAUSAL,
                MASK_KIND,
                HAS_T5,
                DROPOUT,
                False,
                PREC,
                TMA,
                BLOCK_M,
                BLOCK_N,
            )
        for n0 in range(full_hi, hi, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(
                acc,
                l_i,
                m_i,
                q,
                k_src,
                v_src,
                s_kn,
                s_vn,
                m0,
                n0,
                offs_m,
                offs_n0,
                offs_d,
                d_ok,
                q_len,
                k_len,
                b,
                h,
                pid_bh,
                qk_scale,
                M,
                s_mb,
                s_mh,
                s_mm,
                s_mn,
                brd_h,
                RD_MAX,
                SAT_L,
                SAT_R,
                QOFF,
                seed,
                dropout_p,
                IS_CAUSAL,
                MASK_KIND,
                HAS_T5,
                DROPOUT,
                True,
                PREC,
                TMA,
                BLOCK_M,
                BLOCK_N,
            )

    # 4. normalise; rows with no visible key give 0 and a +inf statistic (so the backward's P is 0).
    #    With a float mask the row max and log2 of the row's sum are saved apart (_load_row_stats)
    empty = l_i == 0.0
    out = (acc / tl.where(empty, 1.0, l_i)[:, None]).to(O.dtype.element_ty)
    row_max = tl.where(empty, float("inf"), m_i)
    log_sum = tl.log2(tl.where(empty, 1.0, l_i))
    if TMA:
        o_dst = tl.make_tensor_descriptor(o_base, [q_len, D], [s_om, 1], [BLOCK_M, BLOCK_D])
        o_dst.store([m0, 0], out)
    else:
        tl.store(o_base + offs_m[:, None] * s_om + offs_d[None, :], out, mask=(offs_m[:, None] < q_len) & d_ok[None, :])
    lse_row = LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_start + offs_m
    if MASK_KIND == 2:
        tl.store(lse_row, row_max, mask=offs_m < q_len)
        tl.store(lse_row + s_lx, log_sum, mask=offs_m < q_len)
    else:
        tl.store(lse_row, row_max + log_sum, mask=offs_m < q_len)


# ----------------------------------------------------------------------------------------------
# backward: Delta pre-pass, the key-stationary pass (dK, dV, ordered dQ, T5 table partials), the
# query-stationary dQ pass, the dQ finishing pass
# ----------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_delta_kernel(
    O,
    DO,
    DELTA,
    s_ob,
    s_oh,
    s_om,
    s_db,
    s_dh,
    s_dm,
    s_lb,
    s_lh,
    CU_Q,
    H,
    Lq,
    D,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    # head offsets in int64 as in every other kernel: h · s_dh of a dO that autograd hands over as a
    # slice of a larger gradient (or h · s_lh for many varlen tokens) can pass 2^31 and would wrap
    h64 = h.to(tl.int64)
    rows = (q_start + offs_m)[:, None].to(tl.int64)
    o = tl.load(O + b64 * s_ob + h64 * s_oh + rows * s_om + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * s_db + h64 * s_dh + rows * s_dm + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + b64 * s_lb + h64 * s_lh + q_start + offs_m, tl.sum(o * do, 1), mask=offs_m < q_len)


@triton.jit(noinline=True)
def _wait_turn(sem, n_idx, SPIN: tl.constexpr):
    """Wait until the counter `sem` reaches n_idx (acquire: what the earlier programs added is visible
    after it), and return the step to release it with. In the interpreter, programs run one after the
    other, so the order must already hold: a counter found out of order is marked with a huge step
    (the host checks the counters after the launch).
    Not inlined, and neither is _release_turn: a loop or a CTA barrier inside the tile loop would keep
    Triton from pipelining the tile loop's loads (a call does not)."""
    step = 1
    if SPIN:
        while tl.atomic_add(sem, 0, sem="acquire") < n_idx:
            pass
    else:
        step = tl.where(tl.atomic_add(sem, 0) == n_idx, 1, 1 << 20)
    return step


@triton.jit(noinline=True)
def _release_turn(sem, step):
    """After every thread's dQ additions (the barrier), add `step` to the counter with release
    semantics: the next key block's program, which acquires it, then sees them."""
    tl.debug_barrier()
    tl.atomic_add(sem, step, sem="release")


@triton.jit
def _load_row_stats(ptrs, s_lx, ok, MASK_KIND: tl.constexpr):
    """The forward's row statistics for the backward's P = exp2((s − a) − b). With a float mask
    (MASK_KIND 2) the forward saved a = the row max and b = log2 of the row's sum apart, at ptrs and
    ptrs + s_lx: a row whose every key sits at one huge mask value (finfo.min) has scores of about
    −3.4e38, beside which log2 Σ (a few units) vanishes in fp32, so their sum would make P = 1 there
    instead of 1 / Lk. Without a float mask the scores have no such offset, and it saved their sum, the
    log-sum-exp, as FlashAttention does: a = that, b unused (one row vector in the tile loop instead
    of two: the split costs registers, spills and sm_90 occupancy in the kernel report). Rows past the
    length (not ok) get a = +inf, so their P is 0."""
    a = tl.load(ptrs, mask=ok, other=float("inf"))
    if MASK_KIND == 2:
        return a, tl.load(ptrs + s_lx, mask=ok, other=0.0)
    else:
        return a, a


@triton.jit
def _bwd_tile(
    dk,
    dv,
    dt,
    far_l,
    far_r,
    zpts,
    k,
    v,
    q_base,
    do_base,
    l_base,
    s_lx,
    d_base,
    a_base,
    s_qm,
    s_om,
    s_am,
    m0,
    offs_m0,
    n0,
    offs_n,
    offs_d,
    d_ok,
    q_len,
    k_len,
    b,
    h,
    bh,
    qk_scale,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    brd_h,
    RD_MAX,
    SAT_L,
    SAT_R,
    QOFF,
    seed,
    dropout_p,
    sem_row,
    n_idx,
    DM,
    s_dmb,
    s_dmh,
    s_dmm,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr,
    T5_GRAD: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    PREC: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
    MASK_GRAD: tl.constexpr,
    SPIN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One query block against the program's key block, in the transposed layout (keys are rows):
    Sᵀ = K·Qᵀ, Pᵀ from the saved row max and log-sum, dPᵀ = V·dOᵀ, dV += Pᵀ_drop·dO, dSᵀ = Pᵀ∘(dPᵀ − Delta),
    dK += dSᵀ·Q, and with COMPUTE_DQ dQ += dS·K into the fp32 buffer in key-block order. The T5 table's
    gradient: a far tile adds Σ dS to far_l or far_r (its one bucket), a near tile adds to dt (NZ,) its
    Σ dS below each change point of the bucket function."""
    offs_m = m0 + offs_m0
    om = offs_m[None, :]  # queries along the columns
    on = offs_n[:, None]  # keys along the rows
    q_mask = (offs_m[:, None] < q_len) & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * s_om + offs_d[None, :], mask=q_mask, other=0.0)
    # rows past q_len load row max = +inf, so their P is 0 without a mask
    lse_a, lse_b = _load_row_stats(l_base + offs_m, s_lx, offs_m < q_len, MASK_KIND)
    delta = tl.load(d_base + offs_m, mask=offs_m < q_len, other=0.0)
    t5_far = False
    far_left = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, QOFF, BLOCK_M, BLOCK_N)
    sT = _score_tile(
        tl.dot(k, tl.trans(q), input_precision=PREC),
        om,
        on,
        q_len,
        k_len,
        b,
        h,
        qk_scale,
        M,
        s_mb,
        s_mh,
        s_mm,
        s_mn,
        brd_h,
        t5_far,
        t5_c,
        RD_MAX,
        QOFF,
        IS_CAUSAL,
        MASK_KIND,
        HAS_T5,
        MASKED,
    )
    if MASK_KIND == 2:
        pT = tl.exp2((sT - lse_a[None, :]) - lse_b[None, :])  # s − row max first (_load_row_stats)
    else:
        pT = tl.exp2(sT - lse_a[None, :])
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    if DROPOUT:
        keep = _keep_tile(seed, bh, om, on, dropout_p)
        p_drop = tl.where(keep, pT / (1.0 - dropout_p), 0.0)
        dpT = tl.where(keep, dpT / (1.0 - dropout_p), 0.0)
    else:
        p_drop = pT
    dv += tl.dot(p_drop.to(do.dtype), do, input_precision=PREC)
    dsT = pT * (dpT - delta[None, :])
    ds_in = dsT.to(q.dtype)
    dk += tl.dot(ds_in, q, input_precision=PREC)
    if COMPUTE_DQ:
        dq = tl.dot(tl.trans(ds_in), k, input_precision=PREC)
        # add after key blocks 0 .. n_idx − 1 have added to this (head, query block): a fixed order
        sem = sem_row + m0 // BLOCK_M
        step = _wait_turn(sem, n_idx, SPIN)
        tl.atomic_add(a_base + offs_m[:, None] * s_am + offs_d[None, :], dq, mask=q_mask, sem="relaxed")
        _release_turn(sem, step)
    if MASK_GRAD:
        # the float mask's gradient is dS itself (full-size buffer, reduced over broadcast dims by
        # the caller)
        tl.store(
            DM + b.to(tl.int64) * s_dmb + h.to(tl.int64) * s_dmh + om * s_dmm + on,
            dsT,
            mask=(om < q_len) & (on < k_len),
        )
    if T5_GRAD:
        if t5_far:
            tot = tl.sum(tl.sum(dsT, 1), 0)
            far_l += tl.where(far_left, tot, 0.0)
            far_r += tl.where(far_left, 0.0, tot)
        else:
            # for every change point z of the bucket function, Σ dS over the elements with j − i − QOFF
            # < z: prefix sums down each query's column, then per column the one key row just before z
            # (a gather inside the column). The caller turns these into per-bucket sums with a fixed ±1
            # matrix.
            pre = tl.cumsum(dsT, 0)
            row = zpts[:, None] - (n0 - m0 - QOFF) + offs_m0[None, :] - 1  # (NZ, BM): last key row before z
            g = tl.gather(pre, tl.minimum(tl.maximum(row, 0), BLOCK_N - 1), 0)
            dt += tl.sum(tl.where(row >= 0, g, 0.0), 1)
    return dk, dv, dt, far_l, far_r


@triton.jit(do_not_specialize=["seed", "QOFF"])
def _attn_bwd_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
    DQA,
    SEM,
    DT,
    DM,
    s_qb,
    s_qh,
    s_qm,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_ob,
    s_oh,
    s_om,
    s_lb,
    s_lh,
    s_lx,
    s_dkb,
    s_dkh,
    s_dkn,
    s_dvb,
    s_dvh,
    s_dvn,
    s_ab,
    s_ah,
    s_am,
    s_dtb,
    s_dth,
    s_dtn,
    s_dmb,
    s_dmh,
    s_dmm,
    CU_Q,
    CU_K,
    KLEN,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    BRD,
    s_brd,
    ZPTS,
    ZW,
    RD_MAX,
    SAT_L,
    SAT_R,
    BK_L,
    BK_R,
    QOFF,
    seed,
    dropout_p,
    H,
    HK,
    GROUP,
    Lq,
    Lk,
    D,
    qk_scale,
    sm_scale,
    n_kblk,
    n_qblk,
    IS_VARLEN: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    HAS_T5: tl.constexpr,
    T5_GRAD: tl.constexpr,
    NB_PAD: tl.constexpr,
    T5_NZ: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
    MASK_GRAD: tl.constexpr,
    SPIN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # 1. this program owns one key block of one (batch, kv head); it loops over the GQA group's query
    #    heads and over query blocks, so dK/dV are summed in registers. With dQ, the work is taken by
    #    ticket in (key block, then batch·head) order: a program waits only for lower tickets, which
    #    belong to programs already running, so the ordered dQ additions cannot deadlock
    if COMPUTE_DQ:
        ticket = tl.atomic_add(SEM, 1)
        pid_n = ticket % n_kblk
        pid_bh = ticket // n_kblk
    else:
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
    k = tl.load(
        K + b64 * s_kb + hk.to(tl.int64) * s_kh + (k_start + offs_n)[:, None].to(tl.int64) * s_kn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b64 * s_vb + hk.to(tl.int64) * s_vh + (k_start + offs_n)[:, None].to(tl.int64) * s_vn + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    nb_idx = tl.arange(0, NB_PAD)
    # 2. query blocks [lo, full_lo) touch the causal diagonal or a key past the length and need the
    #    per-element mask; [full_lo, q_len) do not
    lo, full_lo = _query_block_bounds(n0, q_len, k_len, QOFF, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    if HAS_T5:
        zpts = tl.load(ZPTS + tl.arange(0, T5_NZ))
    else:
        zpts = tl.zeros([T5_NZ], tl.int32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        q_base = Q + b64 * s_qb + h.to(tl.int64) * s_qh + q_start.to(tl.int64) * s_qm
        do_base = DO + b64 * s_ob + h.to(tl.int64) * s_oh + q_start.to(tl.int64) * s_om
        a_base = DQA + b64 * s_ab + h.to(tl.int64) * s_ah + q_start.to(tl.int64) * s_am
        l_base = LSE + b64 * s_lb + h.to(tl.int64) * s_lh + q_start
        d_base = DELTA + b64 * s_lb + h.to(tl.int64) * s_lh + q_start
        sem_row = SEM + 1 + bh.to(tl.int64) * n_qblk  # this head's per-query-block dQ counters
        brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
        dt = tl.zeros([T5_NZ], tl.float32)  # T5 near tiles: Σ dS below each change point
        far_l = 0.0  # T5 far tiles: Σ dS of the far-left / far-right bucket
        far_r = 0.0
        for m0 in range(lo, full_lo, BLOCK_M):
            dk, dv, dt, far_l, far_r = _bwd_tile(
                dk,
                dv,
                dt,
                far_l,
                far_r,
                zpts,
                k,
                v,
                q_base,
                do_base,
                l_base,
                s_lx,
                d_base,
                a_base,
                s_qm,
                s_om,
                s_am,
                m0,
                offs_m0,
                n0,
                offs_n,
                offs_d,
                d_ok,
                q_len,
                k_len,
                b,
                h,
                bh,
                qk_scale,
                M,
                s_mb,
                s_mh,
                s_mm,
                s_mn,
                brd_h,
                RD_MAX,
                SAT_L,
                SAT_R,
                QOFF,
                seed,
                dropout_p,
                sem_row,
                pid_n,
                DM,
                s_dmb,
                s_dmh,
                s_dmm,
                IS_CAUSAL,
                MASK_KIND,
                HAS_T5,
                T5_GRAD,
                DROPOUT,
                True,
                PREC,
                COMPUTE_DQ,
                MASK_GRAD,
                SPIN,
                BLOCK_M,
                BLOCK_N,
            )
        for m0 in range(full_lo, q_len, BLOCK_M):
            dk, dv, dt, far_l, far_r = _bwd_tile(
                dk,
                dv,
                dt,
                far_l,
                far_r,
                zpts,
                k,
                v,
                q_base,
                do_base,
                l_base,
                s_lx,
                d_base,
                a_base,
                s_qm,
                s_om,
                s_am,
                m0,
                offs_m0,
                n0,
                offs_n,
                offs_d,
                d_ok,
                q_len,
                k_len,
                b,
                h,
                bh,
                qk_scale,
                M,
                s_mb,
                s_mh,
                s_mm,
                s_mn,
                brd_h,
                RD_MAX,
                SAT_L,
                SAT_R,
                QOFF,
                seed,
                dropout_p,
                sem_row,
                pid_n,
                DM,
                s_dmb,
                s_dmh,
                s_dmm,
                IS_CAUSAL,
                MASK_KIND,
                HAS_T5,
                T5_GRAD,
                DROPOUT,
                False,
                PREC,
                COMPUTE_DQ,
                MASK_GRAD,
                SPIN,
                BLOCK_M,
                BLOCK_N,
            )
        if T5_GRAD:
            # per bucket: near tiles through the change-point weights, far tiles into their one bucket
            zw = tl.load(ZW + tl.arange(0, T5_NZ)[:, None] * NB_PAD + nb_idx[None, :])
            dtb = tl.sum(dt[:, None] * zw, 0)
            dtb += tl.where(nb_idx == BK_L, far_l, 0.0) + tl.where(nb_idx == BK_R, far_r, 0.0)
            tl.store(DT + b64 * s_dtb + h.to(tl.int64) * s_dth + pid_n * s_dtn + nb_idx, dtb)
    # 3. write dK (scale folded back in) and dV of this key block
    tl.store(
        DK + b64 * s_dkb + hk.to(tl.int64) * s_dkh + (k_start + offs_n)[:, None].to(tl.int64) * s_dkn + offs_d[None, :],
        (dk * sm_scale).to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV + b64 * s_dvb + hk.to(tl.int64) * s_dvh + (k_start + offs_n)[:, None].to(tl.int64) * s_dvn + offs_d[None, :],
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_finish_kernel(DQA, DQ, n, sm_scale, BLOCK: tl.constexpr):
    """dQ = sm_scale · (the fp32 sum of the key blocks' partials), in q's dtype. Both contiguous."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.load(DQA + offs, mask=offs < n, other=0.0)
    tl.store(DQ + offs, (acc * sm_scale).to(DQ.dtype.element_ty), mask=offs < n)


@triton.jit
def _dq_tile(
    dq,
    q,
    do,
    lse_a,
    lse_b,
    delta,
    k_base,
    v_base,
    s_kn,
    s_vn,
    m0,
    n0,
    offs_m,
    offs_n0,
    offs_d,
    d_ok,
    q_len,
    k_len,
    b,
    h,
    bh,
    qk_scale,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    brd_h,
    RD_MAX,
    SAT_L,
    SAT_R,
    QOFF,
    seed,
    dropout_p,
    DM,
    s_dmb,
    s_dmh,
    s_dmm,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_GRAD: tl.constexpr,
    HAS_T5: tl.constexpr,
    DROPOUT: tl.constexpr,
    MASKED: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One key block of the query-stationary dQ pass: recompute P, dP, dS; dQ += dS K."""
    offs_n = n0 + offs_n0
    if MASKED:
        kv_mask = (offs_n[:, None] < k_len) & d_ok[None, :]
    else:
        kv_mask = d_ok[None, :]
    t5_far = False
    t5_c = 0.0
    if HAS_T5:
        t5_far, far_left, t5_c = _t5_tile_kind(m0, n0, brd_h, SAT_L, SAT_R, RD_MAX, QOFF, BLOCK_M, BLOCK_N)
    k = tl.load(k_base + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    om = offs_m[:, None]
    on = offs_n[None, :]
    s = _score_tile(
        tl.dot(q, tl.trans(k), input_precision=PREC),
        om,
        on,
        q_len,
        k_len,
        b,
        h,
        qk_scale,
        M,
        s_mb,
        s_mh,
        s_mm,
        s_mn,
        brd_h,
        t5_far,
        t5_c,
        RD_MAX,
        QOFF,
        IS_CAUSAL,
        MASK_KIND,
        HAS_T5,
        MASKED,
    )
    if MASK_KIND == 2:
        p = tl.exp2((s - lse_a[:, None]) - lse_b[:, None])  # s − row max first (_load_row_stats)
    else:
        p = tl.exp2(s - lse_a[:, None])
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    if DROPOUT:
        keep = _keep_tile(seed, bh, om, on, dropout_p)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
    if MASK_GRAD:
        tl.store(
            DM + b.to(tl.int64) * s_dmb + h.to(tl.int64) * s_dmh + om * s_dmm + on, ds, mask=(om < q_len) & (on < k_len)
        )
    return dq


@triton.jit(do_not_specialize=["seed", "QOFF"])
def _attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
    DM,
    s_qb,
    s_qh,
    s_qm,
    s_kb,
    s_kh,
    s_kn,
    s_vb,
    s_vh,
    s_vn,
    s_ob,
    s_oh,
    s_om,
    s_lb,
    s_lh,
    s_lx,
    s_dqb,
    s_dqh,
    s_dqm,
    s_dmb,
    s_dmh,
    s_dmm,
    CU_Q,
    CU_K,
    KLEN,
    M,
    s_mb,
    s_mh,
    s_mm,
    s_mn,
    BRD,
    s_brd,
    ZPTS,
    ZW,
    RD_MAX,
    SAT_L,
    SAT_R,
    BK_L,
    BK_R,
    QOFF,
    seed,
    dropout_p,
    H,
    GROUP,
    Lq,
    Lk,
    D,
    qk_scale,
    sm_scale,
    IS_VARLEN: tl.constexpr,
    HAS_KLEN: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_GRAD: tl.constexpr,
    HAS_T5: tl.constexpr,
    DROPOUT: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
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
    lse_a, lse_b = _load_row_stats(LSE + l_off, s_lx, offs_m < q_len, MASK_KIND)
    delta = tl.load(DELTA + l_off, mask=offs_m < q_len, other=0.0)
    k_base = K + b64 * s_kb + hk.to(tl.int64) * s_kh + k_start.to(tl.int64) * s_kn
    v_base = V + b64 * s_vb + hk.to(tl.int64) * s_vh + k_start.to(tl.int64) * s_vn
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # 2. key blocks: unmasked while wholly in range and below the diagonal, masked after
    full_hi, hi = _key_block_bounds(m0, k_len, QOFF, IS_CAUSAL, MASK_KIND, BLOCK_M, BLOCK_N)
    brd_h = BRD + h * s_brd  # T5: this head's bias per clamped relative position (unused otherwise)
    for n0 in range(0, full_hi, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse_a,
            lse_b,
            delta,
            k_base,
            v_base,
            s_kn,
            s_vn,
            m0,
            n0,
            offs_m,
            offs_n0,
            offs_d,
            d_ok,
            q_len,
            k_len,
            b,
            h,
            pid_bh,
            qk_scale,
            M,
            s_mb,
            s_mh,
            s_mm,
            s_mn,
            brd_h,
            RD_MAX,
            SAT_L,
            SAT_R,
            QOFF,
            seed,
            dropout_p,
            DM,
            s_dmb,
            s_dmh,
            s_dmm,
            IS_CAUSAL,
            MASK_KIND,
            MASK_GRAD,
            HAS_T5,
            DROPOUT,
            False,
            PREC,
            BLOCK_M,
            BLOCK_N,
        )
    for n0 in range(full_hi, hi, BLOCK_N):
        dq = _dq_tile(
            dq,
            q,
            do,
            lse_a,
            lse_b,
            delta,
            k_base,
            v_base,
            s_kn,
            s_vn,
            m0,
            n0,
            offs_m,
            offs_n0,
            offs_d,
            d_ok,
            q_len,
            k_len,
            b,
            h,
            pid_bh,
            qk_scale,
            M,
            s_mb,
            s_mh,
            s_mm,
            s_mn,
            brd_h,
            RD_MAX,
            SAT_L,
            SAT_R,
            QOFF,
            seed,
            dropout_p,
            DM,
            s_dmb,
            s_dmh,
            s_dmm,
            IS_CAUSAL,
            MASK_KIND,
            MASK_GRAD,
            HAS_T5,
            DROPOUT,
            True,
            PREC,
            BLOCK_M,
            BLOCK_N,
        )
    tl.store(
        DQ + b64 * s_dqb + h.to(tl.int64) * s_dqh + rows * s_dqm + offs_d[None, :],
        (dq * sm_scale).to(DQ.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(OUT, seed, H, Lq, Lk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Debug: write the keep-mask (B, H, Lq, Lk) the attention kernels use for this seed."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    bh = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep_tile(seed, bh, offs_m[:, None], offs_n[None, :], dropout_p)
    ptrs = OUT + bh.to(tl.int64) * Lq * Lk + offs_m[:, None].to(tl.int64) * Lk + offs_n[None, :]
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
