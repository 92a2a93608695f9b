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
as a word, is the target (classification as text, the T5 way). Files are read as `fastformer.data.tsv`
reads them (UTF-8 or UTF-16 with its mark; binary files refused); an empty target is refused.
`read_generation_inputs` reads what to generate for: a TSV's inputs (and its targets, when it has
them) or one input per line of any other file.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from .corpus import DataError, FastformerWarning
from .packing import pad_batch
from .tsv import _fit_to_header, _read_text, _rows, text_lines

INPUT_COLUMNS = (
    "input",
    "source",
    "src",
    "text",
    "sentence",
    "document",
    "article",
    "question",
    "prompt",
    "content",
    "description",
)
TARGET_COLUMNS = (
    "target",
    "output",
    "tgt",
    "summary",
    "headline",
    "title",
    "answer",
    "label",
    "labels",
    "class",
    "category",
)


def _is_header(row: list[str]) -> bool:
    """The first row names an input or a target column."""
    return any(c.strip().lower() in INPUT_COLUMNS or c.strip().lower() in TARGET_COLUMNS for c in row)


def _columns(path, head: list[str]) -> tuple[int, int] | None:
    """(input column, target column) named by a header row, None when the row is not a header."""
    if not _is_header(head):
        return None
    head = [c.strip().lower() for c in head]
    if len(head) < 2:
        raise DataError(f"{path}: header row ({', '.join(head)}) names one column; need input<TAB>target")
    tgt_col = next((i for i, h in enumerate(head) if h in TARGET_COLUMNS), len(head) - 1)
    in_col = next(
        (i for i, h in enumerate(head) if h in INPUT_COLUMNS and i != tgt_col),
        next(i for i in range(len(head)) if i != tgt_col),
    )
    return in_col, tgt_col


def read_pairs(path: str | Path) -> tuple[list[str], list[str]]:
    """(inputs, targets) of a TSV file. Raises DataError naming the file and the problem."""
    rows = _rows(path, _is_header)
    cols = _columns(path, rows[0])
    if cols is not None:
        n_head = len(rows[0])
        rows = rows[1:]
    inputs, targets = [], []
    for n, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise DataError(f"{path}: data row {n} has no target column (expected input<TAB>target)")
        if cols is None:
            inputs.append("\t".join(r[:-1]))
            targets.append(r[-1].strip())
        else:
            if len(r) <= max(cols):
                raise DataError(f"{path}: data row {n} has {len(r)} columns, the header names {n_head}")
            r = _fit_to_header(r, n_head, cols[0])
            inputs.append(r[cols[0]])
            targets.append(r[cols[1]].strip())
        if not targets[-1]:
            raise DataError(f"{path}: data row {n} has an empty target")
    if not inputs:
        raise DataError(f"{path}: no data rows")
    return inputs, targets


def read_generation_inputs(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Inputs to generate for and, when the file has them, their targets.

    `.tsv`: a header naming the columns (as `read_pairs`; or the input column alone), or headerless
    `input<TAB>target` rows (every row with a tab: the last column is the target), or one input per
    row. Any other file: one input per non-empty line."""
    if Path(path).suffix.lower() != ".tsv":
        p = Path(path)
        if not p.is_file():
            raise DataError(f"{path}: no such file")
        inputs = text_lines(_read_text(p, path))
        if not inputs:
            raise DataError(f"{path}: no text (empty file)")
        return inputs, None
    rows = _rows(path, _is_header)
    cols = _columns(path, rows[0]) if len(rows[0]) > 1 else None
    targets: list[str] | None
    if len(rows[0]) == 1 and rows[0][0].strip().lower() in INPUT_COLUMNS:  # a header naming the input alone
        inputs, targets = ["\t".join(r) for r in rows[1:]], None
    elif cols is not None:
        rows = [_fit_to_header(r, len(rows[0]), cols[0]) for r in rows[1:]]
        inputs = [r[cols[0]] if len(r) > cols[0] else "" for r in rows]
        targets = [r[cols[1]].strip() if len(r) > cols[1] else "" for r in rows]
    elif all(len(r) >= 2 for r in rows):
        inputs, targets = ["\t".join(r[:-1]) for r in rows], [r[-1].strip() for r in rows]
    else:
        inputs, targets = ["\t".join(r) for r in rows], None
    if not inputs:
        raise DataError(f"{path}: no data rows")
    if targets and not all(targets):
        empty = [i for i, t in enumerate(targets) if not t]
        if len(empty) < len(targets):  # some rows have targets: scoring them all would count the rest as misses
            warnings.warn(
                f"{path}: {len(empty)} of {len(targets)} rows have an empty target (the first is data row "
                f"{empty[0] + 1}); the generations are written but not scored",
                FastformerWarning,
                stacklevel=2,
            )
        targets = None
    return inputs, targets


def encode_pairs(
    tok, inputs: Sequence[str], targets: Sequence[str], *, max_len: int, max_target_len: int, eos_id: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Token ids of each pair, EOS-terminated as T5 encodes both sides: (input (<= max_len,),
    target (<= max_target_len,)) int64, truncated before the EOS."""
    if max_len < 2 or max_target_len < 1:
        raise ValueError(f"max_len must be >= 2 and max_target_len >= 1, got {max_len}, {max_target_len}")
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    src = tok.encode_batch(list(inputs), add_special_tokens=False)
    tgt = tok.encode_batch(list(targets), add_special_tokens=False)
    return [
        (
            torch.tensor(s.ids[: max_len - 1] + [eos_id], dtype=torch.int64),
            torch.tensor(t.ids[: max_target_len - 1] + [eos_id], dtype=torch.int64),
        )
        for s, t in zip(src, tgt)
    ]


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
