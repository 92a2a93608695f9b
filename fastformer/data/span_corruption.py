"""T5 span corruption: the semantics of T5's `random_spans_noise_mask`, as a seeded collator.

For a raw example of length n (noise density d = 0.15, mean noise span length μ = 3):

    num_noise  = clamp(round(max(n, 2) · d), 1, max(n, 2) − 1)
    num_spans  = max(round(num_noise / μ), 1)
    noise span lengths:     a uniformly random split of num_noise     into num_spans positive parts
    non-noise span lengths: a uniformly random split of n − num_noise into num_spans positive parts
    mask = non-noise₀ noise₀ non-noise₁ noise₁ ...     (alternating, starting with non-noise)

    inputs  = non-noise₀ <extra_id_0> non-noise₁ <extra_id_1> ... </s>     length n − num_noise + num_spans + 1
    targets = <extra_id_0> noise₀ <extra_id_1> noise₁ ... </s>             length num_noise + num_spans + 1
    decoder_input_ids = targets shifted right, starting with the decoder start (pad) token

(`round` is round-half-to-even, as numpy's and TensorFlow's.) `span_corruption_lengths(seq_len)`
gives the raw length whose inputs are exactly `seq_len` long (T5's `random_spans_helper`) and the
resulting target length; packed examples of that raw length give batches without padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0


def noise_counts(
    length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(num_noise_tokens, num_noise_spans) for a raw length, with T5's clamps."""
    length = max(int(length), 2)
    num_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
    return num_noise, num_spans


