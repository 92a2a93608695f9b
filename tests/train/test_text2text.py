"""Text-to-text fine-tuning (library level): a copy task the model learns, classification as text from a
span pre-trained folder, ROUGE and exact match. Tiny generated pairs, CPU."""

import json
import random

import pytest
from train_helpers import make_corpus, tiny_config

import fastformer as ff
from fastformer.train.text2text import Text2TextConfig, finetune_text2text, generate_texts, load_text2text
from fastformer.train.text_metrics import exact_match, normalize_text, rouge

pytestmark = pytest.mark.filterwarnings("ignore:--eval .* has only", "ignore:the held-out slice")

SMALL = dict(d_model=64, d_ff=128, d_kv=16, num_heads=4, num_layers=2, num_decoder_layers=2)


def _copy_pairs(path, n, rng, header):
    with open(path, "w") as f:
        if header:
            f.write("input\ttarget\n")
        for _ in range(n):
            s = " ".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 3)))
            f.write(f"{s}\t{s}\n")
    return path


def test_copy_task_is_learned(tmp_path):
    rng = random.Random(0)
    train = _copy_pairs(tmp_path / "train.tsv", 2000, rng, header=True)
    ev = _copy_pairs(tmp_path / "eval.tsv", 48, rng, header=False)
    out = tmp_path / "run"
    cfg = Text2TextConfig(
        train=str(train),
        eval=str(ev),
        model="t5-tiny",
        model_overrides=SMALL,
        steps=300,
        batch_size=32,
        lr=3e-3,
        warmup_steps=10,
        vocab_size=200,
        max_len=24,
        max_target_len=24,
        out_dir=str(out),
        device="cpu",
        progress=False,
        log_every=50,
        eval_every=100,
        eval_generate=16,
        n_examples=5,
        seed=0,
    )
    s = finetune_text2text(cfg)
    assert s["exact_match"] >= 0.8, s["examples"]
    assert s["rougeL"] >= 0.9 and s["rouge1"] >= 0.9 and s["rouge2"] >= 0.5
    assert s["accuracy"] == s["exact_match"] and s["n_eval"] == 48 and s["steps"] == 300
    assert s["token_accuracy"] > 0.9 and s["eval_loss"] < 0.3
    on_disk = json.loads((out / "eval.json").read_text())
    assert on_disk["rougeL"] == s["rougeL"] and len(on_disk["examples"]) == 5
    assert set(on_disk["examples"][0]) == {"input", "target", "prediction"}
    rows = (out / "predictions.tsv").read_text().splitlines()
    assert rows[0] == "input\ttarget\tprediction" and len(rows) == 49
    # --eval-generate: ROUGE of the first 16 eval pairs at every evaluation, in metrics.jsonl
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    periodic = [r for r in records if "eval_rougeL" in r]
    assert [r["step"] for r in periodic] == [100, 200, 300]
    for r in periodic:
        assert {"eval_rouge1", "eval_rouge2", "eval_exact_match", "eval_loss"} <= r.keys()
        assert 0.0 <= r["eval_rougeL"] <= 1.0 and 0.0 <= r["eval_exact_match"] <= 1.0
    first16 = [r.split("\t") for r in rows[1:17]]
    want = rouge([p for _, _, p in first16], [t for _, t, _ in first16])["rougeL"]
    assert abs(periodic[-1]["eval_rougeL"] - want) < 1e-9  # the final model, the same 16 predictions
    config = json.loads((out / "config.json").read_text())
    assert config["task"] == "text2text" and config["model_config"]["d_model"] == 64
    assert config["architecture"] == "T5ForConditionalGeneration" and config["run"] == "finetune"
    assert config["generation"]["max_new_tokens"] == 24
    for f in ("tokenizer.json", "checkpoint.pt", "metrics.jsonl"):
        assert (out / f).is_file(), f
    # the folder reloads and generates the same predictions
    model, tok, config = load_text2text(out)
    inputs = [r.split("\t")[0] for r in rows[1:]]
    again = generate_texts(model, tok, inputs, max_len=config["max_len"], batch_size=7, **config["generation"])
    assert again == [r.split("\t")[2] for r in rows[1:]]
    # so does ff.models.load's object, used as the model itself (`generate` included)
    loaded = ff.models.load(out)
    assert (
        generate_texts(loaded, loaded.tokenizer, inputs[:9], max_len=config["max_len"], **config["generation"])
        == (again[:9])
    )


