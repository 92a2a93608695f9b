"""ff.integrations.patch_hf_model against the unpatched Hugging Face model it was copied from.

Tiny randomly initialised configs built locally (nothing downloaded), fp32, dropout 0 so train and
eval modes are deterministic; padding in every batch. Outputs, losses and the gradient of every
parameter are compared by relative error with the conftest fp32 tolerance.
"""

import copy
import inspect

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from conftest import TOLERANCES, rel_err  # noqa: E402
from transformers import (  # noqa: E402 - after importorskip
    BertConfig,
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertLMHeadModel,
    BertModel,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaModel,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
    T5Model,
)

from fastformer.backend import use_backend  # noqa: E402
from fastformer.integrations import patch_hf_model  # noqa: E402
from fastformer.integrations._hf_loss import VocabProjection  # noqa: E402

DTYPE = torch.float32
VOCAB = 103  # awkward on purpose
B, L, LT = 3, 13, 7  # batch, encoder length, decoder length (all <= 16: cheap under the Triton interpreter)


def bert_config(cls=BertConfig, **kw):
    return cls(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=40,
        max_position_embeddings=40,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
        pad_token_id=1,
        **kw,
    )


def t5_config():
    return T5Config(
        vocab_size=VOCAB,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        dropout_rate=0.0,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=12,
        decoder_start_token_id=0,
        pad_token_id=0,
    )


BUILDERS = {
    "BertModel": lambda: BertModel(bert_config()),
    "BertForMaskedLM": lambda: BertForMaskedLM(bert_config()),
    "BertForSequenceClassification": lambda: BertForSequenceClassification(bert_config()),
    "BertForPreTraining": lambda: BertForPreTraining(bert_config()),
    "RobertaModel": lambda: RobertaModel(bert_config(RobertaConfig)),
    "RobertaForMaskedLM": lambda: RobertaForMaskedLM(bert_config(RobertaConfig)),
    "RobertaForSequenceClassification": lambda: RobertaForSequenceClassification(bert_config(RobertaConfig)),
    "T5Model": lambda: T5Model(t5_config()),
    "T5ForConditionalGeneration": lambda: T5ForConditionalGeneration(t5_config()),
    "T5EncoderModel": lambda: T5EncoderModel(t5_config()),
}
LM_HEADS = ("BertForMaskedLM", "BertForPreTraining", "RobertaForMaskedLM", "T5ForConditionalGeneration")


