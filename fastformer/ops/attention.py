"""Fused attention ops: validation, dispatch (kernels or reference) and the autograd Function.

    out = ff.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False,
                                          scale=None, enable_gqa=False)       # q: (B, H, Lq, D)
    out = ff.varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                              dropout_p=0.0, causal=False, scale=None)         # q: (Tq, H, D)

Dispatch: CUDA tensors (or any tensor with the backend forced to "triton") run the Triton kernels;
CPU tensors under "auto" and anything the kernels do not cover (float64, head dim > 256, value head
dim != query head dim, ...) run the eager reference. A query row whose keys are all masked yields
zeros (torch gives NaN).

Dropout in the kernels draws one seed from torch's default generator of the tensor's device
(`torch.manual_seed` reproduces it); the keep-mask is regenerated in the backward. For tests,
`with capture_dropout_masks() as masks:` collects the (B, H, Lq, Lk) keep-mask of every kernel call.

Host syncs: checks that must read a tensor's values (is a bool mask a key-padding prefix? are
cu_seqlens valid, what is their longest sequence?) are remembered per tensor while it lives
unmodified (same object, storage and version counter), so the layers of a model that share one mask
or one cu_seqlens pay the device-to-host sync once per forward, not once per layer; the CUDA dropout
seed comes from the generator's host-side state (no sync). A write torch does not count (`.data`,
numpy/DLPack views, custom kernels) is not seen: call `forget_host_checks()` after one.
"""
from __future__ import annotations

import collections
import contextlib
import math
import threading
import weakref
from typing import Callable, Optional

import torch

from ..backend import use_triton
from ..reference.attention import sdpa_reference, varlen_reference
from ._amp import autocast_cast, autocast_dtype, no_autocast
from ._compile import opaque_to_compile
from ._validate import FLOAT_DTYPES, check_range, check_tensor

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

_captured: Optional[list] = None


@contextlib.contextmanager
def capture_dropout_masks():
    """Debug hook: collect the bool keep-mask (B, H, Lq, Lk) of each kernel call with dropout
    (varlen: (B, H, max_q, max_k) indexed by positions within each sequence)."""
    global _captured
    previous, _captured = _captured, []
    try:
        yield _captured
    finally:
        _captured = previous


_MEMO: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
_MEMO_SIZE = 32
_MEMO_LOCK = threading.Lock()


def _memo(t: torch.Tensor, key, compute: Callable):
    """compute() (a check that reads t's values, i.e. syncs with the device), remembered for this
    tensor object while its storage and version counter are unchanged. An exception is not kept.
    Inference-mode tensors have no version counter: for them the check always runs."""
    if t.is_inference():
        return compute()
    tag = (t.data_ptr(), t._version, key)
    with _MEMO_LOCK:
        entry = _MEMO.get(id(t))
        if entry is not None and entry[0]() is t and entry[1] == tag:
            _MEMO.move_to_end(id(t))
            return entry[2]
    result = compute()
    with _MEMO_LOCK:
        _MEMO[id(t)] = (weakref.ref(t), tag, result)
        _MEMO.move_to_end(id(t))
        while len(_MEMO) > _MEMO_SIZE:
            _MEMO.popitem(last=False)
    return result


def forget_host_checks() -> None:
    """Drop every remembered mask / cu_seqlens check. Needed only after changing such a tensor by a
    write torch does not count (through `.data`, a numpy or DLPack view, a custom kernel, a CUDA
    graph replay): those leave its version counter as it was."""
    with _MEMO_LOCK:
        _MEMO.clear()


