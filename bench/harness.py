"""Benchmark harness shared by every bench/bench_*.py script.

- time_ms(fn): median milliseconds; `triton.testing.do_bench` on CUDA, perf_counter on CPU.
- peak_extra_bytes(fn): extra device memory at peak during fn (CUDA allocator stats; on CPU the
  process's peak RSS, reset through /proc/self/clear_refs before the call, after the C heap's free
  memory is returned to the system so that reused memory counts; None when not measurable).
- save(name, rows, ...): JSON + PNG under bench/results/ (each written whole or not at all), file names
  carry the device name; the JSON's `meta` records the device, torch / Triton versions, the date (UTC)
  and the git commit of the tree.
- A benchmark never asserts a speed. Every provider is measured in the same run.

Each bench script defines `run(quick: bool, out_dir: pathlib.Path) -> list[dict]` (rows of its summary
table) and a `__main__` that calls it (most through main(run, __doc__)); bench/gpu_check.py runs them all.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from cli_paths import out_folder, write_atomic

from fastformer.backend import cpu_has_bf16, cpuinfo_fields  # noqa: F401  (cpu_has_bf16: for the bench scripts)

RESULTS = Path(__file__).resolve().parent / "results"


def _device(device: torch.device | str | None) -> torch.device:
    """The given device, or the default one: CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_name(device: torch.device | str | None = None, threads: int | None = None) -> str:
    """A file-name-safe device name, e.g. 'NVIDIA_H200' or 'cpu-2threads-Intel_Xeon...'. threads: the CPU
    threads the measurement used, for a script that changed the count only while it measured (default:
    torch's current count)."""
    device = _device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{threads or torch.get_num_threads()}threads-{cpu_model()}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model from /proc/cpuinfo (or the given text of one): its "model name" (x86; with the
    family and model codes when the name has no model number), else the
    machine with the "CPU implementer" and "CPU part" codes (Arm kernels give no model name, and
    without them every Arm CPU would get the same device name), else platform's processor or machine."""
    fields = cpuinfo_fields(cpuinfo) or {}
    name = fields.get("model name")
    if name:
        # a virtual machine often shows a bare brand ("AMD EPYC") for CPUs of several generations, whose
        # results must not overwrite each other: the x86 family and model codes tell them apart
        if not re.search(r"\d", name) and fields.get("cpu family") and fields.get("model"):
            name = f"{name} family {fields['cpu family']} model {fields['model']}"
        return name
    if fields.get("CPU implementer") and fields.get("CPU part"):
        return f"{platform.machine()}-{fields['CPU implementer']}-{fields['CPU part']}"
    return platform.processor() or platform.machine()


def cpu_machine(threads: int | None = None) -> dict:
    """The machine a CPU experiment ran on, for its results file ("machine"): the processor model
    (cpu_model()), its core count, the threads the runs used (None: not set by the script), and the
    Python and torch versions."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def sync(device: torch.device | str | None = None) -> None:
    if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], *, warmup: int = 25, rep: int = 100, device=None, cpu_reps: int = 5) -> float:
    """Median wall time of fn() in milliseconds. warmup/rep are milliseconds for do_bench on CUDA;
    on CPU fn runs once to warm up and `cpu_reps` more times."""
    dev = _device(device)
    if dev.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_free_heap() -> bool:
    """Return the C heap's free memory to the system (glibc's malloc_trim(0)); False where there is no
    glibc. Without it, memory fn() takes from what earlier calls freed is already resident: the peak
    RSS does not grow, and a measurement after timing the same call reads 0 or less."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def peak_extra_bytes(fn: Callable[[], object], device=None) -> int | None:
    """Peak memory fn() needs beyond what was allocated before it (bytes). On CPU, the growth of the
    process's peak RSS after the C heap's free memory is returned to the system; None where that
    reads less than 0 (memory reused that the heap could not release: not measurable)."""
    dev = _device(device)
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(dev) - before)
    _release_free_heap()
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    before = _proc_status_kb("VmRSS")
    fn()
    extra = (_proc_status_kb("VmHWM") - before) * 1024
    return int(extra) if extra >= 0 else None


