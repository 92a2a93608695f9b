"""Command line: `fastformer pretrain | finetune | predict | export | info`, `fastformer --version`.

The objectives `pretrain --objective` accepts and the presets `--model` accepts come from their
registries (`fastformer.train.objectives.OBJECTIVES`, `fastformer.models.presets`): a new objective or
preset needs no change here.

Bad input (missing data, unknown preset or objective, a checkpoint from another model, a TSV without
labels, an --out that holds another run, a full disk, ...) ends with one line `fastformer: error: ...`
on stderr and exit status 2, no traceback (set FASTFORMER_DEBUG=1 to see it). Ctrl-C or SIGTERM during
training finishes the step, writes the checkpoint and exits with 130 / 143; a second one stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import sys
from pathlib import Path

from fastformer import __version__

# --resume: flags that shape the run come from the run itself (a different value is refused) ...
RUN_SHAPING = {
    "pretrain": {
        "objective": "objective",
        "model": "model",
        "data": "data",
        "seq_len": "seq_len",
        "vocab_size": "vocab_size",
        "tokenizer": "tokenizer",
        "line_by_line": "packing",
    },
    "finetune": {
        "train": "train",
        "eval": "eval",
        "init": "init",
        "model": "model",
        "max_len": "max_len",
        "vocab_size": "vocab_size",
        "task": "task",
    },
}
for _cmd in RUN_SHAPING:
    RUN_SHAPING[_cmd].update(
        {k: k for k in ("batch_size", "lr", "seed", "grad_accum", "optimizer", "schedule", "warmup_steps")}
    )
# ... and these may be given again (otherwise they too come from the run).
RESUME_MAY_CHANGE = (
    "steps",
    "max_minutes",
    "log_every",
    "eval_every",
    "save_every",
    "device",
    "compile",
    "threads",
    "precision",
)
# text-to-text: the target length and dropout shape the run; the generation settings only its evaluation
RUN_SHAPING["finetune"].update(max_target_len="max_target_len", dropout="dropout")
# classification: the recipe's length, model selection and pooling shape the run
RUN_SHAPING["finetune"].update({k: k for k in ("epochs", "min_steps", "val_fraction", "pooling", "tokenizer")})
RESUME_MAY_CHANGE += (
    "num_beams",
    "max_new_tokens",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_repetition_penalty",
    "eval_limit",
    "eval_generate",
)
PATH_FLAGS = ("data", "tokenizer", "train", "eval", "init")
# flags that name one file, with what to name instead of a folder ("no such file" hid that it was one)
FILE_FLAGS = {
    "train": "the .tsv file in it",
    "eval": "the .tsv file in it",
    "input": "the file in it",
    "tokenizer": "its tokenizer.json",
}


def _info(args: argparse.Namespace) -> int:
    import torch

    from fastformer.backend import cpu_has_bf16, fast_cuda, get_backend, interpreting, triton_available

    lines = [
        f"fastformer {__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA {_cuda_summary() if torch.cuda.is_available() else 'no'})",
    ]
    if torch.cuda.is_available() and not fast_cuda("cuda:0"):
        lines.append("           (compute capability below 8.0: no fused kernels, training runs in fp32)")
    if triton_available():
        import triton

        lines.append(f"triton     {triton.__version__}{' (interpreter)' if interpreting() else ''}")
    else:
        lines.append("triton     not available (reference backend only)")
    lines.append(f"backend    {get_backend()}")
    try:
        from fastformer.optim import extension_available

        lines.append(f"fused adam {'compiled extension' if extension_available() else 'torch fallback'}")
    except ImportError:
        pass
    from fastformer.models.presets import DEPRECATED_PRESETS, known_presets
    from fastformer.train.resources import choose_threads

    lines.append(f"presets    {', '.join(known_presets())}")
    lines.append(f"           (deprecated names: {', '.join(f'{a} = {b}' for a, b in DEPRECATED_PRESETS.items())})")
    lines.append(f"objectives {', '.join(name if obj else f'{name} (not installed)' for name, obj in _objectives())}")
    n, why = choose_threads()  # what a run would use now (OMP_NUM_THREADS first); sets nothing
    lines.append(f"threads    {n} ({why}; --threads N or OMP_NUM_THREADS to choose)")
    lines.append(
        "cpu bf16   yes: bf16 instructions, --precision bf16 speeds up training on the CPU"
        if cpu_has_bf16()
        else "cpu bf16   no: a bf16 matmul would be emulated, train on the CPU in fp32 (the default)"
    )
    print("\n".join(lines))
    return 0


def _cuda_summary() -> str:
    """'yes: NVIDIA H100 80GB HBM3, compute capability 9.0' (with the count when there are several)."""
    import torch

    from fastformer.backend import compute_capability

    n, cc = torch.cuda.device_count(), compute_capability(0)
    return f"yes: {f'{n} x ' if n > 1 else ''}{torch.cuda.get_device_name(0)}, compute capability {cc}"


def _objectives() -> list:
    """(name, objective or None when its module is missing) for every registered objective."""
    from fastformer.train.objectives import OBJECTIVES, UnknownObjectiveError, get_objective

    found = []
    for name in OBJECTIVES:
        try:
            found.append((name, get_objective(name)))
        except (UnknownObjectiveError, ImportError):
            found.append((name, None))
    return found


def _model_help(objectives: list) -> str:
    """The presets each objective trains, its default first: 'mlm: bert-tiny (default), bert-mini, ...'."""
    from fastformer.models.presets import known_presets, preset_family

    parts = []
    for name, obj in objectives:
        if obj is None:
            continue
        names = [p for p in known_presets() if preset_family(p) == obj.family]
        names = [f"{obj.default_model} (default)"] + [p for p in names if p != obj.default_model]
        parts.append(f"{name}: {', '.join(names)}")
    return "preset; " + "; ".join(parts)


def _common(
    p: argparse.ArgumentParser,
    *,
    lr: float,
    steps: int | None,
    out: str,
    batch_size: int = 32,
    steps_help: str | None = None,
) -> None:
    from fastformer.train.schedules import SCHEDULES
    from fastformer.train.trainer import OPTIMIZERS, PRECISIONS

    p.add_argument("--steps", type=int, default=steps, help=steps_help or f"optimizer steps (default {steps})")
    p.add_argument(
        "--batch-size",
        type=int,
        default=batch_size,
        help=f"examples per micro-batch per process (default {batch_size})",
    )
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out",
        default=out,
        help=f"output folder (default {out}); a non-empty one must be this command's run and --resume, or --overwrite",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out with its own settings (only --steps, --max-minutes and flags that "
        "do not change the training, such as --threads, may change)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace the run in a non-empty --out")
    # Knobs of the training loop beyond the basics above (all optional).
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--optimizer", default="fusedadamw", help=f"{' | '.join(OPTIMIZERS)} (default fusedadamw)")
    p.add_argument(
        "--schedule", default="linear", help=f"{' | '.join(SCHEDULES)}: the learning rate after warmup (default linear)"
    )
    p.add_argument("--warmup-steps", type=int, default=None, help="default 6%% of --steps")
    p.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="log (and without a progress bar print) a line every N steps (default 10)",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=0,
        help="evaluate every N steps and at the end (pretrain default 200; finetune default 0: at the end only)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget: alone, warmup and decay of the learning rate are spread over these minutes "
        "(the run ends with its decay done); with --steps, a safety cap (stop with a checkpoint)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar: a log line every --log-every steps")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: OMP_NUM_THREADS, else the physical cores, fewer on a busy machine)",
    )
    p.add_argument(
        "--no-memory-check", action="store_true", help="start even when the estimated peak memory does not fit"
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="autocast of the training forward: auto (default) = bf16 on a CUDA GPU of compute capability "
        ">= 8.0, fp32 elsewhere; bf16 also on a CPU, fast where it has bf16 instructions (AVX512-BF16, AMX, "
        "Arm BF16; `fastformer info` tells); fp32 never autocasts",
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        metavar="BACKEND",
        help="torch.compile the model for training (default backend inductor); the fastformer "
        "kernels stay as they are, the compiler fuses the code around them",
    )


def _train_kwargs(args) -> dict:
    return dict(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        out_dir=args.out,
        grad_accum=args.grad_accum,
        optimizer=args.optimizer,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        log_every=args.log_every,
        eval_every=args.eval_every,
        max_minutes=args.max_minutes,
        progress=not args.no_progress,
        compile=args.compile,
        resume=args.resume,
        overwrite=args.overwrite,
        threads=args.threads,
        memory_check=not args.no_memory_check,
        precision=args.precision,
    )


def _finetune_presets() -> str:
    """Every preset: finetune --task classify trains any of them from scratch."""
    from fastformer.models.presets import known_presets

    return ", ".join(known_presets())


def _task_default(p: argparse.ArgumentParser, dest: str, *, help: str) -> None:
    """Flag `dest` of `p` without a parser default: absent, the pipeline of --task uses its own."""
    for action in p._actions:
        if action.dest == dest:
            action.default, action.help = None, help


# flags whose absence means "the --task pipeline's own default" (FinetuneConfig's or Text2TextConfig's)
TASK_DEFAULTS = ("lr", "steps", "batch_size", "eval_every")
CLASSIFY_FIELDS = ("epochs", "min_steps", "val_fraction", "pooling", "tokenizer")


def _finetune_kwargs(args) -> dict:
    """_train_kwargs without the absent TASK_DEFAULTS flags; --max-minutes without --steps keeps
    steps None (a time-budgeted run) instead of the pipeline's step count."""
    kwargs = {k: v for k, v in _train_kwargs(args).items() if not (k in TASK_DEFAULTS and v is None)}
    if args.steps is None and args.max_minutes is not None:
        kwargs["steps"] = None
    return kwargs