def _splitmix(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _draw_seed(device: torch.device) -> int:
    """A 31-bit seed from the default generator of the tensor's device, so torch.manual_seed reproduces
    dropout. On CUDA the generator's (seed, offset) live on the host: read them and advance the offset
    as a kernel drawing random numbers would, instead of syncing on a device tensor."""
    if device.type == "cuda":
        try:
            gen = torch.cuda.default_generators[device.index if device.index is not None
                                                else torch.cuda.current_device()]
            offset = gen.get_offset()
            gen.set_offset(offset + 4)
            return _splitmix(_splitmix(gen.initial_seed()) ^ offset) & 0x7FFFFFFF
        except (AttributeError, RuntimeError, IndexError):   # an older torch: draw on the device
            pass
    return int(torch.randint(0, 2**31 - 1, (1,), device=device).item())


def _seed_dropout(spec, B: int, H: int, Lq: int, Lk: int, device: torch.device) -> None:
    """With dropout, give spec its seed and, inside capture_dropout_masks(), record the (B, H, Lq, Lk)
    keep-mask the kernels will draw from it."""
    from ..kernels.attention_launch import dropout_keep_mask

    if spec.dropout_p > 0:
        spec.seed = _draw_seed(device)
        if _captured is not None:
            _captured.append(dropout_keep_mask(B, H, Lq, Lk, spec.seed, spec.dropout_p, device))


# ----------------------------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------------------------


class FusedAttentionFunction(torch.autograd.Function):
    """q, k, v (+ optional float mask, optional T5 table) -> out; the rest of the call in `spec`."""

    @staticmethod
    def forward(ctx, q, k, v, mask, table, spec):
        from ..kernels.attention_launch import attention_forward

        spec.mask = mask if mask is not None else spec.mask
        spec.t5_table = table
        out, lse = attention_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse, mask, table)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        from ..kernels.attention_launch import attention_backward

        q, k, v, out, lse, mask, table = ctx.saved_tensors
        spec = ctx.spec
        spec.mask = mask if mask is not None else spec.mask
        spec.t5_table = table
        spec.mask_grad = mask is not None and ctx.needs_input_grad[3]
        spec.t5_grad = table is not None and ctx.needs_input_grad[4]
        need = ctx.needs_input_grad
        dq, dk, dv, dm, dt = attention_backward(dout, q, k, v, out, lse, spec, need_dq=need[0],
                                                need_dkdv=need[1] or need[2])
        dmask = dtable = None
        if dm is not None:
            dmask = dm.to(mask.dtype)  # (B, H, Lq, Lk): the expand's backward reduces it
        if dt is not None:
            # fixed-order reduction of the per-(batch, key block) partials: deterministic
            dtable = dt.sum(dim=(0, 2))[:, : table.shape[0]].t().contiguous().to(table.dtype)
        return dq, dk, dv, dmask, dtable, None


# ----------------------------------------------------------------------------------------------
# validation and mask analysis
# ----------------------------------------------------------------------------------------------


def _check_qkv(query, key, value, enable_gqa):
    check_tensor("query", query, ndim=(3, 4), dtypes=FLOAT_DTYPES)
    check_tensor("key", key, ndim=query.dim(), dtypes=FLOAT_DTYPES, device=query.device)
    check_tensor("value", value, ndim=query.dim(), dtypes=FLOAT_DTYPES, device=query.device)
    if key.dtype != query.dtype:
        raise ValueError(f"key has dtype {key.dtype} but query has {query.dtype}; they must match")
    if value.dtype != query.dtype:
        raise ValueError(f"value has dtype {value.dtype} but query has {query.dtype}; they must match")
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key head dim {key.shape[-1]} != query head dim {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value length {value.shape[-2]} != key length {key.shape[-2]}")
    if key.shape[:-3] != query.shape[:-3] or value.shape[:-3] != query.shape[:-3]:
        raise ValueError(f"key/value batch dims {tuple(key.shape[:-3])} must equal query's {tuple(query.shape[:-3])}")
    if value.shape[-3] != key.shape[-3]:
        raise ValueError(f"value has {value.shape[-3]} heads but key has {key.shape[-3]}")
    Hq, Hk = query.shape[-3], key.shape[-3]
    if Hq != Hk:
        if not enable_gqa:
            raise ValueError(f"key has {Hk} heads but query has {Hq}; pass enable_gqa=True for grouped-query attention")
        if Hq % Hk != 0:
            raise ValueError(f"enable_gqa: query heads {Hq} must be a multiple of key heads {Hk}")


def _check_mask(attn_mask, B, H, Lq, Lk, device):
    if attn_mask is None:
        return
    check_tensor("attn_mask", attn_mask, dtypes=(torch.bool,) + FLOAT_DTYPES, device=device)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {tuple(attn_mask.shape)}")
    try:
        ok = torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk)) == (B, H, Lq, Lk)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to {(B, H, Lq, Lk)}")


