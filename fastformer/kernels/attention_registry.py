"""The attention kernels in the kernel registry: report configurations, gates, tuning candidates.

Read by `scripts/kernel_report.py` (and, through gate_results/attention.json, by the tuner). Each case
calls `attention_forward` / `attention_backward` on "meta" tensors shaped like a real call, so the
report compiles exactly the launches a call of that shape makes: the forward, Delta, the five-GEMM
backward and its dQ finishing pass (or, for the seven-GEMM candidates, the dK/dV and dQ passes). The
report captures each case once per GPU generation (`launch.for_arch`): on sm_90 the forward is the
TMA build.
"""

from __future__ import annotations

import functools

import torch

from . import attention_launch as AL
from .launch import capture_launches
from .registry import Candidate, Case, Family, Gate

B, H, L = 4, 16, 1024
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# plain: no mask; causal; klen: per-batch key lengths (the key-padding fast path); varlen: packed
# sequences; mask: a general bool mask; fmask: a float mask with its gradient; dropout; t5: T5 bias
# (bidirectional buckets) with the table's gradient; t5dec: the T5 decoder (causal, unidirectional
# buckets, key lengths); gqa: 4 query heads per key head; odd: L = 1000 (lengths not divisible by 16)
VARIANTS = ("plain", "causal", "klen", "varlen", "mask", "fmask", "dropout", "t5", "t5dec", "gqa", "odd")
FP16_VARIANTS = ("plain", "klen", "t5")
# each tuning candidate is judged in these variants (bf16): it must pass the candidate gates in all
CANDIDATE_VARIANTS = {False: ("plain", "causal"), True: ("t5",)}
# the representative set `make test` builds (about a dozen compiles): the plain d128 kernels and the
# T5 kernels on Hopper, the key-padding path in fp16 on Ampere
CI_CASES = {("bf16", 128, "plain"): (90,), ("bf16", 64, "t5"): (90,), ("fp16", 64, "klen"): (80,)}


# The integer facts of T5's bucket function for the default num_buckets=32, max_distance=128, as the op
# builds them (ops/t5_attention.relative_position_buckets; tests/kernels/test_kernel_report.py checks
# that they agree): the integers are kernel arguments, so their values decide the specialisation.
# (radius, sat_left, sat_right, bucket_left, bucket_right, number of change points padded, buckets padded)
T5_DEFAULT_FACTS = {True: (128, 91, 91, 15, 31, 32, 32), False: (128, 113, 1, 31, 0, 32, 32)}


@functools.lru_cache(maxsize=4)
def _t5_rel(bidirectional: bool):
    """T5's bucket tables for the default configuration as "meta" tensors (nothing runs on them)."""
    radius, sat_left, sat_right, bucket_left, bucket_right, nz, nb_pad = T5_DEFAULT_FACTS[bidirectional]
    meta = dict(device="meta")
    return AL.T5RelPos(
        bucket=torch.empty(2 * radius + 1, dtype=torch.int32, **meta),
        radius=radius,
        sat_left=sat_left,
        sat_right=sat_right,
        bucket_left=bucket_left,
        bucket_right=bucket_right,
        zpts=torch.empty(nz, dtype=torch.int32, **meta),
        zweights=torch.empty(nz, nb_pad, dtype=torch.float32, **meta),
    )


