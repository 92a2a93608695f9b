"""ff.nn.MultiheadAttention: drop-in for torch.nn.MultiheadAttention over the fused attention op.

Same constructor, parameter names and state_dict keys as torch's module (it subclasses it), so
`load_state_dict` moves weights either way. The forward with `need_weights=False` projects q/k/v,
runs ff.scaled_dot_product_attention (Triton kernels on CUDA) and the output projection; a
(N, S) key_padding_mask (True = pad) becomes the kernels' per-batch key-length fast path.
`need_weights=True` (torch's default), add_bias_kv and add_zero_attn use torch's implementation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from ..ops.errors import ModuleInputError


class MaskError(ModuleInputError):
    """A bad key_padding_mask / attn_mask. A ValueError naming the argument, as everywhere in
    fastformer, that also is what torch's MultiheadAttention raises for it (AssertionError for a mask
    dtype or key-padding shape, RuntimeError for an attn_mask shape), so code written against torch's
    module catches it unchanged."""


def _check_inputs(mha: MultiheadAttention, query, key, value) -> None:
    """torch's MultiheadAttention input checks (it asserts), as ModuleInputError (a ValueError, an
    AssertionError and a RuntimeError) raised before any projection."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ModuleInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if query.dim() not in (2, 3) or key.dim() != query.dim() or value.dim() != query.dim():
        raise ModuleInputError(
            f"query, key and value must all be 3-D (batched) or 2-D (unbatched); got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[-1] != mha.embed_dim:
        raise ModuleInputError(
            f"query: was expecting embedding dimension of {mha.embed_dim}, but got {query.shape[-1]}"
        )
    if key.shape[-1] != mha.kdim or value.shape[-1] != mha.vdim:
        raise ModuleInputError(
            f"key / value: expected feature sizes kdim={mha.kdim}, vdim={mha.vdim}; got "
            f"{key.shape[-1]} and {value.shape[-1]}"
        )
    if key.shape[:-1] != value.shape[:-1]:
        raise ModuleInputError(
            f"key and value must have the same length and batch: key shape {tuple(key.shape)} vs "
            f"value shape {tuple(value.shape)}"
        )
    if query.dim() == 3:
        b = 0 if mha.batch_first else 1
        if key.shape[b] != query.shape[b]:
            raise ModuleInputError(f"key batch size {key.shape[b]} != query batch size {query.shape[b]}")


def _dims(mha: MultiheadAttention, query, key) -> tuple[int, int, int]:
    """(N, L, S) of a forward's inputs in any of torch's layouts (N = 1 for unbatched ones)."""
    if query.dim() == 2:
        return 1, query.shape[0], key.shape[0]
    if mha.batch_first:
        return query.shape[0], query.shape[1], key.shape[1]
    return query.shape[1], query.shape[0], key.shape[0]


def _check_masks(mha: MultiheadAttention, query, key, key_padding_mask, attn_mask) -> None:
    """torch's mask checks (AssertionError / RuntimeError there) as MaskError, for either forward path.
    key_padding_mask: (N, S), or (S,) for unbatched inputs; attn_mask: (L, S) or (N·num_heads, L, S)."""
    unbatched = query.dim() == 2
    N, L, S = _dims(mha, query, key)
    H = mha.num_heads
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is not None and not (m.dtype == torch.bool or m.is_floating_point()):
            raise MaskError(f"{name} must be bool or floating point (as torch's MultiheadAttention), got {m.dtype}")
    kpm_shape = (S,) if unbatched else (N, S)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != kpm_shape:
        want = f"(S,) = {kpm_shape}" if unbatched else f"(N, S) = {kpm_shape}"
        raise MaskError(f"key_padding_mask must have shape {want}, got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None and tuple(attn_mask.shape) not in ((L, S), (N * H, L, S)):
        raise MaskError(
            f"attn_mask must have shape (L, S) = {(L, S)} or (N·num_heads, L, S) = {(N * H, L, S)}, "
            f"got {tuple(attn_mask.shape)}"
        )


def _to_additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """torch MHA mask convention (bool True = blocked, float added) -> float additive mask."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention with a fused attention core.

    query: (L, N, E) or (N, L, E) with batch_first (or unbatched (L, E)); key/value: (S, N, kdim/vdim)
    key_padding_mask: (N, S) bool True = ignore (or float, added); attn_mask: (L, S) or (N·H, L, S),
    bool True = blocked (or float, added). Returns (attn_output like query, weights or None).
    """

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ):
        _check_inputs(self, query, key, value)
        # with is_causal the fast path ignores attn_mask (torch's hint), so only the torch path checks it
        torch_path = need_weights or self.bias_k is not None or self.add_zero_attn
        _check_masks(self, query, key, key_padding_mask, attn_mask if torch_path or not is_causal else None)
        if torch_path:
            if is_causal and attn_mask is None:  # torch needs the explicit mask for need_weights
                _, L, S = _dims(self, query, key)
                attn_mask = torch.ones(L, S, dtype=torch.bool, device=query.device).triu(1)
            return super().forward(
                query,
                key,
                value,
                key_padding_mask=key_padding_mask,
                need_weights=need_weights,
                attn_mask=attn_mask,
                average_attn_weights=average_attn_weights,
                is_causal=is_causal,
            )
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now (L, N, E) / (S, N, kdim) as torch's functional form
        L, N, E = query.shape
        S = key.shape[0]
        H, hd = self.num_heads, self.head_dim

        # 1. projections (same weight layout as torch: in_proj_weight rows = [q; k; v])
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = F.linear(query, w_q, b_q).view(L, N, H, hd).permute(1, 2, 0, 3)
        k = F.linear(key, w_k, b_k).view(S, N, H, hd).permute(1, 2, 0, 3)
        v = F.linear(value, w_v, b_v).view(S, N, H, hd).permute(1, 2, 0, 3)

        # 2. masks -> one SDPA mask (bool True = attend when possible: keeps the key-length fast path)
        mask = None
        causal = bool(is_causal)
        if causal:
            attn_mask = None  # torch's hint: attn_mask is the causal mask
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(N, H, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(N, 1, 1, S)
            mask = ~kpm if kpm.dtype == torch.bool else kpm.to(q.dtype)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool and (mask is None or mask.dtype == torch.bool):
                mask = ~attn_mask if mask is None else mask & ~attn_mask
            else:
                add = _to_additive(attn_mask, q.dtype)
                if mask is not None:
                    add = add + (_to_additive(~mask, q.dtype) if mask.dtype == torch.bool else mask)
                mask = add

        # 3. fused attention, then the output projection
        dropout_p = self.dropout if self.training else 0.0
        out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal)
        out = out.permute(2, 0, 1, 3).reshape(L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, None
