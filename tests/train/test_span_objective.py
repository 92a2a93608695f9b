"""The span objective on its own (the trainer lives in another layer): tokenizer, examples, collator,
model, step, fine-tuning hooks; the loss falls on a tiny generated corpus."""

import random

import pytest
import torch

from fastformer.data.span_corruption import span_corruption_lengths
from fastformer.data.unigram_tokenizer import EOS, PAD, load_unigram, sentinel_ids
from fastformer.train.span_objective import SpanObjective

# tiny generated corpora: a held-out slice of one or two examples, said in a warning
pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice", "ignore:--eval .* has only")


def _corpus(n_docs=60, seed=0):
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the old man", "my sister", "the teacher", "a small bird"]
    verbs = ["sees", "likes", "follows", "draws", "finds", "calls"]
    objects = ["the red ball", "a green tree", "the river", "an open window", "the blue house"]
    docs = []
    for _ in range(n_docs):
        docs.append(
            " ".join(
                f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(3, 8))
            )
        )
    return docs


@pytest.fixture(scope="module")
def setup():
    obj = SpanObjective()
    texts = _corpus()
    tok = obj.build_tokenizer(texts, 300)
    return obj, texts, tok


def test_tokenizer_has_t5_specials_and_round_trips(setup, tmp_path):
    _, texts, tok = setup
    assert tok.token_to_id("<pad>") == PAD and tok.token_to_id("</s>") == EOS
    sents = sentinel_ids(tok)
    assert len(sents) == 100 and sents[0] == tok.get_vocab_size() - 1 and sents == sorted(sents, reverse=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    tok2 = load_unigram(tmp_path / "tokenizer.json")
    ids = tok2.encode(texts[0], add_special_tokens=False).ids
    assert tok2.decode(ids) == texts[0]


def test_examples_collate_to_exact_seq_len(setup):
    obj, texts, tok = setup
    seq_len = 32
    examples = obj.make_examples(texts, tok, seq_len)
    raw, tgt = span_corruption_lengths(seq_len)
    assert len(examples) > 10 and all(e.numel() == raw for e in examples)
    batch = obj.make_collator(tok, seq_len)(examples[:4], torch.Generator().manual_seed(0))
    assert batch["input_ids"].shape == (4, seq_len)
    assert batch["attention_mask"].all()
    assert (batch["labels"] != -100).sum(1).tolist() == [tgt] * 4
    assert obj.input_tokens(batch) == 4 * seq_len
    lines = obj.make_examples(texts, tok, seq_len, packing=False)
    assert all(1 <= e.numel() <= raw for e in lines)


def test_loss_falls_and_fine_tuning_hooks(setup):
    obj, texts, tok = setup
    seq_len = 32
    torch.manual_seed(0)
    examples = obj.make_examples(texts, tok, seq_len)
    coll = obj.make_collator(tok, seq_len)
    model = obj.build_model("t5-tiny", tok, seq_len=seq_len)
    assert obj.flops_per_token(model, seq_len) > 6 * sum(
        p.numel() for n, p in model.named_parameters() if n.startswith("encoder.")
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _step in range(40):
        idx = torch.randint(len(examples), (8,), generator=g).tolist()
        batch = coll([examples[i] for i in idx], g)
        loss_sum, n, _ = obj.step(model, batch)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss_sum.item() / n)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, f"loss did not fall: {first:.3f} -> {last:.3f}"

    # evaluation step counts correct predictions among the predicted tokens
    model.eval()
    with torch.no_grad():
        batch = coll(examples[:4], torch.Generator().manual_seed(1))
        loss_sum, n, metrics = obj.step(model, batch, train=False)
    assert n == int((batch["labels"] != -100).sum()) and 0 < metrics["correct"] <= n

    # fine-tuning: encoder of the pre-trained model + head, rebuilt from the saved config
    cfg = obj.model_config(model)
    clf = obj.build_classifier(cfg, num_labels=3, pretrained_state=model.state_dict())
    assert torch.equal(
        clf.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight,
    )
    ids = obj.encode_for_classification(tok, ["the cat sees the river.", "a dog"], max_len=6)
    assert all(x[-1].item() == EOS and x.numel() <= 6 for x in ids)
    logits = clf(
        torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=PAD),
        torch.nn.utils.rnn.pad_sequence([torch.ones_like(x, dtype=torch.bool) for x in ids], batch_first=True),
    )
    assert logits.shape == (2, 3)
    with pytest.raises(ValueError, match="t5-"):
        obj.build_model("bert-tiny", tok, seq_len=seq_len)


def test_registered_in_the_objective_registry():
    from fastformer.train import objectives

    obj = objectives.get_objective("span")
    assert isinstance(obj, objectives.Objective) and isinstance(obj, SpanObjective)
    assert obj.name == "span" and obj.family == "t5" and obj.default_model == "t5-tiny"


def test_tokenizer_training_is_reproducible():
    # the `tokenizers` Unigram trainer itself is not deterministic; train_unigram canonicalises ids/scores
    texts = _corpus(n_docs=30, seed=5)
    obj = SpanObjective()
    assert obj.build_tokenizer(texts, 200).to_str() == obj.build_tokenizer(texts, 200).to_str()


# ---- with the trainer and CLI (fastformer.train.pretrain, fastformer.cli) ----


