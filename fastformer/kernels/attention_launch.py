"""Host side of the attention kernels: argument lists, tile configurations, tuning, launches.

    out, lse = attention_forward(q, k, v, AttnSpec(scale=0.125, causal=True))
    dq, dk, dv, dmask, dtable = attention_backward(dout, q, k, v, out, lse, spec)

The `@triton.jit` code is `attention.py`; this module imports it (and so triton) only when it
launches something, so `AttnSpec`, `T5RelPos` and the tile tables are usable without triton (the
reference path builds a T5RelPos to validate a T5 configuration). Every launch goes through
`launch.launch`, so the kernel report captures the very argument lists built here.

Configurations are tuples of ints, one per job the tuner chooses for:

- "fwd": (BLOCK_M, BLOCK_N, num_warps, num_stages) runs the forward with pointer loads; a fifth
  value picks the tensor-descriptor build: 1 = TMA copies and a warp-specialised key loop, 2 = TMA
  copies only. The TMA builds run on Hopper with Triton >= 3.6 and 16-byte aligned rows (else the
  pointer build's default runs).
- "bwd" (dQ and dK/dV wanted): 4 values run the five-GEMM key-stationary backward with ordered dQ
  additions; 8 values run the seven-GEMM backward: the key-stationary dK/dV pass with the first four,
  the query-stationary dQ pass with the last four.
- "dkdv" (dK/dV or the T5 table's gradient without dQ), "dq" (dQ or a float mask's gradient
  without dK/dV): 4 values.

`_blocks` gives the built-in default per job, head dim, element size and GPU generation;
`CANDIDATES` the alternatives the tuner may time on a GPU (`tuning.choose`); FASTFORMER_ATTN_TILES
pins a 16-bit configuration by hand, and `use_variants` a kernel variant with its built-in
configuration (tests run every variant in the interpreter this way; benchmarks compare them).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from collections.abc import Callable

import torch

from . import tuning
from .launch import Launch, capture_target, capturing, launch, on_tensor_device

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
    t5_table: (NB, H) with t5_rel, its bucket function over relative positions. query_offset: the
    position of query row 0 (keys sit at 0..Lk-1): causal keeps j <= i + query_offset and the T5
    buckets use j − i − query_offset (decoding against a cache); 0 is the aligned case.
    """

    scale: float
    causal: bool = False
    dropout_p: float = 0.0
    seed: int = 0
    klen: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    mask_grad: bool = False
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0
    t5_table: torch.Tensor | None = None
    t5_rel: T5RelPos | None = None
    t5_grad: bool = False
    query_offset: int = 0

    @property
    def varlen(self) -> bool:
        return self.cu_q is not None


# ----------------------------------------------------------------------------------------------
# tile configurations: defaults, variants, tuning candidates, the hand override
# ----------------------------------------------------------------------------------------------


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


TILES_ENV = "FASTFORMER_ATTN_TILES"
KINDS = ("fwd", "bwd", "dkdv", "dq")
TMA_WS, TMA_ONLY = 1, 2  # the fifth value of a forward configuration
_CFG_LENGTHS = {"fwd": (4, 5), "bwd": (4, 8), "dkdv": (4,), "dq": (4,)}


def _dim_class(D: int) -> int:
    return 64 if D <= 64 else 128 if D <= 128 else 256


@functools.lru_cache(maxsize=8)
def _parse_tiles(text: str) -> dict:
    """FASTFORMER_ATTN_TILES, e.g. "bwd:128=64,64,8,2;t5fwd:64=128,64,4,2,1": per job (fwd | bwd |
    dkdv | dq, "t5" prefix for the T5 kernels) and head-dim class (64, 128, 256), a 16-bit
    configuration (module docstring: 4 values, 5 for a TMA forward, 8 for the seven-GEMM backward)
    that replaces the built-in one and is not tuned. For benchmarks that compare configurations in
    one run; the built-in table is the default."""
    out = {}
    for item in (x.strip() for x in text.split(";")):
        if not item:
            continue
        try:
            key, cfg = item.split("=")
            kind, dim = key.split(":")
            vals = tuple(int(x) for x in cfg.split(","))
            base = kind.removeprefix("t5")
            ok = base in KINDS and len(vals) in _CFG_LENGTHS[base] and int(dim) in (64, 128, 256)
            ok = ok and (len(vals) != 5 or vals[4] in (TMA_WS, TMA_ONLY))
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"{TILES_ENV}: cannot read {item!r} (expected kind:headdim=BLOCK_M,BLOCK_N,warps,stages"
                f"[,tma] or 8 values for bwd)"
            )
        out[(kind, int(dim))] = vals
    return out