def _check_file_flags(args: argparse.Namespace) -> None:
    """A folder given where a file is wanted, or a pipe or device (`<(cmd)`, /dev/stdin) where a
    file is read, said as such by the flag, before any work."""
    for dest in (*FILE_FLAGS, "data"):
        values = getattr(args, dest, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            p = Path(value) if value else None
            if p is None or p.is_file():
                continue
            if dest in FILE_FLAGS and p.is_dir():
                raise ValueError(f"--{dest} {value}: is a folder, not a file; give {FILE_FLAGS[dest]}")
            if p.exists() and not p.is_dir():
                raise ValueError(
                    f"--{dest} {value}: not a regular file (a pipe or a device, e.g. from <(...)); "
                    "save the text to a file and give that"
                )


def _rank(env=None) -> int:
    """This process's torchrun rank (fastformer.train.distributed.launched); 0 when the environment
    cannot be read (this runs in error handlers too)."""
    from fastformer.train.distributed import launched

    try:
        return launched(env)[0]
    except (KeyError, ValueError):
        return 0


def _is_main() -> bool:
    return _rank() == 0


# ---------------------------------------------------------------------------------------------------
# --resume: the run's own settings
# ---------------------------------------------------------------------------------------------------


def _explicit(sub: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Destinations of the options actually given on the command line (not defaults)."""
    saved = [(a, a.default) for a in sub._actions]
    saved_defaults = sub._defaults
    try:
        for a in sub._actions:
            a.default = argparse.SUPPRESS
        sub._defaults = {}
        ns, _ = sub.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
        sub._defaults = saved_defaults
    return set(vars(ns))


def _norm(dest: str, v):
    if dest == "model":  # a run recorded under a deprecated preset name is that preset's run
        from fastformer.models.presets import canonical_preset

        return canonical_preset(v, warn=False)
    if isinstance(v, float) and not isinstance(v, bool):  # 6e-4 typed equals 1e-4 * 768 / 128 computed
        return float(f"{v:.12g}")
    if v is None or dest not in PATH_FLAGS:
        return v
    if isinstance(v, (list, tuple)):
        return [str(Path(x).resolve()) for x in v]
    return str(Path(v).resolve())


def _apply_resume(args: argparse.Namespace, sub: argparse.ArgumentParser, argv: list[str]) -> None:
    """Fill args from the run in --out; a run-shaping flag given with another value is an error."""
    from fastformer.train.run_dir import stored_train_config

    if args.overwrite:
        return  # prepare_out_dir refuses --resume with --overwrite
    if not (Path(args.out) / "config.json").is_file():
        return  # no run there: the pipeline says so (no checkpoint in --out)
    given = _explicit(sub, argv)
    stored = stored_train_config(args.out)
    shaping = RUN_SHAPING[args.command]
    for dest, key in list(shaping.items()) + [(k, k) for k in RESUME_MAY_CHANGE]:
        if key not in stored:
            continue  # an older config.json without it: the command's value
        want = (not stored[key]) if dest == "line_by_line" else stored[key]
        if dest in given:
            have = getattr(args, dest)
            if dest in shaping and _norm(dest, have) != _norm(dest, want):
                flag = "--" + dest.replace("_", "-")
                raise ValueError(
                    f"--resume continues the run in {args.out} with its own settings: it used {flag} "
                    f"{want}, this command gives {have}; leave {flag} out (only --steps, --max-minutes and "
                    "flags that do not change the training, such as --threads, may change)"
                )
            continue
        setattr(args, dest, _norm(dest, want) if dest == "model" else want)


# ---------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------


def _pretrain(args: argparse.Namespace) -> int:
    from fastformer.train.pretrain import PretrainConfig, pretrain

    if args.steps is None and args.max_minutes is None:
        args.steps = 1000
    cfg = PretrainConfig(
        objective=args.objective,
        model=args.model,
        data=list(args.data or []),
        seq_len=args.seq_len,
        save_every=args.save_every,
        vocab_size=args.vocab_size,
        tokenizer=args.tokenizer,
        packing=not args.line_by_line,
        **_train_kwargs(args),
    )
    s = pretrain(cfg)
    if _is_main():
        ev = (
            (
                f", eval loss {s['eval_loss']:.3f}, eval {s.get('eval_accuracy_name', 'accuracy')} "
                f"{s['eval_accuracy']:.3f}"
            )
            if "eval_loss" in s
            else ""
        )
        resumed = resumed_line(s)
        first = f"{s['first_loss']:.3f} (step 1)" if s["first_loss"] is not None else "?"
        print(
            f"\npretrain done: {s['model']} ({s['objective']}) on {s['device']} x{s['world_size']}, "
            f"{_count(s['steps'], 'step')} in {s['seconds']:.0f} s{' (stopped early)' if s['stopped_early'] else ''}"
            f"{resumed}\n"
            f"  loss {first} -> {s['final_loss']:.3f} (step {s['steps']}){ev}\n"
            f"  throughput {s['tokens_per_s']:,.0f} tokens/s\n"
            f"  files in {s['out_dir']}/: metrics.jsonl loss.png config.json tokenizer.json checkpoint.pt"
        )
        _say_cap_stop("pretrain", s)
    return 0


def _say_cap_stop(command: str, s: dict) -> None:
    """The line after a summary of a session the --max-minutes cap stopped before --steps (a signal
    ends with its own resume line)."""
    if s.get("stopped_early"):
        print(f"  --max-minutes stopped it before --steps; to go on: {_resume_command(command, s['out_dir'])}")


def _count(n: int, word: str) -> str:
    """'1 step', '2 steps'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def resumed_line(s: dict) -> str:
    """The summary's line about a resumed session ('' for a fresh run)."""
    start = s.get("resumed_from")
    if not start:
        return ""
    if start >= s["steps"]:
        return f"\n  resumed at step {start}: the run had already finished (a larger --steps trains further)"
    done = f"step {s['steps']}" if start + 1 == s["steps"] else f"steps {start + 1}-{s['steps']}"
    return f"\n  resumed at step {start}: {done} in {s['session_seconds']:.0f} s this session"


def _finetune_text2text(args: argparse.Namespace) -> int:
    from fastformer.train.text2text import TEXT2TEXT_FIELDS, Text2TextConfig, describe_summary, finetune_text2text

    extra = {k: getattr(args, k) for k in TEXT2TEXT_FIELDS if getattr(args, k) is not None}
    cfg = Text2TextConfig(
        train=args.train,
        eval=args.eval,
        init=args.init,
        model=args.model,
        max_len=args.max_len,
        save_every=args.save_every,
        vocab_size=args.vocab_size,
        **extra,
        **_finetune_kwargs(args),
    )
    s = finetune_text2text(cfg)
    if _is_main():
        print("\n" + describe_summary(s))
        _say_cap_stop("finetune", s)
    return 0


def _encoder_family(args: argparse.Namespace) -> str | None:
    """'bert' or 't5': the family of the model --init or --model names; None when that cannot be told
    yet (a missing or broken --init folder, an unknown preset: the pipeline reports those)."""
    from fastformer.models.presets import canonical_preset, preset_family
    from fastformer.train.objectives import get_objective

    try:
        if args.init:
            return get_objective(json.loads((Path(args.init) / "config.json").read_text())["objective"]).family
        return preset_family(canonical_preset(args.model or "bert-tiny", warn=False))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _finetune(args: argparse.Namespace) -> int:
    from fastformer.train.finetune import FinetuneConfig, finetune
    from fastformer.train.text2text import TEXT2TEXT_FIELDS

    if args.vocab_size is not None and args.init and not args.resume and _is_main():  # once per torchrun job
        import warnings

        from fastformer.train.run_dir import FastformerWarning

        warnings.warn(
            f"--vocab-size {args.vocab_size} is not used: the --init folder brings its own tokenizer",
            FastformerWarning,
            stacklevel=2,
        )
    args.vocab_size = args.vocab_size if args.vocab_size is not None else FinetuneConfig.vocab_size

    if args.task == "text2text":
        given = [k for k in CLASSIFY_FIELDS if getattr(args, k) is not None]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --task classify only")
        return _finetune_text2text(args)
    if args.task != "classify":
        raise ValueError(
            f"--task {args.task}: choose classify (a classification head) or text2text "
            "(input -> output text with the whole encoder-decoder)"
        )
    given = [k for k in TEXT2TEXT_FIELDS if getattr(args, k) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --task text2text only")
    if args.pooling == "cls" and not args.resume and _is_main() and _encoder_family(args) == "t5":
        import warnings

        from fastformer.train.run_dir import FastformerWarning

        warnings.warn(
            "--pooling cls is not used: a T5 encoder has no [CLS] token, its classifier mean-pools "
            "the token states (--pooling applies to BERT encoders)",
            FastformerWarning,
            stacklevel=2,
        )
    recipe = {k: getattr(args, k) for k in CLASSIFY_FIELDS if getattr(args, k) is not None}
    if args.steps is None and args.max_minutes is not None and not args.resume:  # (a resumed run's own values)
        length = [k for k in ("epochs", "min_steps") if k in recipe]
        if length:
            raise ValueError(
                f"--{length[0].replace('_', '-')} sets the run's length in steps, and --max-minutes without "
                "--steps sets it in time: give one of them (or --steps with --max-minutes as a safety cap)"
            )
    cfg = FinetuneConfig(
        train=args.train,
        eval=args.eval,
        init=args.init,
        model=args.model,
        task=args.task,
        max_len=args.max_len,
        save_every=args.save_every,
        vocab_size=args.vocab_size,
        **recipe,
        **_finetune_kwargs(args),
    )
    s = finetune(cfg)
    if _is_main():
        resumed = f" (resumed at step {s['resumed_from']})" if s.get("resumed_from") else ""
        sel = (
            (
                f"; weights of step {s['selected_step']} (held-out accuracy {s['val_accuracy']:.3f} on "
                f"{s['n_val']} training examples)"
            )
            if s.get("selected_step")
            else ""
        )
        print(
            f"\nfinetune done ({s['source']}): {_count(s['steps'], 'step')} ({s['epochs']:g} "
            f"epoch{'' if s['epochs'] == 1 else 's'}) in {s['seconds']:.0f} s"
            f"{' (stopped early)' if s.get('stopped_early') else ''}{resumed}{sel}, eval accuracy "
            f"{s['accuracy']:.4f} on {s['n_eval']} examples\n  {s['out_dir']}/eval.json; use it with "
            f"`fastformer predict --model {shlex.quote(str(s['out_dir']))} --input FILE`"
        )
        _say_cap_stop("finetune", s)
    return 0


def _predict(args: argparse.Namespace) -> int:
    from fastformer.data.corpus import named_by
    from fastformer.data.tsv import read_inputs
    from fastformer.models import load
    from fastformer.models.loading import RunFolderError
    from fastformer.train.distributed import resolve_device
    from fastformer.train.predict import accuracy, labels_comparable, predict_texts, write_predictions
    from fastformer.train.resources import set_threads

    if args.output and Path(args.output).resolve() == Path(args.input).resolve():
        raise ValueError(f"--output {args.output} is the --input file: choose another --output")
    if args.output and Path(args.output).is_file() and Path(args.output).resolve().parent == Path(args.model).resolve():
        # the run folder's own files (checkpoint.pt, config.json, eval.json, ...) are never replaced
        raise ValueError(f"--output {args.output} would replace a file of the --model folder: choose another --output")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1 (candidates listed per [MASK]), got {args.top_k}")
    set_threads(args.threads)
    device = resolve_device(args.device)
    with named_by("--model", (RunFolderError,)):
        loaded = load(args.model, device=device)
    generation = {
        k: getattr(args, k)
        for k in (
            "num_beams",
            "max_new_tokens",
            "length_penalty",
            "no_repeat_ngram_size",
            "encoder_repetition_penalty",
            "max_len",
        )
        if getattr(args, k) is not None
    }
    if loaded.kind == "seq2seq":  # text-to-text: a TSV's input column (and its targets, if any)
        from fastformer.data.text2text import read_generation_inputs

        with named_by("--input"):
            texts, labels = read_generation_inputs(args.input)
    elif generation:
        raise ValueError(
            f"--{next(iter(generation)).replace('_', '-')} applies to text-to-text models; "
            f"{args.model} holds a {loaded.kind} model"
        )
    else:
        with named_by("--input"):
            texts, labels = read_inputs(args.input)
    if args.top_k is not None:
        if loaded.kind != "mlm":
            raise ValueError(f"--top-k applies to masked language models; {args.model} holds a {loaded.kind} model")
        generation["top_k"] = args.top_k
    columns, rows = predict_texts(loaded, texts, batch_size=args.batch_size, device=device, **generation)
    write_predictions(columns, rows, args.output)
    scored = (
        loaded.kind == "classifier" and labels and labels_comparable(labels, loaded.labels, f"--input {args.input}")
    )
    acc = accuracy(rows, labels, loaded.labels) if scored else None
    note = f"; accuracy {acc:.4f} against the labels in {args.input}" if acc is not None else ""
    if labels and loaded.kind == "seq2seq":
        from fastformer.train.predict import generation_scores

        g = generation_scores(rows, labels)
        note = f"; ROUGE-L {g['rougeL']:.4f}, exact match {g['exact_match']:.4f} against the targets in {args.input}"
    print(
        f"fastformer predict: {len(rows)} text(s), {loaded.kind} model {loaded.run_config['architecture']}"
        f"{' -> ' + args.output if args.output else ''}{note}",
        file=sys.stderr,
    )
    return 0


def _export(args: argparse.Namespace) -> int:
    from fastformer.data.corpus import named_by
    from fastformer.models import load, save_hf
    from fastformer.models.loading import RunFolderError
    from fastformer.train.run_dir import run_kind, writing

    out = Path(args.hf)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--hf {out}: exists and is not a folder; choose another --hf")
    same = out.is_dir() and out.resolve() == Path(args.model).resolve()
    kind = run_kind(out) if out.is_dir() else None
    if same or kind:
        # Hugging Face's config.json and tokenizer.json would replace the run's: even --overwrite never does that
        what = "is the --model folder" if same else f"holds a {kind} run"
        raise ValueError(
            f"--hf {out} {what}, whose config.json and tokenizer.json export would replace: choose another --hf"
        )
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--hf {out} is not empty: choose another --hf, or add --overwrite to write over it")
    with named_by("--model", (RunFolderError,)):
        loaded = load(args.model)
    max_len = generation = None
    if loaded.kind == "seq2seq":  # what predict would use: the run's settings, or a span folder's defaults
        from fastformer.train.text2text import generation_settings

        max_len, generation = generation_settings(loaded.run_config)
    elif loaded.kind == "classifier":  # predict cuts at the fine-tuning --max-len (MLM: the model's positions)
        max_len = loaded.run_config.get("max_len")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()  # one line per command, no shard progress bar
    except (ImportError, AttributeError):
        pass  # save_hf says that transformers is needed
    try:
        with writing("--hf", out):
            save_hf(
                loaded.model,
                out,
                tokenizer=loaded.tokenizer,
                labels=loaded.labels,
                generation=generation,
                max_len=max_len,
            )
    except ValueError as e:
        if str(e).startswith("--hf"):
            raise
        raise ValueError(f"export --model {args.model}: {e}") from None
    print(
        f"exported {loaded.run_config['architecture']} ({loaded.kind}) from {args.model} to {out}/ "
        f"(transformers: from_pretrained({str(out)!r}); AutoTokenizer.from_pretrained({str(out)!r}))"
    )
    return 0


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps help lines between words only: preset names and flags (bert-small, --max-minutes) stay whole."""

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fastformer",
        description="Pre-train, fine-tune, use and export BERT- and T5-style models on fastformer's fused kernels.",
        epilog="A walk through every command: docs/training.md in the fastformer repository. "
        "`fastformer COMMAND --help` lists a command's flags.",
    )
    parser.add_argument("--version", action="version", version=f"fastformer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    objectives = _objectives()
    names = [name for name, _ in objectives]
    pre = sub.add_parser("pretrain", help=f"pre-train a model with one of the objectives ({', '.join(names)})")
    pre.add_argument("--objective", default="mlm", help=f"{' | '.join(names)} (default mlm)")
    pre.add_argument(
        "--data",
        nargs="+",
        action="extend",
        metavar="PATH",
        help="text files or folders (several allowed); default: the built-in corpus",
    )
    pre.add_argument("--model", default=None, help=_model_help(objectives))
    pre.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    _common(
        pre,
        lr=5e-4,
        steps=None,
        out="runs/pretrain",
        steps_help="optimizer steps (default 1000; with --max-minutes alone: as many as the time budget allows)",
    )
    pre.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    pre.add_argument("--vocab-size", type=int, default=8192)
    pre.add_argument("--tokenizer", default=None, metavar="FILE", help="reuse this tokenizer.json")
    pre.add_argument(
        "--line-by-line",
        action="store_true",
        help="one example per line with dynamic padding instead of packed fixed-length examples",
    )
    pre.set_defaults(func=_pretrain, eval_every=200)

    fin = sub.add_parser(
        "finetune",
        help="fine-tune a classifier on TSV text/label files, or the "
        "encoder-decoder on input/target pairs (--task text2text)",
    )
    fin.add_argument(
        "--train",
        default=None,
        metavar="FILE.tsv",
        help="training rows (text<TAB>label; input<TAB>target for text2text)",
    )
    fin.add_argument("--eval", default=None, metavar="FILE.tsv", help="held-out rows (same format)")
    fin.add_argument("--init", default=None, metavar="DIR", help="a pretrain output folder")
    fin.add_argument(
        "--model",
        default=None,
        help=f"preset to train from scratch: {_finetune_presets()} (default "
        "bert-tiny; --task text2text takes the t5-* ones, default t5-tiny)",
    )
    fin.add_argument(
        "--task",
        default="classify",
        help="classify (default): a classification head on the encoder; "
        "text2text: the whole encoder-decoder on input<TAB>target pairs, evaluated by generating",
    )
    fin.add_argument("--max-len", type=int, default=128, help="tokens per example, longer texts are cut (default 128)")
    _common(fin, lr=1e-4, steps=None, out="runs/finetune")
    from fastformer.train.finetune import FinetuneConfig
    from fastformer.train.text2text import Text2TextConfig

    _task_default(
        fin,
        "lr",
        help="peak learning rate (default: 1e-4 x 768 / the model's hidden size, e.g. 6e-4 for bert-tiny, 1e-4 "
        f"for bert-base; {Text2TextConfig.lr:g} for --task text2text)",
    )
    _task_default(
        fin,
        "steps",
        help=f"optimizer steps (default: --epochs passes over the training labels, at least "
        f"--min-steps; {Text2TextConfig.steps} for --task text2text; with --max-minutes alone: as many as the "
        "time budget allows)",
    )
    _task_default(
        fin,
        "batch_size",
        help=f"examples per micro-batch per process (default {FinetuneConfig.batch_size}; "
        f"{Text2TextConfig.batch_size} for --task text2text)",
    )
    _task_default(
        fin,
        "eval_every",
        help="evaluate every N steps (default: classify with a held-out slice, once "
        "per epoch on it, then once on --eval; otherwise at the end only)",
    )
    _task_default(
        fin,
        "max_minutes",
        help="time budget: alone (no --steps), warmup and decay of the learning rate are spread over these "
        "minutes instead of --epochs / the text2text step count; with --steps, a safety cap (stop with a "
        "checkpoint)",
    )
    cls = fin.add_argument_group("classification (--task classify)")
    cls.add_argument(
        "--epochs",
        type=float,
        default=None,
        help=f"passes over the training labels (default {FinetuneConfig.epochs:g})",
    )
    cls.add_argument(
        "--min-steps",
        type=int,
        default=None,
        help=f"at least this many steps, however few the labels (default {FinetuneConfig.min_steps})",
    )
    cls.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help=f"held-out slice of --train (stratified by label) that picks the best evaluation's weights "
        f"(default {FinetuneConfig.val_fraction:g}; 0: off, the last weights are kept)",
    )
    cls.add_argument(
        "--pooling",
        default=None,
        choices=("mean", "cls"),
        help="BERT classifier feature: [CLS] as BERT does (default; `export` writes it as a Hugging Face "
        "BertForSequenceClassification) or the mean of the token states (no Hugging Face "
        "counterpart)",
    )
    cls.add_argument(
        "--tokenizer",
        default=None,
        metavar="FILE",
        help="with --model: use this tokenizer.json (e.g. a pre-training run's) instead of training one on --train",
    )
    fin.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    fin.add_argument(
        "--vocab-size", type=int, default=None, help="with --model: the size of the tokenizer trained (default 8192)"
    )
    t2t = fin.add_argument_group("text-to-text (--task text2text)")
    t2t.add_argument(
        "--max-target-len", type=int, default=None, help="target tokens, longer targets are cut (default 64)"
    )
    t2t.add_argument(
        "--num-beams", type=int, default=None, help="evaluation: beam search with N beams (default 1: greedy)"
    )
    t2t.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="evaluation: generated tokens at most (default --max-target-len)",
    )
    t2t.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help="evaluation: beam score = log-probability / length ** P (default 1.0)",
    )
    t2t.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=None,
        metavar="N",
        help="evaluation: never generate an N-gram twice in a text (default 0: off)",
    )
    t2t.add_argument(
        "--encoder-repetition-penalty",
        type=float,
        default=None,
        metavar="P",
        help="evaluation: P > 1 favours tokens of the input (Hugging Face's encoder_repetition_penalty; "
        "default 1: off)",
    )
    t2t.add_argument(
        "--dropout", type=float, default=None, help="dropout rate while fine-tuning (default: the model's, 0.0)"
    )
    t2t.add_argument(
        "--eval-limit",
        type=int,
        default=None,
        metavar="N",
        help="evaluation: generate for the first N --eval pairs only (default all)",
    )
    t2t.add_argument(
        "--eval-generate",
        type=int,
        default=None,
        metavar="N",
        help="with --eval-every: at each evaluation also generate for the first N --eval pairs and log "
        "their ROUGE (eval_rougeL, ...) in metrics.jsonl (default 0: off)",
    )
    fin.set_defaults(func=_finetune)

    prd = sub.add_parser(
        "predict",
        help="labels (classifier), filled [MASK] (MLM) or generated text (text-to-text) for each text of a file",
    )
    prd.add_argument("--model", required=True, metavar="DIR", help="a pretrain or finetune output folder")
    prd.add_argument(
        "--input", required=True, metavar="FILE", help=".tsv (text column, labels optional) or one text per line"
    )
    prd.add_argument("--output", default=None, metavar="FILE", help="TSV (or .jsonl) output; default stdout")
    prd.add_argument("--batch-size", type=int, default=32)
    prd.add_argument("--device", default="cpu", help="cpu (default) | cuda | auto")
    prd.add_argument("--top-k", type=int, default=None, help="MLM: candidates listed per [MASK] (default 5)")
    prd.add_argument("--num-beams", type=int, default=None, help="text-to-text: beams (default: the run's setting)")
    prd.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="text-to-text: generated tokens at most (default: the run's setting)",
    )
    prd.add_argument(
        "--length-penalty",
        type=float,
        default=None,
        help="text-to-text: beam length penalty (default: the run's setting)",
    )
    prd.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=None,
        metavar="N",
        help="text-to-text: never generate an N-gram twice in a text, 0 = off (default: the run's setting)",
    )
    prd.add_argument(
        "--encoder-repetition-penalty",
        type=float,
        default=None,
        metavar="P",
        help="text-to-text: P > 1 favours tokens of the input, 1 = off (default: the run's setting)",
    )
    prd.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="text-to-text: input tokens, longer inputs are cut (default: the run's setting)",
    )
    prd.add_argument("--threads", type=int, default=None, metavar="N")
    prd.set_defaults(func=_predict)

    exp = sub.add_parser("export", help="write a trained folder as a Hugging Face save_pretrained folder")
    exp.add_argument("--model", required=True, metavar="DIR", help="a pretrain or finetune output folder")
    exp.add_argument("--hf", required=True, metavar="OUT", help="the Hugging Face folder to write")
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty OUT")
    exp.set_defaults(func=_export)

    info = sub.add_parser("info", help="versions, devices and which kernels are in use")
    info.set_defaults(func=_info)
    return parser


# ---------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------


def _interrupted_lines(e, command: str, out: str, env=None) -> list[str]:
    """What an interrupted training run prints: the stop line and, when a checkpoint exists, the command
    that resumes it. Under torchrun (RANK / WORLD_SIZE in `env`, default os.environ) only rank 0 prints,
    and the hint is the torchrun command with the same number of processes (--resume refuses another)."""
    env = os.environ if env is None else env
    if _rank(env) != 0:
        return []
    lines = [f"fastformer: {e}"]
    if e.step:
        lines.append(f"fastformer: resume with: {_resume_command(command, out, env)}")
    return lines


def _resume_command(command: str, out: str, env=None) -> str:
    """The command that resumes the run in `out`: under torchrun (WORLD_SIZE > 1 in `env`) the torchrun
    command with the same number of processes (--resume refuses another)."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    launch = "fastformer"
    if world > 1:
        local = int(env.get("LOCAL_WORLD_SIZE") or world)
        per_node = local if 0 < local < world else world
        nodes = f"--nnodes {world // per_node} " if per_node < world else ""
        launch = f"torchrun {nodes}--nproc_per_node {per_node} -m fastformer"
    return f"{launch} {command} --out {shlex.quote(str(out))} --resume"


_PEER_GONE = ("connection reset by peer", "connection closed by peer", "broken pipe")


def _lost_peer(e: RuntimeError) -> bool:
    """Whether a collective failed because another process of the group went away (not a fault of
    this rank's own, such as a CUDA error inside NCCL: that keeps its traceback)."""
    text = str(e).lower()
    return any(s in text for s in _PEER_GONE)


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks of a torchrun share the stream, and print's separate
    writes of the text and its newline let two ranks' lines run together."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class _Terminated(Exception):
    """SIGTERM outside the training loop."""


def _one_line_warnings():
    """fastformer's warnings (its warning classes, or any warning its own code raises) as `fastformer:
    warning: ...` lines; others as Python prints them."""
    import warnings

    from fastformer.models.presets import DeprecatedPresetWarning
    from fastformer.train.run_dir import FastformerWarning

    original = warnings.showwarning
    package = str(Path(__file__).resolve().parent)

    def ours(filename) -> bool:  # raised by fastformer's own code (the extension's fallback warning, ...)
        try:
            return str(Path(filename).resolve()).startswith(package + os.sep)
        except (OSError, TypeError, ValueError):
            return False

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (FastformerWarning, DeprecatedPresetWarning)) or ours(filename):
            text = " ".join(str(message).split()).removeprefix("fastformer: ")
            _say(f"fastformer: warning: {text}")
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _unrecognized(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: list[str]) -> None:
    """Unknown arguments, said by the subcommand's parser (its usage, not the top level's) with the
    closest flag it has: `fastformer pretrain --modle x` -> "did you mean --model?". Exits 2."""
    import difflib

    sub = (
        parser._subparsers._group_actions[0].choices.get(getattr(args, "command", None)) if parser._subparsers else None
    )
    target = sub or parser
    flags = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    hints = []
    for x in extra:
        name = x.split("=", 1)[0]
        close = difflib.get_close_matches(name, flags, n=1) if name.startswith("--") else []
        if close:
            hints.append(f"{name}: did you mean {close[0]}?")
    target.error(f"unrecognized arguments: {' '.join(extra)}" + (f" ({'; '.join(hints)})" if hints else ""))


def main(argv: list[str] | None = None) -> int:
    """The `fastformer` program. Called without argv (the console script), it also prints fastformer's
    warnings as one line each and turns SIGTERM outside training into exit status 143."""
    program = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        _unrecognized(parser, args, extra)
    if program:
        _one_line_warnings()

        def on_term(signum, frame):
            raise _Terminated

        signal.signal(signal.SIGTERM, on_term)
    try:
        if getattr(args, "resume", False):
            sub = parser._subparsers._group_actions[0].choices[args.command]
            _apply_resume(args, sub, argv[argv.index(args.command) + 1 :])
        _check_file_flags(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt as e:
        from fastformer.train.trainer import TrainingInterrupted

        if isinstance(e, TrainingInterrupted):
            for line in _interrupted_lines(e, args.command, args.out):
                _say(line)
            return e.exit_code
        _say("fastformer: interrupted")
        return 130
    except _Terminated:
        _say("fastformer: terminated")
        return 143
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        if os.environ.get("FASTFORMER_DEBUG"):
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:
            msg = f"{e.filename}: {e.strerror}"
        else:
            msg = " ".join(str(e).split()) or type(e).__name__
        # under torchrun every rank checks its input: the other ranks' lines say which rank they come
        # from (an error only one rank meets, its GPU's memory or its node's files, must still be seen)
        rank = _rank()
        _say(f"fastformer: error: {f'[rank {rank}] ' if rank else ''}{msg}")
        return 2
    except RuntimeError as e:
        # a torchrun rank whose peer stopped (refused its input, failed to write) loses the connection
        # in the next collective: one line instead of the process group's traceback
        rank = _rank()
        if rank == 0 or not _lost_peer(e) or os.environ.get("FASTFORMER_DEBUG"):
            raise
        first = " ".join(str(e).splitlines()[0].split()) if str(e) else type(e).__name__
        _say(f"fastformer: error: [rank {rank}] another process of the run stopped ({first}); its own error says why")
        return 1


if __name__ == "__main__":
    sys.exit(main())
