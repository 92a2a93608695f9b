"""Convert weights between Hugging Face BERT / T5 models and fastformer's models.

    ours = ff.models.from_hf(hf_model)      # transformers model -> fastformer model (config built from hf's)
    hf = ff.models.to_hf(ours)              # fastformer model -> transformers model (config built from ours)

Pairs (Hugging Face <-> fastformer):
    BertModel                      <-> BertEncoder            (HF's pooler, if any, is dropped with a warning)
    BertForMaskedLM                <-> BertForMaskedLM        (decoder tied to the word embeddings)
    BertForSequenceClassification  <-> BertForSequenceClassification
    T5ForConditionalGeneration     <-> T5ForConditionalGeneration   (T5 v1.1: gated-GELU, untied LM head)
    T5EncoderModel                 <-> T5EncoderModel (defined here: shared embedding + encoder stack)

Every parameter on both sides is accounted for (a parameter that would be left behind raises
ValueError), values are copied bit for bit (dtype and device follow the source model), so
`to_hf(from_hf(m))` has the same state as `m`, and the converted model keeps the source's
train/eval mode. A model or config that the other side cannot express raises ValueError naming it.

Name mapping. BERT: fastformer fuses HF's query/key/value Linear layers into one `qkv` Linear
(rows [q; k; v], each in HF's (head, head_dim) order, which is what the (3, H, D) view of the fused
output expects); the rest is a renaming. T5: fastformer uses HF's parameter names, so the mapping
is the identity.

transformers 5.x forces `T5Config.tie_word_embeddings = True` and keeps the user's flag only as
`scale_decoder_outputs`, so a freshly built HF T5ForConditionalGeneration shares `lm_head.weight`
with `shared.weight`. `to_hf` gives the LM head its own Parameter (and removes it from the model's
tie list, so `save_pretrained` writes it); `from_hf` copies whatever head the HF model uses.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .bert import BertConfig, BertEncoder, BertForMaskedLM, BertForSequenceClassification
from .framing import BERT_FRAMING, T5_FRAMING, framed_tokenizer
from .t5 import T5Config, T5EncoderForSequenceClassification, T5ForConditionalGeneration, T5Stack, _init_weights

_FROM_SUPPORTED = (
    "BertModel, BertForMaskedLM, BertForSequenceClassification, T5ForConditionalGeneration (T5 v1.1), T5EncoderModel"
)
_TO_SUPPORTED = (
    "BertEncoder, BertForMaskedLM, BertForSequenceClassification (post-LN), "
    "T5ForConditionalGeneration, fastformer.models.convert.T5EncoderModel"
)
# T5 v1.1's gated feed-forward uses the tanh approximation of GELU; these HF activations compute it.
_T5_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class T5EncoderModel(nn.Module):
    """Encoder-only T5 (the counterpart of HF's T5EncoderModel): shared embedding + encoder stack.

    forward(input_ids (B, L), attention_mask (B, L) or None) -> hidden states (B, L, d_model).
    Its state_dict (`shared.*`, `encoder.*`) loads into T5EncoderForSequenceClassification.load_pretrained."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, is_decoder=False)
        _init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


def _transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - transformers is a test extra
        raise ImportError("ff.models.from_hf / to_hf need the `transformers` package") from e
    return transformers


# ----------------------------------------------------------------------------------------------
# Name maps: a list of (fastformer name, HF names, HF aliases). One HF name: same tensor; several:
# concatenated along dim 0 on our side. Aliases are HF parameters that must hold the same value as
# the first HF name (tied weights); they are checked on import and written on export.
# ----------------------------------------------------------------------------------------------


def _bert_encoder_map(ours: str, hf: str, num_layers: int) -> list:
    m = [
        (f"{ours}word_embeddings.weight", [f"{hf}embeddings.word_embeddings.weight"], []),
        (f"{ours}position_embeddings.weight", [f"{hf}embeddings.position_embeddings.weight"], []),
        (f"{ours}token_type_embeddings.weight", [f"{hf}embeddings.token_type_embeddings.weight"], []),
    ]
    m += [(f"{ours}emb_ln.{p}", [f"{hf}embeddings.LayerNorm.{p}"], []) for p in ("weight", "bias")]
    for i in range(num_layers):
        a, b = f"{ours}layers.{i}.", f"{hf}encoder.layer.{i}."
        for p in ("weight", "bias"):
            m += [
                (f"{a}attn.qkv.{p}", [f"{b}attention.self.{n}.{p}" for n in ("query", "key", "value")], []),
                (f"{a}attn.out.{p}", [f"{b}attention.output.dense.{p}"], []),
                (f"{a}ln1.{p}", [f"{b}attention.output.LayerNorm.{p}"], []),
                (f"{a}fc1.{p}", [f"{b}intermediate.dense.{p}"], []),
                (f"{a}fc2.{p}", [f"{b}output.dense.{p}"], []),
                (f"{a}ln2.{p}", [f"{b}output.LayerNorm.{p}"], []),
            ]
    return m


def _bert_map(kind: str, num_layers: int) -> list:
    if kind == "encoder":
        return _bert_encoder_map("", "", num_layers)
    m = _bert_encoder_map("encoder.", "bert.", num_layers)
    if kind == "mlm":
        m += [(f"head.dense.{p}", [f"cls.predictions.transform.dense.{p}"], []) for p in ("weight", "bias")]
        m += [(f"head.ln.{p}", [f"cls.predictions.transform.LayerNorm.{p}"], []) for p in ("weight", "bias")]
        # HF's forward adds decoder.bias (tied to predictions.bias) and projects with decoder.weight
        # (tied to the word embeddings); fastformer's head has one bias and always ties the projection.
        m += [("head.bias", ["cls.predictions.decoder.bias"], ["cls.predictions.bias"])]
        m[0] = (m[0][0], m[0][1], ["cls.predictions.decoder.weight"])
    else:  # sequence classification
        m += [(f"pooler.{p}", [f"bert.pooler.dense.{p}"], []) for p in ("weight", "bias")]
        m += [(f"classifier.{p}", [f"classifier.{p}"], []) for p in ("weight", "bias")]
    return m


def _t5_map(ours: nn.Module) -> list:
    """Identity names; HF's stacks hold the shared embedding again as `embed_tokens`."""
    m = []
    for name, _ in ours.named_parameters():
        aliases = []
        if name == "shared.weight":
            aliases = ["encoder.embed_tokens.weight"]
            if isinstance(ours, T5ForConditionalGeneration):
                aliases.append("decoder.embed_tokens.weight")
        m.append((name, [name], aliases))
    return m


# ----------------------------------------------------------------------------------------------
# Copying
# ----------------------------------------------------------------------------------------------


def _params(model: nn.Module) -> dict:
    return dict(model.named_parameters(remove_duplicate=False))


def _source_dtype(model: nn.Module) -> torch.dtype | None:
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def _prepare(target: nn.Module, source: nn.Module) -> nn.Module:
    """Put the freshly built target on the source's device / dtype and in its train/eval mode."""
    p = next(source.parameters(), None)
    if p is not None:
        target.to(device=p.device, dtype=_source_dtype(source))
    return target.train(source.training)


def _set(dst: nn.Parameter, value: torch.Tensor, what: str) -> None:
    if dst.shape != value.shape:
        raise ValueError(f"{what}: shape {tuple(value.shape)} does not fit {tuple(dst.shape)}")
    dst.data = value.detach().clone()  # bitwise copy; dtype and device follow the source


def _check_covered(params: dict, used: set, side: str, ignore: tuple = ()) -> None:
    left = [n for n, p in params.items() if id(p) not in used and not n.startswith(ignore)]
    if left:
        raise ValueError(
            f"{side} parameters with no counterpart (unsupported model variant): {left[:8]}"
            + (" ..." if len(left) > 8 else "")
        )


def _copy_from_hf(ours: nn.Module, hf: nn.Module, mapping: list, ignore_hf: tuple = ()) -> None:
    hp, op = _params(hf), _params(ours)
    used_h, used_o = set(), set()
    with torch.no_grad():
        for o_name, h_names, aliases in mapping:
            missing = [n for n in [*h_names, *aliases] if n not in hp]
            if missing or o_name not in op:
                raise ValueError(f"cannot map {o_name!r}: Hugging Face model lacks {missing or h_names}")
            srcs = [hp[n] for n in h_names]
            for a in aliases:
                if hp[a] is not srcs[0] and not torch.equal(hp[a], srcs[0]):
                    raise ValueError(f"unsupported: {a} differs from {h_names[0]} (fastformer ties them)")
                used_h.add(id(hp[a]))
            value = srcs[0] if len(srcs) == 1 else torch.cat(list(srcs), 0)
            _set(op[o_name], value, o_name)
            used_h.update(id(s) for s in srcs)
            used_o.add(id(op[o_name]))
    _check_covered(hp, used_h, "Hugging Face", ignore_hf)
    _check_covered(op, used_o, "fastformer")


def _copy_to_hf(ours: nn.Module, hf: nn.Module, mapping: list) -> None:
    hp, op = _params(hf), _params(ours)
    used_h, used_o = set(), set()
    with torch.no_grad():
        for o_name, h_names, aliases in mapping:
            value = op[o_name]
            dsts = [hp[n] for n in h_names]
            parts = [value] if len(dsts) == 1 else torch.split(value, [d.shape[0] for d in dsts], 0)
            for n, d, v in zip(h_names, dsts, parts):
                _set(d, v, n)
            for a in aliases:
                if hp[a] is not dsts[0]:  # an untied alias: write the same value
                    _set(hp[a], value, a)
                used_h.add(id(hp[a]))
            used_h.update(id(d) for d in dsts)
            used_o.add(id(value))
    _check_covered(hp, used_h, "Hugging Face")
    _check_covered(op, used_o, "fastformer")


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _unsupported(what: str, problems: list, by: str = "fastformer") -> None:
    """by: who lacks the feature (fastformer for from_hf, Hugging Face for to_hf)."""
    if problems:
        raise ValueError(f"{what}: unsupported by {by}: " + "; ".join(problems))


def _bert_config_from_hf(c, what: str) -> BertConfig:
    problems = []
    if c.hidden_act != "gelu":
        problems.append(f"hidden_act={c.hidden_act!r} (fastformer's BERT uses exact GELU, 'gelu')")
    pos = getattr(c, "position_embedding_type", None)
    if pos not in (None, "absolute"):
        problems.append(f"position_embedding_type={pos!r} (only 'absolute')")
    if getattr(c, "is_decoder", False) or getattr(c, "add_cross_attention", False):
        problems.append("is_decoder / add_cross_attention (fastformer's BERT is a bidirectional encoder)")
    _unsupported(what, problems)
    return BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        intermediate_size=c.intermediate_size,
        max_position=c.max_position_embeddings,
        type_vocab_size=c.type_vocab_size,
        dropout=c.hidden_dropout_prob,
        attention_dropout=c.attention_probs_dropout_prob,
        layer_norm_eps=c.layer_norm_eps,
        pad_token_id=c.pad_token_id,
        initializer_range=c.initializer_range,
    )


