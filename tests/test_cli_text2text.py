"""`fastformer finetune --task text2text`, `predict` and `export` on a text-to-text folder, end to end on
tiny generated pairs: eval.json, predictions that `predict` reproduces, Hugging Face generate on the
exported folder giving our tokens, Ctrl-C + --resume, and one-line errors."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastformer as ff
from fastformer.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:--eval .* has only", "ignore:the held-out slice")

LETTERS = "abcdefgh"


def _copy_pairs(path, n, rng, header="input\ttarget"):
    """`x y z<TAB>x y z`: the target copies the input."""
    rows = [header] if header else []
    for _ in range(n):
        s = " ".join(rng.choice(LETTERS) for _ in range(rng.randint(2, 4)))
        rows.append(f"{s}\t{s}")
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture
def pairs(tmp_path):
    rng = random.Random(0)
    return {
        "dir": tmp_path,
        "train": _copy_pairs(tmp_path / "train.tsv", 400, rng),
        "eval": _copy_pairs(tmp_path / "eval.tsv", 24, rng, header=None),
    }


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}


def _run(*args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "fastformer", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


T2T = [
    "--task",
    "text2text",
    "--model",
    "t5-tiny",
    "--batch-size",
    "16",
    "--vocab-size",
    "200",
    "--max-len",
    "16",
    "--max-target-len",
    "16",
    "--device",
    "cpu",
    "--no-progress",
]


def _error_line(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("fastformer: error:") and "Traceback" not in err, err
    return err


def _hf_matches_ours(model, hf_dir, texts, max_new_tokens, *, from_config=True, **kw):
    """HF generate on the exported folder (its tokenizer; max_new_tokens from its generation_config.json
    when from_config) gives our generate's tokens; returns the generated rows."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    ours = model.generate(batch["input_ids"], batch["attention_mask"].bool(), max_new_tokens=max_new_tokens, **kw)
    ref = hf.generate(**batch, do_sample=False, **kw, **({} if from_config else {"max_new_tokens": max_new_tokens}))
    assert torch.equal(ours, ref), f"\nours {ours}\nhf   {ref}"
    return ours


