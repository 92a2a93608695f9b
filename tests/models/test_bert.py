"""BERT-style encoder: forward/backward, the sparse tied MLM head against the dense one, the unpadded
(varlen) layout against the padded (key-mask) layout, presets."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from fastformer.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from fastformer.models.presets import BERT_PRESETS, UnknownPresetError, get_preset, preset_family


def _cfg(**kw):
    base = dict(
        vocab_size=103,
        hidden_size=48,
        num_layers=2,
        num_heads=3,
        intermediate_size=80,
        max_position=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return BertConfig(**{**base, **kw})


def _batch(B=3, L=29, V=103, lengths=(29, 17, 5)):
    ids = torch.randint(5, V, (B, L))
    mask = torch.zeros(B, L, dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    ids[~mask] = 0
    labels = torch.where((torch.rand(B, L) < 0.3) & mask, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]  # at least one predicted row
    return ids, mask, labels


@pytest.mark.parametrize("pre_ln", [False, True])
def test_forward_backward_shapes_and_grads(pre_ln):
    model = BertForMaskedLM(_cfg(pre_ln=pre_ln, dropout=0.1, attention_dropout=0.1))
    ids, mask, labels = _batch()
    loss, n, logits, target = model(ids, mask, labels)
    assert logits is None and n == int((labels != -100).sum()) and target.shape == (n,)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The tied projection receives gradient through the MLM head.
    assert model.encoder.word_embeddings.weight.grad.abs().sum() > 0


def test_sparse_mlm_head_equals_dense_on_masked_rows():
    """Sparse head (fp32, through ff.linear_cross_entropy) vs dense logits of a float64 copy."""
    torch.manual_seed(1)
    model = BertForMaskedLM(_cfg())
    ref_model = copy.deepcopy(model).double()
    ids, mask, labels = _batch()
    loss, n, logits, target = model(ids, mask, labels, return_logits=True)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    dense = ref_model.dense_logits(ids, mask)  # (B, L, V)
    sel = labels != -100
    ref = F.cross_entropy(dense[sel], labels[sel], reduction="sum")
    ref_grads = torch.autograd.grad(ref, list(ref_model.parameters()), allow_unused=True)
    assert_close(loss, ref, torch.float32, "sparse MLM loss")
    assert_close(logits, dense[sel], torch.float32, "gathered logits")
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is None:
            assert g is None or g.abs().max() == 0, name
        else:
            assert_close(g, r, torch.float32, f"grad {name}", factor=10)


def test_unpadded_varlen_layout_matches_padded_mask_layout():
    torch.manual_seed(2)
    padded = BertForMaskedLM(_cfg(unpad=False)).double()
    unpadded = BertForMaskedLM(_cfg(unpad=True)).double()
    unpadded.load_state_dict(padded.state_dict())
    ids, mask, labels = _batch(lengths=(29, 17, 5))
    lp, _, _, _ = padded(ids, mask, labels)
    lu, _, _, _ = unpadded(ids, mask, labels)
    assert_close(lu, lp, torch.float64, "loss, unpadded vs padded")
    hp, _ = padded.encoder(ids, mask)
    hu, _ = unpadded.encoder(ids, mask)
    assert_close(hu[mask], hp[mask], torch.float64, "hidden states on real tokens")
    assert (hu[~mask] == 0).all()
    gp = torch.autograd.grad(lp, padded.encoder.word_embeddings.weight)[0]
    gu = torch.autograd.grad(lu, unpadded.encoder.word_embeddings.weight)[0]
    assert_close(gu, gp, torch.float64, "embedding gradient")


def test_a_label_on_a_padded_position_is_predicted_in_every_layout():
    """As Hugging Face: a label on a padded position is predicted from that position's hidden state.
    Only the padded layout has it, so such a batch stays padded also with config.unpad=True (the CUDA
    default), where the label used to be dropped from the loss."""
    torch.manual_seed(2)
    padded = BertForMaskedLM(_cfg(unpad=False)).double()
    unpadded = BertForMaskedLM(_cfg(unpad=True)).double()
    unpadded.load_state_dict(padded.state_dict())
    ids, mask, labels = _batch(lengths=(29, 17, 5))
    labels[2, 20] = 7  # past the third sequence's 5 real tokens
    lp, n_p, _, _ = padded(ids, mask, labels)
    lu, n_u, _, _ = unpadded(ids, mask, labels)
    assert n_u == n_p
    assert_close(lu, lp, torch.float64, "loss with a label on a padded position")


def test_no_mask_equals_all_true_mask():
    model = BertForMaskedLM(_cfg()).double()
    ids, _, labels = _batch(lengths=(29, 29, 29))
    a = model(ids, None, labels)[0]
    b = model(ids, torch.ones_like(ids, dtype=torch.bool), labels)[0]
    assert_close(a, b, torch.float64, "loss without mask")


def test_classifier_logits_and_grad():
    model = BertForSequenceClassification(_cfg(), num_labels=4)
    ids, mask, _ = _batch()
    logits = model(ids, mask)
    assert logits.shape == (3, 4)
    F.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    assert model.classifier.weight.grad.abs().sum() > 0


def test_too_long_input_raises_value_error():
    model = BertForMaskedLM(_cfg(max_position=16))
    ids = torch.randint(5, 100, (1, 17))
    with pytest.raises(ValueError, match="max_position"):
        model.encoder(ids)


def test_masked_lm_without_labels_gives_every_positions_logits():
    model = BertForMaskedLM(_cfg()).eval()
    ids, mask, labels = _batch()
    loss, n, logits, target = model(ids, mask)
    assert loss is None and n == 0 and target is None and logits.shape == (*ids.shape, 103)
    with torch.no_grad():
        _, _, picked, _ = model(ids, mask, labels, return_logits=True)
    assert_close(logits[labels != -100], picked, torch.float32, "labelled rows")


@pytest.mark.parametrize("extra", [-1, 1])
def test_labels_not_shaped_like_the_input_raise_value_error(extra):
    model = BertForMaskedLM(_cfg())
    ids, mask, labels = _batch()
    bad = torch.full((3, ids.shape[1] + extra), -100)
    bad[0, 0] = 7
    with pytest.raises(ValueError, match="labels must be shaped like input_ids"):
        model(ids, mask, bad)
    with pytest.raises(ValueError, match="labels must be shaped like input_ids"):
        model(ids, mask, bad.reshape(-1)[: ids.numel()])  # the right count, flattened


@pytest.mark.parametrize("unpad", [None, True, False])
@pytest.mark.parametrize("mask_shape", [(3, 13), (1, 29), (4, 29), (29,)])
def test_attention_mask_not_shaped_like_the_input_raises_value_error(unpad, mask_shape):
    # the unpadded layout (unpad=True, or None on CPU with >= 1/8 padding) read such a mask as is and
    # returned wrong outputs; the padded one broadcast a (1, L) mask or failed in the op naming `attn_mask`;
    # the MLM head's labelled-padding test failed with a bare RuntimeError
    ids, mask, labels = _batch()
    bad = torch.zeros(mask_shape, dtype=torch.bool)
    bad[..., :3] = True  # mostly padding: None takes the unpadded layout
    clf = BertForSequenceClassification(_cfg(unpad=unpad), num_labels=2).eval()
    mlm = BertForMaskedLM(_cfg(unpad=unpad)).eval()
    match = rf"attention_mask must be shaped like input_ids \(3, 29\), got \({', '.join(map(str, mask_shape))},?\)"
    for call in (
        lambda: clf(ids, bad),
        lambda: clf.encoder(ids, bad),
        lambda: mlm(ids, bad),
        lambda: mlm(ids, bad, labels),
        lambda: mlm(ids, bad.long(), labels, return_logits=True),
    ):
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="attention_mask must be shaped like input_ids"):
        clf(ids, mask.tolist())
    # labels are checked as well once the mask fits
    with pytest.raises(ValueError, match=r"labels must be shaped like input_ids \(3, 29\), got \(3, 28\)"):
        mlm(ids, mask, labels[:, 1:])


def test_token_type_ids_are_checked_and_may_broadcast():
    """A token_type_ids that does not fit input_ids failed inside the embedding sum with torch's
    message; now a ValueError naming it. One that broadcasts (a (1, L) row for the batch) works, as in
    Hugging Face's BERT, and equals the expanded tensor."""
    ids, mask, _ = _batch()
    clf = BertForSequenceClassification(_cfg(), num_labels=2).eval()
    types = torch.zeros(3, 29, dtype=torch.long)
    types[:, 10:] = 1
    with torch.no_grad():
        want = clf(ids, mask, token_type_ids=types)
        got = clf(ids, mask, token_type_ids=types[:1])
    assert_close(got, want, torch.float32)
    for bad, match in (
        (types[:, 1:], r"token_type_ids must be shaped like input_ids \(3, 29\), got \(3, 28\)"),
        (types[:2], r"got \(2, 29\)"),
        (types.float(), "token_type_ids must be an integer tensor, got torch.float32"),
        (types.tolist(), "integer tensor, got list"),
    ):
        with pytest.raises(ValueError, match=match):
            clf(ids, mask, token_type_ids=bad)


def test_config_from_dict_refuses_unknown_fields():
    """BertConfig.from_dict dropped keys it did not know, so a misspelt 'hidden_dim' gave the default
    768-wide model; it now refuses them as T5Config.from_dict does, and round-trips to_dict."""
    cfg = _cfg(pooling="mean")
    assert BertConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown BertConfig fields: \['hidden_dim'\]"):
        BertConfig.from_dict({"hidden_dim": 128})


def test_presets_are_the_published_sizes():
    assert get_preset("bert-base") == dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072)
    assert get_preset("bert-tiny")["hidden_size"] == 128 and set(BERT_PRESETS) >= {
        "bert-tiny",
        "bert-mini",
        "bert-small",
        "bert-base",
    }
    assert preset_family("t5-v1_1-small") == "t5"
    with pytest.raises(UnknownPresetError, match="bert-huge"):
        get_preset("bert-huge")
    with pytest.raises(UnknownPresetError):
        get_preset("gpt-2")
    # bert-base has BERT-base's parameter count (~110M with a 30522 vocabulary).
    n = sum(p.numel() for p in BertForMaskedLM(BertConfig(**get_preset("bert-base"))).parameters())
    assert 108e6 < n < 111e6