def make_batch(name, gen):
    """Padded batch (right padding, one row left-padded) with labels only on real tokens."""
    ids = torch.randint(2, VOCAB, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, :4] = 0  # left padding: the key-padding mask need not be a prefix
    mask[2, 10:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    batch = {"input_ids": ids, "attention_mask": mask}
    if name.startswith("T5"):
        batch["input_ids"] = ids.masked_fill(mask == 0, 0)
        if name == "T5EncoderModel":
            return batch
        labels = torch.randint(1, VOCAB, (B, LT), generator=gen)
        labels[1, 5:] = -100
        labels[2, 2:] = -100
        if name == "T5Model":
            dec = torch.randint(1, VOCAB, (B, LT), generator=gen)
            dmask = (labels != -100).long()
            batch.update(decoder_input_ids=dec, decoder_attention_mask=dmask)
        else:
            batch["labels"] = labels
        return batch
    if name.endswith("ForMaskedLM") or name == "BertForPreTraining":
        labels = torch.full((B, L), -100)
        pick = (torch.rand(B, L, generator=gen) < 0.35) & (mask == 1)
        pick[0, 3] = True
        labels[pick] = ids[pick]
        batch["labels"] = labels
        if name == "BertForPreTraining":
            batch["next_sentence_label"] = torch.tensor([0, 1, 1])
    if name.endswith("SequenceClassification"):
        batch["labels"] = torch.tensor([0, 2, 1])
    return batch


def scalar(out, keys):
    """A loss-like scalar over the given floating outputs (fixed random weights per output)."""
    total = out.loss if getattr(out, "loss", None) is not None else 0.0
    for key in sorted(k for k in keys if k != "loss"):
        value = out[key]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            w = torch.randn(value.shape, generator=torch.Generator().manual_seed(len(key)))
            total = total + (value * w).sum() * 1e-2
    return total


def check_grads(ref_model, model, factor=1.0):
    """Every parameter's gradient: ‖g − g_ref‖ <= tol·max(‖g_ref‖, 1e-3·‖all grads‖).

    The floor matters for gradients that are zero in exact arithmetic (e.g. the key-projection bias:
    softmax ignores a per-row shift), where both sides hold only rounding noise."""
    tol = factor * TOLERANCES[DTYPE]
    params = dict(model.named_parameters())
    grads_ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    floor = 1e-3 * torch.sqrt(sum(g.double().pow(2).sum() for g in grads_ref.values())).item()
    for name, p_ref in ref_model.named_parameters():
        p = params[name]
        if p_ref.grad is None:
            assert p.grad is None or p.grad.abs().max() == 0, f"{name}: gradient where Hugging Face has none"
            continue
        assert p.grad is not None, f"{name}: no gradient in the patched model"
        assert torch.isfinite(p.grad).all(), f"{name}: non-finite gradient"
        diff = (p.grad.double() - p_ref.grad.double()).norm().item()
        scale = max(p_ref.grad.double().norm().item(), floor)
        assert diff <= tol * scale, f"grad {name}: error {diff / scale:.3e} > {tol:.1e}"


def run_pair(name, mode, backend, keep_logits=False, varlen=False):
    torch.manual_seed(0)
    ref = BUILDERS[name]().to(DTYPE)
    model = patch_hf_model(copy.deepcopy(ref), keep_logits=keep_logits, varlen=varlen)
    getattr(ref, mode)()
    getattr(model, mode)()
    batch = make_batch(name, torch.Generator().manual_seed(1))
    out_ref = ref(**batch)
    with use_backend(backend):
        out = model(**batch)
    return ref, model, out_ref, out


def compare_outputs(name, out_ref, out, lm_logits_dropped):
    tol = TOLERANCES[DTYPE]
    assert type(out) is type(out_ref)
    assert list(out.keys()) == [
        k for k in out_ref.keys() if not (lm_logits_dropped and k in ("logits", "prediction_logits"))
    ]
    for key, value in out_ref.items():
        if lm_logits_dropped and key in ("logits", "prediction_logits"):
            assert getattr(out, key) is None, f"{key} should be None in training mode with labels"
            continue
        if isinstance(value, torch.Tensor):
            err = rel_err(out[key], value)
            assert err <= tol, f"{name}.{key}: relative error {err:.3e} > {tol:.1e}"


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_patched_matches_hf_reference_backend(name, mode):
    ref, model, out_ref, out = run_pair(name, mode, "reference")
    dropped = mode == "train" and name in LM_HEADS
    compare_outputs(name, out_ref, out, dropped)
    # the patched LM heads return no logits in training mode: weight only what both return
    keys = [k for k in out.keys() if out[k] is not None]
    scalar(out_ref, keys).backward()
    with use_backend("reference"):
        scalar(out, keys).backward()
    check_grads(ref, model)


@pytest.mark.parametrize("name", ["BertForMaskedLM", "T5ForConditionalGeneration"])
def test_patched_matches_hf_triton_backend(name, triton_backend, device):
    """The same comparison with the Triton kernels (on CPU interpreted, small shapes; on a GPU, tf32)."""
    torch.manual_seed(0)
    ref = BUILDERS[name]().to(device).train()
    model = patch_hf_model(copy.deepcopy(ref))
    batch = {k: v.to(device) for k, v in make_batch(name, torch.Generator().manual_seed(1)).items()}
    with use_backend("reference"):
        out_ref = ref(**batch)
    out = model(**batch)
    compare_outputs(name, out_ref, out, lm_logits_dropped=True)
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(ref, model, factor=5.0 if device.type == "cuda" else 1.0)


@pytest.mark.parametrize("name", LM_HEADS)
def test_keep_logits_in_training(name):
    ref, model, out_ref, out = run_pair(name, "train", "reference", keep_logits=True)
    compare_outputs(name, out_ref, out, lm_logits_dropped=False)


def test_t5_bias_gradient_reaches_both_tables():
    ref, model, out_ref, out = run_pair("T5ForConditionalGeneration", "train", "reference")
    out.loss.backward()
    out_ref.loss.backward()
    for stack in ("encoder", "decoder"):
        table = getattr(model, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        table_ref = getattr(ref, stack).block[0].layer[0].SelfAttention.relative_attention_bias.weight
        assert table.grad is not None and table.grad.abs().sum() > 0
        assert rel_err(table.grad, table_ref.grad) <= TOLERANCES[DTYPE]


def test_varlen_bert_matches_on_real_tokens():
    """varlen=True: unpadded attention. Real-token outputs, loss and all gradients agree."""
    ref, model, out_ref, out = run_pair("BertForMaskedLM", "eval", "reference", varlen=True)
    real = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))["attention_mask"].bool()
    assert rel_err(out.logits[real], out_ref.logits[real]) <= TOLERANCES[DTYPE]
    assert rel_err(out.loss, out_ref.loss) <= TOLERANCES[DTYPE]
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(ref, model)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_varlen_bert_with_labels_on_padding_matches(checkpointing):
    """Hugging Face's loss reads a padded position that carries a label: such a batch runs padded, also
    when gradient checkpointing recomputes the layers in backward (the choice travels with the mask)."""
    torch.manual_seed(0)
    ref = BertForMaskedLM(bert_config()).train()
    model = patch_hf_model(copy.deepcopy(ref), varlen=True)
    if checkpointing:
        for m in (ref, model):
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    batch["labels"][1, 11] = 17  # row 1 is padding from position 9 on
    mask = batch["attention_mask"]
    out_ref, out = ref(**batch), model(**batch)
    assert not hasattr(mask, "_ff_padded")  # the caller's tensor is not marked
    assert rel_err(out.loss, out_ref.loss) <= TOLERANCES[DTYPE]
    out_ref.loss.backward()
    out.loss.backward()
    check_grads(ref, model)


