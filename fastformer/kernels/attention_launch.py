"""Host side of the attention kernels: argument lists, tile configurations, tuning, launches.

    out, lse = attention_forward(q, k, v, AttnSpec(scale=0.125, causal=True))
    dq, dk, dv, dmask, dtable = attention_backward(dout, q, k, v, out, lse, spec)

The `@triton.jit` code is `attention.py`; this module imports it (and so triton) only when it
launches something, so `AttnSpec`, `T5RelPos` and the tile tables are usable without triton (the
reference path builds a T5RelPos to validate a T5 configuration). Every launch goes through
`launch.launch`, so the kernel report captures the very argument lists built here.

Tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages): `_blocks` gives the built-in default
per kernel, head dim and element size; `CANDIDATES` the alternatives the tuner may time on a GPU
(`tuning.choose`); FASTFORMER_ATTN_TILES pins a 16-bit config by hand (for A/B benchmarks).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Callable, Optional

import torch

from . import tuning
from .launch import Launch, launch

LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# what shapes one call
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class T5RelPos:
    """T5's bucket function over the clamped relative position r = clamp(j − i, −radius, radius).

    bucket: (2·radius + 1,) int32 on the kernels' device, bucket[r + radius]; every relative position
    beyond ±radius shares the end value. The two saturated ends are constant over whole ranges:
    r <= −sat_left maps to bucket_left (= bucket[0]) and r >= sat_right to bucket_right (= bucket[-1]),
    with sat_left >= 0 and sat_right >= 1, so a tile wholly inside one of them sees one bias value.

    For the table's gradient on near tiles: zpts (NZ,) int32, the change points z (bucket(z) !=
    bucket(z - 1)) in increasing order, padded with a huge value to a power of two NZ > their count;
    zweights (NZ, NB_PAD) fp32 in {-1, 0, 1} such that, with A[t] = Σ dS over elements with j − i <
    zpts[t], the per-bucket sums are A @ zweights (each bucket's run is a difference of two A's).
    """
    bucket: torch.Tensor
    radius: int
    sat_left: int
    sat_right: int
    bucket_left: int
    bucket_right: int
    zpts: torch.Tensor
    zweights: torch.Tensor


@dataclasses.dataclass
class AttnSpec:
    """Everything besides q/k/v that shapes one attention call.

    Dense: q (B, H, Lq, D), k/v (B, H_kv, Lk, D). Varlen: q (Tq, H, D), k/v (Tk, H_kv, D) with
    cu_q/cu_k (B + 1,) int32 and max_q/max_k. mask: a (B, H, Lq, Lk) *expanded view* (stride 0 on
    broadcast dims) of bool (stored as uint8) or float; klen: (B,) int32 key lengths (fast path).
    t5_table: (NB, H) with t5_rel, its bucket function over relative positions.
    """
    scale: float
    causal: bool = False
    dropout_p: float = 0.0
    seed: int = 0
    klen: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    mask_grad: bool = False
    cu_q: Optional[torch.Tensor] = None
    cu_k: Optional[torch.Tensor] = None
    max_q: int = 0
    max_k: int = 0
    t5_table: Optional[torch.Tensor] = None
    t5_rel: Optional["T5RelPos"] = None
    t5_grad: bool = False

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None


# ----------------------------------------------------------------------------------------------
# tile configurations: defaults, tuning candidates, the hand override
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TILES_ENV = "FASTFORMER_ATTN_TILES"
KINDS = ("fwd", "dkdv", "dq")


def _dim_class(D: int) -> int:
    return 64 if D <= 64 else 128 if D <= 128 else 256


@functools.lru_cache(maxsize=8)
def _parse_tiles(text: str) -> dict:
    """FASTFORMER_ATTN_TILES, e.g. "dkdv:128=64,64,8,2;t5fwd:64=128,64,8,3": per kernel kind
    (fwd | dkdv | dq, "t5" prefix for the T5 kernels) and head-dim class (64, 128, 256), a 16-bit
    tile config BLOCK_M,BLOCK_N,num_warps,num_stages that replaces the built-in one and is not tuned.
    For benchmarks that compare configs in one run; the built-in table is the default."""
    out = {}
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        try:
            key, cfg = item.split("=")
            kind, dim = key.split(":")
            vals = tuple(int(x) for x in cfg.split(","))
            ok = len(vals) == 4 and kind.removeprefix("t5") in KINDS and int(dim) in (64, 128, 256)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{TILES_ENV}: cannot read {item!r} (expected kind:headdim=BLOCK_M,BLOCK_N,warps,stages)")
        out[(kind, int(dim))] = vals
    return out


def _override(D: int, kind: str, itemsize: int, t5: bool):
    if itemsize > 2:
        return None
    return _parse_tiles(os.environ.get(TILES_ENV, "")).get((("t5" if t5 else "") + kind, _dim_class(D)))


def _blocks(D: int, kind: str, itemsize: int = 2, t5: bool = False):
    """The built-in tile config per head dim and element size (shared memory sized for Hopper/Ampere:
    fp32 inputs get smaller tiles), or the FASTFORMER_ATTN_TILES override. kind: 'fwd' | 'dkdv' | 'dq'.
    Returns (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    if _interpreting():
        # numpy interpreter: medium tiles keep the Python loop short; BLOCK_M != BLOCK_N as on GPUs so
        # the tests exercise the diagonal/tail logic with unequal tiles
        return {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}[kind]
    wide = itemsize > 2
    override = _override(D, kind, itemsize, t5)
    if override is not None:
        return override
    if t5 and not wide and D <= 128:
        # the T5 bias adds per-tile state: with these, Triton 3.6 compiles the T5 forward and dQ for
        # sm_90 without spills, and dK/dV at d64 (bench/results/kernel_report_triton-*.md)
        return {"fwd": (128, 64, 8, 3), "dkdv": (64, 64, 8, 2), "dq": (64, 64, 4, 2)}[kind]
    if kind == "fwd":
        if D <= 64:
            return (64, 64, 4, 2) if wide else (128, 64, 4, 3)
        if D <= 128:
            return (64, 32, 4, 2) if wide else (128, 64, 8, 3)
        return (32, 32, 4, 1) if wide else (64, 32, 8, 2)
    if kind == "dkdv":
        if D <= 64:
            return (32, 64, 4, 2) if wide else (64, 128, 8, 2)
        if D <= 128:
            return (32, 32, 4, 1) if wide else (64, 64, 4, 2)
        return (16, 32, 4, 1) if wide else (32, 32, 8, 1)
    if D <= 128:
        return (32, 32, 4, 1) if wide else (64, 64, 4, 2)
    return (16, 32, 4, 1) if wide else (32, 32, 8, 1)


# Tuning candidates for 16-bit inputs, per (kernel, head-dim class), besides the default. The tuner
# times only those that passed the kernel report's gates for the running Triton version and GPU
# generation (gate_results/attention.json); fp32 inputs, head dim 256 and the interpreter keep the
# defaults.
CANDIDATES = {
    ("fwd", 64): [(128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 3), (128, 64, 8, 3)],
    ("fwd", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 64, 8, 2)],
    ("dkdv", 64): [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
    ("dkdv", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2)],
    ("dq", 64): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 64, 4, 2)],
    ("dq", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    ("t5fwd", 64): [(128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3)],
    ("t5fwd", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3)],
    ("t5dkdv", 64): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)],
    ("t5dkdv", 128): [(64, 64, 8, 2), (64, 64, 4, 2), (32, 64, 4, 2)],
    ("t5dq", 64): [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
    ("t5dq", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
}


def tune_name(kind: str, D: int, t5: bool) -> str:
    """The tuner's and the gate file's name of a kernel and head-dim class: 'attention.t5dkdv:d128'."""
    return f"attention.{'t5' if t5 else ''}{kind}:d{_dim_class(D)}"


def candidates(kind: str, D: int, itemsize: int, t5: bool) -> list:
    """The tuning candidates for this kernel (empty where the default is pinned)."""
    if _interpreting() or itemsize > 2 or _override(D, kind, itemsize, t5) is not None:
        return []
    return list(CANDIDATES.get((("t5" if t5 else "") + kind, _dim_class(D)), []))


_SAFE_CFG = (16, 16, 4, 1)


def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def _launch(name: str, make: Callable[[tuple], Launch], default: tuple, cands: list, shape_class: str,
            device) -> None:
    """Choose the tile config (tuning.choose: the default unless a GPU has timed the candidates) and
    launch make(cfg). If the GPU lacks the shared memory/registers for it, retry once with the
    smallest tiles rather than fail (correctness first, speed second)."""
    cfg = tuning.choose(name, shape_class, default, cands, lambda c: launch(make(c)), device)
    try:
        launch(make(cfg))
    except _out_of_resources():
        launch(make(_SAFE_CFG))


# ----------------------------------------------------------------------------------------------
# argument lists
# ----------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _precision(q) -> str:
    """fp32 inputs: IEEE fp32 dots unless torch allows TF32 for matmuls (as torch SDPA does)."""
    if q.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _dims(q, k, spec: AttnSpec):
    """(B, H, HK, Lq, Lk, D) and the (b, h, l) strides of a q/k/v-like tensor."""
    if spec.varlen:
        B = spec.cu_q.numel() - 1
        return B, q.shape[1], k.shape[1], spec.max_q, spec.max_k, q.shape[2]
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3]