def _write_corpus(path):
    path.write_text("\n\n".join(_corpus()) + "\n")
    return path


def test_span_pretrain_resume_equals_an_uninterrupted_run(tmp_path):
    from fastformer.train import pretrain as pt
    from fastformer.train.checkpoint import load_checkpoint
    from fastformer.train.metrics import read_metrics

    corpus = _write_corpus(tmp_path / "corpus.txt")

    def cfg(out, **kw):
        base = dict(
            objective="span",
            model="t5-tiny",
            out_dir=str(out),
            data=[str(corpus)],
            steps=6,
            batch_size=4,
            seq_len=32,
            vocab_size=200,
            lr=2e-3,
            log_every=1,
            eval_every=3,
            eval_batches=2,
            progress=False,
            seed=3,
            device="cpu",
        )
        return pt.PretrainConfig(**{**base, **kw})

    full, part = tmp_path / "full", tmp_path / "part"
    pt.pretrain(cfg(full))
    s = pt.pretrain(cfg(part, stop_at=4, tokenizer=str(full / "tokenizer.json")))
    assert s["steps"] == 4 and s["stopped_early"]
    pt.pretrain(cfg(part, resume=True))
    keys = ("step", "loss", "lr", "grad_norm", "predicted_tokens", "eval_loss", "eval_accuracy")
    a = [{k: r.get(k) for k in keys} for r in read_metrics(full / "metrics.jsonl")]
    b = [{k: r.get(k) for k in keys} for r in read_metrics(part / "metrics.jsonl")]
    assert [r["step"] for r in b] == list(range(1, 7)) and a == b
    sa, sb = load_checkpoint(full / "checkpoint.pt")["model"], load_checkpoint(part / "checkpoint.pt")["model"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_cli_span_pretrain_then_finetune_from_the_encoder(tmp_path):
    import json

    from fastformer import cli

    corpus = _write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "pre"
    rc = cli.main(
        [
            "pretrain",
            "--objective",
            "span",
            "--model",
            "t5-tiny",
            "--data",
            str(corpus),
            "--steps",
            "6",
            "--batch-size",
            "4",
            "--seq-len",
            "32",
            "--vocab-size",
            "200",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            "--log-every",
            "2",
        ]
    )
    assert rc in (0, None)
    for f in ("metrics.jsonl", "config.json", "tokenizer.json", "loss.png"):
        assert (out / f).stat().st_size > 0, f
    assert json.loads((out / "config.json").read_text())["objective"] == "span"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all({"step", "loss", "lr", "tokens_per_s"} <= set(r) for r in rows)

    rng = random.Random(1)
    for name, n in (("train.tsv", 24), ("eval.tsv", 8)):
        lines = ["sentence\tlabel"]
        for _ in range(n):
            label = rng.randint(0, 1)
            words = ["the cat sees the river", "a dog likes the red ball"][label]
            lines.append(f"{words} .\t{'pos' if label else 'neg'}")
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    ft = tmp_path / "ft"
    rc = cli.main(
        [
            "finetune",
            "--train",
            str(tmp_path / "train.tsv"),
            "--eval",
            str(tmp_path / "eval.tsv"),
            "--init",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(ft),
            "--no-progress",
        ]
    )
    assert rc in (0, None)
    ev = json.loads((ft / "eval.json").read_text())
    assert 0.0 <= ev["accuracy"] <= 1.0


def test_a_seq_len_beyond_the_sentinels_is_refused_before_anything_is_written(tmp_path, capsys, setup):
    """--seq-len 1810 needs 101 sentinels of the tokenizer's 100: it crashed at the first batch, after
    config.json was written ("101 spans need more sentinel tokens than the 100 given")."""
    import warnings

    from fastformer import cli

    obj, texts, tok = setup
    obj.make_collator(tok, 1809)  # the longest that fits
    for call in (lambda: obj.make_examples(texts, tok, 1810), lambda: obj.make_collator(tok, 1810)):
        with pytest.raises(ValueError, match=r"--seq-len 1810 is too long .* 101 noise spans.* allow is 1809"):
            call()
    corpus = _write_corpus(tmp_path / "corpus.txt")
    out = tmp_path / "long"
    argv = ["pretrain", "--objective", "span", "--data", str(corpus), "--seq-len", "1810", "--vocab-size", "200"]
    with warnings.catch_warnings():  # restores the showwarning the CLI installs
        rc = cli.main([*argv, "--steps", "2", "--device", "cpu", "--no-memory-check", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("fastformer: error: --seq-len 1810 is too long for the span objective")
    assert err[-1].endswith("the longest --seq-len they allow is 1809"), err
    assert not any((out / f).exists() for f in ("config.json", "tokenizer.json", "checkpoint.pt"))
    # said before the memory check, which a batch this size fails: fixing one error must not lead to another
    with warnings.catch_warnings():
        rc = cli.main([*argv, "--steps", "2", "--device", "cpu", "--batch-size", "100000", "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--seq-len 1810 is too long" in err[-1], err
    # a t5-* preset without --objective: the error says which objective trains it
    with warnings.catch_warnings():
        rc = cli.main(["pretrain", "--model", "t5-tiny", "--data", str(corpus), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].endswith("leave --model out for bert-tiny, or give --objective span for t5-tiny"), err
