"""INTERIM modules; replaced by issue 2."""
import torch

from ..ops import cross_entropy, linear_cross_entropy


class CrossEntropyLoss(torch.nn.Module):
    def __init__(self, weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
        super().__init__()
        self.weight, self.ignore_index, self.reduction = weight, ignore_index, reduction
        self.label_smoothing, self.z_loss = label_smoothing, z_loss

    def forward(self, input, target):
        return cross_entropy(input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
                             z_loss=self.z_loss)


class LinearCrossEntropyLoss(torch.nn.Module):
    def __init__(self, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0):
        super().__init__()
        self.ignore_index, self.reduction, self.label_smoothing, self.z_loss = ignore_index, reduction, label_smoothing, z_loss

    def forward(self, input, weight, target, bias=None):
        return linear_cross_entropy(input, weight, target, bias, self.ignore_index, self.reduction,
                                    self.label_smoothing, z_loss=self.z_loss)
