"""`fastformer pretrain | finetune | info` end to end with bert-tiny, and one-line errors for bad input."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import warnings

import pytest

from fastformer.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice")

WORDS = {"pos": ["good", "great", "fine", "happy", "lovely"], "neg": ["bad", "awful", "sad", "poor", "ugly"]}
FILLER = ["the", "film", "was", "really", "a", "story", "and", "very", "plot", "actor"]


def _sentence(rng, label):
    words = rng.sample(FILLER, 4) + [rng.choice(WORDS[label])]
    rng.shuffle(words)
    return " ".join(words)


def _write_tsv(path, n, rng, header=None, int_labels=False):
    lines = [header] if header else []
    for _ in range(n):
        lab = rng.choice(["pos", "neg"])
        lines.append(f"{_sentence(rng, lab)}\t{(1 if lab == 'pos' else 0) if int_labels else lab}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path):
    rng = random.Random(0)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(" . ".join(_sentence(rng, rng.choice(["pos", "neg"])) for _ in range(6)) for _ in range(80))
    )
    return {
        "corpus": corpus,
        "dir": tmp_path,
        "train": _write_tsv(tmp_path / "train.tsv", 160, rng, header="sentence\tlabel", int_labels=True),
        "eval": _write_tsv(tmp_path / "eval.tsv", 40, rng, header="sentence\tlabel", int_labels=True),
        "train_s": _write_tsv(tmp_path / "train_s.tsv", 160, rng),
        "eval_s": _write_tsv(tmp_path / "eval_s.tsv", 40, rng),
    }


def _run(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "fastformer", *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_pretrain_then_finetune_end_to_end(files):
    out = files["dir"] / "pre"
    r = _run(
        "pretrain",
        "--objective",
        "mlm",
        "--data",
        files["corpus"],
        "--model",
        "bert-tiny",
        "--steps",
        "8",
        "--batch-size",
        "8",
        "--seq-len",
        "32",
        "--lr",
        "1e-3",
        "--device",
        "cpu",
        "--seed",
        "1",
        "--out",
        out,
        "--save-every",
        "4",
        "--vocab-size",
        "150",
        "--no-progress",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens/s" in r.stdout and "loss" in r.stdout and str(out) in r.stdout
    for f in ("metrics.jsonl", "config.json", "tokenizer.json", "checkpoint.pt", "loss.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])

    ft = files["dir"] / "ft"
    assert (
        main(
            [
                "finetune",
                "--train",
                str(files["train"]),
                "--eval",
                str(files["eval"]),
                "--init",
                str(out),
                "--steps",
                "15",
                "--batch-size",
                "16",
                "--lr",
                "1e-3",
                "--device",
                "cpu",
                "--out",
                str(ft),
                "--no-progress",
            ]
        )
        == 0
    )
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["0", "1"] and ev["n_eval"] == 40 and 0.0 <= ev["accuracy"] <= 1.0
    # --out equal to --init would overwrite the pre-trained checkpoint: refused before anything is written
    before = (out / "checkpoint.pt").read_bytes()
    assert (
        main(
            [
                "finetune",
                "--train",
                str(files["train"]),
                "--eval",
                str(files["eval"]),
                "--init",
                str(out),
                "--steps",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 2
    )
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "eval.json").exists()


def test_finetune_from_scratch_headerless_string_labels_learns(files):
    ft = files["dir"] / "scratch"
    assert (
        main(
            [
                "finetune",
                "--train",
                str(files["train_s"]),
                "--eval",
                str(files["eval_s"]),
                "--model",
                "bert-tiny",
                "--steps",
                "60",
                "--batch-size",
                "16",
                "--lr",
                "2e-3",
                "--device",
                "cpu",
                "--out",
                str(ft),
                "--no-progress",
            ]
        )
        == 0
    )
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["neg", "pos"]
    assert ev["accuracy"] > 0.75, ev  # one sentiment word per sentence decides the label


def test_finetune_max_minutes_alone_is_a_time_budget(files, capsys):
    """--max-minutes without --steps: warmup and decay follow the clock and the run ends at lr 0;
    --epochs with it is refused (two lengths), and --steps 0 is refused like pretrain's."""
    ft = files["dir"] / "budget"
    base = ["finetune", "--train", str(files["train_s"]), "--eval", str(files["eval_s"]), "--model", "bert-tiny"]
    base += ["--batch-size", "16", "--device", "cpu", "--no-progress", "--threads", "1"]
    assert main(base + ["--max-minutes", "0.1", "--out", str(ft)]) == 0
    lrs = [json.loads(x)["lr"] for x in (ft / "metrics.jsonl").read_text().splitlines()]
    ev = json.loads((ft / "eval.json").read_text())
    # the last step's lr was set just before the budget ran out: near zero, not exactly (a step-based
    # run of the recipe would still be at its peak rate after the first epoch)
    assert ev["steps"] >= 4 and lrs[0] < max(lrs) and lrs[-1] <= 0.1 * max(lrs), lrs
    config = (ft / "config.json").read_text()
    assert json.loads(config)["train"]["steps"] is None
    capsys.readouterr()
    # --resume with fewer --steps than the run has done: refused before config.json is rewritten
    err = _error_line(capsys, ["finetune", "--out", str(ft), "--resume", "--steps", "1", "--no-progress"])
    assert f"has already done {ev['steps']} steps" in err and (ft / "config.json").read_text() == config
    # the budgeted run resumes with its own settings (its recorded epochs are not "given")
    assert main(["finetune", "--out", str(ft), "--resume", "--no-progress"]) == 0
    # --resume where there is no run: said so, not "finetune needs --train"
    assert "--resume: no checkpoint in" in _error_line(capsys, ["finetune", "--out", str(ft / "none"), "--resume"])
    assert "--epochs sets the run's length" in _error_line(capsys, base + ["--max-minutes", "1", "--epochs", "2"])
    assert "--steps must be at least 1" in _error_line(capsys, base + ["--steps", "0"])


