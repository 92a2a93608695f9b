"""T5 relative-position attention, forward + backward with the bias table requiring grad.

    python bench/bench_t5_attention.py [--full] [--out DIR]

Shapes: T5-base-like heads (H=12, D=64), B·L = 8192 tokens, L = 512 … 4096, encoder (bidirectional
buckets) and decoder (causal, unidirectional buckets). Providers, all measured in the same run:

    fastformer    ff.t5_attention: bucket and bias inside the kernel, deterministic table gradient
    eager         T5 as Hugging Face writes it: bias = table[bucket] materialised (1, H, L, L), matmul-softmax-matmul
    sdpa_bias     torch SDPA with that materialised float bias (requires grad through the gather)
    flex          FlexAttention (compiled) with a score_mod that reads the table (--full only: it
                  compiles per shape)
    ff_plain      ff.scaled_dot_product_attention on the same shape, no bias (the ceiling to compare against)

Reported: ms (median), TFLOP/s (fwd+bwd = 3.5 × forward's 4·B·H·Lq·Lk·D, halved for causal) and the
extra peak memory of one fwd+bwd. On CPU the shapes are tiny and only the eager/reference paths run
(no Triton interpreter timing, no compilation).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import format_table, main, megabytes, peak_extra_bytes, save, time_ms

import fastformer as ff

NUM_BUCKETS, MAX_DISTANCE = 32, 128
# FlexAttention's default kernel configs do not fit in shared memory once the score_mod's captured
# table needs a gradient (seen on H200, torch 2.11: "out of resource ... Required: 245760 Hardware limit:
# 232448"); num_stages=1 compiles there. The default is tried first, the fallback kept once needed.
FLEX_OPTIONS = {"current": None, "fallbacks": [{"num_stages": 1}]}
PROVIDERS = ("fastformer", "eager", "sdpa_bias", "flex", "ff_plain")


def providers_for(quick: bool) -> tuple:
    """FlexAttention compiles per shape (tens of seconds to minutes): full runs only."""
    return PROVIDERS if not quick else tuple(p for p in PROVIDERS if p != "flex")


def _bucket(rel: torch.Tensor, bidirectional: bool) -> torch.Tensor:
    """Hugging Face T5's own bucket function (transformers is a test/bench dependency)."""
    from transformers.models.t5.modeling_t5 import T5Attention

    return T5Attention._relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=NUM_BUCKETS, max_distance=MAX_DISTANCE
    )


def _flops(b, h, lq, lk, d, causal):
    fwd = 4.0 * b * h * lq * lk * d
    return 3.5 * fwd * (0.5 if causal else 1.0)


