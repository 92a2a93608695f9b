"""The attention kernels in the kernel registry: report configurations, gates, tuning candidates.

Read by `scripts/kernel_report.py` (and, through gate_results/attention.json, by the tuner). Each case
calls `attention_forward` / `attention_backward` on "meta" tensors shaped like a real call, so the
report compiles exactly the launches a call of that shape makes: forward, Delta, dK/dV and dQ.
"""
from __future__ import annotations

import dataclasses
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


@functools.lru_cache(maxsize=4)
def _t5_rel(bidirectional: bool):
    """T5's bucket tables for the default num_buckets=32, max_distance=128, built as the op builds
    them (the integer fields are kernel arguments, so their values matter), moved to "meta"."""
    from ..ops.t5_attention import relative_position_buckets  # the op's own construction

    rel = relative_position_buckets(bidirectional, 32, 128, "cpu")
    return dataclasses.replace(rel, bucket=rel.bucket.to("meta"), zpts=rel.zpts.to("meta"),
                               zweights=rel.zweights.to("meta"))


def _call(variant: str, dtype: torch.dtype, D: int) -> list:
    """The launches of one forward + backward of this variant (B=4, H=16, L=1024 unless the variant
    says otherwise), made by the real host code on meta tensors."""
    meta = dict(device="meta", dtype=dtype)
    Lq = 1000 if variant == "odd" else L
    HK = H // 4 if variant == "gqa" else H
    spec = AL.AttnSpec(scale=D ** -0.5)
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
    if variant == "mask":   # a general bool mask, broadcast over heads (as the op passes it: uint8 view)
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
        spec.t5_grad = True
    with capture_launches() as launches:
        out, lse = AL.attention_forward(q, k, v, spec)
        AL.attention_backward(torch.empty_like(out), q, k, v, out, lse, spec)
    return launches


def cases() -> list:
    """Every variant in bf16; fp16 (the same kernels with another MMA input type) for the plain, T5 and
    key-padding ones. Head dims 64 and 128."""
    out = []
    for dname, dtype in DTYPES.items():
        for D in (64, 128):
            for variant in (VARIANTS if dname == "bf16" else FP16_VARIANTS):
                out.append(Case(name=f"{variant} {dname} d{D}", launches=functools.partial(_call, variant, dtype, D),
                                dtype=dname, head_dim=D, variant=variant, ci_archs=CI_CASES.get((dname, D, variant), ())))
    return out


def candidates() -> list:
    """Every declared tuning candidate, built in the variants it is judged in (bf16)."""
    out = []
    for (name, dclass), cfgs in AL.CANDIDATES.items():
        t5 = name.startswith("t5")
        kind = name.removeprefix("t5")
        tune = AL.tune_name(kind, dclass, t5)
        for cfg in dict.fromkeys(cfgs):
            for variant in CANDIDATE_VARIANTS[t5]:
                def launches(tune=tune, cfg=cfg, variant=variant, D=dclass):
                    from .tuning import force_config

                    with force_config(tune, cfg):
                        return _call(variant, torch.bfloat16, D)

                case = Case(name=f"{variant} bf16 d{dclass} {tune} {','.join(map(str, cfg))}", launches=launches,
                            dtype="bf16", head_dim=dclass, variant=variant)
                out.append(Candidate(tune_name=tune, config=tuple(cfg), kernel=f"attention.{kind}", case=case))
    return out


def _main(kernel: str):
    return lambda row: row["kernel"] == kernel


def _loop_kernels(row) -> bool:
    return row["kernel"] in ("attention.fwd", "attention.dkdv", "attention.dq")


def _fwd_pipeline_bytes(row) -> int:
    """Shared memory the forward's own data needs: num_stages K and V tiles plus the Q tile."""
    BM, BN, _, stages = (int(x) for x in row["tiles"].split(","))
    BD = max(16, 1 << (row["head_dim"] - 1).bit_length())
    return (stages * 2 * BN + BM) * BD * 2


