"""What the attention ops share: the prologue (input checks, dropout range, dispatch), the mask
analysis, the dropout seed and the autograd Function over the fused kernels.

    ff.scaled_dot_product_attention, ff.varlen_attention   fastformer/ops/attention.py
    ff.t5_attention                                        fastformer/ops/t5_attention.py

Each op is decorated with `amp.autocast_op` (autocast's casts), validates with the checks here,
asks `attention_path` which implementation runs ("kernel", "torch" or "reference") and, on the
kernel path, calls `fused_attention` with 4-D tensors.

Host syncs: checks that must read a tensor's values (is a bool mask a key-padding prefix? are
cu_seqlens valid, what is their longest sequence?) are remembered per tensor while it lives
unmodified (same object, storage and version counter), so the layers of a model that share one mask
or one cu_seqlens pay the device-to-host sync once per forward, not once per layer; the CUDA dropout
seed comes from the generator's host-side state (no sync). A write torch does not count (`.data`,
numpy/DLPack views, custom kernels) is not seen: call `forget_host_checks()` after one.

The Triton kernels are imported lazily, by `attention_kernels()` alone: the reference and CPU paths never
import triton.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import warnings
import weakref
from collections.abc import Callable

import torch

from ..backend import below_kernel_gpu, cpu_fast_path, use_triton
from ..reference.attention import default_scale
from ._compile import opaque_to_compile
from ._validate import FLOAT_DTYPES, as_real, check_range, is_finite
from .errors import InputError, InputTypeError, refuse_double_backward

KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

__all__ = [
    "KERNEL_DTYPES",
    "MAX_HEAD_DIM",
    "attention_kernels",
    "attention_path",
    "capture_dropout_masks",
    "check_attn_mask",
    "check_dropout",
    "check_scale",
    "forget_host_checks",
    "fused_attention",
    "kernel_covers",
    "key_lengths",
    "prepare_mask",
    "remembered",
    "torch_sdpa_usable",
]


def attention_kernels():
    """The attention kernels' host-side API (AttnSpec, T5RelPos, attention_forward / _backward,
    dropout_keep_mask), imported on first use of a kernel path only."""
    from ..kernels import attention_launch as K

    return K


# ----------------------------------------------------------------------------------------------
# prologue: checks and dispatch
# ----------------------------------------------------------------------------------------------


def check_dropout(dropout_p) -> float:
    """dropout_p: a number in [0, 1] (1.0 gives zeros, as torch) -> float."""
    p = as_real(dropout_p)
    if p is None:
        raise InputTypeError(f"dropout_p must be a float, got {dropout_p!r}")
    check_range("dropout_p", p, 0.0, 1.0, hi_inclusive=True)
    return p


def check_flag(name: str, value) -> None:
    """A bool (is_causal, causal, bidirectional): as torch's SDPA, which refuses a string or a tensor."""
    if not isinstance(value, bool):
        raise InputTypeError(f"{name} must be a bool, got {value!r}")


def check_scale(scale) -> float | None:
    """scale: None (1/sqrt(D)) or a finite number -> None or float."""
    if scale is None:
        return None
    value = as_real(scale)
    if value is None:
        raise InputTypeError(f"scale must be a float or None, got {scale!r}")
    if not is_finite(value):
        raise InputError(f"scale must be a finite number, got {scale}")
    return value


def check_attn_mask(attn_mask, query: torch.Tensor, scores_shape: tuple) -> None:
    """attn_mask: None, bool (True = may attend) or float (added) of the query's dtype or float32 (the
    dtypes torch's SDPA accepts), on the query's device, broadcastable to scores_shape without more
    dimensions than it."""
    if attn_mask is None:
        return
    if not isinstance(attn_mask, torch.Tensor):
        raise InputTypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.device != query.device:
        raise InputError(f"attn_mask is on {attn_mask.device} but must be on {query.device} like query")
    if attn_mask.dtype != torch.bool and attn_mask.dtype not in (query.dtype, torch.float32):
        kind = (
            "a float dtype other than float32 and the query's"
            if attn_mask.dtype in FLOAT_DTYPES
            else "not bool or float"
        )
        raise InputError(
            f"attn_mask has dtype {attn_mask.dtype} ({kind}); expected bool, float32 or the query's dtype {query.dtype}"
        )
    shape = tuple(scores_shape)
    ok = attn_mask.dim() <= len(shape)
    if ok:
        try:
            ok = torch.broadcast_shapes(attn_mask.shape, shape) == shape
        except RuntimeError:
            ok = False
    if not ok:
        raise InputError(
            f"attn_mask of shape {tuple(attn_mask.shape)} is not broadcastable to the attention scores {shape}"
        )