def _strides(t, spec: AttnSpec):
    if spec.varlen:  # (T, H, D): no batch stride, rows offset by cu_seqlens in-kernel
        return 0, t.stride(1), t.stride(0)
    return t.stride(0), t.stride(1), t.stride(2)


def _lse_strides(lse, spec: AttnSpec):
    if spec.varlen:  # (H, Tq)
        return 0, lse.stride(0)
    return lse.stride(0), lse.stride(1)


def _shape_class(q, spec: AttnSpec, B: int, H: int, Lq: int, Lk: int, D: int) -> str:
    """What the tuner keys a choice on besides the kernel: dtype, the variant, and power-of-two
    buckets of the sequence length and of batch x heads."""
    flags = [name for name, on in (("causal", spec.causal), ("varlen", spec.varlen), ("klen", spec.klen is not None),
                                   ("mask", spec.mask is not None), ("maskgrad", spec.mask_grad),
                                   ("dropout", spec.dropout_p > 0), ("t5grad", spec.t5_grad)) if on]
    return "|".join([str(q.dtype).removeprefix("torch."), f"d{D}", "+".join(flags) or "plain",
                     f"L{tuning.bucket(max(Lq, Lk), 64, 16384)}", f"BH{tuning.bucket(B * H, 1, 4096)}"])


