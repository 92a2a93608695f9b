"""Does pre-training pay off, and how many labels does it save? The whole experiment, through the CLI.

    python bench/pretraining_benefit.py --data-dir DIR [--work runs/pretraining_benefit] [--seeds 0 1 2]

DIR holds AG News as `unlabeled.txt` (one article per line, no labels), `dev.tsv` (the labelled pool)
and `test.tsv` (`text<TAB>label`). Every training run is a `python -m fastformer ...` subprocess with
the library's defaults unless a flag below says otherwise, exactly as a user would type it:

1. pre-training, per seed, on unlabeled.txt: MLM on an encoder preset (`--encoder`, default bert-tiny)
   and span corruption on an encoder-decoder preset (`--encoder-decoder`, default t5-tiny), each for
   `--pretrain-steps` steps (or a time budget with `--pretrain-minutes`);
2. fine-tuning on 100 / 1,000 / 10,001 labels from dev.tsv (seed s shuffles the pool; the sets are
   nested prefixes) in two arms: from the pre-trained folder (`finetune --init`) and from random
   weights with the same tokenizer and architecture (`finetune --model PRESET --tokenizer ...`);
   both arms see the same labels and the same seed; evaluation on all of test.tsv;
3. a bag-of-words logistic regression (bench/bow_baseline.py) on the same label sets.

Runs go under --work (one folder each); a run whose result file exists is skipped, so an interrupted
experiment continues where it stopped; `--summary-only` rewrites the results from the runs that finished
(e.g. the 10,001-label runs of one objective added by a later invocation). Results:
bench/results/pretraining_benefit_<tag>.{json,md,png} (mean ± std over seeds, the paired gains, and the
targets checked).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = (100, 1000, 10001)
ARMS = ("pretrained", "random")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(args: list[str], logfile: Path, threads: int) -> float:
    """`python -m fastformer ARGS` with its output in logfile; returns wall seconds; exits on failure."""
    cmd = [sys.executable, "-m", "fastformer", *map(str, args), "--device", "cpu", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    log("$ fastformer " + " ".join(map(str, args)))
    t0 = time.time()
    with open(logfile, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        sys.exit(f"command failed (exit {rc}); see {logfile}")
    return time.time() - t0


def overwrite_flag(out: Path) -> list[str]:
    """`--overwrite` to restart an unfinished run in its existing folder (a finished one is skipped)."""
    return ["--overwrite"] if out.exists() else []


def read_rows(path: Path) -> list[str]:
    return [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]


def label_sets(data_dir: Path, work: Path, seed: int) -> dict[int, Path]:
    """Nested prefixes of a seeded shuffle of dev.tsv, written once under work/labels/."""
    pool = read_rows(data_dir / "dev.tsv")
    random.Random(seed).shuffle(pool)
    out = {}
    for n in SIZES:
        path = work / "labels" / f"train{n}_seed{seed}.tsv"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("\n".join(pool[:n]) + "\n", encoding="utf-8")
        out[n] = path
    return out


def pretrain(a, obj: str, preset: str, seed: int, work: Path) -> Path:
    out = work / f"pretrain_{obj}_{preset}_seed{seed}"
    done = out / "done.json"
    if done.is_file():
        return out
    args = [
        "pretrain",
        "--objective",
        obj,
        "--model",
        preset,
        "--data",
        Path(a.data_dir) / "unlabeled.txt",
        "--seed",
        seed,
        "--out",
        out,
        *overwrite_flag(out),
        *shlex.split(a.pretrain_args),
    ]
    args += ["--max-minutes", a.pretrain_minutes] if a.pretrain_minutes else ["--steps", a.pretrain_steps]
    secs = cli(args, work / f"pretrain_{obj}_{preset}_seed{seed}.log", a.threads)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    ev = [r for r in rows if "eval_loss" in r]
    done.write_text(
        json.dumps(
            {
                "seconds": round(secs, 1),
                "steps": rows[-1]["step"],
                "final_loss": rows[-1]["loss"],
                "eval_loss": ev[-1]["eval_loss"] if ev else None,
                "eval_accuracy": ev[-1]["eval_accuracy"] if ev else None,
            },
            indent=2,
        )
    )
    return out


def finetune(a, obj: str, preset: str, arm: str, pre_dir: Path, train: Path, n: int, seed: int, work: Path) -> dict:
    out = work / f"finetune_{obj}_{preset}_{arm}_{n}_seed{seed}"
    if not (out / "eval.json").is_file():
        src = (
            ["--init", pre_dir]
            if arm == "pretrained"
            else ["--model", preset, "--tokenizer", pre_dir / "tokenizer.json"]
        )
        args = [
            "finetune",
            "--train",
            train,
            "--eval",
            Path(a.data_dir) / "test.tsv",
            *src,
            "--seed",
            seed,
            "--out",
            out,
            *overwrite_flag(out),
            *shlex.split(a.finetune_args),
        ]
        secs = cli(args, work / f"{out.name}.log", a.threads)
        (out / "wall_s.txt").write_text(f"{secs:.1f}\n")
    ev = json.loads((out / "eval.json").read_text())
    return {
        "objective": obj,
        "model": preset,
        "arm": arm,
        "labels": n,
        "seed": seed,
        "accuracy": ev["accuracy"],
        "n_eval": ev["n_eval"],
        "steps": ev["steps"],
        "epochs": ev.get("epochs"),
        "selected_step": ev.get("selected_step"),
        "seconds": float((out / "wall_s.txt").read_text()) if (out / "wall_s.txt").is_file() else None,
    }


def bow(a, train: Path, n: int, seed: int, work: Path) -> dict:
    out = work / f"bow_{n}_seed{seed}.json"
    if not out.is_file():
        log(f"bag-of-words baseline, {n} labels, seed {seed}")
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": str(ROOT)}
        rc = subprocess.call(
            [
                sys.executable,
                str(ROOT / "bench" / "bow_baseline.py"),
                "--train",
                str(train),
                "--eval",
                str(Path(a.data_dir) / "test.tsv"),
                "--seed",
                str(seed),
                "--out",
                str(out),
            ],
            cwd=ROOT,
            env=env,
        )
        if rc != 0:
            sys.exit(f"bow_baseline.py failed (exit {rc})")
    r = json.loads(out.read_text())
    return {
        "objective": "bow",
        "model": "bag-of-words",
        "arm": "linear",
        "labels": n,
        "seed": seed,
        "accuracy": r["accuracy"],
        "seconds": r["seconds"],
    }


def mean_std(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarise(results: list[dict], models: dict[str, str]) -> tuple[list[dict], list[str]]:
    """Per (objective, labels): mean ± std per arm and the paired gain; the benefit targets checked."""
    cells, checks = [], []
    acc = {(r["objective"], r["arm"], r["labels"], r["seed"]): r["accuracy"] for r in results}
    for obj in [*models, "bow"]:
        for n in SIZES:
            cell = {"objective": obj, "model": models.get(obj, "bag-of-words"), "labels": n}
            for arm in ("pretrained", "random", "linear"):
                xs = [v for (o, ar, m, _), v in acc.items() if (o, ar, m) == (obj, arm, n)]
                if xs:
                    cell[arm] = dict(zip(("mean", "std"), mean_std(xs)), n=len(xs))
            seeds = sorted(
                {s for (o, ar, m, s) in acc if (o, ar, m) == (obj, "pretrained", n)}
                & {s for (o, ar, m, s) in acc if (o, ar, m) == (obj, "random", n)}
            )
            if seeds:
                gains = [acc[obj, "pretrained", n, s] - acc[obj, "random", n, s] for s in seeds]
                cell["gain"] = dict(zip(("mean", "std"), mean_std(gains)), n=len(seeds))
            if len(cell) > 3:
                cells.append(cell)

    def g(obj, n):
        return next((c["gain"] for c in cells if c["objective"] == obj and c["labels"] == n and "gain" in c), None)

    def arm(obj, a, n):
        return next((c[a] for c in cells if c["objective"] == obj and c["labels"] == n and a in c), None)

    def check(name, ok, detail):
        checks.append(f"{'PASS' if ok else 'MISS'}  {name}: {detail}")

    for obj, n, want in (("mlm", 100, 0.10), ("mlm", 1000, 0.05), ("span", 100, 0.05)):
        x = g(obj, n)
        if x:
            check(f"{obj} gain at {n} labels >= {want:+.2f}", x["mean"] >= want, f"{x['mean']:+.3f} ± {x['std']:.3f}")
    x = g("mlm", 10001)
    if x:
        check("mlm never worse at 10,001 labels", x["mean"] >= 0, f"{x['mean']:+.3f} ± {x['std']:.3f}")
    p, r = arm("mlm", "pretrained", 1000), arm("mlm", "random", 10001)
    if p and r:
        check(
            "labels saved: mlm pre-trained @1,000 >= random @10,001",
            p["mean"] >= r["mean"],
            f"{p['mean']:.3f} vs {r['mean']:.3f}",
        )
    for c in cells:
        if "gain" in c and c["gain"]["n"] > 1:
            m, s = c["gain"]["mean"], c["gain"]["std"]
            check(f"{c['objective']} @{c['labels']}: gain > 2 x seed std", m > 2 * s, f"{m:+.3f} vs 2 x {s:.3f}")
    return cells, checks


def save(results, pre_info, cells, checks, a, models, started) -> None:
    out_dir = Path(a.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"pretraining_benefit_{a.tag}"
    settings = {
        k: (v if not isinstance(v, Path) else str(v))
        for k, v in vars(a).items()
        if k not in ("work", "results", "data_dir")
    }
    from harness import cpu_machine

    machine = cpu_machine(a.threads)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "settings": settings,
                "machine": machine,
                "wall_hours": round((time.time() - started) / 3600, 2),
                "pretraining": pre_info,
                "summary": cells,
                "checks": checks,
                "results": results,
            },
            indent=2,
        )
    )

    seeds = sorted({r["seed"] for r in results})

    def fmt(d):
        if not d:
            return "—"
        # a cell with fewer seeds than the table (an unfinished experiment) says how many
        return f"{d['mean']:.3f} ± {d['std']:.3f}" + (f" (n={d['n']})" if d.get("n", len(seeds)) < len(seeds) else "")

    lines = [
        f"AG News test accuracy (all rows of test.tsv), mean ± std over seeds {seeds}; gain = pre-trained − "
        "random init, paired by seed.",
        "",
        "| model (objective) | labels | random init | pre-trained | gain | bag-of-words |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        if c["objective"] == "bow":
            continue
        b = next((x.get("linear") for x in cells if x["objective"] == "bow" and x["labels"] == c["labels"]), None)
        gain = f"{c['gain']['mean']:+.3f} ± {c['gain']['std']:.3f}" if "gain" in c else "—"
        lines.append(
            f"| {c['model']} ({c['objective']}) | {c['labels']:,} | {fmt(c.get('random'))} | "
            f"{fmt(c.get('pretrained'))} | {gain} | {fmt(b)} |"
        )
    lines += ["", "Targets:", ""] + [f"- {x}" for x in checks]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.4))
    styles = {
        ("mlm", "pretrained"): ("tab:blue", "-o"),
        ("mlm", "random"): ("tab:blue", "--s"),
        ("span", "pretrained"): ("tab:orange", "-o"),
        ("span", "random"): ("tab:orange", "--s"),
        ("bow", "linear"): ("gray", ":^"),
    }
    for (obj, arm), (color, fmt_) in styles.items():
        pts = [(c["labels"], c[arm]["mean"], c[arm]["std"]) for c in cells if c["objective"] == obj and arm in c]
        if pts:
            xs, ys, es = zip(*pts)
            name = (
                "bag-of-words logistic regression"
                if obj == "bow"
                else f"{models[obj]} ({obj}), " + ("pre-trained" if arm == "pretrained" else "random init")
            )
            ax.errorbar(xs, ys, yerr=es, fmt=fmt_, color=color, capsize=3, label=name)
    ax.set_xscale("log")
    ax.axhline(0.25, color="lightgray", lw=0.8, ls=":")
    ax.set_xlabel("labelled training examples (AG News)")
    n_eval = next((r["n_eval"] for r in results if "n_eval" in r), None)
    ax.set_ylabel(f"test accuracy ({n_eval:,} rows)" if n_eval else "test accuracy")
    budget = f"{a.pretrain_minutes:g} min" if a.pretrain_minutes else f"{a.pretrain_steps} steps"
    ax.set_title(
        f"Pre-training on unlabeled.txt ({budget} each) vs random init; mean ± std over {len(seeds)} seeds", fontsize=8
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    log(f"saved {stem}.json .md .png")


def summary_only(a, work: Path, models: dict[str, str], started: float) -> None:
    """The results of the runs in `work` that finished (eval.json, done.json, the baselines' JSON)."""
    results, pre_info = [], {}
    for seed in a.seeds:
        for n in a.sizes:
            if (work / f"bow_{n}_seed{seed}.json").is_file():
                results.append(bow(a, Path("unused"), n, seed, work))
        for obj in a.objectives:
            pre_seed = a.seeds[0] if a.shared_pretraining else seed
            pre_dir = work / f"pretrain_{obj}_{models[obj]}_seed{pre_seed}"
            if (pre_dir / "done.json").is_file():
                pre_info[f"{obj}_seed{pre_seed}"] = json.loads((pre_dir / "done.json").read_text())
            for n in a.sizes:
                for arm in ARMS:
                    if (work / f"finetune_{obj}_{models[obj]}_{arm}_{n}_seed{seed}" / "eval.json").is_file():
                        results.append(finetune(a, obj, models[obj], arm, pre_dir, Path("unused"), n, seed, work))
    log(f"{len(results)} finished runs in {work}")
    cells, checks = summarise(results, models)
    save(results, pre_info, cells, checks, a, models, started)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder with unlabeled.txt, dev.tsv, test.tsv")
    p.add_argument("--work", default=str(ROOT / "runs" / "pretraining_benefit"), help="run folders (resumable)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--tag", default="cpu")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--objectives", nargs="+", default=["mlm", "span"], choices=["mlm", "span"])
    p.add_argument("--encoder", default="bert-tiny", help="preset pre-trained with MLM")
    p.add_argument("--encoder-decoder", default="t5-tiny", help="preset pre-trained with span corruption")
    p.add_argument("--pretrain-steps", type=int, default=10000)
    p.add_argument(
        "--pretrain-minutes",
        type=float,
        default=None,
        help="a time budget instead of --pretrain-steps (the schedule follows the clock)",
    )
    p.add_argument(
        "--shared-pretraining",
        action="store_true",
        help="pre-train once (seed of the first --seeds) instead of once per seed",
    )
    p.add_argument("--pretrain-args", default="", help="extra `fastformer pretrain` flags, one quoted string")
    p.add_argument("--finetune-args", default="", help="extra `fastformer finetune` flags, one quoted string")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument(
        "--summary-only",
        action="store_true",
        help="run nothing: rewrite the results from the finished runs in --work (a missing run is left out)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="label counts (subset of 100 1000 10001)")
    a = p.parse_args()
    data_dir = Path(a.data_dir)
    for f in ("unlabeled.txt", "dev.tsv", "test.tsv"):
        if not (data_dir / f).is_file():
            sys.exit(f"--data-dir {data_dir}: no {f}")
    if not set(a.sizes) <= set(SIZES):
        sys.exit(f"--sizes must be among {SIZES}")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    models = {o: (a.encoder if o == "mlm" else a.encoder_decoder) for o in a.objectives}
    started = time.time()
    n_ft = len(a.seeds) * len(a.objectives) * len(a.sizes) * 2
    log(
        f"{len(a.objectives) * (1 if a.shared_pretraining else len(a.seeds))} pre-training runs, {n_ft} fine-tuning "
        f"runs, {len(a.seeds) * len(a.sizes)} linear baselines; work folder {work}"
    )

    if a.summary_only:
        summary_only(a, work, models, started)
        return
    results, pre_info, done = [], {}, 0
    for seed in a.seeds:  # seed-major: an interrupted experiment still has whole seeds
        sets = label_sets(data_dir, work, seed)
        for n in a.sizes:
            results.append(bow(a, sets[n], n, seed, work))
        for obj in a.objectives:
            pre_seed = a.seeds[0] if a.shared_pretraining else seed
            pre_dir = pretrain(a, obj, models[obj], pre_seed, work)
            pre_info[f"{obj}_seed{pre_seed}"] = json.loads((pre_dir / "done.json").read_text())
            for n in a.sizes:
                for arm in ARMS:
                    r = finetune(a, obj, models[obj], arm, pre_dir, sets[n], n, seed, work)
                    results.append(r)
                    done += 1
                    log(
                        f"[{done}/{n_ft}] seed {seed} {models[obj]} {arm:10s} {n:6d} labels: accuracy "
                        f"{r['accuracy']:.4f} ({r['steps']} steps)"
                    )
        cells, checks = summarise(results, models)
        save(results, pre_info, cells, checks, a, models, started)


if __name__ == "__main__":
    main()
