"""Pre-training pipeline behind `fastformer pretrain`: corpus -> tokenizer -> examples -> Trainer.

Objective-specific steps go through the `Objective` interface (fastformer/train/objectives.py).
Writes to out_dir: tokenizer.json, config.json, metrics.jsonl, checkpoint.pt, loss.png. A non-empty
out_dir must be this run (resume) or be replaced explicitly (overwrite); the peak memory is estimated
before the first example is built and a run that cannot fit is refused.
"""

from __future__ import annotations

import random
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

import fastformer
from fastformer.data.corpus import DataError, builtin_corpus_cached, load_texts, split_heldout
from fastformer.data.tokenizer import tokenizer_from_json
from fastformer.models.loading import ARCHITECTURES, architecture_name
from fastformer.models.presets import canonical_preset, get_preset, known_presets, preset_family

from . import distributed as D
from .checkpoint import CheckpointError
from .metrics import loss_plot_on_stop, plot_loss, read_metrics
from .objectives import OBJECTIVES, get_objective
from .resources import check_memory, estimate_memory, set_threads
from .run_dir import (
    FastformerWarning,
    data_digest,
    prepare_out_dir,
    started_on_other_data,
    write_run_files,
    writing,
)
from .trainer import TrainConfig, Trainer, TrainResult


@dataclass
class PretrainConfig(TrainConfig):
    objective: str = "mlm"
    model: str | None = None  # preset; None: the objective's default
    data: list[str] = field(default_factory=list)
    seq_len: int = 128
    vocab_size: int = 8192
    tokenizer: str | None = None  # reuse this tokenizer.json instead of training one
    packing: bool = True
    eval_batches: int = 16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class ExampleSampler:
    """Maps (step, micro, rank) to examples: a seeded permutation per epoch over all examples; step s
    takes the next `global_batch` indices, rank r its own contiguous slice. Pure function of the step,
    so the data position in a checkpoint is just the step."""

    def __init__(self, n: int, *, batch_size: int, grad_accum: int, info: D.DistInfo, seed: int):
        self.n, self.bs, self.accum, self.info, self.seed = n, batch_size, grad_accum, info, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int, micro: int) -> list[int]:
        per_rank = self.bs * self.accum
        start = (step - 1) * per_rank * self.info.world + self.info.rank * per_rank + micro * self.bs
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(start, start + self.bs)]


def _batch_seed(seed: int, step: int, global_micro: int) -> int:
    # global_micro = rank * grad_accum + micro: N ranks x A micro-batches draw the same masks as one
    # process with N*A micro-batches.
    return (seed * 1_000_003 + step * 10_007 + global_micro) % (2**63)


def pretrain(cfg: PretrainConfig) -> dict:
    """Run pre-training; returns a summary dict (also printed by the CLI)."""
    info, device = D.init(cfg.device)
    try:
        return _pretrain(cfg, info, device)
    finally:
        D.shutdown(info)


def _note(cfg: PretrainConfig, info: D.DistInfo, line: str) -> None:
    """A line on stderr before a step that takes seconds without other output, for a person watching
    (progress on, rank 0, stderr a terminal; a log or a pipe keeps its one-line errors): a first run
    otherwise sat silent while the corpus was built or the tokenizer trained."""
    if cfg.progress and info.main and sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)