def _bert_config_to_hf(c: BertConfig, what: str, **extra):
    _unsupported(what, ["pre_ln=True (its BERT is post-LN)"] if c.pre_ln else [], by="Hugging Face")
    return _transformers().BertConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=c.dropout,
        attention_probs_dropout_prob=c.attention_dropout,
        max_position_embeddings=c.max_position,
        type_vocab_size=c.type_vocab_size,
        initializer_range=c.initializer_range,
        layer_norm_eps=c.layer_norm_eps,
        pad_token_id=c.pad_token_id,
        **extra,
    )


def _t5_config_from_hf(c, what: str, *, decoder: bool) -> T5Config:
    problems = []
    if not getattr(c, "is_gated_act", False) or getattr(c, "dense_act_fn", None) not in _T5_TANH_GELUS:
        problems.append(
            f"feed_forward_proj={c.feed_forward_proj!r} (fastformer's T5 has T5 v1.1's 'gated-gelu' feed-forward only)"
        )
    # transformers 5.x keeps the user's tie_word_embeddings as scale_decoder_outputs; older versions
    # scale when tie_word_embeddings is set.
    scaled = getattr(c, "scale_decoder_outputs", None)
    if scaled is None:
        scaled = getattr(c, "tie_word_embeddings", True)
    if decoder and scaled:
        problems.append(
            "decoder outputs scaled by d_model**-0.5 before the LM head (original T5, "
            "tie_word_embeddings=True); fastformer implements T5 v1.1 (tie_word_embeddings=False)"
        )
    _unsupported(what, problems)
    eos = c.eos_token_id[0] if isinstance(c.eos_token_id, (list, tuple)) else c.eos_token_id
    pad = 0 if c.pad_token_id is None else c.pad_token_id
    start = getattr(c, "decoder_start_token_id", None)
    return T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_ff=c.d_ff,
        d_kv=c.d_kv,
        num_heads=c.num_heads,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        dropout_rate=c.dropout_rate,
        layer_norm_epsilon=c.layer_norm_epsilon,
        pad_token_id=pad,
        eos_token_id=1 if eos is None else eos,
        decoder_start_token_id=pad if start is None else start,
    )


