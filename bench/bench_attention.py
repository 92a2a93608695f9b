"""Attention benchmark: fastformer's fused kernels vs torch SDPA (each backend), FlexAttention, eager.

    python bench/bench_attention.py [--full]

Shapes as FlashAttention reports them: hidden 2048 (d64 × 32 heads, d128 × 16 heads), batch = 16384 / L,
causal and not; a padded BERT batch (L = 512, lengths uniform in 64..512; SDPA gets the same bool mask,
fastformer takes its key-length fast path, plus its varlen op on the packed tokens); a cross-attention
shape; a T5-bias case (H = 12, D = 64, L = 1024, table requiring grad) next to plain fastformer attention.
FLOPs: forward 4·B·H·Lq·Lk·D (halved when causal; padded batch: Σ_b len_b² instead of B·L²),
backward 2.5× forward. bwd ms = (fwd+bwd ms) − (fwd ms). On CPU it runs tiny shapes through
fastformer(cpu) (what fastformer runs for CPU tensors: torch's fused CPU SDPA where it applies), torch's
default SDPA, its math backend and the eager spec (the Triton interpreter is never timed). On a GPU
the dense cases also run the kernel variants with their built-in configurations: fastformer-tma-5gemm
(the Hopper default: TMA forward, five-GEMM backward), fastformer-pointer-5gemm, fastformer-pointer-7gemm
(the earlier design); the summary's tma5_over_pointer7 ratios compare the first with the last.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attention_summary import summary as _summary
from harness import format_table, main, save, time_ms

import fastformer as ff
from fastformer.kernels import tuning
from fastformer.reference.attention import sdpa_reference
from fastformer.reference.t5_attention import t5_bias


def _sdpa(backend):
    """torch's SDPA pinned to one backend ("default": torch's own choice, no pinning)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if backend == "default":

        def default(q, k, v, mask=None, causal=False, bias=None):
            m = bias if bias is not None else mask
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and m is None)

        return default
    be = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[backend]

    def fn(q, k, v, mask=None, causal=False, bias=None):
        m = bias if bias is not None else mask
        with sdpa_kernel(be):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal and m is None)

    return fn


_flex_compiled = None


def _flex(q, k, v, mask=None, causal=False, bias=None, lengths=None):
    global _flex_compiled
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    block_mask = None
    if causal:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, Lq, Lk, device=q.device)
    elif lengths is not None:
        block_mask = create_block_mask(lambda b, h, i, j: j < lengths[b], B, None, Lq, Lk, device=q.device)
    score_mod = None
    if bias is not None:

        def score_mod(score, b, h, i, j):
            return score + bias[0, h, i, j]

    return _flex_compiled(q, k, v, score_mod=score_mod, block_mask=block_mask)


def _eager(q, k, v, mask=None, causal=False, bias=None):
    return sdpa_reference(q, k, v, attn_mask=mask, is_causal=causal, bias=bias)


