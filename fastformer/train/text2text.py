"""Text-to-text fine-tuning of the whole T5 encoder-decoder on `input<TAB>target` pairs
(`fastformer finetune --task text2text`).

    summary = finetune_text2text(Text2TextConfig(train="train.tsv", eval="test.tsv", init="runs/span"))

Teacher forcing: the encoder reads the input, the decoder the target shifted right, and the loss is
the fused linear-cross-entropy head on the target tokens (EOS included). Evaluation generates
(greedy, or beam search with `num_beams`) for the eval inputs and scores the text against the
targets: ROUGE-1/2/L F-measures, exact match (= accuracy when the targets are class labels as
words: classification as text), plus the teacher-forced loss and token accuracy.

From `init` (a `pretrain --objective span` output folder, or an earlier text-to-text run): its
tokenizer and weights. From a preset (`model`, default t5-tiny): a Unigram tokenizer trained on the
training inputs and targets, random weights. The run folder follows the rules of every fine-tuning
run (`fastformer.train.run_dir`): a non-empty out_dir must be this run to resume or be replaced with
overwrite, never a pre-training folder; config.json and tokenizer.json are written before the first
step; SIGINT / SIGTERM checkpoint (also during the final generation, which a resume then redoes).
Writes to out_dir: eval.json (the summary returned), predictions.tsv (input, target, prediction),
config.json (what rebuilds the model: model_config, tokenizer, length limits, generation settings,
the training settings), tokenizer.json, checkpoint.pt, metrics.jsonl, loss.png.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastformer
from fastformer.data.corpus import DataError, named_by
from fastformer.data.packing import pad_batch
from fastformer.data.text2text import Seq2SeqCollator, encode_pairs, read_pairs
from fastformer.data.tokenizer import load_tokenizer
from fastformer.models.generation import check_encoder_repetition_penalty
from fastformer.models.loading import ARCHITECTURES, architecture_name
from fastformer.models.presets import canonical_preset, get_preset
from fastformer.models.t5 import T5_PRESETS, T5Config, T5ForConditionalGeneration

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .finetune import prepare_finetune_out
from .metrics import loss_plot_on_stop, plot_loss, read_metrics
from .pretrain import ExampleSampler, seed_everything
from .resources import check_memory, estimate_memory, set_threads
from .run_dir import (
    FastformerWarning,
    check_init_folder,
    prepare_out_dir,
    rows_digests,
    stored_run_config,
    write_file,
    write_run_files,
    writing,
)
from .text_metrics import exact_match, rouge
from .trainer import TrainConfig, Trainer, TrainingInterrupted

TASK = "text2text"
MIN_EVAL_EXAMPLES = 20  # fewer held-out pairs: the scores move in coarse steps (warned)
DEFAULT_MAX_NEW_TOKENS = 64  # generation limit for a folder that records none (a span pre-training run)
# Fields of Text2TextConfig that only text-to-text runs have (the CLI's generation / length flags).
TEXT2TEXT_FIELDS = (
    "max_target_len",
    "num_beams",
    "max_new_tokens",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "dropout",
    "eval_limit",
    "eval_generate",
)


@dataclass
class Text2TextConfig(TrainConfig):
    train: str = ""
    eval: str = ""
    init: str | None = None  # a span pre-training output folder (or a text-to-text run)
    model: str | None = None  # or a t5-* preset (random init); default t5-tiny
    model_overrides: dict | None = None  # T5Config fields that replace the preset's (random init only)
    max_len: int = 128  # input tokens, EOS included
    max_target_len: int = 64  # target tokens, EOS included
    vocab_size: int = 8192  # tokenizer trained for a preset
    dropout: float | None = None  # None: the model's own (0.0 for the presets and span pre-training)
    out_dir: str = "runs/text2text"
    steps: int = 300
    lr: float = 5e-4
    eval_every: int = 0
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # > 0: no n-gram twice in a generated text
    encoder_repetition_penalty: float = 1.0  # > 1: favour tokens of the input (1: off)
    max_new_tokens: int | None = None  # None: max_target_len
    eval_batch_size: int = 64
    eval_limit: int | None = None  # generate for the first N eval pairs only (None: all)
    eval_generate: int = 0  # > 0: every eval_every steps, also ROUGE of generation for the first N eval pairs
    n_examples: int = 20  # (input, target, prediction) examples kept in eval.json
    task: str = TASK

    def validate(self) -> None:
        super().validate()
        if not self.train or not self.eval:
            if self.resume:  # no finetune run in --out to take them from: say what is there
                prepare_out_dir(self.out_dir, run="finetune", resume=True, overwrite=False)
            raise ValueError("finetune needs --train FILE.tsv and --eval FILE.tsv")
        if self.task != TASK:
            raise ValueError(f"--task {self.task}: this pipeline fine-tunes text-to-text (--task {TASK})")
        for name in ("max_target_len", "num_beams", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_len < 2:
            raise ValueError(f"--max-len must be at least 2, got {self.max_len}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"--eval-limit must be at least 1, got {self.eval_limit}")
        if self.eval_generate < 0:
            raise ValueError(f"--eval-generate must be >= 0 (0: off), got {self.eval_generate}")
        if self.eval_generate and not self.eval_every:
            raise ValueError(
                "--eval-generate N scores generation at each --eval-every evaluation: give --eval-every STEPS too "
                "(the final evaluation generates for the --eval-limit pairs anyway)"
            )
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"--no-repeat-ngram-size must be >= 0 (0: off), got {self.no_repeat_ngram_size}")
        check_encoder_repetition_penalty(self.encoder_repetition_penalty, "--encoder-repetition-penalty")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"--length-penalty must be a finite number, got {self.length_penalty}")
        if self.n_examples < 0:
            raise ValueError(f"--n-examples must be >= 0, got {self.n_examples}")


def finetune_text2text(cfg: Text2TextConfig) -> dict:
    """Fine-tune, evaluate by generating, write out_dir; returns the eval.json summary."""
    info, device = D.init(cfg.device)
    try:
        return _finetune(cfg, info, device)
    finally:
        D.shutdown(info)


def _read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def _build(cfg: Text2TextConfig, train_inputs, train_targets, info):
    """(model, tokenizer, model_config, source description, preset name) from --init or a preset."""
    from tokenizers import Tokenizer

    from .span_objective import SpanObjective

    obj = SpanObjective()
    if cfg.init and cfg.resume:
        # the run's own tokenizer and model config, written at its start: the --init folder may have
        # changed or gone since (the weights come from the run's checkpoint)
        out = Path(cfg.out_dir)
        run = stored_run_config(out)
        tok = load_tokenizer(out / "tokenizer.json")
        model_config = dict(run["model_config"])
        model = T5ForConditionalGeneration(T5Config.from_dict(model_config))
        preset, source = canonical_preset(run.get("model"), warn=False), run["source"]
        seed_everything(cfg.seed)
    elif cfg.init:
        init = Path(cfg.init)
        check_init_folder(init)
        pre = _read_config(init / "config.json")
        if pre.get("objective") != "span" and pre.get("task") != TASK:
            what = (
                f"a {pre.get('task') or 'classify'} fine-tuning run ({pre.get('architecture')})"
                if pre.get("run") == "finetune"
                else f"a {pre.get('objective')!r} pre-training run"
            )
            raise ValueError(
                f"--init {init}: text-to-text needs an encoder-decoder (pre-trained with "
                f"--objective span or fine-tuned text-to-text); this folder holds {what}"
            )
        if pre.get("architecture", "T5ForConditionalGeneration") != "T5ForConditionalGeneration":
            raise ValueError(
                f"--init {init}: a {pre['architecture']} run; text-to-text needs the whole "
                "encoder-decoder (a span pre-training or text-to-text folder)"
            )
        tok = load_tokenizer(init / "tokenizer.json")
        obj.check_tokenizer(tok, str(init / "tokenizer.json"))
        model_config = dict(pre["model_config"])
        model = T5ForConditionalGeneration(T5Config.from_dict(model_config))
        state = load_checkpoint(init / CHECKPOINT_NAME)["model"]
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise CheckpointError(f"--init {init}: weights do not fit its config ({str(e).splitlines()[0]})") from None
        preset = canonical_preset(pre.get("model"), warn=False)  # an older folder's name: the current one
        # the resolved folder, as config.json records it: a resume from another directory (or with the
        # --init a relative path named) must recognise its own checkpoint
        kind = pre.get("objective") if pre.get("task") != TASK else TASK
        source = f"init {init.resolve()} ({preset}, {kind})"
        seed_everything(cfg.seed)  # dropout masks follow --seed (a random init is seeded before it is built)
    else:
        preset = canonical_preset(cfg.model or "t5-tiny")
        get_preset(preset)
        if preset not in T5_PRESETS:
            raise ValueError(
                f"--model {preset}: text-to-text needs an encoder-decoder, a t5-* preset ({', '.join(T5_PRESETS)})"
            )
        saved = Path(cfg.out_dir) / "tokenizer.json"
        if cfg.resume and saved.is_file():  # the run's own tokenizer, not a re-trained one
            tok_json = saved.read_text() if info.main else None
        else:
            tok_json = (
                obj.build_tokenizer(list(train_inputs) + list(train_targets), cfg.vocab_size).to_str()
                if info.main
                else None
            )
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
    return model, tok, model_config, source, preset


# ---------------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------------


def decode_generated(tok, ids: torch.Tensor, eos_id: int) -> list[str]:
    """Generated ids (N, 1 + T) (start token first) -> texts, each cut at its first EOS."""
    out = []
    for row in ids[:, 1:].tolist():
        if eos_id in row:
            row = row[: row.index(eos_id)]
        out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


@torch.no_grad()
def generate_texts(
    model,
    tok,
    inputs: list[str],
    *,
    max_len: int,
    max_new_tokens: int,
    batch_size: int = 64,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
    encoder_repetition_penalty: float = 1.0,
    device=None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[str]:
    """Generated text for each input (batched longest-first, so little padding), in input order.

    Inputs are encoded as fine-tuning encodes them (tokens, cut to max_len - 1, then EOS). progress:
    a progress bar; log: without one, called with a line about every tenth of the inputs."""
    for name, v, least in (("max_len", max_len, 2), ("batch_size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    cfg = model.config
    device = device or next(model.parameters()).device
    enc = [
        torch.tensor(e.ids[: max_len - 1] + [cfg.eos_token_id], dtype=torch.int64)
        for e in tok.encode_batch(list(inputs), add_special_tokens=False)
    ]
    order = sorted(range(len(enc)), key=lambda i: -enc[i].numel())
    texts: list[str | None] = [None] * len(enc)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(enc), desc="generate", dynamic_ncols=True, leave=False)
        except ImportError:
            bar = None
    t0, next_log = time.perf_counter(), max(1, len(enc) // 10)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_batch([enc[i] for i in idx], cfg.pad_token_id, pad_to_multiple_of=8)
        out = model.generate(
            ids.to(device),
            None if mask is None else mask.to(device),
            max_new_tokens=max_new_tokens,
            num_beams=num_beams,
            length_penalty=length_penalty,
            no_repeat_ngram_size=no_repeat_ngram_size,
            encoder_repetition_penalty=encoder_repetition_penalty,
        )
        for i, text in zip(idx, decode_generated(tok, out.cpu(), cfg.eos_token_id)):
            texts[i] = text
        done = start + len(idx)
        if bar is not None:
            bar.update(len(idx))
        elif log is not None and (done >= next_log or done == len(enc)):
            log(f"generated {done:,}/{len(enc):,} ({time.perf_counter() - t0:.0f} s)")
            next_log = done + max(1, len(enc) // 10)
    if bar is not None:
        bar.close()
    return texts


def generation_settings(config: dict, **overrides) -> tuple[int, dict]:
    """(max input tokens, generate keywords) for a run folder's config.json: its recorded settings
    (a text-to-text run) or defaults (a span pre-training run), overridden by the non-None keywords
    (max_len, max_new_tokens, num_beams, length_penalty, no_repeat_ngram_size, encoder_repetition_penalty)."""
    gen = {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS,
        "num_beams": 1,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_repetition_penalty": 1.0,
        **(config.get("generation") or {}),
    }
    train = config.get("train") or {}
    max_len = int(config.get("max_len") or train.get("max_len") or train.get("seq_len") or 512)
    for key, least in (("max_len", 2), ("max_new_tokens", 1), ("num_beams", 1), ("no_repeat_ngram_size", 0)):
        v = overrides.get(key)
        if v is not None and v < least:
            raise ValueError(f"--{key.replace('_', '-')} must be at least {least}, got {v}")
    if overrides.get("max_len") is not None:
        max_len = int(overrides["max_len"])
    if overrides.get("encoder_repetition_penalty") is not None:
        check_encoder_repetition_penalty(overrides["encoder_repetition_penalty"], "--encoder-repetition-penalty")
    for key in ("max_new_tokens", "num_beams", "length_penalty", "no_repeat_ngram_size", "encoder_repetition_penalty"):
        if overrides.get(key) is not None:
            gen[key] = overrides[key]
    return max_len, gen


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


@contextlib.contextmanager
def _interruptible(step: int, checkpoint: Path):
    """SIGINT / SIGTERM during the final generation: the checkpoint of the finished training is on
    disk, so stop at once with TrainingInterrupted (a resume skips training and generates again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise TrainingInterrupted(signum, step, checkpoint, saved=True)

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------


def _finetune(cfg: Text2TextConfig, info: D.DistInfo, device: torch.device) -> dict:
    cfg.validate()
    if cfg.init and cfg.model:
        raise ValueError("give either --init DIR or --model PRESET, not both")
    if cfg.init and cfg.model_overrides:
        raise ValueError("model_overrides change a preset's random-init architecture; --init fixes the architecture")
    out = prepare_finetune_out(cfg, info)
    threads = set_threads(cfg.threads)
    with named_by("--train"):
        train_inputs, train_targets = read_pairs(cfg.train)
    with named_by("--eval"):
        eval_inputs, eval_targets = read_pairs(cfg.eval)
    digests = rows_digests(out, cfg, info.main, zip(train_inputs, train_targets), zip(eval_inputs, eval_targets))
    if info.main and len(eval_inputs) < MIN_EVAL_EXAMPLES:
        warnings.warn(
            f"--eval {cfg.eval} has only {len(eval_inputs)} pair(s): the scores move in steps of "
            f"1/{len(eval_inputs)} and say little; a held-out file of a few hundred pairs is better",
            FastformerWarning,
            stacklevel=3,
        )
    model, tok, model_config, source, preset = _build(cfg, train_inputs, train_targets, info)
    mc = model.config
    kw = dict(max_len=cfg.max_len, max_target_len=cfg.max_target_len, eos_id=mc.eos_token_id)
    train_ex = encode_pairs(tok, train_inputs, train_targets, **kw)
    eval_ex = encode_pairs(tok, eval_inputs, eval_targets, **kw)
    if info.main:
        _warn_cut(tok, train_targets, cfg.max_target_len, "--max-target-len", cfg.train, "target")
    collate = Seq2SeqCollator(mc.pad_token_id)
    sampler = ExampleSampler(
        len(train_ex), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, info=info, seed=cfg.seed
    )

    def batch_fn(step, micro):
        return collate([train_ex[i] for i in sampler.indices(step, micro)])

    def step_fn(m, batch, train):
        out = m(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], return_logits=not train)
        metrics = {}
        if not train:
            valid = batch["labels"] != -100
            metrics["correct"] = int(((out.logits.argmax(-1) == batch["labels"]) & valid).sum())
        return out.loss_sum, out.n_predicted, metrics

    eval_batches = [collate(eval_ex[i : i + cfg.batch_size]) for i in range(0, len(eval_ex), cfg.batch_size)]
    max_new = cfg.max_new_tokens or cfg.max_target_len
    generation = {
        "max_new_tokens": max_new,
        "num_beams": cfg.num_beams,
        "length_penalty": cfg.length_penalty,
        "no_repeat_ngram_size": cfg.no_repeat_ngram_size,
        "encoder_repetition_penalty": cfg.encoder_repetition_penalty,
    }

    def generate_eval(m, inputs: list[str], **kw) -> list[str]:
        """The run's generation settings on eval inputs (kw: progress, log)."""
        return generate_texts(
            m, tok, inputs, max_len=cfg.max_len, batch_size=cfg.eval_batch_size, device=device, **generation, **kw
        )

    eval_fn = None
    if cfg.eval_generate:
        n_periodic = min(cfg.eval_generate, len(eval_inputs))

        def eval_fn(m) -> dict:
            """ROUGE and exact match of generation for the first n_periodic eval pairs (greedy or beam
            search: no random draws, so --resume stays exact)."""
            preds = generate_eval(m, eval_inputs[:n_periodic])
            refs = eval_targets[:n_periodic]
            scores = {f"eval_{k}": v for k, v in rouge(preds, refs).items()}
            return {**scores, "eval_exact_match": exact_match(preds, refs)}

    mem = _check_memory(cfg, model, max(len(x) for x, _ in train_ex), max(len(y) for _, y in train_ex), device, info)
    fingerprint = {
        "task": TASK,
        "source": source,
        "model_config": model_config,
        "max_len": cfg.max_len,
        "max_target_len": cfg.max_target_len,
        "train": str(Path(cfg.train).resolve()),
    }
    n_params = sum(p.numel() for p in model.parameters())
    config = {}
    if info.main:
        arch = architecture_name(model)
        init = str(Path(cfg.init).resolve()) if cfg.init else None
        config = {
            "fastformer_version": fastformer.__version__,
            "run": "finetune",
            "task": TASK,
            "objective": "span",
            "model": preset,
            "architecture": arch,
            "kind": ARCHITECTURES[arch].kind,
            "model_config": model_config,
            "labels": None,
            "max_len": cfg.max_len,
            "max_target_len": cfg.max_target_len,
            "generation": generation,
            "source": source,
            "init": init,
            "n_parameters": n_params,
            "world_size": info.world,
            "threads": threads[0],
            "threads_source": threads[1],
            "train": {
                **asdict(cfg),
                "model": None if cfg.init else preset,
                "train": str(Path(cfg.train).resolve()),
                "eval": str(Path(cfg.eval).resolve()),
                "init": init,
                "warmup_steps": cfg.warmup,
                "warmup_default": cfg.warmup_steps is None,
                "resume": False,
                "overwrite": False,
                "stop_at": None,
            },
            "n_train_examples": len(train_ex),
            "n_eval_examples": len(eval_ex),
            **digests,
        }
        print(
            f"finetune {TASK} {source}: {n_params / 1e6:.1f}M parameters on {device}"
            f"{f' x{info.world}' if info.enabled else ''}, {threads[0]} thread{'s' if threads[0] != 1 else ''} "
            f"({threads[1]}), {len(train_ex):,} training / {len(eval_ex):,} eval pairs\n"
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
        tokens_fn=lambda b: int(b["attention_mask"].sum()),
        eval_batches=eval_batches,
        fingerprint=fingerprint,
        dist_info=info,
        device=device,
        desc=f"{TASK} finetune",
        eval_fn=eval_fn,
        write_run_files=lambda: write_run_files(out, cfg.overwrite, config, tok.to_str()),
    )
    title = f"text-to-text fine-tuning, {source}"
    with loss_plot_on_stop(out, title, info.main):
        result = trainer.train()
    ev = result.eval or trainer.evaluate()

    summary = {}
    if info.main:
        n_gen = len(eval_inputs) if cfg.eval_limit is None else min(cfg.eval_limit, len(eval_inputs))

        def log(line):
            print(f"  {line}", flush=True)

        if not cfg.progress:
            log(f"generating for {n_gen:,} eval input(s): {_describe_generation(generation)}")
        t0 = time.perf_counter()
        with loss_plot_on_stop(out, title), _interruptible(result.step, trainer.ckpt_path):
            preds = generate_eval(trainer.raw_model, eval_inputs[:n_gen], progress=cfg.progress, log=log)
        gen_s = time.perf_counter() - t0
        refs = eval_targets[:n_gen]
        scores = rouge(preds, refs)
        em = exact_match(preds, refs)
        final_loss = result.final_loss
        if final_loss != final_loss:  # --resume of a finished run: no step ran, report the logged one
            rows = read_metrics(out / "metrics.jsonl")
            final_loss = rows[-1]["loss"] if rows else None
        summary = {
            **scores,
            "exact_match": em,
            "accuracy": em,
            "eval_loss": ev.get("eval_loss"),
            "token_accuracy": ev.get("eval_accuracy"),
            "n_eval": n_gen,
            "n_train": len(train_ex),
            "steps": result.step,
            "stopped_early": result.stopped_early,
            "final_train_loss": final_loss,
            "source": source,
            "tokens_per_s": result.tokens_per_s,
            "seconds": result.seconds,
            "resumed_from": result.resumed_from,
            "threads": threads[0],
            "generation": generation,
            "generation_seconds": gen_s,
            "examples": [
                {"input": i, "target": t, "prediction": p}
                for i, t, p in zip(eval_inputs[: cfg.n_examples], refs, preds)
            ],
            "out_dir": str(out),
        }
        lines = ["input\ttarget\tprediction"] + [
            "\t".join(" ".join(x.split()) for x in row) for row in zip(eval_inputs, refs, preds)
        ]
        write_file(out, "predictions.tsv", "\n".join(lines) + "\n")
        write_file(out, "eval.json", json.dumps(summary, indent=2))
        with writing("--out", out):
            plot_loss(out / "metrics.jsonl", out / "loss.png", title=title)
    D.barrier(info)
    return D.broadcast_object(summary if info.main else None, info)


