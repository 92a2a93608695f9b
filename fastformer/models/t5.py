"""T5 v1.1-style encoder-decoder over the fastformer T5 attention modules.

    cfg = T5Config.from_dict({**T5_PRESETS["t5-tiny"], "vocab_size": tok.get_vocab_size()})
    model = T5ForConditionalGeneration(cfg)
    out = model(input_ids, attention_mask, labels=labels)      # (B, Lin), (B, Lin), (B, Ltgt)
    out.loss_sum / out.n_predicted                             # mean token cross-entropy

Architecture (T5 v1.1): a shared token embedding; pre-norm blocks with RMS norm (scale only, no bias,
no mean subtraction); self-attention with T5 relative-position bias (bidirectional buckets in the
encoder, causal + unidirectional buckets in the decoder; only the first layer of each stack owns its
table, later layers borrow it); decoder cross-attention without bias; gated-GELU feed-forward
(wo(gelu_tanh(wi_0 x) * wi_1 x)); no bias in any linear; an untied LM head evaluated by
`ff.linear_cross_entropy` on the non-ignored label rows only, so no (B·L, V) logits are built.

Parameter names follow Hugging Face's `T5ForConditionalGeneration`
(`encoder.block.0.layer.0.SelfAttention.q.weight`, `decoder.block.0.layer.1.EncDecAttention.k.weight`,
`...layer.2.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`, `shared.weight`,
`lm_head.weight`), so an HF v1.1 state_dict loads with `load_state_dict`.

`T5EncoderForSequenceClassification` is the encoder-only feature path for fine-tuning: the encoder,
a masked mean over its outputs, dropout and a linear classifier.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastformer as ff
from fastformer.nn import T5CrossAttention, T5SelfAttention

from . import _cpu_attention
from ._autocast import autocast_dtype
from ._cpu_attention import Dropout
from .generation import DecoderCache, KVCache, _int_arg, generate
from .presets import PresetTable, canonical_preset

# Published T5 v1.1 sizes (google/t5-v1_1-small, google/t5-v1_1-base): d_model, d_ff, d_kv, heads, layers.
# t5-tiny and t5-mini are ours: t5-tiny trains a few hundred steps a minute on 2 CPU cores, t5-mini
# (bert-mini's width and depth on each side) is for a CPU with bf16 instructions or a GPU. The older names
# t5-small / t5-base still index this table, with a warning (presets.DEPRECATED_PRESETS): they are not
# Hugging Face's t5-small / t5-base (the original T5: ReLU feed-forward, tied head).
# dropout_rate 0.0: T5 v1.1 was pre-trained without dropout (set it for fine-tuning).
T5_PRESETS: dict[str, dict] = PresetTable(
    {
        "t5-tiny": dict(d_model=128, d_ff=256, d_kv=32, num_heads=4, num_layers=2, num_decoder_layers=2),
        "t5-mini": dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4),
        "t5-v1_1-small": dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8),
        "t5-v1_1-base": dict(d_model=768, d_ff=2048, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12),
    }
)


def _check_size(name: str, value) -> None:
    """ValueError naming the T5Config field unless `value` is an int >= 1 (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"T5Config {name} must be an int >= 1, got {value!r}")