def _override(D: int, kind: str, itemsize: int, t5: bool):
    if itemsize > 2:
        return None
    return _parse_tiles(os.environ.get(TILES_ENV, "")).get((("t5" if t5 else "") + kind, _dim_class(D)))


# kernel variants pinned by use_variants(): {"fwd": "tma" | "pointer", "bwd": "5gemm" | "7gemm"}. Process
# wide, not per thread: autograd runs a CUDA backward in its own thread.
_variants: dict = {}
VARIANTS = {"fwd": ("tma", "pointer"), "bwd": ("5gemm", "7gemm")}


@contextlib.contextmanager
def use_variants(fwd: str | None = None, bwd: str | None = None):
    """Inside the block (in every thread of the process), run the forward as `fwd` ("tma": tensor
    descriptors and, where the call allows it, a warp-specialised key loop, on GPUs and Triton versions
    that support them; "pointer": pointer loads) and the backward as `bwd` ("5gemm": the key-stationary
    kernel with ordered dQ additions; "7gemm": the dK/dV pass and the query-stationary dQ pass), each
    with its built-in configuration (nothing is tuned). None keeps the default choice. The tests run
    every variant in the interpreter this way; bench/bench_attention.py compares them on a GPU."""
    for kind, value in (("fwd", fwd), ("bwd", bwd)):
        if value is not None and value not in VARIANTS[kind]:
            raise ValueError(f"use_variants: {kind} must be one of {VARIANTS[kind]}, got {value!r}")
    previous = dict(_variants)
    _variants.update({k: v for k, v in (("fwd", fwd), ("bwd", bwd)) if v is not None})
    try:
        yield
    finally:
        _variants.clear()
        _variants.update(previous)


def _pinned(kind: str) -> str | None:
    return _variants.get(kind)


