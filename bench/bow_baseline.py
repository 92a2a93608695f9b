"""Bag-of-words linear classifier: the reference point for fine-tuning with few labels.

    python bench/bow_baseline.py --train TRAIN.tsv --eval TEST.tsv [--seed S] [--out result.json]

Features: lower-cased word unigrams and bigrams seen in the training file, log(1 + count) x idf,
each row scaled to unit length. Model: multinomial logistic regression (a linear layer and softmax
cross-entropy), full-batch L-BFGS in torch. The L2 strength is chosen on a stratified held-out tenth
of the *training* labels (the same split `fastformer finetune` uses), then the model is refitted on
all training labels; the eval file is only scored. Runs in seconds on a CPU; numpy and torch only.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fastformer.data.corpus import DataError
from fastformer.data.tsv import label_vocabulary, read_tsv
from fastformer.train.finetune import heldout_split

WORD = re.compile(r"[a-z0-9]+")
L2_GRID = (1e-6, 1e-5, 1e-4)


def ngrams(text: str) -> list[str]:
    words = WORD.findall(text.lower())
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class Features:
    """log(1 + tf) * idf over the n-grams of the fitting texts; rows L2-normalised; sparse COO output."""

    def __init__(self, texts: list[str]):
        df = Counter(g for t in texts for g in set(ngrams(t)))
        self.index = {g: i for i, g in enumerate(sorted(df))}
        n = len(texts)
        self.idf = [math.log((1 + n) / (1 + df[g])) + 1.0 for g in sorted(df)]

    def __call__(self, texts: list[str]) -> torch.Tensor:
        rows, cols, vals = [], [], []
        for r, t in enumerate(texts):
            counts = Counter(g for g in ngrams(t) if g in self.index)
            ids = [self.index[g] for g in counts]
            w = [math.log1p(c) * self.idf[i] for c, i in zip(counts.values(), ids)]
            norm = math.sqrt(sum(v * v for v in w)) or 1.0
            rows += [r] * len(ids)
            cols += ids
            vals += [v / norm for v in w]
        return torch.sparse_coo_tensor(
            torch.tensor([rows, cols], dtype=torch.int64).reshape(2, -1),
            torch.tensor(vals, dtype=torch.float32),
            (len(texts), len(self.index)),
        ).coalesce()


def csr_pair(coo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, X^T), both sparse CSR, from a coalesced COO matrix."""
    return coo.to_sparse_csr(), coo.t().coalesce().to_sparse_csr()


def fit(x: torch.Tensor, xt: torch.Tensor, y: torch.Tensor, n_classes: int, l2: float, iters: int = 60) -> torch.Tensor:
    """Weights (F + 1, C) of a softmax regression minimising mean CE + l2 * |W|^2 (bias unpenalised).
    x: (N, F) sparse CSR, xt its transpose (also CSR): the gradient X^T (P - Y) / N is computed
    directly, a sparse-dense product each way per iteration."""
    w = torch.zeros(x.shape[1], n_classes, requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    onehot = torch.nn.functional.one_hot(y, n_classes).float()
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        with torch.no_grad():
            logits = x @ w + b
            logp = torch.log_softmax(logits, -1)
            loss = -(logp * onehot).sum() / len(y) + l2 * w.pow(2).sum()
            g = (logp.exp() - onehot) / len(y)
            w.grad = xt @ g + 2 * l2 * w
            b.grad = g.sum(0)
        return loss

    opt.step(closure)
    return torch.cat([w.detach(), b.detach()[None]])


def predict(x: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    return (x @ wb[:-1] + wb[-1]).argmax(-1)


def _read(flag: str, path: str) -> tuple[list, list]:
    """read_tsv, its DataError (no such file, no label column, ...) prefixed with the flag that named it."""
    try:
        return read_tsv(path)
    except DataError as e:
        raise DataError(f"{flag} {e}") from None


def run(train: str, eval_: str, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    tr_texts, tr_labels = _read("--train", train)
    ev_texts, ev_labels = _read("--eval", eval_)
    names = label_vocabulary(tr_labels, ev_labels)
    idx = {n: i for i, n in enumerate(names)}
    y_tr = torch.tensor([idx[n] for n in tr_labels])
    y_ev = torch.tensor([idx[n] for n in ev_labels])
    fit_i, val_i = heldout_split(y_tr.tolist(), 0.1, seed)
    best_l2, best_acc = L2_GRID[0], -1.0
    if val_i:
        feats = Features([tr_texts[i] for i in fit_i])
        x_fit, x_val = (
            csr_pair(feats([tr_texts[i] for i in fit_i])),
            feats([tr_texts[i] for i in val_i]).to_sparse_csr(),
        )
        for l2 in L2_GRID:
            wb = fit(*x_fit, y_tr[fit_i], len(names), l2)
            acc = float((predict(x_val, wb) == y_tr[val_i]).float().mean())
            if acc > best_acc:
                best_l2, best_acc = l2, acc
    feats = Features(tr_texts)
    wb = fit(*csr_pair(feats(tr_texts)), y_tr, len(names), best_l2)
    acc = float((predict(feats(ev_texts).to_sparse_csr(), wb) == y_ev).float().mean())
    return {
        "accuracy": acc,
        "n_train": len(tr_texts),
        "n_eval": len(ev_texts),
        "l2": best_l2,
        "val_accuracy": best_acc if val_i else None,
        "n_features": len(feats.index),
        "seconds": round(time.perf_counter() - t0, 2),
        "labels": names,
    }


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--seed", type=int, default=0, help="seeds the held-out split that picks the L2 strength")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    a = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    try:
        r = run(a.train, a.eval, a.seed)
    except DataError as e:  # a data file that is missing or not text<TAB>label: one line, not a traceback
        print(f"bow_baseline: {e}", file=sys.stderr)
        return 2
    print(
        f"bag-of-words logistic regression: accuracy {r['accuracy']:.4f} on {r['n_eval']} examples "
        f"({r['n_train']} training labels, {r['n_features']} n-grams, l2 {r['l2']:g}, {r['seconds']} s)"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