def _call(variant: str, dtype: torch.dtype, D: int, needs: str = "all") -> list:
    """The launches of one forward + backward of this variant (B=4, H=16, L=1024 unless the variant
    says otherwise), made by the real host code on meta tensors. needs: which gradients the backward
    computes ("all"; "kv": dK/dV only; "q": dQ only, with a T5 table that needs no gradient), which
    decides the backward's kernels."""
    meta = dict(device="meta", dtype=dtype)
    Lq = 1000 if variant == "odd" else L
    HK = H // 4 if variant == "gqa" else H
    spec = AL.AttnSpec(scale=D**-0.5)
    if variant == "varlen":
        q = torch.empty(B * Lq, H, D, **meta)
        k = v = torch.empty(B * Lq, HK, D, **meta)
        spec.cu_q = spec.cu_k = torch.empty(B + 1, device="meta", dtype=torch.int32)
        spec.max_q = spec.max_k = Lq
    else:
        q = torch.empty(B, H, Lq, D, **meta)
        k = v = torch.empty(B, HK, Lq, D, **meta)
    if variant in ("causal", "t5dec"):
        spec.causal = True
    if variant in ("klen", "t5dec"):
        spec.klen = torch.empty(B, device="meta", dtype=torch.int32)
    if variant == "mask":  # a general bool mask, broadcast over heads (as the op passes it: uint8 view)
        spec.mask = torch.empty(B, 1, Lq, Lq, device="meta", dtype=torch.uint8).expand(B, H, Lq, Lq)
    if variant == "fmask":  # a float mask that receives a gradient
        spec.mask = torch.empty(B, 1, Lq, Lq, **meta).expand(B, H, Lq, Lq)
        spec.mask_grad = True
    if variant == "dropout":
        spec.dropout_p, spec.seed = 0.1, 1234567
    if variant in ("t5", "t5dec"):
        spec.scale = 1.0
        spec.t5_table = torch.empty(32, H, device="meta", dtype=torch.float32)
        spec.t5_rel = _t5_rel(variant == "t5")
        spec.t5_grad = needs != "q"  # dQ alone: a frozen table (with its gradient, the key pass runs too)
    with capture_launches() as launches:
        out, lse = AL.attention_forward(q, k, v, spec)
        AL.attention_backward(
            torch.empty_like(out),
            q,
            k,
            v,
            out,
            lse,
            spec,
            need_dq=needs in ("all", "q"),
            need_dkdv=needs in ("all", "kv"),
        )
    return launches


def cases() -> list:
    """Every variant in bf16; fp16 (the same kernels with another MMA input type) for the plain, T5 and
    key-padding ones. Head dims 64 and 128."""
    out = []
    for dname, dtype in DTYPES.items():
        for D in (64, 128):
            for variant in VARIANTS if dname == "bf16" else FP16_VARIANTS:
                out.append(
                    Case(
                        name=f"{variant} {dname} d{D}",
                        launches=functools.partial(_call, variant, dtype, D),
                        dtype=dname,
                        head_dim=D,
                        variant=variant,
                        ci_archs=CI_CASES.get((dname, D, variant), ()),
                    )
                )
    return out


def candidates() -> list:
    """Every declared tuning candidate, built in the variants it is judged in (bf16). A forward TMA
    candidate is built for sm_90 only (it runs on compute capability 9.x and newer); a seven-GEMM
    backward candidate is judged on both of its kernels."""
    out = []
    for (name, dclass), cfgs in AL.CANDIDATES.items():
        t5 = name.startswith("t5")
        kind = name.removeprefix("t5")
        tune = AL.tune_name(kind, dclass, t5)
        needs = {"dkdv": "kv", "dq": "q"}.get(kind, "all")
        for cfg in dict.fromkeys(cfgs):
            judged = ("attention.dkdv", "attention.dq") if kind == "bwd" and len(cfg) == 8 else (f"attention.{kind}",)
            archs = (90,) if AL.is_tma(cfg) else (90, 80)
            for variant in CANDIDATE_VARIANTS[t5]:

                def launches(tune=tune, cfg=cfg, variant=variant, D=dclass, needs=needs):
                    from .tuning import force_config

                    with force_config(tune, cfg):
                        return _call(variant, torch.bfloat16, D, needs)

                case = Case(
                    name=f"{variant} bf16 d{dclass} {tune} {','.join(map(str, cfg))}",
                    launches=launches,
                    dtype="bf16",
                    head_dim=dclass,
                    variant=variant,
                    archs=archs,
                )
                out.append(Candidate(tune_name=tune, config=tuple(cfg), kernels=judged, case=case))
    return out


LOOP_KERNELS = ("attention.fwd", "attention.bwd", "attention.dkdv", "attention.dq")
GEMMS = {"attention.fwd": 2, "attention.bwd": 5, "attention.dkdv": 4, "attention.dq": 3}