@functools.lru_cache(maxsize=1)
def _triton_has_tma() -> bool:
    """Triton >= 3.6 with device-side tensor descriptors and warp-specialised loops (the versions the
    kernel report checks the TMA forward with)."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return False
    try:
        major, minor = (int(x) for x in triton.__version__.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (3, 6) and hasattr(tl, "make_tensor_descriptor")


def _tma_arch(arch: int | None) -> bool:
    """Whether the TMA forward can run for this target: the interpreter (which emulates descriptors;
    used only when a variant is pinned), or a CUDA GPU of compute capability 9.x or newer with a Triton
    that has it. Its default is Hopper only (`_blocks`): the kernel report checks sm_90."""
    if _interpreting() and not capturing():
        return True
    return arch is not None and arch >= 90 and _triton_has_tma()


def _blocks(
    D: int,
    kind: str,
    itemsize: int = 2,
    t5: bool = False,
    arch: int | None = None,
    tma: bool = False,
    ws: bool | None = None,
    dropout: bool = False,
    mask: bool = False,
):
    """The built-in configuration of a job per head dim, element size, GPU generation and the call's
    traits (shared memory sized for Hopper/Ampere: fp32 inputs get smaller tiles), the variant pinned
    by use_variants, or the FASTFORMER_ATTN_TILES override. tma: the TMA forward can run for this call
    (arch, Triton, alignment); ws: and its key loop can be warp specialised (no mask tensor, no T5;
    default: tma and neither). See the module docstring for the tuple layouts."""
    pinned = _pinned(kind)
    ws = tma and not t5 and not mask if ws is None else ws and tma
    if _interpreting():
        # numpy interpreter: medium tiles keep the Python loop short; BLOCK_M != BLOCK_N as on GPUs so
        # the tests exercise the diagonal/tail logic with unequal tiles
        if kind == "fwd":
            return (32, 16, 4, 1, TMA_WS if ws else TMA_ONLY) if pinned == "tma" and tma else (32, 16, 4, 1)
        if kind == "bwd" and pinned == "7gemm":
            return (16, 32, 4, 1, 32, 16, 4, 1)
        return {"bwd": (16, 32, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}[kind]
    wide = itemsize > 2
    override = _override(D, kind, itemsize, t5)
    if override is not None and pinned is None:
        return override
    if kind == "fwd":
        pointer = _fwd_pointer_default(D, wide, t5, dropout)
        hopper = arch is not None and arch // 10 == 9
        if tma and not wide and D <= 128 and (pinned == "tma" or (pinned is None and hopper)):
            if ws:
                # one producer and two consumer warp groups (num_warps=4 is the consumer group's size:
                # Triton adds the other two); the producer's registers go to the consumers, so 128-key
                # blocks fit at d128 (dropout's Philox state: 64)
                return (128, 64, 4, 2, TMA_WS) if dropout else (128, 128, 4, 2, TMA_WS)
            if pinned == "tma":
                return pointer + (TMA_ONLY,)
        return pointer
    if kind == "bwd":
        if pinned == "7gemm":
            return _bwd_default(D, "dkdv", wide, t5, dropout, mask, arch) + _bwd_default(
                D, "dq", wide, t5, dropout, mask, arch
            )
        return _bwd_default(D, "bwd", wide, t5, dropout, mask, arch)
    return _bwd_default(D, kind, wide, t5, dropout, mask, arch)


def _fwd_pointer_default(D: int, wide: bool, t5: bool, dropout: bool = False) -> tuple:
    """The forward's pointer build (every GPU; the TMA build's fallback)."""
    if t5 and not wide and D <= 128:
        # the T5 bias adds per-tile state: with these, Triton 3.6 and 3.9 compile the T5 forward for
        # sm_90 without local memory in the loop (bench/results/kernel_report_triton-*.md)
        return (128, 64, 8, 3) if D <= 64 else (128, 32, 8, 3)
    if dropout and not wide and D <= 128:
        # the Philox state per score element: the plain tiles spill inside the key loop on sm_80 (Triton
        # 3.6: 424 B at d64); these compile without local memory and with one exp2 per score on 3.6 and 3.9
        return (64, 64, 4, 3) if D <= 64 else (128, 32, 8, 3)
    if D <= 64:
        return (64, 64, 4, 2) if wide else (128, 64, 4, 3)
    if D <= 128:
        return (64, 32, 4, 2) if wide else (128, 64, 8, 3)
    return (32, 32, 4, 1) if wide else (64, 32, 8, 2)


def _bwd_default(
    D: int, kind: str, wide: bool, t5: bool, dropout: bool = False, mask: bool = False, arch: int | None = None
) -> tuple:
    """bwd: the five-GEMM kernel; dkdv: the same loop without dQ; dq: the query-stationary pass. The
    key-stationary loop keeps a key block's K, V, dK and dV in registers: per-element extras (dropout's
    Philox state, a mask tile, the T5 bias) take 32-key blocks to stay free of spills (a mask tile at d64
    with 64-key blocks spills on sm_80 with Triton 3.9)."""
    if kind == "dq":
        if t5 and not wide and D <= 128:
            return (64, 64, 4, 2)
        if D <= 128:
            return (32, 32, 4, 1) if wide else (64, 64, 4, 2)
        return (16, 32, 4, 1) if wide else (32, 32, 8, 1)
    if wide:
        return (32, 32, 4, 1) if D <= 64 else (16, 32, 4, 1)
    if D <= 64:
        return (64, 32, 8, 2) if (t5 or dropout or mask) else (64, 128, 8, 2)
    if D <= 128:
        if t5 and kind == "bwd" and arch is not None and arch // 10 == 8:
            # sm_80 with Triton 3.9 spills the T5 five-GEMM loop with 64 x 32 tiles inside the loop;
            # 32 queries x 64 keys compile without local memory on 3.6 and 3.9
            return (32, 64, 8, 2)
        return (64, 32, 8, 2) if (t5 or dropout or mask) else (64, 64, 8, 2)
    return (32, 32, 8, 1)


# Tuning candidates for 16-bit inputs, per (job, head-dim class), besides the default. The tuner
# times only those that passed the kernel report's candidate gates for the running Triton version
# and GPU generation (gate_results/attention.json); fp32 inputs, head dim 256 and the interpreter keep
# the defaults. The forward's TMA builds are candidates on compute capability 9.x and newer only, the
# pointer builds everywhere; the backward's 8-value entries are the seven-GEMM path.
CANDIDATES = {
    ("fwd", 64): [
        (128, 128, 4, 2, TMA_WS),
        (128, 64, 4, 3, TMA_WS),
        (128, 64, 4, 3, TMA_ONLY),
        (128, 64, 4, 3),
        (64, 64, 4, 3),
        (128, 32, 4, 3),
        (128, 64, 8, 3),
    ],
    ("fwd", 128): [
        (128, 128, 4, 2, TMA_WS),
        (128, 64, 4, 3, TMA_WS),
        (128, 64, 8, 3, TMA_ONLY),
        (128, 64, 8, 3),
        (64, 64, 4, 3),
        (128, 32, 8, 3),
        (128, 64, 8, 2),
    ],
    ("bwd", 64): [
        (64, 128, 8, 2),
        (64, 64, 4, 2),
        (64, 64, 8, 2),
        (64, 128, 8, 2, 64, 64, 4, 2),
        (64, 64, 4, 2, 64, 64, 4, 2),
    ],
    ("bwd", 128): [
        (64, 64, 8, 2),
        (64, 64, 4, 2),
        (64, 128, 8, 2),
        (64, 64, 8, 2, 64, 64, 4, 2),
        (64, 64, 4, 2, 64, 64, 4, 2),
    ],
    ("dkdv", 64): [(64, 128, 8, 2), (64, 64, 8, 2), (64, 64, 4, 2)],
    ("dkdv", 128): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 128, 8, 2)],
    ("dq", 64): [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 2), (128, 64, 4, 2)],
    ("dq", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2)],
    # the T5 forward gathers its bias per element, which Triton's warp specialiser cannot take: pointer builds
    ("t5fwd", 64): [(128, 64, 8, 3), (128, 64, 4, 3)],
    ("t5fwd", 128): [(128, 64, 8, 3), (64, 64, 4, 3)],
    ("t5bwd", 64): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 64, 8, 2, 64, 64, 4, 2)],
    ("t5bwd", 128): [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 2, 64, 64, 4, 2)],
    ("t5dkdv", 64): [(64, 64, 4, 2), (64, 64, 8, 2)],
    ("t5dkdv", 128): [(64, 64, 8, 2), (64, 64, 4, 2)],
    ("t5dq", 64): [(64, 64, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
    ("t5dq", 128): [(64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2)],
}


def is_tma(cfg: tuple) -> bool:
    """A forward configuration of the TMA build."""
    return len(cfg) == 5 and cfg[4] in (TMA_WS, TMA_ONLY)


def tune_name(kind: str, D: int, t5: bool) -> str:
    """The tuner's and the gate file's name of a job and head-dim class: 'attention.t5bwd:d128'."""
    return f"attention.{'t5' if t5 else ''}{kind}:d{_dim_class(D)}"


def candidates(
    kind: str,
    D: int,
    itemsize: int,
    t5: bool,
    arch: int | None = None,
    tma: bool = False,
    ws: bool | None = None,
    mask: bool = False,
) -> list:
    """The tuning candidates for this job (empty where the default is pinned). TMA forward builds only
    where they can run (tma: arch, Triton and alignment allow it; ws: the warp-specialised one too)."""
    if _interpreting() or itemsize > 2 or _override(D, kind, itemsize, t5) is not None or _pinned(kind):
        return []
    ws = tma and not t5 and not mask if ws is None else ws and tma
    out = list(CANDIDATES.get((("t5" if t5 else "") + kind, _dim_class(D)), []))
    return [c for c in out if not is_tma(c) or (ws if c[4] == TMA_WS else tma)]


_SAFE_CFG = {"fwd": (16, 16, 4, 1), "bwd": (16, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}


def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


def _launch(
    name: str, run: Callable[[tuple], None], default: tuple, cands: list, shape_class: str, device, safe: tuple
) -> None:
    """Choose the configuration (tuning.choose: the default unless a GPU has timed the candidates) and
    run(cfg), which launches the job's kernels. If the GPU lacks the shared memory/registers for it,
    retry once with the smallest tiles rather than fail (correctness first, speed second)."""
    cfg = tuning.choose(name, shape_class, default, cands, run, device)
    try:
        run(cfg)
    except _out_of_resources():
        run(safe)


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


@functools.lru_cache(maxsize=16)
def _capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def _arch(device) -> int | None:
    """The GPU generation a launch is built for: the kernel report's target while it captures, the
    device's compute capability (90 for sm_90) on CUDA, None elsewhere."""
    target = capture_target()
    if target is not None:
        return target
    if getattr(device, "type", None) != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _rows_16b_aligned(t: torch.Tensor) -> bool:
    """What a tensor descriptor over t's rows needs: 16-byte aligned start (the report's meta tensors:
    the allocator's alignment plus the view's offset), unit last stride, 16-byte multiple strides on
    every other dim that has more than one entry."""
    size = t.element_size()
    start = t.storage_offset() * size if t.device.type == "meta" else t.data_ptr()
    if start % 16 or (t.shape[-1] > 1 and t.stride(-1) != 1):
        return False
    return all((st * size) % 16 == 0 for n, st in zip(t.shape[:-1], t.stride()[:-1]) if n > 1)


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


