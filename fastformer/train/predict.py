"""Inference behind `fastformer predict`: run a trained folder's model over texts.

    loaded = ff.models.load("runs/finetune")
    columns, rows = predict_texts(loaded, ["a great film", "a dull plot"])

What a prediction is depends on the model's kind (`loaded.kind`), looked up in `PREDICTORS`:

    classifier   label, probability, and one p_<label> column per class
    mlm          each [MASK] filled with the most likely token: filled, predictions (top-k with probabilities)
    seq2seq      generated text (greedy or beam search with the run's settings, or the keywords
                 num_beams / max_new_tokens / length_penalty / max_len): input, prediction

A predictor is `fn(loaded, texts, *, batch_size, device, **options) -> (columns, rows)` where rows
are dicts keyed by columns; a new kind (e.g. text-to-text generation) joins with `register_predictor`
and the command does not change.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from fastformer.data.packing import pad_batch

from .run_dir import FastformerWarning, writing

Predictor = Callable[..., tuple[list[str], list[dict]]]
PREDICTORS: dict[str, Predictor] = {}


def register_predictor(kind: str, fn: Predictor) -> None:
    """`fastformer predict` uses fn for models of `kind` (see fastformer.models.loading.ARCHITECTURES)."""
    PREDICTORS[kind] = fn


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield range(i, min(i + size, n))


def _pad_id(tok) -> int:
    for name in ("[PAD]", "<pad>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return 0


# ---------------------------------------------------------------------------------------------------
# classifier
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def classify(
    loaded, texts: list[str], *, batch_size: int = 32, device: torch.device | str = "cpu"
) -> tuple[list[str], list[dict]]:
    """Label and class probabilities of each text, encoded as fine-tuning encoded it."""
    from .objectives import get_objective

    obj = get_objective(loaded.run_config["objective"])
    mc = loaded.run_config["model_config"]
    max_len = int(loaded.run_config.get("max_len") or min(512, mc.get("max_position", 512)))
    ids = obj.encode_for_classification(loaded.tokenizer, texts, max_len)
    pad = _pad_id(loaded.tokenizer)
    labels = loaded.labels
    rows = []
    for idx in _batches(len(ids), batch_size):
        x, mask = pad_batch([ids[i] for i in idx], pad, pad_to_multiple_of=8)
        if mask is None:
            mask = torch.ones_like(x, dtype=torch.bool)
        probs = F.softmax(loaded.model(x.to(device), mask.to(device)).float(), dim=-1).cpu()
        for i, p in zip(idx, probs):
            k = int(p.argmax())
            rows.append(
                {
                    "text": texts[i],
                    "label": labels[k],
                    "probability": float(p[k]),
                    **{f"p_{name}": float(v) for name, v in zip(labels, p)},
                }
            )
    return ["text", "label", "probability", *[f"p_{n}" for n in labels]], rows


# ---------------------------------------------------------------------------------------------------
# masked language model: fill [MASK]
# ---------------------------------------------------------------------------------------------------

_MASK_RE = re.compile(r"\[mask\]", re.IGNORECASE)


@torch.no_grad()
def fill_mask(
    loaded, texts: list[str], *, batch_size: int = 32, device: torch.device | str = "cpu", top_k: int = 5
) -> tuple[list[str], list[dict]]:
    """Each [MASK] of each text replaced by the most likely token; `predictions` holds the top_k
    tokens with their probabilities for every mask, in order."""
    from fastformer.data.tokenizer import special_ids

    tok, model = loaded.tokenizer, loaded.model
    mask_id, cls_id, sep_id = (tok.token_to_id(t) for t in ("[MASK]", "[CLS]", "[SEP]"))
    if None in (mask_id, cls_id, sep_id):
        raise ValueError(f"{loaded.path}: the tokenizer has no [MASK] / [CLS] / [SEP] token")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1 (candidates listed per mask), got {top_k!r}")
    originals, texts = texts, [_MASK_RE.sub("[MASK]", t) for t in texts]
    if not any("[MASK]" in t for t in texts):
        warnings.warn(
            "no [MASK] in the input: nothing to fill (write [MASK] where a word should be predicted)",
            FastformerWarning,
            stacklevel=3,
        )
    limit = model.config.max_position - 2
    encs = tok.encode_batch(texts, add_special_tokens=False)
    _warn_masks_past(encs, mask_id, limit)
    banned = torch.tensor(special_ids(tok), dtype=torch.int64)
    pad = _pad_id(tok)
    w, bias = model.encoder.word_embeddings.weight, model.head.bias
    rows = []
    for idx in _batches(len(texts), batch_size):
        seqs = [torch.tensor([cls_id] + encs[i].ids[:limit] + [sep_id], dtype=torch.int64) for i in idx]
        x, mask = pad_batch(seqs, pad, pad_to_multiple_of=8)
        x = x.to(device)
        h, _ = model.encoder(x, None if mask is None else mask.to(device))
        where = (x == mask_id).nonzero()  # (M, 2): batch row, position
        probs = torch.empty(0)
        if len(where):
            logits = F.linear(model.head.transform(h[where[:, 0], where[:, 1]]), w, bias).float()
            logits[:, banned.to(logits.device)] = float("-inf")  # never fill a mask with [PAD], [CLS], ...
            probs = F.softmax(logits, dim=-1).cpu()
        k = min(top_k, probs.shape[-1] - len(banned)) if len(where) else 0  # special tokens never listed
        top_p, top_i = probs.topk(k, dim=-1) if len(where) else (probs, probs)
        per_row: dict[int, list] = {}
        for m, (b, _pos) in enumerate(where.tolist()):
            per_row.setdefault(b, []).append([(tok.id_to_token(int(t)), float(p)) for t, p in zip(top_i[m], top_p[m])])
        for b, i in enumerate(idx):
            preds = per_row.get(b, [])
            rows.append(
                {"text": originals[i], "filled": _fill(texts[i], encs[i], mask_id, preds, limit), "predictions": preds}
            )
    return ["text", "filled", "predictions"], rows


def _warn_masks_past(encs, mask_id: int, limit: int) -> None:
    """One warning when a [MASK] lies past the `limit` tokens the model reads: it stays unfilled."""
    late = [(i, enc.ids[limit:].count(mask_id)) for i, enc in enumerate(encs) if mask_id in enc.ids[limit:]]
    if late:
        n = sum(c for _, c in late)
        warnings.warn(
            f"{n} [MASK] past the model's {limit} tokens {'is' if n == 1 else 'are'} left unfilled, in "
            f"{len(late)} text(s) (the first: text {late[0][0] + 1} of the input); shorten the text or move the "
            "[MASK] earlier",
            FastformerWarning,
            stacklevel=4,
        )


def _fill(text: str, enc, mask_id: int, preds: list, limit: int) -> str:
    """`text` with each [MASK] the tokenizer saw (within the model's length) replaced by its top token."""
    spans = [enc.offsets[j] for j, t in enumerate(enc.ids[:limit]) if t == mask_id]
    out, last = [], 0
    for (a, b), cands in zip(spans, preds):
        word = cands[0][0] if cands else "[MASK]"
        out += [text[last:a], word[2:] if word.startswith("##") else word]
        last = b
    return "".join(out) + text[last:]


# ---------------------------------------------------------------------------------------------------
# encoder-decoder: generate
# ---------------------------------------------------------------------------------------------------


def generate_text(
    loaded,
    texts: list[str],
    *,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
    num_beams: int | None = None,
    max_new_tokens: int | None = None,
    length_penalty: float | None = None,
    no_repeat_ngram_size: int | None = None,
    encoder_repetition_penalty: float | None = None,
    max_len: int | None = None,
) -> tuple[list[str], list[dict]]:
    """The generated text for each input, encoded as text-to-text fine-tuning encoded it; generation
    settings default to the folder's (`config.json` "generation"; a span pre-training folder, which
    records none, generates greedily up to 64 tokens: its sentinel-filled spans, sentinels dropped)."""
    from .text2text import generate_texts, generation_settings

    # checked here, by its flag: generation_settings checks the others, generate names its own argument
    if length_penalty is not None and not math.isfinite(length_penalty):
        raise ValueError(f"--length-penalty must be a finite number, got {length_penalty}")
    max_len, gen = generation_settings(
        loaded.run_config,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        encoder_repetition_penalty=encoder_repetition_penalty,
        max_len=max_len,
    )
    preds = generate_texts(
        loaded.model, loaded.tokenizer, texts, max_len=max_len, batch_size=batch_size, device=device, **gen
    )
    return ["input", "prediction"], [{"input": t, "prediction": p} for t, p in zip(texts, preds)]


def generation_scores(rows: list[dict], targets: list[str]) -> dict:
    """ROUGE-1/2/L and exact match of the generated `prediction` column against `targets`."""
    from .text_metrics import exact_match, rouge

    preds = [r["prediction"] for r in rows]
    return {**rouge(preds, targets), "exact_match": exact_match(preds, targets)}


register_predictor("classifier", classify)
register_predictor("mlm", fill_mask)
register_predictor("seq2seq", generate_text)


# ---------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------


def predict_texts(
    loaded, texts: list[str], *, batch_size: int = 32, device: torch.device | str | None = None, **options
) -> tuple[list[str], list[dict]]:
    """(columns, rows) of `loaded`'s predictor over `texts`."""
    if loaded.kind not in PREDICTORS:
        raise ValueError(
            f"--model {loaded.path}: predict does not support {loaded.kind} models "
            f"({loaded.run_config['architecture']}) yet; it supports {', '.join(sorted(PREDICTORS))} models"
        )
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    if device is None:
        device = next(loaded.model.parameters()).device
    predictor = PREDICTORS[loaded.kind]
    known = inspect.signature(predictor).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in known.values())
    for name in options:
        if name not in known and not open_ended:
            takes = sorted(k for k, p in known.items() if p.kind is p.KEYWORD_ONLY)
            raise ValueError(f"{name} does not apply to {loaded.kind} models (they take {', '.join(takes)})")
    return predictor(loaded, texts, batch_size=batch_size, device=device, **options)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, list):  # fill-mask candidates: "good 0.41, great 0.22 | ..."
        return " | ".join(", ".join(f"{t} {p:.3f}" for t, p in cands) for cands in v)
    return " ".join(str(v).split())  # no tabs or newlines inside a TSV cell


