#!/usr/bin/env python3
"""Kernel report: compile every registered kernel configuration for sm_90 and sm_80 exactly as the
runtime launcher would, and read registers, spills, shared memory, occupancy and the main loop's
instructions off the SASS / PTX / TTGIR. No GPU needed.

    python scripts/kernel_report.py [--check] [--json FILE] [--markdown FILE] [--triton VERSION]
                                    [--ci] [--candidates [--write-gates]] [--family NAME] [--arch 90 80]
                                    [--match TEXT ...]

  --check          exit 1 when a gate fails (gates are declared next to each kernel family); exit 2
                   when the selection (--arch, --match, --family) builds no case: nothing was checked
  --ci             only the representative cases (what `make test` checks); default: every case
  --triton V       build with Triton V instead of the installed one (3.9 and 3.9.0 are the same
                   version): it is installed once into the cache folder (pip --target, from the package
                   registry) and used in a subprocess, which never starts another one
  --candidates     also build every tuning candidate and judge it by the candidate gates;
  --write-gates    ... and record the verdicts in fastformer/kernels/gate_results/<family>.json, merged
                   into the recorded ones (--arch / --match replace only the candidates they build);
                   without --candidates an error (exit 2), as is a --family no kernel family has
  --match TEXT     only the cases (and candidates) whose name contains one of the texts
  --baseline FILE  with --check, also fail when a build spills more, has more local-memory traffic in a
                   tile loop or fewer blocks per SM than in FILE (an unreadable FILE is an error; default:
                   the committed report of this Triton version, bench/results/kernel_report_triton-
                   <version>.json, and without one a note says these gates were skipped); --no-baseline
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
    """Record, per arch, which tuning candidates passed the candidate gates, merged into the file.

    rows: this run's candidate builds; candidates: every candidate the family declares. A verdict is
    kept per (arch, tuning name, config): one that this run built in every case declaring it on that
    arch is replaced; one built in only some of them (--match) keeps the recorded failures (they may
    come from a case not rebuilt) and adds this run's; one this run did not build (--arch, --match)
    is left as recorded. Verdicts of configs no candidate declares any more are dropped."""
    from fastformer.kernels import tuning

    path = tuning.GATES_DIR / f"{family}.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        data = {}
    per_version = data.setdefault("triton", {}).setdefault(version, {})
    by_case = {c.case.name: c for c in candidates}
    declared: dict = {}  # (arch, tune name, config id) -> the case names that build it
    for c in candidates:
        for arch in c.case.archs:
            declared.setdefault((f"sm_{arch}", c.tune_name, tuning.config_id(c.config)), set()).add(c.case.name)
    failed: dict = {}
    for v in verdicts:
        if not v["ok"]:
            failed.setdefault((v["config"], v["arch"]), []).append(v["gate"])
    fresh: dict = {}
    for r in rows:
        cand = by_case.get(r["config"])
        if cand is None:
            continue
        key = (r["arch"], cand.tune_name, tuning.config_id(cand.config))
        f = fresh.setdefault(key, {"failed": set(), "variants": set(), "cases": set()})
        # a candidate must pass in every variant it is built in
        f["failed"] |= set(failed.get((r["config"], r["arch"]), []))
        f["variants"].add(r["variant"])
        f["cases"].add(r["config"])
    for (arch, tune, cid), f in sorted(fresh.items()):
        entry = per_version.setdefault(arch, {}).setdefault(tune, {})
        old = entry.get(cid)
        if old is not None and not f["cases"] >= declared.get((arch, tune, cid), set()):
            f["failed"] |= set(old.get("failed", []))
            f["variants"] |= set(old.get("variants", []))
        entry[cid] = {"failed": sorted(f["failed"]), "variants": sorted(f["variants"])}
    for arch in list(per_version):
        for tune in list(per_version[arch]):
            for cid in [c for c in per_version[arch][tune] if (arch, tune, c) not in declared]:
                del per_version[arch][tune][cid]
            if not per_version[arch][tune]:
                del per_version[arch][tune]
        if not per_version[arch]:
            del per_version[arch]
    if not per_version:
        del data["triton"][version]
    data["note"] = "written by scripts/kernel_report.py --candidates --write-gates; read by fastformer.kernels.tuning"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


# facts that may not get worse than in the committed report of the same Triton version
BASELINE = {"spill_bytes": "not above", "loop_local_mem_ops": "not above", "blocks_per_sm": "not below"}


def baseline_path(version: str) -> Path:
    return ROOT / "bench" / "results" / f"kernel_report_triton-{version}.json"


def load_baseline(path: Path) -> dict:
    """The rows of a report JSON by (kernel, config, arch). Raises ValueError when it cannot be read."""
    try:
        return {(r["kernel"], r["config"], r["arch"]): r for r in json.loads(Path(path).read_text())["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read the baseline report {path}: {type(exc).__name__}: {exc}") from exc


def resolve_baseline(explicit: str | None, version: str) -> tuple:
    """(rows by key or None, note). An explicit file must be readable (ValueError otherwise); without
    one, the committed report of this Triton version, and when there is none, None and the note that
    says the no-regression gates are skipped."""
    if explicit:
        return load_baseline(Path(explicit)), ""
    path = baseline_path(version)
    if not path.exists():
        return None, (
            f"kernel_report: note: no committed report for triton {version} "
            f"({path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}): "
            "the no-regression gates were skipped"
        )
    return load_baseline(path), ""


def compare_baseline(rows: list, old: dict) -> list:
    """Verdicts 'no-regression:<field>' for every row that the committed report (load_baseline) also
    has (same kernel, config and arch): its spills and loop local-memory traffic not above, its
    occupancy not below."""
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


# set in the subprocess that --triton starts: that one never starts another
CHILD_ENV = "FASTFORMER_KERNEL_REPORT_TRITON"


def same_version(a: str, b: str) -> bool:
    """Whether two spellings name the same release (3.9 == 3.9.0; PEP 440, else trailing .0 ignored)."""
    try:
        from packaging.version import InvalidVersion, Version

        try:
            return Version(a) == Version(b)
        except InvalidVersion:
            pass
    except ImportError:
        pass

    def norm(v: str) -> list:
        parts = v.strip().lower().removeprefix("v").split(".")
        while len(parts) > 1 and parts[-1] == "0":
            parts.pop()
        return parts

    return norm(a) == norm(b)


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


def check_args(args) -> str | None:
    """The one-line error for a command line that cannot do what it asks (exit 2, before any build; under
    --check exit 1 means a gate failed, so a usage error must not look like one), else None."""
    if args.write_gates and not args.candidates:
        return "kernel_report: --write-gates records the tuning candidates' verdicts: give --candidates too"
    if args.family:
        from fastformer.kernels import registry

        try:
            registry.families(args.family)
        except ValueError as exc:
            return f"kernel_report: --family {' '.join(args.family)}: {exc}"
    return None


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
    error = check_args(args)
    if error:
        print(error, file=sys.stderr)
        return 2

    import triton

    if args.triton and not same_version(args.triton, triton.__version__):
        if os.environ.get(CHILD_ENV):
            print(
                f"kernel_report: asked for triton {args.triton}, but this subprocess (started for triton "
                f"{os.environ[CHILD_ENV]}) imports triton {triton.__version__} from {Path(triton.__file__).parent}",
                file=sys.stderr,
            )
            return 2
        site = _install_triton(args.triton, Path(args.cache))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")]))
        env[CHILD_ENV] = args.triton
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        return subprocess.run([sys.executable, __file__, *rest], env=env).returncode
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        print(f"kernel_report: this triton has no NVIDIA backend ({exc})", file=sys.stderr)
        return 2

    from fastformer.kernels import aot, registry

    baseline, baseline_note = None, ""
    if not args.no_baseline:
        try:
            baseline, baseline_note = resolve_baseline(args.baseline, triton.__version__)
        except ValueError as exc:
            print(f"kernel_report: {exc}", file=sys.stderr)
            return 2
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
    if not tasks or (args.check and not any(not t[3] for t in tasks)):
        what = ", ".join(
            f"{k} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in (("--family", args.family), ("--arch", args.arch), ("--match", args.match))
            if v is not None
        )
        print(
            f"kernel_report: the selection ({what or 'everything'}{', --ci' if args.ci else ''}) builds no case"
            + ("" if tasks else " and no candidate")
            + (": nothing to check" if args.check else ""),
            file=sys.stderr,
        )
        if args.check:
            return 2
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
    if baseline is not None:
        verdicts += compare_baseline(case_rows, baseline)
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
    if baseline_note:
        print(baseline_note)
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