def _common_args(q, spec: AttnSpec, Lk: int, D: int):
    """Arguments shared by the forward, dK/dV and dQ kernels: the varlen / key-length / mask / T5
    pointers and strides, the dropout RNG's row stride, and the constexpr flags (BLOCK_D included)."""
    dummy = q  # any tensor: unused pointers are never dereferenced
    cu_q = spec.cu_q if spec.cu_q is not None else dummy
    cu_k = spec.cu_k if spec.cu_k is not None else dummy
    klen = spec.klen if spec.klen is not None else dummy
    if spec.mask is not None:
        m = spec.mask
        mask_args = (m, m.stride(0), m.stride(1), m.stride(2), m.stride(3))
        mask_kind = 1 if m.dtype in (torch.uint8, torch.int8, torch.bool) else 2
    else:
        mask_args = (dummy, 0, 0, 0, 0)
        mask_kind = 0
    if spec.t5_table is not None:
        rp = spec.t5_rel
        # (H, 2R + 1) fp32: each head's bias at each clamped relative position, in log2 units (tiny)
        brd = (spec.t5_table.detach().float().index_select(0, rp.bucket) * LOG2E).t().contiguous()
        t5_args = (brd, brd.stride(0), rp.zpts, rp.zweights, rp.radius, rp.sat_left, rp.sat_right, rp.bucket_left,
                   rp.bucket_right)
    else:
        t5_args = (dummy, 0, dummy, dummy, 0, 0, 0, 0, 0)
    rng_stride = spec.max_k if spec.varlen else Lk
    BD = max(16, _next_pow2(D))
    flags = dict(IS_VARLEN=spec.varlen, HAS_KLEN=spec.klen is not None, IS_CAUSAL=spec.causal, MASK_KIND=mask_kind,
                 HAS_T5=spec.t5_table is not None, DROPOUT=spec.dropout_p > 0,
                 PREC=_precision(q), BLOCK_D=BD, EVEN_D=BD == D)
    return cu_q, cu_k, klen, mask_args, t5_args, rng_stride, flags