@dataclass
class T5Config:
    vocab_size: int = 32128
    d_model: int = 512
    d_ff: int = 1024
    d_kv: int = 64
    num_heads: int = 6
    num_layers: int = 8
    num_decoder_layers: int | None = None  # None: same as num_layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # T5 starts decoding from the pad token

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        # sizes of 0 built a model that failed later with an IndexError (no layers) or a
        # ZeroDivisionError (no heads) far from the field that caused it. num_decoder_layers is checked
        # where a decoder is built (T5Stack): an encoder-only classifier never reads it.
        for name in ("vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers"):
            _check_size(name, getattr(self, name))
        # checked here, not at the first forward deep inside attention: Hugging Face's T5Config takes
        # bucket settings ff.t5_attention cannot run. Every T5 model has an encoder (bidirectional
        # rule); a model with a decoder checks its stricter causal rule too (check_buckets)
        self.check_buckets(decoder=False)

    def check_buckets(self, decoder: bool) -> None:
        """ValueError naming the fields when ff.t5_attention cannot run these buckets: the encoder's
        (bidirectional) rule, and with decoder=True also the decoder's (causal: a twice larger exact
        range, so max_distance must exceed num_buckets // 2)."""
        from fastformer.ops.t5_attention import check_bucket_config

        try:
            check_bucket_config(True, self.relative_attention_num_buckets, self.relative_attention_max_distance)
            if decoder:
                check_bucket_config(False, self.relative_attention_num_buckets, self.relative_attention_max_distance)
        except ValueError as e:
            raise ValueError(
                f"T5Config relative_attention_num_buckets={self.relative_attention_num_buckets!r}, "
                f"relative_attention_max_distance={self.relative_attention_max_distance!r}: {e}"
            ) from None

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown T5Config fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> T5Config:
        """`name`: a T5_PRESETS name (a deprecated alias such as 't5-small' resolves, with a warning)."""
        name = canonical_preset(name)
        if name not in T5_PRESETS:
            raise ValueError(f"unknown T5 preset {name!r} (choose from {', '.join(T5_PRESETS)})")
        return cls.from_dict({**T5_PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Seq2SeqOutput:
    """loss: mean cross-entropy over predicted tokens (0-d); loss_sum: its sum; n_predicted: int;
    logits: (B, Ltgt, V) only when asked for (or when no labels are given)."""

    loss: torch.Tensor | None
    loss_sum: torch.Tensor | None
    n_predicted: int
    logits: torch.Tensor | None = None
    encoder_hidden_states: torch.Tensor | None = None


class T5RMSNorm(nn.Module):
    """x · rsqrt(mean(x²) + eps) · weight, statistics in at least fp32; no bias, no mean subtraction."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 statistics for half inputs
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * y.to(x.dtype)


class T5GatedGelu(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): (B, L, d_model) -> (B, L, d_model)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, x):
        return self.wo(self.dropout(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)))


def _shape_of(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_shaped_like(name: str, t, like_name: str, shape) -> None:
    """ValueError naming `name` unless t is None or a tensor of `shape` (that of `like_name`). A shape
    comparison only (no host sync): a mismatched mask otherwise failed deep in the attention with a
    bare RuntimeError, or broadcast a (1, L) mask over the batch."""
    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be shaped like {like_name} {tuple(shape)}, got {got}")


def _attend_with_bias(attn, x, kv, bias):
    """The CPU training path of a T5 attention module `attn` (self: kv = x; cross: kv = the encoder
    output): its projections, _cpu_attention.attention_with_bias with the stack's precomputed bias and
    the module's dropout rate, its output projection. (B, Lq, d_model)."""
    q, k, v = attn._heads(attn.q(x)), attn._heads(attn.k(kv)), attn._heads(attn.v(kv))
    return attn._merge(_cpu_attention.attention_with_bias(q, k, v, bias, attn.dropout))


class _SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, *, is_decoder: bool, owns_table: bool):
        super().__init__()
        self.SelfAttention = T5SelfAttention(
            cfg.d_model,
            cfg.num_heads,
            cfg.d_kv,
            has_relative_attention_bias=owns_table,
            is_decoder=is_decoder,
            num_buckets=cfg.relative_attention_num_buckets,
            max_distance=cfg.relative_attention_max_distance,
            dropout=cfg.dropout_rate,
        )
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, h, mask, table, fast=None):
        """fast: None, or the stack's precomputed (self-attention bias, cross-attention bias) of the CPU
        training path (T5Stack._fast_biases)."""
        x = self.layer_norm(h)
        if fast is not None:
            y = _attend_with_bias(self.SelfAttention, x, x, fast[0])
        else:
            y = self.SelfAttention(
                x, attn_mask=mask, bias_table=None if self.SelfAttention.has_relative_attention_bias else table
            )
        return h + self.dropout(y)


class _CrossAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.EncDecAttention = T5CrossAttention(cfg.d_model, cfg.num_heads, cfg.d_kv, dropout=cfg.dropout_rate)
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, h, enc, enc_mask, fast=None):
        x = self.layer_norm(h)
        if fast is not None:
            y = _attend_with_bias(self.EncDecAttention, x, enc, fast[1])
        else:
            y = self.EncDecAttention(x, enc, attn_mask=enc_mask)
        return h + self.dropout(y)


class _FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5GatedGelu(cfg)  # HF's name, kept so state_dicts match
        self.layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, h):
        return h + self.dropout(self.DenseReluDense(self.layer_norm(h)))


