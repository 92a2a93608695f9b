"""Text-to-text fine-tuning of the whole T5 encoder-decoder on `input<TAB>target` pairs.

    summary = finetune_text2text(Text2TextConfig(train="train.tsv", eval="test.tsv", init="runs/span"))

Teacher forcing: the encoder reads the input, the decoder the target shifted right, and the loss is
the fused linear-cross-entropy head on the target tokens (EOS included). Evaluation generates
(greedy, or beam search with `num_beams`) for the eval inputs and scores the text against the
targets: ROUGE-1/2/L F-measures, exact match (= accuracy when the targets are class labels as
words: classification as text), plus the teacher-forced loss and token accuracy.

From `init` (a `pretrain --objective span` output folder): its tokenizer and weights. From a preset
(`model`, default t5-tiny): a Unigram tokenizer trained on the training inputs and targets, random
weights. Writes to out_dir: eval.json (the summary returned), predictions.tsv
(input, target, prediction), config.json (what rebuilds the model: model_config, tokenizer,
generation settings), tokenizer.json, checkpoint.pt, metrics.jsonl, loss.png.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastformer
from fastformer.data.corpus import DataError
from fastformer.data.packing import pad_batch
from fastformer.data.text2text import Seq2SeqCollator, encode_pairs, read_pairs
from fastformer.data.tokenizer import load_tokenizer
from fastformer.models.presets import get_preset
from fastformer.models.t5 import T5_PRESETS, T5Config, T5ForConditionalGeneration

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .metrics import plot_loss
from .pretrain import ExampleSampler, seed_everything
from .text_metrics import exact_match, rouge
from .trainer import TrainConfig, Trainer

TASK = "text2text"


@dataclass
class Text2TextConfig(TrainConfig):
    train: str = ""
    eval: str = ""
    init: str | None = None            # a span pre-training output folder
    model: str | None = None           # or a t5-* preset (random init); default t5-tiny
    model_overrides: dict | None = None  # T5Config fields that replace the preset's (random init only)
    max_len: int = 128                 # input tokens, EOS included
    max_target_len: int = 64           # target tokens, EOS included
    vocab_size: int = 8192             # tokenizer trained for a preset
    dropout: float | None = None       # None: the model's own (0.0 for the presets and span pre-training)
    out_dir: str = "runs/text2text"
    steps: int = 300
    lr: float = 5e-4
    eval_every: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    max_new_tokens: int | None = None  # None: max_target_len
    eval_batch_size: int = 64
    eval_limit: int | None = None      # generate for the first N eval pairs only (None: all)
    n_examples: int = 20               # (input, target, prediction) examples kept in eval.json

    def validate(self) -> None:
        super().validate()
        for name in ("max_target_len", "num_beams", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError(f"--max-len must be at least 2, got {self.max_len}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.n_examples < 0:
            raise ValueError(f"--n-examples must be >= 0, got {self.n_examples}")


def finetune_text2text(cfg: Text2TextConfig) -> dict:
    """Fine-tune, evaluate by generating, write out_dir; returns the eval.json summary."""
    info, device = D.init(cfg.device)
    try:
        return _finetune(cfg, info, device)
    finally:
        D.shutdown(info)


def _build(cfg: Text2TextConfig, train_inputs, train_targets, info):
    """(model, tokenizer, model_config, source description) from --init or a preset."""
    from tokenizers import Tokenizer

    from .span_objective import SpanObjective

    obj = SpanObjective()
    if cfg.init:
        init = Path(cfg.init)
        for f in ("config.json", "tokenizer.json", CHECKPOINT_NAME):
            if not (init / f).is_file():
                raise CheckpointError(f"--init {init}: not a pretrain output folder (no {f})")
        if Path(cfg.out_dir).resolve() == init.resolve():
            raise ValueError(f"--out {cfg.out_dir} is the --init folder: fine-tuning would overwrite the "
                             "pre-trained checkpoint and metrics; choose another --out")
        try:
            pre = json.loads((init / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{init / 'config.json'}: not valid JSON ({e})") from None
        if pre.get("objective") != "span" and pre.get("task") != TASK:
            raise ValueError(f"--init {init}: text-to-text needs an encoder-decoder (pre-trained with "
                             f"--objective span or fine-tuned text-to-text), this one is {pre.get('objective')!r}")
        tok = load_tokenizer(init / "tokenizer.json")
        obj.check_tokenizer(tok, str(init / "tokenizer.json"))
        model_config = dict(pre["model_config"])
        model = T5ForConditionalGeneration(T5Config.from_dict(model_config))
        state = load_checkpoint(init / CHECKPOINT_NAME)["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"--init {init}: weights do not fit its config ({str(e).splitlines()[0]})") from None
        source = f"init {init} ({pre.get('model')}, {pre.get('objective') or pre.get('task')})"
    else:
        preset = cfg.model or "t5-tiny"
        get_preset(preset)
        if preset not in T5_PRESETS:
            raise ValueError(f"--model {preset}: text-to-text needs an encoder-decoder, a t5-* preset "
                             f"({', '.join(T5_PRESETS)})")
        saved = Path(cfg.out_dir) / "tokenizer.json"
        if cfg.resume and saved.is_file():      # the run's own tokenizer, not a re-trained one
            tok_json = saved.read_text() if info.main else None
        else:
            tok_json = (obj.build_tokenizer(list(train_inputs) + list(train_targets), cfg.vocab_size).to_str()
                        if info.main else None)
        tok = Tokenizer.from_str(D.broadcast_object(tok_json, info))
        seed_everything(cfg.seed)
        model = obj.build_model(preset, tok, seq_len=cfg.max_len)
        model_config = model.config.to_dict()
        if cfg.model_overrides:
            model_config.update(cfg.model_overrides)
            seed_everything(cfg.seed)
            model = T5ForConditionalGeneration(T5Config.from_dict(model_config))
        source = f"random init ({preset})"
    if cfg.dropout is not None and cfg.dropout != model_config.get("dropout_rate"):
        model_config["dropout_rate"] = cfg.dropout
        state = model.state_dict()
        model = T5ForConditionalGeneration(T5Config.from_dict(model_config))
        model.load_state_dict(state)
    return model, tok, model_config, source


def decode_generated(tok, ids: torch.Tensor, eos_id: int) -> list[str]:
    """Generated ids (N, 1 + T) (start token first) -> texts, each cut at its first EOS."""
    out = []
    for row in ids[:, 1:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_texts(model, tok, inputs: list[str], *, max_len: int, max_new_tokens: int, batch_size: int = 64,
                   num_beams: int = 1, length_penalty: float = 1.0, device=None, progress: bool = False) -> list[str]:
    """Generated text for each input (batched longest-first, so little padding), in input order."""
    cfg = model.config
    device = device or next(model.parameters()).device
    enc = [torch.tensor(e.ids[: max_len - 1] + [cfg.eos_token_id], dtype=torch.int64)
           for e in tok.encode_batch(list(inputs), add_special_tokens=False)]
    order = sorted(range(len(enc)), key=lambda i: -enc[i].numel())
    texts: list[str | None] = [None] * len(enc)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(enc), desc="generate", dynamic_ncols=True, leave=False)
        except ImportError:
            bar = None
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([enc[i] for i in idx], cfg.pad_token_id, pad_to_multiple_of=8)
        out = model.generate(ids.to(device), None if mask is None else mask.to(device),
                             max_new_tokens=max_new_tokens, num_beams=num_beams, length_penalty=length_penalty)
        for i, text in zip(idx, decode_generated(tok, out.cpu(), cfg.eos_token_id)):
            texts[i] = text
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    return texts


def load_text2text(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, config dict) of a text-to-text output folder; generate with
    `generate_texts(model, tok, inputs, max_len=config["max_len"], **config["generation"])`."""
    d = Path(path)
    for f in ("config.json", "tokenizer.json", CHECKPOINT_NAME):
        if not (d / f).is_file():
            raise CheckpointError(f"{d}: not a text-to-text output folder (no {f})")
    config = json.loads((d / "config.json").read_text())
    if config.get("task") != TASK:
        raise ValueError(f"{d}: task is {config.get('task')!r}, not {TASK!r}")
    model = T5ForConditionalGeneration(T5Config.from_dict(config["model_config"]))
    model.load_state_dict(load_checkpoint(d / CHECKPOINT_NAME)["model"])
    return model.to(device).eval(), load_tokenizer(d / "tokenizer.json"), config