def _tiles(cfg) -> dict:
    BM, BN, warps, stages = cfg
    return dict(BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)


def _tuned(kind: str, q, spec: AttnSpec, make: Callable[[tuple], Launch], dims) -> None:
    B, H, HK, Lq, Lk, D = dims
    t5 = spec.t5_table is not None
    _launch(tune_name(kind, D, t5), make, _blocks(D, kind, q.element_size(), t5),
            candidates(kind, D, q.element_size(), t5), _shape_class(q, spec, B, H, Lq, Lk, D), q.device)


# ----------------------------------------------------------------------------------------------
# forward and backward
# ----------------------------------------------------------------------------------------------


def attention_forward(q, k, v, spec: AttnSpec, out: Optional[torch.Tensor] = None):
    """Fused forward. Returns (out like q, lse2 fp32: (B, H, Lq) dense or (H, Tq) varlen, log2 units).
    out: optional preallocated output (last dim contiguous)."""
    from . import attention as K

    dims = B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if spec.varlen:
        lse = torch.empty((H, q.shape[0]), device=q.device, dtype=torch.float32)
    else:
        lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
    cu_q, cu_k, klen, mask_args, t5_args, rng_stride, flags = _common_args(q, spec, Lk, D)
    args = (q, k, v, o, lse,
            *_strides(q, spec), *_strides(k, spec), *_strides(v, spec), *_strides(o, spec), *_lse_strides(lse, spec),
            cu_q, cu_k, klen, *mask_args, *t5_args,
            spec.seed, rng_stride, spec.dropout_p,
            H, H // HK, Lq, Lk, D, spec.scale * LOG2E)

    def make(cfg):
        return Launch(K._attn_fwd_kernel, (_cdiv(max(Lq, 1), cfg[0]), B * H), args, dict(flags, **_tiles(cfg)),
                      "attention.fwd", tuple(cfg))

    _tuned("fwd", q, spec, make, dims)
    return o, lse


def _dkdv_pass(do, q, k, v, lse, delta, spec, cu_q, cu_k, klen, mask_args, t5_args, rng_stride, flags):
    """The dK/dV kernel (and the T5 table partials). Returns (dk, dv, dtable_partials or None)."""
    from . import attention as K

    dims = B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    zero_kv = spec.klen is not None
    dk = (torch.zeros_like if zero_kv else torch.empty_like)(k, memory_format=torch.contiguous_format)
    dv = (torch.zeros_like if zero_kv else torch.empty_like)(v, memory_format=torch.contiguous_format)
    nb_pad = spec.t5_rel.zweights.shape[1] if spec.t5_grad else 1  # next power of two >= num_buckets
    partials = {}  # BLOCK_N -> the T5 table partials of that tiling (their count depends on it)

    def make(cfg):
        BN = cfg[1]
        n_kblocks = _cdiv(max(Lk, 1), BN)
        dt = None
        if spec.t5_grad:
            dt = partials.get(BN)
            if dt is None:
                dt = partials[BN] = torch.zeros((B, H, n_kblocks, nb_pad), device=q.device, dtype=torch.float32)
        dt_strides = (dt.stride(0), dt.stride(1), dt.stride(2)) if dt is not None else (0, 0, 0)
        args = (q, k, v, do, lse, delta, dk, dv, dt if dt is not None else q,
                *_strides(q, spec), *_strides(k, spec), *_strides(v, spec), *_strides(do, spec),
                *_lse_strides(lse, spec), *_strides(dk, spec), *_strides(dv, spec), *dt_strides,
                cu_q, cu_k, klen, *mask_args, *t5_args,
                spec.seed, rng_stride, spec.dropout_p,
                H, HK, H // HK, Lq, Lk, D, spec.scale * LOG2E, spec.scale)
        kwargs = dict(T5_GRAD=spec.t5_grad, NB_PAD=nb_pad, T5_NZ=spec.t5_rel.zpts.numel() if spec.t5_grad else 1,
                      **flags, **_tiles(cfg))
        partials["last"] = dt
        return Launch(K._attn_bwd_dkdv_kernel, (n_kblocks, B * HK), args, kwargs, "attention.dkdv", tuple(cfg))

    _tuned("dkdv", q, spec, make, dims)
    return dk, dv, partials.get("last")


def attention_backward(do, q, k, v, o, lse, spec: AttnSpec, need_dq: bool = True, need_dkdv: bool = True):
    """Fused backward. Returns (dq, dk, dv, dmask_full or None, dtable_partials or None).

    dmask_full: (B, H, Lq, Lk) fp32 = dS when spec.mask_grad; dtable_partials: (B, H, n_kblocks, NB_PAD)
    fp32 when spec.t5_grad (sum over dims 0 and 2, in any fixed order, gives dtable[:, h]).
    need_dq=False (and no mask gradient) skips the dQ pass and returns dq None; need_dkdv=False (and no
    T5 table gradient) skips the dK/dV pass and returns dk, dv None."""
    from . import attention as K

    dims = B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    do = do.contiguous() if do.stride(-1) != 1 else do
    cu_q, cu_k, klen, mask_args, t5_args, rng_stride, flags = _common_args(q, spec, Lk, D)

    # 1. Delta = rowsum(dO · O)
    delta = torch.empty_like(lse)
    BMd = 64 if not _interpreting() else 32
    launch(Launch(K._attn_bwd_delta_kernel, (_cdiv(max(Lq, 1), BMd), B * H),
                  (o, do, delta, *_strides(o, spec), *_strides(do, spec), *_lse_strides(lse, spec), cu_q, H, Lq, D),
                  dict(IS_VARLEN=spec.varlen, BLOCK_M=BMd, BLOCK_D=flags["BLOCK_D"]), "attention.delta"))

    # 2. dK, dV (+ T5 table partials); keys past a per-batch length are never visited -> zeros
    dk = dv = dt = None
    if need_dkdv or spec.t5_grad:
        dk, dv, dt = _dkdv_pass(do, q, k, v, lse, delta, spec, cu_q, cu_k, klen, mask_args, t5_args, rng_stride,
                                flags)
    if not (need_dq or spec.mask_grad):
        return None, dk, dv, None, dt

    # 3. dQ (+ the float mask's gradient as a full dS buffer)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    if spec.mask_grad:
        dm = torch.zeros((B, H, Lq, Lk), device=q.device, dtype=torch.float32)
        dm_strides = (dm.stride(0), dm.stride(1), dm.stride(2))
    else:
        dm, dm_strides = None, (0, 0, 0)
    args = (q, k, v, do, lse, delta, dq, dm if dm is not None else q,
            *_strides(q, spec), *_strides(k, spec), *_strides(v, spec), *_strides(do, spec), *_lse_strides(lse, spec),
            *_strides(dq, spec), *dm_strides,
            cu_q, cu_k, klen, *mask_args, *t5_args,
            spec.seed, rng_stride, spec.dropout_p,
            H, H // HK, Lq, Lk, D, spec.scale * LOG2E, spec.scale)

    def make(cfg):
        return Launch(K._attn_bwd_dq_kernel, (_cdiv(max(Lq, 1), cfg[0]), B * H), args,
                      dict(MASK_GRAD=spec.mask_grad, **flags, **_tiles(cfg)), "attention.dq", tuple(cfg))

    _tuned("dq", q, spec, make, dims)
    return dq, dk, dv, dm, dt


def dropout_keep_mask(B: int, H: int, Lq: int, Lk: int, seed: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, Lq, Lk) bool keep-mask the dense kernels draw for this seed (debug / tests)."""
    from . import attention as K

    out = torch.empty((B, H, Lq, Lk), device=device, dtype=torch.int8)
    BM = BN = 32
    launch(Launch(K._dropout_mask_kernel, (_cdiv(max(Lq, 1), BM), _cdiv(max(Lk, 1), BN), B * H),
                  (out, seed, H, Lq, Lk, Lk, dropout_p), dict(BLOCK_M=BM, BLOCK_N=BN), "attention.dropout_mask"))
    return out.bool()