def _make_fn(provider, q, k, v, table, dout, causal, compiled_flex):
    """A closure running one forward + backward, returning the gradients (table included when used)."""
    lq, lk = q.shape[-2], k.shape[-2]
    bidirectional = not causal
    rel = torch.arange(lk, device=q.device)[None, :] - torch.arange(lq, device=q.device)[:, None]
    bucket = _bucket(rel, bidirectional)  # (Lq, Lk), built once
    causal_block = torch.ones(lq, lk, dtype=torch.bool, device=q.device).triu(1) if causal else None

    def materialised_bias():
        bias = table[bucket].permute(2, 0, 1)[None]  # (1, H, Lq, Lk)
        if causal:
            bias = bias.masked_fill(causal_block, float("-inf"))
        return bias

    if provider == "fastformer":

        def forward():
            return ff.t5_attention(
                q,
                k,
                v,
                table,
                bidirectional=bidirectional,
                num_buckets=NUM_BUCKETS,
                max_distance=MAX_DISTANCE,
                is_causal=causal,
                scale=1.0,
            )

        inputs = (q, k, v, table)
    elif provider == "eager":

        def forward():
            scores = q @ k.transpose(-1, -2) + materialised_bias().to(q.dtype)
            return torch.softmax(scores.float(), -1).to(q.dtype) @ v

        inputs = (q, k, v, table)
    elif provider == "sdpa_bias":

        def forward():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=materialised_bias().to(q.dtype), scale=1.0)

        inputs = (q, k, v, table)
    elif provider == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        # bucket of every relative distance j - i in [-(Lq-1), Lk-1], indexed by j - i + Lq - 1
        rel_bucket = _bucket(torch.arange(-(lq - 1), lk, device=q.device), bidirectional)

        def score_mod(score, b, h, q_idx, kv_idx):
            return score + table[rel_bucket[kv_idx - q_idx + lq - 1], h].to(score.dtype)

        block_mask = None
        if causal:
            block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, lq, lk, device=q.device)
        fn = compiled_flex

        def forward():
            return fn(
                q, k, v, score_mod=score_mod, block_mask=block_mask, scale=1.0, kernel_options=FLEX_OPTIONS["current"]
            )

        inputs = (q, k, v, table)
    elif provider == "ff_plain":

        def forward():
            return ff.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=1.0)

        inputs = (q, k, v)
    else:
        raise ValueError(f"provider {provider!r}")

    def step():
        out = forward()
        return torch.autograd.grad(out, inputs, dout)

    return step


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    H, D = 12, 64
    if cuda:
        cases = (
            [("encoder", 1024), ("encoder", 4096), ("decoder", 4096)]
            if quick
            else [(m, L) for m in ("encoder", "decoder") for L in (512, 1024, 2048, 4096)]
        )
        tokens = 8192
    else:  # tiny CPU shapes: proves the script runs; eager/reference paths only
        cases = (
            [("encoder", 128), ("decoder", 128)]
            if quick
            else [(m, L) for m in ("encoder", "decoder") for L in (128, 256)]
        )
        tokens = 256
    compiled_flex = None
    providers = providers_for(quick)
    if cuda and not quick:
        try:
            from torch.nn.attention.flex_attention import flex_attention

            compiled_flex = torch.compile(flex_attention, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - recorded per row below
            print(f"[bench_t5_attention] FlexAttention unavailable: {exc}")

    rows, summary = [], []
    for mode, L in cases:
        causal = mode == "decoder"
        B = max(1, tokens // L)
        q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        table = (0.5 * torch.randn(NUM_BUCKETS, H, device=device, dtype=torch.float32)).requires_grad_()
        dout = torch.randn(B, H, L, D, device=device, dtype=dtype)
        flops = _flops(B, H, L, L, D, causal)
        case_rows = {}
        for provider in providers:
            row = {
                "benchmark": "t5_attention",
                "case": f"{mode} L={L} B={B}",
                "mode": mode,
                "L": L,
                "B": B,
                "H": H,
                "D": D,
                "dtype": str(dtype).replace("torch.", ""),
                "provider": provider,
            }
            try:
                if provider == "flex" and compiled_flex is None:
                    raise RuntimeError("FlexAttention needs CUDA here (not compiled on CPU)")
                fn = _make_fn(provider, q, k, v, table, dout, causal, compiled_flex)
                while True:
                    try:
                        fn()  # compile / warm up outside the timing
                        break
                    except Exception:
                        if provider != "flex" or not FLEX_OPTIONS["fallbacks"]:
                            raise
                        FLEX_OPTIONS["current"] = FLEX_OPTIONS["fallbacks"].pop(0)
                        torch._dynamo.reset()
                if provider == "flex":
                    row["flex_kernel_options"] = str(FLEX_OPTIONS["current"] or "default")
                ms = time_ms(fn, device=device)
                row.update(
                    ms=ms,
                    tflops=flops / (ms * 1e-3) / 1e12,
                    peak_extra_mb=megabytes(peak_extra_bytes(fn, device=device)),
                )
            except Exception as exc:  # noqa: BLE001 - one failing provider must not lose the table
                row.update(ms=None, tflops=None, peak_extra_mb=None, error=f"{type(exc).__name__}: {exc}"[:300])
            rows.append(row)
            case_rows[provider] = row
            if cuda:
                torch.cuda.empty_cache()
        ref = [case_rows[p]["ms"] for p in ("eager", "sdpa_bias", "flex") if case_rows.get(p, {}).get("ms")]
        mine, plain = case_rows["fastformer"].get("ms"), case_rows["ff_plain"].get("ms")
        s = {"benchmark": "t5_attention", "case": f"{mode} L={L} B={B} {row['dtype']}"}
        for p in providers:
            s[f"{p}_tflops"] = case_rows[p].get("tflops")
        s["fastformer_mb"] = case_rows["fastformer"].get("peak_extra_mb")
        s["eager_mb"] = case_rows["eager"].get("peak_extra_mb")
        if mine:
            s["x_best_ref"] = min(ref) / mine if ref else None
            s["x_flex"] = case_rows["flex"]["ms"] / mine if case_rows.get("flex", {}).get("ms") else None
            s["x_eager"] = case_rows["eager"]["ms"] / mine if case_rows["eager"].get("ms") else None
            s["frac_of_plain"] = plain / mine if plain else None
        summary.append(s)
        del q, k, v, table, dout
        # after every case: a run cut short keeps the cases it finished
        save(
            "t5_attention",
            rows + [dict(r, summary=True) for r in summary],
            out_dir=out_dir,
            device=device,
            x="L",
            y="tflops",
            series=("mode", "provider"),
            logx=True,
            title=None,
        )
    print(format_table(rows, ["mode", "L", "B", "provider", "ms", "tflops", "peak_extra_mb", "error"]))
    print(format_table(summary, ["case", "x_best_ref", "x_eager", "x_flex", "frac_of_plain"]))
    return summary


if __name__ == "__main__":
    main(run, __doc__, print_rows=True)
