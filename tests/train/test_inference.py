"""Using what was trained: ff.models.load, predict (classifier labels, filled [MASK]), save_hf, and
checkpoints that torch's weights-only loader reads (older ones too)."""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from train_helpers import finetune_config, make_corpus, make_tsv, tiny_config

import fastformer as ff
from fastformer.models.loading import RunFolderError
from fastformer.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from fastformer.train.finetune import finetune
from fastformer.train.predict import PREDICTORS, accuracy, format_rows, predict_texts
from fastformer.train.pretrain import pretrain

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice", "ignore:--eval .* has only")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    corpus = make_corpus(d / "corpus.txt", n_docs=120)
    pretrain(tiny_config(d / "pre", corpus, steps=4, eval_every=0))
    train, ev = make_tsv(d / "train.tsv", 64), make_tsv(d / "eval.tsv", 24, seed=1)
    finetune(finetune_config(d / "ft", train, ev, init=str(d / "pre"), model=None, steps=4))
    return d


def test_load_gives_model_tokenizer_labels_in_eval_mode(runs):
    model, tok, labels = ff.models.load(runs / "ft")
    assert type(model).__name__ == "BertForSequenceClassification" and not model.training
    assert labels == ["neg", "pos"] and tok.token_to_id("[CLS]") == 2
    state = torch.load(runs / "ft" / "checkpoint.pt")["model"]  # torch's default: weights_only=True
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    loaded = ff.models.load(runs / "pre")
    assert loaded.kind == "mlm" and loaded.labels is None and loaded.run_config["run"] == "pretrain"
    with pytest.raises(RunFolderError, match="not a fastformer run folder"):
        ff.models.load(runs)
    with pytest.raises(RunFolderError, match="no such folder"):
        ff.models.load(runs / "missing")


def test_loaded_object_is_the_model_ready_for_inference(runs):
    """`ff.models.load(DIR)` "returns a trained model ready for inference": the object itself is an
    nn.Module in eval mode that computes what its model computes, with the model's other attributes."""
    loaded = ff.models.load(runs / "ft")
    assert isinstance(loaded, torch.nn.Module) and not loaded.training
    assert loaded.config is loaded.model.config and loaded.classifier is loaded.model.classifier
    ids = torch.tensor([[2, 17, 40, 3], [2, 9, 3, 0]])
    mask = ids != 0
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask), loaded.model(ids, mask))
    assert [n for n, _ in loaded.named_parameters()] == [f"model.{n}" for n, _ in loaded.model.named_parameters()]
    loaded.train()
    assert loaded.model.training  # eval() / train() / to() reach the model
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        _ = loaded.missing
    mlm = ff.models.load(runs / "pre")  # a masked LM, called without labels: every position's logits
    with torch.no_grad():
        _, _, logits, _ = mlm(ids, mask)
    assert logits.shape == (2, 4, mlm.config.vocab_size) and torch.isfinite(logits).all()


def test_classifier_predictions_are_the_models_softmax(runs):
    loaded = ff.models.load(runs / "ft")
    texts = ["the film was great", "a sad and awful plot", "x" * 500]
    cols, rows = predict_texts(loaded, texts, batch_size=2)
    assert cols[:3] == ["text", "label", "probability"] and cols[3:] == ["p_neg", "p_pos"]
    ids = [torch.tensor([2] + e.ids[:30] + [3]) for e in loaded.tokenizer.encode_batch(texts, add_special_tokens=False)]
    for t, r, x in zip(texts, rows, ids):
        with torch.no_grad():
            p = F.softmax(loaded.model(x[None], torch.ones_like(x[None], dtype=torch.bool)), -1)[0]
        assert r["text"] == t and r["label"] == loaded.labels[int(p.argmax())]
        assert r["p_neg"] == pytest.approx(float(p[0]), abs=1e-6) and r["probability"] == pytest.approx(float(p.max()))
    assert accuracy(rows, [r["label"] for r in rows]) == 1.0
    # labels by spelling when the model knows them ("01" and "1" two classes), else as integers
    spelled = [{"label": "01"}, {"label": "1"}]
    assert accuracy(spelled, ["1", "01"], names=["01", "1"]) == 0.0
    assert accuracy(spelled, ["1", "01"]) == 1.0  # an older run that recorded integers
    tsv = format_rows(cols, rows, jsonl=False).splitlines()
    assert tsv[0] == "text\tlabel\tprobability\tp_neg\tp_pos" and len(tsv) == 4
    assert json.loads(format_rows(cols, rows, jsonl=True).splitlines()[1])["label"] == rows[1]["label"]


