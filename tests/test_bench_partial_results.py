"""A benchmark stopped mid-run (a time limit, Ctrl-C) keeps the cases it finished: each bench script
saves its rows after every case. These used to save only at the end."""

import json

import pytest
import torch
from conftest import bench_script


def _interrupt_call(real, n=2):
    """real, with Ctrl-C at its n-th call."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    return fake


def test_cpu_dispatch_keeps_finished_cases(tmp_path, monkeypatch):
    mod = bench_script("bench_cpu_dispatch")
    x = torch.randn(4, 3, requires_grad=True)
    t = torch.tensor([0, 1, 2, 0])
    cases = [("ce one", lambda: torch.nn.functional.cross_entropy(x, t)), ("ce two", lambda: 1 / 0)]
    monkeypatch.setattr(mod, "_cases", lambda quick: iter(cases))
    # quick: 5 rounds of both backends per case, so call 11 is the second case's first
    monkeypatch.setattr(mod, "time_ms", _interrupt_call(lambda fn, **kw: 1.0, n=11))
    with pytest.raises(KeyboardInterrupt):
        mod.run(quick=True, out_dir=tmp_path)
    (path,) = tmp_path.glob("cpu_dispatch_*.json")
    assert [r["case"] for r in json.loads(path.read_text())["rows"]] == ["ce one"]


def test_generation_keeps_finished_cases(tmp_path, monkeypatch):
    mod = bench_script("bench_generation")
    row = {"benchmark": "generation", "preset": "t5-tiny", "num_beams": 1, "ratio": 1.5}
    monkeypatch.setattr(mod, "_case", _interrupt_call(lambda *a: dict(row)))
    with pytest.raises(KeyboardInterrupt):
        mod.run(quick=True, out_dir=tmp_path)
    (path,) = tmp_path.glob("generation_*.json")
    assert json.loads(path.read_text())["rows"] == [row]


def test_adam_keeps_finished_cases(tmp_path, monkeypatch):
    mod = bench_script("bench_adam")
    monkeypatch.setattr(mod.harness, "copy_bandwidth_gbs", lambda device=None, inplace=False: 10.0)

    def one_row(case, shapes, device, copy_gbs, inplace_gbs, providers):
        return [{"benchmark": "adam", "case": case, "provider": "fastformer", "params_M": 1.0, "ms": 1.0}]

    monkeypatch.setattr(mod, "bench_case", _interrupt_call(one_row))
    with pytest.raises(KeyboardInterrupt):
        mod.run(quick=True, out_dir=tmp_path)
    (path,) = tmp_path.glob("adam_*.json")
    assert [r["case"] for r in json.loads(path.read_text())["rows"]] == ["bert-small-22M"]
