"""The compiled extension is loaded in one place (fastformer/_extension.py) for its three users: the
fused optimizers, the CPU cross-entropy rows and the one-pass CPU dropout. FASTFORMER_DISABLE_EXT=1
turns all three to their torch fallbacks, and training with dropout still works and gives the same
loss function (compared without dropout)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastformer import _extension

_SCRIPT = r"""
import importlib, json, warnings
import torch
import fastformer as ff
from fastformer import _extension
from fastformer.models import _cpu_attention
lce = importlib.import_module("fastformer.ops.linear_cross_entropy")  # the package exports a function of that name
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration

state = {
    "load": _extension.load(),
    "error": repr(_extension._state["error"]),
    "dropout_cpu": _cpu_attention.has_fused_dropout(),
    "ce_rows_cpu": lce._load_cpp_rows(),
    "optimizer": ff.optim.extension_available(),
}
torch.manual_seed(0)
model = T5ForConditionalGeneration(T5Config.from_preset("t5-tiny", vocab_size=64, dropout_rate=0.1))
ids = torch.randint(2, 64, (3, 10))
labels = torch.randint(2, 64, (3, 5))
with torch.no_grad():  # without dropout: the same function either way
    state["eval_loss"] = model.eval()(ids, torch.ones_like(ids), labels=labels).loss.item()
model.train()
with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    opt = ff.optim.FusedAdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = model(ids, torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
state["losses"] = losses
state["warnings"] = [str(w.message) for w in rec if "fastformer" in str(w.message)]
print(json.dumps(state))
"""


def _run(disable: bool) -> dict:
    import json

    env = {k: v for k, v in os.environ.items() if k != "FASTFORMER_DISABLE_EXT"}
    if disable:
        env["FASTFORMER_DISABLE_EXT"] = "1"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disable_env_turns_every_user_to_its_fallback():
    off = _run(disable=True)
    assert off["load"] is False and "FASTFORMER_DISABLE_EXT" in off["error"]
    assert off["dropout_cpu"] is False and off["ce_rows_cpu"] is False and off["optimizer"] is False
    assert len(off["warnings"]) == 1 and "falls back to torch's implementation" in off["warnings"][0]
    assert all(x == x and abs(x) < 1e3 for x in off["losses"] + [off["eval_loss"]])  # finite (dropout 0.1)
    if not _extension.load():
        pytest.skip(f"extension not built here ({_extension._state['error']}): only the fallback side is checked")
    on = _run(disable=False)
    assert on["load"] and on["dropout_cpu"] and on["ce_rows_cpu"] and on["optimizer"]
    assert on["warnings"] == []
    # the compiled cross-entropy rows and the torch math agree to float rounding
    assert abs(on["eval_loss"] - off["eval_loss"]) <= 1e-5 * abs(off["eval_loss"])


def test_has_op_names_a_registered_operator_only():
    if not _extension.load():
        pytest.skip(f"extension not built here ({_extension._state['error']})")
    assert _extension.has_op("adam_step") and _extension.has_op("dropout_cpu") and _extension.has_op("ce_rows_cpu")
    assert not _extension.has_op("no_such_operator")
