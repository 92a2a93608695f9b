"""Fine-tuning behind `fastformer finetune`: sequence classification from TSV files.

From `--init DIR` (a pretrain output): its config.json says which objective built it, the objective
rebuilds the encoder from the checkpoint and adds a classification head; the tokenizer is DIR's.
From scratch (`--model PRESET`): a tokenizer is trained on the training texts and the weights are random.
Writes DIR/config.json and tokenizer.json first (what `ff.models.load` and `--resume` read), then
metrics.jsonl, checkpoint.pt, loss.png and at the end eval.json (accuracy, eval loss, label names).

The recipe that works out of the box from a hundred labels to tens of thousands (docs/training.md):
- length in epochs, not steps: `epochs` passes over the training labels, but at least `min_steps`
  optimizer steps (a few hundred examples need many passes); `steps` overrides both, and so does
  `max_minutes` without `steps` (a time-budgeted run: the schedule follows the elapsed time, and
  `epochs` / `min_steps` do not apply; the CLI refuses them together);
- warmup (6% of the steps) then linear decay, one learning rate for pre-trained and random weights;
- model selection on a held-out slice of the *training* file (`val_fraction`, stratified by label):
  evaluated once per epoch, the weights with the best held-out accuracy (ties: lower loss) are kept,
  and only they are evaluated on `--eval` and saved. The `--eval` file never steers training.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import fastformer as ff
from fastformer.data.corpus import DataError, named_by
from fastformer.data.packing import pad_batch
from fastformer.data.tokenizer import load_tokenizer
from fastformer.data.tsv import label_vocabulary, read_tsv
from fastformer.models.loading import ARCHITECTURES, architecture_name, run_of
from fastformer.models.presets import canonical_preset, get_preset

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint
from .metrics import loss_plot_on_stop, plot_loss
from .objectives import get_objective, objective_for_preset
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
from .trainer import TrainConfig, Trainer

IGNORE_INDEX = -100  # an eval label --train never had: no head output, a miss, not in the eval loss
MIN_EVAL_EXAMPLES = 20  # fewer held-out examples: accuracy moves in coarse steps (warned)


@dataclass
class FinetuneConfig(TrainConfig):
    train: str = ""
    eval: str = ""
    init: str | None = None
    model: str | None = None
    max_len: int = 128
    vocab_size: int = 8192
    tokenizer: str | None = None  # with --model: reuse this tokenizer.json (e.g. a pre-training run's)
    out_dir: str = "runs/finetune"
    steps: int | None = None  # None: from epochs / min_steps
    epochs: float = 4.0
    min_steps: int = 300
    val_fraction: float = 0.1  # held-out slice of the training labels for model selection; 0: off
    pooling: str = "cls"  # BERT encoders: "cls" (BERT's [CLS] pooler, exportable) or "mean" of the token states
    batch_size: int = 16
    lr: float | None = None  # None: default_lr(the model's width)
    eval_every: int = 0  # 0: once per epoch when selecting, else at the end only
    task: str = "classify"

    def validate(self) -> None:
        # steps None is resolved from the data size in finetune(); validate the rest meanwhile
        # (with a placeholder that no --warmup-steps exceeds: the Trainer validates the planned steps again;
        # and lr None is resolved from the model's width)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be at least 1, got {self.steps}")
        steps = None if self.budgeted else (self.steps or 2**31)
        TrainConfig.validate(_replace(self, steps=steps, lr=self.lr or BASE_LR))
        if not self.train or not self.eval:
            if self.resume:  # no finetune run in --out to take them from: say what is there
                prepare_out_dir(self.out_dir, run="finetune", resume=True, overwrite=False)
            raise ValueError("finetune needs --train FILE.tsv and --eval FILE.tsv")
        if self.max_len < 8:
            raise ValueError(f"--max-len must be at least 8 tokens, got {self.max_len}")
        if self.task != "classify":
            raise ValueError(f"--task {self.task}: this fine-tuning pipeline trains classifiers (--task classify)")
        if self.min_steps < 1:
            raise ValueError(f"--min-steps must be at least 1, got {self.min_steps}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not self.epochs > 0:
            raise ValueError(f"--epochs must be positive, got {self.epochs}")
        if self.pooling not in ("mean", "cls"):
            raise ValueError(f"--pooling must be mean or cls, got {self.pooling!r}")


BASE_LR, BASE_WIDTH = 1e-4, 768


def default_lr(model_config: dict) -> float:
    """The fine-tuning learning rate for a model of this width: 1e-4 at BERT-base's 768, scaled as
    1 / width (Adam's update size per weight does not shrink with the width, the sum over a row does):
    6e-4 for bert-tiny and t5-tiny (128), 3e-4 for bert-mini (256), 1.5e-4 for bert-small (512). With
    100 to 1,000 labels a random-init bert-tiny learns little at 1e-4 in the recipe's step count."""
    width = model_config.get("hidden_size") or model_config.get("d_model") or BASE_WIDTH
    return float(f"{BASE_LR * BASE_WIDTH / int(width):.6g}")  # 6e-4, not 0.0006000000000000001


def _replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def heldout_split(labels: list[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(fit, held-out) example indices: `fraction` of each label's examples held out (rounded; a label
    with one example stays in fit), shuffled by `seed`. fraction 0 -> (all, [])."""
    if fraction <= 0:
        return list(range(len(labels))), []
    rng = random.Random(seed * 7919 + 17)
    by_label: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_label.setdefault(y, []).append(i)
    held: list[int] = []
    for y in sorted(by_label):
        idx = by_label[y]
        rng.shuffle(idx)
        k = min(round(fraction * len(idx)), len(idx) - 1)
        held += idx[:k]
    held_set = set(held)
    return [i for i in range(len(labels)) if i not in held_set], sorted(held)


def planned_steps(n_fit: int, cfg: FinetuneConfig, world: int = 1) -> tuple[int, int]:
    """(optimizer steps, steps per epoch): `cfg.steps` when given, else max(epochs x steps per epoch,
    min_steps)."""
    per_epoch = max(1, math.ceil(n_fit / (cfg.batch_size * cfg.grad_accum * world)))
    if cfg.steps is not None:
        return cfg.steps, per_epoch
    return max(math.ceil(cfg.epochs * per_epoch), cfg.min_steps), per_epoch


class _SelectingTrainer(Trainer):
    """Keeps a copy of the weights whenever the held-out evaluation improves (accuracy, then loss).

    The selection (best weights, their step and score) is part of every checkpoint, so a resumed run
    chooses among all its evaluations, as an uninterrupted one does. The finished run's checkpoint
    holds the selected weights as "model" (what predict and ff.models.load read) and the last training
    weights as "train_model", which a resume with more --steps continues from, with the optimizer and
    schedule they belong to."""

    best_key: tuple[float, float] | None = None
    best_state: dict | None = None
    best_step: int = 0
    selecting: bool = False
    _last_train_state: dict | None = None  # set while save_selected writes
    _best_is_model: bool = False  # set while save_selected writes

    def evaluate(self) -> dict:
        ev = super().evaluate()
        if self.selecting and ev:
            key = (ev["eval_accuracy"], -ev["eval_loss"])
            if self.best_key is None or key > self.best_key:
                self.best_key, self.best_step = key, self.step
                self.best_state = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
        return ev

    def extra_state(self) -> dict:
        if not self.selecting:
            return {}
        best_key = list(self.best_key) if self.best_key is not None else None
        # the weights are stored once: when the best are the ones saved as "model" (selected at this
        # very step, or by save_selected) the checkpoint says so instead of holding a second copy
        same = self._best_is_model or self.best_step == self.step
        state = None if same else self.best_state
        sel = {"best_key": best_key, "best_step": self.best_step, "best_is_model": same, "best_state": state}
        last = {} if self._last_train_state is None else {"train_model": self._last_train_state}
        return {"selection": sel, **last}

    def load_extra_state(self, ck: dict) -> None:
        sel = ck.get("selection")
        if self.selecting and sel:  # absent in older checkpoints: chosen among this session's evaluations
            self.best_key = tuple(sel["best_key"]) if sel["best_key"] is not None else None
            self.best_step = int(sel["best_step"])
            best = ck["model"] if sel.get("best_is_model") else sel["best_state"]
            # copies: the checkpoint's tensors map the file, which the next save replaces
            self.best_state = None if best is None else {k: v.clone() for k, v in best.items()}
        if "train_model" in ck:  # a finished run: training goes on from its last weights, not the selected
            self.raw_model.load_state_dict(ck["train_model"])

    def save_selected(self) -> None:
        """Make the selected weights the model's and write the checkpoint: "model" the selected weights,
        "train_model" the last training weights (load_extra_state), unless they are the same."""
        if self.best_step != self.step:
            self._last_train_state = {k: v.detach().clone() for k, v in self.raw_model.state_dict().items()}
            self.raw_model.load_state_dict(self.best_state)
        self._best_is_model = True
        try:
            self.save()
        finally:
            self._last_train_state, self._best_is_model = None, False


def _with_pooling(model_config: dict, obj, pooling: str) -> dict:
    """A BERT encoder's classifier pools as asked; T5's encoder classifier always mean-pools."""
    return {**model_config, "pooling": pooling} if obj.family == "bert" else model_config


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


def prepare_finetune_out(cfg: TrainConfig, info: D.DistInfo) -> Path:
    """--out of a fine-tuning run (classification or text-to-text): never the --init folder, checked by
    prepare_out_dir (a new folder, this run's with --resume, or --overwrite) on every rank before rank 0
    writes into it."""
    out = Path(cfg.out_dir)
    if cfg.init and out.resolve() == Path(cfg.init).resolve():
        raise ValueError(
            f"--out {cfg.out_dir} is the --init folder: fine-tuning would overwrite the "
            "pre-trained checkpoint and metrics; choose another --out"
        )
    prepare_out_dir(out, run="finetune", resume=cfg.resume, overwrite=cfg.overwrite, steps=cfg.steps)
    D.barrier(info)  # every rank has checked --out before rank 0 writes
    return out


def _finetune(cfg: FinetuneConfig, info: D.DistInfo, device: torch.device) -> dict:
    cfg.validate()
    if cfg.init and cfg.model:
        raise ValueError("give either --init DIR or --model PRESET, not both")
    if cfg.init and cfg.tokenizer:
        raise ValueError("--tokenizer goes with --model: an --init folder brings its own tokenizer")
    out = prepare_finetune_out(cfg, info)
    threads = set_threads(cfg.threads)
    with named_by("--train"):
        train_texts, train_labels = read_tsv(cfg.train)
    with named_by("--eval"):
        eval_texts, eval_labels = read_tsv(cfg.eval)
    digests = rows_digests(out, cfg, info.main, zip(train_texts, train_labels), zip(eval_texts, eval_labels))
    if len(label_vocabulary(train_labels)) < 2:
        raise DataError(
            f"--train {cfg.train}: needs at least 2 distinct labels, found {len(label_vocabulary(train_labels))}"
        )
    if info.main and len(eval_texts) < MIN_EVAL_EXAMPLES:
        warnings.warn(
            f"--eval {cfg.eval} has only {len(eval_texts)} example(s): accuracy moves in steps of "
            f"1/{len(eval_texts)} and says little; a held-out file of a few hundred rows is better",
            FastformerWarning,
            stacklevel=3,
        )
    # the classes are --train's: a label only the eval file has (a small training sample) gets no
    # head output (one would change the softmax, and so training, by what --eval holds); its
    # examples count as misses and stay out of the eval loss, instead of ending the run
    run = stored_run_config(out) if cfg.resume else None  # the run's own settings, read once
    names = label_vocabulary(train_labels)
    if run:  # the classes the run's checkpoint has (older versions gave eval-only labels an output)
        names = run.get("labels") or names
    index = {n: i for i, n in enumerate(names)}
    unseen = [n for n in label_vocabulary(eval_labels) if n not in index]
    if unseen and info.main:
        warnings.warn(
            f"{cfg.eval}: label(s) {unseen[:8]}{' ...' if len(unseen) > 8 else ''} never appear in "
            f"{cfg.train}; the model cannot predict them and their examples count as misses",
            FastformerWarning,
            stacklevel=3,
        )

    def to_ids(labels):
        return torch.tensor([index.get(lab, IGNORE_INDEX) for lab in labels], dtype=torch.int64)

    y_train, y_eval = to_ids(train_labels), to_ids(eval_labels)
    n_scored = int((y_eval != IGNORE_INDEX).sum())
    fit_idx, val_idx = heldout_split(y_train.tolist(), cfg.val_fraction, cfg.seed)
    if len(fit_idx) < 2:
        val_idx, fit_idx = [], list(range(len(y_train)))
    steps, per_epoch = planned_steps(len(fit_idx), cfg, info.world)
    if cfg.budgeted:  # --max-minutes alone: the time budget is the run's length, not the epochs
        steps = None
    eval_every = cfg.eval_every or (max(per_epoch, math.ceil((steps or 0) / 50)) if val_idx else 0)
    cfg = _replace(cfg, steps=steps, eval_every=eval_every)

    from tokenizers import Tokenizer

    seed_everything(cfg.seed)
    pre_model = None
    if cfg.init and run:
        # the run's own tokenizer and model config, written at its start: the --init folder may have
        # changed or gone since (the weights come from the run's checkpoint)
        obj = get_objective(run["objective"])
        tok = load_tokenizer(out / "tokenizer.json")
        model_config = run["model_config"]
        if obj.family == "bert" and model_config.get("pooling", "cls") != cfg.pooling:
            raise CheckpointError(
                f"--resume continues the run in {out}, which used pooling={model_config.get('pooling', 'cls')!r}; "
                f"this command gives {cfg.pooling!r} (--pooling). Resume with the same settings."
            )
        model = obj.build_classifier(model_config, len(names))
        pre_model, source = canonical_preset(run.get("model"), warn=False), run["source"]
    elif cfg.init:
        init = Path(cfg.init)
        check_init_folder(init)
        try:
            pre_cfg = json.loads((init / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{init / 'config.json'}: not valid JSON ({e})") from None
        if run_of(pre_cfg) != "pretrain":
            raise CheckpointError(
                f"--init {init}: a fine-tuning run, not a pre-training one; --init takes a pretrain output folder"
            )
        obj = get_objective(pre_cfg["objective"])
        tok = load_tokenizer(init / "tokenizer.json")
        obj.check_tokenizer(tok, str(init / "tokenizer.json"))
        model_config = _with_pooling(pre_cfg["model_config"], obj, cfg.pooling)
        max_pos = model_config.get("max_position")
        if max_pos is not None and cfg.max_len > max_pos:
            raise ValueError(
                f"--max-len {cfg.max_len} is longer than the {max_pos} positions the model in --init "
                f"{init} was pre-trained with; use --max-len {max_pos} or less"
            )
        state = load_checkpoint(init / CHECKPOINT_NAME)["model"]
        model = obj.build_classifier(model_config, len(names), state)
        pre_model = canonical_preset(pre_cfg.get("model"), warn=False)  # an older folder's name: the current one
        source = f"init {init.resolve()} ({pre_model}, {obj.name})"
    else:
        preset = canonical_preset(cfg.model or "bert-tiny")
        get_preset(preset)
        obj = objective_for_preset(preset)
        if cfg.resume:  # the tokenizer this run trained (and saved) at its start
            tok = load_tokenizer(out / "tokenizer.json")
        elif cfg.tokenizer:
            with named_by("--tokenizer"):
                if not Path(cfg.tokenizer).is_file():
                    raise DataError(f"{cfg.tokenizer}: no such file")
                tok = load_tokenizer(cfg.tokenizer)
                obj.check_tokenizer(tok, cfg.tokenizer)
        else:
            tok_json = obj.build_tokenizer(train_texts, cfg.vocab_size).to_str() if info.main else None
            tok = Tokenizer.from_str(D.broadcast_object(tok_json, info))
        model_config = _with_pooling(
            obj.model_config(obj.build_model(preset, tok, seq_len=cfg.max_len)), obj, cfg.pooling
        )
        seed_everything(cfg.seed)
        model = obj.build_classifier(model_config, len(names))
        pre_model = preset
        source = f"random init ({preset})"
    if cfg.lr is None:
        cfg = _replace(cfg, lr=default_lr(model_config))
    max_len = min(cfg.max_len, int(model_config.get("max_position", cfg.max_len)))
    x_train = obj.encode_for_classification(tok, train_texts, max_len)
    x_eval = obj.encode_for_classification(tok, eval_texts, max_len)
    pad = _pad_id(tok)

    def collate(idx, xs, ys):
        ids, mask = pad_batch([xs[i] for i in idx], pad, pad_to_multiple_of=8)
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        return {"input_ids": ids, "attention_mask": mask, "labels": ys[idx]}

    x_val, y_val = [x_train[i] for i in val_idx], y_train[val_idx]
    x_train, y_train = [x_train[i] for i in fit_idx], y_train[fit_idx]
    sampler = ExampleSampler(
        len(x_train), batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, info=info, seed=cfg.seed
    )

    def batch_fn(step, micro):
        return collate(sampler.indices(step, micro), x_train, y_train)

    def step_fn(m, batch, train):
        logits = m(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        loss = ff.cross_entropy(logits.float(), labels, reduction="sum")  # IGNORE_INDEX: no output
        if train:
            return loss, labels.numel(), {}
        scored = int((labels != IGNORE_INDEX).sum())
        return loss, labels.numel(), {"correct": int((logits.argmax(-1) == labels).sum()), "scored": scored}

    def batches(xs, ys):
        bs = max(cfg.batch_size, 64)  # evaluation holds no activations for backward: larger batches
        return [collate(list(range(i, min(i + bs, len(xs)))), xs, ys) for i in range(0, len(xs), bs)]

    eval_batches = batches(x_eval, y_eval)
    longest = max(len(x) for x in x_train)
    mem = _check_memory(cfg, model, -(-longest // 8) * 8, device, info)
    fingerprint = {"task": "finetune", "source": source, "labels": names, "model_config": model_config}
    n_params = sum(p.numel() for p in model.parameters())
    config = {}
    if info.main:
        arch = architecture_name(model)
        config = {
            "fastformer_version": ff.__version__,
            "run": "finetune",
            "task": cfg.task,
            "objective": obj.name,
            "model": pre_model,
            "architecture": arch,
            "kind": ARCHITECTURES[arch].kind,
            "model_config": model_config,
            "labels": names,
            "max_len": max_len,
            "source": source,
            "init": str(Path(cfg.init).resolve()) if cfg.init else None,
            "n_parameters": n_params,
            "world_size": info.world,
            "threads": threads[0],
            "threads_source": threads[1],
            "train": {
                **asdict(cfg),
                "model": None if cfg.init else pre_model,
                "train": str(Path(cfg.train).resolve()),
                "eval": str(Path(cfg.eval).resolve()),
                "init": str(Path(cfg.init).resolve()) if cfg.init else None,
                "warmup_steps": cfg.warmup,
                "warmup_default": cfg.warmup_steps is None,
                "resume": False,
                "overwrite": False,
            },
            "n_train_examples": len(x_train),
            "n_eval_examples": len(x_eval),
            **digests,
        }
        print(
            f"finetune {source}: {len(names)} labels, {n_params / 1e6:.1f}M parameters on {device}"
            f"{f' x{info.world}' if info.enabled else ''}, {threads[0]} thread{'s' if threads[0] != 1 else ''} "
            f"({threads[1]}), {len(x_train):,} training / {len(x_eval):,} eval examples\n"
            f"  memory: {mem.describe() if mem else 'not checked'}\n"
            f"  output: {out}{' (resumed)' if cfg.resume else ''}",
            flush=True,
        )
    D.barrier(info)
    trainer = _SelectingTrainer(
        model,
        cfg,
        batch_fn=batch_fn,
        step_fn=step_fn,
        tokens_fn=lambda b: int(b["attention_mask"].sum()),
        eval_batches=batches(x_val, y_val) if val_idx else eval_batches,
        fingerprint=fingerprint,
        dist_info=info,
        device=device,
        desc="finetune",
        write_run_files=lambda: write_run_files(out, cfg.overwrite, config, tok.to_str()),
    )
    trainer.selecting = bool(val_idx)
    title = f"fine-tuning, {source}"
    with loss_plot_on_stop(out, title, info.main):
        result = trainer.train()
    selection = {}
    if val_idx:
        if trainer.best_state is not None:
            trainer.save_selected()  # the checkpoint's "model" is the selected weights
        selection = {
            "n_val": len(val_idx),
            "selected_step": trainer.best_step,
            "val_accuracy": trainer.best_key[0] if trainer.best_key else None,
        }
        trainer.eval_batches = eval_batches
        trainer.selecting = False  # the --eval score never takes part in the selection
        ev = trainer.evaluate()
    else:
        ev = result.eval or trainer.evaluate()
    summary = {
        "accuracy": ev["eval_accuracy"],
        "eval_loss": ev["eval_loss"],  # over the rows whose label the model has an output for (None: none)
        "n_eval": len(x_eval),
        "n_eval_scored": n_scored,
        "n_train": len(x_train) + len(val_idx),
        "n_fit": len(x_train),
        **selection,
        "labels": names,
        "steps": result.step,
        "stopped_early": result.stopped_early,
        "epochs": round(result.step / per_epoch, 2),
        "final_train_loss": result.final_loss,
        "source": source,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "resumed_from": result.resumed_from,
        "threads": threads[0],
        "out_dir": str(out),
    }
    if info.main:
        write_file(out, "eval.json", json.dumps(summary, indent=2))
        with writing("--out", out):
            plot_loss(out / "metrics.jsonl", out / "loss.png", title=title)
    return summary


def _check_memory(cfg: FinetuneConfig, model, seq_len: int, device: torch.device, info: D.DistInfo):
    """Refuse a run that cannot fit (warn when close); the estimate (None when not checked)."""
    if not cfg.memory_check:
        return None

    def est(batch, length):
        return estimate_memory(
            model,
            batch_size=batch,
            seq_len=length,
            optimizer=cfg.optimizer,
            device=device,
            processes=D.local_processes(info, device),
            precision=cfg.precision,
        )

    def warn(msg):
        if info.main:
            warnings.warn(msg, FastformerWarning, stacklevel=4)

    return check_memory(
        est, batch_size=cfg.batch_size, len_flag="--max-len", seq_len=seq_len, grad_accum=cfg.grad_accum, warn=warn
    )