def corrupted_lengths(
    length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(input length, target length), EOS included, of a raw example of `length` tokens (length >= 2)."""
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


def span_corruption_lengths(
    inputs_length: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> tuple[int, int]:
    """(raw tokens length, target length): the longest raw length whose corrupted input fits in
    `inputs_length` (EOS included), and the target length it gives. E.g. 512 -> (568, 114)."""
    if inputs_length < 3:
        raise ValueError(f"inputs_length must be at least 3, got {inputs_length}")
    raw = 2
    while corrupted_lengths(raw + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        raw += 1
    return raw, corrupted_lengths(raw, noise_density, mean_noise_span_length)[1]


def max_inputs_length(
    num_sentinels: int, noise_density: float = NOISE_DENSITY, mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH
) -> int:
    """The largest `inputs_length` (the span objective's --seq-len) whose raw examples need at most
    `num_sentinels` sentinels: each of the num_spans noise spans, and each of the num_spans non-noise
    spans of the targets, takes one. 1809 for T5's 100 sentinels."""
    if num_sentinels < 1:
        raise ValueError(f"num_sentinels must be at least 1, got {num_sentinels}")
    # num_spans and the corrupted input length never decrease as the raw length grows: find the first
    # raw length that needs too many spans; every input length below its corrupted one fits.
    lo, hi = 2, 4
    while noise_counts(hi, noise_density, mean_noise_span_length)[1] <= num_sentinels:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # noise_counts(lo) fits, noise_counts(hi) does not
        mid = (lo + hi) // 2
        if noise_counts(mid, noise_density, mean_noise_span_length)[1] <= num_sentinels:
            lo = mid
        else:
            hi = mid
    return corrupted_lengths(hi, noise_density, mean_noise_span_length)[0] - 1


def _random_segmentation(num_items: int, num_segments: int, generator: torch.Generator) -> torch.Tensor:
    """Lengths (num_segments,) of a uniformly random split of num_items into positive parts: choose
    num_segments − 1 of the num_items − 1 gaps as cut points."""
    first_in_segment = torch.zeros(num_items, dtype=torch.long)
    cuts = torch.randperm(num_items - 1, generator=generator)[: num_segments - 1] + 1
    first_in_segment[cuts] = 1
    return torch.bincount(first_in_segment.cumsum(0), minlength=num_segments)


def random_spans_noise_mask(
    length: int,
    generator: torch.Generator,
    noise_density: float = NOISE_DENSITY,
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
) -> torch.Tensor:
    """bool (length,): True = noise. Alternating non-noise/noise spans, starting with non-noise."""
    orig_length = int(length)
    length = max(orig_length, 2)
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    noise_lengths = _random_segmentation(num_noise, num_spans, generator)
    nonnoise_lengths = _random_segmentation(length - num_noise, num_spans, generator)
    interleaved = torch.stack([nonnoise_lengths, noise_lengths], 1).reshape(-1)  # (2 · num_spans,)
    is_noise = torch.arange(2 * num_spans) % 2 == 1
    return is_noise.repeat_interleave(interleaved)[:orig_length]


def _replace_spans(tokens: torch.Tensor, span_mask: torch.Tensor, sentinels: torch.Tensor) -> torch.Tensor:
    """Each run of True in span_mask -> one sentinel (the k-th run gets sentinels[k]); others kept."""
    prev = torch.cat([span_mask.new_zeros(1), span_mask[:-1]])
    first = span_mask & ~prev
    k = first.cumsum(0) - 1
    if first.any() and int(k.max()) >= sentinels.numel():
        raise ValueError(f"{int(k.max()) + 1} spans need more sentinel tokens than the {sentinels.numel()} given")
    out = torch.where(first, sentinels[k.clamp(0, sentinels.numel() - 1)], tokens)
    return out[~(span_mask & prev)]


def corrupt(
    tokens: torch.Tensor, noise_mask: torch.Tensor, sentinels: torch.Tensor, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of one example: tokens (n,), noise_mask bool (n,), sentinels (S,) ids in order."""
    eos = tokens.new_tensor([eos_id])
    inputs = torch.cat([_replace_spans(tokens, noise_mask, sentinels), eos])
    targets = torch.cat([_replace_spans(tokens, ~noise_mask, sentinels), eos])
    return inputs, targets


class SpanCorruptionCollator:
    """collator(examples, generator) -> dict of CPU tensors:

        input_ids (B, Lin) int64, attention_mask (B, Lin) bool (True = token),
        labels (B, Ltgt) int64 (-100 on padding), decoder_input_ids (B, Ltgt) int64 (labels shifted
        right, decoder_start_id first, pad where labels are -100).

    examples: 1-D int64 tensors of raw token ids (no EOS). All randomness comes from `generator`."""

    def __init__(
        self,
        sentinel_ids: Sequence[int],
        *,
        pad_id: int = 0,
        eos_id: int = 1,
        decoder_start_id: int | None = None,
        noise_density: float = NOISE_DENSITY,
        mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH,
        pad_to_multiple_of: int | None = None,
    ):
        if not 0.0 < noise_density < 1.0:
            raise ValueError(f"noise_density must be in (0, 1), got {noise_density}")
        if mean_noise_span_length < 1.0:
            raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}")
        self.sentinels = torch.as_tensor(list(sentinel_ids), dtype=torch.int64)
        if self.sentinels.numel() == 0:
            raise ValueError("sentinel_ids must not be empty")
        self.pad_id, self.eos_id = int(pad_id), int(eos_id)
        self.decoder_start_id = self.pad_id if decoder_start_id is None else int(decoder_start_id)
        self.noise_density, self.mean_noise_span_length = float(noise_density), float(mean_noise_span_length)
        self.pad_to_multiple_of = pad_to_multiple_of

    def _padded_length(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return -(-n // m) * m if m else n

    def __call__(self, examples: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> dict:
        if not examples:
            raise ValueError("examples must not be empty")
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        pairs = []
        for ex in examples:
            ex = torch.as_tensor(ex, dtype=torch.int64).reshape(-1)
            if ex.numel() < 1:
                raise ValueError("every example needs at least one token")
            mask = random_spans_noise_mask(ex.numel(), generator, self.noise_density, self.mean_noise_span_length)
            pairs.append(corrupt(ex, mask, self.sentinels, self.eos_id))
        B = len(pairs)
        lin = self._padded_length(max(p[0].numel() for p in pairs))
        ltg = self._padded_length(max(p[1].numel() for p in pairs))
        input_ids = torch.full((B, lin), self.pad_id, dtype=torch.int64)
        attention_mask = torch.zeros((B, lin), dtype=torch.bool)
        labels = torch.full((B, ltg), -100, dtype=torch.int64)
        for i, (inp, tgt) in enumerate(pairs):
            input_ids[i, : inp.numel()] = inp
            attention_mask[i, : inp.numel()] = True
            labels[i, : tgt.numel()] = tgt
        decoder_input_ids = torch.full_like(labels, self.decoder_start_id)
        decoder_input_ids[:, 1:] = labels[:, :-1]
        decoder_input_ids.masked_fill_(decoder_input_ids == -100, self.pad_id)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "decoder_input_ids": decoder_input_ids,
        }