def test_the_loaded_tokenizer_frames_a_text_as_training_did(runs):
    """`tokenizer.encode(text).ids` is what the model was trained on ([CLS] text [SEP] for BERT), so
    feeding it straight to the model gives `predict`'s probabilities; add_special_tokens=False gives
    the bare tokens, and the folder's tokenizer.json is not changed."""
    loaded = ff.models.load(runs / "ft")
    tok = loaded.tokenizer
    bare = tok.encode("the film was great", add_special_tokens=False).ids
    assert tok.encode("the film was great").ids == [2, *bare, 3]
    assert tok.encode("a", "b").ids == [2, *tok.encode("a", add_special_tokens=False).ids, 3] + [
        *tok.encode("b", add_special_tokens=False).ids,
        3,
    ]
    ids = torch.tensor([tok.encode("the film was great").ids])
    with torch.no_grad():
        p = F.softmax(loaded.model(ids, torch.ones_like(ids, dtype=torch.bool)), -1)[0]
    _, rows = predict_texts(loaded, ["the film was great"])
    assert rows[0]["p_pos"] == pytest.approx(float(p[1]), abs=1e-6)
    assert ff.models.load(runs / "pre").tokenizer.encode("x").ids[::2] == [2, 3]  # the masked LM too
    on_disk = json.loads((runs / "ft" / "tokenizer.json").read_text())
    assert on_disk.get("post_processor") is None


def test_fill_mask_uses_the_mlm_head(runs):
    loaded = ff.models.load(runs / "pre")
    cols, rows = predict_texts(loaded, ["the cat [MASK] the ball .", "no mask", "a [mask] sees [MASK] ."], top_k=3)
    assert cols == ["text", "filled", "predictions"]
    assert rows[1]["filled"] == "no mask" and rows[1]["predictions"] == []
    assert len(rows[0]["predictions"]) == 1 and len(rows[2]["predictions"]) == 2
    tok, model = loaded.tokenizer, loaded.model
    x = torch.tensor([[2] + tok.encode("the cat [MASK] the ball .", add_special_tokens=False).ids + [3]])
    with torch.no_grad():
        probs = F.softmax(model.dense_logits(x)[0, 3].index_fill(0, torch.arange(5), float("-inf")), -1)
    best = [(tok.id_to_token(int(i)), float(p)) for p, i in zip(*probs.topk(3))]
    assert [t for t, _ in rows[0]["predictions"][0]] == [t for t, _ in best]
    assert rows[0]["predictions"][0][0][1] == pytest.approx(best[0][1], rel=1e-5)
    word = best[0][0].removeprefix("##")
    assert rows[0]["filled"] == f"the cat {word} the ball ."


