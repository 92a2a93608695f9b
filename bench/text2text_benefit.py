"""Text-to-text: does span pre-training pay off for generation, and is classification as text as good
as a classification head?

    OMP_NUM_THREADS=1 python bench/text2text_benefit.py --data-dir AGNEWS_DIR [--pretrained DIR]
        [--estimate] [--jobs 2] [--work DIR] [--tag cpu] ...

Everything trains and evaluates through the `fastformer` CLI (`python -m fastformer pretrain | finetune`):

0. The span pre-trained encoder-decoder: --pretrained DIR (a `pretrain --objective span` run folder,
   e.g. the one bench/pretraining_benefit.py wrote), or one pre-trained here on DATA/unlabeled.txt with
   the --pretrain-* settings. The random-init control is the same preset with the *same tokenizer*
   (`pretrain --tokenizer`) after one optimizer step at lr 1e-12 (its untrained initial weights in a
   folder `--init` reads): between the two arms only the weights differ (checked: equal model_config).
1. Headlines (DATA/headlines): `finetune --task text2text` on --pairs training pairs (default 1,000 and
   all 42,927) from the pre-trained and from the random-init model, once per seed in --seeds (seed s
   draws the 1,000-pair subset and seeds the run; both arms see the same pairs); ROUGE-1/2/L and exact
   match of greedy generation on headlines/test.tsv. Beside them the lead-N baseline (the first
   --lead-words words of the description, default 10), scored by the same ROUGE code.
2. AG News classification (DATA/dev.tsv, DATA/test.tsv) from the pre-trained model, at --labels
   training labels (default 100, 1,000 and 10,001 = all of dev.tsv; seed s shuffles dev.tsv, the
   smaller sets are prefixes of the larger): classification as text (`--task text2text`, the label
   word is the target; exact match = accuracy) against the encoder with a classification head
   (`--task classify`), with the same steps, batch size and learning rate; test accuracy on test.tsv.
   --cls-random adds both methods from the random-init model.

Run folders, subsets and logs go under --work (default runs/text2text_benefit, git-ignored; no data is
copied into the repository). A run whose eval.json exists is not repeated, a run with a checkpoint but
no eval.json is continued with `--resume`, so an interrupted experiment (Ctrl-C stops the runs with a
checkpoint) picks up where it stopped. --jobs N runs N fine-tuning runs at a time (one thread each is
what a 2-core machine wants). Results: bench/results/text2text_benefit_<tag>.{json,md,png}, rewritten
after every finished run.

--select-decoding N adds a decoding choice for the headline runs (bench/decoding_choice.py): each
finished run generates for the test pairs again with every setting of a grid (encoder repetition
penalty --decoding-penalties x no-repeat n-gram size --decoding-no-repeat); per training-pair count the
setting with the best mean ROUGE-L over both arms and all seeds on the first N test pairs is chosen,
and every run is scored on the other test pairs with it and with plain greedy decoding (the lead
baseline too), so the pairs that chose a setting never score it. Generations are cached in the run
folders (decoding/).

--estimate measures instead: a few steps of each kind of run (pre-training if needed, headline and
classification fine-tuning, the classifier) and a few generated examples, then prints the single-thread
time each part of the experiment would take with the current settings, saves it in the --work folder
(estimate_<tag>.json), and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_print_lock = threading.Lock()


def say(*parts) -> None:
    with _print_lock:
        print(*parts, flush=True)


# ---------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------


def read_rows(path: Path, header_words: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Rows of a TSV as (header or [], data rows); a first row whose last cell is a header word is the header."""
    rows = [r for r in path.read_text(encoding="utf-8").splitlines() if r.strip()]
    if rows and rows[0].split("\t")[-1].strip().lower() in header_words:
        return [rows[0]], rows[1:]
    return [], rows


def write_rows(path: Path, header: list[str], rows: list[str]) -> Path:
    if not path.is_file() or path.read_text(encoding="utf-8") != "\n".join(header + rows) + "\n":
        path.write_text("\n".join(header + rows) + "\n", encoding="utf-8")
    return path


def lead_baseline(test_tsv: Path, words: int) -> dict:
    """ROUGE / exact match of the first `words` words of each input against its target."""
    from decoding_choice import lead_texts

    from fastformer.data.text2text import read_pairs
    from fastformer.train.text_metrics import exact_match, rouge

    inputs, targets = read_pairs(test_tsv)
    preds = lead_texts(inputs, words)
    return {
        "method": f"lead-{words}",
        **rouge(preds, targets),
        "exact_match": exact_match(preds, targets),
        "n_eval": len(inputs),
    }


# ---------------------------------------------------------------------------------------------------
# running the CLI
# ---------------------------------------------------------------------------------------------------


class RunFailed(RuntimeError):
    pass


class RunInterrupted(RunFailed):
    """The run stopped on SIGINT / SIGTERM (its checkpoint is saved: a rerun resumes it)."""


