"""bench/bench_cpu_precision.py: fp32 against bf16 autocast training steps on CPU, at small shapes."""

import json

import pytest
from conftest import bench_script


def test_rows_compare_both_precisions_on_the_same_model(tmp_path, monkeypatch):
    mod = bench_script("bench_cpu_precision")
    monkeypatch.setattr(mod, "VOCAB", 300)
    monkeypatch.setattr(mod, "BATCH", 4)
    monkeypatch.setattr(mod, "SRC", 16)
    monkeypatch.setattr(mod, "TGT", 6)
    row = mod._case("t5-tiny", rounds=2)
    assert row["preset"] == "t5-tiny" and row["fp32_ms"] > 0 and row["bf16_ms"] > 0
    assert row["speedup"] == row["fp32_ms"] / row["bf16_ms"]
    # the same weights and batch in both precisions: bf16 rounding moves the loss, but only a little
    assert 0 < row["loss_rel_diff"] < 0.02, row
    assert row["cpu_bf16"] == mod.cpu_has_bf16()


def test_a_run_cut_short_keeps_its_finished_presets(tmp_path, monkeypatch):
    mod = bench_script("bench_cpu_precision")
    done = []

    def fake_case(preset, rounds):
        if done:
            raise KeyboardInterrupt
        done.append(preset)
        return {"preset": preset, "params_M": 1.0, "fp32_ms": 2.0, "bf16_ms": 1.0, "speedup": 2.0}

    monkeypatch.setattr(mod, "_case", fake_case)
    with pytest.raises(KeyboardInterrupt):
        mod.run(quick=True, out_dir=tmp_path)
    (path,) = tmp_path.glob("cpu_precision_*.json")
    assert [r["preset"] for r in json.loads(path.read_text())["rows"]] == ["t5-tiny"]