def test_a_mask_past_the_models_positions_is_said_not_silently_left(runs):
    """A [MASK] beyond the tokens the model reads stays [MASK]: that used to pass without a word."""
    from fastformer.train.run_dir import FastformerWarning

    loaded = ff.models.load(runs / "pre")
    long = "the " * (loaded.model.config.max_position + 20) + "the [MASK] end [MASK]"
    texts = ["a [MASK] here", long, "the [MASK] sat", long]
    with pytest.warns(
        FastformerWarning,
        match=r"4 \[MASK\] past the model's \d+ tokens are left unfilled, in 2 text\(s\) \(the first: text 2 of",
    ) as rec:
        _, rows = predict_texts(loaded, texts)
    assert len(rec) == 1
    assert rows[1]["filled"] == long and rows[1]["predictions"] == []
    assert "[MASK]" not in rows[0]["filled"] and len(rows[2]["predictions"]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        predict_texts(loaded, texts[:1])  # within the positions: no warning


def test_an_option_the_predictor_does_not_take_is_refused_by_name(runs):
    """A misspelt or foreign option is an error, not silently dropped (the CLI refuses the same flags)."""
    with pytest.raises(ValueError, match="num_beams does not apply to classifier models"):
        predict_texts(ff.models.load(runs / "ft"), ["a"], num_beams=4)
    with pytest.raises(ValueError, match="topk does not apply to mlm models .*top_k"):
        predict_texts(ff.models.load(runs / "pre"), ["a [MASK]"], topk=3)


def test_bad_device_or_top_k_is_a_value_error_naming_it(runs):
    with pytest.raises(ValueError, match="device 'gpu0'"):
        ff.models.load(runs / "ft", device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU"):
            ff.models.load(runs / "ft", device="cuda")
    for k in (0, -3, 2.5):
        with pytest.raises(ValueError, match="top_k must be an int >= 1"):
            predict_texts(ff.models.load(runs / "pre"), ["a [MASK]"], top_k=k)


def test_a_registered_predictor_with_open_options_gets_them(runs, monkeypatch):
    seen = {}

    def predictor(loaded, texts, *, batch_size, device, **options):
        seen.update(options)
        return ["text"], [{"text": t} for t in texts]

    monkeypatch.setitem(PREDICTORS, "mlm", predictor)
    predict_texts(ff.models.load(runs / "pre"), ["a"], temperature=0.5)
    assert seen == {"temperature": 0.5}


def test_a_kind_without_predictor_is_refused_by_name(runs, monkeypatch):
    loaded = ff.models.load(runs / "pre")
    monkeypatch.delitem(PREDICTORS, "mlm")
    with pytest.raises(ValueError, match="predict does not support mlm models"):
        predict_texts(loaded, ["a"])


def test_save_hf_matches_transformers(runs, tmp_path):
    transformers = pytest.importorskip("transformers")
    loaded = ff.models.load(runs / "ft")
    ff.models.save_hf(loaded.model, tmp_path / "hf", tokenizer=loaded.tokenizer, labels=loaded.labels)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    # names that do not fit the classifier are refused before anything is written
    for bad, why in ((["neg"], "1 names for a classifier with 2 classes"), (["a", "a"], "distinct")):
        with pytest.raises(ValueError, match=why):
            ff.models.save_hf(loaded.model, tmp_path / "bad", labels=bad)
        assert not (tmp_path / "bad").exists()
    texts = ["the film was great", "a really sad plot and a poor actor"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    _, rows = predict_texts(loaded, texts)
    with torch.no_grad():
        probs = F.softmax(hf(**batch).logits, -1)
    ours = torch.tensor([[r["p_neg"], r["p_pos"]] for r in rows])
    assert_close(probs, ours, torch.float32, "HF probabilities", factor=10)
    assert hf_tok.decode(batch["input_ids"][0], skip_special_tokens=False).startswith("[CLS]")
    t5_head = ff.models.loading.ARCHITECTURES["T5EncoderForSequenceClassification"].build(
        {"vocab_size": 64, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1}, 2
    )
    with pytest.raises(ValueError, match="no Hugging Face counterpart"):
        ff.models.save_hf(t5_head, tmp_path / "t5")
    # a greedy run's length penalty cannot be saved (transformers keeps one only with beams): said, not lost
    from fastformer.models.t5 import T5Config, T5ForConditionalGeneration
    from fastformer.train.run_dir import FastformerWarning

    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, d_kv=8, num_heads=2, num_layers=1))
    with pytest.warns(FastformerWarning, match="length penalty 0.6 is not in generation_config.json"):
        ff.models.save_hf(t5, tmp_path / "t5g", generation={"num_beams": 1, "length_penalty": 0.6})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastformerWarning)
        hf = ff.models.save_hf(t5, tmp_path / "t5b", generation={"num_beams": 3, "length_penalty": 0.6})
    assert hf.generation_config.length_penalty == 0.6
    # the folder says the head is untied (transformers 5.x would write true; an older one would then tie
    # the head and scale the decoder output), and loads as the same model
    import json

    assert json.loads((tmp_path / "t5b" / "config.json").read_text())["tie_word_embeddings"] is False
    again = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "t5b").eval()
    assert again.lm_head.weight is not again.shared.weight
    ids = torch.randint(2, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids, labels=ids).logits, hf.eval()(input_ids=ids, labels=ids).logits)


def test_older_checkpoints_and_folders_still_load(runs, tmp_path):
    """Before this version a checkpoint held numpy's random state as an array (weights_only=True alone
    refuses it) and a fine-tuning folder had no config.json."""
    old = tmp_path / "old_ft"
    shutil.copytree(runs / "ft", old)
    ck = load_checkpoint(old / "checkpoint.pt")
    np.random.seed(7)
    ck["rng"]["numpy"] = np.random.get_state()
    torch.save(ck, old / "checkpoint.pt")
    with pytest.raises(Exception, match="numpy"):
        torch.load(old / "checkpoint.pt", weights_only=True)
    (old / "config.json").unlink()
    model, _, labels = ff.models.load(old)
    assert labels == ["neg", "pos"] and type(model).__name__ == "BertForSequenceClassification"
    set_rng_state(load_checkpoint(old / "checkpoint.pt")["rng"])
    a = np.random.rand()
    np.random.seed(7)
    assert a == np.random.rand()


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    save_checkpoint({"rng": rng_state()}, tmp_path / "c.pt")
    want = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(torch.load(tmp_path / "c.pt", weights_only=True)["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == want


def test_a_text_to_text_folder_is_a_finetuning_run_of_an_encoder_decoder(tmp_path):
    """A config.json that names a task other than its pre-training objective (text-to-text fine-tuning
    writes `task: text2text`, `objective: span`) is a fine-tuning run of an encoder-decoder."""
    from fastformer.models.loading import read_run_config
    from fastformer.train.run_dir import run_kind

    d = tmp_path / "t2t"
    d.mkdir()
    mc = {"vocab_size": 64, "d_model": 16, "d_ff": 32, "d_kv": 8, "num_heads": 2, "num_layers": 1}
    (d / "config.json").write_text(json.dumps({"task": "text2text", "objective": "span", "model_config": mc}))
    cfg = read_run_config(d)
    assert cfg["run"] == "finetune" and cfg["architecture"] == "T5ForConditionalGeneration" and cfg["kind"] == "seq2seq"
    assert run_kind(d) == "finetune"