def _t5_config_to_hf(c: T5Config):
    return _transformers().T5Config(
        vocab_size=c.vocab_size,
        d_model=c.d_model,
        d_kv=c.d_kv,
        d_ff=c.d_ff,
        num_layers=c.num_layers,
        num_decoder_layers=c.num_decoder_layers,
        num_heads=c.num_heads,
        relative_attention_num_buckets=c.relative_attention_num_buckets,
        relative_attention_max_distance=c.relative_attention_max_distance,
        dropout_rate=c.dropout_rate,
        layer_norm_epsilon=c.layer_norm_epsilon,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=c.pad_token_id,
        eos_token_id=c.eos_token_id,
        decoder_start_token_id=c.decoder_start_token_id,
    )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def from_hf(model: nn.Module) -> nn.Module:
    """Hugging Face BERT / T5 model -> the matching fastformer model with the same weights.

    The fastformer config is built from `model.config`; the result is on the model's device, in its
    dtype and train/eval mode. Raises ValueError for an unsupported class or config."""
    tf = _transformers()
    name = type(model).__name__
    if isinstance(model, (tf.BertModel, tf.BertForMaskedLM, tf.BertForSequenceClassification)):
        cfg = _bert_config_from_hf(model.config, name)
        ignore = ()
        if isinstance(model, tf.BertModel):
            kind, ours = "encoder", BertEncoder(cfg)
            if model.pooler is not None:
                warnings.warn(
                    "from_hf: BertModel.pooler has no counterpart in fastformer's BertEncoder and is "
                    "dropped (convert a BertForSequenceClassification to keep a pooler)",
                    stacklevel=2,
                )
                ignore = ("pooler.",)
        elif isinstance(model, tf.BertForMaskedLM):
            kind, ours = "mlm", BertForMaskedLM(cfg)
        else:
            drop, problem = model.config.classifier_dropout, getattr(model.config, "problem_type", None)
            if drop is not None and drop != cfg.dropout:
                _unsupported(name, [f"classifier_dropout={drop} differs from hidden_dropout_prob={cfg.dropout}"])
            # fastformer's classifier is single-label (softmax cross-entropy): Hugging Face's regression
            # (num_labels 1) and multi-label (sigmoid) heads would convert but train and predict otherwise
            if problem not in (None, "single_label_classification") or model.config.num_labels < 2:
                _unsupported(
                    name,
                    [
                        f"problem_type={problem!r} with num_labels={model.config.num_labels} (fastformer's classifier "
                        "is single-label classification over at least 2 labels)"
                    ],
                )
            kind, ours = "cls", BertForSequenceClassification(cfg, model.config.num_labels)
        _copy_from_hf(_prepare(ours, model), model, _bert_map(kind, cfg.num_layers), ignore)
        return ours
    if isinstance(model, (tf.T5ForConditionalGeneration, tf.T5EncoderModel)):
        decoder = isinstance(model, tf.T5ForConditionalGeneration)
        cfg = _t5_config_from_hf(model.config, name, decoder=decoder)
        ours = T5ForConditionalGeneration(cfg) if decoder else T5EncoderModel(cfg)
        _copy_from_hf(_prepare(ours, model), model, _t5_map(ours))
        return ours
    raise ValueError(f"from_hf: unsupported model {name}; supported: {_FROM_SUPPORTED}")


