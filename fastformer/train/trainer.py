"""The objective-agnostic training loop.

The Trainer owns what every objective shares: device and autocast (`precision`: by default bf16 on a
CUDA GPU of compute capability 8.0 or newer, else fp32; "bf16" autocasts on a CPU too),
gradient accumulation with the loss normalised by the predicted tokens of the whole optimizer step
(all micro-batches, all ranks), warmup + linear/cosine schedule (per step, or over a time budget:
`max_minutes` without `steps`), fused gradient clipping, the optimizer (FusedAdamW by default), DDP,
periodic evaluation, metrics.jsonl, the progress bar and atomic checkpoints with exact resume. It never
looks inside a batch: the caller gives

    batch_fn(step, micro) -> batch dict (CPU)     a pure function of (step, micro) for this rank
    step_fn(model, batch, train) -> (loss_sum, n_predicted, metrics)
    tokens_fn(batch) -> int                       input tokens of a batch (for tokens/s)

Because batches depend only on the step, "data position" is the step, and a resumed run replays
exactly the batches an uninterrupted run would have seen.

SIGINT / SIGTERM during `train()` finish the current step, write the checkpoint and raise
`TrainingInterrupted` (exit status 130 / 143 in the CLI); a second signal stops at once, leaving the
last checkpoint as it was (checkpoints are written atomically). The checkpoint also carries the
training time and tokens so far, so a resumed run reports the whole run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

import fastformer as ff

from . import distributed as D
from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .metrics import peak_flops, truncate_metrics
from .resources import autocasts_bf16, flush_denormals, precision_warning
from .run_dir import FastformerWarning, OutputError, check_steps_done, os_error_message, writing
from .schedules import SCHEDULES, TimeBudget, make_budget_scheduler, make_scheduler

OPTIMIZERS = ("fusedadamw", "adamw", "sgd", "rmsprop")
# auto: bf16 autocast where the fused kernels run (a CUDA GPU of compute capability >= 8.0), else fp32;
# fp32: never autocast; bf16: autocast on any device (a CPU with bf16 instructions runs its matmuls
# several times faster than in fp32; the weights, optimizer state and the loss stay fp32 either way)
PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    out_dir: str = "runs/pretrain"
    steps: int | None = 1000  # None with max_minutes: a time-budgeted run (see `budgeted`)
    batch_size: int = 32  # examples per micro-batch per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-6
    optimizer: str = "fusedadamw"
    schedule: str = "linear"
    warmup_steps: int | None = None  # None: 6% of steps
    clip_norm: float = 1.0
    seed: int = 0
    device: str = "auto"
    save_every: int = 0  # 0: only at the end (and when stopped early)
    resume: bool = False
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end
    max_minutes: float | None = None  # with steps: a safety cap; without: the time budget of the schedule
    stop_at: int | None = None  # stop (with a checkpoint) after this step: simulates an interruption
    progress: bool = True
    compile: str | None = None  # torch.compile backend for the training forward (None: eager)
    overwrite: bool = False  # replace the run in a non-empty out_dir (else refused)
    threads: int | None = None  # CPU intra-op threads; None: OMP_NUM_THREADS or an automatic choice
    memory_check: bool = True  # refuse a run whose estimated peak memory cannot fit
    precision: str = "auto"  # autocast of the forward: one of PRECISIONS

    def validate(self) -> None:
        if self.resume and self.overwrite:  # before any other check: whatever else is missing, say this
            raise OutputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
        if self.steps is None and self.max_minutes is None:
            raise ValueError("--steps is required unless --max-minutes gives a time budget")
        if self.budgeted and self.warmup_steps is not None:
            raise ValueError(
                "--warmup-steps needs --steps: with --max-minutes alone the warmup is 6% of the time budget"
            )
        for name in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr must be positive, got {self.lr}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("save_every", "eval_every", "warmup_steps"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.warmup_steps is not None and self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(
                f"--warmup-steps {self.warmup_steps} is more than --steps {self.steps}: the learning "
                "rate would never reach its peak; use fewer warmup steps (default 6% of --steps)"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.compile:
            import torch._dynamo

            known = torch._dynamo.list_backends(exclude_tags=())
            if self.compile not in known:
                raise ValueError(f"--compile {self.compile}: unknown torch.compile backend (known: {', '.join(known)})")

    @property
    def budgeted(self) -> bool:
        """Time-budgeted: the learning rate follows the elapsed fraction of `max_minutes` (no step count)."""
        return self.steps is None and self.max_minutes is not None

    @property
    def warmup(self) -> int | None:
        """Warmup steps (None for a time-budgeted run: there it is a fraction of the time)."""
        if self.budgeted:
            return None
        return self.warmup_steps if self.warmup_steps is not None else int(0.06 * self.steps)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """No weight decay on biases, LayerNorm/RMSNorm weights and other 1-D parameters."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "fusedadamw":
        return ff.optim.FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.RMSprop(groups, lr=cfg.lr)


