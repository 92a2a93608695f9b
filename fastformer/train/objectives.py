"""Pre-training objectives: the one seam between the objective-agnostic trainer and a model family.

The trainer (`fastformer.train.pretrain`) knows nothing about masking, spans, encoders or decoders.
Everything objective-specific sits behind the small `Objective` interface below; objectives are
registered by import string and resolved lazily, so adding one never edits the trainer or the CLI:

    OBJECTIVES = {"mlm": "fastformer.train.mlm_objective:MLMObjective",
                  "span": "fastformer.train.span_objective:SpanObjective"}

Data flow of one pre-training run (the trainer calls these in this order):

    texts = corpus documents (list[str])
    tok   = obj.build_tokenizer(texts, vocab_size)                      # tokenizers.Tokenizer
    train = obj.make_examples(train_texts, tok, seq_len, packing=...)   # list of 1-D int64 tensors
    model = obj.build_model(preset, tok, seq_len=seq_len)               # nn.Module
    coll  = obj.make_collator(tok, seq_len)                             # coll(examples, generator) -> batch
    batch = coll(list_of_examples, torch.Generator)                     # dict[str, Tensor] (CPU)
    loss_sum, n_predicted, metrics = obj.step(model, batch_on_device)   # summed loss, #predicted tokens

`loss_sum` is the SUM of per-token losses and `n_predicted` the number of predicted tokens of that
micro-batch: the trainer normalises by the predicted tokens of all micro-batches (and ranks) of one
optimizer step. Fine-tuning uses `encode_for_classification` and `build_classifier` (the encoder of a
pre-trained model with a classification head).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

OBJECTIVES: dict[str, str] = {
    "mlm": "fastformer.train.mlm_objective:MLMObjective",
    "span": "fastformer.train.span_objective:SpanObjective",
}

# Which objective a preset family pre-trains with (used to pick tokenizer/encoder for `finetune --model`).
FAMILY_OBJECTIVE: dict[str, str] = {"bert": "mlm", "t5": "span"}


class UnknownObjectiveError(ValueError):
    """Unknown objective name, or its module is missing from this installation."""


class Objective:
    """Interface of a pre-training objective. Subclasses override every method that raises.

    Attributes:
        name:          registry key ("mlm", "span").
        family:        preset family it trains ("bert", "t5"); presets of other families are refused.
        default_model: preset used when `--model` is absent.
        accuracy_name: what the trainer's "eval_accuracy" measures for this objective, in words
                       (the metric key stays "eval_accuracy" for every objective).
    """

    name: str = ""
    family: str = ""
    default_model: str = ""
    accuracy_name: str = "token accuracy"

    # -- data -------------------------------------------------------------------------------------
    def build_tokenizer(self, texts: Sequence[str], vocab_size: int):
        """Train a `tokenizers.Tokenizer` on `texts` (with this objective's special tokens)."""
        raise NotImplementedError

    def check_tokenizer(self, tokenizer, source: str) -> None:
        """Raise DataError (naming `source`) when `tokenizer` cannot serve this objective."""

    def check_seq_len(self, tokenizer, seq_len: int) -> None:
        """Raise ValueError naming --seq-len when examples of that length cannot be made with
        `tokenizer` (checked before the memory check and before any example is made)."""

    def make_examples(
        self, texts: Sequence[str], tokenizer, seq_len: int, *, packing: bool = True
    ) -> list[torch.Tensor]:
        """Tokenize `texts` into training examples: a list of 1-D int64 CPU tensors, each at most the
        length the model accepts for `seq_len`. packing=True: concatenated token stream cut into
        fixed-length examples; packing=False: one example per line (truncated), padded later."""
        raise NotImplementedError

    def make_collator(self, tokenizer, seq_len: int) -> Callable[[list[torch.Tensor], torch.Generator], dict]:
        """A callable (examples, generator) -> batch dict of CPU tensors. All randomness must come from
        `generator` (the trainer seeds it per step, which makes resume exact)."""
        raise NotImplementedError

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, preset: str, tokenizer, *, seq_len: int) -> nn.Module:
        """The pre-training model (e.g. encoder + MLM head) for preset `preset`."""
        raise NotImplementedError

    def model_config(self, model: nn.Module) -> dict:
        """JSON-serialisable config that `build_classifier` needs to rebuild the architecture."""
        raise NotImplementedError

    def step(
        self, model: nn.Module, batch: dict[str, torch.Tensor], *, train: bool = True
    ) -> tuple[torch.Tensor, int | torch.Tensor, dict[str, Any]]:
        """Forward one micro-batch (already on the device, inside autocast).

        Returns (loss_sum, n_predicted, metrics): the summed loss over predicted tokens (a 0-d tensor
        that requires grad when train=True), the number of predicted tokens, and a dict of extra
        counts; with train=False it should include "correct" (number of correctly predicted tokens),
        which the trainer turns into eval accuracy."""
        raise NotImplementedError

    def input_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        """Non-padding input tokens of a CPU batch (for tokens/s)."""
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else ids.numel()

    def flops_per_token(self, model: nn.Module, seq_len: int) -> float:
        """Training FLOPs per input token (forward + backward), for MFU. Default: 6 * parameters."""
        return 6.0 * sum(p.numel() for p in model.parameters())

    def memory_shape(self, seq_len: int) -> tuple[int, float]:
        """(decoder tokens per example, rows per example that go through the vocabulary projection),
        for the peak-memory estimate. Default: no decoder, every input token predicted."""
        return 0, float(seq_len)

    # -- fine-tuning ------------------------------------------------------------------------------
    def encode_for_classification(self, tokenizer, texts: Sequence[str], max_len: int) -> list[torch.Tensor]:
        """Token ids for sequence classification (e.g. [CLS] text [SEP]), each at most max_len long."""
        raise NotImplementedError

    def build_classifier(
        self, model_config: dict, num_labels: int, pretrained_state: dict[str, torch.Tensor] | None = None
    ) -> nn.Module:
        """Encoder of this family + classification head; the encoder weights come from
        `pretrained_state` (a pre-training model's state_dict) when given. The module's
        forward(input_ids, attention_mask) returns logits (B, num_labels)."""
        raise NotImplementedError


def get_objective(name: str) -> Objective:
    """Instantiate the objective registered under `name` (imported lazily)."""
    if name not in OBJECTIVES:
        raise UnknownObjectiveError(f"unknown objective {name!r} (choose from {', '.join(OBJECTIVES)})")
    module_name, _, cls_name = OBJECTIVES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise UnknownObjectiveError(
                f"objective {name!r} is not available in this installation (module {module_name} is missing)"
            ) from None
        raise
    return getattr(module, cls_name)()


def objective_for_preset(preset: str) -> Objective:
    """The objective that pre-trains `preset`'s family (bert-* -> mlm, t5-* -> span)."""
    from fastformer.models.presets import preset_family

    return get_objective(FAMILY_OBJECTIVE[preset_family(preset)])
