"""T5 attention modules over the fused ops.

    attn = ff.nn.T5SelfAttention(d_model=512, num_heads=8, d_kv=64, has_relative_attention_bias=True)
    y = attn(x, attn_mask=key_padding)                       # x: (B, L, d_model) -> (B, L, d_model)

    cross = ff.nn.T5CrossAttention(d_model=512, num_heads=8, d_kv=64)
    y = cross(x_dec, enc_out, attn_mask=enc_key_padding)     # (B, Lq, d_model), (B, Lk, d_model)

Parameter names mirror Hugging Face's ``T5Attention`` (``q``, ``k``, ``v``, ``o`` — Linear without
bias — and ``relative_attention_bias``, an ``Embedding(num_buckets, H)`` present only when
``has_relative_attention_bias``), so a HF ``T5Attention.state_dict()`` loads with ``load_state_dict``.

Sharing the table the way T5 does: only the first layer of a stack owns ``relative_attention_bias``;
later layers are built with ``has_relative_attention_bias=False`` and receive the first layer's table
as the ``bias_table`` argument (``first.bias_table``). Because the same Parameter is used by every
layer, its gradient sums the contributions of all layers, as in HF T5 (where the first layer's bias
tensor is passed on).

Masks: ``attn_mask`` is a key-padding mask, bool (B, 1, 1, Lk) with True = may attend; a (B, Lk)
bool/0-1 tensor (HF's ``attention_mask`` layout) is accepted and reshaped. The decoder's causal
structure is not a mask argument: ``is_decoder=True`` applies it (``is_causal`` in the op).
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import scaled_dot_product_attention, t5_attention


def _key_padding_mask(mask: torch.Tensor | None, batch: int, lk: int) -> torch.Tensor | None:
    """(B, Lk) or (B, 1, 1, Lk) bool / 0-1 mask -> bool (B, 1, 1, Lk), True = may attend."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"attn_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 2:
        mask = mask[:, None, None, :]
    if (
        mask.dim() != 4
        or mask.shape[1] != 1
        or mask.shape[2] != 1
        or mask.shape[3] != lk
        or mask.shape[0] not in (1, batch)
    ):
        raise ValueError(
            f"attn_mask must be a key-padding mask shaped (B, Lk) or (B, 1, 1, Lk) with B={batch}, "
            f"Lk={lk}; got shape {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point():
            raise ValueError("attn_mask must be bool or 0/1 integers (True/1 = may attend), not a float additive mask")
        mask = mask != 0
    return mask


class _T5AttentionBase(nn.Module):
    """Projections shared by self- and cross-attention: q, k, v: d_model -> H*d_kv, o: H*d_kv -> d_model."""

    def __init__(
        self, d_model: int, num_heads: int, d_kv: int | None = None, *, dropout: float = 0.0, device=None, dtype=None
    ):
        super().__init__()
        if d_kv is None:
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) is not divisible by num_heads ({num_heads}); pass d_kv")
            d_kv = d_model // num_heads
        self.d_model, self.n_heads, self.key_value_proj_dim = d_model, num_heads, d_kv
        self.inner_dim = num_heads * d_kv
        self.dropout = float(dropout)
        kw = {"device": device, "dtype": dtype}
        self.q = nn.Linear(d_model, self.inner_dim, bias=False, **kw)
        self.k = nn.Linear(d_model, self.inner_dim, bias=False, **kw)
        self.v = nn.Linear(d_model, self.inner_dim, bias=False, **kw)
        self.o = nn.Linear(self.inner_dim, d_model, bias=False, **kw)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, H*D) -> (B, H, L, D)."""
        b, length, _ = x.shape
        return x.view(b, length, self.n_heads, self.key_value_proj_dim).transpose(1, 2)

    def _merge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, L, D) -> (B, L, d_model) through o."""
        b, _, length, _ = y.shape
        return self.o(y.transpose(1, 2).reshape(b, length, self.inner_dim))

    def _check_input(self, name: str, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be shaped (B, L, d_model={self.d_model}), got {shape}")


class T5SelfAttention(_T5AttentionBase):
    """T5 self-attention with relative-position bias: softmax(q·kᵀ + bias_table[bucket(j − i)]) v, no scaling.

    Encoder (``is_decoder=False``): bidirectional buckets. Decoder (``is_decoder=True``): causal
    attention and unidirectional buckets. ``relative_attention_bias.weight``: (num_buckets, H),
    present only when ``has_relative_attention_bias``.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_kv: int | None = None,
        *,
        has_relative_attention_bias: bool = False,
        is_decoder: bool = False,
        num_buckets: int = 32,
        max_distance: int = 128,
        dropout: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__(d_model, num_heads, d_kv, dropout=dropout, device=device, dtype=dtype)
        self.is_decoder = bool(is_decoder)
        self.has_relative_attention_bias = bool(has_relative_attention_bias)
        self.relative_attention_num_buckets = int(num_buckets)
        self.relative_attention_max_distance = int(max_distance)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, num_heads, device=device, dtype=dtype)

    @property
    def bias_table(self) -> torch.Tensor:
        """This layer's own table (num_buckets, H); pass it to later layers as ``bias_table``."""
        if not self.has_relative_attention_bias:
            raise AttributeError("this T5SelfAttention has no relative_attention_bias (only the first layer owns it)")
        return self.relative_attention_bias.weight

    def forward(
        self,
        hidden_states: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        bias_table: torch.Tensor | None = None,
        *,
        kv_cache=None,
    ) -> torch.Tensor:
        """hidden_states: (B, L, d_model); attn_mask: bool (B, 1, 1, Lk) or (B, Lk), True = attend;
        bias_table: (num_buckets, H), required when this layer owns none. Returns (B, L, d_model).

        kv_cache (incremental decoding): an object whose ``update(k, v)`` stores this call's keys and
        values (B, H, L, D) and returns all of them so far (B, H, P + L, D); the L rows then sit at
        positions P..P+L-1 (``query_offset=P`` of ``ff.t5_attention``) and Lk = P + L."""
        self._check_input("hidden_states", hidden_states)
        if self.has_relative_attention_bias:
            if bias_table is not None:
                raise ValueError(
                    "bias_table was given but this layer owns relative_attention_bias; pass one or the other"
                )
            bias_table = self.relative_attention_bias.weight
        elif bias_table is None:
            raise ValueError(
                "bias_table is required: this layer has no relative_attention_bias "
                "(pass the first layer's `.bias_table`)"
            )
        b, length, _ = hidden_states.shape
        q = self._heads(self.q(hidden_states))
        k = self._heads(self.k(hidden_states))
        v = self._heads(self.v(hidden_states))
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)
        mask = _key_padding_mask(attn_mask, b, k.shape[2])
        y = t5_attention(
            q,
            k,
            v,
            bias_table,
            bidirectional=not self.is_decoder,
            num_buckets=self.relative_attention_num_buckets,
            max_distance=self.relative_attention_max_distance,
            attn_mask=mask,
            is_causal=self.is_decoder,
            scale=1.0,
            dropout_p=self.dropout if self.training else 0.0,
            query_offset=k.shape[2] - length,
        )
        return self._merge(y)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_heads={self.n_heads}, d_kv={self.key_value_proj_dim}, "
            f"is_decoder={self.is_decoder}, has_relative_attention_bias={self.has_relative_attention_bias}"
        )


