"""--precision: which autocast the Trainer runs the forward under (auto | fp32 | bf16), on CPU."""

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import tiny_config, tiny_corpus  # noqa: F401 (fixture)

from fastformer import backend
from fastformer.train import resources
from fastformer.train.metrics import read_metrics
from fastformer.train.pretrain import pretrain
from fastformer.train.run_dir import FastformerWarning
from fastformer.train.trainer import PRECISIONS, TrainConfig, Trainer

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice", "ignore:--eval .* has only")


def _train_and_watch(tmp_path, precision: str) -> tuple[list, list]:
    """Three steps of a linear model on CPU; returns, per forward, (autocast on?, its dtype) and the
    dtype of the model's output."""
    seen, out_dtypes = [], []
    torch.manual_seed(0)
    model = nn.Linear(8, 3)

    def batch_fn(step, micro):
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(8, 8, generator=g), "y": torch.randint(0, 3, (8,), generator=g)}

    def step_fn(m, b, train):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        logits = m(b["x"])
        out_dtypes.append(logits.dtype)
        return F.cross_entropy(logits.float(), b["y"], reduction="sum"), 8, {}

    cfg = TrainConfig(
        out_dir=str(tmp_path / precision), steps=3, lr=1e-2, progress=False, device="cpu", precision=precision
    )
    Trainer(model, cfg, batch_fn=batch_fn, step_fn=step_fn, tokens_fn=lambda b: 8).train()
    assert model.weight.dtype == torch.float32  # autocast never changes the parameters
    return seen, out_dtypes


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_cpu_training_is_fp32_by_default_and_with_fp32(tmp_path, precision):
    seen, dtypes = _train_and_watch(tmp_path, precision)
    assert len(seen) == 3 and not any(on for on, _ in seen), seen
    assert set(dtypes) == {torch.float32}


def test_bf16_autocasts_the_cpu_forward(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: True)  # no warning, whatever this CPU is
    seen, dtypes = _train_and_watch(tmp_path, "bf16")
    assert seen == [(True, torch.bfloat16)] * 3
    assert set(dtypes) == {torch.bfloat16}  # nn.Linear ran in bf16 under the autocast


def test_bf16_on_a_cpu_without_bf16_instructions_warns(tmp_path, monkeypatch):
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: False)
    with pytest.warns(FastformerWarning, match="without bf16 instructions.*emulates"):
        seen, _ = _train_and_watch(tmp_path, "bf16")
    assert seen == [(True, torch.bfloat16)] * 3  # still what was asked for


@pytest.mark.parametrize(
    "precision, capability, expected",
    [
        ("bf16", (7, 5), "--precision bf16 on cuda:0, compute capability 7.5: bf16 needs 8.0.*emulated"),
        ("auto", (7, 5), "cuda:0 has compute capability 7.5: training runs in fp32"),
        ("fp32", (7, 5), None),
        ("bf16", (9, 0), None),
        ("auto", (8, 0), None),
    ],
)
def test_precision_warning_on_gpus_old_and_new(monkeypatch, precision, capability, expected):
    """The Trainer's warning for a GPU, without one: bf16 on a GPU older than 8.0 is emulated (like a
    CPU without bf16 instructions), and auto falls back to fp32 there; newer GPUs get no warning."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(backend, "kernels_supported", lambda index=None: capability >= (8, 0))
    warning = resources.precision_warning(torch.device("cuda", 0), precision)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and re.match(expected, warning), warning


def test_precision_warning_on_cpus(monkeypatch):
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: False)
    assert "without bf16 instructions" in resources.precision_warning("cpu", "bf16")
    assert resources.precision_warning("cpu", "auto") is None and resources.precision_warning("cpu", "fp32") is None
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: True)
    assert resources.precision_warning("cpu", "bf16") is None


def test_unknown_precision_is_a_value_error_naming_the_flag(tmp_path):
    assert PRECISIONS == ("auto", "fp32", "bf16")
    with pytest.raises(ValueError, match=r"--precision must be one of auto, fp32, bf16, got 'fp16'"):
        TrainConfig(out_dir=str(tmp_path), precision="fp16").validate()


def test_bf16_pretraining_learns_and_records_its_precision(tmp_path, tiny_corpus, monkeypatch):
    """A span model pre-trained in bf16 autocast on CPU: the loss falls, config.json records the
    precision, and the saved weights are fp32."""
    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: True)
    out = tmp_path / "bf16"
    pretrain(
        tiny_config(
            out,
            tiny_corpus,
            model="t5-tiny",
            objective="span",
            steps=30,
            batch_size=8,
            vocab_size=200,
            lr=2e-3,
            precision="bf16",
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert json.loads((out / "config.json").read_text())["train"]["precision"] == "bf16"
    state = torch.load(out / "checkpoint.pt", weights_only=False)["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}


def test_cpu_has_bf16_reads_the_instruction_flags():
    zen5 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    zen3 = "processor\t: 0\nflags\t\t: fpu avx2 fma\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"
    assert backend.cpu_has_bf16(zen5) and backend.cpu_has_bf16(arm)
    assert not backend.cpu_has_bf16(zen3) and not backend.cpu_has_bf16("")