def cli(args: list[str], log: Path, threads: int | None) -> float:
    """`python -m fastformer ARGS --device cpu --no-progress [--threads N]`, output to `log`; wall seconds."""
    cmd = [sys.executable, "-m", "fastformer", *args, "--device", "cpu", "--no-progress"]
    if threads:
        cmd += ["--threads", str(threads)]
    say("$", " ".join(cmd[1:]))
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd[1:])}\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if rc in (130, 143):
        raise RunInterrupted(f"interrupted (exit {rc}): {log}")
    if rc != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RunFailed(f"exit {rc}: {' '.join(cmd[1:])}\n  " + "\n  ".join(tail) + f"\n(full log: {log})")
    return time.time() - t0


def run_or_resume(args: list[str], out: Path, log: Path, threads: int | None, key: dict) -> tuple[dict, float]:
    """A fine-tuning run into `out`: skipped when eval.json exists, continued when a checkpoint does.
    `key` (the command and the pre-trained folder) must equal the one recorded when the run started:
    results of other settings are never mixed in. Returns (eval.json, wall seconds of this call, 0 when
    skipped)."""
    record = log.with_suffix(".key.json")
    if (out / "checkpoint.pt").is_file() and record.is_file() and json.loads(record.read_text()) != key:
        raise RunFailed(
            f"{out} was run with other settings ({record}); use another --work for new settings, or "
            "delete that run folder to redo it"
        )
    if (out / "eval.json").is_file():
        return json.loads((out / "eval.json").read_text()), 0.0
    log.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(key))
    if (out / "checkpoint.pt").is_file():
        wall = cli(["finetune", "--out", str(out), "--resume"], log, threads)
    else:
        wall = cli([*args, "--out", str(out), "--overwrite"], log, threads)
    return json.loads((out / "eval.json").read_text()), wall


@dataclass
class Job:
    name: str
    part: str  # "headlines" | "classification"
    args: list[str]
    info: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# the pre-trained and the random-init models
# ---------------------------------------------------------------------------------------------------


def pretrain_args(a, data: Path, steps: int) -> list[str]:
    return [
        "pretrain",
        "--objective",
        "span",
        "--model",
        a.pretrain_model,
        "--data",
        str(data),
        "--steps",
        str(steps),
        "--seq-len",
        str(a.pretrain_seq_len),
        "--batch-size",
        str(a.pretrain_batch_size),
        "--lr",
        str(a.pretrain_lr),
        "--vocab-size",
        str(a.vocab_size),
        "--seed",
        str(a.pretrain_seed),
        "--eval-every",
        str(a.pretrain_eval_every),
        "--save-every",
        "500",
        "--log-every",
        "50",
    ]


def ensure_pretrained(a, work: Path, data_dir: Path) -> Path:
    if a.pretrained:
        pre = Path(a.pretrained).resolve()
        cfg = json.loads((pre / "config.json").read_text())
        if cfg.get("objective") != "span" or cfg.get("run", "pretrain") != "pretrain":
            sys.exit(f"--pretrained {pre}: not a span pre-training run folder (objective {cfg.get('objective')!r})")
        return pre
    pre = work / "span_pretrained"
    done = work / "span_pretrained.done"
    if not done.is_file():
        log = work / "logs" / "span_pretrained.log"
        extra = ["--max-minutes", str(a.pretrain_minutes)] if a.pretrain_minutes else []
        if (pre / "checkpoint.pt").is_file():
            wall = cli(["pretrain", "--out", str(pre), "--resume"], log, a.threads)
        else:
            wall = cli(
                [
                    *pretrain_args(a, data_dir / "unlabeled.txt", a.pretrain_steps),
                    *extra,
                    "--out",
                    str(pre),
                    "--overwrite",
                ],
                log,
                a.threads,
            )
        done.write_text(json.dumps({"wall_seconds": wall}))
    return pre


def ensure_random(a, work: Path, pre: Path, data_dir: Path) -> Path:
    """The pre-trained model's preset and tokenizer, untrained weights (one step at lr 1e-12)."""
    cfg = json.loads((pre / "config.json").read_text())
    rnd = work / "span_random"
    same_tok = (rnd / "tokenizer.json").is_file() and (rnd / "tokenizer.json").read_text() == (
        pre / "tokenizer.json"
    ).read_text()
    if not (rnd / "checkpoint.pt").is_file() or not same_tok:
        # one step needs only a little text: the first lines of the corpus
        lines = (data_dir / "unlabeled.txt").read_text(encoding="utf-8").splitlines()[:400]
        small = write_rows(work / "random_init_corpus.txt", [], lines)
        train = cfg.get("train") or {}
        cli(
            [
                "pretrain",
                "--objective",
                "span",
                "--model",
                cfg["model"],
                "--data",
                str(small),
                "--tokenizer",
                str(pre / "tokenizer.json"),
                "--steps",
                "1",
                "--lr",
                "1e-12",
                "--seq-len",
                str(train.get("seq_len", 128)),
                "--batch-size",
                "2",
                "--seed",
                str(a.pretrain_seed),
                "--eval-every",
                "100000",
                "--out",
                str(rnd),
                "--overwrite",
            ],
            work / "logs" / "span_random.log",
            a.threads,
        )
    mine = json.loads((rnd / "config.json").read_text())["model_config"]
    if mine != cfg["model_config"]:
        sys.exit(
            f"the random-init model {rnd} does not have the architecture of {pre}: {mine} vs {cfg['model_config']}"
        )
    return rnd


