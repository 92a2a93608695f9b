"""The cross-entropy kernels in the kernel registry: report configurations, gates, tuning candidates.

Each case calls `ce_forward` / `scale_rows_` (cross_entropy_launch.py) on "meta" tensors shaped like
a real call (16384 rows), so the report compiles exactly what a call of that shape launches.
"""

from __future__ import annotations

import functools

import torch

from . import cross_entropy_launch as CL
from .launch import capture_launches
from .registry import Candidate, Case, Family, Gate

ROWS = 16384
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# plain: class indices, "mean", the gradient in the forward (a language model's loss); smooth: label
# smoothing 0.1 and z-loss; weight: class weights; soft: fp32 class probabilities; none: per-row
# factor folded in (linear cross-entropy's "none" backward); kdim: (N, V, L) logits, class dim strided
VARIANTS = ("plain", "smooth", "weight", "soft", "none", "kdim")
# where the gates hold: bf16 and fp32, V = 32768 and 131072, all four in `make test` for sm_90
GATED = [(d, V) for d in ("bf16", "fp32") for V in (32768, 131072)]
# the rest of the representative set `make test` builds: each variant's kernel once, the legacy kernel,
# the scaling kernel, fp16, and sm_80
CI_CASES = {
    "smooth bf16 V32768": (80,),
    "weight bf16 V32768": (90,),
    "soft bf16 V131072": (90,),
    "none bf16 V32768": (90,),
    "kdim bf16 V131072": (90,),
    "legacy bf16 V131072": (90,),
    "plain fp16 V32768": (90,),
    "scale bf16 V131072": (90,),
}


