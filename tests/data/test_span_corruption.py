"""Span-corruption collator: T5's random_spans_noise_mask semantics, exact lengths, sentinels, reconstruction."""

import pytest
import torch

from fastformer.data.span_corruption import (
    SpanCorruptionCollator,
    corrupted_lengths,
    noise_counts,
    random_spans_noise_mask,
    span_corruption_lengths,
)

SENTINELS = list(range(32099, 31999, -1))  # T5's layout: <extra_id_0> has the highest id
PAD, EOS = 0, 1


def _reconstruct(inputs, targets):
    """Original tokens from (inputs, targets): sentinel k in inputs -> the tokens after sentinel k in targets."""
    inputs, targets = inputs.tolist(), targets.tolist()
    assert inputs[-1] == EOS and targets[-1] == EOS
    spans, cur = {}, None
    for t in targets[:-1]:
        if t in SENTINELS:
            cur = SENTINELS.index(t)
            spans[cur] = []
        else:
            spans[cur].append(t)
    out = []
    for t in inputs[:-1]:
        out += spans[SENTINELS.index(t)] if t in SENTINELS else [t]
    return out


def test_t5_lengths_for_512_and_every_seq_len():
    assert span_corruption_lengths(512) == (568, 114)  # T5's random_spans_helper values for 512
    for seq_len in range(8, 400):
        raw, tgt = span_corruption_lengths(seq_len)
        assert corrupted_lengths(raw) == (seq_len, tgt) or corrupted_lengths(raw)[0] < seq_len
        assert corrupted_lengths(raw)[1] == tgt
        assert corrupted_lengths(raw + 1)[0] > seq_len


@pytest.mark.parametrize("n", [2, 3, 5, 17, 77, 130, 568])
def test_exact_shapes_sentinels_and_reconstruction(n):
    coll = SpanCorruptionCollator(SENTINELS, pad_id=PAD, eos_id=EOS)
    g = torch.Generator().manual_seed(n)
    for _ in range(20):
        tokens = torch.randint(5, 31000, (n,))
        batch = coll([tokens], g)
        lin, ltg = corrupted_lengths(n)
        assert batch["input_ids"].shape == (1, lin) and batch["labels"].shape == (1, ltg)
        assert batch["attention_mask"].all()
        inputs, targets = batch["input_ids"][0], batch["labels"][0]
        num_noise, num_spans = noise_counts(n)
        # sentinels: one per span, in order <extra_id_0>, <extra_id_1>, ... in both sequences
        assert [t for t in inputs.tolist() if t in SENTINELS] == SENTINELS[:num_spans]
        assert [t for t in targets.tolist() if t in SENTINELS] == SENTINELS[:num_spans]
        assert targets[0].item() == SENTINELS[0]  # spans start with non-noise: target opens with a sentinel
        assert inputs[0].item() == tokens[0].item()
        assert len(targets) - num_spans - 1 == num_noise
        assert _reconstruct(inputs, targets) == tokens.tolist()


def test_noise_fraction_and_mean_span_length_over_many_draws():
    n, draws = 568, 250
    g = torch.Generator().manual_seed(1)
    masks = torch.stack([random_spans_noise_mask(n, g) for _ in range(draws)])
    num_noise, num_spans = noise_counts(n)
    assert (num_noise, num_spans) == (85, 28)
    assert (masks.sum(1) == num_noise).all()
    assert abs(masks.float().mean().item() - 0.15) < 0.002
    # spans: runs of True; alternate starting with non-noise and ending with noise
    starts = masks & ~torch.cat([torch.zeros(draws, 1, dtype=torch.bool), masks[:, :-1]], 1)
    assert (starts.sum(1) == num_spans).all()
    assert not masks[:, 0].any() and masks[:, -1].all()
    span_lengths = []
    for m in masks[:50]:
        runs = torch.diff(
            torch.nonzero(torch.diff(torch.cat([torch.tensor([0]), m.long(), torch.tensor([0])]))).flatten()
        )
        span_lengths += runs[::2].tolist()
    assert abs(sum(span_lengths) / len(span_lengths) - 3.0) < 0.1
    assert max(span_lengths) > 6 and min(span_lengths) == 1  # lengths vary (random segmentation)
    # noise is spread over the sequence: every position is noise ~15% of the time
    per_pos = masks.float().mean(0)
    for a in range(0, n - 40, 71):
        assert 0.07 < per_pos[a + 1 : a + 71].mean().item() < 0.25


def test_batch_padding_shift_right_and_seeding():
    coll = SpanCorruptionCollator(SENTINELS, pad_id=PAD, eos_id=EOS, pad_to_multiple_of=8)
    examples = [torch.randint(5, 31000, (n,)) for n in (77, 30, 1)]
    b1 = coll(examples, torch.Generator().manual_seed(3))
    b2 = coll(examples, torch.Generator().manual_seed(3))
    b3 = coll(examples, torch.Generator().manual_seed(4))
    for k in b1:
        assert torch.equal(b1[k], b2[k])
    assert not torch.equal(b1["labels"], b3["labels"])
    ids, am, labels, dec = b1["input_ids"], b1["attention_mask"], b1["labels"], b1["decoder_input_ids"]
    assert ids.shape[1] % 8 == 0 and labels.shape[1] % 8 == 0
    for i, ex in enumerate(examples):
        lin = int(am[i].sum())
        assert (ids[i, lin:] == PAD).all() and ids[i, lin - 1] == EOS
        valid = labels[i] != -100
        assert valid[: int(valid.sum())].all()  # labels padded on the right only
        assert _reconstruct(ids[i, :lin], labels[i, valid]) == ex.tolist()
    assert (dec[:, 0] == PAD).all()
    assert torch.equal(dec[:, 1:], labels[:, :-1].masked_fill(labels[:, :-1] == -100, PAD))


def test_bad_input_raises_value_error():
    with pytest.raises(ValueError, match="noise_density"):
        SpanCorruptionCollator(SENTINELS, noise_density=1.5)
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruptionCollator([])
    with pytest.raises(ValueError, match="sentinel"):
        SpanCorruptionCollator(SENTINELS[:2])([torch.arange(5, 200)], torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="examples"):
        SpanCorruptionCollator(SENTINELS)([])
    with pytest.raises(ValueError, match="inputs_length"):
        span_corruption_lengths(2)
