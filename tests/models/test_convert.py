"""ff.models.from_hf / to_hf: BERT and T5 weights between Hugging Face and fastformer models.

For each pair: outputs (hidden states / logits) and losses agree in both directions, round trips are
bitwise exact (state, dtype), and unsupported models / configs raise ValueError naming the problem.
Tiny configs built locally; nothing is downloaded.
"""

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff
from fastformer.models import BertConfig, BertEncoder, BertForMaskedLM, BertForSequenceClassification
from fastformer.models.convert import T5EncoderModel
from fastformer.models.t5 import T5Config, T5EncoderForSequenceClassification, T5ForConditionalGeneration

transformers = pytest.importorskip("transformers")

V = 101
BERT = dict(
    vocab_size=V,
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=3,
    intermediate_size=37,
    max_position_embeddings=40,
    type_vocab_size=2,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
T5 = dict(
    vocab_size=V,
    d_model=32,
    d_ff=48,
    d_kv=16,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
    dropout_rate=0.0,
    decoder_start_token_id=0,
)


def _bert_hf(cls, **kw):
    cfg = transformers.BertConfig(**{**BERT, **kw})
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    _perturb(model)
    return model.double().eval()


def _t5_hf(cls, **kw):
    cfg = transformers.T5Config(**{**T5, **kw})
    cfg._attn_implementation = "eager"
    model = cls(cfg)
    if hasattr(model, "lm_head"):  # transformers 5.x ties the head to `shared`: give it its own values
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.2)
    _perturb(model)
    return model.double().eval()


def _perturb(model):
    """Norm weights, LayerNorm / MLM biases are initialised to 1 / 0: make them non-trivial."""
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n or n.endswith("predictions.bias"):
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.uniform_(-0.3, 0.3)


def _batch(B=3, L=13, Ltgt=7):
    ids = torch.randint(2, V, (B, L))
    am = torch.ones(B, L, dtype=torch.long)
    am[1, 9:] = 0
    am[2, 4:] = 0
    labels = torch.full((B, L), -100)
    labels[:, 1:8:2] = torch.randint(2, V, (B, 4))
    tgt = torch.randint(2, V, (B, Ltgt))
    tgt[2, 5:] = -100
    return ids, am, labels, tgt


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# --- BERT --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["encoder", "mlm", "cls"])
def test_bert_hf_to_ff_outputs_and_round_trip(kind):
    torch.manual_seed(0)
    ids, am, labels, _ = _batch()
    tt = torch.randint(0, 2, ids.shape)
    tol = torch.float64
    if kind == "encoder":
        hf = _bert_hf(lambda c: transformers.BertModel(c, add_pooling_layer=False))
        ours = ff.models.from_hf(hf)
        assert isinstance(ours, BertEncoder)
        ref = hf(input_ids=ids, attention_mask=am, token_type_ids=tt).last_hidden_state
        out, _ = ours(ids, am, tt)
        m = am.bool()[..., None]  # padded positions: both compute them, compare real tokens only
        assert_close(out.masked_fill(~m, 0), ref.masked_fill(~m, 0), tol, "hidden states")
    elif kind == "mlm":
        hf = _bert_hf(transformers.BertForMaskedLM)
        ours = ff.models.from_hf(hf)
        assert isinstance(ours, BertForMaskedLM)
        ref = hf(input_ids=ids, attention_mask=am, token_type_ids=tt, labels=labels)
        loss_sum, n, logits, _ = ours(ids, am, labels, tt, return_logits=True)
        assert_close(ours.dense_logits(ids, am, tt), ref.logits, tol, "logits")
        assert_close(logits, ref.logits[labels != -100], tol, "sparse logits")
        # ff.linear_cross_entropy's CPU chunked path accumulates in fp32: fp32 tolerance for the loss.
        assert_close(loss_sum / n, ref.loss, torch.float32, "loss")
        # gradients map back through the same names (the fused qkv row blocks = query, key, value)
        ref.loss.backward()
        (loss_sum / n).backward()
        self_attn = hf.bert.encoder.layer[1].attention.self
        hf_qkv = torch.cat([self_attn.query.weight.grad, self_attn.key.weight.grad, self_attn.value.weight.grad])
        assert_close(ours.encoder.layers[1].attn.qkv.weight.grad, hf_qkv, torch.float32, "qkv grad")
        assert_close(
            ours.encoder.word_embeddings.weight.grad,
            hf.bert.embeddings.word_embeddings.weight.grad,
            torch.float32,
            "tied embedding grad",
        )
        assert_close(ours.head.bias.grad, hf.cls.predictions.bias.grad, torch.float32, "bias grad")
        hf.zero_grad()
        ours.zero_grad()
    else:
        hf = _bert_hf(transformers.BertForSequenceClassification, num_labels=3)
        ours = ff.models.from_hf(hf)
        assert isinstance(ours, BertForSequenceClassification)
        y = torch.tensor([0, 2, 1])
        ref = hf(input_ids=ids, attention_mask=am, token_type_ids=tt, labels=y)
        logits = ours(ids, am, tt)
        assert_close(logits, ref.logits, tol, "logits")
        assert_close(F.cross_entropy(logits, y), ref.loss, tol, "loss")
    assert not ours.training and next(ours.parameters()).dtype == torch.float64
    back = ff.models.to_hf(ours)
    assert type(back) is type(hf)
    _assert_same_state(back, hf)