def test_text2text_finetune_predict_export(pairs, capsys):
    d = pairs["dir"]
    out = d / "t2t"
    r = _run(
        "finetune",
        "--train",
        pairs["train"],
        "--eval",
        pairs["eval"],
        *T2T,
        "--steps",
        "80",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "5",
        "--log-every",
        "20",
        "--eval-every",
        "40",
        "--eval-generate",
        "8",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "finetune text2text random init (t5-tiny)" in r.stdout and "ROUGE-L" in r.stdout
    # --eval-generate: ROUGE of 8 generated eval pairs at steps 40 and 80, on the progress line and in metrics
    assert "step 40/80" in r.stdout and "eval ROUGE-L " in r.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in records if "eval_rougeL" in x] == [40, 80]
    ev = json.loads((out / "eval.json").read_text())
    for key in ("rouge1", "rouge2", "rougeL", "exact_match"):
        assert 0.0 <= ev[key] <= 1.0, key
    assert ev["n_eval"] == 24 and ev["n_train"] == 400 and ev["steps"] == 80 and ev["accuracy"] == ev["exact_match"]
    assert ev["generation"] == {
        "max_new_tokens": 16,
        "num_beams": 1,
        "length_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "encoder_repetition_penalty": 1.0,
    }
    assert len(ev["examples"]) == 20 and set(ev["examples"][0]) == {"input", "target", "prediction"}
    assert ev["examples"][0]["target"] == ev["examples"][0]["input"]
    assert ev["rouge1"] > 0.2, ev["examples"][:5]  # 80 steps of a copy task: some letters come out right
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["run"] == "finetune" and cfg["task"] == "text2text" and cfg["kind"] == "seq2seq"
    assert cfg["train"]["task"] == "text2text" and cfg["train"]["lr"] == 3e-3 and cfg["threads"] == 1
    for f in ("checkpoint.pt", "tokenizer.json", "metrics.jsonl", "loss.png", "predictions.tsv"):
        assert (out / f).is_file(), f

    # predict: the same model and settings generate the same texts as the evaluation did
    capsys.readouterr()
    assert main(["predict", "--model", str(out), "--input", str(pairs["eval"]), "--output", str(d / "preds.tsv")]) == 0
    assert "ROUGE-L" in capsys.readouterr().err
    got = [line.split("\t") for line in (d / "preds.tsv").read_text().splitlines()]
    want = [line.split("\t") for line in (out / "predictions.tsv").read_text().splitlines()]
    assert got[0] == ["input", "prediction"] and len(got) == 25
    assert [g[1] if len(g) > 1 else "" for g in got[1:]] == [w[2] if len(w) > 2 else "" for w in want[1:]]
    (d / "in.txt").write_text("a b c\n\nd e\n")
    assert main(["predict", "--model", str(out), "--input", str(d / "in.txt"), "--num-beams", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "input\tprediction" and [x.split("\t")[0] for x in lines[1:]] == ["a b c", "d e"]
    # --no-repeat-ngram-size 1: no word twice in a prediction (the copy task's own targets repeat letters)
    assert main(["predict", "--model", str(out), "--input", str(pairs["eval"]), "--no-repeat-ngram-size", "1"]) == 0
    rows = [x.split("\t") for x in capsys.readouterr().out.splitlines()[1:]]
    assert any(len(set(r[0].split())) < len(r[0].split()) for r in rows)
    assert all(len(set(r[1].split())) == len(r[1].split()) for r in rows if len(r) > 1)
    # --encoder-repetition-penalty: the same texts as the model's generate with the same setting
    assert (
        main(["predict", "--model", str(out), "--input", str(d / "in.txt"), "--encoder-repetition-penalty", "4"]) == 0
    )
    rows = [x.split("\t") for x in capsys.readouterr().out.splitlines()[1:]]
    from fastformer.train.text2text import generate_texts

    loaded = ff.models.load(out)
    want = generate_texts(
        loaded.model, loaded.tokenizer, ["a b c", "d e"], max_len=128, max_new_tokens=16, encoder_repetition_penalty=4.0
    )
    assert [r[1] if len(r) > 1 else "" for r in rows] == want
    err = _error_line(
        capsys, ["predict", "--model", str(out), "--input", str(d / "in.txt"), "--encoder-repetition-penalty", "0"]
    )
    assert "--encoder-repetition-penalty must be a finite number > 0" in err

    # the load API: the encoder-decoder and its tokenizer
    loaded = ff.models.load(out)
    assert loaded.kind == "seq2seq" and type(loaded.model).__name__ == "T5ForConditionalGeneration"
    assert loaded.labels is None and not loaded.model.training and loaded.tokenizer.token_to_id("</s>") == 1
    # its tokenizer frames an input as fine-tuning did (text </s>): generate on those ids is predict's
    ids = torch.tensor([loaded.tokenizer.encode("a b c").ids])
    assert ids[0, -1] == 1 and ids[0, :-1].tolist() == loaded.tokenizer.encode("a b c", add_special_tokens=False).ids
    out_ids = loaded.generate(ids, torch.ones_like(ids, dtype=torch.bool), max_new_tokens=16)
    assert (
        loaded.tokenizer.decode(out_ids[0].tolist())
        == generate_texts(loaded.model, loaded.tokenizer, ["a b c"], max_len=128, max_new_tokens=16)[0]
    )

    # export: HF's generate on the exported folder gives our tokens, greedy and beam search
    assert main(["export", "--model", str(out), "--hf", str(d / "hf")]) == 0
    gen_cfg = json.loads((d / "hf" / "generation_config.json").read_text())
    assert gen_cfg["max_new_tokens"] == 16 and gen_cfg["decoder_start_token_id"] == 0
    texts = ["a b c d", "h g", "e e f", "b"]
    greedy = _hf_matches_ours(loaded.model, d / "hf", texts, 16)
    assert (greedy[:, 1:] > 2).sum() >= 4  # real tokens were generated, not only EOS / padding
    _hf_matches_ours(loaded.model, d / "hf", texts, 16, num_beams=3, length_penalty=0.6)
    _hf_matches_ours(loaded.model, d / "hf", texts, 16, num_beams=2, no_repeat_ngram_size=2)
    _hf_matches_ours(loaded.model, d / "hf", texts, 16, encoder_repetition_penalty=2.5)
    # a run's no_repeat_ngram_size becomes generation_config.json's
    generation = {"max_new_tokens": 16, "no_repeat_ngram_size": 2, "encoder_repetition_penalty": 1.5}
    ff.models.save_hf(loaded.model, d / "hf2", generation=generation)
    gen_cfg = json.loads((d / "hf2" / "generation_config.json").read_text())
    assert gen_cfg["no_repeat_ngram_size"] == 2 and gen_cfg["encoder_repetition_penalty"] == 1.5


def test_text2text_ctrl_c_then_resume(pairs, capsys):
    out = pairs["dir"] / "run"
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fastformer",
            "finetune",
            "--train",
            str(pairs["train"]),
            "--eval",
            str(pairs["eval"]),
            *T2T,
            "--steps",
            "100000",
            "--log-every",
            "1",
            "--lr",
            "2e-3",
            "--num-beams",
            "2",
            "--out",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    for line in p.stdout:
        if line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 3:
            break
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-2000:]
    assert "checkpoint saved to" in err and f"fastformer finetune --out {out} --resume" in err
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 3 and not (out / "eval.json").exists()
    # --resume alone continues the text-to-text run with its own settings (task, data, lr, beams, ...)
    assert main(["finetune", "--out", str(out), "--resume", "--steps", str(step + 2), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "finetune text2text" in printed and f"resumed at step {step}" in printed and "2 beams" in printed
    ev = json.loads((out / "eval.json").read_text())
    assert ev["steps"] == step + 2 and ev["generation"]["num_beams"] == 2 and ev["resumed_from"] == step
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == list(range(1, step + 3))
    err = _error_line(capsys, ["finetune", "--out", str(out), "--resume", "--max-target-len", "12"])
    assert "leave --max-target-len out" in err


def test_classification_as_text_through_the_same_command(tmp_path):
    rng = random.Random(1)
    words = {"cat": "animal", "dog": "animal", "ball": "thing", "box": "thing"}

    def write(path, n):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            w = rng.choice(sorted(words))
            rows.append(f"the {w} is here\t{words[w]}")
        path.write_text("\n".join(rows) + "\n")
        return path

    out = tmp_path / "cls"
    assert (
        main(
            [
                "finetune",
                "--train",
                str(write(tmp_path / "train.tsv", 200)),
                "--eval",
                str(write(tmp_path / "eval.tsv", 20)),
                *T2T,
                "--steps",
                "40",
                "--lr",
                "3e-3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ev = json.loads((out / "eval.json").read_text())
    assert {e["target"] for e in ev["examples"]} <= {"animal", "thing"} and ev["accuracy"] == ev["exact_match"]
    assert ev["exact_match"] >= 0.5, ev["examples"]  # two classes, a word decides: learned in 40 steps


def test_span_pretrained_folder_predicts_and_exports(tmp_path):
    rng = random.Random(2)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n\n".join(
            " ".join(rng.choice(["the", "cat", "dog", "sat", "ran", "a", "mat", "far"]) for _ in range(60))
            for _ in range(40)
        )
    )
    pre = tmp_path / "pre"
    assert (
        main(
            [
                "pretrain",
                "--objective",
                "span",
                "--model",
                "t5-tiny",
                "--data",
                str(corpus),
                "--steps",
                "3",
                "--batch-size",
                "4",
                "--seq-len",
                "32",
                "--vocab-size",
                "160",
                "--device",
                "cpu",
                "--no-progress",
                "--out",
                str(pre),
            ]
        )
        == 0
    )
    loaded = ff.models.load(pre)
    assert loaded.kind == "seq2seq"
    from fastformer.train.predict import predict_texts

    cols, rows = predict_texts(loaded, ["the cat sat", "a dog ran far"], max_new_tokens=5)
    assert cols == ["input", "prediction"] and [r["input"] for r in rows] == ["the cat sat", "a dog ran far"]
    assert main(["export", "--model", str(pre), "--hf", str(tmp_path / "hf")]) == 0
    _hf_matches_ours(loaded.model, tmp_path / "hf", ["the cat sat on a mat", "dog"], 6, from_config=False)
    # predict's settings for a span folder travel with it: at most 64 new tokens, inputs cut at --seq-len
    gen_cfg = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    tok_cfg = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert gen_cfg["max_new_tokens"] == 64 and tok_cfg["model_max_length"] == 32
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    long_text = " ".join(["the cat sat on a mat"] * 20)
    batch = hf_tok([long_text], return_tensors="pt", truncation=True)
    ours = loaded.tokenizer.encode(long_text, add_special_tokens=False).ids[:31] + [
        loaded.tokenizer.token_to_id("</s>")
    ]
    assert batch["input_ids"][0].tolist() == ours


def test_text2text_bad_arguments_are_one_line(pairs, capsys, tmp_path):
    d = pairs["dir"]
    ft = [
        "finetune",
        "--train",
        str(pairs["train"]),
        "--eval",
        str(pairs["eval"]),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(d / "bad"),
    ]
    assert "choose classify" in _error_line(capsys, ft + ["--task", "summarize"])
    assert "encoder-decoder" in _error_line(capsys, ft + ["--task", "text2text", "--model", "bert-tiny"])
    assert "--num-beams applies to --task text2text only" in _error_line(capsys, ft + ["--num-beams", "2"])
    assert "--num-beams must be at least 1" in _error_line(capsys, ft + ["--task", "text2text", "--num-beams", "0"])
    err = _error_line(capsys, ft + ["--task", "text2text", "--no-repeat-ngram-size", "-1"])
    assert "--no-repeat-ngram-size must be >= 0" in err
    assert "applies to --task text2text only" in _error_line(capsys, ft + ["--no-repeat-ngram-size", "2"])
    err = _error_line(capsys, ft + ["--task", "text2text", "--encoder-repetition-penalty", "-2"])
    assert "--encoder-repetition-penalty must be a finite number > 0" in err
    assert "applies to --task text2text only" in _error_line(capsys, ft + ["--encoder-repetition-penalty", "2"])
    assert "applies to --task text2text only" in _error_line(capsys, ft + ["--eval-generate", "4"])
    err = _error_line(capsys, ft + ["--task", "text2text", "--eval-generate", "4"])
    assert "--eval-generate N scores generation at each --eval-every evaluation" in err
    err = _error_line(capsys, ft + ["--task", "text2text", "--eval-every", "1", "--eval-generate", "-1"])
    assert "--eval-generate must be >= 0" in err
    assert "not a pretrain output folder" in _error_line(capsys, ft + ["--task", "text2text", "--init", str(tmp_path)])
    cls_run = tmp_path / "cls_run"  # a classifier's folder as --init: said what it holds
    cls_run.mkdir()
    for name in ("tokenizer.json", "checkpoint.pt"):
        (cls_run / name).write_text("")
    (cls_run / "config.json").write_text(
        json.dumps(
            {"run": "finetune", "task": "classify", "objective": "mlm", "architecture": "BertForSequenceClassification"}
        )
    )
    err = _error_line(capsys, ft + ["--task", "text2text", "--init", str(cls_run)])
    assert "this folder holds a classify fine-tuning run (BertForSequenceClassification)" in err
    with pytest.warns(UserWarning, match="--vocab-size 500 is not used: the --init folder brings its own"):
        _error_line(capsys, ft + ["--task", "text2text", "--init", str(cls_run), "--vocab-size", "500"])
    (d / "holes.tsv").write_text("input\ttarget\na b\ta b\nc d\t \n")
    err = _error_line(
        capsys,
        [
            "finetune",
            "--task",
            "text2text",
            "--train",
            str(d / "holes.tsv"),
            "--eval",
            str(pairs["eval"]),
            "--out",
            str(d / "bad"),
        ],
    )
    assert "data row 2 has an empty target" in err
    assert not (d / "bad").exists()
    # targets longer than --max-target-len: said, not silent (the model learns the cut targets)
    with pytest.warns(UserWarning, match=r"400 of 400 targets in .* longer than --max-target-len 2 tokens"):
        assert (
            main(
                ft[:-1]
                + [
                    str(d / "cut"),
                    "--task",
                    "text2text",
                    "--vocab-size",
                    "200",
                    "--steps",
                    "1",
                    "--max-target-len",
                    "2",
                ]
            )
            == 0
        )
    (d / "notes").mkdir()
    (d / "notes" / "mine.txt").write_text("keep")
    assert "not empty" in _error_line(capsys, ft[:-1] + [str(d / "notes"), "--task", "text2text"])
    # --resume of a folder without a run says so (not "needs --train FILE.tsv")
    err = _error_line(capsys, ["finetune", "--task", "text2text", "--out", str(d / "none"), "--resume"])
    assert "--resume: no checkpoint in" in err


def test_run_from_a_relative_init_resumes_from_anywhere(tmp_path, monkeypatch, capsys):
    """--init given as a relative path: the printed `--resume` command, run from the same or another
    directory, continues the run (the checkpoint records the folder as config.json does: resolved)."""
    rng = random.Random(5)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    Path("corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(LETTERS) for _ in range(40)) for _ in range(30)) + "\n"
    )
    pre = ["pretrain", "--objective", "span", "--model", "t5-tiny", "--data", "corpus.txt", "--steps", "2"]
    pre += ["--batch-size", "4", "--seq-len", "32", "--vocab-size", "160", "--device", "cpu", "--no-progress"]
    assert main([*pre, "--out", "span"]) == 0
    train = _copy_pairs(Path("train.tsv"), 40, rng)
    ev = _copy_pairs(Path("eval.tsv"), 20, rng, header=None)
    args = ["finetune", "--task", "text2text", "--init", "span", "--train", str(train), "--eval", str(ev)]
    args += ["--steps", "2", "--batch-size", "8", "--max-len", "16", "--max-target-len", "12"]
    assert main([*args, "--device", "cpu", "--no-progress", "--out", "t2t"]) == 0
    assert main(["finetune", "--out", "t2t", "--resume", "--steps", "3", "--no-progress"]) == 0
    monkeypatch.chdir(tmp_path)
    assert main(["finetune", "--out", str(work / "t2t"), "--resume", "--steps", "4", "--no-progress"]) == 0
    capsys.readouterr()
    ev = json.loads((work / "t2t" / "eval.json").read_text())
    assert ev["steps"] == 4 and ev["resumed_from"] == 3 and ev["source"].startswith(f"init {work / 'span'}")
