"""The same pretrain command under torchrun: 2 CPU processes, gloo, DDP; only rank 0 writes files."""

import json
import os
import subprocess
import sys

from train_helpers import tiny_corpus  # noqa: F401 (fixture)

from fastformer.train.metrics import read_metrics


def test_torchrun_two_process_gloo(tmp_path, tiny_corpus):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "fastformer",
        "pretrain",
        "--data",
        str(tiny_corpus),
        "--steps",
        "4",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "120",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--log-every",
        "1",
        "--no-progress",
        "--save-every",
        "2",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("pretrain done") == 1, r.stdout  # only rank 0 reports
    rows = read_metrics(out / "metrics.jsonl")
    assert [x["step"] for x in rows] == [1, 2, 3, 4]  # one writer: no duplicated lines
    assert all(x["loss"] > 0 for x in rows)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["world_size"] == 2
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.json",
        "loss.png",
        "metrics.jsonl",
        "tokenizer.json",
    ]
