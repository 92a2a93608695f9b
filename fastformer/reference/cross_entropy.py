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
    w = weight.to(compute) if weight is not None else None
    t = target.long()
    valid = t != ignore_index
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    # torch's own kernel for the weighted / smoothed CE terms (per row or summed) ...
    ce = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction="none" if reduction == "none" else "sum",
                         label_smoothing=label_smoothing)
    if reduction == "mean":
        # ... divided by sum_{valid i} w[t_i] as torch does, except that an all-ignored batch divides
        # 0 by 1 instead of 0 (0.0 and zero gradients, not NaN)
        if w is not None:
            denom = (w[torch.where(valid, t, torch.zeros_like(t))] * valid).sum()
        else:
            denom = valid.sum().to(compute)
        ce = ce / torch.where(denom == 0, torch.ones_like(denom), denom)
    if z_loss != 0.0:
        zrow = z_loss * torch.logsumexp(x, dim=-1).pow(2) * valid
        if reduction == "none":
            ce = ce + zrow
        elif reduction == "sum":
            ce = ce + zrow.sum()
        else:
            ce = ce + zrow.sum() / valid.sum().clamp_min(1)
    return ce.to(input.dtype)


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