@pytest.mark.parametrize("kind", ["encoder", "mlm", "cls"])
def test_bert_ff_to_hf_outputs_and_round_trip(kind):
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=V,
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        intermediate_size=40,
        max_position=24,
        dropout=0.0,
        attention_dropout=0.0,
    )
    ours = {
        "encoder": BertEncoder,
        "mlm": BertForMaskedLM,
        "cls": lambda c: BertForSequenceClassification(c, num_labels=2),
    }[kind](cfg)
    if kind == "encoder":
        ours.apply(ours.init_weights)
    _perturb_ff(ours)
    ours = ours.double().eval()
    hf = ff.models.to_hf(ours)
    hf.config._attn_implementation = "eager"
    ids, am, labels, _ = _batch()
    tol = torch.float64
    if kind == "encoder":
        m = am.bool()[..., None]
        ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
        assert_close(ours(ids, am)[0].masked_fill(~m, 0), ref.masked_fill(~m, 0), tol, "hidden states")
    elif kind == "mlm":
        ref = hf(input_ids=ids, attention_mask=am, labels=labels)
        loss_sum, n, _, _ = ours(ids, am, labels)
        assert_close(ours.dense_logits(ids, am), ref.logits, tol, "logits")
        assert_close(loss_sum / n, ref.loss, torch.float32, "loss")  # fp32 accumulation, as above
    else:
        y = torch.tensor([1, 0, 1])
        ref = hf(input_ids=ids, attention_mask=am, labels=y)
        assert_close(ours(ids, am), ref.logits, tol, "logits")
        assert_close(F.cross_entropy(ours(ids, am), y), ref.loss, tol, "loss")
    again = ff.models.from_hf(hf)
    _assert_same_state(again, ours)
    assert again.config == ours.config