class T5Block(nn.Module):
    """layer = [self-attention, (cross-attention,) feed-forward], each pre-norm with a residual."""

    def __init__(self, cfg: T5Config, *, is_decoder: bool, owns_table: bool):
        super().__init__()
        self.is_decoder = is_decoder
        layers = [_SelfAttentionLayer(cfg, is_decoder=is_decoder, owns_table=owns_table)]
        if is_decoder:
            layers.append(_CrossAttentionLayer(cfg))
        layers.append(_FeedForwardLayer(cfg))
        self.layer = nn.ModuleList(layers)

    def forward(self, h, mask, table, enc=None, enc_mask=None, fast=None):
        h = self.layer[0](h, mask, table, fast)
        if self.is_decoder:
            h = self.layer[1](h, enc, enc_mask, fast)
        return self.layer[-1](h)


class T5Stack(nn.Module):
    """Encoder (is_decoder=False) or decoder stack. forward -> (B, L, d_model) after the final norm."""

    def __init__(self, cfg: T5Config, embed_tokens: nn.Embedding, *, is_decoder: bool):
        super().__init__()
        if is_decoder:
            cfg.check_buckets(decoder=True)  # at construction (from_hf too), not at the first forward
            _check_size("num_decoder_layers", cfg.num_decoder_layers)  # a decoder without layers cannot decode
        self.is_decoder = is_decoder
        self.embed_tokens = embed_tokens
        n = cfg.num_decoder_layers if is_decoder else cfg.num_layers
        self.block = nn.ModuleList([T5Block(cfg, is_decoder=is_decoder, owns_table=(i == 0)) for i in range(n)])
        self.final_layer_norm = T5RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = Dropout(cfg.dropout_rate)

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None):
        """input_ids: (B, L); attention_mask: (B, L) bool/0-1, True = real token (key padding);
        decoder only: encoder_hidden_states (B, Lenc, d_model), encoder_attention_mask (B, Lenc)."""
        _check_shaped_like("attention_mask", attention_mask, "input_ids", input_ids.shape)
        if encoder_hidden_states is not None:
            _check_shaped_like(
                "encoder_attention_mask",
                encoder_attention_mask,
                "encoder_hidden_states' (B, Lenc)",
                encoder_hidden_states.shape[:2],
            )
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        enc_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()[:, None, None, :]
        table = self.block[0].layer[0].SelfAttention.bias_table  # the first layer's table, shared
        h = self.dropout(self.embed_tokens(input_ids))
        fast = self._fast_biases(h, table, mask, enc_mask)
        for blk in self.block:
            h = blk(h, mask, table, encoder_hidden_states, enc_mask, fast)
        return self.dropout(self.final_layer_norm(h))

    def _fast_biases(self, h, table, mask, enc_mask):
        """(self-attention bias, cross-attention bias) for the CPU training path (models/_cpu_attention.py:
        the stack's bias built once, one-pass dropout on the probabilities when there is dropout), or
        None: the layers call ff.t5_attention / ff.scaled_dot_product_attention (CUDA, eval, autocast,
        torch.compile, or a query row without keys). Without dropout the path is taken only when the
        position-bias table gets a gradient: ff.t5_attention then runs its eager reference per layer
        (measured 1.1-1.5x slower per forward + backward), while without that gradient it runs torch's
        fused CPU attention, which is faster than this path."""
        sa = self.block[0].layer[0].SelfAttention
        if (
            not self.training
            or not 0.0 <= sa.dropout < 1.0
            or h.device.type != "cpu"
            or h.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu")
            or torch.compiler.is_compiling()
        ):
            return None
        if sa.dropout == 0.0 and not (torch.is_grad_enabled() and table.requires_grad):
            return None
        if self.is_decoder and enc_mask is not None and not bool(enc_mask.any(-1).all()):
            return None
        self_bias = _cpu_attention.t5_stack_bias(
            table.to(h.dtype),
            h.shape[1],
            bidirectional=not self.is_decoder,
            num_buckets=sa.relative_attention_num_buckets,
            max_distance=sa.relative_attention_max_distance,
            key_mask=mask,
            causal=self.is_decoder,
        )
        if self_bias is None:
            return None
        return self_bias, _cpu_attention.key_padding_bias(enc_mask, h.dtype)