def _bf16_on_cpu(t: torch.Tensor) -> bool:
    """bf16 CPU tensors: the kernels would run in Triton's interpreter, whose bf16 tl.dot returns
    garbage (numpy holds bf16 as raw bits), so they are not covered."""
    return t.dtype == torch.bfloat16 and t.device.type == "cpu"


def kernel_covers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernels compute this call: fp16/bf16/fp32 (not bf16 CPU tensors, see
    _bf16_on_cpu), head dim <= 256 and equal for q/k/v, and nothing empty. The rest runs on the fallback."""
    return (
        q.dtype in KERNEL_DTYPES
        and not _bf16_on_cpu(q)
        and q.shape[-1] <= MAX_HEAD_DIM
        and v.shape[-1] == q.shape[-1]
        and q.shape[-2] > 0
        and k.shape[-2] > 0
        and q.numel() > 0
    )


def _torch_version() -> tuple:
    parts = []
    for piece in torch.__version__.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


# torch >= 2.5: SDPA takes enable_gqa and gives a query row with no visible key zeros, not NaN (its
# "safe softmax"), as fastformer's semantics say; tests/ops/test_cpu_dispatch.py checks the behaviour.
# A constant, so torch.compile traces the dispatch without a graph break.
_SDPA_USABLE = _torch_version() >= (2, 5)


def torch_sdpa_usable() -> bool:
    """Whether torch's own SDPA can serve the CPU fast path (torch >= 2.5)."""
    return _SDPA_USABLE


def attention_path(*tensors, covered: bool, dropout_p: float) -> str:
    """Which implementation runs an attention call: "kernel" (the fused Triton kernels: CUDA tensors,
    or any tensor with the backend forced to "triton", when the kernels cover the call), "torch"
    (torch's own SDPA: CPU tensors, or CUDA tensors on a GPU below the kernels' compute capability 8.0,
    under backend "auto"), else "reference" (the eager spec)."""
    if dropout_p < 1.0 and use_triton(*tensors):
        if covered:
            return "kernel"
        if _bf16_on_cpu(tensors[0]):
            _warn_bf16_interpreter()
    if (cpu_fast_path(*tensors) or below_kernel_gpu(*tensors)) and torch_sdpa_usable():
        return "torch"
    return "reference"


@functools.cache
def _warn_bf16_interpreter() -> None:
    warnings.warn(
        "backend 'triton' on bfloat16 CPU tensors: attention runs the eager reference, since Triton's "
        "interpreter computes bf16 dot products wrongly; float16 / float32 run the kernels on the CPU",
        UserWarning,
        stacklevel=5,
    )


# ----------------------------------------------------------------------------------------------
# host-side checks remembered per tensor
# ----------------------------------------------------------------------------------------------

_MEMO: collections.OrderedDict[int, tuple] = collections.OrderedDict()
_MEMO_SIZE = 32
_MEMO_LOCK = threading.Lock()


def remembered(t: torch.Tensor, key, compute: Callable):
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


def key_lengths(rows: torch.Tensor):
    """rows: bool (R, Lk), one key-padding row per batch entry. If every row is a prefix (True then
    False): (the lengths (R,) int32, whether any is shorter than Lk); else (None, False). Syncs."""
    lengths = rows.sum(-1)
    prefix = torch.arange(rows.shape[-1], device=rows.device)[None, :] < lengths[:, None]
    if bool((prefix == rows).all()):
        return lengths.to(torch.int32), bool((lengths < rows.shape[-1]).any())
    return None, False