def pretraining_info(pre: Path) -> dict:
    cfg = json.loads((pre / "config.json").read_text())
    rows = [json.loads(x) for x in (pre / "metrics.jsonl").read_text().splitlines() if x.strip()]
    last = rows[-1] if rows else {}
    ev = next((r for r in reversed(rows) if "eval_loss" in r), {})
    train = cfg.get("train") or {}
    return {
        "folder": str(pre),
        "model": cfg.get("model"),
        "n_parameters": cfg.get("n_parameters"),
        "data": cfg.get("data"),
        "steps": last.get("step"),
        "final_loss": last.get("loss"),
        "eval_loss": ev.get("eval_loss"),
        "eval_token_accuracy": ev.get("eval_accuracy"),
        "seq_len": train.get("seq_len"),
        "batch_size": train.get("batch_size"),
        "vocab_size": cfg["model_config"].get("vocab_size"),
    }


# ---------------------------------------------------------------------------------------------------
# the runs
# ---------------------------------------------------------------------------------------------------


def headline_args(a, init: Path, train: Path, test: Path, seed: int, steps: int) -> list[str]:
    args = [
        "finetune",
        "--task",
        "text2text",
        "--init",
        str(init),
        "--train",
        str(train),
        "--eval",
        str(test),
        "--steps",
        str(steps),
        "--batch-size",
        str(a.batch_size),
        "--lr",
        str(a.lr),
        "--seed",
        str(seed),
        "--max-len",
        str(a.max_len),
        "--max-target-len",
        str(a.max_target_len),
        "--log-every",
        "50",
    ]
    if a.dropout is not None:
        args += ["--dropout", str(a.dropout)]
    if a.num_beams != 1:
        args += ["--num-beams", str(a.num_beams)]
    return args


def cls_args(a, method: str, init: Path, train: Path, test: Path, seed: int) -> list[str]:
    args = [
        "finetune",
        "--init",
        str(init),
        "--train",
        str(train),
        "--eval",
        str(test),
        "--steps",
        str(a.cls_steps),
        "--batch-size",
        str(a.cls_batch_size),
        "--lr",
        str(a.cls_lr),
        "--seed",
        str(seed),
        "--max-len",
        str(a.cls_max_len),
        "--log-every",
        "50",
    ]
    if method == "text":
        args += ["--task", "text2text", "--max-target-len", "8"]
    return args


def pair_count(spec: str, total: int) -> int:
    return total if spec == "all" else min(int(spec), total)


def plan(a, work: Path, data_dir: Path, inits: dict[str, Path]) -> list[Job]:
    """Every run of the experiment, seed-major (an interrupted experiment has whole seeds)."""
    sub = work / "data"
    sub.mkdir(parents=True, exist_ok=True)
    h_head, h_train = read_rows(data_dir / "headlines" / "train.tsv", ("target", "headline"))
    h_head_t, h_test = read_rows(data_dir / "headlines" / "test.tsv", ("target", "headline"))
    if a.eval_rows:
        h_test = h_test[: a.eval_rows]
    h_test_tsv = write_rows(sub / "headlines_test.tsv", h_head_t or ["input\ttarget"], h_test)
    _, c_pool = read_rows(data_dir / "dev.tsv", ("label",))
    _, c_test = read_rows(data_dir / "test.tsv", ("label",))
    if a.cls_eval_rows:
        random.Random(12345).shuffle(c_test)
        c_test = c_test[: a.cls_eval_rows]
    c_test_tsv = write_rows(sub / "agnews_test.tsv", ["text\tlabel"], c_test)
    jobs = []
    for seed in a.seeds:
        order = list(range(len(h_train)))
        random.Random(seed).shuffle(order)
        for spec in a.pairs:
            n = pair_count(spec, len(h_train))
            train = data_dir / "headlines" / "train.tsv"
            if n < len(h_train):
                train = write_rows(
                    sub / f"headlines_{n}_seed{seed}.tsv", h_head or ["input\ttarget"], [h_train[i] for i in order[:n]]
                )
            steps = a.steps_all if spec == "all" or n == len(h_train) else a.steps
            for init in ("pretrained", "random"):
                jobs.append(
                    Job(
                        f"headlines_{init}_{n}_seed{seed}",
                        "headlines",
                        headline_args(a, inits[init], train, h_test_tsv, seed, steps),
                        {"init": init, "n_train": n, "seed": seed, "steps": steps},
                    )
                )
        pool = list(c_pool)
        random.Random(seed).shuffle(pool)
        for n in a.labels:
            n = min(n, len(pool))
            train = write_rows(sub / f"agnews_{n}_seed{seed}.tsv", ["text\tlabel"], pool[:n])
            for init in ("pretrained", "random") if a.cls_random else ("pretrained",):
                for method in ("text", "head"):
                    jobs.append(
                        Job(
                            f"agnews_{method}_{init}_{n}_seed{seed}",
                            "classification",
                            cls_args(a, method, inits[init], train, c_test_tsv, seed),
                            {"method": method, "init": init, "n_train": n, "seed": seed, "steps": a.cls_steps},
                        )
                    )
    return jobs


