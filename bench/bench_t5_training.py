"""Tokens/s of a span-corruption training step: fastformer T5 vs Hugging Face T5ForConditionalGeneration.

    python bench/bench_t5_training.py [--full] [--out DIR]

Both models have the same T5 v1.1 shape (HF built from a local T5Config, untied LM head, nothing
downloaded), start from the same weights, and train on the same span-corrupted batches (synthetic
token streams through fastformer's collator). A step = forward + backward + optimizer step.

    fastformer          fastformer model (ff attention ops, linear-cross-entropy head) + ff.optim.FusedAdamW
    fastformer_torchopt fastformer model + torch.optim.AdamW (isolates the model from the optimizer)
    hf                  HF T5ForConditionalGeneration + torch.optim.AdamW

GPU: t5-v1_1-base, input 512 (targets 114), bf16 autocast with fp32 weights, no dropout (pre-training).
CPU: t5-tiny, fp32, small batch, twice: without dropout (pre-training) and with dropout 0.1 (the fine-tuning
setting, which takes the models' CPU training path with one-pass dropout).
tokens/s counts encoder input tokens (the objective's `input_tokens`); the median step time is used.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import format_table, main, save, sync

import fastformer as ff
from fastformer.data.span_corruption import SpanCorruptionCollator, span_corruption_lengths
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration

VOCAB = 32128
NUM_SENTINELS = 100


def _batches(n, batch_size, seq_len, device, seed=0):
    """n span-corruption batches of packed raw chunks (synthetic ids), on `device`."""
    raw, _ = span_corruption_lengths(seq_len)
    g = torch.Generator().manual_seed(seed)
    sentinels = list(range(VOCAB - 1, VOCAB - 1 - NUM_SENTINELS, -1))
    coll = SpanCorruptionCollator(sentinels, pad_id=0, eos_id=1, pad_to_multiple_of=8)
    out = []
    for _ in range(n):
        examples = [torch.randint(3, VOCAB - NUM_SENTINELS, (raw,), generator=g) for _ in range(batch_size)]
        out.append({k: v.to(device) for k, v in coll(examples, g).items()})
    return out


def _hf_model(cfg: T5Config):
    import transformers

    hcfg = transformers.T5Config(
        vocab_size=cfg.vocab_size,
        d_model=cfg.d_model,
        d_ff=cfg.d_ff,
        d_kv=cfg.d_kv,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_decoder_layers,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=cfg.dropout_rate,
        relative_attention_num_buckets=cfg.relative_attention_num_buckets,
        relative_attention_max_distance=cfg.relative_attention_max_distance,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = transformers.T5ForConditionalGeneration(hcfg)
    # T5 v1.1 has an untied head; transformers 5.x ties it whatever the config says: untie for the same size.
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model


def _measure(step, batches, warmup, steps, device):
    for i in range(warmup):
        step(batches[i % len(batches)])
    sync(device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        loss = step(batches[(warmup + i) % len(batches)])
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), float(loss)


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        preset, seq_len, batch_size = "t5-v1_1-base", 512, (16 if quick else 32)
        warmup, steps = (3, 8) if quick else (5, 30)
        amp = torch.bfloat16
    else:
        preset, seq_len, batch_size = "t5-tiny", 128, 8
        warmup, steps = (2, 5) if quick else (3, 20)
        amp = None
    dropouts = (0.0,) if cuda else (0.0, 0.1)
    batches = _batches(warmup + steps, batch_size, seq_len, device)
    in_tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    torch.manual_seed(0)
    # the same starting weights for every provider and case (dropout has no weights)
    init_state = T5ForConditionalGeneration(T5Config.from_preset(preset, vocab_size=VOCAB)).state_dict()

    def autocast():
        return torch.autocast(device.type, dtype=amp) if amp is not None else torch.autocast(device.type, enabled=False)

    rows = []
    cases = [(p, provider) for p in dropouts for provider in ("fastformer", "fastformer_torchopt", "hf")]
    for dropout, provider in cases:
        cfg = T5Config.from_preset(preset, vocab_size=VOCAB, dropout_rate=dropout)
        row = {
            "benchmark": "t5_training",
            "case": f"{preset} in={seq_len} B={batch_size} dropout={dropout:g}",
            "provider": provider,
            "preset": preset,
            "seq_len": seq_len,
            "batch_size": batch_size,
            "dropout": dropout,
            "dtype": "bf16-autocast" if amp is not None else "fp32",
        }
        model = opt = None
        try:
            if provider == "hf":
                model = _hf_model(cfg)
                row["hf_attn"] = getattr(model.config, "_attn_implementation", None)
            else:
                model = T5ForConditionalGeneration(cfg)
            missing, unexpected = model.load_state_dict(init_state, strict=False)
            if missing or unexpected:
                raise RuntimeError(f"weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
            model.to(device).train()
            params = list(model.parameters())
            if provider == "fastformer":
                opt = ff.optim.FusedAdamW(params, lr=1e-4, weight_decay=0.0)
            else:
                opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
            row["optimizer"] = type(opt).__module__ + "." + type(opt).__name__

            if provider == "hf":

                def step(b):
                    with autocast():
                        loss = model(
                            input_ids=b["input_ids"],
                            attention_mask=b["attention_mask"],
                            decoder_input_ids=b["decoder_input_ids"],
                            labels=b["labels"],
                        ).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss.detach()
            else:

                def step(b):
                    with autocast():
                        loss = model(b["input_ids"], b["attention_mask"], b["decoder_input_ids"], b["labels"]).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss.detach()

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            sec, loss = _measure(step, batches, warmup, steps, device)
            row.update(step_ms=sec * 1e3, tokens_per_s=in_tokens / sec, last_loss=loss)
            if cuda:
                row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        except Exception as exc:  # noqa: BLE001 - one failing provider must not lose the table
            row.update(step_ms=None, tokens_per_s=None, error=f"{type(exc).__name__}: {exc}"[:300])
        rows.append(row)
        save("t5_training", rows, out_dir=out_dir, device=device)  # a run cut short keeps what it finished
        model = opt = None  # release them before the next case
        if cuda:
            torch.cuda.empty_cache()

    hf_tps = {r["case"]: r.get("tokens_per_s") for r in rows if r["provider"] == "hf"}
    for r in rows:
        ref = hf_tps.get(r["case"])
        r["x_hf"] = r["tokens_per_s"] / ref if (ref and r.get("tokens_per_s")) else None
    save("t5_training", rows, out_dir=out_dir, device=device)
    print(
        format_table(
            rows,
            [
                "provider",
                "preset",
                "seq_len",
                "batch_size",
                "dropout",
                "dtype",
                "step_ms",
                "tokens_per_s",
                "x_hf",
                "peak_mem_gb",
                "last_loss",
                "error",
            ],
        )
    )
    summaries = {}
    for r in rows:
        s = summaries.setdefault(r["case"], {"benchmark": "t5_training", "case": f"{r['case']} {r['dtype']}"})
        s[f"{r['provider']}_tok_s"] = r.get("tokens_per_s")
        if r["provider"] == "fastformer":
            s["x_hf"] = r.get("x_hf")
    return list(summaries.values())


if __name__ == "__main__":
    main(run, __doc__, print_rows=True)