def prepare_mask(attn_mask: torch.Tensor | None, batch: tuple, H: int, Lq: int, Lk: int):
    """A validated SDPA mask -> (mask, klen) for the kernels, over the (broadcast) batch dims `batch`.

    A bool key-padding mask (only the batch dims and Lk vary; each row True then False) becomes
    klen: int32 of shape `batch` (None when no key is padded) and mask None: the fast path that never
    visits the padded key blocks. Any other mask comes back as an expanded view
    (*batch, H, Lq, Lk) (stride 0 on broadcast dims: nothing is materialised)."""
    if attn_mask is None:
        return None, None
    full = tuple(batch) + (H, Lq, Lk)
    m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
    if attn_mask.dtype == torch.bool and m.shape[-3] == 1 and m.shape[-2] == 1 and m.shape[-1] == Lk:
        lengths, short = remembered(attn_mask, "key_lengths", lambda: key_lengths(attn_mask.reshape(-1, Lk)))
        if lengths is not None:
            if not short:
                return None, None
            return None, lengths.reshape(m.shape[:-3]).expand(tuple(batch))
    return m.expand(full), None


# ----------------------------------------------------------------------------------------------
# dropout
# ----------------------------------------------------------------------------------------------

_captured: list | None = None


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
            gen = torch.cuda.default_generators[
                device.index if device.index is not None else torch.cuda.current_device()
            ]
            offset = gen.get_offset()
            gen.set_offset(offset + 4)
            return _splitmix(_splitmix(gen.initial_seed()) ^ offset) & 0x7FFFFFFF
        except (AttributeError, RuntimeError, IndexError):  # an older torch: draw on the device
            pass
    return int(torch.randint(0, 2**31 - 1, (1,), device=device).item())


def seed_dropout(spec, B: int, H: int, Lq: int, Lk: int, device: torch.device) -> None:
    """With dropout, give spec its seed and, inside capture_dropout_masks(), record the (B, H, Lq, Lk)
    keep-mask the kernels will draw from it."""
    if spec.dropout_p > 0:
        spec.seed = _draw_seed(device)
        if _captured is not None:
            _captured.append(attention_kernels().dropout_keep_mask(B, H, Lq, Lk, spec.seed, spec.dropout_p, device))


# ----------------------------------------------------------------------------------------------
# autograd over the kernels
# ----------------------------------------------------------------------------------------------


class FusedAttentionFunction(torch.autograd.Function):
    """q, k, v (+ optional float mask, optional T5 table) -> out; the rest of the call in `spec`."""

    @staticmethod
    def forward(ctx, q, k, v, mask, table, spec):
        spec.mask = mask if mask is not None else spec.mask
        spec.t5_table = table
        out, lse = attention_kernels().attention_forward(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse, mask, table)
        ctx.spec = spec
        return out

    @staticmethod
    def backward(ctx, dout):
        refuse_double_backward("ff attention (scaled_dot_product_attention, varlen_attention, t5_attention)")
        q, k, v, out, lse, mask, table = ctx.saved_tensors
        spec = ctx.spec
        spec.mask = mask if mask is not None else spec.mask
        spec.t5_table = table
        spec.mask_grad = mask is not None and ctx.needs_input_grad[3]
        spec.t5_grad = table is not None and ctx.needs_input_grad[4]
        need = ctx.needs_input_grad
        dq, dk, dv, dm, dt = attention_kernels().attention_backward(
            dout, q, k, v, out, lse, spec, need_dq=need[0], need_dkdv=need[1] or need[2]
        )
        dmask = dtable = None
        if dm is not None:
            dmask = dm.to(mask.dtype)  # (B, H, Lq, Lk): the expand's backward reduces it
        if dt is not None:
            # fixed-order reduction of the per-(batch, key block) partials: deterministic
            dtable = dt.sum(dim=(0, 2))[:, : table.shape[0]].t().contiguous().to(table.dtype)
        return dq, dk, dv, dmask, dtable, None


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    # the kernels index the head dim with unit stride (irrelevant for a head dim of 1)
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# CUDA limits a launch grid's y and z dimensions to 65535 blocks; the kernels put batch x heads there
MAX_GRID_HEADS = 65535
# the kernels add int64 batch / head / sequence-start offsets to int32 offsets within a head's rows
# (row x row stride + column), a mask's rows, and (the backward's Delta pass) heads of the output
_I32 = 2**31


