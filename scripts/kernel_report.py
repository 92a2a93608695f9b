#!/usr/bin/env python3
"""Kernel report: compile every registered kernel configuration for sm_90 and sm_80 exactly as the
runtime launcher would, and read registers, spills, shared memory, occupancy and the main loop's
instructions off the SASS / PTX / TTGIR. No GPU needed.

    python scripts/kernel_report.py [--check] [--json FILE] [--markdown FILE] [--triton VERSION]
                                    [--ci] [--candidates [--write-gates]] [--family NAME] [--arch 90 80]
                                    [--match TEXT ...]

  --check          exit 1 when a gate fails (gates are declared next to each kernel family)
  --ci             only the representative cases (what `make test` checks); default: every case
  --triton V       build with Triton V instead of the installed one: it is installed once into
                   the cache folder (pip --target, from the package registry) and used in a subprocess
  --candidates     also build every tuning candidate and judge it by the candidate gates;
  --write-gates    ... and record the verdicts in fastformer/kernels/gate_results/<family>.json
  --match TEXT     only the cases (and candidates) whose name contains one of the texts
  --baseline FILE  with --check, also fail when a build spills more, has more local-memory traffic in a
                   tile loop or fewer blocks per SM than in FILE (default: the committed report of this
                   Triton version, bench/results/kernel_report_triton-<version>.json); --no-baseline
  --jobs N         parallel compiles (default: 2, at most the CPU count)
  --cache DIR      reuse earlier results of identical builds (default ~/.cache/fastformer/kernel_report;
                   --no-cache to rebuild everything)

See docs/kernels.md for what each column means and how a family joins the registry.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

# compile for the GPU; never the interpreter (must be set before triton is first imported)
os.environ["TRITON_INTERPRET"] = "0"
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastformer" / "kernel_report"
COLUMNS = [
    ("kernel", "kernel"),
    ("config", "config"),
    ("arch", "arch"),
    ("tiles", "tiles"),
    ("registers", "regs"),
    ("spill_bytes", "spill B"),
    ("shared_bytes", "smem B"),
    ("blocks_per_sm", "blk/SM"),
    ("loop_local_mem_ops", "loop LDL/STL"),
    ("mma_instructions_per_tile", "MMA/tile"),
    ("gemms_per_tile", "GEMMs/tile"),
    ("async_copies", "cp.async"),
    ("tma_loads", "TMA"),
    ("warp_specialized", "WS"),
    ("ex2_per_element", "ex2/elem"),
    ("barriers_per_iteration", "bar/iter"),
]


# ----------------------------------------------------------------------------------------------
# worker side: build one case for one arch
# ----------------------------------------------------------------------------------------------


def _find_case(family: str, case_name: str, candidate: bool):
    from fastformer.kernels import registry

    fam = registry.families([family])[0]
    if candidate:
        for c in fam.candidates():
            if c.case.name == case_name:
                return c.case, tuple(c.kernels)
    for c in fam.cases():
        if c.name == case_name:
            return c, None
    raise KeyError(f"{family}: no case {case_name!r}")


def build_case(family: str, case_name: str, arch: int, cache: str | None, candidate: bool = False) -> list:
    """Report rows of one case on one arch (one per launch; a failed build is a row with 'error'). The
    case's launches are captured for that arch (launch.for_arch): a launcher may pick its kernel
    variant by GPU generation."""
    import triton

    from fastformer.kernels import aot
    from fastformer.kernels.launch import for_arch

    case, only = _find_case(family, case_name, candidate)
    rows = []
    with for_arch(arch):
        items = case.launches()
    for item in items:
        if only is not None and item.name not in only:
            continue
        row = {
            "kernel": item.name,
            "config": case.name,
            "variant": case.variant,
            "dtype": case.dtype,
            "head_dim": case.head_dim,
            "arch": f"sm_{arch}",
            "triton": triton.__version__,
            "tiles": ",".join(str(x) for x in item.config) if item.config else "",
        }
        if candidate:
            row["candidate"] = True
        try:
            row.update(aot.build(item, arch, Path(cache) if cache else None))
        except Exception as exc:  # noqa: BLE001 - a build that fails is a failed row, not a crash
            row["error"] = f"{type(exc).__name__}: {str(exc)[-1500:]}"
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# driver side
# ----------------------------------------------------------------------------------------------


def _pool(jobs: int):
    return concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))


def run_tasks(tasks: list, jobs: int, cache: str | None, progress: bool) -> list:
    """tasks: (family, case name, arch, is_candidate). Rows in task order."""
    results: dict = {}
    t0 = time.time()
    if jobs <= 1:
        for i, t in enumerate(tasks):
            results[i] = build_case(t[0], t[1], t[2], cache, t[3])
            if progress:
                print(f"  [{i + 1}/{len(tasks)} {time.time() - t0:5.0f}s] {t[1]} sm_{t[2]}", file=sys.stderr)
    else:
        with _pool(jobs) as pool:
            futs = {pool.submit(build_case, t[0], t[1], t[2], cache, t[3]): i for i, t in enumerate(tasks)}
            for n, fut in enumerate(concurrent.futures.as_completed(futs)):
                i = futs[fut]
                try:
                    results[i] = fut.result()
                except Exception as exc:  # noqa: BLE001
                    t = tasks[i]
                    results[i] = [
                        {"kernel": t[0], "config": t[1], "arch": f"sm_{t[2]}", "error": f"{type(exc).__name__}: {exc}"}
                    ]
                if progress:
                    t = tasks[i]
                    print(f"  [{n + 1}/{len(tasks)} {time.time() - t0:5.0f}s] {t[1]} sm_{t[2]}", file=sys.stderr)
    return [r for i in range(len(tasks)) for r in results[i]]


def dedupe(rows: list) -> list:
    """One row per distinct build: a kernel that several cases launch identically (Delta) is listed once."""
    seen, out = set(), []
    for r in rows:
        key = r.get("build_hash")
        if key is not None and key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list, markdown: bool = False) -> str:
    cells = [
        [
            _fmt(r.get(k))
            if not r.get("error") or k in ("kernel", "config", "arch")
            else ("ERROR" if k == "tiles" else "")
            for k, _ in COLUMNS
        ]
        for r in rows
    ]
    heads = [h for _, h in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(heads) + " |", "|" + "|".join("---" for _ in heads) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_gate_results(family: str, version: str, rows: list, verdicts: list, candidates: list) -> Path:
    """Record, per arch, which tuning candidates passed the candidate gates (merged into the file)."""
    from fastformer.kernels import tuning

    path = tuning.GATES_DIR / f"{family}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    per_version = data.setdefault("triton", {})[version] = {}
    by_case = {c.case.name: c for c in candidates}
    failed: dict = {}
    for v in verdicts:
        if not v["ok"]:
            failed.setdefault((v["config"], v["arch"]), []).append(v["gate"])
    for r in rows:
        cand = by_case.get(r["config"])
        if cand is None:
            continue
        entry = per_version.setdefault(r["arch"], {}).setdefault(cand.tune_name, {})
        verdict = entry.setdefault(tuning.config_id(cand.config), {"failed": [], "variants": []})
        # a candidate must pass in every variant it is built in
        verdict["failed"] = sorted(set(verdict["failed"]) | set(failed.get((r["config"], r["arch"]), [])))
        verdict["variants"] = sorted(set(verdict["variants"]) | {r["variant"]})
    data["note"] = "written by scripts/kernel_report.py --candidates --write-gates; read by fastformer.kernels.tuning"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


# facts that may not get worse than in the committed report of the same Triton version
BASELINE = {"spill_bytes": "not above", "loop_local_mem_ops": "not above", "blocks_per_sm": "not below"}


def baseline_path(version: str) -> Path:
    return ROOT / "bench" / "results" / f"kernel_report_triton-{version}.json"


def compare_baseline(rows: list, path: Path) -> list:
    """Verdicts 'no-regression:<field>' for every row that the committed report also has (same kernel,
    config and arch): its spills and loop local-memory traffic not above, its occupancy not below."""
    try:
        old = {(r["kernel"], r["config"], r["arch"]): r for r in json.loads(path.read_text())["rows"]}
    except (OSError, ValueError, KeyError):
        return []
    out = []
    for r in rows:
        b = old.get((r["kernel"], r["config"], r["arch"]))
        if b is None or r.get("error") or b.get("error"):
            continue
        for field, rule in BASELINE.items():
            new, was = r.get(field), b.get(field)
            if new is None or was is None:
                continue
            ok = new <= was if rule == "not above" else new >= was
            out.append(
                {
                    "gate": f"no-regression:{field}",
                    "kernel": r["kernel"],
                    "config": r["config"],
                    "arch": r["arch"],
                    "ok": ok,
                    "detail": "" if ok else f"{new} (committed: {was})",
                }
            )
    return out


def dump_json(report: dict) -> str:
    """The report as JSON with one list item per line (small diffs when a kernel changes)."""
    parts = []
    for key, value in report.items():
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(v, sort_keys=True) for v in value)
            parts.append(f'"{key}": [\n  {items}\n]' if value else f'"{key}": []')
        else:
            parts.append(f'"{key}": {json.dumps(value, sort_keys=True)}')
    return "{\n" + ",\n".join(parts) + "\n}\n"


def _install_triton(version: str, cache: Path) -> Path:
    target = cache / "triton" / version
    if not (target / "triton" / "__init__.py").exists():
        print(f"installing triton=={version} into {target}", file=sys.stderr)
        target.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"triton=={version}"],
            check=True,
        )
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--triton", default=None)
    ap.add_argument("--ci", action="store_true")
    ap.add_argument("--candidates", action="store_true")
    ap.add_argument("--write-gates", action="store_true")
    ap.add_argument("--family", nargs="*", default=None)
    ap.add_argument("--match", nargs="*", default=None, help="only cases whose name contains one of these")
    ap.add_argument("--arch", nargs="*", type=int, default=None)
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--no-cache", action="store_true")
    ap.add_argument(
        "--baseline",
        default=None,
        help="committed report to compare with (default: bench/results/kernel_report_triton-<version>.json)",
    )
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)

    import triton

    if args.triton and args.triton != triton.__version__:
        site = _install_triton(args.triton, Path(args.cache))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        return subprocess.run([sys.executable, __file__, *rest], env=env).returncode
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"kernel_report: this triton has no NVIDIA backend ({exc})", file=sys.stderr)
        return 2

    from fastformer.kernels import aot, registry

    t0 = time.time()
    cache = None if args.no_cache else str(Path(args.cache) / "builds")
    fams = registry.families(args.family)
    tasks, cands = [], {}

    def wanted(name):
        return not args.match or any(m in name for m in args.match)

    for fam in fams:
        for case in filter(lambda c: wanted(c.name), fam.cases()):
            for arch in case.ci_archs if args.ci else case.archs:
                if args.arch is None or arch in args.arch:
                    tasks.append((fam.name, case.name, arch, False))
        if args.candidates:
            cands[fam.name] = fam.candidates()
            for c in cands[fam.name]:
                if not wanted(c.case.name):
                    continue
                for arch in c.case.archs:
                    if args.arch is None or arch in args.arch:
                        tasks.append((fam.name, c.case.name, arch, True))
    rows = run_tasks(tasks, max(1, args.jobs), cache, progress=not args.quiet)
    case_rows = dedupe([r for r in rows if not r.get("candidate")])
    cand_rows = [r for r in rows if r.get("candidate")]

    verdicts, cand_verdicts = [], []
    for fam in fams:
        fr = [r for r in case_rows if r["kernel"].startswith(fam.name + ".")]
        verdicts += registry.evaluate(fam.gates, fr)
        if args.candidates:
            cr = [r for r in cand_rows if r["kernel"].startswith(fam.name + ".")]
            cand_verdicts += registry.evaluate([g for g in fam.gates if g.candidates], cr)
            if args.write_gates:
                path = write_gate_results(fam.name, triton.__version__, cr, cand_verdicts, cands[fam.name])
                print(f"gate verdicts of {len(cr)} candidate builds -> {path}", file=sys.stderr)
    if not args.no_baseline:
        verdicts += compare_baseline(
            case_rows, Path(args.baseline) if args.baseline else baseline_path(triton.__version__)
        )
    elapsed = time.time() - t0
    failed = [v for v in verdicts if not v["ok"]]
    meta = {
        "triton": triton.__version__,
        "tools": aot.tool_versions(),
        "archs": sorted({r["arch"] for r in rows}),
        "selection": "ci" if args.ci else "all",
        "seconds": round(elapsed, 1),
        "builds": len(rows),
        "cached_builds": sum(1 for r in rows if r.get("cached")),
    }
    if not args.quiet:
        print(table(case_rows))
    if args.candidates and not args.quiet:
        print("\ntuning candidates:")
        print(table(cand_rows))
        bad = [v for v in cand_verdicts if not v["ok"]]
        names = sorted({v["config"].split(" ", 3)[-1] + " " + v["arch"] for v in bad})
        print(f"{len(bad)} candidate gate checks failed (those candidates are not timed): " + ", ".join(names))
    print(
        f"\nkernel_report: triton {triton.__version__}, {len(rows)} builds ({meta['cached_builds']} from cache) "
        f"in {elapsed:.0f}s; {len(verdicts)} gate checks, {len(failed)} failed"
    )
    for v in failed:
        print(f"  FAILED {v['gate']}: {v['kernel']} [{v['config']}] {v['arch']} {v.get('detail', '')}")
    gates_doc = [
        {"family": f.name, "gate": g.name, "description": g.description, "candidates": g.candidates}
        for f in fams
        for g in f.gates
    ]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)

        def stable(rows):  # what does not describe the build (cache hits, timing) stays out of the file
            return [{k: v for k, v in r.items() if k != "cached"} for r in rows]

        saved_meta = {k: v for k, v in meta.items() if k not in ("seconds", "cached_builds")}
        Path(args.json).write_text(
            dump_json(
                {
                    "meta": saved_meta,
                    "gates": gates_doc,
                    "rows": stable(case_rows),
                    "gate_results": verdicts,
                    "candidates": stable(cand_rows),
                    "candidate_gate_results": cand_verdicts,
                }
            )
        )
    if args.markdown:
        md = [
            f"# Kernel report: Triton {triton.__version__}",
            "",
            f"Built by `scripts/kernel_report.py` with the runtime launcher's specialization, for "
            f"{', '.join(meta['archs'])}; SASS read with {meta['tools'].get('nvdisasm', '?').split(' (')[0]} "
            f"nvdisasm. One row per distinct build; columns are described in docs/kernels.md.",
            "",
            table(case_rows, markdown=True),
            "",
            "## Gates",
            "",
        ]
        md += [f"- `{g['gate']}` ({g['family']}): {g['description']}" for g in gates_doc]
        md += ["", f"{len(verdicts)} checks, {len(failed)} failed."]
        md += [f"- FAILED `{v['gate']}`: {v['kernel']} [{v['config']}] {v['arch']}" for v in failed]
        Path(args.markdown).write_text("\n".join(md) + "\n")
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
