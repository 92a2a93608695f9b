"""Does pre-training pay off, and how much labelled data does it save? (issue 7, README evidence)

    OMP_NUM_THREADS=1 python bench/pretraining_benefit.py [--data PATH] [--agnews DIR] [--work DIR]
                                                          [--pretrain-minutes M] [--ft-steps N] ...

Everything goes through the `fastformer` CLI (`python -m fastformer pretrain | finetune`):

1. Pre-train an encoder (MLM, bert-tiny) and an encoder-decoder (span corruption, t5-tiny) on a text
   corpus (default ../shared/data/tinyshakespeare.txt), each for at most --pretrain-minutes.
2. "Random init" controls: the same model with the *same tokenizer* (`--tokenizer`), the same seed and
   one optimizer step at lr 1e-12, i.e. the untrained initial weights in a folder `finetune --init` reads.
   Only the weights differ between the two arms.
3. Fine-tune each of the four on AG News with 1%, 10% and 100% of a training pool (default agnews/dev.tsv,
   ~10k rows), the same number of steps and learning rate for every run (no tuning), once per seed in
   --seeds: seed s shuffles the pool (the 1% set is inside the 10% set) and seeds the fine-tuning run;
   both arms see the same examples. Evaluation on test.tsv (all of it; --eval-rows N takes a fixed
   random subset). The table reports mean and standard deviation over the seeds.

Run folders (and the TSV subsets) go under --work (default runs/pretraining_benefit, git-ignored; no data
is copied into the repository). A run whose eval.json exists is not repeated, so an interrupted
experiment resumes. Results: bench/results/pretraining_benefit_<tag>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the project root (the worktrees live one level deeper: fall back to /work/shared).
SHARED = next((d for d in (ROOT.parent / "shared", Path("/work/shared")) if d.is_dir()), ROOT.parent / "shared")
MODELS = {"mlm": "bert-tiny", "span": "t5-tiny"}   # --encoder / --encoder-decoder change them
FRACTIONS = (0.01, 0.10, 1.00)


def _cli(args: list[str], log: Path) -> float:
    """Run `python -m fastformer ARGS` from the repository root; output to `log`. Returns wall seconds."""
    # --overwrite: the log goes into the run's --out folder, and a step reruns only when its run is incomplete
    cmd = [sys.executable, "-m", "fastformer", *args, "--device", "cpu", "--no-progress", "--overwrite"]
    print("$", " ".join(cmd[1:]), flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"command failed (exit {rc}), see {log}")
    return time.time() - t0


def _read_rows(path: Path) -> list[str]:
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    first = rows[0].split("\t")
    if first[-1].strip().lower() in ("label", "labels"):
        rows = rows[1:]
    return rows


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=str(SHARED / "data/tinyshakespeare.txt"))
    p.add_argument("--agnews", default=str(SHARED / "data/agnews"))
    p.add_argument("--work", default=str(ROOT / "runs/pretraining_benefit"))
    p.add_argument("--results", default=str(ROOT / "bench/results"))
    p.add_argument("--tag", default="cpu")
    p.add_argument("--pretrain-minutes", type=float, default=6.0)
    p.add_argument("--pretrain-steps", type=int, default=1500, help="schedule length (the time limit may stop earlier)")
    p.add_argument("--pretrain-seq-len", type=int, default=128)
    p.add_argument("--pretrain-batch-size", type=int, default=32)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--ft-steps", type=int, default=300)
    p.add_argument("--ft-batch-size", type=int, default=16)
    p.add_argument("--ft-lr", type=float, default=5e-4)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--eval-rows", type=int, default=0, help="0: the whole test set")
    p.add_argument("--seed", type=int, default=0, help="pre-training seed")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tuning seeds (and label subsets)")
    p.add_argument("--encoder", default=MODELS["mlm"], help="preset pre-trained with MLM")
    p.add_argument("--encoder-decoder", default=MODELS["span"], help="preset pre-trained with span corruption")
    p.add_argument("--objectives", nargs="+", default=list(MODELS), choices=list(MODELS))
    a = p.parse_args()
    MODELS.update(mlm=a.encoder, span=a.encoder_decoder)

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    # Labelled data: per seed one shuffle of the pool, nested 1% < 10% < 100% prefixes; one eval set.
    test = _read_rows(Path(a.agnews) / "test.tsv")
    if a.eval_rows:
        random.Random(a.seed).shuffle(test)
        test = test[: a.eval_rows]
    eval_tsv = _write(work / "eval.tsv", test)
    train_tsv = {}
    for seed in a.seeds:
        pool = _read_rows(Path(a.agnews) / "dev.tsv")
        random.Random(seed).shuffle(pool)
        for f in FRACTIONS:
            train_tsv[seed, f] = _write(work / f"train_{round(f * 100)}pct_seed{seed}.tsv",
                                        pool[: max(1, round(f * len(pool)))])

    timings: dict[str, float] = {}
    results = []
    pre_infos = {}
    for obj in a.objectives:
        model = MODELS[obj]
        pre, rnd = work / f"{obj}_pretrained", work / f"{obj}_random"
        common = ["--objective", obj, "--model", model, "--seq-len", str(a.pretrain_seq_len),
                  "--batch-size", str(a.pretrain_batch_size), "--seed", str(a.seed), "--eval-every", "100000",
                  "--log-every", "10"]
        if not (pre / "checkpoint.pt").is_file() or not (pre / "summary.json").is_file():
            pre.mkdir(parents=True, exist_ok=True)
            timings[f"pretrain_{obj}"] = _cli(
                ["pretrain", *common, "--data", a.data, "--steps", str(a.pretrain_steps), "--lr", str(a.pretrain_lr),
                 "--max-minutes", str(a.pretrain_minutes), "--vocab-size", str(a.vocab_size), "--out", str(pre)],
                pre / "log.txt")
            (pre / "summary.json").write_text(json.dumps({"seconds": timings[f"pretrain_{obj}"]}))
        if not (rnd / "checkpoint.pt").is_file():
            rnd.mkdir(parents=True, exist_ok=True)
            _cli(["pretrain", *common, "--data", a.data, "--steps", "1", "--lr", "1e-12",
                  "--tokenizer", str(pre / "tokenizer.json"), "--out", str(rnd)], rnd / "log.txt")
        pre_metrics = [json.loads(line) for line in (pre / "metrics.jsonl").read_text().splitlines() if line.strip()]
        last = pre_metrics[-1]
        pre_info = {"steps": last["step"], "final_loss": last["loss"],
                    "eval_loss": next((m["eval_loss"] for m in reversed(pre_metrics) if "eval_loss" in m), None),
                    "eval_accuracy": next((m["eval_accuracy"] for m in reversed(pre_metrics) if "eval_accuracy" in m),
                                          None),
                    "tokens_seen": last["step"] * a.pretrain_batch_size * a.pretrain_seq_len,
                    "seconds": json.loads((pre / "summary.json").read_text())["seconds"]}
        pre_infos[obj] = pre_info

    # Seed-major order: an interrupted run still has complete seeds.
    for seed in a.seeds:
        for obj in a.objectives:
            model = MODELS[obj]
            for init_name in ("pretrained", "random"):
                init_dir = work / f"{obj}_{init_name}"
                for f in FRACTIONS:
                    out = work / f"ft_{obj}_{init_name}_{round(f * 100)}pct_seed{seed}"
                    if not (out / "eval.json").is_file():
                        out.mkdir(parents=True, exist_ok=True)
                        t = _cli(["finetune", "--init", str(init_dir), "--train", str(train_tsv[seed, f]),
                                  "--eval", str(eval_tsv), "--steps", str(a.ft_steps), "--batch-size",
                                  str(a.ft_batch_size), "--lr", str(a.ft_lr), "--max-len", str(a.max_len),
                                  "--seed", str(seed), "--log-every", "50", "--out", str(out)], out / "log.txt")
                        (out / "wall_s.txt").write_text(f"{t:.1f}\n")
                    ev = json.loads((out / "eval.json").read_text())
                    results.append({"objective": obj, "model": model, "init": init_name, "fraction": f,
                                    "seed": seed, "n_train": ev["n_train"], "n_eval": ev["n_eval"],
                                    "accuracy": ev["accuracy"], "eval_loss": ev["eval_loss"], "steps": ev["steps"]})
                    print(f"  seed {seed} {model:10s} {init_name:10s} {ev['n_train']:6d} labels  "
                          f"accuracy {ev['accuracy']:.4f}", flush=True)
        _save(results, pre_infos, a, Path(a.results))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def _save(results: list[dict], pre_infos: dict, a: argparse.Namespace, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"pretraining_benefit_{a.tag}"
    settings = {k: v for k, v in vars(a).items() if k not in ("work", "results")}
    settings["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
    seeds = sorted({r["seed"] for r in results})
    summary = []
    for obj in a.objectives:
        for f in FRACTIONS:
            cell = {"objective": obj, "model": MODELS[obj], "fraction": f, "seeds": seeds}
            for init in ("random", "pretrained"):
                rs = [x for x in results if x["objective"] == obj and x["fraction"] == f and x["init"] == init]
                if rs:
                    cell["n_train"] = rs[0]["n_train"]
                    cell[f"{init}_mean"], cell[f"{init}_std"] = _mean_std([x["accuracy"] for x in rs])
                    cell[f"{init}_n"] = len(rs)
            gains = [p["accuracy"] - r["accuracy"] for p in results for r in results
                     if p["objective"] == r["objective"] == obj and p["fraction"] == r["fraction"] == f
                     and p["seed"] == r["seed"] and p["init"] == "pretrained" and r["init"] == "random"]
            if gains:
                cell["gain_mean"], cell["gain_std"] = _mean_std(gains)
                summary.append(cell)
    stem.with_suffix(".json").write_text(json.dumps({"settings": settings, "pretraining": pre_infos,
                                                     "summary": summary, "results": results}, indent=2))

    lines = [f"Test accuracy, mean ± std over seeds {seeds}:", "",
             "| model (objective) | labels | random init | pre-trained | gain (paired) |", "|---|---:|---:|---:|---:|"]
    for c in summary:
        lines.append(f"| {c['model']} ({c['objective']}) | {c['n_train']} ({c['fraction']:.0%}) | "
                     f"{c['random_mean']:.3f} ± {c['random_std']:.3f} | {c['pretrained_mean']:.3f} ± "
                     f"{c['pretrained_std']:.3f} | {c['gain_mean']:+.3f} ± {c['gain_std']:.3f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for obj, color in zip(a.objectives, ("tab:blue", "tab:orange")):
        for init, style in (("pretrained", "-o"), ("random", "--s")):
            pts = [(c["n_train"], c[f"{init}_mean"], c[f"{init}_std"]) for c in summary if c["objective"] == obj]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(xs, ys, yerr=es, fmt=style, color=color, capsize=3,
                            label=f"{MODELS[obj]} ({obj}), {init}")
    ax.set_xscale("log")
    ax.axhline(0.25, color="gray", lw=0.8, ls=":", label="chance (4 classes)")
    ax.set_xlabel("AG News training labels")
    n_eval = results[0]["n_eval"] if results else 0
    ax.set_ylabel(f"AG News test accuracy ({n_eval} rows)")
    ax.set_title(f"Pre-training on {Path(a.data).name} (<= {a.pretrain_minutes:g} min CPU each), "
                 f"{a.ft_steps} fine-tuning steps; mean ± std over {len(seeds)} seeds", fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(stem.with_suffix(".png"), dpi=120)
    print(f"saved {stem}.json .md .png")


if __name__ == "__main__":
    main()