def _row_span(t: torch.Tensor, rows: int) -> int:
    """The largest element offset within `rows` rows of t (row dim -2, head dim -1)."""
    return (max(rows, 1) - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1))


def _int32_rows(name: str, t: torch.Tensor, rows: int, row_dim: int) -> torch.Tensor:
    """t itself, or a copy with contiguous rows, whose offsets within `rows` rows fit the kernels' int32
    arithmetic; InputError when not even that does (instead of wrapped addresses). row_dim: the dim
    that holds the rows (-2 dense (..., L, D); 0 packed (T, H, D))."""
    view = t if row_dim == -2 else t.transpose(0, -2)  # rows at -2
    if _row_span(view, rows) < _I32:
        return t
    t = t.contiguous()  # rows of exactly one head dim (dense) or H x D (packed)
    view = t if row_dim == -2 else t.transpose(0, -2)
    if _row_span(view, rows) >= _I32:
        raise InputError(
            f"{name} {tuple(t.shape)}: rows of {rows:,} x {view.stride(-2):,} elements are beyond the attention "
            "kernels' 32-bit offsets (2^31); split the sequence, or run on the reference backend"
        )
    return t


def _batch_chunks(n: int, per_entry: int):
    """Slices of range(n) whose entries times `per_entry` heads fit one launch grid (MAX_GRID_HEADS)."""
    step = MAX_GRID_HEADS // per_entry
    if step < 1:
        raise InputError(f"{per_entry} heads is beyond the attention kernels' launch grid ({MAX_GRID_HEADS})")
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


@opaque_to_compile
def fused_attention(
    q,
    k,
    v,
    *,
    mask=None,
    klen=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    t5_table=None,
    t5_rel=None,
    query_offset=0,
):
    """The kernel path for validated 4-D inputs, any strides on the first three dims (stride 0 for
    broadcast ones). q: (B, H, Lq, D), k/v: (B, H_kv, Lk, D) with H a multiple of H_kv -> (B, H, Lq, D).
    mask: None, or a bool / float (B, H, Lq, Lk) view (see prepare_mask); klen: None or (B,) int key
    lengths (the key-padding fast path). t5_table: (NB, H) with its bucket function t5_rel.
    query_offset: position of query row 0 (causal: j <= i + query_offset; T5 buckets of j − i − offset)."""
    K = attention_kernels()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if B * H > MAX_GRID_HEADS:
        # more batch x heads than one grid holds: batch slices, each its own autograd node (a
        # float mask's and a T5 table's gradients sum over the slices)
        kw = dict(dropout_p=dropout_p, is_causal=is_causal, scale=scale, t5_table=t5_table, t5_rel=t5_rel)
        return torch.cat(
            [
                fused_attention(
                    q[sl],
                    k[sl],
                    v[sl],
                    mask=None if mask is None else mask[sl],
                    klen=None if klen is None else klen[sl],
                    query_offset=query_offset,
                    **kw,
                )
                for sl in _batch_chunks(B, H)
            ]
        )
    q, k, v = (_int32_rows(n, _unit_last(t), t.shape[2], -2) for n, t in (("query", q), ("key", k), ("value", v)))
    grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, mask, t5_table))
    # every offset of the backward across heads is int64, but no test machine holds a batch entry of
    # 2^31 elements (q, k, v, the output, dO and the fp32 dQ buffer: over 30 GB): refused, not trusted
    if grads and H * Lq * D >= _I32:
        raise InputError(
            f"query {tuple(q.shape)}: {H * Lq * D:,} elements per batch entry are beyond the sizes the attention "
            "backward is tested at (2^31); split the heads or the sequence, or run on the reference backend"
        )
    if mask is not None and (
        (Lq - 1) * abs(mask.stride(2)) + (Lk - 1) * abs(mask.stride(3)) >= _I32
        or (mask.requires_grad and Lq * Lk >= _I32)
    ):
        raise InputError(
            f"attn_mask of {Lq} x {Lk} per batch entry and head is beyond the attention kernels' 32-bit offsets "
            "(2^31); use a (B, 1, 1, Lk) key-padding mask, is_causal, or varlen_attention"
        )
    spec = K.AttnSpec(
        scale=default_scale(D) if scale is None else float(scale),
        causal=bool(is_causal),
        dropout_p=float(dropout_p),
        t5_rel=t5_rel,
        query_offset=int(query_offset),
    )
    if klen is not None:
        spec.klen = klen.to(torch.int32).contiguous()
    float_mask = None
    if mask is not None:
        if mask.dtype == torch.bool:
            spec.mask = mask.view(torch.uint8)
        else:
            # the expanded view goes into the Function: autograd's expand/reshape backward then sums
            # the full dS over the broadcast dims back onto the user's mask
            float_mask = mask
    seed_dropout(spec, B, H, Lq, Lk, q.device)
    if float_mask is not None and float_mask.requires_grad:
        return FusedAttentionFunction.apply(q, k, v, float_mask, t5_table, spec)
    if float_mask is not None:
        spec.mask = float_mask.detach()
    return FusedAttentionFunction.apply(q, k, v, None, t5_table, spec)