def to_hf(model: nn.Module) -> nn.Module:
    """fastformer BERT / T5 model -> the matching Hugging Face transformers model with the same weights.

    The transformers config is built from `model.config`; the result is on the model's device, in its
    dtype and train/eval mode. Raises ValueError for an unsupported class or config."""
    tf = _transformers()
    name = type(model).__name__
    if isinstance(model, (BertEncoder, BertForMaskedLM, BertForSequenceClassification)):
        cfg = model.config
        if isinstance(model, BertEncoder):
            kind, hf = "encoder", tf.BertModel(_bert_config_to_hf(cfg, name), add_pooling_layer=False)
        elif isinstance(model, BertForMaskedLM):
            kind, hf = "mlm", tf.BertForMaskedLM(_bert_config_to_hf(cfg, name))
        else:
            n = model.classifier.out_features
            if cfg.pooling != "cls":
                raise ValueError(
                    f"to_hf: {name} with pooling={cfg.pooling!r} has no Hugging Face counterpart "
                    "(BertForSequenceClassification pools [CLS]); fine-tune with --pooling cls to export it"
                )
            if n < 2:  # Hugging Face would take a one-label head for regression
                raise ValueError(f"to_hf: {name} with {n} label has no single-label Hugging Face counterpart")
            kind, hf = "cls", tf.BertForSequenceClassification(_bert_config_to_hf(cfg, name, num_labels=n))
        _copy_to_hf(model, _prepare(hf, model), _bert_map(kind, cfg.num_layers))
        return hf
    if isinstance(model, (T5ForConditionalGeneration, T5EncoderModel)):
        hf_cfg = _t5_config_to_hf(model.config)
        if isinstance(model, T5EncoderModel):
            hf = tf.T5EncoderModel(hf_cfg)
        else:
            hf = tf.T5ForConditionalGeneration(hf_cfg)
            if hf.lm_head.weight is hf.shared.weight:
                # transformers 5.x ties the head whatever the config says: give it its own Parameter
                # and drop it from the tie list so that save_pretrained writes it.
                hf.lm_head.weight = nn.Parameter(hf.shared.weight.detach().clone())
                tied = getattr(hf, "all_tied_weights_keys", None)
                if isinstance(tied, dict):
                    tied.pop("lm_head.weight", None)
        _copy_to_hf(model, _prepare(hf, model), _t5_map(model))
        return hf
    if isinstance(model, T5EncoderForSequenceClassification):
        raise ValueError(
            "to_hf: T5EncoderForSequenceClassification (mean-pooled classifier) has no Hugging Face "
            f"counterpart; convert its encoder as a T5EncoderModel. Supported: {_TO_SUPPORTED}"
        )
    raise ValueError(f"to_hf: unsupported model {name}; supported: {_TO_SUPPORTED}")


