"""Choosing a decoding setting on held-out pairs, then scoring it on other pairs.

A decoding setting here is (encoder_repetition_penalty, no_repeat_ngram_size). Fine-tuned text-to-text
runs of one experiment cell (for text2text_benefit.py: both arms, every seed, one training-pair count)
each generate for the whole test file once per setting in a grid; the setting with the best mean
ROUGE-L over all runs on the first `n_select` test pairs is chosen (one setting for every run of the
cell, so neither arm is tuned against the other), and each run is then scored on the remaining pairs,
with the chosen setting and with plain decoding (penalty 1, no n-gram ban). The pairs that chose the
setting never score it.

    grid = decoding_grid([1.0, 1.3, 2.0], [0, 3])
    preds = {name: run_predictions(folder, grid, inputs) for name, folder in runs.items()}  # all test pairs
    cell = choose_and_score(preds, targets, n_select=300)

From the command line, for any text-to-text run folders (one cell; results/decoding_choice_<tag>.*):

    python bench/decoding_choice.py --runs pretrained=runs/a random=runs/b --test test.tsv --select 300 \
        --tag headlines_long

Predictions are cached per run folder (`decoding/erp<penalty>_nr<n>.txt`, one line per test pair,
beside a `.json` with a hash of the test inputs and the generation settings), so a rerun only
generates what is missing or was generated for other inputs or settings.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

PLAIN = (1.0, 0)


def decoding_grid(penalties: Sequence[float], no_repeat: Sequence[int]) -> list[tuple[float, int]]:
    """(penalty, no_repeat_ngram_size) pairs, plain decoding first (it wins ties)."""
    grid = [(float(p), int(n)) for p in penalties for n in no_repeat]
    for p, n in grid:
        if not (math.isfinite(p) and p > 0):
            raise ValueError(f"--decoding-penalties: each must be a finite number > 0, got {p}")
        if n < 0:
            raise ValueError(f"--decoding-no-repeat: each must be >= 0, got {n}")
    grid = [PLAIN] + [s for s in dict.fromkeys(grid) if s != PLAIN]
    names = [setting_name(s) for s in grid]
    if len(set(names)) != len(names):  # the cache and the results are keyed by name
        raise ValueError(f"--decoding-penalties: values too close to tell apart in a file name: {sorted(penalties)}")
    return grid


def setting_name(setting: tuple[float, int]) -> str:
    return f"erp{setting[0]:g}_nr{setting[1]}"


def cached_predictions(
    run: Path, setting: tuple[float, int], inputs: list[str], generate: Callable[[], list[str]], **settings
) -> list[str]:
    """The run's predictions for `inputs` with `setting`: from run/decoding/ when they were generated
    for the same inputs and `settings` (max_len, max_new_tokens, num_beams, ...), else generate()
    (written there, one line per input; newlines inside a prediction become spaces)."""
    path = run / "decoding" / f"{setting_name(setting)}.txt"
    stamp = {
        "inputs_sha256": hashlib.sha256("\n".join(inputs).encode("utf-8")).hexdigest(),
        "encoder_repetition_penalty": setting[0],
        "no_repeat_ngram_size": setting[1],
        **settings,
    }
    meta = path.with_suffix(".json")
    if path.is_file() and meta.is_file() and json.loads(meta.read_text()) == stamp:
        lines = path.read_text(encoding="utf-8").split("\n")[:-1]
        if len(lines) == len(inputs):
            return lines
    preds = [" ".join(p.split()) for p in generate()]
    if len(preds) != len(inputs):
        raise RuntimeError(f"{run}: {len(preds)} predictions for {len(inputs)} inputs")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(p + "\n" for p in preds), encoding="utf-8")
    meta.write_text(json.dumps(stamp))
    return preds


def run_predictions(
    run: Path, grid: list[tuple[float, int]], inputs: list[str], *, num_beams: int = 1, log=print
) -> dict[tuple[float, int], list[str]]:
    """A text-to-text run folder's predictions for `inputs` with every setting of `grid` (its own
    max_len and max_new_tokens; cached in run/decoding/), the model loaded only if something is missing."""
    from fastformer.train.text2text import generate_texts, load_text2text

    config = json.loads((run / "config.json").read_text())
    gen = {
        "max_len": config["max_len"],
        "max_new_tokens": config["generation"]["max_new_tokens"],
        "num_beams": num_beams,
    }
    loaded = []

    def generate(setting):
        if not loaded:
            loaded.extend(load_text2text(run)[:2])
        log(f"decoding: {run.name} {setting_name(setting)} on {len(inputs)} inputs")
        model, tok = loaded
        return generate_texts(
            model, tok, inputs, **gen, encoder_repetition_penalty=setting[0], no_repeat_ngram_size=setting[1]
        )

    return {s: cached_predictions(run, s, inputs, lambda s=s: generate(s), **gen) for s in grid}


def lead_texts(inputs: list[str], words: int) -> list[str]:
    """The lead-N baseline: the first `words` words of each input."""
    return [" ".join(x.split()[:words]) for x in inputs]


def choose_and_score(
    preds: dict[str, dict[tuple[float, int], list[str]]],
    targets: list[str],
    n_select: int,
    rouge: Callable[[list[str], list[str]], dict] | None = None,
    *,
    lead: list[str] | None = None,
) -> dict:
    """preds: run name -> setting -> predictions for all test pairs (every run has every setting).
    Returns {"chosen": setting, "select": {setting name: mean ROUGE-L over runs on the first n_select
    pairs}, "scores": {run: {"plain": ROUGE dict, "chosen": ROUGE dict}} on the other pairs,
    "n_select", "n_scored"}, plus "lead_baseline" (its ROUGE on the other pairs) given `lead`, a
    baseline's texts for all test pairs (lead_texts)."""
    if rouge is None:
        from fastformer.train.text_metrics import rouge
    if not 0 < n_select < len(targets):
        raise ValueError(f"--select-decoding {n_select}: needs 0 < N < the {len(targets)} test pairs")
    runs = sorted(preds)
    settings = list(next(iter(preds.values())))
    if any(list(preds[r]) != settings for r in runs) or PLAIN not in settings:
        raise ValueError("every run needs predictions for the same settings, plain decoding among them")
    pick, rest = targets[:n_select], targets[n_select:]
    select = {s: sum(rouge(preds[r][s][:n_select], pick)["rougeL"] for r in runs) / len(runs) for s in settings}
    chosen = max(settings, key=lambda s: select[s])  # max keeps the first of equal scores
    scores = {
        r: {
            "plain": rouge(preds[r][PLAIN][n_select:], rest),
            "chosen": rouge(preds[r][chosen][n_select:], rest),
        }
        for r in runs
    }
    out = {
        "chosen": {"encoder_repetition_penalty": chosen[0], "no_repeat_ngram_size": chosen[1]},
        "select": {setting_name(s): v for s, v in select.items()},
        "scores": scores,
        "n_select": n_select,
        "n_scored": len(rest),
    }
    if lead is not None:
        out["lead_baseline"] = rouge(lead[n_select:], rest)
    return out


