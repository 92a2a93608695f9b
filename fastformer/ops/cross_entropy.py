"""INTERIM eager implementation so dependent layers can be built; replaced by the fused op (issue 2)."""
import torch
import torch.nn.functional as F


def cross_entropy(input, target, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, *, z_loss=0.0):
    logits = input.float()
    loss = F.cross_entropy(logits, target, weight, ignore_index=ignore_index, reduction="none",
                           label_smoothing=label_smoothing)
    valid = target != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.logsumexp(logits, -1).pow(2) * valid
    if reduction == "none":
        return loss.to(input.dtype)
    if reduction == "sum":
        return loss.sum().to(input.dtype)
    denom = (weight[target.clamp_min(0)] * valid).sum() if weight is not None else valid.sum()
    return (loss.sum() / denom.clamp_min(1)).to(input.dtype)


def linear_cross_entropy(input, weight, target, bias=None, ignore_index=-100, reduction="mean",
                         label_smoothing=0.0, *, z_loss=0.0):
    return cross_entropy(F.linear(input, weight, bias), target, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing, z_loss=z_loss)