# ----------------------------------------------------------------------------------------------
# Export: a Hugging Face folder (weights + config + tokenizer)
# ----------------------------------------------------------------------------------------------


def _hf_tokenizer(tokenizer, model: nn.Module, max_len: int | None = None):
    """A transformers PreTrainedTokenizerFast over a copy of `tokenizer` (a tokenizers.Tokenizer) that
    frames a text as fastformer does: `[CLS] text [SEP]` for BERT, `text </s>` for T5. max_len (special
    tokens included) becomes its model_max_length, where `truncation=True` cuts."""
    tf = _transformers()
    if isinstance(model, (BertEncoder, BertForMaskedLM, BertForSequenceClassification)):
        need = {
            "unk_token": "[UNK]",
            "cls_token": "[CLS]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "mask_token": "[MASK]",
        }
        framing = BERT_FRAMING
        extra = {"model_max_length": min(max_len or model.config.max_position, model.config.max_position)}
    else:
        need = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
        framing = T5_FRAMING
        extra = {"model_input_names": ["input_ids", "attention_mask"]}
        if max_len:
            extra["model_max_length"] = max_len
    missing = [t for t in need.values() if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer: lacks the special token(s) {missing} that {type(model).__name__} expects")
    tok = framed_tokenizer(tokenizer, framing)
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, **need, **extra)


