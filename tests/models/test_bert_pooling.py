"""Mean pooling of the BERT classifier: the masked mean of the real tokens' states, padding ignored;
not exportable to Hugging Face (whose classifier pools [CLS])."""

import pytest
import torch
from conftest import assert_close

from fastformer.models.bert import BertConfig, BertForSequenceClassification


def _cfg(**kw):
    return BertConfig(
        vocab_size=97,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        intermediate_size=64,
        max_position=64,
        dropout=0.0,
        attention_dropout=0.0,
        **kw,
    )


def test_mean_pooling_is_the_masked_mean_and_ignores_padding():
    torch.manual_seed(0)
    model = BertForSequenceClassification(_cfg(pooling="mean", unpad=False), num_labels=3).double().eval()
    ids = torch.randint(5, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 6:] = False
    h, _ = model.encoder(ids, mask)
    want = torch.stack([h[0].mean(0), h[1, :6].mean(0)])
    want = model.classifier(torch.tanh(model.pooler(want)))
    assert_close(model(ids, mask), want, torch.float64, "logits")
    ids2 = ids.clone()
    ids2[1, 6:] = 3  # other tokens on the padded positions: same logits
    assert_close(model(ids2, mask), model(ids, mask), torch.float64, "logits with other padding")
    with pytest.raises(ValueError, match="pooling"):
        BertForSequenceClassification(_cfg(pooling="max"), num_labels=2)


def test_mean_pooled_classifier_is_not_exported_to_hugging_face():
    pytest.importorskip("transformers")
    import fastformer as ff

    with pytest.raises(ValueError, match="pooling='mean'.*--pooling cls"):
        ff.models.to_hf(BertForSequenceClassification(_cfg(pooling="mean"), num_labels=2))
    assert ff.models.to_hf(BertForSequenceClassification(_cfg(), num_labels=2)) is not None
