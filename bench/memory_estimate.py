"""The training CLI's peak-memory estimate against the measured peak of one training step (CPU).

    OMP_NUM_THREADS=1 python bench/memory_estimate.py                 # the default table
    OMP_NUM_THREADS=1 python bench/memory_estimate.py bert-mini:8:512 t5-tiny:4:1024

The rows are also saved as bench/results/memory_estimate_<device>.json (`--out DIR` elsewhere), after
every case. A case is checked before anything runs (exit 2: an unknown preset, a batch or length below
1); a case whose process fails is a row with its error, and the run exits 1 after the others.

Each case runs in a fresh process: build the pre-training model (vocabulary 8192), then one forward +
backward + FusedAdamW step on random token ids; "measured" is the growth of the process's peak RSS
(ru_maxrss) over that step, which covers gradients, optimizer state and activations. "estimated" is
`fastformer.train.resources.estimate_memory` for the same model, micro-batch and length (weights
counted only for gradients + optimizer, as the weights exist before the step).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py, cli_paths.py

from cli_paths import out_folder

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
    """'preset:batch:length' -> (preset, batch, length). Raises ValueError with the reason: a case is
    checked before any runs, so that a typo does not surface as a child's traceback after minutes."""
    from fastformer.data.span_corruption import span_corruption_lengths
    from fastformer.models.presets import DEPRECATED_PRESETS, known_presets

    parts = text.split(":")
    if len(parts) != 3 or not all(re.fullmatch(r"\s*-?[0-9]+\s*", x) for x in parts[1:]):  # ASCII digits
        raise ValueError("give PRESET:BATCH:LENGTH, e.g. bert-tiny:8:128")
    preset, b, length = parts[0], int(parts[1]), int(parts[2])
    if preset not in known_presets() and preset not in DEPRECATED_PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(known_presets())})")
    if b < 1 or length < 1:
        raise ValueError("the batch and the length must be at least 1")
    if not preset.startswith("bert"):
        span_corruption_lengths(length)  # the T5 case's target length; too short an input raises
    return preset, b, length


def _measure(preset: str, b: int, length: int) -> dict:
    """measured_mb and estimated_mb of one case from a fresh process, or error: the child's last line."""
    r = subprocess.run([sys.executable, "-c", CHILD, preset, str(b), str(length)], capture_output=True, text=True)
    lines = (r.stdout if r.returncode == 0 else r.stderr).strip().splitlines()
    if r.returncode != 0 or not lines:
        return {"error": (lines[-1] if lines else f"exit status {r.returncode}")[:300]}
    return json.loads(lines[-1])


def run(quick: bool = True, out_dir: Path | None = None, cases: list | None = None) -> list[dict]:
    """The table of the given cases (default CASES; `quick` changes nothing), saved after every case so
    that a case that fails or a run that is stopped keeps the rows before it."""
    from harness import save

    rows = []
    print("| model | batch × length | measured MB | estimated MB | estimated / measured |")
    print("|---|---|---|---|---|")
    for preset, b, length in cases or [_case(c) for c in CASES]:
        d = _measure(preset, b, length)
        row = {"case": f"{preset} {b} x {length}", **d}
        if "error" in d:
            print(f"| {preset} | {b} × {length} | failed: {d['error']} | | |", flush=True)
        else:
            row["estimated_over_measured"] = d["estimated_mb"] / d["measured_mb"]
            print(
                f"| {preset} | {b} × {length} | {d['measured_mb']:.0f} | {d['estimated_mb']:.0f} | "
                f"{row['estimated_over_measured']:.2f} |",
                flush=True,
            )
        rows.append(row)
        path, _ = save("memory_estimate", rows, out_dir=out_dir, device="cpu")
    print(f"saved {path}")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cases", nargs="*", metavar="PRESET:BATCH:LENGTH", help="default: the table's cases")
    ap.add_argument("--out", type=out_folder, default=None, help="folder for the JSON results (default bench/results)")
    args = ap.parse_args(argv)
    cases = []
    for text in args.cases:
        try:
            cases.append(_case(text))
        except ValueError as e:
            print(f"memory_estimate: {text}: {e}", file=sys.stderr)
            return 2
    rows = run(out_dir=args.out, cases=cases)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