# Where the default tiles keep local memory out of every tile loop, with Triton 3.6 and 3.9 alike
# (bench/results/kernel_report_triton-*.md). The forward and dQ kernels: everywhere except these
# (kernel, variant, head dim, arch); the dK/dV kernel: only in these (variant, head dim, arch).
LOOP_SPILLS_TODAY = {
    ("attention.fwd", "dropout", 64, "sm_80"), ("attention.fwd", "dropout", 128, "sm_80"),
    ("attention.fwd", "causal", 128, "sm_80"),
    ("attention.fwd", "t5", 128, "sm_80"), ("attention.fwd", "t5", 128, "sm_90"),
    ("attention.fwd", "t5dec", 128, "sm_80"), ("attention.fwd", "t5dec", 128, "sm_90"),
    ("attention.dq", "t5", 64, "sm_80"), ("attention.dq", "t5dec", 64, "sm_80"),
    ("attention.dq", "dropout", 128, "sm_80"),
}
DKDV_LOOP_CLEAN_TODAY = {
    ("t5", 64, "sm_90"), ("t5dec", 64, "sm_90"),
    ("plain", 128, "sm_80"), ("causal", 128, "sm_80"), ("klen", 128, "sm_80"), ("fmask", 128, "sm_80"),
}


def _loop_clean_today(row) -> bool:
    key = (row["variant"], row["head_dim"], row["arch"])
    if row.get("candidate"):
        return _loop_kernels(row)  # a tuning candidate must be clean wherever it is judged
    if row["kernel"] == "attention.dkdv":
        return key in DKDV_LOOP_CLEAN_TODAY
    return row["kernel"] in ("attention.fwd", "attention.dq") and (row["kernel"], *key) not in LOOP_SPILLS_TODAY


GATES = (
    Gate("fits", "the build fits the GPU: at least one block per SM (registers, shared memory)",
         lambda r: (r["blocks_per_sm"] or 0) >= 1, candidates=True),
    Gate("no-loop-local-mem", "no local-memory load or store inside a tile loop (no spill traffic in the main "
         "loop): forward and dQ except LOOP_SPILLS_TODAY, dK/dV in DKDV_LOOP_CLEAN_TODAY, every tuning candidate",
         lambda r: r["loop_local_mem_ops"] == 0, _loop_clean_today, candidates=True),
    Gate("tensor-cores", "every tile loop runs its GEMMs on the tensor cores (HMMA / HGMMA in the loop)",
         lambda r: r["mma_instructions_per_tile"] > 0, _loop_kernels),
    Gate("gemms-per-tile", "GEMMs per tile: forward 2, dK/dV 4, dQ 3 (the 7-GEMM backward)",
         lambda r: r["gemms_per_tile"] == {"attention.fwd": 2, "attention.dkdv": 4, "attention.dq": 3}[r["kernel"]],
         _loop_kernels),
    Gate("async-copies", "the tiles of every tile loop arrive by asynchronous copies (cp.async, or TMA)",
         lambda r: r["async_copies"] + r["tma_loads"] > 0, _loop_kernels),
    Gate("fwd-shared-is-the-pipeline", "the forward's shared memory is its K/V pipeline and Q tile (at most 1.5x "
         "that): the T5 near-tile gather is not staged through shared memory",
         lambda r: r["shared_bytes"] <= 1.5 * _fwd_pipeline_bytes(r), _main("attention.fwd")),
    Gate("one-ex2", "the forward's softmax takes one exp2 per score (plus one per row for the rescale); the T5 "
         "forward recomputes P for its row sums and takes two",
         lambda r: r["ex2_per_element"] is not None and r["ex2_per_element"] <= 1.1,
         lambda r: r["kernel"] == "attention.fwd" and not r["variant"].startswith("t5")),
)

FAMILY = Family(name="attention", cases=cases, gates=GATES, candidates=candidates)
