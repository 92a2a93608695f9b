"""Fine-tuning behind `fastformer finetune`: sequence classification from TSV files.

From `--init DIR` (a pretrain output): its config.json says which objective built it, the objective
rebuilds the encoder from the checkpoint and adds a classification head; the tokenizer is DIR's.
From scratch (`--model PRESET`): a tokenizer is trained on the training texts and the weights are random.
Writes DIR/eval.json (accuracy, eval loss, label names) plus metrics.jsonl, checkpoint.pt, loss.png.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import fastformer as ff
from fastformer.data.corpus import DataError
from fastformer.data.packing import pad_batch
from fastformer.data.tokenizer import load_tokenizer
from fastformer.data.tsv import label_vocabulary, read_tsv
from fastformer.models.presets import get_preset

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .metrics import plot_loss
from .objectives import get_objective, objective_for_preset
from .pretrain import ExampleSampler, seed_everything
from .trainer import TrainConfig, Trainer


@dataclass
class FinetuneConfig(TrainConfig):
    train: str = ""
    eval: str = ""
    init: str | None = None
    model: str | None = None
    max_len: int = 128
    vocab_size: int = 8192
    out_dir: str = "runs/finetune"
    steps: int = 300
    lr: float = 1e-4
    eval_every: int = 0


def _pad_id(tok) -> int:
    for name in ("[PAD]", "<pad>"):
        i = tok.token_to_id(name)
        if i is not None:
            return i
    return 0


def finetune(cfg: FinetuneConfig) -> dict:
    info, device = D.init(cfg.device)
    try:
        return _finetune(cfg, info, device)
    finally:
        D.shutdown(info)


def _finetune(cfg: FinetuneConfig, info: D.DistInfo, device: torch.device) -> dict:
    cfg.validate()
    if cfg.init and cfg.model:
        raise ValueError("give either --init DIR or --model PRESET, not both")
    train_texts, train_labels = read_tsv(cfg.train)
    eval_texts, eval_labels = read_tsv(cfg.eval)
    if len(label_vocabulary(train_labels)) < 2:
        raise DataError(f"{cfg.train}: needs at least 2 distinct labels, found {len(label_vocabulary(train_labels))}")
    # classes from both files: a label that only the eval file has (a small training sample) gets a
    # head output that never trains, and its examples count as misses, instead of ending the run
    names = label_vocabulary(train_labels, eval_labels)
    index = {n: i for i, n in enumerate(names)}
    train_names = set(label_vocabulary(train_labels))
    unseen = [n for n in names if n not in train_names]
    if unseen and info.main:
        warnings.warn(f"{cfg.eval}: label(s) {unseen[:8]}{' ...' if len(unseen) > 8 else ''} never appear in "
                      f"{cfg.train}; the model cannot predict them and their examples count as misses",
                      stacklevel=2)

    def to_ids(labels, path):
        out = []
        for lab in labels:
            key = lab if lab in index else (str(int(lab)) if lab.lstrip("-").isdigit() else lab)
            if key not in index:
                raise DataError(f"{path}: label {lab!r} cannot be matched to the label list {names}")
            out.append(index[key])
        return torch.tensor(out, dtype=torch.int64)

    y_train, y_eval = to_ids(train_labels, cfg.train), to_ids(eval_labels, cfg.eval)

    from tokenizers import Tokenizer

    seed_everything(cfg.seed)
    if cfg.init:
        init = Path(cfg.init)
        for f in ("config.json", "tokenizer.json", CHECKPOINT_NAME):
            if not (init / f).is_file():
                raise CheckpointError(f"--init {init}: not a pretrain output folder (no {f})")
        if Path(cfg.out_dir).resolve() == init.resolve():
            raise ValueError(f"--out {cfg.out_dir} is the --init folder: fine-tuning would overwrite the "
                             "pre-trained checkpoint and metrics; choose another --out")
        try:
            pre_cfg = json.loads((init / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{init / 'config.json'}: not valid JSON ({e})") from None
        obj = get_objective(pre_cfg["objective"])
        tok = load_tokenizer(init / "tokenizer.json")
        obj.check_tokenizer(tok, str(init / "tokenizer.json"))
        model_config = pre_cfg["model_config"]
        state = load_checkpoint(init / CHECKPOINT_NAME)["model"]
        model = obj.build_classifier(model_config, len(names), state)
        source = f"init {init} ({pre_cfg.get('model')}, {obj.name})"
    else:
        preset = cfg.model or "bert-tiny"
        get_preset(preset)
        obj = objective_for_preset(preset)
        tok_json = obj.build_tokenizer(train_texts, cfg.vocab_size).to_str() if info.main else None
        tok = Tokenizer.from_str(D.broadcast_object(tok_json, info))
        model_config = obj.model_config(obj.build_model(preset, tok, seq_len=cfg.max_len))
        seed_everything(cfg.seed)
        model = obj.build_classifier(model_config, len(names))
        source = f"random init ({preset})"
    max_len = min(cfg.max_len, int(model_config.get("max_position", cfg.max_len)))
    x_train = obj.encode_for_classification(tok, train_texts, max_len)
    x_eval = obj.encode_for_classification(tok, eval_texts, max_len)
    pad = _pad_id(tok)

    def collate(idx, xs, ys):
        ids, mask = pad_batch([xs[i] for i in idx], pad, pad_to_multiple_of=8)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": mask, "labels": ys[idx]}

    sampler = ExampleSampler(len(x_train), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, info=info,
                             seed=cfg.seed)

    def batch_fn(step, micro):
        return collate(sampler.indices(step, micro), x_train, y_train)

    def step_fn(m, batch, train):
        logits = m(batch["input_ids"], batch["attention_mask"])
        loss = ff.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        metrics = {} if train else {"correct": int((logits.argmax(-1) == batch["labels"]).sum())}
        return loss, batch["labels"].numel(), metrics

    eval_batches = [collate(list(range(i, min(i + cfg.batch_size, len(x_eval)))), x_eval, y_eval)
                    for i in range(0, len(x_eval), cfg.batch_size)]
    fingerprint = {"task": "finetune", "source": source, "labels": names, "model_config": model_config}
    trainer = Trainer(model, cfg, batch_fn=batch_fn, step_fn=step_fn,
                      tokens_fn=lambda b: int(b["attention_mask"].sum()), eval_batches=eval_batches,
                      fingerprint=fingerprint, dist_info=info, device=device, desc="finetune")
    result = trainer.train()
    ev = result.eval or trainer.evaluate()
    out = Path(cfg.out_dir)
    summary = {"accuracy": ev["eval_accuracy"], "eval_loss": ev["eval_loss"], "n_eval": len(x_eval),
               "n_train": len(x_train), "labels": names, "steps": result.step, "final_train_loss": result.final_loss,
               "source": source, "tokens_per_s": result.tokens_per_s, "out_dir": str(out)}
    if info.main:
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
        (out / "tokenizer.json").write_text(tok.to_str())
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"fine-tuning, {source}")
    return summary
