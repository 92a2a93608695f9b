"""Training-step tokens/s of Hugging Face models, unpatched vs ff.integrations.patch_hf_model.

    python bench/bench_hf_patch.py [--full]

Cases (GPU, bf16 autocast, fp32 weights): BERT-base MLM at seq 128 and 512 (padded batches: lengths
uniform in [L/2, L], 15 % of real tokens labelled), T5-base span-corruption-shaped batches (input 512,
target 114, some padding on both). On CPU: the same shapes of tiny models (quick) so the script runs
anywhere; the CPU providers are the eager/reference paths (never the Triton interpreter).

Providers, all on the same batches and the same initial weights:
  hf      + torch AdamW   the unpatched model (transformers' default attention, "sdpa")
  hf      + FusedAdamW
  ff      + torch AdamW   patched (fused attention / T5 attention / linear cross-entropy)
  ff      + FusedAdamW
  ff-varlen + FusedAdamW  (BERT only) patched with varlen=True: unpadded self-attention
tokens/s counts real (non-padding) tokens: encoder tokens for BERT, encoder + decoder tokens for T5.
"""

from __future__ import annotations

import copy
import pathlib
import sys
import traceback

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from harness import format_table, main, peak_extra_bytes, save, sync, time_ms

import fastformer as ff


def _bert_config(tiny: bool):
    from transformers import BertConfig

    if tiny:
        return BertConfig(
            vocab_size=1003,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
        )
    return BertConfig()  # bert-base-uncased shapes: 12 x 768, 12 heads, vocab 30522


def _t5_config(tiny: bool):
    from transformers import T5Config

    if tiny:
        return T5Config(
            vocab_size=1003,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            decoder_start_token_id=0,
            pad_token_id=0,
        )
    return T5Config(
        vocab_size=32128,
        d_model=768,
        d_kv=64,
        d_ff=3072,
        num_layers=12,
        num_heads=12,
        decoder_start_token_id=0,
        pad_token_id=0,
    )  # the original T5 base shapes (HF t5-base)


