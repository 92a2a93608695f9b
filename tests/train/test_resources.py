"""The peak-memory check before the first step, and the CPU thread default."""

import json
import os
import re

import pytest
import torch
from train_helpers import tiny_config, tiny_corpus  # noqa: F401 (fixture)

from fastformer.models.bert import BertConfig, BertForMaskedLM
from fastformer.models.presets import get_preset
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration
from fastformer.train import resources
from fastformer.train.pretrain import pretrain
from fastformer.train.resources import GB, auto_threads, check_memory, estimate_memory, set_threads
from fastformer.train.run_dir import FastformerWarning

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice")
CPU = torch.device("cpu")


def _bert(preset="bert-tiny", max_position=512):
    with torch.device("meta"):  # shapes only: no memory, no init time
        return BertForMaskedLM(
            BertConfig.from_dict({**get_preset(preset), "vocab_size": 8192, "max_position": max_position})
        )


def test_estimate_scales_with_batch_and_quadratically_with_length_on_the_eager_path():
    m = _bert(max_position=4096)
    a = estimate_memory(m, batch_size=8, seq_len=512, head_rows=0.15 * 8 * 512, device=CPU)
    b = estimate_memory(m, batch_size=16, seq_len=512, head_rows=0.15 * 16 * 512, device=CPU)
    c = estimate_memory(m, batch_size=8, seq_len=1024, head_rows=0.15 * 8 * 1024, device=CPU)
    fused = estimate_memory(m, batch_size=8, seq_len=1024, head_rows=0.15 * 8 * 1024, device=CPU, fused_attention=True)
    n = sum(p.numel() for p in m.parameters())
    assert a.weights == b.weights == n * 16  # fp32 weights, grads, two Adam moments
    assert b.activations == pytest.approx(2 * a.activations, rel=1e-6)
    assert 2.5 * a.activations < c.activations < 4 * a.activations  # the (L, L) scores dominate
    assert fused.activations < c.activations / 2  # no (L, L) scores kept by the fused kernels
    # bench/memory_estimate.py measured a bert-tiny step at (8, 1024) on the CPU path growing the peak
    # RSS by about 0.7 GB, a t5-tiny step at (8, 512) by about 0.36 GB
    assert 0.5 * GB < c.total < 1.0 * GB
    t5 = T5ForConditionalGeneration(T5Config.from_preset("t5-tiny", vocab_size=8192)).to("meta")
    e = estimate_memory(t5, batch_size=8, seq_len=512, target_len=114, head_rows=8 * 114, device=CPU)
    assert 0.25 * GB < e.total < 0.6 * GB


def test_check_refuses_with_a_suggestion_and_warns_when_close(monkeypatch):
    m = _bert(max_position=4096)
    monkeypatch.setattr(resources, "available_memory", lambda device: 4 * GB)

    def est(batch, seq_len):
        return estimate_memory(m, batch_size=batch, seq_len=seq_len, head_rows=0.15 * batch * seq_len, device=CPU)

    with pytest.raises(ValueError) as info:
        check_memory(est, batch_size=32, len_flag="--seq-len", seq_len=4096, grad_accum=1, warn=print)
    msg = str(info.value)
    assert msg.startswith("--batch-size 32 --seq-len 4096 needs about") and "of 4.0 GB available on cpu" in msg
    b, accum = map(
        int, re.search(r"try --batch-size (\d+) --grad-accum (\d+) \(the same examples per step\)", msg).groups()
    )
    assert b * accum == 32 and "--no-memory-check" in msg
    assert est(b, 4096).total <= 0.8 * 4 * GB < est(2 * b, 4096).total  # the largest batch that fits
    with pytest.raises(ValueError, match="even --batch-size 1 does not fit: try --seq-len") as info:
        check_memory(est, batch_size=2, len_flag="--seq-len", seq_len=16384, grad_accum=1, warn=print)
    n = int(re.search(r"try --seq-len (\d+) with --batch-size 1", str(info.value)).group(1))
    assert n < 16384 and est(1, n).total <= 0.8 * 4 * GB < est(1, 2 * n).total
    warned = []
    close = est(b, 4096).total / 0.9  # the run needs 90% of what is available
    monkeypatch.setattr(resources, "available_memory", lambda device: int(close))
    check_memory(est, batch_size=b, len_flag="--seq-len", seq_len=4096, grad_accum=1, warn=warned.append)
    assert len(warned) == 1 and "close to the limit" in warned[0]
    monkeypatch.setattr(resources, "available_memory", lambda device: None)  # unknown: no check
    assert check_memory(est, batch_size=32, len_flag="--seq-len", seq_len=4096, grad_accum=1, warn=print).total > 0


def test_pretrain_refuses_before_writing_anything(tmp_path, tiny_corpus, monkeypatch):
    monkeypatch.setattr(resources, "available_memory", lambda device: 50 * 2**20)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="cannot fit"):
        pretrain(tiny_config(out, tiny_corpus, steps=1, seq_len=512, batch_size=32))
    assert not out.exists()
    monkeypatch.setattr(resources, "available_memory", lambda device: 10 * GB)
    with pytest.warns(FastformerWarning, match="close to the limit"):
        monkeypatch.setattr(resources, "WARN_FRACTION", 0.0)
        pretrain(tiny_config(out, tiny_corpus, steps=1))


def test_thread_default_follows_the_load_and_threads_are_recorded(tmp_path, tiny_corpus, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
        n, why = auto_threads()
        assert n == 1 and "load 64.0" in why
        monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
        n, why = auto_threads()
        cores = resources._physical_cores() or len(os.sched_getaffinity(0))
        assert 1 <= n <= min(cores, len(os.sched_getaffinity(0))) and why.startswith("auto:")
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(None)[1].startswith("auto") and torch.get_num_threads() == n
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        assert set_threads(None) == (1, "OMP_NUM_THREADS")
        with pytest.raises(ValueError, match="--threads"):
            set_threads(0)
        out = tmp_path / "run"
        s = pretrain(tiny_config(out, tiny_corpus, steps=1, threads=1))
        cfg = json.loads((out / "config.json").read_text())
        assert s["threads"] == 1 and cfg["threads"] == 1 and cfg["threads_source"] == "--threads"
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_estimate_follows_the_runs_precision_as_the_trainer_does():
    """--precision bf16 on CPU autocasts (the Trainer and the estimate share autocasts_bf16): activations
    in 2 bytes, the score matrices still kept (no fused kernels on CPU); auto and fp32 stay fp32 there.
    Measured for t5-mini at (32, 128) span batches in bf16: the peak RSS grew by 564 MB over a step, the
    estimate's activations are 605 MB."""
    assert not resources.autocasts_bf16(CPU) and not resources.autocasts_bf16(CPU, "fp32")
    assert resources.autocasts_bf16(CPU, "bf16")
    t5 = T5ForConditionalGeneration(T5Config.from_preset("t5-mini", vocab_size=8192)).to("meta")
    kw = dict(batch_size=32, seq_len=128, target_len=30, head_rows=32 * 30, device=CPU)
    fp32, auto, bf16 = (estimate_memory(t5, **kw, precision=p) for p in ("fp32", "auto", "bf16"))
    assert fp32.activations == auto.activations and bf16.weights == fp32.weights
    assert 0.6 * fp32.activations < bf16.activations < 0.8 * fp32.activations  # scores and head rows stay fp32