def _measure(fn, inputs, flops_fwd, device):
    """fwd ms, fwd+bwd ms and TFLOP/s of fn(*inputs) (inputs that require grad get gradients)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    out = fn()
    dout = torch.randn_like(out)

    def fwd():
        with torch.no_grad():
            fn()

    def fwdbwd():
        o = fn()
        torch.autograd.grad(o, leaves, dout)

    ms_f = time_ms(fwd, device=device)
    ms_fb = time_ms(fwdbwd, device=device)
    ms_b = max(ms_fb - ms_f, 1e-9)
    return {
        "fwd_ms": ms_f,
        "bwd_ms": ms_b,
        "fwdbwd_ms": ms_fb,
        "fwd_tflops": flops_fwd / ms_f * 1e-9,
        "bwd_tflops": 2.5 * flops_fwd / ms_b * 1e-9,
        "fwdbwd_tflops": 3.5 * flops_fwd / ms_fb * 1e-9,
    }


def _cases(quick: bool, cuda: bool):
    if not cuda:  # tiny shapes, eager providers only
        return [dict(kind="dense", B=2, H=2, L=128, D=64, causal=c) for c in (False, True)] + [
            dict(kind="padded", B=4, H=2, L=128, D=64, causal=False),
            dict(kind="cross", B=2, H=2, L=64, Lk=256, D=64, causal=False),
            dict(kind="t5", B=2, H=2, L=128, D=64, causal=False),
        ]
    if quick:  # the decisive shapes, in as few compiled variants as a short GPU run allows
        return [
            dict(kind="dense", B=4, H=16, L=4096, D=128, causal=False),
            dict(kind="dense", B=16, H=32, L=1024, D=64, causal=False),
            dict(kind="dense", B=4, H=16, L=4096, D=128, causal=True),
            dict(kind="padded", B=32, H=16, L=512, D=64, causal=False),
            dict(kind="t5", B=16, H=12, L=1024, D=64, causal=False),
        ]
    dense = []
    for D, H in ((64, 32), (128, 16)):
        for L in (512, 1024, 2048, 4096, 8192, 16384):
            for c in (False, True):
                dense.append(dict(kind="dense", B=max(1, 16384 // L), H=H, L=L, D=D, causal=c))
    return dense + [
        dict(kind="padded", B=32, H=16, L=512, D=64, causal=False),
        dict(kind="cross", B=8, H=16, L=512, Lk=4096, D=128, causal=False),
        dict(kind="t5", B=16, H=12, L=1024, D=64, causal=False),
    ]


def _providers(case, cuda, quick=False):
    if not cuda:
        # fastformer(cpu): what ff.scaled_dot_product_attention runs for CPU tensors (backend "auto":
        # torch's fused CPU SDPA where it applies, else the eager spec), next to torch's default SDPA
        provs = {CPU_PROVIDER: None}
        if case["kind"] == "t5":
            provs["fastformer-t5"] = None
        return dict(provs, **{"sdpa-default": _sdpa("default"), "sdpa-math": _sdpa("math"), "eager": _eager})
    # fastformer: tile configs tuned at first use (kernels/tuning.py); fastformer-default: the built-in ones;
    # the kernel variants with their built-in configurations (attention_launch.use_variants), so one run
    # compares the TMA forward and five-GEMM backward with the pointer forward and seven-GEMM backward
    provs = {"fastformer": None}
    if case["kind"] == "dense":
        provs["fastformer-default"] = None
        provs.update({f"fastformer-{f}-{b}": None for f, b in VARIANT_PROVIDERS})
    if case["kind"] == "padded":
        provs["fastformer-varlen"] = None
    if case["kind"] == "t5":
        provs["fastformer-t5"] = None
    for be in ("flash", "efficient", "cudnn"):
        provs["sdpa-" + be] = _sdpa(be)
    small = case["L"] * case.get("Lk", case["L"]) <= 1024 * 1024
    if small:
        provs["sdpa-math"] = _sdpa("math")
        provs["eager"] = _eager
    # FlexAttention compiles per shape (tens of seconds): full sweeps only
    if not quick:
        provs["flex"] = _flex
    return provs


CPU_PROVIDER = "fastformer(cpu)"
VARIANT_PROVIDERS = (("tma", "5gemm"), ("pointer", "5gemm"), ("pointer", "7gemm"))


@contextlib.contextmanager
def _pinned(prov: str):
    """The kernels a provider runs: the built-in configurations (FASTFORMER_TUNE=0, which every thread
    reads, autograd's backward thread included) and, for fastformer-<fwd>-<bwd>, those variants."""
    from fastformer.kernels import attention_launch as AL

    if prov != "fastformer-default" and prov.count("-") != 2:
        yield
        return
    old = os.environ.get(tuning.TUNE_ENV)
    os.environ[tuning.TUNE_ENV] = "0"
    try:
        if prov == "fastformer-default":
            yield
        else:
            _, fwd, bwd = prov.split("-")
            with AL.use_variants(fwd=fwd, bwd=bwd):
                yield
    finally:
        if old is None:
            os.environ.pop(tuning.TUNE_ENV, None)
        else:
            os.environ[tuning.TUNE_ENV] = old


def _run_case(case, device, dtype, quick=False):
    B, H, L, D, causal = case["B"], case["H"], case["L"], case["D"], case["causal"]
    Lk = case.get("Lk", L)
    cuda = device.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).to(device, dtype).requires_grad_()
    k = torch.randn(B, H, Lk, D, generator=g).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, Lk, D, generator=g).to(device, dtype).requires_grad_()
    mask = lengths = table = None
    flops = 4.0 * B * H * L * Lk * D * (0.5 if causal else 1.0)
    name = f"{case['kind']} B{B} H{H} L{L}" + (f" Lk{Lk}" if Lk != L else "") + f" d{D}" + (" causal" if causal else "")
    if case["kind"] == "padded":
        lengths = torch.randint(64, L + 1, (B,), generator=g).to(device)
        mask = (torch.arange(L, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        flops = 4.0 * H * D * float((lengths.double() ** 2).sum())
    if case["kind"] == "t5":
        table = torch.randn(32, H, generator=g).to(device, torch.float32).requires_grad_()
    rows = []
    for prov, fn in _providers(case, cuda, quick).items():
        row = {
            "benchmark": "attention",
            "case": name,
            "provider": prov,
            "L": L,
            "D": D,
            "causal": causal,
            "kind": case["kind"],
        }
        try:
            if prov in ("fastformer", CPU_PROVIDER, "fastformer-default") or prov.count("-") == 2:
                f = lambda: ff.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
                inputs = (q, k, v)
            elif prov == "fastformer-varlen":
                keep = mask[:, 0, 0, :]
                qp, kp, vp = (t.detach().transpose(1, 2)[keep].requires_grad_() for t in (q, k, v))
                cu = torch.zeros(B + 1, dtype=torch.int32, device=device)
                cu[1:] = lengths.cumsum(0)
                f = lambda: ff.varlen_attention(qp, kp, vp, cu, cu, L, L)
                inputs = (qp, kp, vp)
            elif prov == "fastformer-t5":
                f = lambda: ff.t5_attention(q, k, v, table, scale=1.0 / math.sqrt(D))
                inputs = (q, k, v, table)
            elif case["kind"] == "t5":
                # references get the materialised (1, H, L, L) bias built from the table each call
                def f(fn=fn):
                    return fn(q, k, v, bias=t5_bias(table, L, Lk).to(dtype))

                inputs = (q, k, v, table)
            elif prov == "flex" and case["kind"] == "padded":
                f = lambda fn=fn: fn(q, k, v, lengths=lengths)
                inputs = (q, k, v)
            else:
                f = lambda fn=fn: fn(q, k, v, mask=mask, causal=causal)
                inputs = (q, k, v)
            with _pinned(prov):
                row.update(_measure(f, inputs, flops, device))
        except Exception as exc:  # noqa: BLE001 - one provider failing must not lose the table
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
        rows.append(row)
    return rows


def _save(rows: list[dict], out_dir, device) -> list[dict]:
    """Write the measured rows with their summary, and the dense cases' plot; returns the summary."""
    summary = _summary(rows)
    save("attention", rows + [dict(r, summary=True) for r in summary], out_dir=out_dir, device=device)
    dense = [r for r in rows if r["kind"] == "dense" and r.get("fwdbwd_tflops") is not None]
    if dense:
        save(
            "attention_dense",
            dense,
            out_dir=out_dir,
            device=device,
            x="L",
            y="fwdbwd_tflops",
            series=("provider", "D", "causal"),
            logx=True,
            title="attention fwd+bwd TFLOP/s (dense)",
        )
    return summary


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    rows = []
    for case in _cases(quick, cuda):
        rows += _run_case(case, device, dtype, quick)
        torch.cuda.empty_cache() if cuda else None
        # after every case: a run cut short by its time limit keeps the cases it finished
        summary = _save(rows, out_dir, device)
    print(format_table(rows, ["case", "provider", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops", "fwdbwd_ms", "error"]))
    print(
        format_table(
            summary,
            [
                "case",
                "fastformer_provider",
                "fwd_tflops",
                "best_ref",
                "best_ref_fwdbwd_tflops",
                "ratio_fwdbwd",
                "ratio_fwd",
                "t5_over_plain_fwdbwd",
                "tma5_over_pointer7_fwdbwd",
            ],
        )
    )
    return summary


if __name__ == "__main__":
    main(run, __doc__)