def row_of(job: Job, ev: dict, wall: float) -> dict:
    row = {
        **job.info,
        "name": job.name,
        "part": job.part,
        "n_eval": ev["n_eval"],
        "steps_done": ev["steps"],
        "train_seconds": ev.get("seconds"),
        "wall_seconds": wall or None,
    }
    if job.part == "headlines" or job.info.get("method") == "text":
        row.update({k: ev[k] for k in ("rouge1", "rouge2", "rougeL", "exact_match", "eval_loss")})
        row["generation_seconds"] = ev.get("generation_seconds")
    if job.part == "classification":
        row["accuracy"] = ev["accuracy"]
    return row


def run_jobs(a, jobs: list[Job], work: Path, pre_folder: Path, save) -> list[dict]:
    results: list[dict] = []
    todo = [j for j in jobs]
    done_walls: list[float] = []
    t_start = time.time()
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        running = {}
        failed = None
        while todo or running:
            while todo and len(running) < a.jobs and failed is None:
                job = todo.pop(0)
                out = work / job.name
                key = {"args": job.args, "pretrained": str(pre_folder)}
                fut = pool.submit(run_or_resume, job.args, out, work / "logs" / f"{job.name}.log", a.threads, key)
                running[fut] = job
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = running.pop(fut)
                try:
                    ev, wall = fut.result()
                except RunInterrupted as e:
                    failed = failed or e
                    say(f"{job.name}: {e}")
                    continue
                except RunFailed as e:
                    failed = failed or e
                    say(f"FAILED {job.name}: {e}")
                    continue
                results.append(row_of(job, ev, wall))
                if wall:
                    done_walls.append(wall)
                left = len(todo) + len(running)
                eta = ""
                if done_walls and left:
                    per = sum(done_walls) / len(done_walls)
                    eta = f", about {per * left / a.jobs / 60:.0f} min left at {per / 60:.1f} min per run"
                score = f"ROUGE-L {ev['rougeL']:.4f}" if job.part == "headlines" else f"accuracy {ev['accuracy']:.4f}"
                say(
                    f"[{len(results)}/{len(jobs)}] {job.name}: {score}"
                    f"{f' ({wall / 60:.1f} min)' if wall else ' (done before)'}{eta}"
                )
                save(results)
        if isinstance(failed, RunInterrupted):
            sys.exit(
                "interrupted: run the same command again to continue (finished runs are kept, "
                "interrupted ones resume from their checkpoint)"
            )
        if failed is not None:
            sys.exit("stopped after a failed run (see above); the finished runs are kept")
    say(f"all {len(jobs)} runs finished ({(time.time() - t_start) / 60:.0f} min this session)")
    return results


# ---------------------------------------------------------------------------------------------------
# --select-decoding: one decoding setting per pair count, chosen on held-out test pairs
# ---------------------------------------------------------------------------------------------------


def select_decoding(a, work: Path, results: list[dict], test_tsv: Path) -> list[dict]:
    """For each headline pair count: the chosen setting and the scores on the test pairs after the
    first --select-decoding (see bench/decoding_choice.py)."""
    import torch
    from decoding_choice import choose_and_score, decoding_grid, lead_texts, run_predictions

    from fastformer.data.text2text import read_pairs
    from fastformer.train.text_metrics import rouge

    if a.threads:
        torch.set_num_threads(a.threads)
    grid = decoding_grid(a.decoding_penalties, a.decoding_no_repeat)
    inputs, targets = read_pairs(test_tsv)
    n_sel = a.select_decoding
    lead = lead_texts(inputs, a.lead_words)
    cells = []
    for n in sorted({r["n_train"] for r in results if r["part"] == "headlines"}):
        rows = [r for r in results if r["part"] == "headlines" and r["n_train"] == n]
        preds = {
            r["name"]: run_predictions(work / r["name"], grid, inputs, num_beams=a.num_beams, log=say) for r in rows
        }
        got = choose_and_score(preds, targets, n_sel, rouge, lead=lead)
        cell = {"n_train": n, **{k: v for k, v in got.items() if k != "scores"}}
        cell["runs_rougeL"] = {
            r: {w: got["scores"][r][w]["rougeL"] for w in ("plain", "chosen")} for r in got["scores"]
        }
        scored = [{**r, **got["scores"][r["name"]]} for r in rows]  # each run's row with its plain / chosen ROUGE
        for init in ("pretrained", "random"):
            mine = [r for r in scored if r["init"] == init]
            if mine:
                cell[init] = {"seeds": sorted(r["seed"] for r in mine)}
                for which in ("plain", "chosen"):
                    cell[init][which] = {
                        k: mean_std([r[which][k] for r in mine]) for k in ("rouge1", "rouge2", "rougeL")
                    }
        for which in ("plain", "chosen"):
            flat = [{**r, "rougeL": r[which]["rougeL"]} for r in scored]
            gain = paired(flat, "rougeL", {"init": "pretrained"}, {"init": "random"}, {})
            if gain:
                cell[f"rougeL_gain_{which}"] = mean_std(gain)
        cells.append(cell)
        say(f"decoding for {n:,} pairs: chose {cell['chosen']}")
    return cells