def _main(kernel: str):
    return lambda row: row["kernel"] == kernel


def _ex2_bound(row) -> float:
    """exp2 per score element of a forward that exponentiates each score once and rescales each row once
    per key block (rounding slack 0.01)."""
    block_n = int(row["tiles"].split(",")[1])
    return 1.0 + 4.0 / block_n + 0.01


def _loop_kernels(row) -> bool:
    return row["kernel"] in LOOP_KERNELS


def _fwd_pipeline_bytes(row) -> int:
    """Shared memory the forward's own data needs: num_stages K and V tiles plus the Q tile (and, for
    the TMA build, the output tile its store is staged through)."""
    BM, BN, _, stages = (int(x) for x in row["tiles"].split(",")[:4])
    BD = max(16, 1 << (row["head_dim"] - 1).bit_length())
    tma = len(row["tiles"].split(",")) == 5
    return (stages * 2 * BN + BM * (2 if tma else 1)) * BD * 2


# Variants whose Hopper forward is warp specialised: Triton's warp specialiser takes descriptor loads
# only, so a mask tensor read per tile or the T5 bias gathered per element keeps the pointer build
# (with Triton 3.6 and 3.9: "unsupported load type for producer commit").
WS_VARIANTS = ("plain", "causal", "klen", "varlen", "dropout", "gqa", "odd")

GATES = (
    Gate(
        "fits",
        "the build fits the GPU: at least one block per SM (registers, shared memory)",
        lambda r: (r["blocks_per_sm"] or 0) >= 1,
        candidates=True,
    ),
    Gate(
        "no-loop-local-mem",
        "no local-memory load or store inside a tile loop (no spill traffic in the main "
        "loop): every forward, backward, dK/dV and dQ build, every tuning candidate",
        lambda r: r["loop_local_mem_ops"] == 0,
        _loop_kernels,
        candidates=True,
    ),
    Gate(
        "tensor-cores",
        "every tile loop runs its GEMMs on the tensor cores (HMMA / HGMMA in the loop)",
        lambda r: r["mma_instructions_per_tile"] > 0,
        _loop_kernels,
    ),
    Gate(
        "gemms-per-tile",
        "GEMMs per tile: forward 2, backward 5 (dQ accumulated, not recomputed); the dK/dV-only "
        "pass 4 and the dQ-only pass 3 (together the seven-GEMM backward)",
        lambda r: r["gemms_per_tile"] == GEMMS[r["kernel"]],
        _loop_kernels,
    ),
    Gate(
        "async-copies",
        "the tiles of every tile loop arrive by asynchronous copies (cp.async, or TMA)",
        lambda r: r["async_copies"] + r["tma_loads"] > 0,
        _loop_kernels,
    ),
    Gate(
        "hopper-fwd-tma-ws",
        "the Hopper forward loads its tiles with TMA and its key loop is warp specialised "
        "(except a mask tensor or the T5 bias: WS_VARIANTS)",
        lambda r: r["tma_loads"] > 0 and r["warp_specialized"],
        lambda r: r["kernel"] == "attention.fwd" and r["arch"] == "sm_90" and r["variant"] in WS_VARIANTS,
    ),
    Gate(
        "fwd-shared-is-the-pipeline",
        "the forward's shared memory is its K/V pipeline, Q tile and (TMA) output "
        "staging (at most 1.5x that): the T5 near-tile gather is not staged through shared memory",
        lambda r: r["shared_bytes"] <= 1.5 * _fwd_pipeline_bytes(r),
        _main("attention.fwd"),
    ),
    Gate(
        "one-ex2",
        "the forward's softmax takes one exp2 per score plus one per row for the rescale: a thread "
        "holds BLOCK_N / 4 scores of each of its rows in the MMA layout, so at most 1 + 4 / BLOCK_N per score",
        lambda r: r["ex2_per_element"] is not None and r["ex2_per_element"] <= _ex2_bound(r),
        lambda r: r["kernel"] == "attention.fwd" and not r["variant"].startswith("t5"),
    ),
)

FAMILY = Family(name="attention", cases=cases, gates=GATES, candidates=candidates)
