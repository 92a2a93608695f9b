"""Training-time pieces of the models on CPU: cheap dropout (`Dropout`, used by the BERT and T5 models),
and the BERT encoder's self-attention with dropout computed straight on the fused q|k|v projection.

Dropout: with the compiled extension (`fastformer._C`, csrc/dropout_cpu.cpp) one pass draws the keep
mask from a counter-based hash of a seed taken from torch's default generator, applies it, and stores
it as bool for backward; without it, `keep_mask` takes 16-bit lanes of bulk 64-bit random integers
from torch's generator. Either way `torch.manual_seed` reproduces the masks (not the same masks
between the two ways).

Why the attention has its own CPU training path: with dropout, torch's CPU SDPA takes its math path,
which (for a (B, L, 3, h, d) projection viewed as (B, h, L, d)) copies q, k and v into contiguous
heads, scales q and k in two more passes, draws one float per attention probability (`bernoulli_`),
divides the mask by 1 - p, and in backward stacks the three gradients and copies them back. Here:

- the GEMMs run per head on strided views of the projection itself (`torch.bmm` takes a row stride of
  3H), and write the output (B, L, h, d) and the gradient (B, L, 3, h, d) in place: no layout copies;
- the softmax scale rides in the scores' GEMM (`alpha`) and, in backward, in dP (dS is linear in it),
  so that dq and dk are plain batched `bmm` calls into the strided gradient;
- the keep mask is drawn and applied in one pass (above), and applied again in one pass in backward.

The function is the same: softmax(q kᵀ · scale + key bias) · keep / (1 - p), times v. What it saves
in a bert-mini training step is in docs/training.md.
"""

from __future__ import annotations

import torch
from torch import nn

_FUSED: dict = {"ok": None}  # whether the extension's dropout is loaded; None = not looked up yet


def has_fused_dropout() -> bool:
    """Whether the compiled extension's one-pass CPU dropout (csrc/dropout_cpu.cpp) is loaded."""
    if _FUSED["ok"] is None:
        from .._extension import has_op

        _FUSED["ok"] = has_op("dropout_cpu")
    return bool(_FUSED["ok"])


def _seed(device) -> torch.Tensor:
    """One int64 from torch's default generator: the fused dropout's mask seed."""
    return torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64, device=device)


