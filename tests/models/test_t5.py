"""T5 v1.1 encoder-decoder: parity with Hugging Face T5ForConditionalGeneration given the same weights,
forward/backward, table sharing, presets at the published sizes, the encoder classification path."""

import pytest
import torch
from conftest import assert_close

from fastformer.models.t5 import (
    T5_PRESETS,
    T5Config,
    T5EncoderForSequenceClassification,
    T5ForConditionalGeneration,
    T5Stack,
    shift_right,
)

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=101,
    d_model=32,
    d_ff=48,
    d_kv=16,
    num_heads=2,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=16,
    relative_attention_max_distance=20,
)


def _hf_v1_1(cfg):
    """HF T5ForConditionalGeneration as T5 v1.1 was published: untied LM head, no output scaling.
    (transformers 5.x ties lm_head to shared whatever the config says; give the head its own weight.)"""
    model = transformers.T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())
    return model


def _hf_config(**kw):
    cfg = transformers.T5Config(
        **kw,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    cfg._attn_implementation = "eager"
    return cfg


def _batch(B=3, Lin=23, Ltgt=9, V=101):
    ids = torch.randint(2, V, (B, Lin))
    am = torch.ones(B, Lin, dtype=torch.bool)
    am[1, 15:] = False
    am[2, 5:] = False
    labels = torch.randint(2, V, (B, Ltgt))
    labels[2, 6:] = -100
    return ids, am, labels


def test_matches_hf_t5_v1_1_loss_logits_and_grads():
    # HF computes the RMS-norm statistics in fp32 even for float64 models, so the comparison uses
    # the fp32 tolerance on float64 models.
    hf = _hf_v1_1(_hf_config(**TINY)).double()
    for n, p in hf.named_parameters():
        if "layer_norm" in n:
            torch.nn.init.uniform_(p, 0.5, 1.5)  # non-trivial norm weights
    ours = T5ForConditionalGeneration(T5Config(**TINY)).double()
    ours.load_state_dict(hf.state_dict())  # HF's parameter names, strict
    ids, am, labels = _batch()
    ref = hf(input_ids=ids, attention_mask=am.long(), labels=labels)
    ref.loss.backward()
    out = ours(ids, am, labels=labels, return_logits=True)
    out.loss.backward()
    tol = torch.float32
    assert out.n_predicted == int((labels != -100).sum())
    assert_close(out.loss, ref.loss, tol, "loss")
    assert_close(out.loss_sum / out.n_predicted, ref.loss, tol, "loss_sum / n")
    assert_close(out.logits, ref.logits, tol, "logits")
    hf_grads = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in ours.named_parameters():
        assert p.grad is not None, n
        assert_close(p.grad, hf_grads[n], tol, f"grad {n}")


def test_forward_backward_table_sharing_and_padding_invariance():
    torch.manual_seed(1)
    model = T5ForConditionalGeneration(T5Config.from_preset("t5-tiny", vocab_size=97)).double()
    tables = [n for n, _ in model.named_parameters() if "relative_attention_bias" in n]
    assert tables == [
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
        "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
    ]
    ids, am, labels = _batch(V=97)
    out = model(ids, am, labels=labels)
    assert torch.isfinite(out.loss) and out.logits is None
    out.loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        if "relative_attention_bias" in n:
            assert p.grad.abs().sum() > 0, n
    # padding the encoder input further (masked) and the labels further (-100) changes nothing
    with torch.no_grad():
        base = model(ids, am, labels=labels).loss
        ids2 = torch.cat([ids, torch.randint(2, 97, (3, 6))], 1)
        am2 = torch.cat([am, torch.zeros(3, 6, dtype=torch.bool)], 1)
        labels2 = torch.cat([labels, torch.full((3, 4), -100)], 1)
        assert_close(model(ids2, am2, labels=labels2).loss, base, torch.float32, "padded loss")
        # explicit decoder inputs equal the default (labels shifted right)
        dec = shift_right(labels, 0, 0)
        assert torch.equal(dec[:, 1:], labels[:, :-1].clamp_min(0))
        assert_close(model(ids, am, decoder_input_ids=dec, labels=labels).loss, base, torch.float64, "explicit")


@pytest.mark.parametrize(
    "name,published,n_params",
    [
        (
            "t5-v1_1-small",
            dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
            76_961_152,
        ),
        (
            "t5-v1_1-base",
            dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
            247_577_856,
        ),
    ],
)
def test_presets_have_published_v1_1_sizes_and_hf_layout(name, published, n_params):
    assert T5_PRESETS[name] == published
    with torch.device("meta"):
        ours = T5ForConditionalGeneration(T5Config.from_preset(name, vocab_size=32128))
        hf = _hf_v1_1(_hf_config(vocab_size=32128, **published))
    ours_shapes = {n: tuple(p.shape) for n, p in ours.state_dict().items()}
    hf_shapes = {n: tuple(p.shape) for n, p in hf.state_dict().items()}
    assert ours_shapes == hf_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in hf.parameters()) == n_params


