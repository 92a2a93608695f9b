"""BERT-style encoder with a tied, sparse MLM head and a sequence-classification head.

Two attention layouts, chosen per forward call:
- padded (`unpad=False`, or a CPU batch with little padding): hidden (B, L, H); attention through
  ff.scaled_dot_product_attention with a key-padding bool mask (B, 1, 1, L) (True = real token), or
  no mask when nothing is padded.
- unpadded (CUDA by default; on CPU when at least 1/8 of the batch is padding): the real tokens of
  the batch are gathered once after the embeddings
  into (T, H) and every layer runs on them; attention is ff.varlen_attention over cu_seqlens, so no
  FLOP is spent on padding anywhere in the encoder.

The MLM head gathers the rows whose label is not ignored (-100) before the vocabulary projection
and computes the loss with ff.linear_cross_entropy against the word-embedding matrix (tied), so the
(N, V) logits are never built for the ~85% of tokens that are not predicted.

CPU training costs that are not matrix products, and what this file does about them:
- dropout masks: torch draws a float per element from a serial generator, then scales and multiplies
  in more passes; `Dropout` (from _cpu_attention) draws, applies and stores the mask in one pass of the compiled
  extension (csrc/dropout_cpu.cpp), or draws 64 random bits per four elements without it (same keep
  probability to 2e-5, same expectation);
- attention with dropout (training, padded layout): torch's CPU SDPA falls back to its math path
  (head copies, a float per probability); `_cpu_attention.self_attention_dropout` runs per-head GEMMs
  on the q|k|v projection's own layout with the cheap keep masks;
- the tied word-embedding gradient: the input lookup's gradient touches at most B*L rows of the
  (V, H) matrix, so in `BertForMaskedLM` the lookup and the head's view of the matrix come from one
  autograd node (`_TiedLookup`) whose backward adds those rows into the head's dense gradient in
  place: no second dense (V, H) buffer filled with zeros, and no out-of-place sum of the two;
- token types: without `token_type_ids` the type-0 row is broadcast instead of gathered per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import fastformer as ff
from fastformer.backend import fast_cuda

from . import _cpu_attention
from ._autocast import autocast_dtype
from ._cpu_attention import Dropout


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    pre_ln: bool = False  # False: post-LN as in BERT; True: pre-LN (+ final LayerNorm)
    pad_token_id: int = 0
    unpad: bool | None = None  # None: unpad + varlen attention on CUDA, and on CPU for batches >= 1/8 padding
    initializer_range: float = 0.02
    pooling: str = "cls"  # sequence classification: pooler on "cls" ([CLS], as BERT) or on the "mean"
    # of the real tokens' states

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BertConfig:
        """Refuses unknown keys, as T5Config.from_dict does: a misspelt field ('hidden_dim') silently
        gave the default's model."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown BertConfig fields: {unknown}")
        return cls(**d)