def _finetune(cfg: Text2TextConfig, info: D.DistInfo, device: torch.device) -> dict:
    cfg.validate()
    if cfg.init and cfg.model:
        raise ValueError("give either --init DIR or --model PRESET, not both")
    if cfg.init and cfg.model_overrides:
        raise ValueError("model_overrides change a preset's random-init architecture; --init fixes the architecture")
    train_inputs, train_targets = read_pairs(cfg.train)
    eval_inputs, eval_targets = read_pairs(cfg.eval)
    model, tok, model_config, source = _build(cfg, train_inputs, train_targets, info)
    mc = model.config
    kw = dict(max_len=cfg.max_len, max_target_len=cfg.max_target_len, eos_id=mc.eos_token_id)
    train_ex = encode_pairs(tok, train_inputs, train_targets, **kw)
    eval_ex = encode_pairs(tok, eval_inputs, eval_targets, **kw)
    collate = Seq2SeqCollator(mc.pad_token_id)
    sampler = ExampleSampler(len(train_ex), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, info=info,
                             seed=cfg.seed)

    def batch_fn(step, micro):
        return collate([train_ex[i] for i in sampler.indices(step, micro)])

    def step_fn(m, batch, train):
        out = m(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_logits=not train)
        metrics = {}
        if not train:
            valid = batch["labels"] != -100
            metrics["correct"] = int(((out.logits.argmax(-1) == batch["labels"]) & valid).sum())
        return out.loss_sum, out.n_predicted, metrics

    eval_batches = [collate(eval_ex[i:i + cfg.batch_size]) for i in range(0, len(eval_ex), cfg.batch_size)]
    max_new = cfg.max_new_tokens or cfg.max_target_len
    generation = {"max_new_tokens": max_new, "num_beams": cfg.num_beams, "length_penalty": cfg.length_penalty}
    out = Path(cfg.out_dir)
    fingerprint = {"task": TASK, "source": source, "model_config": model_config, "max_len": cfg.max_len,
                   "max_target_len": cfg.max_target_len, "train": str(Path(cfg.train).resolve())}
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tokenizer.json").write_text(tok.to_str())
        config = {"fastformer_version": fastformer.__version__, "run": "finetune", "task": TASK,
                  "objective": "span", "architecture": type(model).__name__, "model": source,
                  "model_config": model_config, "max_len": cfg.max_len, "max_target_len": cfg.max_target_len,
                  "generation": generation,
                  "train": asdict(cfg), "n_train": len(train_ex), "n_eval": len(eval_ex)}
        (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    D.barrier(info)
    trainer = Trainer(model, cfg, batch_fn=batch_fn, step_fn=step_fn,
                      tokens_fn=lambda b: int(b["attention_mask"].sum()), eval_batches=eval_batches,
                      fingerprint=fingerprint, dist_info=info, device=device, desc=f"{TASK} finetune")
    result = trainer.train()
    ev = result.eval or trainer.evaluate()

    summary = {}
    if info.main:
        n_gen = len(eval_inputs) if cfg.eval_limit is None else min(cfg.eval_limit, len(eval_inputs))
        t0 = time.perf_counter()
        preds = generate_texts(trainer.raw_model, tok, eval_inputs[:n_gen], max_len=cfg.max_len,
                               max_new_tokens=max_new, batch_size=cfg.eval_batch_size, num_beams=cfg.num_beams,
                               length_penalty=cfg.length_penalty, device=device, progress=cfg.progress)
        gen_s = time.perf_counter() - t0
        refs = eval_targets[:n_gen]
        scores = rouge(preds, refs)
        em = exact_match(preds, refs)
        summary = {**scores, "exact_match": em, "accuracy": em, "eval_loss": ev.get("eval_loss"),
                   "token_accuracy": ev.get("eval_accuracy"), "n_eval": n_gen, "n_train": len(train_ex),
                   "steps": result.step, "final_train_loss": result.final_loss, "source": source,
                   "tokens_per_s": result.tokens_per_s, "generation": generation, "generation_seconds": gen_s,
                   "examples": [{"input": i, "target": t, "prediction": p}
                                for i, t, p in zip(eval_inputs[:cfg.n_examples], refs, preds)],
                   "out_dir": str(out)}
        with open(out / "predictions.tsv", "w", encoding="utf-8") as f:
            f.write("input\ttarget\tprediction\n")
            for i, t, p in zip(eval_inputs, refs, preds):
                f.write("\t".join(" ".join(x.split()) for x in (i, t, p)) + "\n")
        (out / "eval.json").write_text(json.dumps(summary, indent=2))
        plot_loss(out / "metrics.jsonl", out / "loss.png", title=f"text-to-text fine-tuning, {source}")
    D.barrier(info)
    return D.broadcast_object(summary if info.main else None, info)