@dataclass
class TrainResult:
    """seconds / tokens / tokens_per_s cover the whole run, resumed parts included; session_seconds
    and resumed_from (the step this session started from, 0 for a fresh run) describe this session."""

    step: int = 0
    final_loss: float = float("nan")
    tokens_per_s: float = 0.0
    eval: dict = field(default_factory=dict)
    stopped_early: bool = False
    seconds: float = 0.0
    tokens: int = 0
    session_seconds: float = 0.0
    resumed_from: int = 0


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped training. saved: the checkpoint of `step` was written after the signal
    (False: a second signal stopped at once; `step` is then the last checkpoint on disk, 0 for none).
    exit_code: 128 + the signal number (130 for SIGINT, 143 for SIGTERM)."""

    def __init__(self, signum: int, step: int, checkpoint: Path, saved: bool):
        self.signum, self.step, self.checkpoint, self.saved = signum, step, Path(checkpoint), saved
        name = signal.Signals(signum).name
        if saved:
            msg = f"stopped by {name} after step {step}; checkpoint saved to {self.checkpoint}"
        elif step:
            msg = (
                f"stopped at once by a second {name}; the last checkpoint (step {step}) in {self.checkpoint} is intact"
            )
        else:
            msg = f"stopped at once by a second {name}; no checkpoint had been written yet"
        super().__init__(msg)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        *,
        batch_fn: Callable[[int, int], dict],
        step_fn: Callable,
        tokens_fn: Callable[[dict], int],
        eval_batches: list[dict] | None = None,
        fingerprint: dict | None = None,
        flops_per_token: float | None = None,
        dist_info: D.DistInfo | None = None,
        device: torch.device | None = None,
        metrics_name: str = "metrics.jsonl",
        desc: str = "train",
        clock: Callable[[], float] = time.perf_counter,
        eval_fn: Callable[[nn.Module], dict] | None = None,
        write_run_files: Callable[[], None] | None = None,
    ):
        """eval_fn: extra held-out scores (name -> float) added to every evaluation, computed by the
        main process on the plain model in eval mode without gradients (e.g. generation's ROUGE); it
        must not draw from torch's random generators, so that --resume stays exact.
        write_run_files: writes the run's config.json / tokenizer.json (main process), called before
        the first step, and on --resume only once the checkpoint has accepted this run's settings (a
        refused resume, e.g. another world size, leaves the folder as it was)."""
        cfg.validate()
        self.clock = clock  # seconds; tests pass a fake one to check the time budget
        self.cfg = cfg
        self.info = dist_info or D.DistInfo()
        self.device = device or D.resolve_device(cfg.device, self.info)
        self.raw_model = model.to(self.device)
        self.model = model
        # autocast to bf16 (each micro-step's _autocast reads it)
        self.bf16 = autocasts_bf16(self.device, cfg.precision)
        warning = precision_warning(self.device, cfg.precision)
        if warning and self.info.main:
            warnings.warn(warning, FastformerWarning, stacklevel=2)
        if self.info.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if cfg.compile:
            # the fastformer ops are opaque to the compiler (one graph break each): it fuses the code
            # around them; checkpoints and evaluation keep using the plain module
            self.model = torch.compile(self.model, backend=cfg.compile)
        self.batch_fn, self.step_fn, self.tokens_fn = batch_fn, step_fn, tokens_fn
        self.eval_batches = eval_batches or []
        self.eval_fn = eval_fn
        self.write_run_files = write_run_files
        # what must be equal for --resume to continue the same run: the caller's (model, data, ...) and
        # the flags that shape the optimisation; --steps may change (the schedule follows the new total)
        self.fingerprint = {
            **(fingerprint or {}),
            "train": {
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
                "grad_accum": cfg.grad_accum,
                "seed": cfg.seed,
                "optimizer": cfg.optimizer,
                "weight_decay": cfg.weight_decay,
                "betas": list(cfg.betas),
                "eps": cfg.eps,
                "clip_norm": cfg.clip_norm,
                "schedule": cfg.schedule,
                "warmup_steps": cfg.warmup_steps,
                "steps": cfg.steps,
                "world_size": self.info.world,
            },
        }
        self.flops_per_token = flops_per_token
        self.out = Path(cfg.out_dir)
        self.metrics_path = self.out / metrics_name
        self.ckpt_path = self.out / CHECKPOINT_NAME
        self.desc = desc
        self.optimizer = make_optimizer(self.raw_model, cfg)
        # time-budgeted: the schedule follows the clock; the step count is open-ended
        self.budget = TimeBudget(cfg.max_minutes * 60, kind=cfg.schedule) if cfg.budgeted else None
        self.total = cfg.steps if cfg.steps is not None else 2**62
        if self.budget is not None:
            self.scheduler = make_budget_scheduler(self.optimizer, self.budget)
        else:
            self.scheduler = make_scheduler(self.optimizer, total=cfg.steps, warmup=cfg.warmup, kind=cfg.schedule)
        self.step = 0
        self.peak = peak_flops(self.device)
        self._saved_step = 0  # step of the checkpoint on disk (0: none)
        self._rng_ranks: list | None = None  # every rank's generators, gathered by save() under torchrun
        self._seconds_before, self._tokens_before = 0.0, 0  # earlier sessions of this run
        self._t_start, self._tokens = None, 0
        self._signal, self._second_signal = None, None
        self._bar = None

    # -- helpers ----------------------------------------------------------------------------------
    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _to_device(self, batch: dict) -> dict:
        return {
            k: (v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
        }

    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "rng": rng_state(self.device),
            "rng_ranks": self._rng_ranks,  # per rank under torchrun, else None
            "data_position": {"step": self.step},
            "fingerprint": self.fingerprint,
            "train_config": asdict(self.cfg),
            "progress": self._progress(),
            **self.extra_state(),
        }

    def extra_state(self) -> dict:
        """More entries for the checkpoint (a subclass's own state); restored by load_extra_state."""
        return {}

    def load_extra_state(self, ck: dict) -> None:
        """Called at the end of load() with the whole checkpoint: a subclass restores its own state."""

    def _progress(self) -> dict:
        """Training time and tokens of the whole run up to now (earlier sessions included)."""
        running = self.clock() - self._t_start if self._t_start is not None else 0.0
        return {"seconds": self._seconds_before + running, "tokens": self._tokens_before + self._tokens}

    def save(self) -> None:
        # every rank's generators (each rank's dropout draws on its own batches' shapes, so the ranks'
        # states differ): each restores its own on --resume (a collective: every rank calls save)
        self._rng_ranks = D.all_gather_object(rng_state(self.device), self.info) if self.info.enabled else None
        if self.info.main:
            prior = (
                f"the previous checkpoint (step {self._saved_step}) is intact"
                if self._saved_step
                else "no checkpoint has been written yet"
            )
            try:
                save_checkpoint(self.state_dict(), self.ckpt_path)
            except OSError as e:
                raise OutputError(os_error_message("--out", self.out, e, prior)) from None
            self._saved_step = self.step
        D.barrier(self.info)

    def load(self) -> None:
        ck = load_checkpoint(self.ckpt_path)
        mine, theirs = dict(self.fingerprint), dict(ck.get("fingerprint", {}))
        mine_train, theirs_train = mine.pop("train"), theirs.pop("train", None) or {}
        # keys an older checkpoint did not record are not checked
        for key in sorted(theirs):
            if mine.get(key) != theirs.get(key):
                raise CheckpointError(
                    f"{self.ckpt_path} was written by another model or setup: {key} is "
                    f"{theirs.get(key)!r} there, {mine.get(key)!r} in this run"
                )
        self._check_resume_flags(mine_train, theirs_train)
        try:
            self.raw_model.load_state_dict(ck["model"])
        except RuntimeError as e:
            raise CheckpointError(
                f"{self.ckpt_path}: weights do not fit this model ({str(e).splitlines()[0]})"
            ) from None
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        ranks = ck.get("rng_ranks")  # absent in older checkpoints, None without torchrun
        set_rng_state(ranks[self.info.rank] if ranks and len(ranks) == self.info.world else ck["rng"], self.device)
        self.step = int(ck["step"])
        check_steps_done(self.cfg.steps, self.step, self.out)
        self._saved_step = self.step
        progress = ck.get("progress") or {}  # absent in older checkpoints: this session only
        self._seconds_before = float(progress.get("seconds", 0.0))
        self._tokens_before = int(progress.get("tokens", 0))
        if self.budget is not None:  # the budget continues where the interrupted run left it
            self.budget.elapsed = self._seconds_before
        # the learning rate of the next step comes from this run's schedule: with an unchanged --steps it
        # is the checkpoint's own value; with a new --steps, the new schedule's value at this step
        sch = self.scheduler
        for group, base, fn in zip(self.optimizer.param_groups, sch.base_lrs, sch.lr_lambdas):
            group["lr"] = base * fn(sch.last_epoch)
        sch._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        self.load_extra_state(ck)

    def _check_resume_flags(self, mine: dict, theirs: dict) -> None:
        """The flags that shape the optimisation must match the checkpoint's; --steps may change."""

        def effective_warmup(d):
            return d["warmup_steps"] if d.get("warmup_steps") is not None else int(0.06 * (d.get("steps") or 0))

        for key in sorted(theirs):
            if key == "steps":
                continue
            if key == "warmup_steps":
                # default warmup (6% of --steps) follows a changed --steps; otherwise the effective
                # values must agree (an explicit --warmup-steps equal to the default's is the same run)
                if theirs.get("warmup_steps") is None and mine.get("warmup_steps") is None:
                    continue
                if "steps" not in theirs or effective_warmup(mine) == effective_warmup(theirs):
                    continue
                got, want, flag = effective_warmup(mine), effective_warmup(theirs), "--warmup-steps"
            elif mine.get(key) != theirs[key]:
                got, want = mine.get(key), theirs[key]
                flag = "torchrun --nproc_per_node" if key == "world_size" else "--" + key.replace("_", "-")
            else:
                continue
            raise CheckpointError(
                f"--resume continues the run in {self.out}, which used {key}={want!r}; this "
                f"command gives {got!r} ({flag}). Resume with the same settings (only --steps and "
                "--max-minutes may change)."
            )

    def evaluate(self) -> dict:
        """Loss (per predicted token) and accuracy over the held-out batches, shared across ranks."""
        if not self.eval_batches:
            return {}
        self.raw_model.eval()
        # loss sum, predictions, correct ones, predictions the loss covers (metric "scored": a
        # classifier's eval examples whose label it has no output for count as misses, not in the loss)
        tot = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad(), self._autocast():
            for b in self.eval_batches[self.info.rank :: self.info.world]:
                loss, n, m = self.step_fn(self.raw_model, self._to_device(b), False)
                row = [float(loss), float(n), float(m.get("correct", 0)), float(m.get("scored", n))]
                tot += torch.tensor(row, dtype=torch.float64)
        tot = D.all_reduce_sum(tot.to(self.device), self.info).cpu()
        extra = {}
        if self.eval_fn is not None and self.info.main:
            with torch.no_grad():
                extra = self.eval_fn(self.raw_model)
        self.raw_model.train()
        n, scored = max(tot[1].item(), 1.0), tot[3].item()
        loss = tot[0].item() / scored if scored > 0 else None  # None: no row the loss could cover
        return {"eval_loss": loss, "eval_accuracy": tot[2].item() / n, **extra}

    def _elapsed(self) -> float:
        """Training seconds of the whole run so far (earlier sessions included)."""
        return self._progress()["seconds"]

    def _set_budget_lr(self) -> None:
        """Time-budgeted run: this step's learning rate from the elapsed fraction of the budget (rank
        0's clock on every rank, so the replicas stay identical)."""
        t = torch.tensor([self._elapsed() if self.info.main else 0.0], dtype=torch.float64, device=self.device)
        self.budget.elapsed = float(D.all_reduce_sum(t, self.info).item()) if self.info.enabled else float(t.item())
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base * self.budget.factor()

    def _write_metrics(self, record: dict) -> None:
        if self.info.main:
            with writing("--out", self.out), open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _log_line(self, record: dict) -> str:
        """One progress line (printed when there is no progress bar)."""
        if self.budget is not None:
            total = f" ({self.budget.fraction:.0%} of {self.cfg.max_minutes:g} min)"
        else:
            total = f"/{self.cfg.steps}"
        parts = [
            f"step {record['step']}{total}",
            f"loss {record['loss']:.4f}",
            f"lr {record['lr']:.2e}",
            f"{record['tokens_per_s']:,.0f} tok/s",
        ]
        if record.get("eval_loss") is not None:
            parts.append(f"eval loss {record['eval_loss']:.4f}")
        if "eval_accuracy" in record:
            parts.append(f"eval accuracy {record['eval_accuracy']:.3f}")
        if "eval_rougeL" in record:
            parts.append(f"eval ROUGE-L {record['eval_rougeL']:.4f}")
        return "  ".join(parts)

    # -- signals ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """SIGINT / SIGTERM: the first asks the loop to stop after the current step (with a checkpoint),
        a second raises KeyboardInterrupt at once. Only the main thread can install handlers."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self._signal is None:
                self._signal = signum
                if self.info.main:
                    # os.write: a buffered print could re-enter a write the signal interrupted
                    os.write(
                        2,
                        (
                            f"\nfastformer: {signal.Signals(signum).name} received: finishing step "
                            f"{self.step + 1}, then writing a checkpoint (again to stop at once)\n"
                        ).encode(),
                    )
                return
            self._second_signal = signum
            raise KeyboardInterrupt

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until cfg.steps (or a stop); raises TrainingInterrupted after SIGINT / SIGTERM."""
        self._signal, self._second_signal = None, None
        try:
            # CPU: no denormal floats while training (train/resources.py says why)
            with self._signals(), flush_denormals(self.device.type == "cpu"):
                return self._train()
        except KeyboardInterrupt as e:
            if isinstance(e, TrainingInterrupted):
                raise
            signum = self._second_signal or self._signal or signal.SIGINT
            raise TrainingInterrupted(signum, self._saved_step, self.ckpt_path, saved=False) from None
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def _train(self) -> TrainResult:
        cfg = self.cfg
        if self.info.main:
            with writing("--out", self.out):
                self.out.mkdir(parents=True, exist_ok=True)
        if cfg.resume:
            self.load()
        if self.info.main and self.write_run_files is not None:
            self.write_run_files()
        if cfg.resume:
            if self.info.main:
                with writing("--out", self.out):
                    truncate_metrics(self.metrics_path, self.step)
        elif self.info.main:
            with writing("--out", self.out):
                self.metrics_path.write_text("")
        D.barrier(self.info)

        params = [p for p in self.raw_model.parameters() if p.requires_grad]
        res = TrainResult(step=self.step, resumed_from=self.step)
        bar = None
        if cfg.progress and self.info.main:
            try:
                from tqdm.auto import tqdm

                if self.budget is None:
                    bar = tqdm(total=cfg.steps, initial=self.step, desc=self.desc, dynamic_ncols=True, leave=True)
                else:  # no step count: tqdm's own format for an open total prints "desc: : 30it"
                    bar = tqdm(
                        initial=self.step,
                        desc=f"{self.desc} ({cfg.max_minutes:g} min budget)",
                        bar_format="{desc}: {n_fmt} steps [{elapsed}, {rate_fmt}{postfix}]",
                        unit="step",
                        dynamic_ncols=True,
                        leave=True,
                    )
            except ImportError:  # no progress bar without tqdm; metrics.jsonl still has everything
                bar = None
        self._bar = bar
        t_start = self.clock()
        self._t_start, self._tokens = t_start, 0
        t_log, tok_log = time.perf_counter(), 0
        self.model.train()
        while self.step < self.total and not (self.budget is not None and self.budget.exhausted):
            step = self.step + 1
            loss_sum = torch.zeros((), device=self.device)
            n_pred, n_tok = 0, 0
            for micro in range(cfg.grad_accum):
                batch = self.batch_fn(step, micro)
                n_tok += self.tokens_fn(batch)
                last = micro == cfg.grad_accum - 1
                sync = self.model.no_sync() if (self.info.enabled and not last) else contextlib.nullcontext()
                with sync:
                    with self._autocast():
                        loss, n, _ = self.step_fn(self.model, self._to_device(batch), True)
                    loss.backward()  # summed loss: normalised below by the step's predicted tokens
                loss_sum += loss.detach().float()
                n_pred += int(n)
            # Global sums over ranks: [loss, predicted tokens, input tokens, ranks that got a signal]
            # (a signal stops every rank after the same step).
            f64 = dict(dtype=torch.float64, device=self.device)
            tot = torch.stack(
                [
                    loss_sum.double(),
                    torch.tensor(float(n_pred), **f64),
                    torch.tensor(float(n_tok), **f64),
                    torch.tensor(float(self._signal is not None), **f64),
                ]
            )
            tot = D.all_reduce_sum(tot, self.info).tolist()
            g_loss, g_pred, g_tok, g_signal = tot
            # DDP averaged the gradients over ranks; rescale so they are d(sum loss)/d(theta) / g_pred.
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.info.world / max(g_pred, 1.0))
            grad_norm = ff.optim.clip_grad_norm_(params, cfg.clip_norm) if cfg.clip_norm else None
            if self.budget is not None:
                self._set_budget_lr()
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step = step
            loss_val = g_loss / max(g_pred, 1.0)
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"loss became {loss_val} at step {step}; try a lower --lr")
            tok_log += int(g_tok)
            self._tokens += int(g_tok)
            res.final_loss = loss_val

            # one process: a signal that came during this step counts; DDP: only what every rank saw
            signalled = g_signal > 0 if self.info.enabled else self._signal is not None
            interrupted = signalled or (cfg.stop_at is not None and step >= cfg.stop_at)  # like a crash: no extra eval
            stop = interrupted
            if self.budget is not None:
                stop = stop or self._elapsed() >= self.budget.seconds
            elif cfg.max_minutes is not None and self.clock() - t_start >= cfg.max_minutes * 60:
                stop = True
            if self.info.enabled and cfg.max_minutes is not None:  # every rank must stop at the same step
                flag = D.all_reduce_sum(torch.tensor([float(stop)], device=self.device), self.info)
                stop = bool(flag.item() > 0)
            # the end of a time budget ends the run: evaluate there. A --max-minutes cap with --steps
            # ends only the session, like an interruption: an evaluation there would be one more
            # candidate for a fine-tuning run's model selection than an uninterrupted run has
            run_ended = stop and not interrupted and self.budget is not None
            do_eval = (cfg.eval_every and step % cfg.eval_every == 0) or step == self.total or run_ended
            if step % cfg.log_every == 0 or do_eval or step == 1:
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                now = time.perf_counter()
                tps = tok_log / max(now - t_log, 1e-9)
                record = {
                    "step": step,
                    "loss": round(loss_val, 6),
                    "lr": lr,
                    "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
                    "tokens_per_s": round(tps, 1),
                    "predicted_tokens": int(g_pred),
                }
                if self.peak and self.flops_per_token:
                    # 4 significant digits, not 4 decimals: a tiny model's MFU is far below 1e-4 and must not log as 0
                    record["mfu"] = float(f"{tps * self.flops_per_token / (self.peak * self.info.world):.4g}")
                if do_eval:
                    ev = self.evaluate()
                    record.update({k: None if v is None else round(v, 6) for k, v in ev.items()})
                    res.eval = ev
                self._write_metrics(record)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}")
                elif self.info.main:
                    print(self._log_line(record), flush=True)
                t_log, tok_log = time.perf_counter(), 0
            if bar is not None:
                bar.update(1)
            if (cfg.save_every and step % cfg.save_every == 0) or step == self.total or stop:
                self.save()
            if signalled:
                raise TrainingInterrupted(self._signal or signal.SIGINT, self.step, self.ckpt_path, saved=True)
            if stop:
                res.stopped_early = interrupted or (self.budget is None and step < self.total)
                break
        progress = self._progress()
        res.session_seconds = self.clock() - t_start
        res.seconds, res.tokens = progress["seconds"], progress["tokens"]
        res.step = self.step
        res.tokens_per_s = res.tokens / max(res.seconds, 1e-9)
        return res