def _rows_fit_int32(t, spec: AttnSpec, rows: int) -> bool:
    """Whether the offsets within `rows` rows of one head of the q/k/v-like t (row x row stride +
    column) fit the int32 arithmetic the kernels use for them (batch, head and sequence-start offsets
    are int64)."""
    s_row = t.stride(0) if spec.varlen else t.stride(2)
    return (max(rows, 1) - 1) * abs(s_row) + (t.shape[-1] - 1) * abs(t.stride(-1)) < 2**31


def _row_strides(rows, spec: AttnSpec):
    """(batch, head) strides of a per-query-row fp32 tensor: (B, H, Lq) dense, (H, Tq) varlen."""
    if spec.varlen:
        return 0, rows.stride(0)
    return rows.stride(0), rows.stride(1)


def _lse_strides(lse, spec: AttnSpec):
    """The forward's saved row statistics (2, ...): one half's row strides, then the offset of lse[1]."""
    return (*_row_strides(lse[0], spec), lse.stride(0))


def _shape_class(q, spec: AttnSpec, B: int, H: int, Lq: int, Lk: int, D: int, extra: tuple = ()) -> str:
    """What the tuner keys a choice on besides the job: dtype, the variant, and power-of-two buckets of
    the sequence length and of batch x heads."""
    flags = [
        name
        for name, on in (
            ("causal", spec.causal),
            ("varlen", spec.varlen),
            ("klen", spec.klen is not None),
            ("mask", spec.mask is not None),
            ("maskgrad", spec.mask_grad),
            ("dropout", spec.dropout_p > 0),
            ("t5grad", spec.t5_grad),
        )
        if on
    ]
    flags += list(extra)
    return "|".join(
        [
            str(q.dtype).removeprefix("torch."),
            f"d{D}",
            "+".join(flags) or "plain",
            f"L{tuning.bucket(max(Lq, Lk), 64, 16384)}",
            f"BH{tuning.bucket(B * H, 1, 4096)}",
        ]
    )


