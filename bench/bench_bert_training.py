"""Tokens/s of one BERT MLM training step: fastformer vs Hugging Face BertForMaskedLM, same batches.

Providers (same model size, same vocabulary 30522, same batches, dropout on, no gradient clipping):
  fastformer   BertForMaskedLM from fastformer.models (sparse tied MLM head through
               ff.linear_cross_entropy, ff attention: unpadded varlen on CUDA) + ff.optim.FusedAdamW
  hf_eager     transformers BertForMaskedLM, attn_implementation="eager" + torch.optim.AdamW
  hf_sdpa      transformers BertForMaskedLM, attn_implementation="sdpa" + torch.optim.AdamW(fused=True)
Batch layouts: "packed" (every row full length, no padding) and "padded" (row lengths drawn uniformly
from [L/4, L], right-padded, key-padding mask). Tokens/s counts real (non-pad) tokens.
CUDA: bf16 autocast, bert-base at seq 128 and 512, MFU against the device's dense bf16 peak with
the same model-FLOPs count for every provider (6 x non-embedding params + 12 x layers x hidden x seq
+ the MLM head on 15% of tokens). CPU: bert-mini (and bert-tiny with --full), fp32, batch 16 x 128.
On CPU both models do the same matrix products in the encoder; Hugging Face's head projects all
B x L rows onto the vocabulary where fastformer projects the ~15% predicted rows, so on a packed
batch Hugging Face does about 2.5x the FLOPs; what goes beyond that comes from fewer passes over
memory (one-pass dropout, attention GEMMs on the projection's own layout, no zero-filled gradient
buffers); on the padded batch fastformer also skips the padding (unpadded layout).
CPU timing: the providers of a case are built together and timed in rounds, one step each in turn
(7 rounds, 15 with --full), so that each round compares them under the same machine load; x_vs_* is
the median of the per-round ratios (with their min and max), written to
bench_bert_training_ratios_<device>.json beside the per-provider medians.
Nothing is downloaded: the HF models are built from a local BertConfig.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import format_table, main, save, time_ms

import fastformer as ff
from fastformer.models.bert import BertConfig, BertForMaskedLM
from fastformer.models.presets import get_preset
from fastformer.train.metrics import peak_flops

VOCAB = 30522
# CPU: rounds of one step per provider, timed in turn (quick / --full)
CPU_ROUNDS, CPU_ROUNDS_FULL = 7, 15


def make_batch(B: int, L: int, layout: str, device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    if layout == "packed":
        mask = torch.ones(B, L, dtype=torch.bool)
    else:
        lens = torch.randint(L // 4, L + 1, (B,), generator=g)
        lens[0] = L
        mask = torch.arange(L)[None, :] < lens[:, None]
        ids[~mask] = 0
    labels = torch.where((torch.rand(B, L, generator=g) < 0.15) & mask, ids, torch.full_like(ids, -100))
    ids = torch.where(labels != -100, torch.full_like(ids, 4), ids)
    return {k: v.to(device) for k, v in {"input_ids": ids, "attention_mask": mask, "labels": labels}.items()}


def model_flops_per_token(p: dict, L: int) -> float:
    H, n, I = p["hidden_size"], p["num_layers"], p["intermediate_size"]
    body = n * (4 * H * H + 2 * H * I) + H * H  # + MLM transform
    return 6.0 * body + 12.0 * n * H * L + 0.15 * 6.0 * H * VOCAB


def _autocast(device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def fastformer_step(preset: dict, device, L: int, compile_backend: str | None = None):
    """compile_backend: also torch.compile the model (the fastformer ops stay opaque calls; the
    compiler fuses LayerNorm, GELU, dropout and residuals around them)."""
    cfg = BertConfig(**preset, vocab_size=VOCAB, max_position=max(512, L))
    model = BertForMaskedLM(cfg).to(device).train()
    opt = ff.optim.FusedAdamW(model.parameters(), lr=1e-4)
    fwd = torch.compile(model, backend=compile_backend) if compile_backend else model

    def step(b):
        mask = None if bool(b["attention_mask"].all()) else b["attention_mask"]
        with _autocast(device):
            loss, n, _, _ = fwd(b["input_ids"], mask, b["labels"])
        (loss / max(n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def hf_step(preset: dict, device, L: int, attn: str):
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM as HFBert

    cfg = HFConfig(
        vocab_size=VOCAB,
        hidden_size=preset["hidden_size"],
        num_hidden_layers=preset["num_layers"],
        num_attention_heads=preset["num_heads"],
        intermediate_size=preset["intermediate_size"],
        max_position_embeddings=max(512, L),
    )
    cfg._attn_implementation = attn
    model = HFBert(cfg).to(device).train()
    fused = attn == "sdpa"  # torch's fused AdamW (CUDA and CPU)
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        if fused
        else torch.optim.AdamW(model.parameters(), lr=1e-4)
    )

    def step(b):
        with _autocast(device):
            out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"].long(), labels=b["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _alternating(steps: dict, batch: dict, rounds: int) -> tuple[dict, list[dict]]:
    """CPU: one warm-up step of every provider, then `rounds` rounds of one timed step each, providers
    in turn, so every round measures them back to back under the same machine load. Returns the
    median ms per provider and the per-round times."""
    for step in steps.values():
        step(batch)
    per_round = []
    for _ in range(rounds):
        times = {}
        for name, step in steps.items():
            t0 = time.perf_counter()
            step(batch)
            times[name] = (time.perf_counter() - t0) * 1e3
        per_round.append(times)
    return {name: statistics.median(r[name] for r in per_round) for name in steps}, per_round


def _make_step(prov: str, preset: dict, device, L: int, compile_backend):
    torch.manual_seed(0)
    if prov.startswith("fastformer"):
        return fastformer_step(preset, device, L, compile_backend if prov == "fastformer_compiled" else None)
    return hf_step(preset, device, L, prov.split("_")[1])


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        cases = [("bert-base", 128, 64), ("bert-base", 512, 16)]
        providers = ["fastformer", "hf_eager", "hf_sdpa"]
    else:
        cases = ([] if quick else [("bert-tiny", 128, 16)]) + [("bert-mini", 128, 16)]
        providers = ["fastformer", "hf_eager", "hf_sdpa"]
    # fastformer + torch.compile of the rest of the model: compiling takes about a minute per shape, so
    # on a GPU the quick run compiles the first shape only (BENCH_COMPILE=inductor, or =eager to check the
    # plumbing on CPU, asks for it everywhere)
    compile_backend = os.environ.get("BENCH_COMPILE") or ("inductor" if device.type == "cuda" else "")
    compile_everywhere = bool(os.environ.get("BENCH_COMPILE")) or not quick
    peak = peak_flops(device)
    rows, summary = [], []
    for name, L, B in cases:
        preset = get_preset(name)
        fpt = model_flops_per_token(preset, L)
        for layout in ("packed", "padded"):
            batch = make_batch(B, L, layout, device)
            tokens = int(batch["attention_mask"].sum())
            case = f"{name} L={L} B={B} {layout}"
            res = {}
            first = not rows
            with_compiled = compile_backend and (compile_everywhere or first)
            case_providers = providers + (["fastformer_compiled"] if with_compiled else [])
            pairs = {}
            if device.type == "cpu":  # alternating rounds: per-round ratios under the same load
                steps = {prov: _make_step(prov, preset, device, L, compile_backend) for prov in case_providers}
                cpu_ms, per_round = _alternating(steps, batch, CPU_ROUNDS if quick else CPU_ROUNDS_FULL)
                steps = None
                for k in ("hf_eager", "hf_sdpa"):
                    ratios = sorted(r[k] / r["fastformer"] for r in per_round)
                    pairs[k] = (statistics.median(ratios), ratios[0], ratios[-1], len(ratios))
            for prov in case_providers:
                row = {
                    "benchmark": "bert_training",
                    "case": case,
                    "provider": prov,
                    "model": name,
                    "seq_len": L,
                    "batch": B,
                    "layout": layout,
                    "tokens": tokens,
                }
                try:
                    if device.type == "cpu":
                        ms = cpu_ms[prov]
                    else:
                        step = _make_step(prov, preset, device, L, compile_backend)
                        ms = time_ms(lambda: step(batch), device=device, warmup=100, rep=300)
                    row.update(ms=ms, tokens_per_s=tokens / (ms * 1e-3))
                    if peak:
                        row["mfu"] = row["tokens_per_s"] * fpt / peak
                    res[prov] = row["tokens_per_s"]
                except Exception as e:  # noqa: BLE001 - one failing provider must not lose the table
                    row["error"] = f"{type(e).__name__}: {e}"[:200]
                rows.append(row)
                step = None  # release the model before the next case
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            best_hf = max([v for k, v in res.items() if not k.startswith("fastformer")], default=None)
            s = {"benchmark": "bert_training", "case": case}
            for k, v in res.items():
                s[f"{k}_tok_s"] = v
            if "fastformer" in res:
                for k in ("hf_eager", "hf_sdpa"):
                    if k in pairs:  # CPU: the median of the per-round ratios, and their range
                        s[f"x_vs_{k}"], s[f"x_vs_{k}_min"], s[f"x_vs_{k}_max"], s["rounds"] = pairs[k]
                    elif k in res:
                        s[f"x_vs_{k}"] = res["fastformer"] / res[k]
                        if "fastformer_compiled" in res:
                            s[f"compiled_x_vs_{k}"] = res["fastformer_compiled"] / res[k]
                if best_hf:
                    s["ratio_to_best_ref"] = res["fastformer"] / best_hf
                if peak:
                    s["fastformer_mfu"] = next(
                        r["mfu"] for r in rows if r["case"] == case and r["provider"] == "fastformer" and "mfu" in r
                    )
            summary.append(s)
            # after every case: a run cut short keeps these
            for r in rows:
                r["x"] = f"{r['model']}/{r['seq_len']}/{r['layout']}"
            save(
                "bench_bert_training",
                rows,
                out_dir=out_dir,
                device=device,
                x="x",
                y="tokens_per_s",
                title="BERT MLM training step, tokens/s",
            )
            save("bench_bert_training_ratios", summary, out_dir=out_dir, device=device)
    print(format_table(rows, ["case", "provider", "ms", "tokens_per_s", "mfu", "error"]))
    return summary


if __name__ == "__main__":
    main(run, __doc__, print_rows=True)
