"""Run every bench/bench_*.py with short settings and print one compact table last.

    python bench/gpu_check.py [--out DIR] [--only NAME ...] [--full] [--timeout S] [--budget S]

Each benchmark module exposes run(quick, out_dir) -> list of summary rows (dicts with at least
'benchmark' and 'case'). Each runs in its own subprocess with a time limit, in PRIORITY order, so
a benchmark that fails or overruns is reported and the others still run; --budget stops starting new
benchmarks once the total time is spent (GPU time is scarce).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Kernel benchmarks first: they carry the issues' performance targets.
PRIORITY = ["bench_attention", "bench_cross_entropy", "bench_adam", "bench_t5_attention",
            "bench_linear_cross_entropy", "bench_bert_training", "bench_t5_training", "bench_hf_patch"]


def _child(name: str, out: Path, quick: bool, rows_file: Path) -> int:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(quick=quick, out_dir=out) or []
    rows_file.write_text(json.dumps(rows, default=str))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", nargs="*", default=None, help="benchmark module names (e.g. bench_cross_entropy)")
    ap.add_argument("--full", action="store_true", help="full sweeps instead of the short settings")
    ap.add_argument("--timeout", type=float, default=float(os.environ.get("BENCH_TIMEOUT", 240)),
                    help="seconds one benchmark may run")
    ap.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET", 1e9)),
                    help="total seconds; no benchmark starts after it is spent")
    ap.add_argument("--timeouts", default="", help="per-benchmark limits, e.g. bench_attention=90,bench_adam=30")
    ap.add_argument("--tar", default=None, help="after each benchmark, pack the results folder into this .tgz")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child(args.child, out, not args.full, Path(args.rows_file))

    from harness import device_name

    names = [p.stem for p in HERE.glob("bench_*.py")]
    names.sort(key=lambda n: (PRIORITY.index(n) if n in PRIORITY else len(PRIORITY), n))
    if args.only:
        names = [n for n in names if n in args.only]
    summary, failures = [], []
    start = time.time()
    for name in names:
        left = args.budget - (time.time() - start)
        if left < 20:
            failures.append(f"{name} (not started: budget spent)")
            continue
        per = dict(kv.split("=") for kv in args.timeouts.split(",") if "=" in kv)
        limit = min(float(per.get(name, args.timeout)), left)
        rows_file = out / f".{name}.rows.json"
        t0 = time.time()
        print(f"=== {name} (limit {limit:.0f}s)", flush=True)
        cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--rows-file", str(rows_file)]
        if args.full:
            cmd.append("--full")
        try:
            rc = subprocess.run(cmd, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            rc = "error"
        if rc == 0 and rows_file.exists():
            summary += json.loads(rows_file.read_text())
            rows_file.unlink()
        else:
            failures.append(f"{name} ({rc})")
        print(f"=== {name} took {time.time() - t0:.1f}s", flush=True)
        if args.tar:  # pack after every benchmark so a lease cut short still returns what was measured
            subprocess.run(["tar", "czf", args.tar, "-C", str(out), "."], check=False)
    print(f"\n##### summary on {device_name()} #####")
    for r in summary:
        head = f"{r.get('benchmark', '?'):<18} {str(r.get('case', '')):<34}"
        rest = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k not in ("benchmark", "case"))
        print(f"{head} {rest}")
    if failures:
        print(f"FAILED or skipped benchmarks: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