def _common_args(q, spec: AttnSpec, Lk: int, D: int):
    """Arguments shared by the forward and backward kernels: the varlen / key-length / mask / T5
    pointers and strides (with the query offset), the dropout RNG's row stride, and the constexpr
    flags (BLOCK_D included)."""
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
        t5_args = (
            brd,
            brd.stride(0),
            rp.zpts,
            rp.zweights,
            rp.radius,
            rp.sat_left,
            rp.sat_right,
            rp.bucket_left,
            rp.bucket_right,
            int(spec.query_offset),
        )
    else:
        t5_args = (dummy, 0, dummy, dummy, 0, 0, 0, 0, 0, int(spec.query_offset))
    BD = max(16, _next_pow2(D))
    flags = dict(
        IS_VARLEN=spec.varlen,
        HAS_KLEN=spec.klen is not None,
        IS_CAUSAL=spec.causal,
        MASK_KIND=mask_kind,
        HAS_T5=spec.t5_table is not None,
        DROPOUT=spec.dropout_p > 0,
        PREC=_precision(q),
        BLOCK_D=BD,
        EVEN_D=BD == D,
    )
    return cu_q, cu_k, klen, mask_args, t5_args, flags


def _tiles(cfg) -> dict:
    BM, BN, warps, stages = cfg[:4]
    return dict(BLOCK_M=BM, BLOCK_N=BN, num_warps=warps, num_stages=stages)


def _tuned(
    kind: str,
    q,
    spec: AttnSpec,
    run: Callable[[tuple], None],
    dims,
    arch: int | None = None,
    tma: bool = False,
    extra: tuple = (),
) -> None:
    B, H, HK, Lq, Lk, D = dims
    t5 = spec.t5_table is not None
    size = q.element_size()
    mask = spec.mask is not None
    default = _blocks(D, kind, size, t5, arch, tma, dropout=spec.dropout_p > 0, mask=mask)
    if _pinned(kind) or _override(D, kind, size, t5) is not None:
        # a variant or configuration pinned by hand runs as pinned: no tuner, whose cached or remembered
        # choice for this shape class would replace it (and which must not remember the pin either)
        try:
            run(default)
        except _out_of_resources():
            run(_SAFE_CFG[kind])
        return
    _launch(
        tune_name(kind, D, t5),
        run,
        default,
        candidates(kind, D, size, t5, arch, tma, mask=mask),
        _shape_class(q, spec, B, H, Lq, Lk, D, extra),
        q.device,
        _SAFE_CFG[kind],
    )


