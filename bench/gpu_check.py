"""Run every bench/bench_*.py with short settings and print one compact table last.

    python bench/gpu_check.py [--out DIR] [--only NAME ...] [--full]

Each benchmark module exposes run(quick, out_dir) -> list of summary rows (dicts with at least
'benchmark' and 'case'). A benchmark that fails is reported and the others still run.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import device_name  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--only", nargs="*", default=None, help="benchmark module names (e.g. bench_cross_entropy)")
    ap.add_argument("--full", action="store_true", help="full sweeps instead of the short settings")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary, failures = [], []
    for path in sorted(HERE.glob("bench_*.py")):
        if args.only and path.stem not in args.only:
            continue
        t0 = time.time()
        print(f"=== {path.stem}", flush=True)
        try:
            spec = importlib.util.spec_from_file_location(path.stem, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            rows = mod.run(quick=not args.full, out_dir=out) or []
            summary += rows
        except Exception:  # noqa: BLE001 - report and go on with the next benchmark
            failures.append(path.stem)
            traceback.print_exc()
        print(f"=== {path.stem} took {time.time() - t0:.1f}s", flush=True)
    print(f"\n##### summary on {device_name()} #####")
    for r in summary:
        head = f"{r.get('benchmark', '?'):<18} {str(r.get('case', '')):<34}"
        rest = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in r.items() if k not in ("benchmark", "case"))
        print(f"{head} {rest}")
    if failures:
        print(f"FAILED benchmarks: {', '.join(failures)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