class T5CrossAttention(_T5AttentionBase):
    """T5 encoder-decoder attention: softmax(q_dec·k_encᵀ) v_enc, no position bias, no scaling."""

    def forward(
        self, hidden_states: torch.Tensor, key_value_states: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """hidden_states: (B, Lq, d_model) (decoder); key_value_states: (B, Lk, d_model) (encoder output);
        attn_mask: bool (B, 1, 1, Lk) or (B, Lk), True = attend. Returns (B, Lq, d_model)."""
        self._check_input("hidden_states", hidden_states)
        self._check_input("key_value_states", key_value_states)
        if key_value_states.shape[0] != hidden_states.shape[0]:
            raise ValueError(
                f"key_value_states batch {key_value_states.shape[0]} != hidden_states batch {hidden_states.shape[0]}"
            )
        b, lk = key_value_states.shape[0], key_value_states.shape[1]
        mask = _key_padding_mask(attn_mask, b, lk)
        q = self._heads(self.q(hidden_states))
        k = self._heads(self.k(key_value_states))
        v = self._heads(self.v(key_value_states))
        y = scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=1.0, dropout_p=self.dropout if self.training else 0.0
        )
        return self._merge(y)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_heads={self.n_heads}, d_kv={self.key_value_proj_dim}"
