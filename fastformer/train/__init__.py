"""train layer: the objective-agnostic Trainer, objectives registry, pretrain / finetune pipelines."""

from .objectives import OBJECTIVES, Objective, get_objective
from .trainer import TrainConfig, Trainer

__all__ = ["OBJECTIVES", "Objective", "get_objective", "TrainConfig", "Trainer"]
