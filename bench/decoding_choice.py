"""Choosing a decoding setting on held-out pairs, then scoring it on other pairs.

A decoding setting here is (encoder_repetition_penalty, no_repeat_ngram_size). Fine-tuned text-to-text
runs of one experiment cell (for text2text_benefit.py: both arms, every seed, one training-pair count)
each generate for the whole test file once per setting in a grid; the setting with the best mean
ROUGE-L over all runs on the first `n_select` test pairs is chosen (one setting for every run of the
cell, so neither arm is tuned against the other), and each run is then scored on the remaining pairs,
with the chosen setting and with plain decoding (penalty 1, no n-gram ban). The pairs that chose the
setting never score it.

    grid = decoding_grid([1.0, 1.3, 2.0], [0, 3])
    preds = {run: {setting: generate(run, setting) for setting in grid} for run in runs}  # all test pairs
    cell = choose_and_score(preds, targets, n_select=300)

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


def choose_and_score(
    preds: dict[str, dict[tuple[float, int], list[str]]],
    targets: list[str],
    n_select: int,
    rouge: Callable[[list[str], list[str]], dict] | None = None,
) -> dict:
    """preds: run name -> setting -> predictions for all test pairs (every run has every setting).
    Returns {"chosen": setting, "select": {setting name: mean ROUGE-L over runs on the first n_select
    pairs}, "scores": {run: {"plain": ROUGE dict, "chosen": ROUGE dict}} on the other pairs,
    "n_select", "n_scored"}."""
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
    return {
        "chosen": {"encoder_repetition_penalty": chosen[0], "no_repeat_ngram_size": chosen[1]},
        "select": {setting_name(s): v for s, v in select.items()},
        "scores": scores,
        "n_select": n_select,
        "n_scored": len(rest),
    }