def _perturb_ff(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ln" in n.split(".")[-2] or n == "head.bias":
                p.uniform_(0.5, 1.5) if n.endswith("weight") else p.uniform_(-0.3, 0.3)


def test_bert_bf16_round_trip_keeps_dtype_and_bits():
    hf = _bert_hf(transformers.BertForMaskedLM).to(torch.bfloat16)
    ours = ff.models.from_hf(hf)
    assert {p.dtype for p in ours.parameters()} == {torch.bfloat16}
    _assert_same_state(ff.models.to_hf(ours), hf)


def test_bert_pooler_is_dropped_with_a_warning():
    hf = _bert_hf(transformers.BertModel)  # add_pooling_layer=True
    with pytest.warns(UserWarning, match="pooler"):
        ours = ff.models.from_hf(hf)
    ids, am, _, _ = _batch()
    m = am.bool()[..., None]
    ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
    assert_close(ours(ids, am)[0].masked_fill(~m, 0), ref.masked_fill(~m, 0), torch.float64, "hidden states")


def test_bert_training_mode_is_kept():
    hf = _bert_hf(transformers.BertForSequenceClassification).train()
    assert ff.models.from_hf(hf).training
    assert not ff.models.to_hf(ff.models.from_hf(hf.eval())).training


# --- T5 ----------------------------------------------------------------------------------------


def test_t5_hf_to_ff_outputs_and_round_trip():
    torch.manual_seed(2)
    hf = _t5_hf(transformers.T5ForConditionalGeneration, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    ours = ff.models.from_hf(hf)
    assert isinstance(ours, T5ForConditionalGeneration)
    assert ours.config.num_decoder_layers == 3 and ours.config.relative_attention_max_distance == 20
    ids, am, _, tgt = _batch(L=19)
    ref = hf(input_ids=ids, attention_mask=am, labels=tgt)
    out = ours(ids, am, labels=tgt, return_logits=True)
    # HF's T5 norm computes its statistics in fp32 even for float64 models: fp32 tolerance.
    assert_close(out.logits, ref.logits, torch.float32, "logits")
    assert_close(out.loss, ref.loss, torch.float32, "loss")
    ref.loss.backward()
    out.loss.backward()
    hf_grads = dict(hf.named_parameters())
    for n, p in ours.named_parameters():
        assert_close(p.grad, hf_grads[n].grad, torch.float32, f"grad {n}")
    back = ff.models.to_hf(ours)
    assert back.lm_head.weight is not back.shared.weight
    _assert_same_state(back, hf)


def test_t5_hf_tied_head_converts_to_equal_untied_head():
    # A v1.1 config built fresh in transformers 5.x shares lm_head with shared: the head HF uses is copied.
    hf = (
        transformers.T5ForConditionalGeneration(
            transformers.T5Config(**T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
        )
        .double()
        .eval()
    )
    ours = ff.models.from_hf(hf)
    assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    assert ours.lm_head.weight is not ours.shared.weight
    ids, am, _, tgt = _batch()
    assert_close(
        ours(ids, am, labels=tgt).loss, hf(input_ids=ids, attention_mask=am, labels=tgt).loss, torch.float32, "loss"
    )


def test_t5_ff_to_hf_outputs_and_round_trip():
    torch.manual_seed(3)
    ours = T5ForConditionalGeneration(T5Config(**T5)).double().eval()
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
    hf = ff.models.to_hf(ours)
    hf.config._attn_implementation = "eager"
    assert hf.lm_head.weight is not hf.shared.weight
    assert "lm_head.weight" not in getattr(hf, "all_tied_weights_keys", {})
    ids, am, _, tgt = _batch(L=19)
    ref = hf(input_ids=ids, attention_mask=am, labels=tgt)
    out = ours(ids, am, labels=tgt, return_logits=True)
    assert_close(out.logits, ref.logits, torch.float32, "logits")
    assert_close(out.loss, ref.loss, torch.float32, "loss")
    again = ff.models.from_hf(hf)
    assert again.config == ours.config
    _assert_same_state(again, ours)


def test_t5_encoder_both_directions():
    torch.manual_seed(4)
    hf = _t5_hf(transformers.T5EncoderModel, feed_forward_proj="gated-gelu")
    ours = ff.models.from_hf(hf)
    assert isinstance(ours, T5EncoderModel)
    ids, am, _, _ = _batch()
    m = am.bool()[..., None]
    ref = hf(input_ids=ids, attention_mask=am).last_hidden_state
    assert_close(ours(ids, am).masked_fill(~m, 0), ref.masked_fill(~m, 0), torch.float32, "hidden states")
    _assert_same_state(ff.models.to_hf(ours), hf)
    # the converted encoder loads into the classification model
    clf = T5EncoderForSequenceClassification(ours.config, num_labels=2)
    clf.load_pretrained(ours.state_dict())
    assert torch.equal(clf.shared.weight, ours.shared.weight.float())
    # fastformer -> HF -> fastformer
    start = T5EncoderModel(T5Config(**T5))
    _assert_same_state(ff.models.from_hf(ff.models.to_hf(start)), start)


# --- unsupported -------------------------------------------------------------------------------


def test_unsupported_configs_and_models_raise_value_error():
    tf = transformers
    with pytest.raises(ValueError, match="feed_forward_proj"):
        ff.models.from_hf(
            tf.T5ForConditionalGeneration(tf.T5Config(**T5, feed_forward_proj="relu", tie_word_embeddings=False))
        )
    with pytest.raises(ValueError, match="feed_forward_proj"):
        ff.models.from_hf(tf.T5EncoderModel(tf.T5Config(**T5, feed_forward_proj="gated-silu")))
    with pytest.raises(ValueError, match="tie_word_embeddings"):  # original T5: scaled decoder output
        ff.models.from_hf(tf.T5ForConditionalGeneration(tf.T5Config(**T5, feed_forward_proj="gated-gelu")))
    with pytest.raises(ValueError, match="hidden_act"):
        ff.models.from_hf(tf.BertModel(tf.BertConfig(**BERT, hidden_act="relu"), add_pooling_layer=False))
    with pytest.raises(ValueError, match="is_decoder"):
        ff.models.from_hf(tf.BertForMaskedLM(tf.BertConfig(**BERT, is_decoder=True)))
    with pytest.raises(ValueError, match="classifier_dropout"):
        ff.models.from_hf(tf.BertForSequenceClassification(tf.BertConfig(**BERT, classifier_dropout=0.3)))
    for head in (dict(num_labels=1), dict(num_labels=3, problem_type="multi_label_classification")):
        with pytest.raises(ValueError, match="problem_type=.*single-label classification"):  # regression, sigmoid
            ff.models.from_hf(tf.BertForSequenceClassification(tf.BertConfig(**BERT, **head)))
    with pytest.raises(ValueError, match="1 label has no single-label"):
        ff.models.to_hf(ff.models.bert.BertForSequenceClassification(ff.models.bert.BertConfig(vocab_size=50), 1))
    two = dict(num_labels=2, problem_type="single_label_classification")
    assert (
        ff.models.from_hf(tf.BertForSequenceClassification(tf.BertConfig(**BERT, **two))).classifier.out_features == 2
    )
    untied = tf.BertForMaskedLM(tf.BertConfig(**BERT, tie_word_embeddings=False))
    with torch.no_grad():
        untied.cls.predictions.decoder.weight.add_(1.0)
    with pytest.raises(ValueError, match="decoder.weight"):
        ff.models.from_hf(untied)
    with pytest.raises(ValueError, match="supported: .*BertForMaskedLM"):
        ff.models.from_hf(tf.T5Model(tf.T5Config(**T5, feed_forward_proj="gated-gelu")))
    with pytest.raises(ValueError, match="supported"):
        ff.models.from_hf(torch.nn.Linear(2, 2))
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=40, pre_ln=True)
    with pytest.raises(ValueError, match="unsupported by Hugging Face: pre_ln=True"):
        ff.models.to_hf(BertForMaskedLM(cfg))
    with pytest.raises(ValueError, match="T5EncoderForSequenceClassification"):
        ff.models.to_hf(T5EncoderForSequenceClassification(T5Config(**T5), num_labels=2))
    with pytest.raises(ValueError, match="supported"):
        ff.models.to_hf(torch.nn.Linear(2, 2))


def test_t5_to_hf_save_pretrained_keeps_the_untied_head(tmp_path):
    ours = T5ForConditionalGeneration(T5Config(**{**T5, "num_decoder_layers": 1, "num_layers": 1}))
    ff.models.to_hf(ours).save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.lm_head.weight, ours.lm_head.weight)
    _assert_same_state(ff.models.from_hf(loaded), ours)
