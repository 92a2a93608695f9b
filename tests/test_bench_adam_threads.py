"""bench/bench_adam.py runs its CPU cases with 2 threads and restores the process's count afterwards:
the saved file, its meta.device and its rows must name the 2 threads the rows were measured with, not
the count restored by the time the file is written. Nothing is timed: the cases are replaced."""

import json

import pytest
import torch
from conftest import HAS_CUDA, bench_script

bench_adam = bench_script("bench_adam")


@pytest.mark.skipif(HAS_CUDA, reason="the CPU cases' file is named after the CPU only without CUDA")
def test_cpu_rows_are_saved_under_the_threads_they_ran_with(tmp_path, monkeypatch):
    seen = []

    def fake_case(case, shapes, device, copy_gbs, inplace_gbs, providers):
        seen.append(torch.get_num_threads())
        return [
            {"benchmark": "adam", "case": f"{case} cpu", "provider": p, "params_M": 1.0, "ms": 1.0, "gbs": 1.0}
            for p in providers
        ]

    monkeypatch.setattr(bench_adam, "bench_case", fake_case)
    monkeypatch.setattr(bench_adam.harness, "copy_bandwidth_gbs", lambda device=None, inplace=False: 10.0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a process count other than the cases' 2
    try:
        summary = bench_adam.run(quick=True, out_dir=tmp_path)
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {2}
    (path,) = tmp_path.glob("adam_*.json")
    assert path.name.startswith("adam_cpu-2threads-"), path.name
    data = json.loads(path.read_text())
    assert data["meta"]["device"].startswith("cpu-2threads-")
    assert data["rows"] and all(r["threads"] == 2 for r in data["rows"])
    assert all(r["threads"] == 2 for r in summary)
