"""Fused linear + cross-entropy vs F.linear + F.cross_entropy: forward + backward time and peak memory.

    python bench/bench_linear_cross_entropy.py [--full]

GPU (bf16): hidden 1024-4096, V up to 128k (quick: two cases). Gradients for x, W and b are produced
by both providers, so they count in both peaks. CPU (fp32): a tiny timed case, plus the memory target
case N=8192, H=512, V=32000 (peak extra RSS of one forward + backward each; fused measured first, so
pages the allocator kept from an earlier run cannot flatter it).
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import harness  # noqa: E402
import fastformer as ff  # noqa: E402

PROVIDERS = {
    "fastformer": lambda x, W, b, t: ff.linear_cross_entropy(x, W, t, b),
    "unfused": lambda x, W, b, t: F.cross_entropy(F.linear(x, W, b), t),
}


def _cases(quick: bool, device: torch.device):
    """(N, H, V, dtype, timed)."""
    if device.type != "cuda":
        return [(512, 64, 2000, torch.float32, True), (8192, 512, 32000, torch.float32, False)]
    if quick:
        return [(8192, 1024, 32768, torch.bfloat16, True), (8192, 4096, 131072, torch.bfloat16, True)]
    return [(16384, h, v, torch.bfloat16, True) for h in (1024, 2048, 4096) for v in (32768, 131072)]


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    detail, summary = [], []
    for N, H, V, dtype, timed in _cases(quick, device):
        dname = str(dtype).replace("torch.", "")
        case = f"N={N} H={H} V={V} {dname}"
        x = torch.randn(N, H, device=device, dtype=dtype).requires_grad_(True)
        W = (torch.randn(V, H, device=device, dtype=dtype) / H**0.5).requires_grad_(True)
        b = torch.zeros(V, device=device, dtype=dtype).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=device)
        res = {}
        for name, f in PROVIDERS.items():
            row = {"benchmark": "linear_cross_entropy", "case": case, "provider": name, "N": N, "H": H, "V": V}
            try:
                def step(f=f):
                    return torch.autograd.grad(f(x, W, b, t), (x, W, b))

                row["peak_MB"] = harness.peak_extra_bytes(step, device=device) / 2**20
                if timed:
                    row["ms"] = harness.time_ms(step, device=device)
                res[name] = row
            except Exception as exc:  # noqa: BLE001 - record and go on
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            detail.append(row)
        del x, W, b
        s = {"benchmark": "linear_cross_entropy", "case": case}
        if "fastformer" in res and "unfused" in res:
            fr, ur = res["fastformer"], res["unfused"]
            s.update(ff_peak_MB=fr["peak_MB"], unfused_peak_MB=ur["peak_MB"],
                     mem_ratio=fr["peak_MB"] / ur["peak_MB"] if ur["peak_MB"] > 0 else float("nan"))
            if timed:
                s.update(ff_ms=fr["ms"], unfused_ms=ur["ms"], time_ratio=fr["ms"] / ur["ms"])
        else:
            s["error"] = "a provider failed"
        summary.append(s)
    harness.save("linear_cross_entropy", detail, out_dir=out_dir, device=device, x="V", y="peak_MB",
                 series=("provider", "H"), logx=True, title="linear CE fwd+bwd peak extra memory")
    print(harness.format_table(detail, ["case", "provider", "ms", "peak_MB", "error"]))
    print(harness.format_table(summary, ["case", "ff_ms", "unfused_ms", "time_ratio", "ff_peak_MB",
                                         "unfused_peak_MB", "mem_ratio"]))
    return summary


if __name__ == "__main__":
    harness.main(run, __doc__)