def _call(variant: str, dtype: torch.dtype, V: int, config=None) -> list:
    """The launches of one forward (with the gradient) of this variant, made by the real host code
    on meta tensors; config: force this configuration (tuning candidates)."""
    meta = dict(device="meta")
    N = ROWS
    if variant == "kdim":
        x = torch.empty(N // 64, V, 64, dtype=dtype, **meta)
        t = torch.empty(N, dtype=torch.int64, **meta)
    else:
        x = torch.empty(N, V, dtype=dtype, **meta)
        t = (
            torch.empty(N, V, dtype=torch.float32, **meta)
            if variant == "soft"
            else torch.empty(N, dtype=torch.int64, **meta)
        )
    kw = {}
    if variant != "none":
        kw["count"] = torch.empty((), dtype=torch.int64, **meta)
    if variant == "smooth":
        kw.update(label_smoothing=0.1, z_loss=1e-4)
    if variant == "weight":
        kw.update(
            weight=torch.empty(V, dtype=torch.float32, **meta),
            weight_den=torch.empty((), dtype=torch.float32, **meta),
            label_smoothing=0.1,
        )
    if variant == "none":
        kw["gscale"] = torch.empty(N, dtype=torch.float32, **meta)
    with capture_launches() as launches:
        if config is None:
            CL.ce_forward(x, t, grad=torch.empty_like(x), **kw)
        else:
            from .tuning import force_config

            with force_config(CL.TUNE_NAME, config):
                CL.ce_forward(x, t, grad=torch.empty_like(x), **kw)
    return launches


def _scale_call(dtype: torch.dtype, V: int) -> list:
    x = torch.empty(ROWS, V, dtype=dtype, device="meta")
    with capture_launches() as launches:
        CL.scale_rows_(x, torch.empty(ROWS, dtype=torch.float32, device="meta"))
    return launches


def cases() -> list:
    out = []
    for dname, V in GATED + [("bf16", 8192), ("bf16", 50257), ("fp32", 16384), ("fp16", 32768)]:
        name = f"plain {dname} V{V}"
        out.append(
            Case(
                name=name,
                launches=functools.partial(_call, "plain", DTYPES[dname], V),
                dtype=dname,
                head_dim=0,
                variant="plain",
                ci_archs=(90,) if (dname, V) in GATED else CI_CASES.get(name, ()),
            )
        )
    for variant in VARIANTS[1:]:
        for V in (32768, 131072):
            name = f"{variant} bf16 V{V}"
            out.append(
                Case(
                    name=name,
                    launches=functools.partial(_call, variant, torch.bfloat16, V),
                    dtype="bf16",
                    head_dim=0,
                    variant=variant,
                    ci_archs=CI_CASES.get(name, ()),
                )
            )
    for V in (32768, 131072):
        name = f"legacy bf16 V{V}"
        out.append(
            Case(
                name=name,
                dtype="bf16",
                head_dim=0,
                variant="legacy",
                ci_archs=CI_CASES.get(name, ()),
                launches=functools.partial(_call, "plain", torch.bfloat16, V, CL.LEGACY),
            )
        )
    name = "scale bf16 V131072"
    out.append(
        Case(
            name=name,
            launches=functools.partial(_scale_call, torch.bfloat16, 131072),
            dtype="bf16",
            head_dim=0,
            variant="scale",
            ci_archs=CI_CASES.get(name, ()),
        )
    )
    return out


def _judged_at(cfg: tuple) -> list:
    """(dtype, V) a candidate is built in: the rows it is meant for, at their largest."""
    if cfg[0] == 1:
        return [("bf16", 32768), ("fp32", 32768)]
    if cfg[0] == 2:
        return [("bf16", 131072), ("fp32", 131072)]
    return GATED


def candidates() -> list:
    """Every declared tuning candidate, and the legacy kernel, built where it would be timed."""
    cfgs = [CL.LEGACY, *CL.ONE_BLOCK_CANDIDATES, *CL.STREAM_CANDIDATES]
    out = []
    for cfg in dict.fromkeys(cfgs):
        for dname, V in _judged_at(cfg):
            case = Case(
                name=f"plain {dname} V{V} {CL.TUNE_NAME} {','.join(map(str, cfg))}",
                dtype=dname,
                head_dim=0,
                variant="legacy" if cfg == CL.LEGACY else "plain",
                launches=functools.partial(_call, "plain", DTYPES[dname], V, cfg),
            )
            out.append(Candidate(tune_name=CL.TUNE_NAME, config=tuple(cfg), kernels=(CL.TUNE_NAME,), case=case))
    return out


def _new_kernel(row) -> bool:
    """A build of the persistent kernel (not the legacy kernel, not the scale kernel)."""
    return row["kernel"] == CL.TUNE_NAME and not row["tiles"].startswith("0,")


def _gated(row) -> bool:
    """Where the gates apply: the plain rows, bf16 and fp32, V = 32768 and 131072, every
    tuning candidate of the persistent kernel."""
    if not _new_kernel(row):
        return False
    if row.get("candidate"):
        return True
    return row["variant"] == "plain" and any(row["config"] == f"plain {d} V{V}" for d, V in GATED)


GATES = (
    Gate(
        "fits",
        "the build fits the GPU: at least one block per SM (registers, shared memory)",
        lambda r: (r["blocks_per_sm"] or 0) >= 1,
        candidates=True,
    ),
    Gate(
        "ce-no-loop-local-mem",
        "no local-memory load or store in the persistent row loop (nor in the block "
        "loops inside it): plain rows of bf16 and fp32, V = 32768 and 131072, and every tuning candidate of "
        "the persistent kernel",
        lambda r: r["loop_local_mem_ops"] == 0,
        _gated,
        candidates=True,
    ),
    Gate(
        "ce-one-ex2",
        "one exp2 per element in each loop over a row's elements (the row loop of a row kept "
        "on chip; each pass of a streamed row): every build of the persistent kernel",
        lambda r: r["ex2_per_element"] == 1.0,
        lambda r: _new_kernel(r) and not r.get("candidate"),
    ),
    Gate(
        "ce-async-copies",
        "the row loop's loads are asynchronous copies (cp.async or TMA) while the previous "
        "row or block is reduced: plain rows of bf16 and fp32, V = 32768 and 131072",
        lambda r: r["loop_async_copies"] + r["loop_tma_loads"] > 0,
        lambda r: _gated(r) and not r.get("candidate"),
    ),
)

FAMILY = Family(name="cross_entropy", cases=cases, gates=GATES, candidates=candidates)