def decoding_markdown(cells: list[dict], settings: dict) -> str:
    """The --select-decoding cells (the script's .md file and bench/README.md alike); `settings`: the
    run's flags (decoding_penalties, decoding_no_repeat, lead_words)."""
    lines = []
    for c in cells:
        ch = c["chosen"]
        lines += [
            "",
            f"Decoding chosen on the first {c['n_select']} test pairs (mean ROUGE-L over both arms and all "
            f"seeds; grid: encoder repetition penalty {settings.get('decoding_penalties')} x no-repeat n-gram "
            f"size {settings.get('decoding_no_repeat')}), {c['n_train']:,} training pairs: encoder repetition penalty "
            f"{ch['encoder_repetition_penalty']:g}, no-repeat n-gram size {ch['no_repeat_ngram_size']}. "
            f"Scored on the other {c['n_scored']} test pairs:",
            "",
            "| init | decoding | ROUGE-1 | ROUGE-2 | ROUGE-L |",
            "|---|---|---:|---:|---:|",
            f"| lead-{settings.get('lead_words')} baseline | — | {c['lead_baseline']['rouge1']:.4f} | "
            f"{c['lead_baseline']['rouge2']:.4f} | {c['lead_baseline']['rougeL']:.4f} |",
        ]
        for init in ("random", "pretrained"):
            for which in ("plain", "chosen"):
                if init in c:
                    s = c[init][which]
                    lines.append(
                        f"| {init} | {which} | {_fmt(s['rouge1'])} | {_fmt(s['rouge2'])} | {_fmt(s['rougeL'])} |"
                    )
        for which in ("plain", "chosen"):
            g = c.get(f"rougeL_gain_{which}")
            if g:
                gain = f"{g[0] * 100:+.2f} ± {g[1] * 100:.2f} points"
                lines.append(f"\nROUGE-L gain of pre-training, {which} decoding (paired): {gain}")
    return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------