def test_varlen_unpad_cache_is_per_thread():
    """The unpad indices cached for one mask are never handed to a call in another thread."""
    import threading

    from fastformer.integrations import _hf_attention as attn

    first = torch.tensor([[True, True, False]])[:, None, None, :]
    other = torch.tensor([[True, False, False]])[:, None, None, :]
    assert attn._unpad_index(first)[2] == 2
    seen = {}
    # another thread asking for its own mask gets its own indices, and leaves this thread's cache alone
    worker = threading.Thread(target=lambda: seen.update(other=attn._unpad_index(other)))
    worker.start()
    worker.join()
    assert seen["other"][0].tolist() == [0] and seen["other"][2] == 1
    assert attn._local.unpad[0]() is first
    del first  # held weakly: a finished batch's mask is not kept alive by the cache
    assert attn._local.unpad[0]() is None


def test_t5_generate_with_cache_matches():
    """Decoding with a KV cache takes the position-bias fallback path; greedy output is unchanged."""
    torch.manual_seed(0)
    ref = T5ForConditionalGeneration(t5_config()).eval()
    model = patch_hf_model(copy.deepcopy(ref))
    batch = make_batch("T5EncoderModel", torch.Generator().manual_seed(2))
    kw = dict(max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        assert torch.equal(model.generate(**batch, **kw), ref.generate(**batch, **kw))
        scores_ref = ref.generate(**batch, **kw, output_scores=True, return_dict_in_generate=True).scores
        scores = model.generate(**batch, **kw, output_scores=True, return_dict_in_generate=True).scores
    assert rel_err(torch.stack(scores), torch.stack(scores_ref)) <= TOLERANCES[DTYPE]


def test_patch_is_idempotent_and_keeps_the_model():
    torch.manual_seed(0)
    model = BertForMaskedLM(bert_config())
    keys = list(model.state_dict())
    patch_hf_model(model)
    forward = model.forward.__func__
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    model.eval()
    first = model(**batch)
    assert patch_hf_model(model) is model
    assert model.forward.__func__ is forward
    assert type(model) is BertForMaskedLM and list(model.state_dict()) == keys
    assert isinstance(model.cls.predictions.decoder, VocabProjection)
    assert isinstance(model.cls.predictions.decoder, nn.Linear)
    assert model.config._attn_implementation == "fastformer"
    second = model(**batch)
    assert torch.equal(first.logits, second.logits) and torch.equal(first.loss, second.loss)
    # the Trainer reads the forward's signature to find label columns
    assert "labels" in inspect.signature(model.forward).parameters


def test_deepcopy_of_patched_model_is_independent():
    torch.manual_seed(0)
    model = patch_hf_model(T5ForConditionalGeneration(t5_config()))
    clone = copy.deepcopy(model)
    assert clone.forward.__self__ is clone
    src = clone.encoder.block[1].layer[0].SelfAttention.__dict__["_ff_bias_source"]
    assert src is clone.encoder.block[0].layer[0].SelfAttention
    batch = make_batch("T5ForConditionalGeneration", torch.Generator().manual_seed(1))
    model.eval()
    clone.eval()
    assert torch.equal(model(**batch).logits, clone(**batch).logits)


def test_return_dict_false_keeps_hf_tuple_order():
    ref, model, _, _ = run_pair("BertForMaskedLM", "eval", "reference")
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    loss_ref, logits_ref = ref(**batch, return_dict=False)[:2]
    loss, logits = model(**batch, return_dict=False)[:2]
    assert loss.dim() == 0 and logits.shape == logits_ref.shape
    assert rel_err(loss, loss_ref) <= TOLERANCES[DTYPE] and rel_err(logits, logits_ref) <= TOLERANCES[DTYPE]


@pytest.mark.parametrize("name", ["BertForMaskedLM", "T5ForConditionalGeneration"])
def test_return_dict_false_in_training_keeps_the_tuple_length(name):
    # Hugging Face's tuples leave out None fields: without logits `loss, logits = model(...)` breaks
    ref, model, _, _ = run_pair(name, "train", "reference")
    batch = make_batch(name, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    out_ref = ref(**batch, return_dict=False)
    torch.manual_seed(0)
    out = model(**batch, return_dict=False)
    assert len(out) == len(out_ref)
    assert out[1].shape == out_ref[1].shape


def test_labels_given_positionally():
    ref, model, _, _ = run_pair("BertForMaskedLM", "eval", "reference")
    b = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    args = (b["input_ids"], b["attention_mask"], None, None, None, None, None, b["labels"])
    assert rel_err(model(*args).loss, ref(*args).loss) <= TOLERANCES[DTYPE]


def test_bf16_autocast_loss_close():
    ref, model, _, _ = run_pair("BertForMaskedLM", "train", "reference")
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = ref(**batch).loss
        loss = model(**batch).loss
    assert rel_err(loss, loss_ref) <= TOLERANCES[torch.bfloat16]


def test_gradient_checkpointing_matches():
    torch.manual_seed(0)
    ref = BertForMaskedLM(bert_config()).train()
    model = patch_hf_model(copy.deepcopy(ref))
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    loss_ref, loss = ref(**batch).loss, model(**batch).loss
    assert rel_err(loss, loss_ref) <= TOLERANCES[DTYPE]
    loss_ref.backward()
    loss.backward()
    check_grads(ref, model)


def test_save_pretrained_stays_plain_hf(tmp_path):
    """The saved config names the Hugging Face class and no fastformer attention; weights round trip."""
    torch.manual_seed(0)
    model = patch_hf_model(T5ForConditionalGeneration(t5_config()))
    model.save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text()
    assert "fastformer" not in text and "T5ForConditionalGeneration" in text
    loaded = T5ForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.config._attn_implementation != "fastformer"
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_all_labels_ignored_gives_zero_loss(mode):
    torch.manual_seed(0)
    model = patch_hf_model(BertForMaskedLM(bert_config()))
    getattr(model, mode)()
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    batch["labels"].fill_(-100)
    loss = model(**batch).loss
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is None or (p.grad == 0).all() for p in model.parameters())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["BertForMaskedLM", "T5ForConditionalGeneration"])
@pytest.mark.parametrize("extra", [-1, 1])
def test_labels_not_matching_the_output_are_refused_like_hf(name, mode, extra):
    """One label too few or too many per row: Hugging Face raises a ValueError; the patched head used to
    pair the labels with the wrong positions (a wrong loss) or fail with an IndexError."""
    torch.manual_seed(0)
    ref = BUILDERS[name]()
    model = patch_hf_model(copy.deepcopy(ref))
    batch = make_batch(name, torch.Generator().manual_seed(1))
    if name.startswith("T5"):  # decoder inputs given: the labels no longer define the output length
        batch["decoder_input_ids"] = torch.randint(1, VOCAB, (B, LT))
    n = batch["labels"].shape[1] + extra
    batch["labels"] = torch.randint(2, VOCAB, (B, n))
    for m in (ref, model):
        getattr(m, mode)()
        with pytest.raises(ValueError):
            m(**batch)