def test_classification_as_text_from_span_pretraining(tmp_path):
    from fastformer.train.pretrain import pretrain

    corpus = make_corpus(tmp_path / "corpus.txt")
    pre = tmp_path / "pre"
    pretrain(tiny_config(pre, corpus, objective="span", model="t5-tiny", steps=3, vocab_size=200, eval_every=0))
    rng = random.Random(1)
    words = {"cat": "animal", "dog": "animal", "bird": "animal", "ball": "thing", "box": "thing", "tree": "thing"}

    def write(path, n):
        with open(path, "w") as f:
            f.write("text\tlabel\n")
            for _ in range(n):
                w = rng.choice(sorted(words))
                f.write(f"the {w} is here\t{words[w]}\n")
        return path

    train, ev = write(tmp_path / "train.tsv", 200), write(tmp_path / "eval.tsv", 16)
    out = tmp_path / "cls"
    s = finetune_text2text(
        Text2TextConfig(
            train=str(train),
            eval=str(ev),
            init=str(pre),
            steps=40,
            batch_size=16,
            lr=2e-3,
            warmup_steps=4,
            max_len=16,
            max_target_len=8,
            dropout=0.1,
            out_dir=str(out),
            device="cpu",
            progress=False,
            log_every=10,
            seed=0,
        )
    )
    assert s["source"].startswith(f"init {pre}")
    assert (out / "tokenizer.json").read_text() == (pre / "tokenizer.json").read_text()
    assert json.loads((out / "config.json").read_text())["model_config"]["dropout_rate"] == 0.1
    assert s["accuracy"] >= 0.75, s["examples"]


def test_refuses_encoder_only_models(tmp_path):
    rng = random.Random(2)
    pairs = _copy_pairs(tmp_path / "p.tsv", 10, rng, header=False)
    with pytest.raises(ValueError, match="encoder-decoder"):
        finetune_text2text(
            Text2TextConfig(
                train=str(pairs),
                eval=str(pairs),
                model="bert-tiny",
                out_dir=str(tmp_path / "o"),
                device="cpu",
                progress=False,
            )
        )
    with pytest.raises(ValueError, match="not both"):
        finetune_text2text(
            Text2TextConfig(
                train=str(pairs),
                eval=str(pairs),
                model="t5-tiny",
                init=str(tmp_path),
                out_dir=str(tmp_path / "o"),
                device="cpu",
                progress=False,
            )
        )
    with pytest.raises(ValueError, match="num-beams"):
        finetune_text2text(
            Text2TextConfig(
                train=str(pairs),
                eval=str(pairs),
                num_beams=0,
                out_dir=str(tmp_path / "o"),
                device="cpu",
                progress=False,
            )
        )


@pytest.mark.parametrize("bad", [True, "2", 0, -1.5, float("nan"), float("inf")])
def test_bad_encoder_repetition_penalty_is_refused_before_training(bad):
    """Refused by validate() (before any training), with the flag's name; a bool is not a number here."""
    with pytest.raises(ValueError, match="--encoder-repetition-penalty must be a finite number > 0"):
        Text2TextConfig(train="a.tsv", eval="b.tsv", encoder_repetition_penalty=bad).validate()


