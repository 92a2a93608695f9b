"""Text-to-text pairs: `input<TAB>target` TSV files and the seq2seq collator.

    inputs, targets = read_pairs("train.tsv")          # with or without a header row
    examples = encode_pairs(tok, inputs, targets, max_len=128, max_target_len=64, eos_id=1)
    batch = Seq2SeqCollator(pad_id=0)(examples)        # input_ids, attention_mask, labels

A header is recognised when a cell of the first row names an input column (input, source, src,
text, sentence, document, article, question, prompt, content, description) or a target column
(target, output, tgt, summary, headline, title, answer, label, labels, class, category); the
target is then the target-named column (else the last) and the input the input-named column (else
the first other one). Without a header the last column is the target and everything before it
(joined by tabs) the input. So classification files (`text<TAB>label`) are pairs too: the label,
as a word, is the target (classification as text, the T5 way).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Sequence

import torch

from .corpus import DataError
from .packing import pad_batch

INPUT_COLUMNS = ("input", "source", "src", "text", "sentence", "document", "article", "question", "prompt", "content",
                 "description")
TARGET_COLUMNS = ("target", "output", "tgt", "summary", "headline", "title", "answer", "label", "labels", "class",
                  "category")


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """(inputs, targets) of a TSV file. Raises DataError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with p.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: file is empty")
    head = [c.strip().lower() for c in rows[0]]
    if any(h in INPUT_COLUMNS or h in TARGET_COLUMNS for h in head):
        if len(head) < 2:
            raise DataError(f"{path}: header row ({', '.join(head)}) names one column; need input<TAB>target")
        rows = rows[1:]
        tgt_col = next((i for i, h in enumerate(head) if h in TARGET_COLUMNS), len(head) - 1)
        in_col = next((i for i, h in enumerate(head) if h in INPUT_COLUMNS and i != tgt_col),
                      next(i for i in range(len(head)) if i != tgt_col))
    else:
        tgt_col = in_col = None
    inputs, targets = [], []
    for n, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise DataError(f"{path}: data row {n} has no target column (expected input<TAB>target)")
        if tgt_col is None:
            inputs.append("\t".join(r[:-1]))
            targets.append(r[-1].strip())
        else:
            if len(r) <= max(tgt_col, in_col):
                raise DataError(f"{path}: data row {n} has {len(r)} columns, the header names {len(head)}")
            inputs.append(r[in_col])
            targets.append(r[tgt_col].strip())
    if not inputs:
        raise DataError(f"{path}: no data rows")
    return inputs, targets


def encode_pairs(tok, inputs: Sequence[str], targets: Sequence[str], *, max_len: int, max_target_len: int,
                 eos_id: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids of each pair, EOS-terminated as T5 encodes both sides: (input (<= max_len,),
    target (<= max_target_len,)) int64, truncated before the EOS."""
    if max_len < 2 or max_target_len < 1:
        raise ValueError(f"max_len must be >= 2 and max_target_len >= 1, got {max_len}, {max_target_len}")
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    src = tok.encode_batch(list(inputs), add_special_tokens=False)
    tgt = tok.encode_batch(list(targets), add_special_tokens=False)
    return [(torch.tensor(s.ids[: max_len - 1] + [eos_id], dtype=torch.int64),
             torch.tensor(t.ids[: max_target_len - 1] + [eos_id], dtype=torch.int64)) for s, t in zip(src, tgt)]


class Seq2SeqCollator:
    """[(input ids, target ids), ...] -> {"input_ids": (B, Lin), "attention_mask": (B, Lin) bool,
    "labels": (B, Ltgt), -100 after each target}; both sides right-padded to a multiple of
    `pad_to_multiple_of`. The model derives the decoder inputs by shifting the labels right."""

    def __init__(self, pad_id: int, *, pad_to_multiple_of: int | None = 8):
        self.pad_id, self.multiple = int(pad_id), pad_to_multiple_of

    def __call__(self, examples: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("examples must not be empty")
        ids, mask = pad_batch([e[0] for e in examples], self.pad_id, pad_to_multiple_of=self.multiple)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        labels, _ = pad_batch([e[1] for e in examples], -100, pad_to_multiple_of=self.multiple)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