def _torch_allocation(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_scratch_allocator() -> None:
    """Device-side tensor descriptors live in a per-launch scratch buffer that Triton asks an allocator
    for: give it torch's caching allocator unless the user has set one (per thread: autograd runs the
    backward in its own thread)."""
    import triton

    try:
        from triton.runtime._allocation import NullAllocator, _allocator

        if not isinstance(_allocator.get(), NullAllocator):
            return
    except ImportError:
        pass
    triton.set_allocator(_torch_allocation)


# ----------------------------------------------------------------------------------------------
# forward and backward
# ----------------------------------------------------------------------------------------------


@on_tensor_device
def attention_forward(q, k, v, spec: AttnSpec, out: torch.Tensor | None = None):
    """Fused forward. Returns (out like q, lse fp32: (2, B, H, Lq) dense or (2, H, Tq) varlen, log2 units:
    lse[0] each row's log-sum-exp, +inf for a row with no visible key (lse[1] unused); with a float mask
    lse[0] the row's max score and lse[1] log2 Σ exp2(s − max), which the backward takes apart).
    out: optional preallocated output (last dim contiguous)."""
    from . import attention as K

    dims = B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    o = torch.empty_like(q, memory_format=torch.contiguous_format) if out is None else out
    if spec.varlen:
        lse = torch.empty((2, H, q.shape[0]), device=q.device, dtype=torch.float32)
    else:
        lse = torch.empty((2, B, H, Lq), device=q.device, dtype=torch.float32)
    cu_q, cu_k, klen, mask_args, t5_args, flags = _common_args(q, spec, Lk, D)
    args = (
        q,
        k,
        v,
        o,
        lse,
        *_strides(q, spec),
        *_strides(k, spec),
        *_strides(v, spec),
        *_strides(o, spec),
        *_lse_strides(lse, spec),
        cu_q,
        cu_k,
        klen,
        *mask_args,
        *t5_args,
        spec.seed,
        spec.dropout_p,
        H,
        H // HK,
        Lq,
        Lk,
        D,
        spec.scale * LOG2E,
    )
    arch = _arch(q.device)
    tma_arch = _tma_arch(arch) and D <= 128
    aligned = all(_rows_16b_aligned(t) for t in (q, k, v, o))
    tma = tma_arch and aligned
    t5 = spec.t5_table is not None
    ws_ok = spec.mask is None and not t5

    def run(cfg):
        cfg = tuple(cfg)
        use_tma = is_tma(cfg) and tma and (cfg[4] == TMA_ONLY or ws_ok)
        if is_tma(cfg) and not use_tma:  # not for these tensors: the pointer build's own default
            cfg = _fwd_pointer_default(D, q.element_size() > 2, t5, spec.dropout_p > 0)
        if use_tma and not _interpreting() and not capturing():
            _ensure_scratch_allocator()
        # the warp-specialised loop is one loop that masks every tile when any tile needs it (a causal
        # call, per-sequence lengths, a key length that is not a multiple of the key block); Triton's
        # warp specialiser takes descriptor loads only, so a mask tensor or the T5 bias (gathered per
        # element) runs the TMA build without it
        ws = use_tma and cfg[4] == TMA_WS
        masked = bool(spec.causal or spec.klen is not None or spec.varlen or Lk % cfg[1])
        launch(
            Launch(
                K._attn_fwd_kernel,
                (_cdiv(max(Lq, 1), cfg[0]), B * H),
                args,
                dict(flags, TMA=use_tma, WS=ws, WS_MASKED=ws and masked, **_tiles(cfg)),
                "attention.fwd",
                cfg,
            )
        )

    _tuned("fwd", q, spec, run, dims, arch, tma, extra=("unaligned",) if tma_arch and not aligned else ())
    return o, lse


@on_tensor_device
def attention_backward(do, q, k, v, o, lse, spec: AttnSpec, need_dq: bool = True, need_dkdv: bool = True):
    """Fused backward. Returns (dq, dk, dv, dmask_full or None, dtable_partials or None).

    dmask_full: (B, H, Lq, Lk) fp32 = dS when spec.mask_grad; dtable_partials: (B, H, n_kblocks, NB_PAD)
    fp32 when spec.t5_grad (sum over dims 0 and 2, in any fixed order, gives dtable[:, h]).
    need_dq=False (and no mask gradient) computes no dQ and returns dq None; need_dkdv=False (and no
    T5 table gradient) computes no dK/dV and returns dk, dv None. With both: the five-GEMM kernel (or
    the seven-GEMM pair where tuning picked it); one of them: its own pass."""
    from . import attention as K

    dims = B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    # dO has whatever strides autograd gives it (a slice of a larger gradient, a broadcast); the op
    # layer checks q/k/v, not dO, against the kernels' int32 row offsets: copy it when its last dim is
    # not contiguous or its rows within one head span 2^31 elements (they would wrap in _bwd_tile)
    if do.stride(-1) != 1 or not _rows_fit_int32(do, spec, Lq):
        do = do.contiguous()
    cu_q, cu_k, klen, mask_args, t5_args, flags = _common_args(q, spec, Lk, D)

    # 1. Delta = rowsum(dO · O)
    delta = torch.empty_like(lse[0])
    BMd = 64 if not _interpreting() else 32
    launch(
        Launch(
            K._attn_bwd_delta_kernel,
            (_cdiv(max(Lq, 1), BMd), B * H),
            (o, do, delta, *_strides(o, spec), *_strides(do, spec), *_row_strides(delta, spec), cu_q, H, Lq, D),
            dict(IS_VARLEN=spec.varlen, BLOCK_M=BMd, BLOCK_D=flags["BLOCK_D"]),
            "attention.delta",
        )
    )

    want_kv = need_dkdv or spec.t5_grad
    if want_kv and need_dq:
        kind = "bwd"
    elif want_kv:
        kind = "dkdv"
    elif need_dq or spec.mask_grad:
        kind = "dq"
    else:
        return None, None, None, None, None
    common = (cu_q, cu_k, klen, mask_args, t5_args, flags)
    result: dict = {}

    def run(cfg):
        cfg = tuple(cfg)
        dm = torch.zeros((B, H, Lq, Lk), device=q.device, dtype=torch.float32) if spec.mask_grad else None
        dq = dk = dv = dt = None
        if kind == "dq":
            dq = _dq_pass(K, do, q, k, v, lse, delta, spec, dm, cfg, common)
        elif kind == "dkdv" or len(cfg) == 8:
            # dK/dV alone, or the first half of the seven-GEMM backward (its dQ pass writes the mask grad)
            dk, dv, dt = _kv_pass(
                K, do, q, k, v, lse, delta, spec, dm if kind == "dkdv" else None, cfg[:4], common, with_dq=False
            )
            if kind == "bwd":
                dq = _dq_pass(K, do, q, k, v, lse, delta, spec, dm, cfg[4:], common)
        else:
            dk, dv, dt, dq = _kv_pass(K, do, q, k, v, lse, delta, spec, dm, cfg, common, with_dq=True)
        result.update(dq=dq, dk=dk, dv=dv, dm=dm, dt=dt)

    _tuned(kind, q, spec, run, dims, _arch(q.device))
    return result["dq"], result["dk"], result["dv"], result["dm"], result["dt"]


def _kv_pass(K, do, q, k, v, lse, delta, spec, dm, cfg, common, with_dq: bool):
    """The key-stationary kernel: dK, dV, the T5 table partials, the float mask's dS (dm given) and,
    with_dq, dQ by ordered fp32 additions and the finishing pass. Returns (dk, dv, dt[, dq])."""
    cu_q, cu_k, klen, mask_args, t5_args, flags = common
    B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    BM, BN = cfg[0], cfg[1]
    n_kblk, n_qblk = _cdiv(max(Lk, 1), BN), _cdiv(max(Lq, 1), BM)
    zero_kv = spec.klen is not None  # keys past a per-batch length are never visited
    dk = (torch.zeros_like if zero_kv else torch.empty_like)(k, memory_format=torch.contiguous_format)
    dv = (torch.zeros_like if zero_kv else torch.empty_like)(v, memory_format=torch.contiguous_format)
    nb_pad = spec.t5_rel.zweights.shape[1] if spec.t5_grad else 1  # next power of two >= num_buckets
    dt = torch.zeros((B, H, n_kblk, nb_pad), device=q.device, dtype=torch.float32) if spec.t5_grad else None
    if with_dq:
        acc = torch.zeros(q.shape, device=q.device, dtype=torch.float32)  # contiguous, like dq below
        sem = torch.zeros(1 + B * H * n_qblk, device=q.device, dtype=torch.int32)  # [0]: the ticket counter
    else:
        acc = sem = q
    spin = not _interpreting()
    dt_strides = (dt.stride(0), dt.stride(1), dt.stride(2)) if dt is not None else (0, 0, 0)
    dm_strides = (dm.stride(0), dm.stride(1), dm.stride(2)) if dm is not None else (0, 0, 0)
    args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        dk,
        dv,
        acc,
        sem,
        dt if dt is not None else q,
        dm if dm is not None else q,
        *_strides(q, spec),
        *_strides(k, spec),
        *_strides(v, spec),
        *_strides(do, spec),
        *_lse_strides(lse, spec),
        *_strides(dk, spec),
        *_strides(dv, spec),
        *(_strides(acc, spec) if with_dq else (0, 0, 0)),
        *dt_strides,
        *dm_strides,
        cu_q,
        cu_k,
        klen,
        *mask_args,
        *t5_args,
        spec.seed,
        spec.dropout_p,
        H,
        HK,
        H // HK,
        Lq,
        Lk,
        D,
        spec.scale * LOG2E,
        spec.scale,
        n_kblk,
        n_qblk,
    )
    kwargs = dict(
        T5_GRAD=spec.t5_grad,
        NB_PAD=nb_pad,
        T5_NZ=spec.t5_rel.zpts.numel() if spec.t5_grad else 1,
        COMPUTE_DQ=with_dq,
        MASK_GRAD=dm is not None,
        SPIN=spin,
        **flags,
        **_tiles(cfg),
    )
    launch(
        Launch(
            K._attn_bwd_kernel, (n_kblk, B * HK), args, kwargs, "attention.bwd" if with_dq else "attention.dkdv", cfg
        )
    )
    if not with_dq:
        return dk, dv, dt
    if not spin and not capturing() and int(sem[1:].max()) >= 1 << 20:
        raise RuntimeError("attention backward: a dQ block was added out of key-block order")
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    n = dq.numel()
    BLOCK = 1024
    launch(
        Launch(
            K._dq_finish_kernel,
            (_cdiv(max(n, 1), BLOCK),),
            (acc, dq, n, spec.scale),
            dict(BLOCK=BLOCK),
            "attention.dq_finish",
        )
    )
    return dk, dv, dt, dq


