"""CPU training step in fp32 against bf16 autocast (`--precision bf16`), same run, same model.

    python bench/bench_cpu_precision.py [--full] [--out DIR]

One text-to-text training step (forward, backward, FusedAdamW step) of fastformer's T5 on CPU, at the
AG News headline shapes: 32 pairs of 64 input and 24 target tokens, vocabulary 8192, dropout 0.1 (the
fine-tuning setting). fp32 is the trainer's CPU default; bf16 is what `--precision bf16` runs: the
forward under `torch.autocast("cpu", torch.bfloat16)`, fp32 weights, optimizer state and loss.
Presets t5-tiny and t5-mini (`--full` adds t5-v1_1-small). The two precisions are timed in alternating
rounds (order flipped each round) so a drifting machine load hits both alike; the median step of each.

A bf16 matmul is fast only on a CPU with bf16 instructions (AVX512-BF16, AMX, Arm BF16): elsewhere torch
emulates it and bf16 is the slower one. Each row records `cpu_bf16` (harness.cpu_has_bf16()).
`loss_rel_diff`: |loss_bf16 - loss_fp32| / loss_fp32 of the first step, same weights and batch (dropout
off for that comparison), the size of the rounding bf16 brings.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import cpu_has_bf16, format_table, main, save

import fastformer as ff
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration

VOCAB, BATCH, SRC, TGT = 8192, 32, 64, 24
COLUMNS = ["preset", "params_M", "fp32_ms", "bf16_ms", "speedup", "loss_rel_diff", "cpu_bf16"]


def _precision(name: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if name == "bf16" else contextlib.nullcontext()


def _batch(g: torch.Generator) -> dict:
    ids = torch.randint(2, VOCAB, (BATCH, SRC), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, SRC * 3 // 4 :] = 0  # some padded inputs, as in a real batch
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(2, VOCAB, (BATCH, TGT), generator=g)}


def _first_losses(model: T5ForConditionalGeneration, batch: dict) -> dict:
    model.eval()
    with torch.no_grad():
        losses = {}
        for name in ("fp32", "bf16"):
            with _precision(name):
                losses[name] = float(model(**batch).loss)
    model.train()
    return losses


def _case(preset: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config.from_preset(preset, vocab_size=VOCAB, dropout_rate=0.1))
    opt = ff.optim.FusedAdamW(model.parameters(), lr=1e-4)
    batch = _batch(torch.Generator().manual_seed(0))
    losses = _first_losses(model, batch)

    def step(name: str) -> float:
        t0 = time.perf_counter()
        with _precision(name):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    times = {"fp32": [], "bf16": []}
    for name in times:  # warm-up: first-call allocations and oneDNN's kernel choice
        step(name)
    for r in range(rounds):
        for name in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
            times[name].append(step(name))
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    return {
        "preset": preset,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "fp32_ms": ms["fp32"],
        "bf16_ms": ms["bf16"],
        "speedup": ms["fp32"] / ms["bf16"],
        "loss_rel_diff": abs(losses["bf16"] - losses["fp32"]) / losses["fp32"],
        "cpu_bf16": cpu_has_bf16(),
        "threads": torch.get_num_threads(),
        "batch": f"{BATCH} x ({SRC} + {TGT})",
    }


def run(quick: bool = True, out_dir=None) -> list[dict]:
    presets = ["t5-tiny", "t5-mini"] + ([] if quick else ["t5-v1_1-small"])
    rows = []
    for preset in presets:
        rows.append(_case(preset, rounds=4 if quick else 8))
        print(format_table(rows[-1:], COLUMNS).splitlines()[-1], flush=True)
        save("cpu_precision", rows, out_dir=out_dir, device="cpu")  # a run cut short keeps its finished cases
    print(format_table(rows, COLUMNS))
    return rows


if __name__ == "__main__":
    main(run, __doc__)
