"""The same pretrain command under torchrun: 2 CPU processes, gloo, DDP; only rank 0 writes files; a
resume restores each rank's own random generators, and one refused for another world size writes
nothing."""

import json
import os
import subprocess
import sys

import pytest
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


def _torchrun(args, env, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return subprocess.run([*cmd, "-m", "fastformer", *args], capture_output=True, text=True, timeout=180, env=env)


def test_torchrun_resume_restores_each_ranks_generators(tmp_path, tiny_corpus):
    """Line-by-line batches pad to each rank's own lengths, so the ranks' dropout draws, and their
    generators, differ: a resumed run equals the uninterrupted one only if each rank gets its own back
    (rank 0's was given to every rank). A constant schedule: 2 steps then --resume to 4 is 4 steps."""
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    base = ["pretrain", "--data", str(tiny_corpus), "--line-by-line", "--schedule", "constant", "--batch-size", "3"]
    base += ["--seq-len", "32", "--vocab-size", "120", "--device", "cpu", "--no-progress", "--threads", "1"]
    full, part = tmp_path / "full", tmp_path / "part"
    for args in ([*base, "--steps", "4", "--out", str(full)], [*base, "--steps", "2", "--out", str(part)]):
        r = _torchrun(args, env)
        assert r.returncode == 0, r.stderr[-3000:]
    ck = torch.load(part / "checkpoint.pt", weights_only=True)
    assert len(ck["rng_ranks"]) == 2
    # a resume refused for another world size (one process here) leaves the run's files as they were
    before = {f: (part / f).read_bytes() for f in ("config.json", "tokenizer.json", "checkpoint.pt")}
    r = subprocess.run(
        [sys.executable, "-m", "fastformer", "pretrain", "--out", str(part), "--resume", "--steps", "4"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert r.returncode == 2 and "world_size=2; this command gives 1" in r.stderr, r.stderr[-2000:]
    assert {f: (part / f).read_bytes() for f in before} == before
    r = _torchrun(["pretrain", "--out", str(part), "--resume", "--steps", "4", "--no-progress"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input_under_torchrun_says_which_rank(tmp_path):
    """Every rank checks the input: rank 0's line is plain, the others say their rank (an error only
    one rank meets must still be seen), one line each, no traceback."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    missing = tmp_path / "missing.txt"
    r = _torchrun(
        ["pretrain", "--data", str(missing), "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "o")], env
    )
    assert r.returncode != 0
    # torchrun stops the other rank as soon as one exits, so either line may be missing; the ones that
    # come are rank 0's plain line and rank 1's marked one, never a line twice
    errors = [line for line in r.stderr.splitlines() if "fastformer: error:" in line]
    message = f"--data {missing}: no such file or directory"
    allowed = [f"fastformer: error: {message}", f"fastformer: error: [rank 1] {message}"]
    assert errors and all(e in allowed for e in errors) and len(set(errors)) == len(errors), r.stderr[-2000:]
    assert "fastformer/cli.py" not in r.stderr  # no traceback of ours (torchrun prints its own summary)


def test_a_rank_that_loses_its_peers_says_one_line(monkeypatch, capsys):
    import torch.distributed as dist

    from fastformer import cli

    def lost(args):
        raise dist.DistBackendError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), lost))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastformer: error: [rank 1] another process of the run stopped ([../gloo"), err
    for env in ({"RANK": "0"}, {"RANK": "1", "WORLD_SIZE": "1"}):  # rank 0, or a single process: the traceback
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(dist.DistBackendError):
            cli.main(["info"])


def test_a_rank_variable_without_a_group_is_a_single_process(monkeypatch, capsys):
    """A scheduler's RANK without WORLD_SIZE > 1 is no torchrun: errors and summaries are printed."""
    from fastformer import cli

    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert cli._rank() == 0 and cli._is_main()
    assert cli.main(["pretrain", "--steps", "0"]) == 2
    assert capsys.readouterr().err.strip().startswith("fastformer: error: --steps")


def _with_func(parser, func):
    """The parser with the `info` command's function replaced."""
    sub = parser._subparsers._group_actions[0].choices["info"]
    sub.set_defaults(func=func)
    return parser
