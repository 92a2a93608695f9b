"""CPU dispatch: what backend "auto" runs on CPU tensors against the eager reference, same run.

    python bench/bench_cpu_dispatch.py [--full]

Forward + backward of each op on CPU tensors, timed with backend "auto" (torch's own fused CPU kernels
where fastformer uses them: SDPA for scaled_dot_product_attention, t5_attention with the bias as a
float mask when the table is frozen, varlen_attention per sequence; cross_entropy the extension's
row kernel, csrc/cross_entropy_cpu.cpp) and backend "reference" (the eager spec; for cross_entropy,
torch's own cross_entropy).
Shapes: a bert-mini attention batch
(B=16, H=4, L=128, D=64), T5 with its bias table, a packed varlen batch, CE at N=2048, V=30522.
Reports the median ms of each and the speedup reference / auto; the two backends are timed in
alternating rounds so that a changing machine load hits both alike. Compare the two columns of one
run, not runs with each other.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness import format_table, main, save, time_ms

import fastformer as ff


def _cases(quick: bool):
    B, H, L, D = 16, 4, 128, 64
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(True)

    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16):
        q, k, v = leaf(B, H, L, D, dtype=dtype), leaf(B, H, L, D, dtype=dtype), leaf(B, H, L, D, dtype=dtype)
        kpm = torch.ones(B, 1, 1, L, dtype=torch.bool)
        kpm[::2, ..., 96:] = False
        name = str(dtype).replace("torch.", "")
        yield f"sdpa {name}", lambda q=q, k=k, v=v: ff.scaled_dot_product_attention(q, k, v)
        yield f"sdpa key-padding {name}", lambda q=q, k=k, v=v: ff.scaled_dot_product_attention(q, k, v, attn_mask=kpm)
        yield f"sdpa causal {name}", lambda q=q, k=k, v=v: ff.scaled_dot_product_attention(q, k, v, is_causal=True)
        yield f"sdpa dropout 0.1 {name}", lambda q=q, k=k, v=v: ff.scaled_dot_product_attention(q, k, v, dropout_p=0.1)
        table = leaf(32, H, dtype=dtype)
        yield f"t5 key-padding {name}", lambda q=q, k=k, v=v, t=table: ff.t5_attention(q, k, v, t, attn_mask=kpm)
        frozen = table.detach()
        yield (
            f"t5 key-padding, frozen table {name}",
            lambda q=q, k=k, v=v, t=frozen: ff.t5_attention(q, k, v, t, attn_mask=kpm),
        )
    qv = leaf(B * L, H, D)
    cu = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    yield "varlen float32", lambda: ff.varlen_attention(qv, qv, qv, cu, cu, L, L)
    x = leaf(2048, 30522)
    t = torch.randint(0, 30522, (2048,), generator=g)
    yield "cross_entropy float32", lambda: ff.cross_entropy(x, t)


def run(quick: bool = True, out_dir=None) -> list[dict]:
    rows = []
    for name, fn in _cases(quick):

        def step(fn=fn):
            out = fn()
            out.float().sum().backward()

        # the two backends alternate, round after round (order flipped each round), and each keeps the
        # median of its rounds: a load that drifts during the run hits both alike
        times = {"auto": [], "reference": []}
        for r in range(5 if quick else 9):
            for backend in ("auto", "reference") if r % 2 == 0 else ("reference", "auto"):
                with ff.use_backend(backend):
                    times[backend].append(time_ms(step, device="cpu", cpu_reps=3))
        ms = {b: statistics.median(t) for b, t in times.items()}
        rows.append(
            {
                "case": name,
                "auto_ms": ms["auto"],
                "reference_ms": ms["reference"],
                "speedup": ms["reference"] / ms["auto"],
                "threads": torch.get_num_threads(),
            }
        )
        print(format_table(rows[-1:], ["case", "auto_ms", "reference_ms", "speedup"]).splitlines()[-1], flush=True)
        save("cpu_dispatch", rows, out_dir=out_dir, device="cpu")  # a run cut short keeps the cases it finished
    print(format_table(rows, ["case", "auto_ms", "reference_ms", "speedup"]))
    return rows


if __name__ == "__main__":
    main(run, __doc__)