def _init_weights(model: nn.Module, cfg: T5Config) -> None:
    """T5's initialisation (Mesh TensorFlow): normal with std 1/sqrt(fan_in) (q additionally / sqrt(d_kv)),
    embeddings std 1. The untied LM head uses std 1/sqrt(d_model) so initial logits are O(1)."""
    for mod in model.modules():
        if isinstance(mod, T5RMSNorm):
            nn.init.ones_(mod.weight)
        elif isinstance(mod, (T5SelfAttention, T5CrossAttention)):
            nn.init.normal_(mod.q.weight, std=(cfg.d_model * cfg.d_kv) ** -0.5)
            nn.init.normal_(mod.k.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(mod.v.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(mod.o.weight, std=(cfg.num_heads * cfg.d_kv) ** -0.5)
            if getattr(mod, "has_relative_attention_bias", False):
                nn.init.normal_(mod.relative_attention_bias.weight, std=cfg.d_model**-0.5)
        elif isinstance(mod, T5GatedGelu):
            nn.init.normal_(mod.wi_0.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(mod.wi_1.weight, std=cfg.d_model**-0.5)
            nn.init.normal_(mod.wo.weight, std=cfg.d_ff**-0.5)
    if hasattr(model, "shared"):
        nn.init.normal_(model.shared.weight, std=1.0)
    if hasattr(model, "lm_head"):
        nn.init.normal_(model.lm_head.weight, std=cfg.d_model**-0.5)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """T5RMSNorm as one call: fp32/fp64 directly, half dtypes with fp32 statistics."""
    if x.dtype in (torch.float32, torch.float64):
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return weight * F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype)


class _DecodeStep:
    """The decoder stack for incremental decoding, written as plain tensor calls over weights fused once
    per cache: q|k|v and wi_0|wi_1 are each one matmul, the cross-attention k|v of all positions are
    projected by start_cache; no module calls and no dropout (inference only). Self-attention runs
    `ff.t5_attention` at `query_offset` = the cache length. The uncached decoder (T5Stack) is its oracle."""

    def __init__(self, model: T5ForConditionalGeneration):
        cfg = model.config
        dec = model.decoder
        self.embed = model.shared.weight
        self.eps = cfg.layer_norm_epsilon
        self.H, self.D = cfg.num_heads, cfg.d_kv
        first = dec.block[0].layer[0].SelfAttention
        self.table = first.bias_table
        self.nb, self.md = first.relative_attention_num_buckets, first.relative_attention_max_distance
        self.final_norm = dec.final_layer_norm.weight
        self.layers, self.cross_kv = [], []
        with torch.no_grad():
            for blk in dec.block:
                sa, ca, ffn = blk.layer[0], blk.layer[1], blk.layer[2]
                a, c, g = sa.SelfAttention, ca.EncDecAttention, ffn.DenseReluDense
                self.layers.append(
                    (
                        sa.layer_norm.weight,
                        torch.cat([a.q.weight, a.k.weight, a.v.weight]),
                        a.o.weight,
                        ca.layer_norm.weight,
                        c.q.weight,
                        c.o.weight,
                        ffn.layer_norm.weight,
                        torch.cat([g.wi_0.weight, g.wi_1.weight]),
                        g.wo.weight,
                    )
                )
                self.cross_kv.append(torch.cat([c.k.weight, c.v.weight]))

    def __call__(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """ids: (N, L) at positions cache.length.. -> decoder output (N, L, d_model) after the final norm."""
        N, L = ids.shape
        R = cache.repeat
        B = N // R
        H, D, eps = self.H, self.D, self.eps
        offset = cache.length
        h = F.embedding(ids, self.embed)
        for (n0, qkv, o, n1, cq, co, n2, wi, wo), kv, (ck, cv) in zip(self.layers, cache.self_attn, cache.cross):
            q, k, v = F.linear(_rms_norm(h, n0, eps), qkv).view(N, L, 3, H, D).transpose(1, 3).unbind(2)
            k, v = kv.update(k, v)
            y = ff.t5_attention(
                q,
                k,
                v,
                self.table,
                bidirectional=False,
                num_buckets=self.nb,
                max_distance=self.md,
                is_causal=True,
                scale=1.0,
                query_offset=offset,
            )
            h = h + F.linear(y.transpose(1, 2).reshape(N, L, H * D), o)
            # the R rows of each input (beams) are R·L query rows against that input's keys
            q = F.linear(_rms_norm(h, n1, eps), cq).view(B, R * L, H, D).transpose(1, 2)
            y = cache.attend(q, ck, cv, attn_mask=cache.enc_mask, scale=1.0)  # (B, H, R·L, D)
            h = h + F.linear(y.transpose(1, 2).reshape(N, L, H * D), co)
            gate, lin = F.linear(_rms_norm(h, n2, eps), wi).chunk(2, dim=-1)
            h = h + F.linear(F.gelu(gate, approximate="tanh") * lin, wo)
        return _rms_norm(h, self.final_norm, eps)


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs from labels: (B, L) -> (B, L), [start, y_0, ..., y_{L-2}], -100 replaced by pad."""
    out = labels.new_full(labels.shape, start_id)
    out[:, 1:] = labels[:, :-1]
    return out.masked_fill(out == -100, pad_id)


class T5ForConditionalGeneration(nn.Module):
    """Encoder-decoder with an untied LM head (T5 v1.1)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, is_decoder=False)
        self.decoder = T5Stack(cfg, self.shared, is_decoder=True)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init_weights(self, cfg)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> encoder features (B, L, d_model)."""
        return self.encoder(input_ids, attention_mask)

    # -- generation -----------------------------------------------------------------------------
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """(B, Lin) inputs -> generated ids (B · num_return_sequences, 1 + T), greedy or beam search.
        Keywords: max_new_tokens=20, num_beams=1, length_penalty=1.0, early_stopping=False,
        num_return_sequences=1, eos_token_id, pad_token_id, decoder_start_token_id (default: the
        config's), no_repeat_ngram_size=0, encoder_repetition_penalty=1.0, use_cache=True. Semantics:
        fastformer.models.generation."""
        return generate(self, input_ids, attention_mask, **kwargs)

    def start_cache(
        self,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        capacity: int = 0,
        repeat: int = 1,
    ) -> DecoderCache:
        """A decoding cache for encoder output (B, Lenc, d_model) with mask (B, Lenc): the cross-attention
        keys/values of every decoder layer, projected once; empty self-attention caches sized for
        `capacity` tokens; the decoder's weights fused for the step (see _DecodeStep). With repeat=K the
        decoder runs B·K rows, row b·K + r serving input b (beam search); the encoder side is not
        repeated: the K rows of an input attend to its keys as K query rows of one attention."""
        repeat = _int_arg(repeat, "repeat", 1, " (decoder rows per input)")  # numpy integers too, as in generate
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            got = _shape_of(encoder_hidden_states)
            raise ValueError(f"encoder_hidden_states must be shaped (B, Lenc, d_model), got {got}")
        # else a bare RuntimeError at the first decode, far from the mask that caused it
        _check_shaped_like(
            "attention_mask", attention_mask, "encoder_hidden_states' (B, Lenc)", encoder_hidden_states.shape[:2]
        )
        step = _DecodeStep(self)
        b, length, _ = encoder_hidden_states.shape
        H, D = self.config.num_heads, self.config.d_kv
        cross = []
        for w in step.cross_kv:  # (2·H·D, d_model): k and v rows, one matmul per layer
            kv = F.linear(encoder_hidden_states, w).view(b, length, 2, H, D).permute(2, 0, 3, 1, 4)
            cross.append((kv[0], kv[1]))
        mask = None
        # A decode step has K query rows per input against fixed keys: torch's SDPA is a single fused
        # call on every device (fastformer's tiled kernel would fill a few rows of each tile). An input
        # that is all padding keeps fastformer's op, whose zeros for rows without keys the uncached
        # decoder gives too.
        attend = F.scaled_dot_product_attention
        if attention_mask is not None:
            mask = attention_mask.bool()
            if not bool(mask.any(-1).all()):
                attend = ff.scaled_dot_product_attention
            mask = mask[:, None, None, :]
        return DecoderCache([KVCache(capacity) for _ in self.decoder.block], cross, mask, attend, step, int(repeat))

    def decode(self, decoder_input_ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """The next decoder tokens (N, L) at positions cache.length.. -> logits (N, L, V); the cache grows.
        Inference: no dropout."""
        n = len(cache.cross[0][0]) * cache.repeat if cache.cross else None  # B inputs · repeat rows each
        if (
            not isinstance(decoder_input_ids, torch.Tensor)
            or decoder_input_ids.dim() != 2
            or (n is not None and decoder_input_ids.shape[0] != n)
        ):
            # else a bare RuntimeError (or an unpacking ValueError) inside the decode step
            raise ValueError(
                f"decoder_input_ids must be shaped (N, L) with N = {n} (the cache's inputs x repeat), got "
                f"{_shape_of(decoder_input_ids)}"
            )
        h = cache.step(decoder_input_ids, cache)
        dt = autocast_dtype(h)
        return F.linear(h.to(dt), self.lm_head.weight.to(dt))

    def decode_uncached(
        self,
        decoder_input_ids: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The whole decoder prefix (N, L) against encoder output (N, Lenc, d_model) -> logits (N, L, V)."""
        h = self.decoder(decoder_input_ids, None, encoder_hidden_states, attention_mask)
        dt = autocast_dtype(h)
        return F.linear(h.to(dt), self.lm_head.weight.to(dt))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        return_logits: bool = False,
    ) -> Seq2SeqOutput:
        """input_ids, attention_mask: (B, Lin); labels: (B, Ltgt), -100 = not predicted;
        decoder_input_ids: (B, Ltgt), default labels shifted right. The decoder's own padding sits
        after the last label (right padding), so causality alone keeps it out of real positions."""
        if labels is None and decoder_input_ids is None:
            raise ValueError("labels or decoder_input_ids is required")
        if decoder_input_ids is None:
            decoder_input_ids = shift_right(labels, self.config.decoder_start_token_id, self.config.pad_token_id)
        elif labels is not None and labels.shape != decoder_input_ids.shape:
            raise ValueError(
                f"labels must be shaped like decoder_input_ids {tuple(decoder_input_ids.shape)} (one label per "
                f"decoder position), got {tuple(labels.shape)}"
            )
        if decoder_input_ids.shape[0] != input_ids.shape[0]:  # else a bare RuntimeError in the cross-attention
            name = "labels" if labels is not None else "decoder_input_ids"
            got = tuple(decoder_input_ids.shape)
            raise ValueError(f"{name} must have input_ids' batch size {input_ids.shape[0]}, got shape {got}")
        enc = self.encoder(input_ids, attention_mask)
        dec = self.decoder(decoder_input_ids, None, enc, attention_mask)
        dt = autocast_dtype(dec)
        w = self.lm_head.weight.to(dt)
        logits = F.linear(dec.to(dt), w) if (return_logits or labels is None) else None
        if labels is None:
            return Seq2SeqOutput(None, None, 0, logits, enc)
        flat = labels.reshape(-1)
        rows = (flat != -100).nonzero().flatten()  # predicted rows only
        h = dec.reshape(-1, dec.shape[-1]).index_select(0, rows).to(dt)
        # ff.linear_cross_entropy is a custom op that autocast does not see: cast explicitly.
        loss_sum = ff.linear_cross_entropy(h, w, flat.index_select(0, rows), reduction="sum")
        loss_sum = loss_sum.to(torch.promote_types(loss_sum.dtype, torch.float32))
        n = int(rows.numel())
        return Seq2SeqOutput(loss_sum / max(n, 1), loss_sum, n, logits, enc)


class T5EncoderForSequenceClassification(nn.Module):
    """Encoder + masked mean pooling + dropout + linear. forward(input_ids, attention_mask) -> (B, num_labels).

    Load a span-pretrained encoder with `load_pretrained(state_dict)` (keys `shared.*`, `encoder.*`)."""

    def __init__(self, cfg: T5Config, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg, self.shared, is_decoder=False)
        self.drop = Dropout(dropout)
        self.classifier = nn.Linear(cfg.d_model, num_labels)
        _init_weights(self, cfg)
        nn.init.normal_(self.classifier.weight, std=cfg.d_model**-0.5)
        nn.init.zeros_(self.classifier.bias)

    def load_pretrained(self, state: dict) -> None:
        """Copy shared embedding and encoder weights from a T5ForConditionalGeneration state_dict."""
        keep = {k: v for k, v in state.items() if k.startswith(("shared.", "encoder."))}
        try:
            missing, unexpected = self.load_state_dict(keep, strict=False)
        except RuntimeError as e:  # shape mismatch: a different architecture
            raise ValueError(f"pretrained state does not fit this encoder: {e}") from None
        missing = [k for k in missing if not k.startswith("classifier.")]
        if missing or unexpected:
            raise ValueError(f"pretrained state does not fit this encoder: missing {missing}, unexpected {unexpected}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.encoder(input_ids, attention_mask)  # (B, L, d_model)
        if attention_mask is None:
            pooled = h.mean(1)
        else:
            m = attention_mask.to(h.dtype)[..., None]
            pooled = (h * m).sum(1) / m.sum(1).clamp_min(1)
        return self.classifier(self.drop(pooled))
