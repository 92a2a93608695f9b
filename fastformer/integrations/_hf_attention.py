"""The attention and mask functions that patched Hugging Face models dispatch to.

transformers 5.x routes every BERT / RoBERTa / T5 attention call through a registry:
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, ...)``, and builds the padding /
causal masks through a second registry, ``ALL_MASK_ATTENTION_FUNCTIONS[config._attn_implementation]``.
``patch_hf_model`` registers the two functions below under the name ``"fastformer"`` and points the
model's configs at that name. Nothing in the model's modules or weights changes.

Mask: for the plain cases (bidirectional padding, or causal without a cache) the mask function returns
the 2-D padding mask as a (B, 1, 1, Lk) bool key-padding mask, the form the fused kernel's fast path
takes, and the attention function adds causality as a flag. Any other case (a KV cache while
generating, packed sequences, custom mask functions) falls back to transformers' own ``sdpa_mask``,
which materialises the full (B, 1, Lq, Lk) bool mask.

Attention: query/key/value arrive as (B, H, L, D) and the function returns ((B, Lq, H, D), None).
- T5 self-attention over the whole sequence goes through ``ff.t5_attention`` with the stack's own
  ``relative_attention_bias`` table (tagged on the module by the patch; gradients reach the table).
- T5 cross-attention and BERT/RoBERTa attention go through ``ff.scaled_dot_product_attention``.
- Anything else that carries a ``position_bias`` (T5 decoding with a cache) folds the bias that
  transformers computed into a float mask, as transformers' own sdpa path does.
"""

from __future__ import annotations

import threading
import weakref

import torch

from ..ops import scaled_dot_product_attention, t5_attention, varlen_attention

NAME = "fastformer"

# Module tags written by the patch (plain attributes: no parameters, no state_dict entries).
ROLE = "_ff_role"  # "bert_self" | "t5_self" | "t5_cross"
BIAS_SOURCE = "_ff_bias_source"  # T5 self-attention: the stack's first-layer T5Attention (owns the table)
VARLEN = "_ff_varlen"  # BERT self-attention: run unpadded through ff.varlen_attention


def _is_key_padding(mask, lk: int) -> bool:
    """True for a (B, 1, 1, Lk) bool mask: padding only, nothing that depends on the query row."""
    return (
        mask.dtype == torch.bool
        and mask.dim() == 4
        and mask.shape[1] == 1
        and mask.shape[2] == 1
        and mask.shape[3] == lk
    )


def _causal_bool(lq: int, lk: int, device) -> torch.Tensor:
    """(Lq, Lk) top-left aligned causal mask, True = may attend."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def _fold_position_bias(position_bias, mask, causal: bool, query) -> torch.Tensor:
    """One additive float mask from a T5 position bias (1|B, H, Lq, Lk) and a bool or float mask.

    Masked entries get the dtype's minimum (not -inf), as transformers does, so rows stay finite."""
    lq, lk = query.shape[-2], position_bias.shape[-1]
    keep = None
    if mask is not None and mask.dtype == torch.bool:
        keep = mask
    if causal:
        tri = _causal_bool(lq, lk, query.device)
        keep = tri if keep is None else keep & tri
    bias = position_bias
    if mask is not None and mask.dtype != torch.bool:
        bias = bias + mask
    bias = bias.to(query.dtype)
    if keep is not None:
        bias = torch.where(keep, bias, torch.finfo(query.dtype).min)
    return bias.contiguous()


# One forward passes the same mask object to every layer: unpad indices are computed once per mask.
# Per thread (a patched model may be called from several threads at once), and the mask is held
# weakly, so the cache neither hands one call's indices to another nor keeps a finished batch alive.
_local = threading.local()


def _unpad_index(keep: torch.Tensor):
    """keep: (B, 1, 1, L) bool -> (flat indices of kept tokens, cu_seqlens int32 (B+1,), max length)."""
    cached = getattr(_local, "unpad", None)
    if cached is not None and cached[0]() is keep:
        return cached[1]
    flat = keep.reshape(-1)
    idx = flat.nonzero().squeeze(1)
    lengths = keep.reshape(keep.shape[0], -1).sum(1, dtype=torch.int32)
    cu = torch.zeros(keep.shape[0] + 1, dtype=torch.int32, device=keep.device)
    cu[1:] = lengths.cumsum(0)
    info = (idx, cu, int(lengths.max().item()) if lengths.numel() else 0)
    _local.unpad = (weakref.ref(keep), info)
    return info


PADDED = "_ff_padded"  # attribute on an attention mask: varlen BERT self-attention takes the padded path


def mark_padded(attention_mask: torch.Tensor) -> torch.Tensor:
    """A bool copy or alias of a 2-D attention_mask (the caller's tensor is untouched) marked so that
    `varlen` BERT self-attention over it takes the padded path. The loss forward uses it for a batch
    with labels on padded positions: Hugging Face computes those positions' outputs by attending over
    the real keys, which the unpadded path never computes. The mark travels with the mask object (to
    every layer, and to a gradient-checkpointing recompute in backward), not with a thread or a block."""
    # bool: transformers converts the mask with .to(bool), which keeps a bool tensor's object (and mark)
    alias = attention_mask.to(torch.bool)
    if alias is attention_mask:
        alias = alias.view(alias.shape)
    setattr(alias, PADDED, True)
    return alias