def _pretrain(cfg: PretrainConfig, info: D.DistInfo, device: torch.device) -> dict:
    cfg.validate()
    obj = get_objective(cfg.objective)
    preset = canonical_preset(cfg.model or obj.default_model)  # a deprecated name: warned, recorded as the new one
    get_preset(preset)  # unknown preset -> error before any work
    if preset_family(preset) != obj.family:  # ... and so is one the objective cannot train
        fits = [p for p in known_presets() if preset_family(p) == obj.family]
        others = [name for name in OBJECTIVES if get_objective(name).family == preset_family(preset)]
        hint = f", or give --objective {' / '.join(others)} for {preset}" if others else ""
        raise ValueError(
            f"--model {preset}: the {obj.name} objective trains {obj.family}-* presets "
            f"({', '.join(fits)}); leave --model out for {obj.default_model}{hint}"
        )
    out = Path(cfg.out_dir)
    prepare_out_dir(out, run="pretrain", resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
    if cfg.resume and not (out / "tokenizer.json").is_file():
        raise CheckpointError(f"--resume: no tokenizer.json in {out}")
    D.barrier(info)  # every rank has checked --out before rank 0 writes
    threads = set_threads(cfg.threads)

    if not cfg.data and not builtin_corpus_cached():
        _note(cfg, info, "pretrain: building the built-in corpus from the installed Python's docstrings (once)")
    docs = load_texts(cfg.data)
    train_docs, eval_docs = split_heldout(docs)
    digest = data_digest(docs)
    if cfg.resume and info.main:
        _warn_if_data_changed(out, digest, len(docs), cfg.data)

    # Tokenizer: trained once on rank 0 (or reloaded on resume) and shared as JSON text.
    if cfg.resume:
        tok_source = str(out / "tokenizer.json")
        tok_json = (out / "tokenizer.json").read_text() if info.main else None
    elif cfg.tokenizer:
        if not Path(cfg.tokenizer).is_file():
            raise DataError(f"--tokenizer {cfg.tokenizer}: no such file")
        tok_source = f"--tokenizer {cfg.tokenizer}"
        tok_json = Path(cfg.tokenizer).read_text() if info.main else None
    else:
        tok_source = "the trained tokenizer"
        _note(cfg, info, f"pretrain: training a {cfg.vocab_size}-token tokenizer on {len(train_docs):,} documents")
        tok_json = obj.build_tokenizer(train_docs, cfg.vocab_size).to_str() if info.main else None
    tok = tokenizer_from_json(D.broadcast_object(tok_json, info), tok_source)
    obj.check_tokenizer(tok, tok_source)
    obj.check_seq_len(tok, cfg.seq_len)  # before the memory check: the length may be impossible anyway

    seed_everything(cfg.seed)
    model = obj.build_model(preset, tok, seq_len=cfg.seq_len)
    model_config = obj.model_config(model)
    mem = _check_memory(cfg, obj, model, device, info)  # before the examples: a run that cannot fit stops here

    train_ex = obj.make_examples(train_docs, tok, cfg.seq_len, packing=cfg.packing)
    eval_ex = obj.make_examples(eval_docs, tok, cfg.seq_len, packing=cfg.packing) if eval_docs else []
    if not train_ex:
        raise DataError("the corpus is too small: no training example could be made")
    collate = obj.make_collator(tok, cfg.seq_len)
    eval_ex = eval_ex[: cfg.eval_batches * cfg.batch_size]
    if info.main and len(eval_ex) < MIN_HELDOUT_EXAMPLES:
        where = f"--data {' '.join(cfg.data)}" if cfg.data else "the corpus"
        warnings.warn(
            f"the held-out slice of {where} is {len(eval_ex)} example(s) of {cfg.seq_len} tokens "
            f"({len(eval_docs)} of {len(docs)} documents): "
            + ("no evaluation" if not eval_ex else "eval loss and accuracy will be noisy")
            + "; more documents (a blank line separates two) give a larger one",
            FastformerWarning,
            stacklevel=3,
        )
    eval_gen = torch.Generator().manual_seed(12345)  # fixed masks: eval losses comparable over time
    eval_batches = [collate(eval_ex[i : i + cfg.batch_size], eval_gen) for i in range(0, len(eval_ex), cfg.batch_size)]

    sampler = ExampleSampler(
        len(train_ex), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, info=info, seed=cfg.seed
    )

    def batch_fn(step: int, micro: int) -> dict:
        g = torch.Generator().manual_seed(_batch_seed(cfg.seed, step, info.rank * cfg.grad_accum + micro))
        return collate([train_ex[i] for i in sampler.indices(step, micro)], g)

    def step_fn(m, batch, train):
        return obj.step(m, batch, train=train)

    data = [str(Path(p).resolve()) for p in cfg.data]
    fingerprint = {
        "objective": obj.name,
        "model": preset,
        "model_config": model_config,
        "seq_len": cfg.seq_len,
        "vocab_size": tok.get_vocab_size(),
        "data": data,
        "packing": cfg.packing,
    }
    n_params = sum(p.numel() for p in model.parameters())
    config = {}
    if info.main:
        config = {
            "fastformer_version": fastformer.__version__,
            "run": "pretrain",
            "task": obj.name,
            "objective": obj.name,
            "model": preset,
            "architecture": architecture_name(model),
            "kind": ARCHITECTURES[architecture_name(model)].kind,
            "model_config": model_config,
            "n_parameters": n_params,
            "world_size": info.world,
            "threads": threads[0],
            "threads_source": threads[1],
            "train": {
                **asdict(cfg),
                "model": preset,
                "data": data,
                "warmup_steps": cfg.warmup,
                "warmup_default": cfg.warmup_steps is None,
                "resume": False,
                "overwrite": False,
            },
            "n_train_examples": len(train_ex),
            "n_eval_examples": len(eval_ex),
            "n_documents": len(docs),
            "data_digest": digest,
            "data": cfg.data or ["<built-in corpus: Python docstrings>"],
        }
        print(
            f"pretrain {preset} ({obj.name}): {n_params / 1e6:.1f}M parameters on {device}"
            f"{f' x{info.world}' if info.enabled else ''}, {threads[0]} thread{'s' if threads[0] != 1 else ''} "
            f"({threads[1]}), {len(train_ex):,} examples of {cfg.seq_len} tokens\n"
            f"  memory: {mem.describe() if mem else 'not checked'}\n"
            f"  output: {out}{' (resumed)' if cfg.resume else ''}",
            flush=True,
        )
    D.barrier(info)

    trainer = Trainer(
        model,
        cfg,
        batch_fn=batch_fn,
        step_fn=step_fn,
        tokens_fn=obj.input_tokens,
        eval_batches=eval_batches,
        fingerprint=fingerprint,
        dist_info=info,
        device=device,
        flops_per_token=obj.flops_per_token(model, cfg.seq_len),
        desc=f"pretrain {preset}",
        write_run_files=lambda: write_run_files(
            out,
            cfg.overwrite,
            config,
            None if cfg.resume else tok_json,  # a resumed run keeps its tokenizer
        ),
    )
    title = f"{obj.name} pre-training, {preset}"
    with loss_plot_on_stop(out, title, info.main):
        result: TrainResult = trainer.train()
    if info.main:
        with writing("--out", out):
            plot_loss(out / "metrics.jsonl", out / "loss.png", title=title)
    rows = read_metrics(out / "metrics.jsonl") if info.main else []
    first = rows[0]["loss"] if rows else None
    final, tps = result.final_loss, result.tokens_per_s
    evaluated = result.eval
    if rows and final != final:  # --resume of a finished run: no step ran, report the logged ones
        final = rows[-1]["loss"]
        logged = [r for r in rows if "eval_loss" in r]
        if not evaluated and logged:
            evaluated = {k: v for k, v in logged[-1].items() if k.startswith("eval_")}
    return {
        "objective": obj.name,
        "model": preset,
        "first_loss": first,
        "device": str(device),
        "world_size": info.world,
        "steps": result.step,
        "final_loss": final,
        "tokens_per_s": tps,
        "seconds": result.seconds,
        "session_seconds": result.session_seconds,
        "resumed_from": result.resumed_from,
        **evaluated,
        "eval_accuracy_name": obj.accuracy_name,
        "stopped_early": result.stopped_early,
        "threads": threads[0],
        "out_dir": str(out),
    }


MIN_HELDOUT_EXAMPLES = 8


def _warn_if_data_changed(out: Path, digest: str, n_docs: int, data: list[str]) -> None:
    """--resume on data other than the run's: warn (the run goes on, no longer the same as an
    uninterrupted one). A config.json from before digests were recorded is not checked."""
    before = started_on_other_data(out, "data_digest", digest)
    if before is None:
        return
    where = f"--data {' '.join(data)}" if data else "the built-in corpus"
    warnings.warn(
        f"{where} changed since this run began ({before.get('n_documents', '?')} documents then, {n_docs} "
        "now): the resumed run trains and evaluates on the new text, so it is no longer the run an "
        "uninterrupted one would have been",
        FastformerWarning,
        stacklevel=4,
    )


def _check_memory(cfg: PretrainConfig, obj, model, device: torch.device, info: D.DistInfo):
    """Refuse a run that cannot fit (warn when close); the estimate (None when not checked)."""
    if not cfg.memory_check:
        return None

    def est(batch, seq_len):
        target, rows = obj.memory_shape(seq_len)
        return estimate_memory(
            model,
            batch_size=batch,
            seq_len=seq_len,
            target_len=target,
            head_rows=batch * rows,
            optimizer=cfg.optimizer,
            device=device,
            processes=D.local_processes(info, device),
            precision=cfg.precision,
        )

    def warn(msg):
        if info.main:
            warnings.warn(msg, FastformerWarning, stacklevel=4)

    return check_memory(
        est, batch_size=cfg.batch_size, len_flag="--seq-len", seq_len=cfg.seq_len, grad_accum=cfg.grad_accum, warn=warn
    )