def mean_std(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, ((sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0)


def paired(results: list[dict], key: str, a_sel: dict, b_sel: dict, common: dict) -> list[float]:
    """a - b per seed for rows matching `common` plus each side's selector."""

    def pick(sel):
        return {r["seed"]: r[key] for r in results if all(r.get(k) == v for k, v in {**common, **sel}.items())}

    A, B = pick(a_sel), pick(b_sel)
    return [A[s] - B[s] for s in sorted(set(A) & set(B))]


def summarize(results: list[dict]) -> dict:
    head, cls = [], []
    for n in sorted({r["n_train"] for r in results if r["part"] == "headlines"}):
        cell = {"n_train": n}
        for init in ("pretrained", "random"):
            rs = [r for r in results if r["part"] == "headlines" and r["n_train"] == n and r["init"] == init]
            if rs:
                cell[init] = {k: mean_std([r[k] for r in rs]) for k in ("rouge1", "rouge2", "rougeL", "exact_match")}
                cell[init]["seeds"] = sorted(r["seed"] for r in rs)
        gain = paired(
            results, "rougeL", {"init": "pretrained"}, {"init": "random"}, {"part": "headlines", "n_train": n}
        )
        if gain:
            cell["rougeL_gain"] = mean_std(gain)
        head.append(cell)
    for init in ("pretrained", "random"):
        for n in sorted({r["n_train"] for r in results if r["part"] == "classification" and r["init"] == init}):
            cell = {"init": init, "n_train": n}
            for method in ("text", "head"):
                rs = [
                    r
                    for r in results
                    if r["part"] == "classification"
                    and r["init"] == init
                    and r["n_train"] == n
                    and r["method"] == method
                ]
                if rs:
                    cell[method] = mean_std([r["accuracy"] for r in rs]) + (sorted(r["seed"] for r in rs),)
            diff = paired(
                results,
                "accuracy",
                {"method": "text"},
                {"method": "head"},
                {"part": "classification", "n_train": n, "init": init},
            )
            if diff:
                cell["text_minus_head"] = mean_std(diff)
            cls.append(cell)
    return {"headlines": head, "classification": cls}


def _fmt(ms, digits=4):
    return f"{ms[0]:.{digits}f} ± {ms[1]:.{digits}f}" if ms else "—"


def markdown(summary: dict, baseline: dict, pre: dict, a) -> str:
    data = ", ".join(Path(x).name for x in pre.get("data") or []) or "?"
    lines = [
        f"Span pre-trained {pre.get('model')} ({pre.get('steps')} steps on {data}), fine-tuned through "
        f"the CLI; mean ± std over seeds {sorted(a.seeds)} (paired differences per seed).",
        "",
        f"Headlines (description → headline), ROUGE on {baseline['n_eval']} test pairs, greedy generation:",
        "",
        "| training pairs | init | ROUGE-1 | ROUGE-2 | ROUGE-L | exact match |",
        "|---:|---|---:|---:|---:|---:|",
        f"| — | {baseline['method']} baseline | {baseline['rouge1']:.4f} | {baseline['rouge2']:.4f} | "
        f"{baseline['rougeL']:.4f} | {baseline['exact_match']:.4f} |",
    ]
    for c in summary["headlines"]:
        for init in ("random", "pretrained"):
            if init in c:
                s = c[init]
                lines.append(
                    f"| {c['n_train']:,} | {init} | {_fmt(s['rouge1'])} | {_fmt(s['rouge2'])} | "
                    f"{_fmt(s['rougeL'])} | {_fmt(s['exact_match'])} |"
                )
    lines += ["", "| training pairs | ROUGE-L gain of pre-training (paired) |", "|---:|---:|"]
    for c in summary["headlines"]:
        if "rougeL_gain" in c:
            lines.append(
                f"| {c['n_train']:,} | {c['rougeL_gain'][0] * 100:+.2f} ± {c['rougeL_gain'][1] * 100:.2f} points |"
            )
    if summary["classification"]:
        lines += [
            "",
            "AG News classification, test accuracy (classification as text = exact match of the generated label word):",
            "",
            "| init | labels | as text (text2text) | encoder + head (classify) | text − head (paired) |",
            "|---|---:|---:|---:|---:|",
        ]
        for c in summary["classification"]:
            t, h = c.get("text"), c.get("head")
            lines.append(
                f"| {c['init']} | {c['n_train']:,} | {_fmt(t[:2] if t else None)} | "
                f"{_fmt(h[:2] if h else None)} | {_fmt(c.get('text_minus_head'))} |"
            )
    return "\n".join(lines) + "\n"


def plot(summary: dict, baseline: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ax = axes[0]
    for init, style in (("pretrained", "-o"), ("random", "--s")):
        pts = [(c["n_train"], *c[init]["rougeL"]) for c in summary["headlines"] if init in c]
        if pts:
            xs, ys, es = zip(*pts)
            ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=f"{init} init")
    ax.axhline(baseline["rougeL"], color="gray", ls=":", label=f"{baseline['method']} baseline")
    ax.set_xscale("log")
    ax.set_xlabel("headline training pairs")
    ax.set_ylabel(f"ROUGE-L ({baseline['n_eval']} test pairs)")
    ax.set_title("description → headline", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    for init in ("pretrained", "random"):
        for method, style in (("text", "-o"), ("head", "--s")):
            pts = [
                (c["n_train"], *c[method][:2]) for c in summary["classification"] if c["init"] == init and method in c
            ]
            if pts:
                xs, ys, es = zip(*pts)
                ax.errorbar(
                    xs,
                    ys,
                    yerr=es,
                    fmt=style,
                    capsize=3,
                    label=f"{'as text' if method == 'text' else 'encoder + head'}, {init}",
                )
    ax.axhline(0.25, color="gray", ls=":", lw=0.8, label="chance (4 classes)")
    ax.set_xscale("log")
    ax.set_xlabel("AG News training labels")
    ax.set_ylabel("test accuracy")
    ax.set_title("classification as text vs a classification head", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------
# --estimate: measured speed of each kind of run
# ---------------------------------------------------------------------------------------------------


def _probe(args: list[str], out: Path, log: Path, threads) -> tuple[dict, float]:
    wall = cli([*args, "--out", str(out), "--overwrite"], log, threads)
    return json.loads((out / "eval.json").read_text()), wall


def estimate(a, work: Path, jobs: list[Job], pre_probe: Path | None) -> dict:
    """Run a few steps of each kind and print the time each part needs (single-threaded runs).
    pre_probe: a probe pre-training run logged at every step (None: no pre-training needed)."""
    probe = work / "probe"
    probe.mkdir(parents=True, exist_ok=True)
    steps = a.probe_steps
    parts = {}
    if pre_probe is not None:
        rows = [json.loads(x) for x in (pre_probe / "metrics.jsonl").read_text().splitlines() if x.strip()]
        tps = sorted(r["tokens_per_s"] for r in rows[1:]) or [rows[0]["tokens_per_s"]]
        s_step = a.pretrain_batch_size * a.pretrain_seq_len / tps[len(tps) // 2]  # median step after the first
        total = s_step * a.pretrain_steps
        if a.pretrain_minutes:
            total = min(total, a.pretrain_minutes * 60)
        parts["pretraining"] = {"runs": 1, "s_per_step": s_step, "steps": a.pretrain_steps, "seconds": total}
    kinds = {}
    for job in jobs:
        kind = (job.part, job.info.get("method", "text"))
        kinds.setdefault(kind, []).append(job)
    for (part, method), js in kinds.items():
        job = js[0]
        args = list(job.args)
        i = args.index("--steps")
        args[i + 1] = str(steps)
        n_probe = a.probe_eval_rows
        test = Path(args[args.index("--eval") + 1])
        header, rows = read_rows(test, ("target", "headline", "label"))
        small = write_rows(probe / f"eval_{part}.tsv", header, rows[:n_probe])
        args[args.index("--eval") + 1] = str(small)
        ev, wall = _probe(args, probe / f"{part}_{method}", probe / f"{part}_{method}.log", a.threads)
        s_step = ev["seconds"] / max(ev["steps"], 1)
        gen_s = ev.get("generation_seconds") or 0.0
        # start-up (imports, data, model), the probe's small evaluation and the files: what is left of the wall time
        startup = max(wall - ev["seconds"] - gen_s, 0.0)
        batch = int(args[args.index("--batch-size") + 1])
        # per eval row: its generation (measured) + a teacher-forced forward (about a third of a training step)
        per_row = gen_s / len(rows[:n_probe]) + s_step / (3 * batch)
        n_eval = len(rows)
        secs = sum(startup + int(j.info["steps"]) * s_step + n_eval * per_row for j in js)
        parts[
            f"{part} ({'as text' if method == 'text' else 'encoder + head'})" if part == "classification" else part
        ] = {
            "runs": len(js),
            "s_per_step": s_step,
            "steps": sorted({j.info["steps"] for j in js}),
            "startup_s": startup,
            "eval_rows": n_eval,
            "s_per_eval_row": per_row,
            "seconds": secs,
            "probe_wall_s": wall,
        }
    total = sum(p["seconds"] for p in parts.values())
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    say(
        "\nEstimated time, one thread per run (measured now: "
        f"{steps} steps per probe, {a.probe_eval_rows} eval rows; load average {load:.1f}):"
    )
    say(
        f"{'part':32s} {'runs':>5s} {'s/step':>7s} {'steps/run':>10s} {'start-up s':>10s} {'eval rows':>9s} "
        f"{'s/row':>7s} {'hours':>6s}"
    )
    for name, p in parts.items():
        st = p["steps"] if isinstance(p["steps"], int) else "/".join(map(str, p["steps"]))
        say(
            f"{name:32s} {p['runs']:5d} {p['s_per_step']:7.3f} {st:>10} {p.get('startup_s', 0):10.1f} "
            f"{p.get('eval_rows', 0):9d} {p.get('s_per_eval_row', 0):7.4f} {p['seconds'] / 3600:6.2f}"
        )
    pre_s = parts.get("pretraining", {}).get("seconds", 0.0)
    say(
        f"{'total':32s} {'':5s} {'':7s} {'':>10s} {'':10s} {'':9s} {'':7s} {total / 3600:6.2f}"
        f"   (wall with --jobs {a.jobs}: about {(pre_s + (total - pre_s) / a.jobs) / 3600:.2f} h)"
    )
    say(
        "s/step and generation measured; an eval row's teacher-forced forward is taken as a third of a training "
        "step's per-example time; a busier machine runs slower."
    )
    return {"parts": parts, "total_seconds": total, "load_average": load, "probe_steps": steps}


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--data-dir", required=True, help="the AG News folder (unlabeled.txt, headlines/, dev.tsv, test.tsv)"
    )
    p.add_argument(
        "--pretrained",
        default=None,
        metavar="DIR",
        help="a span pre-training run folder to use (default: pre-train one with the --pretrain-* settings)",
    )
    p.add_argument("--work", default=str(ROOT / "runs/text2text_benefit"))
    p.add_argument("--results", default=str(ROOT / "bench/results"))
    p.add_argument("--tag", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at a time (default 1)")
    p.add_argument("--threads", type=int, default=None, help="--threads for every run (default: the CLI's choice)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--estimate",
        action="store_true",
        help="measure a few steps of each kind of run, print the time each part needs, and exit",
    )
    p.add_argument("--probe-steps", type=int, default=10)
    p.add_argument("--probe-eval-rows", type=int, default=64)
    g = p.add_argument_group("pre-training (without --pretrained)")
    g.add_argument("--pretrain-model", default="t5-tiny")
    g.add_argument("--pretrain-steps", type=int, default=3000)
    g.add_argument("--pretrain-minutes", type=float, default=None, help="stop pre-training after this long")
    g.add_argument("--pretrain-seq-len", type=int, default=128)
    g.add_argument("--pretrain-batch-size", type=int, default=32)
    g.add_argument("--pretrain-lr", type=float, default=1e-3)
    g.add_argument("--pretrain-eval-every", type=int, default=500)
    g.add_argument("--pretrain-seed", type=int, default=0)
    g.add_argument("--vocab-size", type=int, default=8192)
    g = p.add_argument_group("headlines")
    g.add_argument("--pairs", nargs="+", default=["1000", "all"], help="training pair counts ('all': the whole file)")
    g.add_argument("--steps", type=int, default=600, help="fine-tuning steps for a subset (default 600)")
    g.add_argument("--steps-all", type=int, default=3000, help="fine-tuning steps on all pairs (default 3000)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=5e-4)
    g.add_argument("--dropout", type=float, default=0.1)
    g.add_argument("--max-len", type=int, default=128)
    g.add_argument("--max-target-len", type=int, default=32)
    g.add_argument("--num-beams", type=int, default=1)
    g.add_argument("--eval-rows", type=int, default=0, help="score the first N test pairs only (0: all)")
    g.add_argument("--lead-words", type=int, default=10)
    g.add_argument(
        "--select-decoding",
        type=int,
        default=0,
        metavar="N",
        help="choose the decoding on the first N test pairs, score it on the others (default 0: off)",
    )
    g.add_argument("--decoding-penalties", type=float, nargs="+", default=[1.0, 1.3, 1.6, 2.0, 3.0, 4.0])
    g.add_argument("--decoding-no-repeat", type=int, nargs="+", default=[0, 3])
    g = p.add_argument_group("classification")
    g.add_argument(
        "--labels",
        type=int,
        nargs="*",
        default=[100, 1000, 10001],
        help="training label counts (none: skip the classification part)",
    )
    g.add_argument("--cls-steps", type=int, default=500)
    g.add_argument("--cls-batch-size", type=int, default=32)
    g.add_argument("--cls-lr", type=float, default=5e-4)
    g.add_argument("--cls-max-len", type=int, default=64)
    g.add_argument("--cls-eval-rows", type=int, default=0, help="a fixed random subset of test.tsv (0: all)")
    g.add_argument("--cls-random", action="store_true", help="also both methods from the random-init model")
    a = p.parse_args()

    data_dir = Path(a.data_dir).resolve()
    for f in ("unlabeled.txt", "headlines/train.tsv", "headlines/test.tsv", "dev.tsv", "test.tsv"):
        if not (data_dir / f).is_file():
            sys.exit(f"--data-dir {data_dir}: no {f}")
    if a.select_decoding < 0:
        sys.exit(f"--select-decoding must be >= 0 (0: off), got {a.select_decoding}")
    try:
        from decoding_choice import decoding_grid

        decoding_grid(a.decoding_penalties, a.decoding_no_repeat)
    except ValueError as e:
        sys.exit(str(e))
    for spec in a.pairs:
        if spec != "all" and not spec.isdigit():
            sys.exit(f"--pairs: a count or 'all', got {spec!r}")
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)

    need_pretrain = not a.pretrained and not (work / "span_pretrained.done").is_file()
    if a.estimate:
        pre_probe = None
        if need_pretrain:
            # a few pre-training steps: their speed, and an encoder-decoder (with the tokenizer a
            # pre-training run would train) for the fine-tuning probes
            pre = pre_probe = work / "probe" / "pretrained"
            cli(
                [
                    *pretrain_args(a, data_dir / "unlabeled.txt", a.probe_steps),
                    "--log-every",
                    "1",
                    "--out",
                    str(pre),
                    "--overwrite",
                ],
                work / "probe" / "pretrained.log",
                a.threads,
            )
        else:
            pre = ensure_pretrained(a, work, data_dir)
        jobs = plan(a, work, data_dir, {"pretrained": pre, "random": pre})
        est = estimate(a, work, jobs, pre_probe)
        # beside the runs, not in --results: an estimate is no result (and bench/README.md lists those)
        out = work / f"estimate_{a.tag}.json"
        out.write_text(json.dumps({"settings": vars(a), "estimate": est}, indent=2))
        say(f"saved {out}")
        return

    pre = ensure_pretrained(a, work, data_dir)
    rnd = ensure_random(a, work, pre, data_dir)
    inits = {"pretrained": pre, "random": rnd}
    jobs = plan(a, work, data_dir, inits)
    baseline = lead_baseline(work / "data" / "headlines_test.tsv", a.lead_words)  # the runs' test pairs
    pre_info = pretraining_info(pre)
    if a.select_decoding and a.select_decoding >= baseline["n_eval"]:
        sys.exit(
            f"--select-decoding {a.select_decoding}: needs fewer than the {baseline['n_eval']} test pairs "
            "(the rest score the chosen setting)"
        )
    say(
        f"{len(jobs)} fine-tuning runs ({sum(j.part == 'headlines' for j in jobs)} headlines, "
        f"{sum(j.part == 'classification' for j in jobs)} classification) from {pre} and {rnd}; "
        f"{baseline['method']} baseline ROUGE-L {baseline['rougeL']:.4f} on {baseline['n_eval']} test pairs"
    )

    results_dir = Path(a.results)
    results_dir.mkdir(parents=True, exist_ok=True)
    stem = results_dir / f"text2text_benefit_{a.tag}"

    def save(results: list[dict], decoding: list[dict] | None = None) -> str:
        """Writes the .json, .md and .png results; returns the markdown."""
        from harness import cpu_machine  # imports torch: only once results are saved

        summary = summarize(results)
        if decoding:
            summary["decoding"] = decoding
        settings = {k: v for k, v in vars(a).items() if k not in ("work", "results")}
        settings["omp_num_threads"] = os.environ.get("OMP_NUM_THREADS")
        stem.with_suffix(".json").write_text(
            json.dumps(
                {
                    "settings": settings,
                    "machine": cpu_machine(a.threads),
                    "pretraining": pre_info,
                    "random_init": str(rnd),
                    "baseline": baseline,
                    "summary": summary,
                    "results": sorted(results, key=lambda r: r["name"]),
                },
                indent=2,
            )
        )
        md = markdown(summary, baseline, pre_info, a) + decoding_markdown(decoding or [], vars(a))
        stem.with_suffix(".md").write_text(md)
        plot(summary, baseline, stem.with_suffix(".png"))
        return md

    results = run_jobs(a, jobs, work, pre, save)
    # the decoding grid and --select-decoding were checked before the runs
    decoding = select_decoding(a, work, results, work / "data" / "headlines_test.tsv") if a.select_decoding else None
    say("\n" + save(results, decoding))
    say(f"saved {stem}.json .md .png")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit(
            "interrupted: run the same command again to continue (finished runs are kept, interrupted ones "
            "resume from their checkpoint)"
        )