def _key_lengths(mask4: torch.Tensor):
    """If a bool mask (B|1, 1, 1, Lk) is a prefix mask (True then False per batch row): (its lengths
    (int32), whether any is shorter than Lk); else (None, False). Syncs with the device."""
    m = mask4[:, 0, 0, :]
    lengths = m.sum(-1)
    prefix = torch.arange(m.shape[-1], device=m.device)[None, :] < lengths[:, None]
    if bool((prefix == m).all()):
        return lengths.to(torch.int32), bool((lengths < m.shape[-1]).any())
    return None, False


def _kernel_covers(q, k, v) -> bool:
    return (q.dtype in KERNEL_DTYPES and q.shape[-1] <= MAX_HEAD_DIM and v.shape[-1] == q.shape[-1]
            and q.shape[-2] > 0 and k.shape[-2] > 0 and q.numel() > 0)


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


@opaque_to_compile
def fused_attention_4d(q, k, v, *, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                       t5_table=None, t5_rel=None):
    """Kernel path for validated 4D inputs. q: (B, H, Lq, D), k/v: (B, H_kv, Lk, D) -> (B, H, Lq, D).
    attn_mask: None or bool/float broadcastable to (B, H, Lq, Lk). t5_table: (NB, H) with its bucket function
    t5_rel (kernels.attention.T5RelPos)."""
    from ..kernels.attention_launch import AttnSpec

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    spec = AttnSpec(scale=1.0 / math.sqrt(D) if scale is None else float(scale), causal=bool(is_causal),
                    dropout_p=float(dropout_p), t5_rel=t5_rel)
    float_mask = None
    if attn_mask is not None:
        m4 = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
        if attn_mask.dtype == torch.bool:
            if m4.shape[1] == 1 and m4.shape[2] == 1 and m4.shape[3] == Lk:
                klen, short = _memo(attn_mask, "key_lengths", lambda: _key_lengths(m4))
                if klen is not None:
                    if short:
                        spec.klen = klen.expand(B).contiguous()
                    m4 = None
            if m4 is not None:
                spec.mask = m4.expand(B, H, Lq, Lk).view(torch.uint8)
        else:
            # the expanded view goes into the Function: autograd's expand/reshape backward then sums
            # the full dS over the broadcast dims back onto the user's mask
            float_mask = m4.expand(B, H, Lq, Lk)
    _seed_dropout(spec, B, H, Lq, Lk, q.device)
    if float_mask is not None and float_mask.requires_grad:
        return FusedAttentionFunction.apply(q, k, v, float_mask, t5_table, spec)
    if float_mask is not None:
        spec.mask = float_mask.detach()
    out = FusedAttentionFunction.apply(q, k, v, None, t5_table, spec)
    return out