def fused_dropout_usable(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and has_fused_dropout()


class _FusedDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        out, mask = torch.ops.fastformer.dropout_cpu(x.contiguous(), p, _seed(x.device))
        ctx.save_for_backward(mask)
        ctx.scale = keep_scale(p)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return torch.ops.fastformer.dropout_cpu_backward(grad.contiguous(), mask, ctx.scale), None


@torch.compiler.disable  # under torch.compile: the same masks as in eager mode, outside the graph
def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-mode dropout on a CPU tensor, 0 < p < 1: x * keep / (1 - p) with keep drawn per element
    with probability 1 - p (p rounded to a multiple of 1/65536). One pass with the extension
    (fp32/fp64); otherwise keep_mask's 16-bit lanes. Both reproducible with torch.manual_seed."""
    if fused_dropout_usable(x):
        return _FusedDropout.apply(x, float(p))
    return x * _keep_factors(x.shape, p, x.device, x.dtype)


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """Bool keep mask of `shape`: each element kept with probability 1 - p (to 2e-5: p is rounded to a
    multiple of 1/65536), from 16-bit lanes of torch.randint's 64-bit integers (default generator)."""
    n = 1
    for s in shape:
        n *= int(s)
    drop = round(p * 65536)  # keep a lane iff its 16-bit value >= -32768 + drop
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return bits.view(torch.int16)[:n].view(shape) >= (drop - 32768)


def keep_scale(p: float) -> float:
    """The factor kept elements are multiplied by: 1 / the exact keep probability of keep_mask."""
    drop = round(p * 65536)
    return 65536.0 / (65536 - drop)


def _keep_factors(shape, p: float, device, dtype) -> torch.Tensor:
    """keep_mask as the factors dropout multiplies by: 0, or keep_scale(p), in `dtype`."""
    return keep_mask(shape, p, device).to(dtype).mul_(keep_scale(p))


class Dropout(nn.Dropout):
    """nn.Dropout with cheaper CPU training masks, reproducible with torch.manual_seed (`dropout`
    above): with the compiled extension, one pass that draws the mask from a counter-based hash of a
    seed taken from torch's default generator, applies it and keeps it for backward (fp32/fp64);
    otherwise 16-bit lanes of bulk 64-bit random integers from torch's generator (a quarter of the
    generator calls of torch's float-per-element draw). Same keep probability to 2e-5, same
    expectation. Under torch.compile it runs outside the graph, so a compiled run draws the same masks
    as an eager one. On CUDA and in eval it is nn.Dropout. The BERT and T5 models use it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if self.p >= 1.0:
            return x * 0.0
        return dropout(x, self.p)


class _SelfAttentionDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads: int, p: float, key_bias):
        B, L, H3 = qkv.shape
        h = num_heads
        d = H3 // (3 * h)
        x = qkv.view(B, L, 3, h, d)
        scale = d**-0.5
        S = qkv.new_empty(h, B, L, L)  # scores, head-major so each head's (B, L, L) block is contiguous
        for j in range(h):
            torch.baddbmm(S[j], x[:, :, 0, j], x[:, :, 1, j].transpose(1, 2), beta=0, alpha=scale, out=S[j])
        if key_bias is not None:
            S.add_(key_bias)  # (B, 1, L): -inf on padded keys
        P = torch.softmax(S, -1)
        del S
        keep = None  # the mask: bool (fused extension) or float holding 0 or 1 / (1 - p)
        if p == 0.0:
            Pd = P
        elif fused_dropout_usable(P):
            Pd, keep = torch.ops.fastformer.dropout_cpu(P, p, _seed(P.device))
        else:
            keep = _keep_factors(P.shape, p, qkv.device, P.dtype)
            Pd = P * keep
        out = qkv.new_empty(B, L, h, d)
        for j in range(h):
            torch.bmm(Pd[j], x[:, :, 2, j], out=out[:, :, j])
        ctx.save_for_backward(qkv, P, Pd, keep)
        ctx.num_heads, ctx.scale, ctx.p = h, scale, p
        return out.view(B, L, h * d)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        qkv, P, Pd, keep = ctx.saved_tensors
        h, scale = ctx.num_heads, ctx.scale
        B, L, H3 = qkv.shape
        d = H3 // (3 * h)
        x = qkv.view(B, L, 3, h, d)
        g = grad_out.view(B, L, h, d)
        dx = qkv.new_empty(B, L, 3, h, d)
        dP = torch.empty_like(P)
        for j in range(h):
            torch.bmm(Pd[j].transpose(1, 2), g[:, :, j], out=dx[:, :, 2, j])  # dv
            torch.bmm(g[:, :, j], x[:, :, 2, j].transpose(1, 2), out=dP[j])
        # the softmax scale rides on dP (dS is linear in it), so that dq and dk are plain bmm calls:
        # torch.bmm writes a strided output in one batched call, baddbmm loops over the batch
        if keep is not None and keep.dtype == torch.bool:
            dP = torch.ops.fastformer.dropout_cpu_backward(dP, keep, keep_scale(ctx.p) * scale)
        elif keep is not None:
            dP.mul_(keep).mul_(scale)
        else:
            dP.mul_(scale)
        dS = torch._softmax_backward_data(dP, P, -1, P.dtype)
        del dP
        for j in range(h):
            torch.bmm(dS[j], x[:, :, 1, j], out=dx[:, :, 0, j])  # dq
            torch.bmm(dS[j].transpose(1, 2), x[:, :, 0, j], out=dx[:, :, 1, j])  # dk
        return dx.view(B, L, H3), None, None, None


def usable(qkv: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether self_attention_dropout takes this call: a CPU fp32/fp64 projection and, with a key
    padding mask, at least one key per sequence (a row with no key is 0 in ff's attention, NaN here)."""
    if qkv.device.type != "cpu" or qkv.dtype not in (torch.float32, torch.float64):
        return False
    return mask is None or bool(mask.reshape(mask.shape[0], -1).any(1).all())


@torch.compiler.disable  # under torch.compile: as in eager mode, outside the graph
def self_attention_dropout(
    qkv: torch.Tensor, num_heads: int, dropout_p: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Multi-head self-attention with dropout on the attention probabilities.

    qkv: (B, L, 3·H) the fused projection, laid out (B, L, 3, num_heads, H / num_heads) (q | k | v).
    mask: None, or a bool key-padding mask (B, 1, 1, L), True = real token, every sequence with at
    least one (see usable()). Returns (B, L, H), heads concatenated as (num_heads, d)."""
    key_bias = None
    if mask is not None:
        key_bias = key_padding_bias(mask, qkv.dtype).reshape(mask.shape[0], 1, mask.shape[-1])
    return _SelfAttentionDropout.apply(qkv, num_heads, float(dropout_p), key_bias)


# ---------------------------------------------------------------------------------------------------
# T5 attention in CPU training
# ---------------------------------------------------------------------------------------------------
# ff.t5_attention rebuilds the (B, H, L, L) float mask (position bias, padding, causality) in every
# layer, and with dropout torch's CPU SDPA takes its math path: it scales q and k in two extra passes
# and draws a float per attention probability (bernoulli_). T5's layers share one position-bias table,
# so the stack builds that additive bias once per forward (`t5_stack_bias`), every layer adds it to
# its scores, and the probabilities' dropout (if any) is the one-pass `dropout` above. Autograd sums
# the layers' bias gradients into the one tensor, which flows back to the table through one gather.
# Without dropout, when the table gets a gradient, ff.t5_attention runs its eager reference per layer
# (torch's fused CPU kernel has no gradient for a float mask); this path is 1.1x faster at 128 tokens
# and 1.4-1.5x at 512 (forward + backward). Without that gradient the op's torch kernel is the faster
# one, and the models use it. For backward this keeps the probabilities (fp32 at p = 0: 4 bytes per
# score; with dropout also the dropped ones and a bool mask: 9), within the 13 bytes per score that
# train/resources.py budgets for eager CPU attention.


def t5_stack_bias(
    table: torch.Tensor,
    length: int,
    *,
    bidirectional: bool,
    num_buckets: int,
    max_distance: int,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor | None:
    """The additive self-attention bias of a T5 stack: table[bucket(j − i)] (1, H, L, L), -inf where
    `key_mask` (bool (B, 1, 1, L), True = real token) or causality forbids a key; (B, H, L, L) with a
    mask. None when some query row would keep no key (the caller then takes ff.t5_attention, whose rows
    without keys are 0)."""
    from ..reference.t5_attention import t5_bias

    bias = t5_bias(
        table, length, length, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    allowed = None
    if causal:
        allowed = torch.ones(length, length, dtype=torch.bool, device=table.device).tril()
    if key_mask is not None:
        allowed = key_mask if allowed is None else allowed & key_mask
    if allowed is None:
        return bias
    if not bool(allowed.any(-1).all()):
        return None
    return bias.masked_fill(~allowed, float("-inf"))


def key_padding_bias(key_mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """bool (B, 1, 1, Lk) key mask (True = real token) -> additive (B, 1, 1, Lk): 0 or -inf."""
    if key_mask is None:
        return None
    return torch.zeros(key_mask.shape, dtype=dtype, device=key_mask.device).masked_fill_(~key_mask, float("-inf"))


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, dropout_p: float
) -> torch.Tensor:
    """softmax(q kᵀ + bias) (no scaling, T5's convention), dropout on the probabilities, times v.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); bias: None or additive, broadcastable to (B, H, Lq, Lk),
    -inf = masked, every row keeping a key. Returns (B, H, Lq, D)."""
    s = torch.matmul(q, k.transpose(-1, -2))
    if bias is not None:
        s = s.add_(bias)  # in place: the product's backward needs q and k, not s
    a = torch.softmax(s, dim=-1)
    if dropout_p > 0.0:
        a = dropout(a, dropout_p)
    return torch.matmul(a, v)
