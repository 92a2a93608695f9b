"""Command line: `fastformer pretrain | finetune | info` (DESIGN.md §4).

Bad input (missing data, unknown preset or objective, a checkpoint from another model, a TSV without
labels, ...) ends with one line `fastformer: error: ...` on stderr and exit status 2, no traceback
(set FASTFORMER_DEBUG=1 to see it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys


def _info(args: argparse.Namespace) -> int:
    import torch

    import fastformer
    from fastformer.backend import get_backend, interpreting, triton_available

    lines = [
        f"fastformer {fastformer.__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA {'yes: ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no'})",
    ]
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
    from fastformer.models.presets import known_presets
    from fastformer.train.objectives import OBJECTIVES, UnknownObjectiveError, get_objective

    lines.append(f"presets    {', '.join(known_presets())}")
    objs = []
    for name in OBJECTIVES:
        try:
            get_objective(name)
            objs.append(name)
        except (UnknownObjectiveError, ImportError):
            objs.append(f"{name} (not installed)")
    lines.append(f"objectives {', '.join(objs)}")
    print("\n".join(lines))
    return 0


def _common(p: argparse.ArgumentParser, *, lr: float, steps: int | None, out: str, batch_size: int = 32,
            steps_help: str | None = None) -> None:
    p.add_argument("--steps", type=int, default=steps, help=steps_help or f"optimizer steps (default {steps})")
    p.add_argument("--batch-size", type=int, default=batch_size,
                   help=f"examples per micro-batch per process (default {batch_size})")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=out, help=f"output folder (default {out})")
    # Extra knobs beyond DESIGN.md section 4 (all optional).
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--optimizer", default="fusedadamw", help="fusedadamw | adamw | sgd | rmsprop")
    p.add_argument("--schedule", default="linear", help="linear | cosine | constant (after warmup)")
    p.add_argument("--warmup-steps", type=int, default=None, help="default 6%% of --steps")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps and at the end "
                   "(pretrain default 200; finetune default 0: at the end only)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time budget: alone, warmup and decay of the learning rate are spread over these minutes "
                        "(the run ends with its decay done); with --steps, a safety cap (stop with a checkpoint)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model for training (default backend inductor); the fastformer "
                        "kernels stay as they are, the compiler fuses the code around them")


def _train_kwargs(args) -> dict:
    return dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                out_dir=args.out, grad_accum=args.grad_accum, optimizer=args.optimizer, schedule=args.schedule,
                warmup_steps=args.warmup_steps, log_every=args.log_every, eval_every=args.eval_every,
                max_minutes=args.max_minutes, progress=not args.no_progress, compile=args.compile)


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _pretrain(args: argparse.Namespace) -> int:
    from fastformer.train.pretrain import PretrainConfig, pretrain

    if args.steps is None and args.max_minutes is None:
        args.steps = 1000
    cfg = PretrainConfig(objective=args.objective, model=args.model, data=list(args.data or []),
                         seq_len=args.seq_len, save_every=args.save_every, resume=args.resume,
                         vocab_size=args.vocab_size, tokenizer=args.tokenizer, packing=not args.line_by_line, **_train_kwargs(args))
    s = pretrain(cfg)
    if _is_main():
        ev = (f", eval loss {s['eval_loss']:.3f}, eval {s.get('eval_accuracy_name', 'accuracy')} "
              f"{s['eval_accuracy']:.3f}") if "eval_loss" in s else ""
        print(f"\npretrain done: {s['model']} ({s['objective']}) on {s['device']} x{s['world_size']}, "
              f"{s['steps']} steps in {s['seconds']:.0f} s{' (stopped early)' if s['stopped_early'] else ''}\n"
              f"  loss {s['first_loss']:.3f} (step 1) -> {s['final_loss']:.3f} (step {s['steps']}){ev}\n"
              f"  throughput {s['tokens_per_s']:,.0f} tokens/s\n"
              f"  files in {s['out_dir']}/: metrics.jsonl loss.png config.json tokenizer.json checkpoint.pt")
    return 0


def _finetune(args: argparse.Namespace) -> int:
    from fastformer.train.finetune import FinetuneConfig, finetune

    cfg = FinetuneConfig(train=args.train, eval=args.eval, init=args.init, model=args.model,
                         max_len=args.max_len, tokenizer=args.tokenizer, epochs=args.epochs,
                         min_steps=args.min_steps, val_fraction=args.val_fraction, pooling=args.pooling,
                         **_train_kwargs(args))
    s = finetune(cfg)
    if _is_main():
        sel = (f", weights of step {s['selected_step']} (held-out accuracy {s['val_accuracy']:.3f} on "
               f"{s['n_val']} training examples)") if s.get("selected_step") else ""
        print(f"\nfinetune done ({s['source']}): {s['steps']} steps ({s['epochs']:g} epochs){sel}, eval accuracy "
              f"{s['accuracy']:.4f} on {s['n_eval']} examples\n  {s['out_dir']}/eval.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastformer", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    pre = sub.add_parser("pretrain", help="pre-train an encoder (mlm) or encoder-decoder (span)")
    pre.add_argument("--objective", default="mlm", help="mlm | span (default mlm)")
    pre.add_argument("--data", nargs="+", action="extend", metavar="PATH",
                     help="text files or folders (several allowed); default: the built-in corpus")
    pre.add_argument("--model", default=None, help="preset, e.g. bert-tiny, bert-base, t5-small")
    pre.add_argument("--seq-len", type=int, default=128, help="tokens per example (default 128)")
    _common(pre, lr=5e-4, steps=None, out="runs/pretrain",
            steps_help="optimizer steps (default 1000; with --max-minutes alone: as many as the time budget allows)")
    pre.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (and at the end)")
    pre.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    pre.add_argument("--vocab-size", type=int, default=8192)
    pre.add_argument("--tokenizer", default=None, metavar="FILE", help="reuse this tokenizer.json")
    pre.add_argument("--line-by-line", action="store_true",
                     help="one example per line with dynamic padding instead of packed fixed-length examples")
    pre.set_defaults(func=_pretrain, eval_every=200)

    fin = sub.add_parser("finetune", help="fine-tune a classifier on TSV text/label files")
    fin.add_argument("--train", required=True, metavar="FILE.tsv")
    fin.add_argument("--eval", required=True, metavar="FILE.tsv")
    fin.add_argument("--init", default=None, metavar="DIR", help="a pretrain output folder")
    fin.add_argument("--model", default=None, help="preset to train from scratch (default bert-tiny)")
    fin.add_argument("--max-len", type=int, default=128)
    fin.add_argument("--tokenizer", default=None, metavar="FILE",
                     help="with --model: use this tokenizer.json instead of training one on --train")
    fin.add_argument("--epochs", type=float, default=4.0, help="passes over the training labels (default 4)")
    fin.add_argument("--min-steps", type=int, default=300,
                     help="at least this many steps, however few the labels (default 300)")
    fin.add_argument("--pooling", default="mean", choices=("mean", "cls"),
                     help="BERT classifier feature: mean of the token states (default) or [CLS] (exportable "
                          "to a Hugging Face BertForSequenceClassification)")
    fin.add_argument("--val-fraction", type=float, default=0.1,
                     help="held-out slice of --train that picks the best epoch's weights (default 0.1; 0: off)")
    _common(fin, lr=1e-4, steps=None, out="runs/finetune", batch_size=16,
            steps_help="optimizer steps (default: --epochs passes, at least --min-steps)")
    fin.set_defaults(func=_finetune, save_every=0)

    info = sub.add_parser("info", help="versions, devices and which kernels are in use")
    info.set_defaults(func=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fastformer: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, FloatingPointError, ImportError) as e:
        if os.environ.get("FASTFORMER_DEBUG"):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"fastformer: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
