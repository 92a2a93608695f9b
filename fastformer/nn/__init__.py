"""Drop-in nn.Modules over the fused ops."""

from .attention import MultiheadAttention
from .loss import CrossEntropyLoss, LinearCrossEntropyLoss
from .t5_attention import T5CrossAttention, T5SelfAttention

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "MultiheadAttention", "T5SelfAttention", "T5CrossAttention"]