def test_unsupported_models_raise_value_error():
    with pytest.raises(ValueError, match="Supported: .*BertForMaskedLM.*T5ForConditionalGeneration"):
        patch_hf_model(BertLMHeadModel(bert_config(is_decoder=True)))
    with pytest.raises(ValueError, match="Supported"):
        patch_hf_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="decoder"):
        patch_hf_model(BertModel(bert_config(is_decoder=True)))


@pytest.mark.parametrize("max_distance", [4, 3])  # 8 buckets: exact range 2 bidirectional, 4 causal
def test_t5_bucket_config_without_a_log_range_is_refused_when_patching(max_distance):
    cfg = t5_config()
    cfg.relative_attention_max_distance = max_distance
    model = T5ForConditionalGeneration(cfg)
    implementation = model.config._attn_implementation
    with pytest.raises(ValueError, match="relative_attention_max_distance: max_distance=.* must exceed"):
        patch_hf_model(model)
    assert model.config._attn_implementation == implementation  # refused before anything was patched
    assert not any(k.startswith("_ff") for m in model.modules() for k in m.__dict__)


@pytest.mark.parametrize("option", ["keep_logits", "varlen"])
def test_options_must_be_bools_and_options_without_effect_warn(option):
    with pytest.raises(ValueError, match=f"{option} must be True or False, got 'no'"):
        patch_hf_model(BertForMaskedLM(bert_config()), **{option: "no"})
    model, other = (BertModel, "BertModel") if option == "keep_logits" else (T5ForConditionalGeneration, "T5")
    with pytest.warns(UserWarning, match=f"{option}=True has no effect on {other}"):
        patch_hf_model(model(t5_config() if other == "T5" else bert_config()), **{option: True})


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["BertForMaskedLM", "T5ForConditionalGeneration"])
def test_patched_matches_hf_cuda(name):
    """On the GPU (fused kernels, tf32 inside them): loss and gradients agree with Hugging Face."""
    torch.manual_seed(0)
    ref = BUILDERS[name]().cuda().train()
    model = patch_hf_model(copy.deepcopy(ref))
    batch = {k: v.cuda() for k, v in make_batch(name, torch.Generator().manual_seed(1)).items()}
    loss_ref = ref(**batch).loss
    loss = model(**batch).loss
    assert rel_err(loss, loss_ref) <= TOLERANCES[DTYPE]
    loss_ref.backward()
    loss.backward()
    check_grads(ref, model, factor=5.0)


