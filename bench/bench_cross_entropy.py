"""Cross-entropy forward + backward: fastformer vs F.cross_entropy (eager, torch.compile) and Liger-Kernel.

    python bench/bench_cross_entropy.py [--full]

GPU: N = 16384 rows, V in {32k, 50k, 128k}, bf16 and fp32 (quick: a subset); fastformer as tuned at
first use, with its built-in configuration, and with the legacy (one program per row) kernel. CPU:
small shapes, fastformer's CPU path (float32: the extension's row kernel) against eager torch; the
Triton interpreter is never timed.
Bytes that must move for fwd+bwd: read the logits once and write their gradient once,
2 * N * V * element_size (targets and per-row scalars are negligible). GB/s is that count over the
median time; pct_copy_bw compares it with the measured device-to-device copy bandwidth.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness
import torch
import torch.nn.functional as F

import fastformer as ff


def _providers(device: torch.device) -> dict:
    provs = {
        "fastformer": lambda x, t: ff.cross_entropy(x, t),
        "torch": lambda x, t: F.cross_entropy(x, t),
    }
    if device.type == "cuda":
        # the same op with the built-in configuration (tuning pinned off) and with the legacy kernel
        # (one program per row)
        # (one program per row), so one run shows what the tuner and the persistent kernel bring
        provs["fastformer-default"] = _pinned(None)
        provs["fastformer-legacy"] = _pinned("legacy")
        provs["torch.compile"] = torch.compile(lambda x, t: F.cross_entropy(x, t), dynamic=False)
        try:
            from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss

            liger = LigerCrossEntropyLoss()
            provs["liger"] = lambda x, t: liger(x, t)
        except Exception:  # noqa: BLE001 - Liger-Kernel is optional
            pass
    return provs


def _pinned(which):
    """ff.cross_entropy with the default configuration (which=None) or the legacy (one program per row) kernel."""
    from fastformer.kernels import cross_entropy_launch as CL
    from fastformer.kernels import tuning

    def run(x, t):
        if which == "legacy":
            with tuning.force_config(CL.TUNE_NAME, CL.LEGACY):
                return ff.cross_entropy(x, t)  # the gradient is computed in this forward call
        with tuning.use_tuning(False):
            return ff.cross_entropy(x, t)

    return run


def _cases(quick: bool, device: torch.device):
    if device.type != "cuda":
        return (
            [(256, 4096, torch.float32), (256, 32000, torch.float32)]
            if quick
            else [(1024, 32000, torch.float32), (1024, 50257, torch.float32), (1024, 32000, torch.bfloat16)]
        )
    if quick:
        return [(16384, 32768, torch.bfloat16), (16384, 131072, torch.bfloat16), (16384, 32768, torch.float32)]
    return [(16384, v, dt) for dt in (torch.bfloat16, torch.float32) for v in (32768, 50257, 131072)]


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    copy_bw = harness.copy_bandwidth_gbs(device=device)
    provs = _providers(device)
    detail, summary = [], []
    meta_row = {"benchmark": "cross_entropy", "case": "copy bandwidth", "copy_GBps": copy_bw}

    def _save():  # after every case: a run cut short keeps the cases it finished
        harness.save(
            "cross_entropy",
            detail + [meta_row] + [dict(r, summary=True) for r in summary],
            out_dir=out_dir,
            device=device,
            x="V",
            y="GBps",
            series=("provider", "dtype"),
            logx=True,
            title=f"CE fwd+bwd GB/s, N={_cases(quick, device)[0][0]}",
        )

    for N, V, dtype in _cases(quick, device):
        dname = str(dtype).replace("torch.", "")
        case = f"N={N} V={V} {dname}"
        x = torch.randn(N, V, device=device, dtype=dtype).requires_grad_(True)
        t = torch.randint(0, V, (N,), device=device)
        nbytes = 2 * N * V * x.element_size()  # read logits + write grad
        res = {}
        for name, f in provs.items():
            row = {"benchmark": "cross_entropy", "case": case, "provider": name, "N": N, "V": V, "dtype": dname}
            try:

                def step(f=f):
                    return torch.autograd.grad(f(x, t), x)

                ms = harness.time_ms(step, device=device)
                peak = harness.peak_extra_bytes(step, device=device)
                row.update(ms=ms, GBps=nbytes / (ms * 1e-3) / 1e9, peak_MB=harness.megabytes(peak))
                row["pct_copy_bw"] = 100.0 * row["GBps"] / copy_bw
                res[name] = row
            except Exception as exc:  # noqa: BLE001 - record and go on with the next provider
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            detail.append(row)
        x = None  # release the logits before the next case
        s = {"benchmark": "cross_entropy", "case": case}
        if "fastformer" in res:
            ffr = res["fastformer"]
            s.update(ff_ms=ffr["ms"], ff_GBps=ffr["GBps"], ff_pct_copy_bw=ffr["pct_copy_bw"], ff_peak_MB=ffr["peak_MB"])
            refs = {k: v for k, v in res.items() if not k.startswith("fastformer")}
            for k in ("fastformer-default", "fastformer-legacy"):
                if k in res:
                    s[f"speedup_vs_{k.split('-')[1]}"] = res[k]["ms"] / ffr["ms"]
                    s[f"{k.split('-')[1]}_pct_copy_bw"] = res[k]["pct_copy_bw"]
            for k, v in refs.items():
                s[f"{k}_ms"] = v["ms"]
                s[f"{k}_peak_MB"] = v["peak_MB"]
            if "torch" in refs:
                s["speedup_vs_eager"] = refs["torch"]["ms"] / ffr["ms"]
            if refs:
                s["speedup_vs_best_ref"] = min(v["ms"] for v in refs.values()) / ffr["ms"]
        else:
            s["error"] = "fastformer failed"
        summary.append(s)
        _save()
    print(harness.format_table(detail, ["case", "provider", "ms", "GBps", "pct_copy_bw", "peak_MB", "error"]))
    print(f"copy bandwidth: {copy_bw:.1f} GB/s")
    ratios = sorted({k for r in summary for k in r if k.startswith("speedup_vs_")})
    print(harness.format_table(summary, ["case", "ff_ms", "ff_pct_copy_bw", *ratios, "error"]))
    return summary + [meta_row]


if __name__ == "__main__":
    harness.main(run, __doc__)