def test_header_files_with_tabs_in_the_text_and_label_spellings(files):
    """With a header, a row with more columns than the header has tabs in its text (the label is
    still the label column); labels keep their spelling ("01" is not "1")."""
    from fastformer.data.tsv import label_vocabulary, read_inputs, read_tsv

    p = files["dir"] / "tabs.tsv"
    p.write_text("text\tlabel\nNEW\tYORK rises\t01\nplain text\t10\n")
    assert read_tsv(p) == (["NEW\tYORK rises", "plain text"], ["01", "10"])
    assert read_inputs(p) == (["NEW\tYORK rises", "plain text"], ["01", "10"])
    trailing = files["dir"] / "trailing.tsv"
    trailing.write_text("sentence\tlabel\ngood movie\tpos\t\nbad\tneg\n")
    assert read_tsv(trailing) == (["good movie", "bad"], ["pos", "neg"])  # a trailing tab is no text tab
    q = files["dir"] / "label_first.tsv"
    q.write_text("label\tsentence\npos\ta\tb\nneg\tc\n")
    assert read_tsv(q) == (["a\tb", "c"], ["pos", "neg"])
    assert label_vocabulary(["10", "2", "01", "1"]) == ["01", "1", "2", "10"]


def test_info_runs():
    r = _run("info", timeout=60)
    assert r.returncode == 0 and "fastformer" in r.stdout and "torch" in r.stdout