def test_rouge_and_exact_match_values():
    assert rouge(["the cat sat"], ["the cat sat"]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["dog"], ["the cat sat"]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    # unigrams: 2 of 3 on each side; bigrams: 1 of 2; longest common subsequence: 2 of 3
    s = rouge(["the cat sat", "a b"], ["the cat ran", "a b"])
    assert s["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["rouge2"] == pytest.approx((1 / 2 + 1) / 2)
    assert s["rougeL"] == pytest.approx((2 / 3 + 1) / 2)
    assert exact_match(["Sports ", "World", "x"], ["Sports", "world", "x"]) == pytest.approx(2 / 3)
    assert normalize_text("  a\u00a0 b\n c ") == "a b c"
    assert exact_match([], []) == 0.0
    with pytest.raises(ValueError, match="references"):
        rouge(["a"], [])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path):
    import torch

    rng = random.Random(3)
    train = _copy_pairs(tmp_path / "train.tsv", 200, rng, header=True)
    ev = _copy_pairs(tmp_path / "eval.tsv", 4, rng, header=False)
    base = dict(
        train=str(train),
        eval=str(ev),
        model="t5-tiny",
        model_overrides=SMALL,
        steps=6,
        batch_size=8,
        lr=1e-3,
        vocab_size=200,
        max_len=12,
        max_target_len=12,
        device="cpu",
        progress=False,
        seed=0,
        eval_every=2,
        eval_generate=2,  # generation between steps must not disturb the run
    )
    finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "a"), **base))
    finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "b"), stop_at=3, **base))
    s = finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    assert s["steps"] == 6
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_from_init_with_dropout_is_reproducible(tmp_path):
    """--seed decides the dropout masks on the --init path too (it once seeded the random-init path only,
    so two identical commands from a pre-trained folder trained differently)."""
    import torch

    from fastformer.train.pretrain import pretrain

    pre = tmp_path / "pre"
    pretrain(
        tiny_config(
            pre,
            make_corpus(tmp_path / "corpus.txt"),
            objective="span",
            model="t5-tiny",
            steps=2,
            vocab_size=200,
            eval_every=0,
        )
    )
    rng = random.Random(4)
    train = _copy_pairs(tmp_path / "train.tsv", 64, rng, header=True)
    ev = _copy_pairs(tmp_path / "eval.tsv", 4, rng, header=False)
    base = dict(train=str(train), eval=str(ev), init=str(pre), steps=2, batch_size=8, dropout=0.1)
    base.update(max_len=12, max_target_len=12, device="cpu", progress=False, seed=0, eval_generate=0)
    weights = []
    for name in ("a", "b"):
        torch.manual_seed(len(weights) + 11)  # whatever the global RNG held before the run
        finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / name), **base))
        weights.append(torch.load(tmp_path / name / "checkpoint.pt", weights_only=False)["model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_ctrl_c_during_the_final_generation_keeps_the_run_and_resume_generates(tmp_path, monkeypatch):
    import os
    import signal

    import fastformer.train.text2text as t2t
    from fastformer.train.trainer import TrainingInterrupted

    rng = random.Random(4)
    train = _copy_pairs(tmp_path / "train.tsv", 100, rng, header=True)
    ev = _copy_pairs(tmp_path / "eval.tsv", 6, rng, header=False)
    cfg = dict(
        train=str(train),
        eval=str(ev),
        model="t5-tiny",
        model_overrides=SMALL,
        steps=4,
        batch_size=8,
        lr=1e-3,
        vocab_size=200,
        max_len=12,
        max_target_len=12,
        device="cpu",
        progress=False,
        seed=0,
        out_dir=str(tmp_path / "run"),
    )
    original = t2t.generate_texts

    def interrupted(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # the handler raises at once: nothing is generated
        return original(*args, **kw)

    monkeypatch.setattr(t2t, "generate_texts", interrupted)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup or a background shell
    with pytest.raises(TrainingInterrupted) as info:
        finetune_text2text(Text2TextConfig(**cfg))
    assert info.value.saved and info.value.step == 4 and info.value.exit_code == 130
    assert not (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "loss.png").is_file()  # the curve, next to the checkpoint
    assert signal.getsignal(signal.SIGINT) == before  # handlers restored
    monkeypatch.setattr(t2t, "generate_texts", original)
    s = finetune_text2text(Text2TextConfig(resume=True, **cfg))  # no training left: generates
    assert s["steps"] == 4 and s["resumed_from"] == 4 and s["n_eval"] == 6
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert s["final_train_loss"] == last["loss"]


def test_resume_from_init_reads_the_run_not_the_init_folder(tmp_path):
    """As for classification: the --init folder may change or go between the interruption and the
    resume; the run's own tokenizer and config (and its checkpoint's weights) continue it exactly."""
    import shutil

    import torch

    from fastformer.train.pretrain import pretrain

    def pre(out, text, **kw):
        corpus = tmp_path / f"{out.name}.txt"
        corpus.write_text(text)
        pretrain(
            tiny_config(out, corpus, objective="span", model="t5-tiny", steps=2, vocab_size=200, eval_every=0, **kw)
        )

    init = tmp_path / "init"
    pre(init, make_corpus(tmp_path / "corpus.txt").read_text())
    rng = random.Random(4)
    train = _copy_pairs(tmp_path / "train.tsv", 64, rng, header=True)
    ev = _copy_pairs(tmp_path / "eval.tsv", 4, rng, header=False)
    base = dict(train=str(train), eval=str(ev), init=str(init), steps=4, batch_size=8, dropout=0.1)
    base.update(max_len=12, max_target_len=12, device="cpu", progress=False, seed=0, eval_generate=0)
    finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "a"), **base))
    finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "b"), stop_at=2, **base))
    tokenizer = (tmp_path / "b" / "tokenizer.json").read_text()
    pre(init, "\n".join(f"zebra quokka {i} lorem ipsum dolor sit amet" for i in range(300)), overwrite=True)
    finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "b"), resume=True, **base))
    assert (tmp_path / "b" / "tokenizer.json").read_text() == tokenizer
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    shutil.rmtree(init)
    assert finetune_text2text(Text2TextConfig(out_dir=str(tmp_path / "b"), resume=True, **base))["steps"] == 4
