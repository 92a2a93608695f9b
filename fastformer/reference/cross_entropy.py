"""Eager PyTorch cross-entropy: the executable spec of ff.cross_entropy / ff.linear_cross_entropy,
the CPU fallback (backend "reference") and the test oracle.

Semantics are those of torch.nn.functional.cross_entropy for input (N, C) and class-index targets (N,),
including how label smoothing combines with class weights and ignore_index:

    logp = log_softmax(x);  valid_i = target_i != ignore_index;  w = weight (ones when None)
    nll_i    = -w[t_i] * logp[i, t_i]                    (0 for ignored rows)
    smooth_i = -sum_c w[c] * logp[i, c]                  (0 for ignored rows)
    ce_i     = (1 - eps) * nll_i + eps / C * smooth_i
    "none": ce_i;  "sum": sum_i ce_i;  "mean": sum_i ce_i / sum_{valid i} w[t_i]

plus z_loss = z, which adds z * lse_i^2 for every valid row (lse_i = logsumexp(x_i)), unweighted:
"none" per row, "sum" summed, "mean" averaged over the valid rows.

Documented deviation from torch: with reduction "mean" and every target ignored (a zero
denominator) the result is 0.0 with zero gradients, where torch returns NaN.

Computation is in fp32 for fp16/bf16 input (float64 stays float64); the result has the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """input: (N, C) logits; target: (N,) class indices; weight: (C,) or None.
    Returns a scalar ("mean"/"sum") or (N,) ("none") in input's dtype."""
    compute = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = input.to(compute)
    C = x.shape[-1]
    t = target.long()
    valid = t != ignore_index
    t_safe = torch.where(valid, t, torch.zeros_like(t))
    validf = valid.to(compute)

    logp = torch.log_softmax(x, dim=-1)
    w = weight.to(compute) if weight is not None else None
    w_t = w[t_safe] if w is not None else torch.ones_like(validf)
    nll = -logp.gather(1, t_safe[:, None])[:, 0] * w_t * validf
    ce = (1.0 - label_smoothing) * nll
    if label_smoothing > 0.0:
        wlogp = logp * w if w is not None else logp
        smooth = -wlogp.sum(dim=-1) * validf
        ce = ce + (label_smoothing / C) * smooth
    zrow = None
    if z_loss != 0.0:
        zrow = z_loss * torch.logsumexp(x, dim=-1).pow(2) * validf

    if reduction == "none":
        out = ce if zrow is None else ce + zrow
    elif reduction == "sum":
        out = ce.sum() if zrow is None else ce.sum() + zrow.sum()
    elif reduction == "mean":
        denom_w = (w_t * validf).sum()
        # all rows ignored: numerator is 0, divide by 1 instead of 0 (0.0 and zero grads, not NaN)
        out = ce.sum() / torch.where(denom_w == 0, torch.ones_like(denom_w), denom_w)
        if zrow is not None:
            n = validf.sum()
            out = out + zrow.sum() / torch.where(n == 0, torch.ones_like(n), n)
    else:
        raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    return out.to(input.dtype)


def linear_cross_entropy(
    input: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """cross_entropy(F.linear(input, weight, bias), target, ...) with the full (N, V) logits.
    input: (*, H); weight: (V, H); bias: (V,) or None; target: (*). "none" returns shape (*)."""
    lead = input.shape[:-1]
    logits = F.linear(input.reshape(-1, input.shape[-1]), weight, bias)
    out = cross_entropy(logits, target.reshape(-1), None, ignore_index, reduction, label_smoothing, z_loss=z_loss)
    return out.reshape(lead) if reduction == "none" else out