def _check_token_types(t, input_ids: torch.Tensor) -> None:
    """ValueError naming token_type_ids unless it is None or an integer tensor that broadcasts to
    input_ids (B, L), as Hugging Face's embedding sum lets it (a (1, L) row serves the batch). Without
    it a mismatched shape failed inside the embedding sum with torch's message."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"token_type_ids must be an integer tensor, got {got}")
    try:
        fits = torch.broadcast_shapes(t.shape, input_ids.shape) == input_ids.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"token_type_ids must be shaped like input_ids {tuple(input_ids.shape)}, got {tuple(t.shape)}")


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # an older torch
        return False


def _check_shaped_like_input(name: str, t, input_ids: torch.Tensor) -> None:
    """ValueError naming `name` unless t is None or a tensor shaped like input_ids (B, L). A shape
    comparison only (no host sync). Without it a mismatched attention_mask ran: the unpadded layout
    reads it as is (a wrong cu_seqlens, silently wrong outputs), the padded one broadcast a (1, L)
    mask over the batch or failed in the attention op naming its own argument."""
    if t is not None and (not isinstance(t, torch.Tensor) or t.shape != input_ids.shape):
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be shaped like input_ids {tuple(input_ids.shape)}, got {got}")


class _TiedLookup(torch.autograd.Function):
    """(embedding rows of `ids`, an alias of `weight` for the tied head) from one node, so that the two
    gradients of the tied matrix meet in this backward: the lookup rows are index_add_-ed into the
    head's dense gradient in place (autograd itself would add a sparse and a dense gradient out of
    place, a (V, H) allocation and copy per step). Rows of `padding_idx` get no lookup gradient."""

    @staticmethod
    def forward(ctx, weight, ids, padding_idx):
        ctx.save_for_backward(ids)
        ctx.padding_idx = padding_idx
        return F.embedding(ids, weight), weight.view_as(weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows, grad_alias):
        (ids,) = ctx.saved_tensors
        flat = ids.reshape(-1)
        H = grad_rows.shape[-1]
        rows = grad_rows.reshape(-1, H)
        if ctx.padding_idx is not None:
            rows = rows.masked_fill((flat == ctx.padding_idx)[:, None], 0.0)
        # grad_alias is the buffer autograd built for this node's second output (the head's freshly
        # made gradient, the sum of its uses, or zeros autograd materialises when the head took no
        # part in this backward): this node is its only reader
        grad = grad_alias if grad_alias.is_contiguous() else grad_alias.contiguous()
        return grad.index_add_(0, flat, rows.to(grad.dtype)), None, None


@torch.compiler.disable  # under torch.compile: run as in eager mode, outside the graph
def _tied_lookup(weight, ids, padding_idx):
    return _TiedLookup.apply(weight, ids, padding_idx)


class _Layout:
    """How the token rows are laid out: padded (B, L) with an optional key mask, or unpadded (T,)."""

    def __init__(self, *, mask=None, batch=None, seqlen=None, cu_seqlens=None, max_seqlen=None, index=None):
        self.mask = mask  # (B, 1, 1, L) bool or None          (padded)
        self.batch, self.seqlen = batch, seqlen
        self.cu_seqlens = cu_seqlens  # (B + 1,) int32                      (unpadded)
        self.max_seqlen = max_seqlen
        self.index = index  # (T,) flat positions of real tokens  (unpadded)
        self.tied_weight = None  # the word-embedding matrix as the tied head must read it (_TiedLookup)

    @property
    def unpadded(self) -> bool:
        return self.cu_seqlens is not None


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        self.h, self.d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.p = cfg.attention_dropout

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        """x: (B, L, H) padded or (T, H) unpadded -> same shape."""
        p = self.p if self.training else 0.0
        qkv = self.qkv(x)
        if layout.unpadded:
            q, k, v = qkv.view(-1, 3, self.h, self.d).unbind(1)  # (T, h, d) each
            o = ff.varlen_attention(
                q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen, dropout_p=p
            )
            o = o.reshape(x.shape)
        elif 0.0 < p < 1.0 and _cpu_attention.usable(qkv, layout.mask):
            o = _cpu_attention.self_attention_dropout(qkv, self.h, p, layout.mask)  # CPU training
        else:
            B, L, _ = x.shape
            q, k, v = qkv.view(B, L, 3, self.h, self.d).permute(2, 0, 3, 1, 4).unbind(0)  # (B, h, L, d)
            o = ff.scaled_dot_product_attention(q, k, v, attn_mask=layout.mask, dropout_p=p)
            o = o.transpose(1, 2).reshape(B, L, -1)
        return self.out(o)


class BertLayer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = BertSelfAttention(cfg)
        self.ln1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.ln2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        self.pre_ln = cfg.pre_ln

    def _mlp(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    def forward(self, x: torch.Tensor, layout: _Layout) -> torch.Tensor:
        if self.pre_ln:
            x = x + self.drop(self.attn(self.ln1(x), layout))
            return x + self.drop(self._mlp(self.ln2(x)))
        x = self.ln1(x + self.drop(self.attn(x, layout)))
        return self.ln2(x + self.drop(self._mlp(x)))


class BertEncoder(nn.Module):
    """Embeddings + Transformer layers. forward -> hidden (B, L, H), or (T, H) rows with `keep_unpadded`."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.emb_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.drop = Dropout(cfg.dropout)
        # set by BertForMaskedLM, whose tied head always adds a dense gradient to the same matrix
        self.tied_word_grad = False
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))
        self.final_ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.pre_ln else None

    def _layout(self, input_ids, attention_mask, cpu_unpad: bool = True, padded: bool = False) -> _Layout:
        B, L = input_ids.shape
        unpad = False if padded else self.config.unpad
        if unpad is None:
            # CUDA: always (the varlen kernel costs nothing extra), except on a GPU below the kernels'
            # compute capability 8.0, where varlen attention would be one torch SDPA call per sequence
            # and the padded batch is one call. CPU: every matrix product scales with the rows it is
            # given, so skipping the padding pays once it is a real share of the batch (a fine-tuning
            # batch of mixed lengths is often half padding); below 1/8 the gather and the per-sequence
            # attention calls cost more than they save.
            if input_ids.is_cuda:
                unpad = fast_cuda(input_ids.device)
            else:
                unpad = (
                    cpu_unpad
                    and attention_mask is not None
                    and not _compiling()
                    and 8 * int(attention_mask.sum()) <= 7 * attention_mask.numel()
                )
        # Nothing padded (attention_mask None, e.g. packed examples): the dense mask-free path is
        # already pad-free, so only unpad when forced.
        if unpad and (attention_mask is not None or self.config.unpad):
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
            lens = attention_mask.sum(1, dtype=torch.int32)
            cu = F.pad(lens.cumsum(0, dtype=torch.int32), (1, 0))
            index = attention_mask.flatten().nonzero().flatten()
            return _Layout(batch=B, seqlen=L, cu_seqlens=cu, max_seqlen=int(lens.max()), index=index)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        return _Layout(mask=mask, batch=B, seqlen=L)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        *,
        keep_unpadded: bool = False,
        cpu_unpad: bool = True,
        padded: bool = False,
    ):
        """input_ids, attention_mask (1 = real token; None = no padding), token_type_ids: (B, L).

        Returns (hidden, layout): hidden (B, L, H); or, when the unpadded path runs and keep_unpadded
        is set, (T, H) rows at the flat positions `layout.index`. cpu_unpad=False keeps a CPU batch
        padded whatever its padding; padded=True keeps any batch padded (also on CUDA, or with
        config.unpad=True)."""
        B, L = input_ids.shape
        _check_shaped_like_input("attention_mask", attention_mask, input_ids)
        _check_token_types(token_type_ids, input_ids)
        if L > self.config.max_position:
            raise ValueError(f"input_ids: sequence length {L} exceeds max_position {self.config.max_position}")
        layout = self._layout(input_ids, attention_mask, cpu_unpad, padded)
        pos = torch.arange(L, device=input_ids.device)
        emb = self.word_embeddings
        tied = (
            self.tied_word_grad
            and input_ids.device.type == "cpu"
            and emb.weight.requires_grad
            and torch.is_grad_enabled()
        )
        if tied:  # the head reads the matrix through layout.tied_weight
            words, layout.tied_weight = _tied_lookup(emb.weight, input_ids, emb.padding_idx)
        else:
            words = F.embedding(input_ids, emb.weight, emb.padding_idx)
        x = words + self.position_embeddings(pos)
        if token_type_ids is not None:
            x = x + self.token_type_embeddings(token_type_ids)
        else:
            x = x + self.token_type_embeddings.weight[0]
        x = self.drop(self.emb_ln(x))
        if layout.unpadded:
            x = x.reshape(B * L, -1).index_select(0, layout.index)  # (T, H)
        for layer in self.layers:
            x = layer(x, layout)
        if self.final_ln is not None:
            x = self.final_ln(x)
        if layout.unpadded and not keep_unpadded:
            full = x.new_zeros(B * L, x.shape[-1])
            x = full.index_copy(0, layout.index, x).view(B, L, -1)
        return x, layout

    def init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, 0.0, std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class BertMLMHead(nn.Module):
    """dense + GELU + LayerNorm, then the tied vocabulary projection (+ bias)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.ln = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def transform(self, h: torch.Tensor) -> torch.Tensor:
        return self.ln(F.gelu(self.dense(h)))


class BertForMaskedLM(nn.Module):
    """Encoder + tied sparse MLM head. forward(...) -> (loss_sum, n_predicted, logits_or_None, target)."""

    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.config = cfg
        self.encoder = BertEncoder(cfg)
        self.encoder.tied_word_grad = True
        self.head = BertMLMHead(cfg)
        self.apply(self.encoder.init_weights)

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None, *, return_logits=False):
        """input_ids, attention_mask, labels: (B, L); labels -100 where nothing is predicted.

        Returns (loss_sum, n_predicted, logits, target): loss_sum is the SUM of the cross-entropy over
        the predicted rows (callers normalise), n_predicted an int, logits (n_predicted, V) only with
        return_logits (evaluation accuracy) else None, target (n_predicted,) the gathered labels.
        Without labels (inference): (None, 0, logits (B, L, V) for every position, None)."""
        if labels is None:
            return None, 0, self.dense_logits(input_ids, attention_mask, token_type_ids), None
        # checked before the labelled-padding test below reads both
        _check_shaped_like_input("attention_mask", attention_mask, input_ids)
        _check_shaped_like_input("labels", labels, input_ids)
        # a label on a padded position (no collator makes one) is predicted from that position's hidden
        # state, as Hugging Face does: only the padded layout has it, so such a batch stays padded, on
        # any device and whatever config.unpad says (one host sync; the unpadded layout makes more)
        labelled_padding = attention_mask is not None and bool(((labels != -100) & ~attention_mask.bool()).any())
        h, layout = self.encoder(input_ids, attention_mask, token_type_ids, keep_unpadded=True, padded=labelled_padding)
        flat_labels = labels.reshape(-1)
        if layout.unpadded:
            flat_labels = flat_labels.index_select(0, layout.index)
        h = h.reshape(-1, h.shape[-1])
        rows = (flat_labels != -100).nonzero().flatten()  # gather the predicted rows only
        hm = self.head.transform(h.index_select(0, rows))  # (N, H)
        target = flat_labels.index_select(0, rows)
        dt = autocast_dtype(hm)
        # ff.linear_cross_entropy is a custom op that autocast does not see: cast explicitly, once for
        # the loss and the logits
        w = layout.tied_weight if layout.tied_weight is not None else self.encoder.word_embeddings.weight
        hm, w, bias = hm.to(dt), w.to(dt), self.head.bias.to(dt)
        loss = ff.linear_cross_entropy(hm, w, target, bias=bias, reduction="sum")
        logits = F.linear(hm, w, bias) if return_logits else None
        if loss.dtype in (torch.float16, torch.bfloat16):
            loss = loss.float()
        return loss, rows.numel(), logits, target

    def dense_logits(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        """Logits for every position (B, L, V): forward without labels, and the tests' check of the
        sparse head."""
        h, _ = self.encoder(input_ids, attention_mask, token_type_ids, cpu_unpad=False)
        return F.linear(self.head.transform(h), self.encoder.word_embeddings.weight, self.head.bias)


class BertForSequenceClassification(nn.Module):
    """Encoder + pooler (dense + tanh on [CLS], or on the masked mean of the token states with
    cfg.pooling "mean") + dropout + linear. forward -> logits (B, num_labels).

    MLM pre-training never trains the [CLS] state (no next-sentence task here), while every token state
    learned to carry its context, so the mean is offered beside BERT's [CLS]; only "cls" has a Hugging
    Face counterpart (to_hf refuses "mean")."""

    def __init__(self, cfg: BertConfig, num_labels: int):
        if cfg.pooling not in ("cls", "mean"):
            raise ValueError(f"pooling must be 'cls' or 'mean', got {cfg.pooling!r}")
        super().__init__()
        self.config = cfg
        self.encoder = BertEncoder(cfg)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.drop = Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden_size, num_labels)
        self.apply(self.encoder.init_weights)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None) -> torch.Tensor:
        h, _ = self.encoder(input_ids, attention_mask, token_type_ids)
        if self.config.pooling == "mean":
            if attention_mask is None:
                feature = h.mean(1)
            else:
                m = attention_mask.to(h.dtype)[..., None]
                feature = (h * m).sum(1) / m.sum(1).clamp_min(1)
        else:
            feature = h[:, 0]
        pooled = torch.tanh(self.pooler(feature))
        return self.classifier(self.drop(pooled))
