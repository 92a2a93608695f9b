"""The fine-tuning recipe: epochs with a minimum step count, a stratified held-out slice of the training
labels that picks the weights (never the eval file), and defaults that learn a small task out of the box."""

import json
import random

import pytest
import torch

from fastformer.cli import main
from fastformer.train.checkpoint import load_checkpoint
from fastformer.train.finetune import FinetuneConfig, heldout_split, planned_steps

CUE = {"pos": ["good", "great", "lovely"], "neg": ["bad", "awful", "poor"]}
FILLER = ["the", "film", "was", "a", "story", "and", "very", "plot", "actor", "music", "long", "it"]


def _write(path, n, seed):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        lab = rng.choice(sorted(CUE))
        words = rng.sample(FILLER, 5) + [rng.choice(CUE[lab])]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{lab}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_heldout_split_is_stratified_disjoint_and_seeded():
    labels = [0] * 50 + [1] * 30 + [2] * 20 + [3]
    fit, held = heldout_split(labels, 0.1, seed=4)
    assert sorted(fit + held) == list(range(len(labels))) and not set(fit) & set(held)
    assert [sum(labels[i] == c for i in held) for c in range(4)] == [5, 3, 2, 0]  # a lone example stays in fit
    assert heldout_split(labels, 0.1, seed=4) == (fit, held)
    assert heldout_split(labels, 0.1, seed=5)[1] != held
    assert heldout_split(labels, 0.0, seed=4) == (list(range(len(labels))), [])


def test_default_lr_scales_with_the_width():
    from fastformer.train.finetune import default_lr

    assert default_lr({"hidden_size": 768}) == pytest.approx(1e-4)
    assert default_lr({"hidden_size": 128}) == pytest.approx(6e-4)
    assert default_lr({"d_model": 256}) == pytest.approx(3e-4)


def test_planned_steps_epochs_minimum_and_explicit_steps():
    cfg = FinetuneConfig(batch_size=16, epochs=4, min_steps=300)
    assert planned_steps(90, cfg) == (300, 6)  # few labels: the minimum wins
    assert planned_steps(9000, cfg) == (2252, 563)  # many: 4 epochs
    assert planned_steps(9000, FinetuneConfig(batch_size=16, steps=50)) == (50, 563)
    with pytest.raises(ValueError, match="--val-fraction"):
        FinetuneConfig(train="t.tsv", eval="e.tsv", val_fraction=1.0).validate()
    # --warmup-steps without --steps: checked against the planned steps later, not a placeholder now
    FinetuneConfig(train="t.tsv", eval="e.tsv", warmup_steps=50).validate()


