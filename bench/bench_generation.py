"""Generation tokens/s: fastformer T5 `generate` vs Hugging Face `T5ForConditionalGeneration.generate`.

    python bench/bench_generation.py [--full] [--out DIR]

Both models hold the same weights (a random T5 v1.1 model, HF's copy made by `ff.models.to_hf`,
nothing downloaded) and decode the same batch: B inputs of up to Lin tokens (a third of the rows
padded), max_new_tokens new tokens, greedy and beam search. Each row records whether the two
outputs are identical token for token. tokens/s counts generated tokens (B · steps; beam search
counts the returned sequence's tokens, not the beams').

CPU runs are noisy when the machine is shared: the two providers are timed alternately, call after
call, and `x_hf` is the median of the per-pair ratios (each pair measured back to back), beside the
median times. CPU: t5-tiny (quick) and t5-v1_1-small (--full), vocabulary 8192 (fastformer's tokenizer
default). GPU: t5-v1_1-small and t5-v1_1-base, vocabulary 32128, fp32 weights.
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

from fastformer.models.convert import to_hf
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration


def _inputs(B, L, vocab, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for i in range(0, B, 3):  # a third of the rows padded to 60-90 % of L
        n = int(L * (0.6 + 0.3 * torch.rand(1, generator=g).item()))
        mask[i, n:] = False
    ids = ids.masked_fill(~mask, 0)
    return ids.to(device), mask.to(device)


def _case(preset, vocab, B, L, T, num_beams, reps, device):
    torch.manual_seed(0)
    ours = T5ForConditionalGeneration(T5Config.from_preset(preset, vocab_size=vocab)).to(device).eval()
    hf = to_hf(ours).eval()
    ids, mask = _inputs(B, L, vocab, device)
    kw = dict(max_new_tokens=T, num_beams=num_beams, eos_token_id=1)

    def run_ours():
        return ours.generate(ids, mask, **kw)

    def run_hf():
        return hf.generate(input_ids=ids, attention_mask=mask.long(), do_sample=False, **kw)

    with torch.inference_mode():
        a, b = run_ours(), run_hf()  # warm-up, and the parity check
        same = bool(a.shape == b.shape and torch.equal(a.cpu(), b.cpu()))
        t_ours, t_hf, ratios = [], [], []
        for _ in range(reps):
            pair = []
            for fn in (run_ours, run_hf):
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                pair.append(time.perf_counter() - t0)
            t_ours.append(pair[0])
            t_hf.append(pair[1])
            ratios.append(pair[1] / pair[0])
    steps = a.shape[1] - 1
    tokens = B * steps
    row = {
        "benchmark": "generation",
        "preset": preset,
        "vocab": vocab,
        "batch": B,
        "input_len": L,
        "new_tokens": steps,
        "num_beams": num_beams,
        "decode": "greedy" if num_beams == 1 else f"beam{num_beams}",
        "same_tokens": same,
        "hf_attn": getattr(hf.config, "_attn_implementation", None),
        "ours_ms": statistics.median(t_ours) * 1e3,
        "hf_ms": statistics.median(t_hf) * 1e3,
        "x_hf": statistics.median(ratios),
        "x_hf_min": min(ratios),
        "x_hf_max": max(ratios),
        "reps": reps,
        "threads": torch.get_num_threads(),
    }
    row["ours_tok_s"] = tokens / statistics.median(t_ours)
    row["hf_tok_s"] = tokens / statistics.median(t_hf)
    return row


def run(quick: bool = True, out_dir: Path | None = None) -> list[dict]:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        cases = [("t5-v1_1-small", 32128, 16, 128, 32), ("t5-v1_1-base", 32128, 16, 128, 32)]
    else:
        cases = [("t5-tiny", 8192, 16, 64, 32)] + ([] if quick else [("t5-v1_1-small", 8192, 16, 64, 32)])
    reps = 5 if quick else 15
    rows = []
    for preset, vocab, B, L, T in cases:
        for beams in (1, 4):
            try:
                rows.append(_case(preset, vocab, B, L, T, beams, reps, device))
            except Exception as exc:  # noqa: BLE001 - one failing case must not lose the table
                rows.append(
                    {
                        "benchmark": "generation",
                        "preset": preset,
                        "num_beams": beams,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                    }
                )
            save("generation", rows, out_dir=out_dir, device=device)  # a run cut short keeps what it finished
    print(
        format_table(
            rows,
            [
                "preset",
                "decode",
                "batch",
                "input_len",
                "new_tokens",
                "same_tokens",
                "ours_ms",
                "hf_ms",
                "ours_tok_s",
                "hf_tok_s",
                "x_hf",
                "x_hf_min",
                "x_hf_max",
                "threads",
                "error",
            ],
        )
    )
    return rows


if __name__ == "__main__":
    main(run, __doc__)