def main() -> None:
    import argparse
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="NAME=DIR", help="text-to-text run folders")
    p.add_argument("--test", required=True, help="input<TAB>target pairs (a header row is allowed)")
    p.add_argument("--select", type=int, required=True, metavar="N", help="choose on the first N pairs")
    p.add_argument("--penalties", type=float, nargs="+", default=[1.0, 1.3, 1.6, 2.0, 3.0, 4.0])
    p.add_argument("--no-repeat", type=int, nargs="+", default=[0, 3])
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--lead-words", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--tag", required=True)
    p.add_argument("--results", default=str(root / "bench" / "results"))
    a = p.parse_args()
    runs = {}
    for spec in a.runs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not (Path(folder) / "config.json").is_file():
            sys.exit(f"--runs {spec}: give NAME=DIR with a text-to-text run folder")
        runs[name] = Path(folder).resolve()
    import torch

    from fastformer.data.text2text import read_pairs
    from fastformer.train.text_metrics import rouge

    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        grid = decoding_grid(a.penalties, a.no_repeat)
        inputs, targets = read_pairs(a.test)
        if not 0 < a.select < len(targets):
            raise ValueError(f"--select {a.select}: needs 0 < N < the {len(targets)} pairs of {a.test}")
    except ValueError as e:
        sys.exit(str(e))
    preds = {name: run_predictions(folder, grid, inputs, num_beams=a.num_beams) for name, folder in runs.items()}
    got = choose_and_score(preds, targets, a.select, rouge, lead=lead_texts(inputs, a.lead_words))
    settings = {k: v for k, v in vars(a).items() if k != "results"}
    settings["runs"] = {k: str(v) for k, v in runs.items()}
    stem = Path(a.results) / f"decoding_choice_{a.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    from harness import cpu_machine

    record = {"settings": settings, "machine": cpu_machine(a.threads or torch.get_num_threads()), "cell": got}
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2))
    md = "\n".join(markdown(got, settings)) + "\n"
    stem.with_suffix(".md").write_text(md)
    print(md + f"\nsaved {stem}.json .md")


def markdown(cell: dict, settings: dict) -> list[str]:
    """The choice and a table: each run's ROUGE on the scoring pairs, plain and chosen decoding."""
    ch = cell["chosen"]
    out = [
        f"Decoding chosen on the first {cell['n_select']} pairs of {Path(settings['test']).name} (best mean "
        f"ROUGE-L over the runs; encoder repetition penalty {settings['penalties']} × no-repeat n-gram size "
        f"{settings['no_repeat']}): penalty {ch['encoder_repetition_penalty']:g}, no-repeat n-gram size "
        f"{ch['no_repeat_ngram_size']}; ROUGE on the other {cell['n_scored']} pairs:",
        "",
        "| run | decoding | ROUGE-1 | ROUGE-2 | ROUGE-L |",
        "|---|---|---:|---:|---:|",
    ]
    lead = cell["lead_baseline"]
    out.append(
        f"| lead-{settings['lead_words']} baseline | – | {lead['rouge1']:.4f} | {lead['rouge2']:.4f} | "
        f"{lead['rougeL']:.4f} |"
    )
    for name, by in cell["scores"].items():
        for which in ("plain", "chosen"):
            r = by[which]
            out.append(f"| {name} | {which} | {r['rouge1']:.4f} | {r['rouge2']:.4f} | {r['rougeL']:.4f} |")
    return out


if __name__ == "__main__":
    main()