def _varlen_self_attention(query, key, value, keep, dropout: float, scale):
    """Self-attention on the unpadded tokens only. Returns (B, L, H, D); padded query rows are zero."""
    b, h, length, d = query.shape
    idx, cu, max_len = _unpad_index(keep)

    def pack(t):  # (B, H, L, D) -> (total, H, D)
        return t.transpose(1, 2).reshape(b * length, h, d).index_select(0, idx)

    out = varlen_attention(
        pack(query), pack(key), pack(value), cu, cu, max_len, max_len, dropout_p=dropout, scale=scale
    )
    full = out.new_zeros(b * length, h, d).index_copy(0, idx, out)
    return full.view(b, length, h, d)


def attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling=None,
    position_bias=None,
    is_causal=None,
    **kwargs,
):
    """transformers attention-interface function.

    query: (B, H, Lq, D), key/value: (B, H, Lk, D), attention_mask: None, (B, 1, 1, Lk) bool, or a
    full (B, 1, Lq, Lk) bool/float mask. Returns (attn_output (B, Lq, H, D), None): attention
    weights are never materialised, so ``output_attentions`` yields None.
    """
    lq, lk = query.shape[-2], key.shape[-2]
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    # "plain": the mask is padding only and queries are the whole sequence (no cache), so a causal
    # pattern is exactly the kernel's top-left `is_causal` flag.
    plain = (attention_mask is None or _is_key_padding(attention_mask, lk)) and lq == lk
    role = module.__dict__.get(ROLE)

    if role == "t5_self" and plain:
        table = module.__dict__[BIAS_SOURCE].relative_attention_bias.weight
        out = t5_attention(
            query,
            key,
            value,
            table,
            bidirectional=not module.is_decoder,
            num_buckets=module.relative_attention_num_buckets,
            max_distance=module.relative_attention_max_distance,
            attn_mask=attention_mask,
            is_causal=causal,
            scale=1.0 if scaling is None else scaling,
            dropout_p=dropout,
        )
        return out.transpose(1, 2).contiguous(), None

    if position_bias is not None and role != "t5_cross":
        # T5 with a cache (generation), or an untagged module: use the bias transformers computed.
        mask = _fold_position_bias(position_bias, attention_mask, causal and plain, query)
        out = scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    if (
        role == "bert_self"
        and module.__dict__.get(VARLEN)
        and plain
        and not causal
        and attention_mask is not None
        and not getattr(attention_mask, PADDED, False)
    ):
        return _varlen_self_attention(query, key, value, attention_mask, dropout, scaling), None

    mask, flag = attention_mask, causal and plain
    if flag and mask is not None:  # torch-style SDPA takes a mask or is_causal, not both
        mask, flag = mask & _causal_bool(lq, lk, query.device), False
    out = scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=dropout, is_causal=flag, scale=scaling
    )
    return out.transpose(1, 2).contiguous(), None


def mask_forward(*args, **kwargs):
    """transformers mask-interface function (same keyword arguments as ``masking_utils.sdpa_mask``).

    Returns None, a (B, 1, 1, Lk) bool key-padding mask (plain cases), or sdpa_mask's full mask."""
    from transformers import masking_utils as mu

    fn = kwargs.get("mask_function")
    bidirectional = getattr(mu, "bidirectional_mask_function", None)
    causal = getattr(mu, "causal_mask_function", None)
    am = kwargs.get("attention_mask")
    q_len, kv_len, batch = kwargs.get("q_length"), kwargs.get("kv_length"), kwargs.get("batch_size")
    no_offset = all(isinstance(kwargs.get(k, 0), int) and kwargs.get(k, 0) == 0 for k in ("q_offset", "kv_offset"))
    plain = (
        not args
        and fn is not None
        and (fn is bidirectional or (fn is causal and q_len == kv_len))
        and no_offset
        and "cache_position" not in kwargs
        and kwargs.get("local_size") is None
        and (am is None or (isinstance(am, torch.Tensor) and am.dim() == 2 and am.shape[-1] == kv_len))
    )
    if plain:
        if am is None:
            return None
        keep = am.to(torch.bool)[:, None, None, :]
        if batch is not None and keep.shape[0] != batch:
            keep = keep.expand(batch, 1, 1, kv_len)
        if getattr(am, PADDED, False):
            setattr(keep, PADDED, True)
        return keep
    # Full mask; never skip causality into a flag here (the attention function only adds the flag
    # for key-padding masks over the whole sequence).
    kwargs["allow_is_causal_skip"] = False
    return mu.sdpa_mask(*args, **kwargs)


class Registration:
    """Kept on a patched model (``model._ff_registration``). A patched model's configs name the
    "fastformer" attention, which transformers looks up in its registry at every forward: pickling
    the model (``torch.save(model)``) pickles this marker, and unpickling it registers the attention
    again, in a process that never called patch_hf_model."""

    def __reduce__(self):
        return (registered, ())


def registered() -> Registration:
    """register(), and the marker that repeats it when a pickled model is loaded."""
    register()
    return Registration()


def register() -> None:
    """Register both functions under NAME (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, mask_forward)