@opaque_to_compile
def fused_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, causal, scale):
    """The kernel path of varlen_attention for validated inputs. q: (Tq, H, D), k/v: (Tk, H_kv, D)."""
    K = attention_kernels()
    B = cu_seqlens_q.numel() - 1
    if B * q.shape[1] > MAX_GRID_HEADS:
        # more sequences x heads than one grid holds: runs of whole sequences (reads cu_seqlens on the host)
        cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
        outs = []
        for sl in _batch_chunks(B, q.shape[1]):
            a, b = sl.start, sl.stop
            sub_q = torch.tensor(cq[a : b + 1], device=cu_seqlens_q.device, dtype=cu_seqlens_q.dtype) - cq[a]
            sub_k = torch.tensor(ck[a : b + 1], device=cu_seqlens_k.device, dtype=cu_seqlens_k.dtype) - ck[a]
            outs.append(
                fused_varlen_attention(
                    q[cq[a] : cq[b]],
                    k[ck[a] : ck[b]],
                    v[ck[a] : ck[b]],
                    sub_q,
                    sub_k,
                    max_seqlen_q,
                    max_seqlen_k,
                    dropout_p,
                    causal,
                    scale,
                )
            )
        return torch.cat(outs)
    rows_q, rows_k = max(int(max_seqlen_q), 1), max(int(max_seqlen_k), 1)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)) and q.shape[0] * q.shape[1] >= _I32:
        # as the dense check above: untested at this size, so refused
        raise InputError(
            f"q {tuple(q.shape)}: {q.shape[0]:,} tokens x {q.shape[1]} heads are beyond the sizes the attention "
            "backward is tested at (2^31); split the batch"
        )
    q = _int32_rows("q", _unit_last(q), rows_q, 0)
    k, v = (_int32_rows(n, _unit_last(t), rows_k, 0) for n, t in (("k", k), ("v", v)))
    spec = K.AttnSpec(
        scale=default_scale(q.shape[-1]) if scale is None else float(scale),
        causal=bool(causal),
        dropout_p=float(dropout_p),
        cu_q=cu_seqlens_q.to(torch.int32).contiguous(),
        cu_k=cu_seqlens_k.to(torch.int32).contiguous(),
        max_q=max(int(max_seqlen_q), 1),
        max_k=max(int(max_seqlen_k), 1),
    )
    seed_dropout(spec, B, q.shape[1], spec.max_q, spec.max_k, q.device)
    return FusedAttentionFunction.apply(q, k, v, None, None, spec)