def _warn_cut(tok, texts, limit: int, flag: str, path: str, what: str) -> None:
    """Warn when texts are longer than `limit` tokens (EOS included): the model learns them cut."""
    lengths = [len(e.ids) + 1 for e in tok.encode_batch(list(texts), add_special_tokens=False)]
    cut = sum(n > limit for n in lengths)
    if cut:
        warnings.warn(
            f"{cut:,} of {len(lengths):,} {what}s in {path} are longer than {flag} {limit} tokens "
            f"(the longest: {max(lengths)}, EOS included) and are cut: the model learns to write the cut "
            f"{what}s; a larger {flag} keeps them whole",
            FastformerWarning,
            stacklevel=4,
        )


def _describe_generation(g: dict) -> str:
    how = (
        "greedy"
        if g["num_beams"] == 1
        else f"beam search ({g['num_beams']} beams, length penalty {g['length_penalty']:g})"
    )
    ban = f", no {g['no_repeat_ngram_size']}-gram twice" if g.get("no_repeat_ngram_size") else ""
    p = g.get("encoder_repetition_penalty", 1.0)
    favour = f", encoder repetition penalty {p:g}" if p != 1.0 else ""
    return f"{how}, at most {g['max_new_tokens']} new tokens{ban}{favour}"


def describe_summary(s: dict) -> str:
    """The lines `fastformer finetune --task text2text` prints at the end."""
    resumed = f" (resumed at step {s['resumed_from']})" if s.get("resumed_from") else ""
    return (
        f"finetune done ({TASK}, {s['source']}): {s['steps']} step{'' if s['steps'] == 1 else 's'} "
        f"in {s['seconds']:.0f} s{' (stopped early)' if s.get('stopped_early') else ''}{resumed}\n"
        f"  eval on {s['n_eval']:,} pairs ({_describe_generation(s['generation'])}): ROUGE-1 {s['rouge1']:.4f}, "
        f"ROUGE-2 {s['rouge2']:.4f}, ROUGE-L {s['rougeL']:.4f}, exact match {s['exact_match']:.4f}\n"
        f"  {s['out_dir']}/eval.json, predictions.tsv; generate with "
        f"`fastformer predict --model {shlex.quote(str(s['out_dir']))} --input FILE`"
    )


def _check_memory(cfg: Text2TextConfig, model, src_len: int, tgt_len: int, device: torch.device, info: D.DistInfo):
    """Refuse a run that cannot fit (warn when close); the estimate (None when not checked)."""
    if not cfg.memory_check:
        return None
    tgt = -(-tgt_len // 8) * 8

    def est(batch, length):
        return estimate_memory(
            model,
            batch_size=batch,
            seq_len=length,
            target_len=tgt,
            head_rows=batch * tgt,
            optimizer=cfg.optimizer,
            device=device,
            processes=D.local_processes(info, device),
            precision=cfg.precision,
        )

    def warn(msg):
        if info.main:
            warnings.warn(msg, FastformerWarning, stacklevel=4)

    return check_memory(
        est,
        batch_size=cfg.batch_size,
        len_flag="--max-len",
        seq_len=-(-src_len // 8) * 8,
        grad_accum=cfg.grad_accum,
        warn=warn,
    )
