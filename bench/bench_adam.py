"""One AdamW step: fastformer FusedAdamW vs torch AdamW(foreach=True), AdamW(fused=True), Apex FusedAdam.

Cases: a BERT-base-like parameter list (199 tensors, ~110M params; quick CPU mode: the same layout at
hidden 384 / 6 layers, ~22M params) and one large tensor. CPU runs with 2 threads; GPU when present.
Metrics: ms per step, GB/s at 28 bytes per fp32 parameter (read p, g, m, v; write p, m, v) next to the
measured copy bandwidth and in-place update bandwidth (harness.copy_bandwidth_gbs), speed-up of
fastformer over each torch provider, and (GPU) kernel launches per step counted with torch.profiler.

    python bench/bench_adam.py [--full]
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import harness

import fastformer as ff

BYTES_PER_PARAM = 28
CPU_THREADS = 2  # the CPU cases' thread count, whatever the process had


def bert_shapes(hidden=768, layers=12, vocab=30522, max_pos=512, inter=None) -> list[tuple]:
    """Parameter shapes of a BERT encoder with pooler (BERT-base: 199 tensors, 109.5M parameters)."""
    inter = inter or 4 * hidden
    h = hidden
    shapes = [(vocab, h), (max_pos, h), (2, h), (h,), (h,)]
    for _ in range(layers):
        shapes += [(h, h), (h,)] * 4 + [(h,), (h,)]  # q, k, v, attn-out (+bias), attention LayerNorm
        shapes += [(inter, h), (inter,), (h, inter), (h,), (h,), (h,)]  # FFN in/out (+bias), LayerNorm
    shapes += [(h, h), (h,)]  # pooler
    return shapes


def make_optimizer(provider: str, params):
    kw = dict(lr=1e-4, weight_decay=0.01)
    if provider == "fastformer":
        return ff.optim.FusedAdamW(params, **kw)
    if provider == "torch-foreach":
        return torch.optim.AdamW(params, foreach=True, **kw)
    if provider == "torch-fused":
        return torch.optim.AdamW(params, fused=True, **kw)
    if provider == "apex":
        from apex.optimizers import FusedAdam

        return FusedAdam(params, adam_w_mode=True, **kw)
    raise ValueError(provider)


def count_launches(step, device) -> int | None:
    """CUDA kernels launched by one call of step() (memcpy/memset and profiler annotations not counted)."""
    if device.type != "cuda":
        return None
    from fastformer._profiling import cuda_kernels_launched

    return len(cuda_kernels_launched(step))


def bench_case(
    case: str, shapes: list[tuple], device: torch.device, copy_gbs: float, inplace_gbs: float, providers
) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(device) * 1e-3
    n = sum(p.numel() for p in params)
    rows = []
    for prov in providers:
        row = {
            "benchmark": "adam",
            "case": f"{case} {device.type}",
            "provider": prov,
            "params_M": n / 1e6,
            "tensors": len(shapes),
        }
        try:
            opt = make_optimizer(prov, params)
            opt.step()  # state initialisation outside the timing
            ms = harness.time_ms(opt.step, device=device, cpu_reps=5)
            row.update(ms=ms, gbs=BYTES_PER_PARAM * n / (ms * 1e-3) / 1e9)
            row["pct_copy_bw"] = 100.0 * row["gbs"] / copy_gbs
            row["pct_inplace_bw"] = 100.0 * row["gbs"] / inplace_gbs
            row["launches"] = count_launches(opt.step, device)
            del opt
        except Exception as e:  # noqa: BLE001 - record and continue with the next provider
            row["error"] = f"{type(e).__name__}: {e}"[:200]
        rows.append(row)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ours = next((r for r in rows if r["provider"] == "fastformer" and "ms" in r), None)
    if ours:
        for r in rows:
            if r is not ours and "ms" in r:
                ours[f"x_vs_{r['provider']}"] = r["ms"] / ours["ms"]
    return rows


def _save(rows: list[dict], out_dir: Path | None) -> None:
    # the file and meta.device name the threads the CPU rows ran with, whatever the count is now
    harness.save("adam", rows, out_dir=out_dir, x="params_M", y="gbs", series=("case", "provider"), threads=CPU_THREADS)


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    providers = ["fastformer", "torch-fused", "torch-foreach"]
    try:
        import apex.optimizers  # noqa: F401

        providers.append("apex")
    except Exception:  # noqa: BLE001
        pass
    rows: list[dict] = []
    print(f"fused adam extension in use: {ff.optim.extension_available()}")
    # CPU, 2 threads: small model in quick mode so the whole CPU part stays well under a minute
    threads = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        cpu = torch.device("cpu")
        cpu_copy = harness.copy_bandwidth_gbs(device=cpu)
        cpu_inplace = harness.copy_bandwidth_gbs(device=cpu, inplace=True)
        cpu_cases = (
            [("bert-small-22M", bert_shapes(384, 6)), ("one-tensor-16M", [(16 << 20,)])]
            if quick
            else [("bert-base-110M", bert_shapes()), ("one-tensor-64M", [(64 << 20,)])]
        )
        if quick and torch.cuda.is_available():
            cpu_cases = []  # quick on a GPU machine: GPU cases only (--full, or no CUDA, for CPU)
        for case, shapes in cpu_cases:
            case_rows = bench_case(case, shapes, cpu, cpu_copy, cpu_inplace, [p for p in providers if p != "apex"])
            for r in case_rows:
                r.update(copy_gbs=cpu_copy, inplace_gbs=cpu_inplace, threads=CPU_THREADS)
            rows += case_rows
            _save(rows, out_dir)  # after every case: a run cut short keeps the cases it finished
    finally:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        gpu_copy = harness.copy_bandwidth_gbs(device=gpu)
        gpu_inplace = harness.copy_bandwidth_gbs(device=gpu, inplace=True)
        for case, shapes in [("bert-base-110M", bert_shapes()), ("one-tensor-256M", [(256 << 20,)])]:
            case_rows = bench_case(case, shapes, gpu, gpu_copy, gpu_inplace, providers)
            for r in case_rows:
                r.update(copy_gbs=gpu_copy, inplace_gbs=gpu_inplace)
            rows += case_rows
            _save(rows, out_dir)
    cols = [
        "case",
        "provider",
        "params_M",
        "tensors",
        "ms",
        "gbs",
        "pct_copy_bw",
        "pct_inplace_bw",
        "launches",
        "x_vs_torch-fused",
        "x_vs_torch-foreach",
        "error",
    ]
    print(harness.format_table(rows, cols))
    # summary for gpu_check: the fastformer rows carry the ratios
    return [
        {
            k: v
            for k, v in r.items()
            if k
            in (
                "benchmark",
                "case",
                "ms",
                "gbs",
                "pct_copy_bw",
                "pct_inplace_bw",
                "launches",
                "x_vs_torch-fused",
                "x_vs_torch-foreach",
                "threads",
                "error",
            )
        }
        for r in rows
        if r["provider"] == "fastformer"
    ]


if __name__ == "__main__":
    harness.main(run, __doc__)