def test_calls_reach_fastformer_ops(monkeypatch):
    """The patched models really dispatch to fastformer: mask form, bias table and gathered rows."""
    from fastformer.integrations import _hf_attention, _hf_loss

    calls = []

    def spy(name, module, fn):
        def wrapped(*args, **kwargs):
            calls.append((name, args, kwargs))
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for name in ("scaled_dot_product_attention", "t5_attention", "varlen_attention"):
        spy(name, _hf_attention, getattr(_hf_attention, name))
    for name in ("cross_entropy", "linear_cross_entropy"):
        spy(name, _hf_loss, getattr(_hf_loss, name))

    _, model, _, _ = run_pair("BertForMaskedLM", "train", "reference")
    calls.clear()
    batch = make_batch("BertForMaskedLM", torch.Generator().manual_seed(1))
    model(**batch).loss.backward()
    attn = [c for c in calls if c[0] == "scaled_dot_product_attention"]
    assert len(attn) == 2
    mask = attn[0][2]["attn_mask"]
    assert mask.dtype == torch.bool and mask.shape == (B, 1, 1, L)
    assert torch.equal(mask[:, 0, 0], batch["attention_mask"].bool())
    (lce,) = [c for c in calls if c[0] == "linear_cross_entropy"]
    assert lce[1][0].shape[0] == int((batch["labels"] != -100).sum())  # only labelled rows projected

    _, model, _, _ = run_pair("T5ForConditionalGeneration", "train", "reference")
    calls.clear()
    model(**make_batch("T5ForConditionalGeneration", torch.Generator().manual_seed(1))).loss.backward()
    t5 = [c for c in calls if c[0] == "t5_attention"]
    assert len(t5) == 4 and [c[2]["is_causal"] for c in t5] == [False, False, True, True]
    assert t5[0][1][3] is model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert t5[3][1][3] is model.decoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    cross = [c for c in calls if c[0] == "scaled_dot_product_attention"]
    assert len(cross) == 2 and all(c[2]["scale"] == 1.0 for c in cross)
    assert [c[0] for c in calls].count("linear_cross_entropy") == 1


