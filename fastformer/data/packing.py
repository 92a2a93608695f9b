"""Turn token-id lists into examples: packed fixed-length chunks or line-by-line, and dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pack_stream(
    docs: Sequence[Sequence[int]], length: int, *, separator: int | None = None, keep_last: bool = False
) -> list[torch.Tensor]:
    """Concatenate `docs` (separated by `separator` when given) and cut the stream into chunks of
    exactly `length` tokens. The last partial chunk is dropped unless it would be the only one or
    keep_last is set. Returns a list of (length,) int64 tensors (the last may be shorter)."""
    if length < 1:
        raise ValueError(f"length must be positive, got {length}")
    stream: list[int] = []
    for d in docs:
        if not d:
            continue
        stream.extend(d)
        if separator is not None:
            stream.append(separator)
    if separator is not None and stream:
        stream.pop()  # no separator after the last document
    flat = torch.tensor(stream, dtype=torch.int64)
    n_full = flat.numel() // length
    chunks = list(flat[: n_full * length].view(n_full, length).unbind(0)) if n_full else []
    rest = flat[n_full * length :]
    if rest.numel() and (keep_last or not chunks):
        chunks.append(rest)
    return [c.clone() for c in chunks]


def wrap(chunks: Sequence[torch.Tensor], prefix: Sequence[int] = (), suffix: Sequence[int] = ()) -> list[torch.Tensor]:
    """prefix + chunk + suffix for each chunk (e.g. [CLS] ... [SEP])."""
    pre = torch.tensor(list(prefix), dtype=torch.int64)
    suf = torch.tensor(list(suffix), dtype=torch.int64)
    return [torch.cat([pre, c, suf]) for c in chunks]


def pad_batch(
    examples: Sequence[torch.Tensor], pad_id: int, *, pad_to_multiple_of: int | None = 8, max_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Right-pad 1-D examples to the longest (rounded up to a multiple of `pad_to_multiple_of`, capped
    at max_length). Returns (ids (B, L) int64, attention_mask (B, L) bool, or None when nothing is
    padded: the model then takes its mask-free path)."""
    if not examples:
        raise ValueError("examples must not be empty")
    longest = max(int(e.numel()) for e in examples)
    L = longest
    if pad_to_multiple_of:
        L = -(-L // pad_to_multiple_of) * pad_to_multiple_of
    if max_length is not None:
        L = max(longest, min(L, max_length))
    ids = torch.full((len(examples), L), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(examples), L), dtype=torch.bool)
    for i, e in enumerate(examples):
        ids[i, : e.numel()] = e
        mask[i, : e.numel()] = True
    return ids, (None if bool(mask.all()) else mask)