def _record_untied_head(out_dir) -> None:
    """Write tie_word_embeddings=false into a saved T5's config.json. transformers 5.x saves true
    whatever the model does (it keeps the untied head, and says so at every load); an older
    transformers would read true as "tie the head and scale the decoder output" (the original T5), a
    different model from the weights saved."""
    import json
    from pathlib import Path

    path = Path(out_dir) / "config.json"
    config = json.loads(path.read_text())
    config["tie_word_embeddings"] = False
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _name_labels(hf, labels) -> None:
    """Set a transformers sequence classifier's id2label / label2id from `labels` (one name per logit).

    Checked here because transformers saves any mapping and then fails in from_pretrained (a classifier
    sized by len(id2label)) or maps two classes to one name."""
    names = [str(n) for n in labels]
    if not type(hf).__name__.endswith("ForSequenceClassification"):
        raise ValueError(f"labels names the classes of a sequence classifier; {type(hf).__name__} has no classes")
    if len(names) != hf.config.num_labels:
        raise ValueError(f"labels has {len(names)} names for a classifier with {hf.config.num_labels} classes")
    if len(set(names)) != len(names):
        raise ValueError(f"labels must be distinct names, got {names}")
    hf.config.id2label = dict(enumerate(names))
    hf.config.label2id = {n: i for i, n in enumerate(names)}


def save_hf(model: nn.Module, out_dir, *, tokenizer=None, labels=None, generation=None, max_len=None) -> nn.Module:
    """Write `model` as a Hugging Face folder: `to_hf(model).save_pretrained(out_dir)`, and with a
    `tokenizers.Tokenizer` also the tokenizer (`AutoTokenizer.from_pretrained(out_dir)` then encodes a
    text exactly as fastformer's training did). `labels` (class names in logit order) become the
    config's id2label / label2id. `generation` (an encoder-decoder's `max_new_tokens`, `num_beams`,
    `length_penalty`, `no_repeat_ngram_size`, `encoder_repetition_penalty`) becomes the defaults of
    `generation_config.json`, so that `generate` without arguments decodes as fastformer's run did.
    `max_len` (the run's input tokens, special tokens included) becomes the tokenizer's
    model_max_length: `tokenizer(texts, truncation=True)` then cuts inputs where fastformer's did.
    Returns the transformers model. Raises ValueError for a model `to_hf` does not support."""
    hf_tok = _hf_tokenizer(tokenizer, model, max_len) if tokenizer is not None else None
    hf = to_hf(model)
    if labels is not None:
        _name_labels(hf, labels)
    gc = getattr(hf, "generation_config", None)
    if generation and gc is not None and isinstance(model, T5ForConditionalGeneration):
        gc.max_new_tokens = int(generation.get("max_new_tokens") or gc.max_new_tokens or 20)
        gc.num_beams = int(generation.get("num_beams") or 1)
        penalty = float(generation.get("length_penalty", 1.0))
        if gc.num_beams > 1:
            gc.length_penalty = penalty
        elif penalty != 1.0:  # transformers refuses to save a length penalty without beams
            from fastformer.data.corpus import FastformerWarning

            warnings.warn(
                f"the run's length penalty {penalty:g} is not in generation_config.json (transformers keeps "
                f"one only with num_beams > 1, and the run decoded greedily): pass length_penalty={penalty:g} "
                "to generate(num_beams=...) for the beam search fastformer predict --num-beams would run",
                FastformerWarning,
                stacklevel=2,
            )
        if generation.get("no_repeat_ngram_size"):
            gc.no_repeat_ngram_size = int(generation["no_repeat_ngram_size"])
        if generation.get("encoder_repetition_penalty", 1.0) != 1.0:
            gc.encoder_repetition_penalty = float(generation["encoder_repetition_penalty"])
    hf.save_pretrained(str(out_dir))
    if isinstance(model, T5ForConditionalGeneration):
        _record_untied_head(out_dir)
    if hf_tok is not None:
        hf_tok.save_pretrained(str(out_dir))
    return hf