def _mlm_batch(seed=5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    return ids, torch.where(torch.rand(B, L, generator=g) < 0.4, ids, -100)


def test_a_subclass_with_its_own_forward_keeps_its_loss():
    """A subclass that computes its own loss, or edits the labels before super().forward, keeps its
    objective: only its attention is patched (taking the labels out of its call replaced them)."""

    class FirstTokenOnly(BertForMaskedLM):
        def forward(self, input_ids=None, attention_mask=None, labels=None, **kw):
            if labels is not None:
                labels = labels.clone()
                labels[:, 1:] = -100
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)

    torch.manual_seed(0)
    ref = FirstTokenOnly(bert_config()).train()
    with pytest.warns(UserWarning, match="overrides BertForMaskedLM.forward, so only its attention is patched"):
        model = patch_hf_model(copy.deepcopy(ref))
    ids, labels = _mlm_batch()
    want, got = ref(input_ids=ids, labels=labels).loss, model(input_ids=ids, labels=labels).loss
    assert rel_err(got, want) <= TOLERANCES[DTYPE]


def test_a_patched_model_called_from_several_threads():
    """Each call's labels and loss stay with its own thread (they were kept on the shared head)."""
    import threading

    torch.manual_seed(0)
    ref = BertForMaskedLM(bert_config()).eval()
    model = patch_hf_model(copy.deepcopy(ref)).eval()
    batches = [_mlm_batch(seed) for seed in (1, 2)]
    with torch.no_grad():
        want = [ref(input_ids=i, labels=lab).loss.item() for i, lab in batches]
    results, errors = {0: [], 1: []}, []

    def work(k):
        ids, labels = batches[k]
        for _ in range(40):
            try:
                with torch.no_grad():
                    results[k].append(model(input_ids=ids, labels=labels).loss.item())
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k in (0, 1):
        assert max(abs(x - want[k]) for x in results[k]) < 1e-4 * abs(want[k])


def test_data_parallel_replicas_run_their_own_weights(monkeypatch):
    """nn.DataParallel's replicate copies the instance's __dict__: the patched forward must be bound to
    the replica (no GPU here: replicate's broadcast is stood in for, the second replica's weights
    halved so the two can be told apart)."""
    import importlib

    R = importlib.import_module(
        "torch.nn.parallel.replicate"
    )  # the module (the package exports a function of that name)

    def broadcast(tensors, devices, detach=False):
        return [
            [t * (1.0 if j == 0 else 0.5) if t.is_floating_point() else t.clone() for t in tensors]
            for j in range(len(devices))
        ]

    monkeypatch.setattr(R, "_broadcast_coalesced_reshape", broadcast)
    monkeypatch.setattr(R, "_get_device_index", lambda x, optional=False: x)
    torch.manual_seed(0)
    ref = BertForMaskedLM(bert_config()).train()
    model = patch_hf_model(copy.deepcopy(ref))
    ids, labels = _mlm_batch()
    want = [r(input_ids=ids, labels=labels).loss for r in R.replicate(ref, [0, 1])]
    got = [r(input_ids=ids, labels=labels).loss for r in R.replicate(model, [0, 1])]
    assert rel_err(want[0], want[1]) > 1e-4  # the replicas differ
    for a, b in zip(got, want):
        assert rel_err(a, b) <= TOLERANCES[DTYPE]
    # T5: its attentions reference the original's position-bias table, which replicate would keep
    t5 = patch_hf_model(T5ForConditionalGeneration(t5_config()))
    with pytest.raises(ValueError, match="cannot run under nn.DataParallel"):
        R.replicate(t5, [0, 1])


def test_a_pickled_patched_model_runs_in_a_fresh_process(tmp_path):
    """The configs name the "fastformer" attention: loading the pickled model registers it again."""
    import subprocess
    import sys
    from pathlib import Path

    torch.manual_seed(0)
    for name, model in (("mlm", BertForMaskedLM(bert_config())), ("encoder", BertModel(bert_config()))):
        torch.save(patch_hf_model(model).eval(), tmp_path / f"{name}.pt")
    script = (
        "import torch\n"
        f"for name in ('mlm', 'encoder'):\n"
        f"    m = torch.load({str(tmp_path)!r} + f'/{{name}}.pt', weights_only=False)\n"
        "    out = m(input_ids=torch.randint(5, 100, (2, 8)))\n"
        "    print(name, tuple(out[0].shape))\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [f"mlm (2, 8, {VOCAB})", "encoder (2, 8, 32)"]
    # pickle keeps the class's forward (documented): patching the loaded model again restores the fused loss
    loaded = torch.load(tmp_path / "mlm.pt", weights_only=False).train()
    ids, labels = _mlm_batch()
    assert loaded(input_ids=ids, labels=labels).logits is not None  # Hugging Face's own loss path
    assert patch_hf_model(loaded)(input_ids=ids, labels=labels).logits is None  # the fused one