def _dq_pass(K, do, q, k, v, lse, delta, spec, dm, cfg, common):
    """The query-stationary dQ kernel (recomputes S and dP: three GEMMs per tile), with the float mask's
    dS when dm is given."""
    cu_q, cu_k, klen, mask_args, t5_args, flags = common
    B, H, HK, Lq, Lk, D = _dims(q, k, spec)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dm_strides = (dm.stride(0), dm.stride(1), dm.stride(2)) if dm is not None else (0, 0, 0)
    args = (
        q,
        k,
        v,
        do,
        lse,
        delta,
        dq,
        dm if dm is not None else q,
        *_strides(q, spec),
        *_strides(k, spec),
        *_strides(v, spec),
        *_strides(do, spec),
        *_lse_strides(lse, spec),
        *_strides(dq, spec),
        *dm_strides,
        cu_q,
        cu_k,
        klen,
        *mask_args,
        *t5_args,
        spec.seed,
        spec.dropout_p,
        H,
        H // HK,
        Lq,
        Lk,
        D,
        spec.scale * LOG2E,
        spec.scale,
    )
    launch(
        Launch(
            K._attn_bwd_dq_kernel,
            (_cdiv(max(Lq, 1), cfg[0]), B * H),
            args,
            dict(MASK_GRAD=dm is not None, **flags, **_tiles(cfg)),
            "attention.dq",
            tuple(cfg),
        )
    )
    return dq


def dropout_keep_mask(B: int, H: int, Lq: int, Lk: int, seed: int, dropout_p: float, device) -> torch.Tensor:
    """The (B, H, Lq, Lk) bool keep-mask the dense kernels draw for this seed (debug / tests)."""
    from . import attention as K

    out = torch.empty((B, H, Lq, Lk), device=device, dtype=torch.int8)
    BM = BN = 32
    launch(
        Launch(
            K._dropout_mask_kernel,
            (_cdiv(max(Lq, 1), BM), _cdiv(max(Lk, 1), BN), B * H),
            (out, seed, H, Lq, Lk, dropout_p),
            dict(BLOCK_M=BM, BLOCK_N=BN),
            "attention.dropout_mask",
        )
    )
    return out.bool()
