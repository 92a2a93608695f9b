"""`fastformer pretrain | finetune | info` end to end with bert-tiny, and one-line errors for bad input."""
import json
import os
import random
import subprocess
import sys

import pytest

from fastformer.cli import main

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
    corpus.write_text("\n\n".join(" . ".join(_sentence(rng, rng.choice(["pos", "neg"])) for _ in range(6))
                                  for _ in range(80)))
    return {"corpus": corpus, "dir": tmp_path,
            "train": _write_tsv(tmp_path / "train.tsv", 160, rng, header="sentence\tlabel", int_labels=True),
            "eval": _write_tsv(tmp_path / "eval.tsv", 40, rng, header="sentence\tlabel", int_labels=True),
            "train_s": _write_tsv(tmp_path / "train_s.tsv", 160, rng),
            "eval_s": _write_tsv(tmp_path / "eval_s.tsv", 40, rng)}


def _run(*args, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": os.getcwd()}
    return subprocess.run([sys.executable, "-m", "fastformer", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_pretrain_then_finetune_end_to_end(files):
    out = files["dir"] / "pre"
    r = _run("pretrain", "--objective", "mlm", "--data", files["corpus"], "--model", "bert-tiny", "--steps", "8",
             "--batch-size", "8", "--seq-len", "32", "--lr", "1e-3", "--device", "cpu", "--seed", "1", "--out", out,
             "--save-every", "4", "--vocab-size", "150", "--no-progress")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "tokens/s" in r.stdout and "loss" in r.stdout and str(out) in r.stdout
    for f in ("metrics.jsonl", "config.json", "tokenizer.json", "checkpoint.pt", "loss.png"):
        assert (out / f).is_file(), f
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 8 and {"step", "loss", "lr", "tokens_per_s"} <= set(rows[0])

    ft = files["dir"] / "ft"
    assert main(["finetune", "--train", str(files["train"]), "--eval", str(files["eval"]), "--init", str(out),
                 "--steps", "15", "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", "--out", str(ft),
                 "--no-progress"]) == 0
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["0", "1"] and ev["n_eval"] == 40 and 0.0 <= ev["accuracy"] <= 1.0
    # --out equal to --init would overwrite the pre-trained checkpoint: refused before anything is written
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["finetune", "--train", str(files["train"]), "--eval", str(files["eval"]), "--init", str(out),
                 "--steps", "1", "--device", "cpu", "--out", str(out), "--no-progress"]) == 2
    assert (out / "checkpoint.pt").read_bytes() == before and not (out / "eval.json").exists()


def test_finetune_from_scratch_headerless_string_labels_learns(files):
    ft = files["dir"] / "scratch"
    assert main(["finetune", "--train", str(files["train_s"]), "--eval", str(files["eval_s"]), "--model",
                 "bert-tiny", "--steps", "60", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu",
                 "--out", str(ft), "--no-progress"]) == 0
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["neg", "pos"]
    assert ev["accuracy"] > 0.75, ev   # one sentiment word per sentence decides the label


def test_info_runs():
    r = _run("info", timeout=60)
    assert r.returncode == 0 and "fastformer" in r.stdout and "torch" in r.stdout


def _error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1 and err.startswith("fastformer: error:") and "Traceback" not in err, err
    return err


def test_bad_input_gives_one_line_error(files, capsys):
    d = files["dir"]
    pre = ["pretrain", "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--vocab-size", "120",
           "--no-progress", "--device", "cpu"]
    assert "bert-huge" in _error_line(capsys, pre + ["--model", "bert-huge", "--data", str(files["corpus"])])
    assert "objective 'clm'" in _error_line(capsys, pre + ["--objective", "clm"])
    assert "no such file" in _error_line(capsys, pre + ["--data", str(d / "missing.txt")])
    (d / "empty.txt").write_text("")
    assert "no text" in _error_line(capsys, pre + ["--data", str(d / "empty.txt")])
    assert "no checkpoint" in _error_line(capsys, pre + ["--data", str(files["corpus"]), "--out", str(d / "x"),
                                                         "--resume"])
    out = d / "run"
    assert main(pre + ["--data", str(files["corpus"]), "--out", str(out)]) == 0
    capsys.readouterr()
    # --resume takes the run's own settings: another --model is refused by name
    assert "leave --model out" in _error_line(capsys, pre + ["--data", str(files["corpus"]), "--out", str(out),
                                                             "--resume", "--model", "bert-mini", "--steps", "4"])
    (d / "nolabel.tsv").write_text("just text\nmore text\n")
    ft = ["finetune", "--eval", str(files["eval"]), "--steps", "1", "--no-progress", "--device", "cpu"]
    assert "no label column" in _error_line(capsys, ft + ["--train", str(d / "nolabel.tsv")])
    assert "not a pretrain output" in _error_line(capsys, ft + ["--train", str(files["train"]), "--init", str(d)])
    assert "--steps" in _error_line(capsys, pre + ["--steps", "0"])
    assert "--log-every" in _error_line(capsys, pre + ["--log-every", "0"])   # was a ZeroDivisionError traceback
    assert "--warmup-steps" in _error_line(capsys, pre + ["--warmup-steps", "-1"])


def test_finetune_eval_label_missing_from_train_counts_as_a_class(files):
    # a small training sample need not hold every class the eval file has: no crash, the extra
    # class is in the label list and its rows count as misses
    ev_path = files["dir"] / "eval3.tsv"
    ev_path.write_text(files["eval_s"].read_text() + "the film was so so\tneutral\n")
    ft = files["dir"] / "three"
    with pytest.warns(UserWarning, match="neutral.*never appear"):   # said, not silent
        assert main(["finetune", "--train", str(files["train_s"]), "--eval", str(ev_path), "--model", "bert-tiny",
                     "--steps", "2", "--batch-size", "8", "--device", "cpu", "--out", str(ft), "--no-progress"]) == 0
    ev = json.loads((ft / "eval.json").read_text())
    assert ev["labels"] == ["neg", "neutral", "pos"] and ev["n_eval"] == 41


def test_compile_flag(files):
    out = files["dir"] / "compiled"
    assert main(["pretrain", "--data", str(files["corpus"]), "--model", "bert-tiny", "--steps", "2", "--batch-size",
                 "4", "--seq-len", "32", "--vocab-size", "150", "--device", "cpu", "--out", str(out), "--no-progress",
                 "--compile", "eager"]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["compile"] == "eager"
    assert main(["pretrain", "--data", str(files["corpus"]), "--steps", "1", "--out", str(out / "x"),
                 "--compile", "nonsense"]) == 2
