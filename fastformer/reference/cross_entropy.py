"""Eager PyTorch cross-entropy: the executable spec of ff.cross_entropy / ff.linear_cross_entropy,
the CPU fallback (backend "reference") and the test oracle.

Semantics are those of torch.nn.functional.cross_entropy, input (C,), (N, C) or (N, C, d1, ..., dK)
seen as rows (one per batch entry and position), with class-index or class-probability targets,
including how label smoothing combines with class weights and ignore_index:

    logp = log_softmax(x);  valid_i = target_i != ignore_index;  w = weight (ones when None)
    class indices:  nll_i    = -w[t_i] * logp[i, t_i]                    (0 for ignored rows)
                    smooth_i = -sum_c w[c] * logp[i, c]                  (0 for ignored rows)
                    ce_i     = (1 - eps) * nll_i + eps / C * smooth_i
                    "mean": sum_i ce_i / sum_{valid i} w[t_i]
    probabilities:  ce_i     = -sum_c w[c] * ((1 - eps) * y[i, c] + eps / C) * logp[i, c]
                    "mean": sum_i ce_i / #rows
    "none": ce_i (shaped like the class-index target);  "sum": sum_i ce_i

plus z_loss = z, which adds z * lse_i^2 for every valid row (lse_i = logsumexp(x_i)), unweighted:
"none" per row, "sum" summed, "mean" averaged over the valid rows.

Documented deviation from torch: with reduction "mean" and every target ignored (a zero
denominator, or no rows at all) the result is 0.0 with zero gradients, where torch returns NaN.

Computation is in fp32 for fp16/bf16 input (float64 stays float64); the result has the input dtype
(probabilities: the promoted dtype of input and target, as torch).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rows(t: torch.Tensor, C_dim: bool) -> torch.Tensor:
    """(C,) / (N, C) / (N, C, d...) -> (R, C) rows (C_dim) or () / (N,) / (N, d...) -> (R,)."""
    if C_dim:
        if t.dim() == 1:
            return t[None]
        rows = t.shape[0] * math.prod(t.shape[2:])  # not -1: ambiguous when there are no classes
        return t.movedim(1, -1).reshape(rows, t.shape[1])
    return t.reshape(-1)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """input: (C,), (N, C) or (N, C, d1, ..., dK) logits; target: class indices (), (N,) or
    (N, d1, ..., dK), or probabilities shaped like input; weight: (C,) or None.
    Returns a scalar ("mean"/"sum") or per-position losses ("none", shaped like the index target), in
    out_dtype (default: input's, promoted with a probability target's; float32 under autocast, as torch)."""
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be one of ['mean', 'sum', 'none'], got {reduction!r}")
    soft = target.is_floating_point()
    if out_dtype is None:
        out_dtype = torch.promote_types(input.dtype, target.dtype) if soft else input.dtype
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    out_shape = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    x = _rows(input, True).to(compute)
    w = weight.to(compute) if weight is not None else None
    if soft:
        y = _rows(target, True).to(compute)
        # torch's own kernel for the weighted / smoothed CE terms per row
        ce = F.cross_entropy(x, y, w, reduction="none", label_smoothing=label_smoothing)
        valid = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        denom = torch.tensor(float(x.shape[0]), dtype=compute, device=x.device)
    else:
        t = _rows(target, False).long()
        valid = t != ignore_index
        ce = F.cross_entropy(x, t, w, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing)
        if w is not None:
            denom = (w[torch.where(valid, t, torch.zeros_like(t))] * valid).sum()
        else:
            denom = valid.sum().to(compute)
    zrow = z_loss * torch.logsumexp(x, dim=-1).pow(2) * valid if z_loss != 0.0 else None
    if reduction == "none":
        out = ce if zrow is None else ce + zrow
        return out.reshape(out_shape).to(out_dtype)
    out = ce.sum()
    if reduction == "mean":
        # divided by sum_{valid i} w[t_i] (probabilities: the row count) as torch does, except that a
        # zero denominator gives 0.0 and zero gradients, not NaN (with label smoothing the sum itself
        # need not be 0 then: the smoothing term of a zero-weight target is not)
        zero = denom == 0
        out = torch.where(zero, torch.zeros_like(out), out / torch.where(zero, torch.ones_like(denom), denom))
    if zrow is not None:
        out = out + (zrow.sum() / valid.sum().clamp_min(1) if reduction == "mean" else zrow.sum())
    return out.to(out_dtype)


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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """cross_entropy(F.linear(input, weight, bias), target, ...) with the full (N, V) logits.
    input: (*, H); weight: (V, H); bias: (V,) or None; target: (*) class indices or (*, V)
    probabilities. "none" returns shape (*). out_dtype: as cross_entropy's."""
    lead = input.shape[:-1]
    logits = F.linear(input.reshape(lead.numel(), input.shape[-1]), weight, bias)
    t = target.reshape(lead.numel(), target.shape[-1]) if target.is_floating_point() else target.reshape(-1)
    out = cross_entropy(logits, t, None, ignore_index, reduction, label_smoothing, z_loss=z_loss, out_dtype=out_dtype)
    return out.reshape(lead) if reduction == "none" else out
