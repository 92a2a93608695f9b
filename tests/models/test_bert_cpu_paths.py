"""The CPU shortcuts of models/bert.py give the results of the plain paths: automatic unpadding of a
padded batch, the in-place gradient of the tied word embedding, the 64-bit dropout masks."""

import copy

import torch
from conftest import assert_close

from fastformer.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification, Dropout


def _cfg(**kw):
    base = dict(
        vocab_size=211,
        hidden_size=48,
        num_layers=2,
        num_heads=3,
        intermediate_size=80,
        max_position=64,
        dropout=0.0,
        attention_dropout=0.0,
    )
    return BertConfig(**{**base, **kw})


def _batch(lengths=(37, 9, 22, 3), L=37, V=211):
    ids = torch.randint(5, V, (len(lengths), L))
    mask = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # half of the batch is padding
    ids[~mask] = 0
    labels = torch.where((torch.rand(ids.shape) < 0.3) & mask, ids, torch.full_like(ids, -100))
    labels[0, 0] = ids[0, 0]
    return ids, mask, labels


def _grads(model):
    return {n: p.grad.to_dense() for n, p in model.named_parameters() if p.grad is not None}


def test_auto_unpadded_cpu_batch_equals_the_padded_layout_with_grads():
    torch.manual_seed(0)
    ids, mask, labels = _batch()
    auto = BertForMaskedLM(_cfg()).double()  # unpad=None: this batch is unpadded on CPU
    padded = copy.deepcopy(auto)
    padded.config.unpad = False
    padded.encoder.config = padded.config
    assert auto.encoder._layout(ids, mask).unpadded and not padded.encoder._layout(ids, mask).unpadded
    out_a, out_p = auto(ids, mask, labels), padded(ids, mask, labels)
    assert out_a[1] == out_p[1]
    assert_close(out_a[0], out_p[0], torch.float32, "loss")  # the CPU cross-entropy accumulates in fp32
    out_a[0].backward()
    out_p[0].backward()
    ga, gp = _grads(auto), _grads(padded)
    assert ga.keys() == gp.keys()
    for name in ga:
        assert_close(ga[name], gp[name], torch.float32, name)

    cls = BertForSequenceClassification(_cfg(pooling="mean"), num_labels=3).double()
    cls_p = copy.deepcopy(cls)
    cls_p.config.unpad = False
    cls_p.encoder.config = cls_p.config
    assert_close(cls(ids, mask), cls_p(ids, mask), torch.float64, "classifier logits")


def test_label_on_a_padded_position_keeps_the_padded_layout():
    torch.manual_seed(1)
    ids, mask, labels = _batch()
    labels[1, 30] = 7  # on padding: predicted, as Hugging Face does
    model = BertForMaskedLM(_cfg()).double()
    _, n, _, target = model(ids, mask, labels)
    assert n == int((labels != -100).sum()) and 7 in target.tolist()


def test_tied_embedding_gradient_equals_the_plain_one():
    torch.manual_seed(2)
    ids, _, labels = _batch()  # [PAD] ids in the input, attended to (no mask): padding_idx
    # must keep their lookup gradient out in both paths
    tied = BertForMaskedLM(_cfg()).double()
    plain = copy.deepcopy(tied)
    plain.encoder.tied_word_grad = False
    for m in (tied, plain):
        loss, n, _, _ = m(ids, None, labels)
        (loss / n).backward()
    w_t, w_p = tied.encoder.word_embeddings.weight.grad, plain.encoder.word_embeddings.weight.grad
    assert not w_t.is_sparse and not w_p.is_sparse  # optimizers see a dense gradient
    assert_close(w_t, w_p, torch.float64, "tied embedding grad")

    # the head's view of the matrix used twice (loss and logits), and not at all (encoder alone)
    for m in (tied, plain):
        m.zero_grad(set_to_none=True)
        loss, n, logits, _ = m(ids, None, labels, return_logits=True)
        (loss / n + logits.square().mean()).backward()
    assert_close(
        tied.encoder.word_embeddings.weight.grad, plain.encoder.word_embeddings.weight.grad, torch.float64, "two uses"
    )
    grads = [torch.autograd.grad(m.encoder(ids)[0].sum(), m.encoder.word_embeddings.weight)[0] for m in (tied, plain)]
    assert_close(grads[0], grads[1], torch.float64, "lookup only")
    assert grads[0][0].abs().max() == 0  # the padding row


def test_dropout_keep_rate_scale_and_reproducibility():
    drop = Dropout(0.25).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.005  # 4e5 draws: 5 standard deviations ~ 0.0035
    assert abs(y.mean().item() - 1.0) < 0.01  # kept values rescaled: same expectation
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))
    x = torch.randn(7, 9, requires_grad=True)
    y = drop(x)
    y.backward(torch.ones_like(y))
    assert torch.equal(x.grad, (y != 0).float() * (1 / 0.75)) or torch.allclose(x.grad, (y != 0) / 0.75)
    assert torch.equal(drop.eval()(x), x)
