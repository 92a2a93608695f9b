"""Masked-language-modelling collator (semantics of Hugging Face's DataCollatorForLanguageModeling).

Of the non-special, non-padding tokens, each is selected with probability `mlm_probability` (0.15);
a selected token is replaced by [MASK] with probability 0.8, by a random token with probability 0.1,
and left unchanged otherwise. Labels are the original ids at selected positions and -100 elsewhere.
All randomness comes from the `generator` passed in, so a batch is a pure function of
(examples, generator seed). One deviation: random replacements are drawn uniformly from the
non-special vocabulary, wherever the special ids lie (HF draws from the whole vocabulary, specials
included).
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
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
        if not 0.0 < mlm_probability < 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.vocab_size, self.mask_id, self.pad_id = vocab_size, mask_id, pad_id
        self.special = torch.tensor(sorted(set(special_ids) | {pad_id, mask_id}), dtype=torch.int64)
        self.replace_ids, self.low = _replacement_ids(vocab_size, self.special)
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
        rand = self._random_tokens(ids.shape, g)
        inputs[to_random] = rand[to_random]
        return inputs, labels

    def _random_tokens(self, shape, g: torch.Generator | None) -> torch.Tensor:
        """`shape` int64 ids drawn uniformly from the non-special vocabulary, one randint of `shape` either
        way. When those ids are one range [low, V) (the specials 0..k) the draw is randint(low, V) itself,
        so batches stay bit-identical to earlier versions; otherwise an index into replace_ids."""
        if self.low is not None:
            return torch.randint(self.low, self.vocab_size, shape, generator=g, dtype=torch.int64)
        index = torch.randint(0, self.replace_ids.numel(), shape, generator=g, dtype=torch.int64)
        return self.replace_ids[index]


def _replacement_ids(vocab_size: int, special: torch.Tensor) -> tuple[torch.Tensor, int | None]:
    """The ids a random replacement may take, (n,) int64 sorted: the vocabulary [0, vocab_size) without
    `special`; and their first id when they are exactly the range [low, vocab_size), else None."""
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    allowed[special[(special >= 0) & (special < vocab_size)]] = False
    ids = allowed.nonzero().flatten()
    if ids.numel() == 0:
        raise ValueError(f"special_ids (with pad_id and mask_id) cover the whole vocabulary of vocab_size={vocab_size}")
    low = int(ids[0])
    return ids, (low if ids.numel() == vocab_size - low else None)
