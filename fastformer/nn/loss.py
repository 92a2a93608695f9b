"""Loss modules over ff.cross_entropy / ff.linear_cross_entropy (drop-in for torch.nn.CrossEntropyLoss)."""

from __future__ import annotations

import torch

from ..ops import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss over ff.cross_entropy, plus z_loss.

    A subclass of torch's module with its constructor, positional order included (weight,
    size_average, ignore_index, reduce, reduction, label_smoothing; the legacy size_average/reduce
    map to `reduction` as in torch, with torch's warning), its attributes and its `weight` buffer,
    so it replaces torch's anywhere. `z_loss` is keyword-only.
    forward(input: (C,), (N, C) or (N, C, d1, ..., dK); target: class indices (), (N,) or
    (N, d1, ..., dK), or class probabilities shaped like input) -> scalar, or the per-position
    losses with reduction="none" (see ff.cross_entropy).
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
    ):
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing, z_loss=self.z_loss
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}"
        )


class LinearCrossEntropyLoss(torch.nn.Module):
    """Fused output projection + cross-entropy: loss(x, W, target, b) == CrossEntropyLoss()(F.linear(x, W, b), target)
    without materialising the (N, V) logits; see ff.linear_cross_entropy.

    The module holds no parameters: the projection usually is (or is tied to) the model's own
    nn.Linear / embedding, so pass it in::

        loss_fn = ff.nn.LinearCrossEntropyLoss(ignore_index=-100)
        loss = loss_fn(hidden, lm_head.weight, labels, lm_head.bias)

    forward(input: (N, H) or (*, H), weight: (V, H), target: (N,) or (*), bias: (V,) or None)
    -> scalar, or per-row losses shaped like target with reduction="none".
    """

    def __init__(
        self,
        ignore_index: int = -100,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        z_loss: float = 0.0,
        chunk_size: int | None = None,
    ):
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.chunk_size = chunk_size

    def forward(
        self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return linear_cross_entropy(
            input,
            weight,
            target,
            bias,
            self.ignore_index,
            self.reduction,
            self.label_smoothing,
            z_loss=self.z_loss,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, z_loss={self.z_loss}"
        )