def test_info_threads_follow_omp_num_threads_like_a_run(monkeypatch, capsys):
    """`info` showed the automatic choice even where OMP_NUM_THREADS made a run use another number."""
    import torch

    from fastformer.train import resources

    monkeypatch.setattr(resources, "auto_threads", lambda: (7, "auto: 7 cores"))
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("threads"))
    assert line.split()[1] == "1" and "(OMP_NUM_THREADS;" in line, line
    assert torch.get_num_threads() == before  # shown, not set
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert main(["info"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("threads"))
    assert line.split()[1] == "7" and "(auto: 7 cores;" in line, line


def test_a_tsv_that_is_not_utf8_is_one_warning_line(tmp_path, capsys):
    """The not-UTF-8 warning was a bare UnicodeWarning that Python printed with its source line."""
    import warnings

    from fastformer.cli import _one_line_warnings
    from fastformer.data.tsv import read_tsv

    p = tmp_path / "l.tsv"
    p.write_bytes(b"caf\xe9 good\tpos\nbad \xff thing\tneg\n")
    with warnings.catch_warnings():  # restores the showwarning _one_line_warnings installs
        warnings.simplefilter("always")
        _one_line_warnings()
        assert read_tsv(p)[1] == ["pos", "neg"]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fastformer: warning: {p}: not UTF-8 (first bad byte at offset 3)"), err


def test_an_interrupted_torchrun_job_prints_once_with_the_torchrun_resume_command(tmp_path):
    """Every rank printed the stop line and a single-process hint that --resume then refused
    (`used world_size=2; this command gives 1`)."""
    from fastformer.cli import _interrupted_lines
    from fastformer.train.trainer import TrainingInterrupted

    e = TrainingInterrupted(signal.SIGINT, 7, tmp_path / "run" / "checkpoint.pt", saved=True)
    stop = f"fastformer: stopped by SIGINT after step 7; checkpoint saved to {tmp_path / 'run' / 'checkpoint.pt'}"
    assert _interrupted_lines(e, "pretrain", "runs/x", env={}) == [
        stop,
        "fastformer: resume with: fastformer pretrain --out runs/x --resume",
    ]
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    assert _interrupted_lines(e, "pretrain", "runs/x", env=torchrun) == [
        stop,
        "fastformer: resume with: torchrun --nproc_per_node 2 -m fastformer pretrain --out runs/x --resume",
    ]
    assert _interrupted_lines(e, "finetune", "runs/x", env={**torchrun, "RANK": "1", "LOCAL_RANK": "1"}) == []
    nodes = {"RANK": "0", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"}
    assert _interrupted_lines(e, "finetune", "o", env=nodes)[1] == (
        "fastformer: resume with: torchrun --nnodes 2 --nproc_per_node 4 -m fastformer finetune --out o --resume"
    )
    none = TrainingInterrupted(signal.SIGINT, 0, tmp_path / "checkpoint.pt", saved=False)  # nothing to resume
    assert _interrupted_lines(none, "pretrain", "o", env=torchrun) == [f"fastformer: {none}"]


def test_a_wrong_or_missing_tokenizer_names_the_flag(files, capsys):
    """`pretrain --objective span --tokenizer MLM.json` said only "tokenizer has no sentinel token", and
    `finetune --tokenizer MISSING.json` only "MISSING.json: No such file or directory"."""
    from fastformer.data.tokenizer import train_wordpiece

    wp = files["dir"] / "wordpiece.json"
    train_wordpiece(files["corpus"].read_text().split("\n\n"), vocab_size=120).save(str(wp))
    err = _error_line(
        capsys,
        ["pretrain", "--objective", "span", "--tokenizer", str(wp), "--data", str(files["corpus"])]
        + ["--steps", "1", "--seq-len", "32", "--no-progress", "--out", str(files["dir"] / "span")],
    )
    assert f"error: --tokenizer {wp}: tokenizer has no sentinel token <extra_id_0>" in err, err
    missing = files["dir"] / "MISSING.json"
    err = _error_line(
        capsys,
        ["finetune", "--model", "bert-tiny", "--tokenizer", str(missing), "--train", str(files["train"])]
        + ["--eval", str(files["eval"]), "--steps", "1", "--no-progress", "--out", str(files["dir"] / "ft")],
    )
    assert f"error: --tokenizer {missing}: no such file" in err, err


def _error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("fastformer: error:") and "Traceback" not in err, err
    return err


def test_bad_input_gives_one_line_error(files, capsys):
    d = files["dir"]
    pre = [
        "pretrain",
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--vocab-size",
        "120",
        "--no-progress",
        "--device",
        "cpu",
    ]
    assert "bert-huge" in _error_line(capsys, pre + ["--model", "bert-huge", "--data", str(files["corpus"])])
    assert "objective 'clm'" in _error_line(capsys, pre + ["--objective", "clm"])
    # refused before the data is read (a missing --data would be the error otherwise)
    missing = ["--data", str(d / "missing.txt")]
    err = _error_line(capsys, pre + ["--objective", "span", "--model", "bert-tiny"] + missing)
    assert "--model bert-tiny: the span objective trains t5-* presets" in err and "t5-tiny" in err
    assert "--schedule must be one of linear, cosine, constant" in _error_line(
        capsys, pre + ["--schedule", "cos"] + missing
    )
    assert "--vocab-size 10 is too small" in _error_line(
        capsys, pre + ["--vocab-size", "10", "--data", str(files["corpus"])]
    )
    assert "no such file" in _error_line(capsys, pre + ["--data", str(d / "missing.txt")])
    (d / "empty.txt").write_text("")
    assert "no text" in _error_line(capsys, pre + ["--data", str(d / "empty.txt")])
    assert "no checkpoint" in _error_line(
        capsys, pre + ["--data", str(files["corpus"]), "--out", str(d / "x"), "--resume"]
    )
    out = d / "run"
    assert main(pre + ["--data", str(files["corpus"]), "--out", str(out)]) == 0
    capsys.readouterr()
    # --resume takes the run's own settings: another --model is refused by name
    assert "leave --model out" in _error_line(
        capsys,
        pre + ["--data", str(files["corpus"]), "--out", str(out), "--resume", "--model", "bert-mini", "--steps", "4"],
    )
    (d / "nolabel.tsv").write_text("just text\nmore text\n")
    ft = ["finetune", "--eval", str(files["eval"]), "--steps", "1", "--no-progress", "--device", "cpu"]
    assert "no label column" in _error_line(capsys, ft + ["--train", str(d / "nolabel.tsv")])
    assert "not a pretrain output" in _error_line(capsys, ft + ["--train", str(files["train"]), "--init", str(d)])
    for task in ("classify", "text2text"):  # a folder that is not there is said to be missing
        missing = _error_line(capsys, ft + ["--train", str(files["train"]), "--init", str(d / "gone"), "--task", task])
        assert missing.endswith(f"--init {d / 'gone'}: no such folder"), missing
    assert "--steps" in _error_line(capsys, pre + ["--steps", "0"])
    assert "--log-every" in _error_line(capsys, pre + ["--log-every", "0"])  # a divisor: refused, not a traceback
    assert "--warmup-steps" in _error_line(capsys, pre + ["--warmup-steps", "-1"])


def test_finetune_eval_label_missing_from_train_counts_as_a_miss(files):
    # a small training sample need not hold every class the eval file has: no crash, the classes are
    # --train's (the head does not depend on --eval) and the extra label's rows count as misses
    ev_path = files["dir"] / "eval3.tsv"
    ev_path.write_text(files["eval_s"].read_text() + "the film was so so\tneutral\n")
    ft = files["dir"] / "three"
    with pytest.warns(UserWarning, match="neutral.*never appear"):  # said, not silent
        assert (
            main(
                [
                    "finetune",
                    "--train",
                    str(files["train_s"]),
                    "--eval",
                    str(ev_path),
                    "--model",
                    "bert-tiny",
                    "--steps",
                    "2",
                    "--batch-size",
                    "8",
                    "--device",
                    "cpu",
                    "--out",
                    str(ft),
                    "--no-progress",
                ]
            )
            == 0
        )
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["neg", "pos"] and ev["n_eval"] == 41


def test_compile_flag(files):
    out = files["dir"] / "compiled"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(files["corpus"]),
                "--model",
                "bert-tiny",
                "--steps",
                "2",
                "--batch-size",
                "4",
                "--seq-len",
                "32",
                "--vocab-size",
                "150",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--no-progress",
                "--compile",
                "eager",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["train"]["compile"] == "eager"
    assert (
        main(
            [
                "pretrain",
                "--data",
                str(files["corpus"]),
                "--steps",
                "1",
                "--out",
                str(out / "x"),
                "--compile",
                "nonsense",
            ]
        )
        == 2
    )


# ---------------------------------------------------------------------------------------------------
# A CLI that never loses work, and using what was trained
# ---------------------------------------------------------------------------------------------------

TINY = [
    "--model",
    "bert-tiny",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--vocab-size",
    "150",
    "--device",
    "cpu",
    "--no-progress",
]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


def _start(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "fastformer", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _wait_for_step(proc, n):
    """Read the child's `step k/N ...` lines (printed without a progress bar) until k >= n."""
    for line in proc.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= n:
            return
    raise AssertionError(f"the run ended before step {n}: {proc.stderr.read()[-2000:]}")


def _ckpt_step(out):
    import torch

    return torch.load(out / "checkpoint.pt", weights_only=True)["step"]  # torch's safe loader reads it


def test_version(capsys):
    import fastformer

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fastformer {fastformer.__version__}"


def test_ctrl_c_writes_a_checkpoint_and_resume_continues_the_run(files, capsys):
    out = files["dir"] / "run"
    p = _start(
        "pretrain",
        "--data",
        files["corpus"],
        *TINY,
        "--steps",
        "100000",
        "--save-every",
        "100000",
        "--log-every",
        "1",
        "--lr",
        "2e-3",
        "--threads",
        "1",
        "--out",
        out,
    )
    _wait_for_step(p, 3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "SIGINT received: finishing step" in err and "checkpoint saved to" in err
    assert f"resume with: fastformer pretrain --out {out} --resume" in err and "Traceback" not in err
    step = _ckpt_step(out)
    assert step >= 3
    assert (out / "loss.png").is_file()  # the curve so far, next to the checkpoint
    # --resume alone: every setting comes from the run; only --steps changes
    assert main(["pretrain", "--out", str(out), "--resume", "--steps", str(step + 2), "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"{step + 2} steps in" in printed and f"resumed at step {step}: steps {step + 1}-{step + 2}" in printed
    assert "1 thread (--threads)" in printed  # the run's --threads, printed in the header
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, step + 3))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["train"]["lr"] == 2e-3 and cfg["train"]["batch_size"] == 4 and cfg["threads"] == 1
    # --resume of the finished run trains nothing and says so
    assert main(["pretrain", "--out", str(out), "--resume"]) == 0
    printed = capsys.readouterr().out
    assert f"resumed at step {step + 2}: the run had already finished" in printed, printed
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == step + 2


def test_sigterm_exits_143_with_a_checkpoint(files):
    out = files["dir"] / "term"
    p = _start("pretrain", "--data", files["corpus"], *TINY, "--steps", "100000", "--log-every", "1", "--out", out)
    _wait_for_step(p, 2)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143 and "stopped by SIGTERM" in err, err[-2000:]
    assert _ckpt_step(out) >= 2


def test_a_second_ctrl_c_exits_at_once_and_the_last_checkpoint_is_intact(files):
    out = files["dir"] / "twice"
    p = _start(
        "pretrain",
        "--data",
        files["corpus"],
        "--model",
        "bert-tiny",
        "--batch-size",
        "32",
        "--seq-len",
        "128",
        "--vocab-size",
        "150",
        "--device",
        "cpu",
        "--no-progress",
        "--steps",
        "100000",
        "--save-every",
        "5",
        "--log-every",
        "1",
        "--out",
        out,
    )
    _wait_for_step(p, 6)
    p.send_signal(signal.SIGINT)
    time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    # usually the second Ctrl-C lands inside the step the first one let finish; if the machine was so slow
    # that the checkpoint got written first, that is the other correct outcome
    assert "stopped at once by a second SIGINT; the last checkpoint" in err or "checkpoint saved" in err, err
    assert _ckpt_step(out) >= 5 and not [f for f in os.listdir(out) if ".tmp" in f]


def test_a_run_that_cannot_fit_is_refused_before_training(files, capsys):
    out = files["dir"] / "huge"
    err = _error_line(
        capsys,
        [
            "pretrain",
            "--data",
            str(files["corpus"]),
            "--model",
            "bert-tiny",
            "--seq-len",
            "65536",
            "--vocab-size",
            "150",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
    )
    assert err.startswith("fastformer: error: --batch-size 32 --seq-len 65536 needs about") and " GB" in err
    assert "--batch-size 1" in err and "--no-memory-check" in err and not out.exists()


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_survives(files):
    import resource

    out = files["dir"] / "full"
    assert main(["pretrain", "--data", str(files["corpus"]), *TINY, "--steps", "2", "--out", str(out)]) == 0
    size = (out / "checkpoint.pt").stat().st_size

    def small_disk():  # writes past this size fail with EFBIG (Python ignores SIGXFSZ)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastformer",
            "pretrain",
            "--out",
            str(out),
            "--resume",
            "--steps",
            "4",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
        preexec_fn=small_disk,
    )
    err = [x for x in r.stderr.splitlines() if x.startswith("fastformer: error")]
    assert r.returncode == 2 and len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert err[0].startswith(f"fastformer: error: --out {out}: cannot write checkpoint.pt: file too large")
    assert err[0].endswith("the previous checkpoint (step 2) is intact")
    assert _ckpt_step(out) == 2 and not [f for f in os.listdir(out) if ".tmp" in f]


def test_out_folder_protection_and_resume_settings(files, capsys):
    out = files["dir"] / "mine"
    base = ["pretrain", "--data", str(files["corpus"]), *TINY, "--out", str(out)]
    assert main(base + ["--steps", "4", "--log-every", "2"]) == 0
    printed = capsys.readouterr().out
    assert "step 2/4  loss" in printed and "step 4/4  loss" in printed and "step 3/4" not in printed
    err = _error_line(capsys, base + ["--steps", "4"])
    assert f"--out {out} already holds a pretrain run" in err and "--resume" in err and "--overwrite" in err
    assert "give one of them" in _error_line(capsys, base + ["--resume", "--overwrite"])
    assert main(base + ["--steps", "6", "--resume", "--lr", "5e-4"]) == 0  # the same value may be repeated
    assert main(base + ["--steps", "2", "--overwrite"]) == 0
    assert _ckpt_step(out) == 2
    ft = [
        "finetune",
        "--train",
        str(files["train"]),
        "--eval",
        str(files["eval"]),
        "--steps",
        "1",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert "never writes into one" in _error_line(capsys, ft + ["--out", str(out), "--overwrite"])
    (files["dir"] / "afile").write_text("")
    assert "afile: exists and is not a folder" in _error_line(capsys, ft + ["--out", str(files["dir"] / "afile")])


def test_nonsense_is_refused_with_one_line(files, capsys):
    d = files["dir"]
    ft = [
        "finetune",
        "--eval",
        str(files["eval"]),
        "--steps",
        "5",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(d / "ft"),
    ]
    assert "--max-len must be at least 8" in _error_line(
        capsys, ft + ["--train", str(files["train"]), "--max-len", "0"]
    )
    assert "--warmup-steps 50 is more than --steps 5" in _error_line(
        capsys, ft + ["--train", str(files["train"]), "--warmup-steps", "50"]
    )
    (d / "empty.tsv").write_text("sentence\tlabel\ngood film\t1\nbad film\t\n")
    assert "data row 2 has an empty label" in _error_line(capsys, ft + ["--train", str(d / "empty.tsv")])
    (d / "bin.tsv").write_bytes(bytes(range(256)) * 8)
    assert "binary file" in _error_line(capsys, ft + ["--train", str(d / "bin.tsv")])
    assert "--threads must be at least 1" in _error_line(
        capsys, ft + ["--train", str(files["train"]), "--threads", "0"]
    )
    assert "not a fastformer run folder" in _error_line(
        capsys, ["predict", "--model", str(d), "--input", str(files["eval"])]
    )
    assert "needs --train" in _error_line(capsys, ["finetune", "--eval", str(files["eval"]), "--out", str(d / "f2")])
    # a file error names the flag that gave the file
    assert f"--train {d / 'nope.tsv'}: no such file" in _error_line(capsys, ft + ["--train", str(d / "nope.tsv")])
    (d / "blank.tsv").write_text("")
    err = _error_line(capsys, ["finetune", "--train", str(files["train"]), "--eval", str(d / "blank.tsv"), *ft[3:]])
    assert err.startswith(f"fastformer: error: --eval {d / 'blank.tsv'}: ")
    assert f"--model {d / 'nope'}: " in _error_line(capsys, ["predict", "--model", str(d / "nope"), "--input", "x"])
    assert not (d / "ft").exists()


def test_predict_and_export_what_was_trained(files, capsys):
    d = files["dir"]
    pre, ft = d / "pre", d / "ft"
    assert main(["pretrain", "--data", str(files["corpus"]), *TINY, "--steps", "6", "--out", str(pre)]) == 0
    assert (
        main(
            [
                "finetune",
                "--train",
                str(files["train_s"]),
                "--eval",
                str(files["eval_s"]),
                "--init",
                str(pre),
                "--steps",
                "10",
                "--batch-size",
                "16",
                "--lr",
                "2e-3",
                "--device",
                "cpu",
                "--out",
                str(ft),
                "--no-progress",
            ]
        )
        == 0
    )
    cfg = json.loads((ft / "config.json").read_text())
    assert cfg["run"] == "finetune" and cfg["labels"] == ["neg", "pos"] and cfg["init"] == str(pre.resolve())
    assert main(["finetune", "--out", str(ft), "--resume", "--steps", "12", "--no-progress"]) == 0  # its own settings
    assert json.loads((ft / "eval.json").read_text())["steps"] == 12 and _ckpt_step(ft) == 12
    r = _run("predict", "--model", ft, "--input", files["eval_s"], "--output", d / "preds.tsv")
    assert r.returncode == 0, r.stderr[-2000:]
    lines = (d / "preds.tsv").read_text().splitlines()
    assert lines[0] == "text\tlabel\tprobability\tp_neg\tp_pos" and len(lines) == 41
    acc = float(r.stderr.split("accuracy ")[1].split(";")[0].split()[0])
    ev = json.loads((ft / "eval.json").read_text())
    assert acc == pytest.approx(ev["accuracy"], abs=1e-4)  # the same model, the same texts
    (d / "masks.txt").write_text("the film was [MASK] .\n")
    capsys.readouterr()
    assert main(["predict", "--model", str(pre), "--input", str(d / "masks.txt")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "text\tfilled\tpredictions" and out[1].startswith("the film was [MASK] .\tthe film was ")
    # every candidate the vocabulary has, and none of the special tokens; the input echoed as written
    (d / "masks2.txt").write_text("the film was [mask] .\n")
    assert main(["predict", "--model", str(pre), "--input", str(d / "masks2.txt"), "--top-k", "100000"]) == 0
    text, _, cands = capsys.readouterr().out.splitlines()[1].split("\t")
    assert text == "the film was [mask] ." and not {"[PAD]", "[CLS]", "[SEP]", "[MASK]", "[UNK]"} & set(cands.split())
    for k in ("0", "-3"):
        assert "--top-k must be at least 1" in _error_line(
            capsys, ["predict", "--model", str(pre), "--input", str(d / "masks.txt"), "--top-k", k]
        )
    # --output never replaces the model folder's own files; a new folder for it is made
    for name in ("checkpoint.pt", "config.json"):
        before = (ft / name).read_bytes()
        err = _error_line(
            capsys, ["predict", "--model", str(ft), "--input", str(files["eval_s"]), "--output", str(ft / name)]
        )
        assert "would replace a file of the --model folder" in err and (ft / name).read_bytes() == before
    assert (
        main(["predict", "--model", str(ft), "--input", str(files["eval_s"]), "--output", str(d / "new" / "p.tsv")])
        == 0
    )
    assert len((d / "new" / "p.tsv").read_text().splitlines()) == 41
    capsys.readouterr()
    err = _error_line(capsys, ["predict", "--model", str(ft), "--input", str(d / "nope.txt")])
    assert f"--input {d / 'nope.txt'}: no such file" in err
    assert main(["export", "--model", str(ft), "--hf", str(d / "hf")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(d / "hf"))
    assert "not empty" in _error_line(capsys, ["export", "--model", str(ft), "--hf", str(d / "hf")])
    # never into a run folder, not even with --overwrite: its config.json and tokenizer.json would go
    files_before = {p.name: p.read_bytes() for p in ft.iterdir()}
    for target, what in ((ft, "is the --model folder"), (pre, "holds a pretrain run")):
        err = _error_line(capsys, ["export", "--model", str(ft), "--hf", str(target), "--overwrite"])
        assert what in err
    assert {p.name: p.read_bytes() for p in ft.iterdir()} == files_before
    # the tokenizer cuts (truncation=True) where predict does: the classifier's --max-len, an MLM's positions
    assert json.loads((d / "hf" / "tokenizer_config.json").read_text())["model_max_length"] == cfg["max_len"]
    assert main(["export", "--model", str(pre), "--hf", str(d / "hf_mlm")]) == 0
    positions = json.loads((pre / "config.json").read_text())["model_config"]["max_position"]
    assert json.loads((d / "hf_mlm" / "tokenizer_config.json").read_text())["model_max_length"] == positions


def test_help_lists_the_registered_objectives_and_presets(monkeypatch, capsys):
    """`pretrain --help` is generated from the objective registry and the presets: a new objective needs
    no change in the CLI. The help points only at files of the repository."""
    from fastformer.cli import build_parser
    from fastformer.models.presets import known_presets
    from fastformer.train.objectives import OBJECTIVES

    monkeypatch.setitem(OBJECTIVES, "mlm2", OBJECTIVES["mlm"])  # another objective, registered
    monkeypatch.setitem(OBJECTIVES, "gone", "fastformer.train.no_such_objective:Gone")  # module missing
    parser = build_parser()
    top = parser.format_help()
    pre = parser._subparsers._group_actions[0].choices["pretrain"].format_help()
    flat = " ".join(pre.split())
    assert "mlm | span | mlm2 | gone (default mlm)" in flat
    assert "mlm2: bert-tiny (default)" in flat and "span: t5-tiny (default)" in flat
    assert all(p in flat for p in known_presets())
    assert "docs/training.md" in top and "DESIGN" not in top + pre


# ---------------------------------------------------------------------------------------------------
# what predict scores, folders for files, copy-paste hints, summary wording
# ---------------------------------------------------------------------------------------------------


def test_predict_says_when_the_labels_cannot_be_scored(files, capsys):
    """A headerless `1<TAB>good movie` file was classified by its first column and scored against the
    sentences (accuracy 0.0000), and neg/pos labels against a 0/1 model gave a silent 0.0000: now a
    warning, no accuracy, the predictions still written. A label<TAB>text file is refused as finetune
    refuses it."""
    from fastformer.data.corpus import FastformerWarning

    d, ft = files["dir"], files["dir"] / "ft"
    argv = ["finetune", "--train", str(files["train"]), "--eval", str(files["eval"]), *TINY[:4], "--max-len", "32"]
    assert (
        main(argv + ["--steps", "1", "--vocab-size", "150", "--device", "cpu", "--out", str(ft), "--no-progress"]) == 0
    )
    assert ": 1 step (" in capsys.readouterr().out  # not "1 steps"
    (d / "x.tsv").write_text("1\tgood movie\n2\tbad film\n")
    (d / "y.tsv").write_text("good movie\tpos\nbad film\tneg\n")
    for name, shown in (("x.tsv", "bad film, good movie"), ("y.tsv", "neg, pos")):
        with pytest.warns(FastformerWarning) as rec:
            code = main(["predict", "--model", str(ft), "--input", str(d / name), "--output", str(d / f"{name}.out")])
        assert code == 0
        msgs = [str(w.message) for w in rec]
        assert len(msgs) == 1 and msgs[0].startswith(f"--input {d / name}: none of its labels ({shown}) is one"), msgs
        assert "the model's (0, 1)" in msgs[0]
        assert "accuracy" not in capsys.readouterr().err
        assert len((d / f"{name}.out").read_text().splitlines()) == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # labels the model knows: scored, no warning
        assert main(["predict", "--model", str(ft), "--input", str(files["eval"]), "--output", str(d / "e.out")]) == 0
    assert "accuracy " in capsys.readouterr().err
    rng = random.Random(0)
    (d / "lf.tsv").write_text(
        "".join(f"{rng.choice(['0', '1'])}\t{_sentence(rng, 'pos')} and more words {i}\n" for i in range(60))
    )
    err = _error_line(capsys, ["predict", "--model", str(ft), "--input", str(d / "lf.tsv")])
    assert f"--input {d / 'lf.tsv'}: without a header the last column is the label" in err and "looks like text" in err


def test_a_folder_given_for_a_file_is_said_to_be_a_folder(files, capsys):
    """`--train data/cls` said "--train data/cls: no such file" (and --tokenizer the same)."""
    d = files["dir"]
    folder = d / "data" / "cls"
    folder.mkdir(parents=True)
    train, ev, out = str(files["train"]), str(files["eval"]), ["--out", str(d / "o"), "--steps", "1", "--no-progress"]
    cases = {
        "--train": ["finetune", "--train", str(folder), "--eval", ev, *out],
        "--eval": ["finetune", "--train", train, "--eval", str(folder), *out],
        "--input": ["predict", "--model", str(d), "--input", str(folder)],
        "--tokenizer": ["finetune", "--model", "bert-tiny", "--tokenizer", str(folder), "--train", train, "--eval", ev]
        + out,
    }
    for flag, argv in cases.items():
        assert f"error: {flag} {folder}: is a folder, not a file; give " in _error_line(capsys, argv), flag
    text2text = ["finetune", "--task", "text2text", "--train", str(folder), "--eval", ev, *out]
    assert f"--train {folder}: is a folder, not a file" in _error_line(capsys, text2text)
    pre = ["pretrain", "--tokenizer", str(folder), "--data", str(files["corpus"]), *out]
    assert f"--tokenizer {folder}: is a folder, not a file; give its tokenizer.json" in _error_line(capsys, pre)
    assert not (d / "o").exists()


def test_a_pipe_given_for_a_file_is_said_to_be_one(files, capsys):
    """`--train <(head -300 pairs.tsv)` said "--train /dev/fd/63: no such file"."""
    import os

    d = files["dir"]
    fifo = d / "pipe.tsv"
    os.mkfifo(fifo)  # what <(...) gives: nothing is ever written to it, so a read would hang
    train, ev, out = str(files["train"]), str(files["eval"]), ["--out", str(d / "o"), "--steps", "1", "--no-progress"]
    cases = {
        "--train": ["finetune", "--train", str(fifo), "--eval", ev, *out],
        "--eval": ["finetune", "--task", "text2text", "--train", train, "--eval", str(fifo), *out],
        "--data": ["pretrain", "--data", str(files["corpus"]), str(fifo), *out],
        "--input": ["predict", "--model", str(d), "--input", str(fifo)],
    }
    for flag, argv in cases.items():
        err = _error_line(capsys, argv)
        assert f"error: {flag} {fifo}: not a regular file (a pipe or a device" in err, (flag, err)
    assert not (d / "o").exists()


def test_the_resume_hint_is_quoted_for_the_shell(tmp_path):
    import shlex

    from fastformer.cli import _interrupted_lines
    from fastformer.train.trainer import TrainingInterrupted

    e = TrainingInterrupted(signal.SIGINT, 3, tmp_path / "checkpoint.pt", saved=True)
    hint = _interrupted_lines(e, "pretrain", "out/my run ü", env={})[1]
    assert hint == "fastformer: resume with: fastformer pretrain --out 'out/my run ü' --resume"
    assert shlex.split(hint.split(": ", 2)[2])[3] == "out/my run ü"  # pasted, the folder is one argument
    assert _interrupted_lines(e, "pretrain", "runs/x", env={})[1].endswith("--out runs/x --resume")  # no quotes


def test_one_step_is_one_step_and_generation_flags_are_named(files, capsys):
    """ "1 steps" in the summaries; `predict --length-penalty nan` said "length_penalty must be a finite
    number" (the Python argument, not the flag)."""
    from fastformer.cli import resumed_line

    span = files["dir"] / "span"
    argv = ["pretrain", "--objective", "span", "--model", "t5-tiny", "--data", str(files["corpus"]), "--steps", "1"]
    argv += ["--seq-len", "32", "--vocab-size", "150", "--device", "cpu", "--no-progress", "--out", str(span)]
    assert main(argv) == 0
    assert ", 1 step in " in capsys.readouterr().out
    assert "step 5 in 2 s" in resumed_line({"resumed_from": 4, "steps": 5, "session_seconds": 2})
    assert "steps 5-6 in 2 s" in resumed_line({"resumed_from": 4, "steps": 6, "session_seconds": 2})
    (files["dir"] / "in.txt").write_text("the film was good\n")
    predict = ["predict", "--model", str(span), "--input", str(files["dir"] / "in.txt")]
    for flag, value, said in (
        ("--length-penalty", "nan", "must be a finite number, got nan"),
        ("--length-penalty", "inf", "must be a finite number, got inf"),
        ("--num-beams", "0", "must be at least 1"),
        ("--max-new-tokens", "0", "must be at least 1"),
        ("--no-repeat-ngram-size", "-1", "must be at least 0"),
        ("--encoder-repetition-penalty", "nan", "must be a finite number > 0"),
        ("--max-len", "1", "must be at least 2"),
    ):
        assert f"error: {flag} {said}" in _error_line(capsys, predict + [flag, value]), flag


def test_warnings_raised_by_fastformer_code_are_one_line(capsys):
    """The extension's fallback warning (a RuntimeWarning from fastformer/optim) came out as Python's
    two lines with a source line; a third-party warning keeps Python's format."""
    import warnings

    import fastformer.optim.adam as adam
    from fastformer import cli

    passed_on = []
    with warnings.catch_warnings():
        warnings.showwarning = lambda *a, **k: passed_on.append(a[:4])  # what Python would print
        cli._one_line_warnings()
        # called as the warnings machinery calls it (pytest records warnings itself while a test runs)
        warnings.showwarning("fastformer: extension not available; falls back", RuntimeWarning, adam.__file__, 1)
        warnings.showwarning("something else", UserWarning, "/elsewhere/lib.py", 7)
    assert capsys.readouterr().err.splitlines() == ["fastformer: warning: extension not available; falls back"]
    assert passed_on == [("something else", UserWarning, "/elsewhere/lib.py", 7)]


def test_pooling_cls_for_a_t5_encoder_is_said_to_be_unused(files, capsys, tmp_path):
    """A T5 encoder has no [CLS] token and its classifier always mean-pools: `--pooling cls` with a T5
    model was accepted silently. It is now a warning (before any work); `--pooling mean`, and BERT
    with either, stay silent."""
    from fastformer.data.corpus import FastformerWarning

    missing = str(tmp_path / "missing.tsv")  # the run then stops at reading --train: only the check runs
    base = ["finetune", "--train", missing, "--eval", missing, "--out", str(tmp_path / "o")]
    init = tmp_path / "span_run"
    init.mkdir()
    (init / "config.json").write_text(json.dumps({"run": "pretrain", "objective": "span", "model": "t5-tiny"}))
    for source in (["--model", "t5-tiny"], ["--init", str(init)]):
        with pytest.warns(FastformerWarning, match="--pooling cls is not used: a T5 encoder has no"):
            _error_line(capsys, base + source + ["--pooling", "cls"])
    for argv in (["--model", "t5-tiny", "--pooling", "mean"], ["--model", "t5-tiny"], ["--pooling", "cls"]):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _error_line(capsys, base + argv)


def test_a_misspelt_flag_is_said_by_the_subcommand_with_the_closest_flag(capsys):
    """An unknown flag was reported by the top-level parser ("usage: fastformer [-h] ..."), which named
    no subcommand and no fix; now the subcommand's parser says it, with the closest flag it has."""
    with pytest.raises(SystemExit) as e:
        main(["pretrain", "--modle", "bert-tiny"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "usage: fastformer pretrain" in err
    assert (
        "fastformer pretrain: error: unrecognized arguments: --modle bert-tiny (--modle: did you mean --model?)" in err
    )
    with pytest.raises(SystemExit):
        main(["finetune", "--train", "a.tsv", "--eval=b.tsv", "--epoks=3", "stray"])
    err = capsys.readouterr().err
    assert (
        "fastformer finetune: error: unrecognized arguments: --epoks=3 stray (--epoks: did you mean --epochs?)" in err
    )


def test_a_run_the_minutes_cap_stopped_says_how_to_go_on(files, capsys, tmp_path):
    """--steps with a --max-minutes cap that ran out ended with "(stopped early)" and no resume line,
    which a Ctrl-C prints; the summary now gives the command that continues to --steps."""
    out = tmp_path / "capped run"
    argv = ["pretrain", "--data", str(files["corpus"]), *TINY, "--steps", "100000", "--max-minutes", "0.005"]
    assert main(argv + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(stopped early)" in text
    assert f"--max-minutes stopped it before --steps; to go on: fastformer pretrain --out '{out}' --resume" in text


def test_a_first_run_says_what_it_does_before_its_header(files, capsys, monkeypatch, tmp_path):
    """Training the tokenizer (and, on the first run, building the built-in corpus) took seconds in
    silence before the run's header; a terminal now gets a line first. Logs and pipes do not."""
    argv = ["pretrain", "--data", str(files["corpus"]), "--model", "bert-tiny", "--steps", "1", "--seq-len", "32"]
    argv += ["--batch-size", "2", "--vocab-size", "150", "--device", "cpu"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert main(argv + ["--out", str(tmp_path / "a")]) == 0
    assert "pretrain: training a 150-token tokenizer on " in capsys.readouterr().err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert main(argv + ["--out", str(tmp_path / "b")]) == 0
    assert "training a" not in capsys.readouterr().err


def test_precision_flag_is_recorded_and_kept_on_resume(files, capsys, monkeypatch):
    """--precision reaches the run (config.json), --resume keeps the run's own unless given again,
    and an unknown value is refused by the parser, naming the choices."""
    from fastformer.train import resources

    monkeypatch.setattr(resources, "cpu_has_bf16", lambda: True)  # no emulation warning on any CPU
    out = files["dir"] / "bf16"
    argv = ["pretrain", "--objective", "span", "--model", "t5-tiny", "--data", str(files["corpus"])]
    argv += ["--seq-len", "32", "--vocab-size", "150", "--device", "cpu", "--no-progress", "--out", str(out)]
    assert main([*argv, "--steps", "2", "--precision", "bf16"]) == 0
    stored = lambda: json.loads((out / "config.json").read_text())["train"]["precision"]
    assert stored() == "bf16"
    assert main(["pretrain", "--out", str(out), "--resume", "--steps", "3"]) == 0
    assert stored() == "bf16"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*argv, "--steps", "2", "--precision", "fp16", "--overwrite"])
    assert e.value.code == 2 and "--precision: invalid choice: 'fp16'" in capsys.readouterr().err


def test_info_says_whether_the_cpu_has_bf16_instructions(monkeypatch, capsys):
    from fastformer import backend

    for has, said in ((True, "yes: bf16 instructions, --precision bf16"), (False, "no: a bf16 matmul would be")):
        monkeypatch.setattr(backend, "cpu_has_bf16", lambda has=has: has)
        assert main(["info"]) == 0
        line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu bf16"))
        assert said in line, line
