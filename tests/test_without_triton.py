"""triton is an optional extra: with it absent, `import fastformer` and every public op, module and
optimizer work on CPU tensors (backend "auto": torch's CPU kernels; "reference": the eager spec), and
nothing imports triton. Run in a subprocess whose import system refuses triton."""

import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = r"""
import sys, importlib.abc

class BlockTriton(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        return None

sys.meta_path.insert(0, BlockTriton())
import torch
import fastformer as ff

def check(backend):
    with ff.use_backend(backend):
        q = torch.randn(2, 3, 9, 8, requires_grad=True)
        kpm = torch.ones(2, 1, 1, 9, dtype=torch.bool); kpm[1, ..., 5:] = False
        ff.scaled_dot_product_attention(q, q, q, attn_mask=kpm, dropout_p=0.1).sum().backward()
        ff.scaled_dot_product_attention(q[0], q, q, is_causal=True).sum().backward()   # broadcast batch dims
        cu = torch.tensor([0, 4, 9], dtype=torch.int32)
        x = torch.randn(9, 3, 8, requires_grad=True)
        ff.varlen_attention(x, x, x, cu, cu, 5, 5, causal=True).sum().backward()
        table = torch.randn(32, 3, requires_grad=True)
        ff.t5_attention(q, q, q, table, attn_mask=kpm).sum().backward()
        logits = torch.randn(4, 7, 3, requires_grad=True)
        ff.cross_entropy(logits, torch.randint(0, 7, (4, 3))).backward()
        ff.cross_entropy(logits, torch.softmax(torch.randn(4, 7, 3), 1), label_smoothing=0.1).backward()
        h, W = torch.randn(6, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
        ff.linear_cross_entropy(h, W, torch.randint(0, 11, (6,)), z_loss=1e-4).backward()
        mha = ff.nn.MultiheadAttention(8, 2, batch_first=True)
        mha(x[:, 0][None], x[:, 0][None], x[:, 0][None], need_weights=False)[0].sum().backward()
        ff.nn.CrossEntropyLoss(label_smoothing=0.1)(logits, torch.randint(0, 7, (4, 3))).backward()
        ff.nn.LinearCrossEntropyLoss()(h, W, torch.randint(0, 11, (6,))).backward()
        t5 = ff.nn.T5SelfAttention(8, 2, 4, has_relative_attention_bias=True)
        y = t5(torch.randn(2, 5, 8))
        ff.nn.T5CrossAttention(8, 2, 4)(y, torch.randn(2, 6, 8)).sum().backward()
        params = list(mha.parameters()) + list(t5.parameters())
        ff.optim.clip_grad_norm_(params, 1.0)
        for opt in (ff.optim.FusedAdam(params, lr=1e-3), ff.optim.FusedAdamW(params, lr=1e-3)):
            opt.step()

for backend in ("auto", "reference"):
    check(backend)
assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton was imported"
try:
    with ff.use_backend("triton"):
        ff.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]))
except RuntimeError as e:
    assert "triton" in str(e)
else:
    raise AssertionError("backend 'triton' without triton must raise")
print("ok")
"""


def test_every_public_op_runs_with_triton_blocked():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    assert torch.__version__  # the parent process is untouched
