"""Tab-separated classification data: `text<TAB>label` rows, with or without a header row.

A header is recognised when its first row names a text column (sentence, text, sentence1, content,
review, document) or a label column (label, labels, class, category, target). Without a header the
last column is the label and everything before it (joined by tabs) the text. Labels may be strings or integers; they are
mapped to class indices in sorted order (integers numerically), the names kept for reporting.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

from .corpus import DataError

TEXT_COLUMNS = ("sentence", "text", "sentence1", "content", "review", "document")
LABEL_COLUMNS = ("label", "labels", "class", "category", "target")


def read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, raw label strings) of a TSV file. Raises DataError naming the file and the problem."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    with p.open(encoding="utf-8-sig", errors="replace", newline="") as f:
        rows = [r for r in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if any(c.strip() for c in r)]
    if not rows:
        raise DataError(f"{path}: file is empty")
    head = [c.strip().lower() for c in rows[0]]
    text_col, label_col = 0, None
    if any(h in TEXT_COLUMNS for h in head) or any(h in LABEL_COLUMNS for h in head):
        rows = rows[1:]
        label_col = next((i for i, h in enumerate(head) if h in LABEL_COLUMNS), None)
        if label_col is None:
            raise DataError(f"{path}: header row ({', '.join(head)}) has no label column")
        # no known text column name (label<TAB>title, ...): the first column that is not the label
        text_col = next((i for i, h in enumerate(head) if h in TEXT_COLUMNS),
                        next((i for i in range(len(head)) if i != label_col), 0))
    else:
        if max(len(r) for r in rows) < 2:
            raise DataError(f"{path}: no label column (expected text<TAB>label rows)")
        label_col = -1
    texts, labels = [], []
    for n, r in enumerate(rows, start=1):
        if len(r) < 2:
            raise DataError(f"{path}: data row {n} has no label column (expected text<TAB>label)")
        # headerless rows with more than two columns: the text is everything before the label (a tab
        # inside the text), not just the first column
        texts.append(r[text_col] if label_col != -1 else "\t".join(r[:-1]))
        labels.append(r[label_col].strip())
    if not texts:
        raise DataError(f"{path}: no data rows")
    return texts, labels


def label_vocabulary(*label_lists: list[str]) -> list[str]:
    """Sorted label names over all lists: numerically when every label is an integer."""
    names = set().union(*map(set, label_lists))
    try:
        return [str(v) for v in sorted({int(n) for n in names})]
    except ValueError:
        return sorted(names)
