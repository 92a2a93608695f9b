"""The training CLI's peak-memory estimate against the measured peak of one training step (CPU).

    OMP_NUM_THREADS=1 python bench/memory_estimate.py                 # the default table
    OMP_NUM_THREADS=1 python bench/memory_estimate.py bert-mini:8:512 t5-tiny:4:1024

The rows are also saved as bench/results/memory_estimate_<device>.json (`--out DIR` elsewhere).

Each case runs in a fresh process: build the pre-training model (vocabulary 8192), then one forward +
backward + FusedAdamW step on random token ids; "measured" is the growth of the process's peak RSS
(ru_maxrss) over that step, which covers gradients, optimizer state and activations. "estimated" is
`fastformer.train.resources.estimate_memory` for the same model, micro-batch and length (weights
counted only for gradients + optimizer, as the weights exist before the step).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py

CASES = [
    "bert-tiny:8:128",
    "bert-tiny:8:512",
    "bert-tiny:8:1024",
    "bert-tiny:2:2048",
    "bert-mini:8:512",
    "t5-tiny:8:128",
    "t5-tiny:8:512",
    "t5-tiny:4:1024",
]

CHILD = r"""
import json, resource, sys, torch
import fastformer as ff
from fastformer.data.span_corruption import span_corruption_lengths
from fastformer.models.bert import BertConfig, BertForMaskedLM
from fastformer.models.presets import get_preset
from fastformer.train.resources import estimate_memory

preset, B, L = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
V = 8192
torch.manual_seed(0)
if preset.startswith("bert"):
    m = BertForMaskedLM(BertConfig.from_dict({**get_preset(preset), "vocab_size": V, "max_position": max(512, L)}))
    ids = torch.randint(5, V, (B, L))
    labels = torch.where(torch.rand(B, L) < 0.15, ids, torch.full_like(ids, -100))
    target, rows = 0, 0.15 * B * L
    def step():
        loss, n, _, _ = m(ids, None, labels)
        (loss / n).backward()
else:
    from fastformer.models.t5 import T5Config, T5ForConditionalGeneration
    m = T5ForConditionalGeneration(T5Config.from_preset(preset, vocab_size=V))
    target = span_corruption_lengths(L)[1]
    ids, labels, rows = torch.randint(5, V, (B, L)), torch.randint(5, V, (B, target)), B * target
    def step():
        m(ids, None, None, labels).loss.backward()
opt = ff.optim.FusedAdamW(m.parameters(), lr=1e-4)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
step(); opt.step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
est = estimate_memory(m, batch_size=B, seq_len=L, target_len=target, head_rows=rows, device=torch.device("cpu"))
n = sum(p.numel() for p in m.parameters())
print(json.dumps({"measured_mb": (after - before) / 1024, "estimated_mb": (est.total - 4 * n) / 2**20}))
"""


def _case(text: str) -> tuple[str, int, int]:
    """'preset:batch:length' -> (preset, batch, length); argparse turns a ValueError into a usage error."""
    preset, b, length = text.split(":")
    return preset, int(b), int(length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", type=_case, metavar="PRESET:BATCH:LENGTH", help="default: the table's cases")
    ap.add_argument("--out", default=None, help="folder for the JSON results (default bench/results)")
    args = ap.parse_args()
    rows = []
    print("| model | batch × length | measured MB | estimated MB | estimated / measured |")
    print("|---|---|---|---|---|")
    for preset, b, length in args.cases or [_case(c) for c in CASES]:
        r = subprocess.run([sys.executable, "-c", CHILD, preset, str(b), str(length)], capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(r.stderr[-2000:])
        d = json.loads(r.stdout.strip().splitlines()[-1])
        ratio = d["estimated_mb"] / d["measured_mb"]
        rows.append({"case": f"{preset} {b} x {length}", **d, "estimated_over_measured": ratio})
        print(
            f"| {preset} | {b} × {length} | {d['measured_mb']:.0f} | {d['estimated_mb']:.0f} | {ratio:.2f} |",
            flush=True,
        )
    from harness import save

    path, _ = save("memory_estimate", rows, out_dir=Path(args.out) if args.out else None, device="cpu")
    print(f"saved {path}")


if __name__ == "__main__":
    main()
