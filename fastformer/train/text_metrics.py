"""Scores of generated text against references: ROUGE (through the `rouge-score` package) and exact match.

    rouge(predictions, references)        -> {"rouge1": F, "rouge2": F, "rougeL": F}   (mean F-measure, 0..1)
    exact_match(predictions, references)  -> fraction of predictions equal to their reference

ROUGE uses rouge-score's defaults (lower-cased runs of ASCII letters and digits, no stemming), per
example, averaged over examples. Exact match compares NFKC-normalised text with
whitespace runs collapsed and ends stripped, as the T5 tokenizer normalises what it decodes: for
classification as text it is the accuracy.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def normalize_text(s: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", s).split())


def _check(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after normalize_text (0.0 for no examples)."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    return sum(normalize_text(p) == normalize_text(r) for p, r in zip(predictions, references)) / len(predictions)


def rouge(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measures (0..1) of predictions against references."""
    _check(predictions, references)
    try:
        from rouge_score import rouge_scorer
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError("ROUGE needs the `rouge-score` package (pip install rouge-score)") from e
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for p, r in zip(predictions, references):
        scores = scorer.score(r, p)  # (target, prediction)
        for t in ROUGE_TYPES:
            totals[t] += scores[t].fmeasure
    n = max(len(predictions), 1)
    return {t: totals[t] / n for t in ROUGE_TYPES}