def format_rows(columns: list[str], rows: list[dict], jsonl: bool) -> str:
    if jsonl:
        return "".join(json.dumps({c: r[c] for c in columns}, ensure_ascii=False) + "\n" for r in rows)
    lines = ["\t".join(columns)] + ["\t".join(_cell(r[c]) for c in columns) for r in rows]
    return "\n".join(lines) + "\n"


def write_predictions(columns: list[str], rows: list[dict], output: str | Path | None) -> None:
    """TSV (or JSON lines for a .jsonl output) to `output`, written atomically, or to stdout."""
    if output is None:
        sys.stdout.write(format_rows(columns, rows, jsonl=False))
        sys.stdout.flush()
        return
    out = Path(output)
    text = format_rows(columns, rows, jsonl=out.suffix.lower() == ".jsonl")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    with writing("--output", out):
        if out.is_dir():
            raise IsADirectoryError(21, "is a folder", str(out))
        out.parent.mkdir(parents=True, exist_ok=True)  # as --out of a training run
        try:
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)


def _norm_label(s) -> str:
    """A label as an integer's spelling where it is one ("01" -> "1"), else stripped."""
    s = str(s).strip()
    return str(int(s)) if s.lstrip("-").isdigit() else s


def accuracy(rows: list[dict], labels: list[str], names: list[str] | None = None) -> float | None:
    """Share of rows whose predicted label equals the given one. A given label that is not one of the
    model's label `names` (an older run recorded "1" where the file says "01") is compared as an
    integer; one that is, by its spelling, as training told the two apart."""
    if not rows or "label" not in rows[0]:
        return None
    known = set(names or ())

    def same(pred, gold):
        gold = str(gold).strip()
        return pred == gold if gold in known else _norm_label(pred) == _norm_label(gold)

    return sum(same(r["label"], y) for r, y in zip(rows, labels)) / len(rows)


def labels_comparable(labels: list[str], names: list[str] | None, source: str) -> bool:
    """Whether any of the given `labels` is one of the model's label `names` (as `accuracy` compares
    them). When none is, the accuracy would be 0 whatever the model does (neg/pos against a 0/1 model,
    or a column that is no label column at all): warn, naming `source` (e.g. "--input FILE"), and
    return False so that none is reported."""
    if not names or not labels:
        return True
    known = set(names) | {_norm_label(n) for n in names}
    if any(str(y).strip() in known or _norm_label(y) in known for y in labels):
        return True

    def some(values):
        values = sorted(set(values))
        return ", ".join(values[:5]) + (f", ... ({len(values)} distinct)" if len(values) > 5 else "")

    warnings.warn(
        f"{source}: none of its labels ({some(labels)}) is one of the model's ({some(names)}), so no accuracy "
        "is computed; the predictions are written. A headerless .tsv reads its last column as the label: if "
        "that column is not one, add a header row naming the columns (e.g. label<TAB>text, or text alone)",
        FastformerWarning,
        stacklevel=2,
    )
    return False