# ----------------------------------------------------------------------------------------------
# public ops
# ----------------------------------------------------------------------------------------------


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention.

    query: (B, H, Lq, D) (or (N, Lq, D)), key: (B, H_kv, Lk, D), value: (B, H_kv, Lk, D)
    attn_mask: bool (True = attend) or float (added), broadcastable to (B, H, Lq, Lk); a bool
    (B, 1, 1, Lk) key-padding mask takes the per-batch-length fast path.
    Returns (B, H, Lq, D). Rows whose keys are all masked give 0 (torch: NaN). Under torch.autocast,
    query/key/value and a float mask run in the autocast dtype, as torch's SDPA does.
    """
    amp = autocast_dtype(query)
    if amp is not None:
        query, key, value, attn_mask = (autocast_cast(t, amp) for t in (query, key, value, attn_mask))
        with no_autocast(query, amp):
            return scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    _check_qkv(query, key, value, enable_gqa)
    check_range("dropout_p", float(dropout_p), 0.0, 1.0, hi_inclusive=True)   # 1.0: zeros, as torch
    if query.dim() == 4:
        _check_mask(attn_mask, query.shape[0], query.shape[1], query.shape[2], key.shape[2], query.device)
    else:
        _check_mask(attn_mask, 1, query.shape[0], query.shape[1], key.shape[1], query.device)
    if scale is not None and not math.isfinite(float(scale)):
        raise ValueError(f"scale must be a finite number, got {scale}")
    if not (use_triton(query, key, value, attn_mask) and _kernel_covers(query, key, value)) or dropout_p >= 1.0:
        return sdpa_reference(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale, enable_gqa=enable_gqa)
    if query.dim() == 3:  # (N, L, D): N plays the heads
        mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape)) if attn_mask is not None \
            else None
        out = fused_attention_4d(query[None], key[None], value[None], attn_mask=mask, dropout_p=dropout_p,
                                 is_causal=is_causal, scale=scale)
        return out[0]
    return fused_attention_4d(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                              scale=scale)


def _check_cu(name: str, cu: torch.Tensor, total: int) -> int:
    """Validate cumulative lengths (one device-to-host copy) and return the longest sequence."""
    c = cu.tolist()
    if c[0] != 0 or c[-1] != total or any(b < a for a, b in zip(c, c[1:])):
        raise ValueError(f"{name} must start at 0, be non-decreasing and end at {total}")
    return max((b - a for a, b in zip(c, c[1:])), default=0)


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dropout_p=0.0,
                     causal=False, scale=None):
    """Attention over packed variable-length sequences, no padding computed.

    q: (Tq, H, D), k/v: (Tk, H_kv, D) (H a multiple of H_kv), cu_seqlens_q/k: (B + 1,) int, cumulative
    lengths starting at 0; max_seqlen_q/k: the longest sequence. causal is top-left aligned per
    sequence. Returns (Tq, H, D). Under torch.autocast q/k/v run in the autocast dtype.
    """
    amp = autocast_dtype(q)
    if amp is not None:
        q, k, v = (autocast_cast(t, amp) for t in (q, k, v))
        with no_autocast(q, amp):
            return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=dropout_p, causal=causal, scale=scale)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=q.device)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k/v dtypes ({k.dtype}, {v.dtype}) must equal q's {q.dtype}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if v.shape[0] != k.shape[0] or v.shape[1] != k.shape[1]:
        raise ValueError(f"v shape {tuple(v.shape)} must match k's first dims {tuple(k.shape[:2])}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q heads {q.shape[1]} must be a multiple of k heads {k.shape[1]}")
    longest = {}
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        check_tensor(name, cu, ndim=1, dtypes=(torch.int32, torch.int64), device=q.device)
        if cu.numel() < 1:
            raise ValueError(f"{name} must hold at least one offset")
        longest[name] = _memo(cu, ("cu_seqlens", total),
                              lambda cu=cu, total=total, name=name: _check_cu(name, cu, total))
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must describe the same number of sequences")
    lq, lk = longest["cu_seqlens_q"], longest["cu_seqlens_k"]
    if int(max_seqlen_q) < lq:
        raise ValueError(f"max_seqlen_q={max_seqlen_q} is smaller than the longest query sequence {lq}")
    if int(max_seqlen_k) < lk:
        raise ValueError(f"max_seqlen_k={max_seqlen_k} is smaller than the longest key sequence {lk}")
    check_range("dropout_p", float(dropout_p), 0.0, 1.0, hi_inclusive=True)   # 1.0: zeros, as torch
    if not (use_triton(q, k, v) and _kernel_covers(q, k, v)) or dropout_p >= 1.0:
        return varlen_reference(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                dropout_p=dropout_p, causal=causal, scale=scale)
    return _varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale)


@opaque_to_compile
def _varlen_kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale):
    """Kernel path of varlen_attention for validated inputs."""
    from ..kernels.attention_launch import AttnSpec

    B = cu_seqlens_q.numel() - 1
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    spec = AttnSpec(scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale), causal=bool(causal),
                    dropout_p=float(dropout_p), cu_q=cu_seqlens_q.to(torch.int32).contiguous(),
                    cu_k=cu_seqlens_k.to(torch.int32).contiguous(), max_q=max(int(max_seqlen_q), 1),
                    max_k=max(int(max_seqlen_k), 1))
    _seed_dropout(spec, B, q.shape[1], spec.max_q, spec.max_k, q.device)
    return FusedAttentionFunction.apply(q, k, v, None, None, spec)