def _bert_batch(b, length, vocab, device, gen):
    lengths = torch.randint(length // 2, length + 1, (b,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (b, length), generator=gen).masked_fill(mask == 0, 0)
    pick = (torch.rand(b, length, generator=gen) < 0.15) & (mask == 1)
    labels = torch.full((b, length), -100).masked_scatter(pick, ids[pick])
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, int(mask.sum())


def _t5_batch(b, lin, lout, vocab, device, gen):
    lin_real = torch.randint(lin * 3 // 4, lin + 1, (b,), generator=gen)
    lout_real = torch.randint(lout * 3 // 4, lout + 1, (b,), generator=gen)
    lin_real[0], lout_real[0] = lin, lout
    mask = (torch.arange(lin)[None, :] < lin_real[:, None]).long()
    ids = torch.randint(2, vocab, (b, lin), generator=gen).masked_fill(mask == 0, 0)
    labels = torch.randint(2, vocab, (b, lout), generator=gen)
    labels = labels.masked_fill(torch.arange(lout)[None, :] >= lout_real[:, None], -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}, int(mask.sum() + (labels != -100).sum())


def _cases(quick: bool, on_gpu: bool):
    """(name, model kind, seq_len, builder of (batch, tokens)) per case."""
    tiny = not on_gpu
    if on_gpu:
        shapes = [
            ("bert", 128, 32 if quick else 64),
            ("bert", 512, 8 if quick else 16),
            ("t5", 512, 8 if quick else 16),
        ]
    else:
        shapes = [("bert", 64, 4), ("bert", 128, 2), ("t5", 128, 2)]
    out = []
    for kind, length, b in shapes:
        if kind == "bert":
            out.append(
                (
                    f"bert{'-tiny' if tiny else '-base'} mlm L={length} B={b}",
                    kind,
                    length,
                    b,
                    lambda dev, g, b=b, length=length: _bert_batch(b, length, 1003 if tiny else 30522, dev, g),
                )
            )
        else:
            lout = 114 if length == 512 else 32
            out.append(
                (
                    f"t5{'-tiny' if tiny else '-base'} span L={length}/{lout} B={b}",
                    kind,
                    length,
                    b,
                    lambda dev, g, b=b, length=length, lout=lout: _t5_batch(
                        b, length, lout, 1003 if tiny else 32128, dev, g
                    ),
                )
            )
    return out


def _providers(kind: str):
    rows = [("hf", "torch.AdamW"), ("hf", "ff.FusedAdamW"), ("ff", "torch.AdamW"), ("ff", "ff.FusedAdamW")]
    if kind == "bert":
        rows.append(("ff-varlen", "ff.FusedAdamW"))
    return rows


def _speedups(rows: list[dict]) -> None:
    """speedup_vs_hf on each row: its tokens/s over the plain Hugging Face model's in the same case."""
    for case in dict.fromkeys(r["case"] for r in rows):
        group = [r for r in rows if r["case"] == case]
        base_tps = next((r.get("tokens_per_s") for r in group if r["provider"] == "hf + torch.AdamW"), None)
        for r in group:
            if base_tps and r.get("tokens_per_s"):
                r["speedup_vs_hf"] = r["tokens_per_s"] / base_tps


def run(quick: bool = True, out_dir: pathlib.Path | None = None) -> list[dict]:
    from transformers import BertForMaskedLM, T5ForConditionalGeneration

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")
    amp = torch.bfloat16 if on_gpu else None
    rows = []
    for case, kind, length, b, make_batch in _cases(quick, on_gpu):
        torch.manual_seed(0)
        with torch.device(device):
            base = (
                BertForMaskedLM(_bert_config(not on_gpu))
                if kind == "bert"
                else T5ForConditionalGeneration(_t5_config(not on_gpu))
            )
        base.train()
        batch, tokens = make_batch(device, torch.Generator().manual_seed(1))
        for model_kind, opt_kind in _providers(kind):
            provider = f"{model_kind} + {opt_kind}"
            row = {
                "benchmark": "hf_patch",
                "case": case,
                "provider": provider,
                "model": kind,
                "seq_len": length,
                "batch": b,
                "tokens_per_step": tokens,
            }
            model = opt = None
            try:
                model = copy.deepcopy(base)
                if model_kind != "hf":
                    ff.integrations.patch_hf_model(model, varlen=model_kind == "ff-varlen")
                opt_cls = torch.optim.AdamW if opt_kind == "torch.AdamW" else ff.optim.FusedAdamW
                opt = opt_cls(model.parameters(), lr=1e-5, weight_decay=0.01)

                def step():
                    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = model(**batch).loss
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    return loss

                model.eval()  # no dropout: the same weights and batch give the same loss everywhere
                with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    row["first_loss"] = model(**batch).loss.item()
                model.train()
                ms = time_ms(step, warmup=200 if quick else 500, rep=600 if quick else 2000, device=device, cpu_reps=5)
                row["ms"] = ms
                row["tokens_per_s"] = tokens / (ms * 1e-3)
                if on_gpu:
                    row["peak_GB"] = peak_extra_bytes(step, device=device) / 1e9  # CUDA: never None
            except Exception as exc:  # noqa: BLE001 - record and go on with the next provider
                traceback.print_exc()
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                model = opt = None  # release them before the next case
                if on_gpu:
                    sync()
                    torch.cuda.empty_cache()
            rows.append(row)
            # after every provider: a run cut short keeps what it finished
            _speedups(rows)
            save(
                "hf_patch",
                rows,
                out_dir=out_dir,
                device=device,
                x="seq_len",
                y="tokens_per_s",
                series=("model", "provider"),
                title=None,
            )
        del base
    print(
        format_table(
            rows, ["case", "provider", "ms", "tokens_per_s", "speedup_vs_hf", "peak_GB", "first_loss", "error"]
        )
    )
    return [
        {
            k: r.get(k)
            for k in ("benchmark", "case", "provider", "tokens_per_s", "speedup_vs_hf", "error")
            if r.get(k) is not None
        }
        for r in rows
    ]


if __name__ == "__main__":
    main(run, __doc__)