def test_default_recipe_learns_a_small_task_and_keeps_the_selected_weights(tmp_path):
    train, test = _write(tmp_path / "train.tsv", 120, 0), _write(tmp_path / "test.tsv", 200, 1)
    out = tmp_path / "ft"
    # no --steps, --lr, --epochs: the defaults a user gets
    assert (
        main(
            [
                "finetune",
                "--train",
                str(train),
                "--eval",
                str(test),
                "--model",
                "bert-tiny",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--no-progress",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    ev = json.loads((out / "eval.json").read_text())
    assert ev["accuracy"] > 0.8, ev  # chance is 0.5: one cue word per row decides the label
    # no --lr: the width rule (bert-tiny is 128 wide)
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == pytest.approx(6e-4)
    assert ev["n_train"] == 120 and ev["n_val"] == 12 and ev["n_fit"] == 108
    assert 0 < ev["selected_step"] <= ev["steps"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    assert len(evals) >= 5  # the held-out slice was scored along the way
    best = max(evals, key=lambda r: (r["eval_accuracy"], -r["eval_loss"]))
    selected = next(r for r in evals if r["step"] == ev["selected_step"])
    # the best held-out evaluation (metrics.jsonl rounds to 6 digits: a tie there may differ in the 7th)
    assert selected["eval_accuracy"] == best["eval_accuracy"]
    assert selected["eval_loss"] <= best["eval_loss"] + 2e-6
    # the checkpoint holds the weights that were scored on --eval (the selected ones)
    from fastformer.data.packing import pad_batch
    from fastformer.data.tokenizer import load_tokenizer
    from fastformer.data.tsv import read_tsv
    from fastformer.train.mlm_objective import MLMObjective

    ck = load_checkpoint(out / "checkpoint.pt")
    obj = MLMObjective()
    model = obj.build_classifier(ck["fingerprint"]["model_config"], 2)
    model.load_state_dict(ck["model"])
    texts, labels = read_tsv(test)
    ids, mask = pad_batch(obj.encode_for_classification(load_tokenizer(out / "tokenizer.json"), texts, 128), 0)
    with torch.no_grad():
        pred = model.eval()(ids, mask).argmax(-1)
    acc = (pred == torch.tensor([ev["labels"].index(x) for x in labels])).float().mean().item()
    assert acc == pytest.approx(ev["accuracy"])


def test_the_eval_file_never_steers_training(tmp_path):
    train = _write(tmp_path / "train.tsv", 60, 0)
    results = []
    for i, seed in enumerate((1, 2)):  # two different eval files, everything else equal
        out = tmp_path / f"ft{i}"
        assert (
            main(
                [
                    "finetune",
                    "--train",
                    str(train),
                    "--eval",
                    str(_write(tmp_path / f"e{i}.tsv", 30, seed)),
                    "--model",
                    "bert-tiny",
                    "--device",
                    "cpu",
                    "--out",
                    str(out),
                    "--no-progress",
                    "--min-steps",
                    "24",
                    "--seed",
                    "5",
                ]
            )
            == 0
        )
        results.append(
            (
                json.loads((out / "eval.json").read_text())["selected_step"],
                load_checkpoint(out / "checkpoint.pt")["model"],
            )
        )
    (s0, w0), (s1, w1) = results
    assert s0 == s1 and all(torch.equal(w0[k], w1[k]) for k in w0)


def test_a_session_the_cap_stopped_adds_no_candidate_to_the_selection(tmp_path, monkeypatch):
    """--max-minutes with --steps stops a session like an interruption. It evaluated the held-out
    slice at the stop as well, and that score took part in the selection: the resumed run could keep
    weights an uninterrupted one never scores. A fake clock (one "second" per step) stops at step 6."""
    import fastformer.train.finetune as F

    init = F._SelectingTrainer.__init__

    def with_step_clock(self, *a, **kw):
        init(self, *a, **kw)
        self.clock = lambda: float(self.step)

    monkeypatch.setattr(F._SelectingTrainer, "__init__", with_step_clock)
    train, test = _write(tmp_path / "train.tsv", 80, 0), _write(tmp_path / "test.tsv", 40, 1)
    kw = dict(train=str(train), eval=str(test), model="bert-tiny", steps=12, eval_every=4, batch_size=8)
    kw.update(max_len=32, vocab_size=120, lr=2e-3, progress=False, seed=1, threads=1)
    ref = F.finetune(FinetuneConfig(out_dir=str(tmp_path / "ref"), **kw))
    first = F.finetune(FinetuneConfig(out_dir=str(tmp_path / "cap"), max_minutes=6 / 60, **kw))
    assert first["steps"] == 6 and first["stopped_early"] and not ref["stopped_early"]
    res = F.finetune(FinetuneConfig(out_dir=str(tmp_path / "cap"), resume=True, **kw))
    assert res["steps"] == 12 and not res["stopped_early"]

    def eval_steps(run):
        rows = [json.loads(x) for x in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return [r["step"] for r in rows if "eval_accuracy" in r]

    assert eval_steps("ref") == eval_steps("cap") == [4, 8, 12]
    assert res["selected_step"] == ref["selected_step"]
    assert res["accuracy"] == ref["accuracy"]
