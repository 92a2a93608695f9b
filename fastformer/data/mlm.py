"""Masked-language-modelling collator (semantics of Hugging Face's DataCollatorForLanguageModeling).

Of the non-special, non-padding tokens, each is selected with probability `mlm_probability` (0.15);
a selected token is replaced by [MASK] with probability 0.8, by a random token with probability 0.1,
and left unchanged otherwise. Labels are the original ids at selected positions and -100 elsewhere.
All randomness comes from the `generator` passed in, so a batch is a pure function of
(examples, generator seed). One deviation: random replacements are drawn from the non-special
vocabulary (HF draws from the whole vocabulary, specials included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .packing import pad_batch


class MLMCollator:
    def __init__(
        self,
        *,
        vocab_size: int,
        mask_id: int,
        pad_id: int,
        special_ids: Sequence[int],
        mlm_probability: float = 0.15,
        pad_to_multiple_of: int | None = 8,
        max_length: int | None = None,
    ):
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.special = torch.tensor(sorted(set(special_ids) | {pad_id, mask_id}), dtype=torch.int64)
        self.low = int(self.special.max()) + 1 if self.special.numel() == int(self.special.max()) + 1 else 0
        self.p = mlm_probability
        self.pad_to_multiple_of, self.max_length = pad_to_multiple_of, max_length

    def __call__(self, examples: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> dict:
        """examples: 1-D int64 tensors -> {input_ids (B, L), attention_mask (B, L) bool or None, labels (B, L)}."""
        ids, mask = pad_batch(
            examples, self.pad_id, pad_to_multiple_of=self.pad_to_multiple_of, max_length=self.max_length
        )
        input_ids, labels = self.mask_tokens(ids, generator)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}

    def mask_tokens(self, ids: torch.Tensor, generator: torch.Generator | None = None):
        """ids (B, L) -> (masked input ids, labels) following the 80/10/10 rule."""
        g = generator
        labels = ids.clone()
        prob = torch.full(ids.shape, self.p)
        prob.masked_fill_(torch.isin(ids, self.special), 0.0)  # specials and padding never chosen
        selected = torch.bernoulli(prob, generator=g).bool()
        labels[~selected] = -100
        inputs = ids.clone()
        to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=g).bool() & selected
        inputs[to_mask] = self.mask_id
        to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=g).bool() & selected & ~to_mask
        low = self.low if self.low < self.vocab_size else 0
        rand = torch.randint(low, self.vocab_size, ids.shape, generator=g, dtype=torch.int64)
        inputs[to_random] = rand[to_random]
        return inputs, labels