def megabytes(nbytes: int | None) -> float | None:
    """nbytes in MiB, None for None (a peak that was not measurable)."""
    return None if nbytes is None else nbytes / 2**20


def copy_bandwidth_gbs(nbytes: int = 2 << 30, device=None, *, inplace: bool = False) -> float:
    """Measured device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written.

    inplace: time an in-place update (x *= 1) instead of a copy, still counting 2 bytes per byte of x.
    That is the reference for kernels that update their buffers in place, as Adam does: on a CPU a
    copy's stores first read each destination line (write-allocate), traffic the count leaves out, so
    an in-place kernel measured against the copy can show more than 100%."""
    dev = _device(device)
    if dev.type != "cuda":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=dev).uniform_()
    if inplace:
        ms = time_ms(lambda: src.mul_(1.0), device=dev)
    else:
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device=dev)
    src = dst = None  # release the buffers
    return 2 * nbytes / (ms * 1e-3) / 1e9


def source_commit() -> str | None:
    """The short git commit of the repository ('abc123def456+modified' with uncommitted changes to
    tracked files), or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+modified" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def save(
    name: str,
    rows: list[dict],
    *,
    out_dir: Path | None = None,
    device=None,
    x: str | None = None,
    y: str | None = None,
    series: Sequence[str] = ("provider",),
    logx: bool = False,
    title: str | None = None,
    threads: int | None = None,
) -> tuple[Path, Path | None]:
    """Write rows as JSON (and a PNG plot of y against x per series when both are given). threads: as in
    device_name (the file and meta.device name the threads the rows were measured with)."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = device_name(device, threads)
    stem = out_dir / f"{name}_{dev}"
    meta = {
        "benchmark": name,
        "device": dev,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }
    commit = source_commit()
    if commit:
        meta["commit"] = commit
    try:
        import triton

        meta["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        pass
    json_path = stem.with_suffix(".json")
    text = json.dumps({"meta": meta, "rows": rows}, indent=1, default=str)
    write_atomic(json_path, lambda tmp: tmp.write_text(text))
    png_path = None
    if x and y:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            groups: dict[str, list[tuple]] = {}
            for r in rows:
                if r.get(y) is None or not isinstance(r.get(y), (int, float)) or math.isnan(r[y]):
                    continue
                key = " ".join(str(r.get(s)) for s in series)
                groups.setdefault(key, []).append((r[x], r[y]))
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for key, pts in groups.items():
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
            if logx:
                ax.set_xscale("log", base=2)
            ax.set_xlabel(x)
            ax.set_ylabel(y)
            ax.set_title(title or f"{name} on {dev}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            png_path = stem.with_suffix(".png")
            write_atomic(png_path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
            plt.close(fig)
        except Exception as exc:  # noqa: BLE001 - a missing plot must not lose the JSON
            print(f"[harness] plot for {name} failed: {exc}")
    return json_path, png_path


def format_table(rows: Iterable[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table of the given columns."""
    rows = list(rows)

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The command line every bench script shares: [--full] [--out DIR]. A script with flags of its own
    adds them here, so that --help lists them, and hands the parsed arguments to main(args=...)."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="every case instead of the quick subset")
    ap.add_argument("--out", type=out_folder, default=None, help="folder for the results (default bench/results)")
    return ap


def main(
    run: Callable[..., list[dict]],
    description: str | None,
    *,
    print_rows: bool = False,
    args: argparse.Namespace | None = None,
) -> None:
    """Command line of a bench script: [--full] [--out DIR] -> run(quick=not full, out_dir=DIR or None).
    print_rows: print the summary rows run() returns, one per line. args: already parsed (see parser)."""
    if args is None:
        args = parser(description).parse_args()
    rows = run(quick=not args.full, out_dir=args.out)
    if print_rows:
        for r in rows:
            print(r)
