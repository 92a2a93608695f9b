"""Trainer: loss goes down, exact resume, atomic checkpoints, schedules, accumulation, mismatches."""

import json

import pytest
import torch
from train_helpers import tiny_config, tiny_corpus  # noqa: F401 (fixture)

from fastformer.train import checkpoint as ckpt_mod
from fastformer.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastformer.train.metrics import read_metrics
from fastformer.train.objectives import OBJECTIVES, UnknownObjectiveError, get_objective
from fastformer.train.pretrain import pretrain
from fastformer.train.run_dir import FastformerWarning
from fastformer.train.schedules import lr_factor

# tiny generated corpora: a held-out slice of one or two examples, said in a warning
pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice", "ignore:--eval .* has only")

KEYS = ("step", "loss", "lr", "grad_norm", "predicted_tokens", "eval_loss", "eval_accuracy")


def _strip(rows):
    return [{k: r.get(k) for k in KEYS} for r in rows]


def test_loss_decreases_and_files_written(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    s = pretrain(tiny_config(out, tiny_corpus, steps=30, log_every=5, eval_every=15, batch_size=8))
    rows = read_metrics(out / "metrics.jsonl")
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-3:]) / 3
    assert last < first - 1.0, (first, last)
    assert rows[-1]["eval_loss"] < rows[0]["loss"]
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
    for f in ("metrics.jsonl", "config.json", "tokenizer.json", "checkpoint.pt", "loss.png"):
        assert (out / f).stat().st_size > 0, f
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["objective"] == "mlm" and cfg["model"] == "bert-tiny" and s["steps"] == 30


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path, tiny_corpus):
    full = tmp_path / "full"
    pretrain(tiny_config(full, tiny_corpus, steps=8))
    # HF's WordPiece trainer breaks frequency ties differently on every run: share the tokenizer.
    tok = str(full / "tokenizer.json")
    part = tmp_path / "part"
    s = pretrain(tiny_config(part, tiny_corpus, steps=8, stop_at=5, tokenizer=tok))  # "interrupted" after step 5
    assert s["steps"] == 5 and s["stopped_early"]
    assert load_checkpoint(part / "checkpoint.pt")["step"] == 5
    pretrain(tiny_config(part, tiny_corpus, steps=8, resume=True))
    a, b = _strip(read_metrics(full / "metrics.jsonl")), _strip(read_metrics(part / "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 9))
    assert a == b
    sa = load_checkpoint(full / "checkpoint.pt")["model"]
    sb = load_checkpoint(part / "checkpoint.pt")["model"]
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_line_by_line_dynamic_padding_with_grad_accumulation(tmp_path, tiny_corpus):
    """--line-by-line examples (padded to a multiple of 8, key-padding mask) with 2 micro-batches per
    step: the logged loss is the mean over the predicted tokens of both micro-batches."""
    out = tmp_path / "acc"
    pretrain(
        tiny_config(
            out, tiny_corpus, steps=4, grad_accum=2, eval_every=0, optimizer="adamw", packing=False, schedule="cosine"
        )
    )
    rows = read_metrics(out / "metrics.jsonl")
    assert len(rows) == 4 and all(r["loss"] > 0 and r["predicted_tokens"] > 0 for r in rows)


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk full"):
        save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["step"] == 1 and torch.equal(ck["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left behind


def test_resume_from_another_model_or_missing_checkpoint_fails(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint"):
        pretrain(tiny_config(out, tiny_corpus, resume=True))
    pretrain(tiny_config(out, tiny_corpus, steps=2, eval_every=0))
    with pytest.raises(CheckpointError, match="another model"):
        pretrain(tiny_config(out, tiny_corpus, steps=4, resume=True, model="bert-mini"))


def test_resume_warns_when_the_data_changed(tmp_path, tiny_corpus):
    import warnings

    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=2, eval_every=0))
    digest = json.loads((out / "config.json").read_text())["data_digest"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", "--data .* changed")  # the same text: no warning
        pretrain(tiny_config(out, tiny_corpus, steps=3, eval_every=0, resume=True))
    assert json.loads((out / "config.json").read_text())["data_digest"] == digest
    tiny_corpus.write_text(tiny_corpus.read_text().replace("the", "a", 1))  # one word of the text
    with pytest.warns(FastformerWarning, match="changed since this run began .*no longer the run"):
        pretrain(tiny_config(out, tiny_corpus, steps=4, eval_every=0, resume=True))
    assert json.loads((out / "config.json").read_text())["data_digest"] != digest


def test_finetune_resume_warns_when_train_or_eval_changed(tmp_path):
    import warnings

    from train_helpers import finetune_config, make_tsv

    from fastformer.train.finetune import finetune
    from fastformer.train.text2text import Text2TextConfig, finetune_text2text

    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    out = tmp_path / "ft"
    finetune(finetune_config(out, train, ev, steps=2))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", ".* changed since this run began")  # the same rows: no warning
        finetune(finetune_config(out, train, ev, steps=3, resume=True))
    train.write_text("\n".join(train.read_text().splitlines()[:-3]) + "\n")  # three rows fewer
    with pytest.warns(FastformerWarning, match=f"--train {train} changed since this run began: the resumed run trains"):
        finetune(finetune_config(out, train, ev, steps=4, resume=True))

    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("input\ttarget\n" + "".join(f"a b {i}\tb {i}\n" for i in range(40)))
    base = dict(train=str(pairs), eval=str(pairs), model="t5-tiny", batch_size=4, vocab_size=200, max_len=8)
    base.update(max_target_len=8, device="cpu", progress=False, eval_generate=0, out_dir=str(tmp_path / "t2t"))
    finetune_text2text(Text2TextConfig(steps=1, **base))
    pairs.write_text(pairs.read_text().replace("a b 3", "a c 3"))
    with pytest.warns(FastformerWarning, match="--eval .* changed since this run began: the resumed run evaluates"):
        finetune_text2text(Text2TextConfig(steps=2, resume=True, **base))


def test_schedules():
    assert lr_factor(0, total=100, warmup=10) == pytest.approx(0.1)
    assert lr_factor(9, total=100, warmup=10) == pytest.approx(1.0)
    assert lr_factor(55, total=100, warmup=10) == pytest.approx(0.5)
    assert lr_factor(100, total=100, warmup=10) == 0.0
    assert lr_factor(55, total=100, warmup=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(50, total=100, warmup=0, kind="constant") == 1.0
    with pytest.raises(ValueError, match="schedule"):
        lr_factor(0, total=1, warmup=0, kind="exp")


def test_objective_registry():
    assert set(OBJECTIVES) == {"mlm", "span"}
    assert get_objective("mlm").family == "bert"
    with pytest.raises(UnknownObjectiveError, match="unknown objective"):
        get_objective("clm")


def test_resume_checks_the_flags_and_follows_a_new_step_count(tmp_path, tiny_corpus):
    """--resume with a flag that shapes the optimisation changed is refused (it would not be the same
    run, and config.json would record a value never used); --steps may change, and the schedule of
    the new total applies from the first resumed step."""
    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=2, eval_every=0, schedule="linear", warmup_steps=0))
    for flag, value in (("lr", 5e-3), ("seed", 4), ("batch_size", 2), ("schedule", "cosine")):
        with pytest.raises(CheckpointError, match=flag):
            pretrain(
                tiny_config(
                    out,
                    tiny_corpus,
                    steps=4,
                    eval_every=0,
                    warmup_steps=0,
                    resume=True,
                    **{"schedule": "linear", flag: value},
                )
            )
    pretrain(tiny_config(out, tiny_corpus, steps=4, eval_every=0, schedule="linear", warmup_steps=0, resume=True))
    lrs = [r["lr"] for r in read_metrics(out / "metrics.jsonl")]
    # steps 1-2 ran under the 2-step schedule, steps 3-4 under the 4-step one
    expect = [1e-3 * lr_factor(s, total=2, warmup=0) for s in (0, 1)] + [
        1e-3 * lr_factor(s, total=4, warmup=0) for s in (2, 3)
    ]
    assert lrs == pytest.approx(expect)


def test_tokenizer_that_does_not_fit_is_a_data_error(tmp_path, tiny_corpus):
    from fastformer.data.corpus import DataError

    bad = tmp_path / "config.json"
    bad.write_text('{"not": "a tokenizer",}')
    with pytest.raises(DataError, match="not a tokenizer.json"):
        pretrain(tiny_config(tmp_path / "a", tiny_corpus, steps=1, tokenizer=str(bad)))
    # a span run's Unigram tokenizer has other special ids: the MLM objective would train on wrong ids
    unigram = get_objective("span").build_tokenizer([tiny_corpus.read_text()] * 3, 200)
    path = tmp_path / "unigram.json"
    unigram.save(str(path))
    with pytest.raises(DataError, match="WordPiece"):
        pretrain(tiny_config(tmp_path / "b", tiny_corpus, steps=1, tokenizer=str(path)))


def test_max_minutes_must_be_positive(tmp_path, tiny_corpus):
    with pytest.raises(ValueError, match="max-minutes"):
        pretrain(tiny_config(tmp_path / "r", tiny_corpus, steps=1, max_minutes=-1.0))


def test_compiled_training_matches_eager(tmp_path, tiny_corpus):
    """--compile wraps the training forward in torch.compile (the fastformer ops stay opaque); with the
    'eager' backend the arithmetic is the same, so every logged loss is equal; the checkpoint keeps
    the plain module's keys."""
    a, b = tmp_path / "a", tmp_path / "b"
    pretrain(tiny_config(a, tiny_corpus, steps=3, eval_every=0))
    pretrain(tiny_config(b, tiny_corpus, steps=3, eval_every=0, compile="eager", tokenizer=str(a / "tokenizer.json")))
    la = [r["loss"] for r in read_metrics(a / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(b / "metrics.jsonl")]
    assert la == pytest.approx(lb, rel=1e-6)
    assert set(load_checkpoint(a / "checkpoint.pt")["model"]) == set(load_checkpoint(b / "checkpoint.pt")["model"])
    with pytest.raises(ValueError, match="compile"):
        pretrain(tiny_config(tmp_path / "c", tiny_corpus, steps=1, compile="no-such-backend"))


def test_resume_accepts_older_checkpoints_and_an_equal_explicit_warmup(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=50, stop_at=2, eval_every=0))  # default warmup: 3 steps
    # an explicit --warmup-steps equal to the default's value is the same run
    pretrain(tiny_config(out, tiny_corpus, steps=50, stop_at=3, eval_every=0, warmup_steps=3, resume=True))
    with pytest.raises(CheckpointError, match="warmup"):
        pretrain(tiny_config(out, tiny_corpus, steps=50, stop_at=4, eval_every=0, warmup_steps=7, resume=True))
    # a checkpoint written before the data / flag fingerprint existed still resumes
    ck = load_checkpoint(out / "checkpoint.pt")
    for key in ("data", "packing", "train"):
        ck["fingerprint"].pop(key)
    save_checkpoint(ck, out / "checkpoint.pt")
    s = pretrain(tiny_config(out, tiny_corpus, steps=50, stop_at=4, eval_every=0, resume=True))
    assert s["steps"] == 4


def test_each_rank_restores_its_own_cuda_generator(monkeypatch):
    """Under torchrun only rank 0 saves the RNG state; its list of all devices holds the other ranks'
    devices as rank 0 sees them (never drawn from). Each rank restores its own device from rank 0's own
    device (the ranks draw alike). Checked with torch.cuda stubs: no GPU here."""
    from fastformer.train.checkpoint import rng_state, set_rng_state

    states = {"all": [torch.tensor([0]), torch.tensor([1])], "current": torch.tensor([7])}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: states["all"])
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": states["current"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda s: restored.append(("all", s)))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device="cuda": restored.append(("current", s)))
    saved = rng_state()
    assert torch.equal(saved["cuda_current"], states["current"])
    set_rng_state(saved)
    assert restored[-1][0] == "current" and torch.equal(restored[-1][1], states["current"])