def test_encoder_classifier_loads_pretrained_encoder_and_ignores_padding():
    cfg = T5Config.from_preset("t5-tiny", vocab_size=97)
    pre = T5ForConditionalGeneration(cfg)
    clf = T5EncoderForSequenceClassification(T5Config.from_dict(cfg.to_dict()), num_labels=4).double().eval()
    clf.load_pretrained(pre.state_dict())
    assert torch.equal(
        clf.encoder.block[1].layer[1].DenseReluDense.wo.weight.float(),
        pre.encoder.block[1].layer[1].DenseReluDense.wo.weight,
    )
    ids = torch.randint(2, 97, (2, 13))
    logits = clf(ids)
    assert logits.shape == (2, 4)
    padded = torch.cat([ids, torch.zeros(2, 7, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(2, 13, dtype=torch.bool), torch.zeros(2, 7, dtype=torch.bool)], 1)
    assert_close(clf(padded, mask), logits, torch.float64, "padded logits")
    with pytest.raises(ValueError, match="pretrained"):
        clf.load_pretrained({"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(3, 3)})


def test_bad_config_and_input_raise_value_error():
    with pytest.raises(ValueError, match="t5-huge"):
        T5Config.from_preset("t5-huge")
    with pytest.raises(ValueError, match="unknown T5Config fields"):
        T5Config.from_dict({"hidden_size": 3})
    # bucket settings Hugging Face's config takes but the attention cannot run: refused here, not at
    # the first forward
    with pytest.raises(ValueError, match="relative_attention_max_distance=8.*exact-bucket range"):
        T5Config(**{**TINY, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 8})
    with pytest.raises(ValueError, match="relative_attention_num_buckets=3"):
        T5Config(**{**TINY, "relative_attention_num_buckets": 3})
    # the decoder's causal rule is the stricter (exact range num_buckets // 2): refused when a decoder is built
    decoder_only_bad = T5Config(**{**TINY, "relative_attention_num_buckets": 32, "relative_attention_max_distance": 12})
    with pytest.raises(ValueError, match="relative_attention_max_distance=12.*unidirectional"):
        T5ForConditionalGeneration(decoder_only_bad)
    model = T5ForConditionalGeneration(T5Config(**TINY))
    with pytest.raises(ValueError, match="labels"):
        model(torch.randint(2, 101, (1, 5)))
    ids, am, labels = _batch()
    dec = torch.randint(2, 101, (3, labels.shape[1] + 1))  # one decoder position without a label
    with pytest.raises(ValueError, match="labels must be shaped like decoder_input_ids"):
        model(ids, am, decoder_input_ids=dec, labels=labels)


@pytest.mark.parametrize("mask_shape", [(3, 22), (1, 23), (4, 23)])
def test_masks_and_decoder_inputs_not_shaped_like_the_input_raise_value_error(mask_shape):
    # a mismatched mask failed deep in the attention with a bare RuntimeError ("The size of tensor a (22)
    # must match..."), or a (1, Lin) mask was broadcast over the batch
    model = T5ForConditionalGeneration(T5Config(**TINY))
    clf = T5EncoderForSequenceClassification(T5Config(**TINY), num_labels=2)
    ids, am, labels = _batch()
    bad = torch.ones(mask_shape, dtype=torch.bool)
    match = rf"attention_mask must be shaped like input_ids \(3, 23\), got \({', '.join(map(str, mask_shape))}\)"
    for call in (
        lambda: model(ids, bad, labels=labels),
        lambda: model(ids, bad, decoder_input_ids=shift_right(labels, 0, 0)),
        lambda: model.encode(ids, bad),
        lambda: clf(ids, bad),
        lambda: model.generate(ids, bad, max_new_tokens=2),  # generate's own check, the same words
    ):
        with pytest.raises(ValueError, match=match):
            call()
    enc = model.encode(ids, am)
    with pytest.raises(ValueError, match=r"encoder_attention_mask must be shaped like encoder_hidden_states"):
        model.decode_uncached(shift_right(labels, 0, 0), enc, bad)
    # decoder rows for another number of inputs
    with pytest.raises(ValueError, match=r"labels must have input_ids' batch size 3, got shape \(2, 9\)"):
        model(ids, am, labels=labels[:2])
    with pytest.raises(ValueError, match=r"decoder_input_ids must have input_ids' batch size 3"):
        model(ids, am, decoder_input_ids=shift_right(labels, 0, 0)[:2])


def test_training_dropout_uses_the_cheap_cpu_masks_and_is_reproducible():
    """Every dropout of the T5 models is the one-pass CPU Dropout (models/_cpu_attention.py): active in
    training (the loss moves), reproducible with torch.manual_seed, off in eval."""
    from fastformer.models._cpu_attention import Dropout

    cfg = T5Config(**{**TINY, "dropout_rate": 0.3})
    model = T5ForConditionalGeneration(cfg)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert drops and all(isinstance(m, Dropout) and m.p == 0.3 for m in drops)
    clf = T5EncoderForSequenceClassification(cfg, num_labels=3)
    assert all(isinstance(m, Dropout) for m in clf.modules() if isinstance(m, torch.nn.Dropout))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, cfg.vocab_size, (3, 9), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (3, 5), generator=g)

    def loss(seed):
        torch.manual_seed(seed)
        return model(ids, None, labels=labels).loss

    model.train()
    a, b, c = loss(1), loss(1), loss(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        ref = loss(1)
        torch.manual_seed(5)
        assert torch.equal(ref, model(ids, None, labels=labels).loss)
    assert not torch.equal(a.detach(), ref)


def _no_module_dropout(model):
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def test_cpu_training_attention_path_matches_the_regular_path(monkeypatch):
    """CPU training: the stacks build their attention bias once and the layers run
    _cpu_attention.attention_with_bias. With its dropout forced to 0 it must give the regular path's
    loss and gradients (float64, padded inputs, a padded label row, more decoder than encoder layers)."""
    from fastformer.models import _cpu_attention as C

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**{**TINY, "dropout_rate": 0.3})).double().train()
    _no_module_dropout(model)
    ids = torch.randint(2, TINY["vocab_size"], (3, 11))
    mask = torch.ones(3, 11, dtype=torch.bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    labels = torch.randint(2, TINY["vocab_size"], (3, 6))
    labels[0, 4:] = -100
    calls = []
    inner = C.attention_with_bias

    def no_dropout(q, k, v, bias, p):
        calls.append(p)
        return inner(q, k, v, bias, 0.0)

    monkeypatch.setattr(C, "attention_with_bias", no_dropout)
    fast = model(ids, mask, labels=labels)
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    n_layers = TINY["num_layers"] + 2 * TINY["num_decoder_layers"]
    assert calls == [0.3] * n_layers  # every attention took the path
    model.zero_grad()
    for m in model.modules():  # attention dropout 0, on the regular path: the layers call ff's attention
        if isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0
    monkeypatch.setattr(T5Stack, "_fast_biases", lambda self, *args: None)
    ref = model(ids, mask, labels=labels)
    ref.loss.backward()
    assert len(calls) == n_layers
    assert_close(fast.loss, ref.loss, torch.float64, "loss")
    for n, p in model.named_parameters():
        assert_close(fast_grads[n], p.grad, torch.float64, n)


def test_cpu_training_without_dropout_takes_the_path_and_matches(monkeypatch):
    """Dropout 0 (span pre-training): CPU training with a trainable position-bias table takes the
    stack-bias path, with p = 0 and the regular path's loss and gradients (float64, padded inputs and
    labels). Eval, torch.no_grad() and a frozen table keep ff.t5_attention (its torch kernel is faster
    there); the encoder classifier takes the path too."""
    from fastformer.models import _cpu_attention as C

    torch.manual_seed(1)
    model = T5ForConditionalGeneration(T5Config(**TINY)).double().train()
    ids = torch.randint(2, TINY["vocab_size"], (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    labels = torch.randint(2, TINY["vocab_size"], (2, 5))
    labels[1, 3:] = -100
    calls = []
    inner = C.attention_with_bias
    monkeypatch.setattr(C, "attention_with_bias", lambda q, k, v, bias, p: calls.append(p) or inner(q, k, v, bias, p))
    n_attn = TINY["num_layers"] + 2 * TINY["num_decoder_layers"]
    fast = model(ids, mask, labels=labels)
    fast.loss.backward()
    fast_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert calls == [0.0] * n_attn
    with torch.no_grad():
        model.eval()(ids, mask, labels=labels)
        model.train()(ids, mask, labels=labels)
    tables = [m.bias_table for m in model.modules() if getattr(m, "has_relative_attention_bias", False)]
    assert len(tables) == 2
    for t in tables:
        t.requires_grad_(False)
    model(ids, mask, labels=labels).loss.backward()
    for t in tables:
        t.requires_grad_(True)
    assert len(calls) == n_attn  # eval, no_grad, frozen table: the regular path
    clf = T5EncoderForSequenceClassification(T5Config(**TINY), num_labels=3).double().train()
    clf(ids, mask).sum().backward()  # logits (B, num_labels)
    assert len(calls) == n_attn + TINY["num_layers"]
    model.zero_grad()
    monkeypatch.setattr(T5Stack, "_fast_biases", lambda self, *args: None)
    ref = model(ids, mask, labels=labels)
    ref.loss.backward()
    assert_close(fast.loss, ref.loss, torch.float64, "loss")
    for n, p in model.named_parameters():
        assert_close(fast_grads[n], p.grad, torch.float64, n)


def test_cpu_attention_with_bias_dropout_matches_reference_with_the_same_mask():
    from fastformer.models import _cpu_attention as C

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    bias = torch.randn(1, 3, 5, 7, generator=g, dtype=torch.float64)
    bias[..., 4:] = float("-inf")  # masked keys
    torch.manual_seed(7)
    out = C.attention_with_bias(q, k, v, bias, 0.25)
    torch.manual_seed(7)
    keep = C.dropout(torch.ones(2, 3, 5, 7, dtype=torch.float64), 0.25)  # the same draw: same mask
    assert 0 < (keep == 0).sum() < keep.numel()
    ref = ((q @ k.transpose(-1, -2) + bias).softmax(-1) * keep) @ v
    assert_close(out, ref, torch.float64, "out")
    dy = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dy)
    want = torch.autograd.grad(ref, (q, k, v), dy)
    for a, b, name in zip(got, want, "qkv"):
        assert_close(a, b, torch.float64, f"d{name}")


def test_cpu_training_path_steps_aside_for_inputs_without_keys():
    """An input that is all padding has query rows without keys: the stacks leave the fast path (which
    would give NaN) to ff's attention, and the loss stays finite."""
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(**{**TINY, "dropout_rate": 0.2})).train()
    ids = torch.randint(2, TINY["vocab_size"], (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    h = model.encoder.embed_tokens(ids)
    table = model.encoder.block[0].layer[0].SelfAttention.bias_table
    assert model.encoder._fast_biases(h, table, mask[:, None, None, :], None) is None
    assert model.encoder._fast_biases(h, table, torch.ones_like(mask)[:, None, None, :], None) is not None
    out = model(ids, mask, labels=torch.randint(2, TINY["vocab_size"], (2, 4)))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
