"""Generation: token-for-token parity with Hugging Face `generate` (greedy and beam search), the cached
decoder against the uncached one, padding, and argument checks. Tiny random models, CPU."""

import numpy as np
import pytest
import torch
from conftest import assert_close

from fastformer.models.convert import to_hf
from fastformer.models.generation import KVCache
from fastformer.models.t5 import T5Config, T5ForConditionalGeneration

transformers = pytest.importorskip("transformers")

# HF's generate builds its cache with num_layers entries: keep num_decoder_layers <= num_layers there.
TINY = dict(
    d_model=32,
    d_ff=48,
    d_kv=8,
    num_heads=4,
    num_layers=3,
    num_decoder_layers=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)


def _model(vocab, dtype, seed, eos_boost=3.0):
    torch.manual_seed(seed)
    m = T5ForConditionalGeneration(T5Config(vocab_size=vocab, **TINY)).to(dtype).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "layer_norm" in n:
                p.uniform_(0.5, 1.5)
        m.lm_head.weight[1] *= eos_boost  # make EOS common, so stopping is exercised
    return m


def _inputs(B, L, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L // 2 :] = False  # right padding
    mask[-1, : L // 3] = False  # left padding
    return ids.masked_fill(~mask, 0), mask


CASES = [
    dict(),
    dict(num_beams=2),
    dict(num_beams=3, length_penalty=0.6),
    dict(num_beams=4, length_penalty=-0.5),
    dict(num_beams=3, early_stopping=True),
    dict(num_beams=3, early_stopping="never", length_penalty=2.0),
    dict(num_beams=3, num_return_sequences=3),
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(num_beams=3, no_repeat_ngram_size=2, num_return_sequences=2),
    dict(encoder_repetition_penalty=1.7),
    dict(encoder_repetition_penalty=0.6),
    dict(num_beams=3, encoder_repetition_penalty=1.5),
    dict(num_beams=2, encoder_repetition_penalty=2.0, no_repeat_ngram_size=2),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kw", CASES, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "greedy")
def test_matches_hf_generate_token_for_token(kw, dtype):
    ended = 0
    for seed, vocab, eos in ((0, 23, 1), (1, 37, [1, 4, 6])):
        ours = _model(vocab, dtype, seed)
        hf = to_hf(ours).eval()
        ids, mask = _inputs(5, 11, vocab, seed)
        out = ours.generate(ids, mask, max_new_tokens=9, eos_token_id=eos, **kw)
        ref = hf.generate(
            input_ids=ids, attention_mask=mask.long(), max_new_tokens=9, eos_token_id=eos, do_sample=False, **kw
        )
        assert out.dtype == torch.int64
        assert out.shape == ref.shape, (out.shape, ref.shape)
        assert torch.equal(out, ref), f"\nours {out}\nhf   {ref}"
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos])
        ended += int(torch.isin(out[:, 1:], eos_ids).any(1).sum())
    assert ended > 0, "no sequence emitted EOS: stopping was not exercised"


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3, length_penalty=0.8)])
def test_cache_equals_no_cache_generate(kw):
    ours = _model(41, torch.float64, 3)
    ids, mask = _inputs(4, 9, 41, 3)
    a = ours.generate(ids, mask, max_new_tokens=8, **kw)
    b = ours.generate(ids, mask, max_new_tokens=8, use_cache=False, **kw)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_decoder_logits_equal_uncached_forward(dtype):
    """Feeding the decoder 1, 3 and 2 tokens at a time against the cache gives the logits of the full
    teacher-forced forward, position by position."""
    m = _model(53, dtype, 4)
    ids, mask = _inputs(3, 10, 53, 4)
    dec = torch.randint(0, 53, (3, 6))
    with torch.no_grad():
        full = m(ids, mask, decoder_input_ids=dec, return_logits=True).logits  # (3, 6, V)
        enc = m.encode(ids, mask)
        cache = m.start_cache(enc, mask, capacity=2)  # too small on purpose: the cache grows
        parts = []
        for a, b in ((0, 1), (1, 4), (4, 6)):
            assert cache.length == a
            parts.append(m.decode(dec[:, a:b], cache))
        assert_close(torch.cat(parts, 1), full, dtype, "cached logits")
        assert_close(m.decode_uncached(dec, enc, mask), full, dtype, "uncached logits")


def test_beam_rows_repeat_each_input():
    """start_cache(repeat=K) serves row b·K + r from input b: logits of repeated rows are equal."""
    m = _model(29, torch.float64, 5)
    ids, mask = _inputs(2, 7, 29, 5)
    with torch.no_grad():
        enc = m.encode(ids, mask)
        cache = m.start_cache(enc, mask, repeat=3)
        logits = m.decode(torch.zeros(6, 1, dtype=torch.long), cache)
        single = m.decode(torch.zeros(2, 1, dtype=torch.long), m.start_cache(enc, mask))
    assert_close(logits, single.repeat_interleave(3, 0), torch.float64, "repeated rows")


def test_padding_does_not_change_a_rows_output():
    m = _model(31, torch.float64, 6, eos_boost=1.0)
    ids, mask = _inputs(4, 12, 31, 6)
    batched = m.generate(ids, mask, max_new_tokens=7, eos_token_id=None)
    for i in range(4):
        keep = mask[i]
        alone = m.generate(ids[i : i + 1, keep], None, max_new_tokens=7, eos_token_id=None)
        assert torch.equal(alone[0], batched[i]), i


def test_greedy_stops_and_pads_after_eos():
    m = _model(23, torch.float32, 7, eos_boost=4.0)
    ids, mask = _inputs(6, 8, 23, 7)
    out = m.generate(ids, mask, max_new_tokens=12, eos_token_id=1, pad_token_id=0)
    assert out.shape[1] <= 13
    assert torch.all(out[:, 0] == m.config.decoder_start_token_id)
    for row in out.tolist():
        if 1 in row[1:]:
            end = row.index(1, 1)
            assert all(t == 0 for t in row[end + 1 :]), row
    if out.shape[1] < 13:  # stopped early: every row has ended
        assert all(1 in row[1:] for row in out.tolist())


def test_generate_restores_training_mode_and_keeps_weights():
    m = _model(23, torch.float32, 8)
    m.train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    ids, mask = _inputs(2, 5, 23, 8)
    out = m.generate(ids, mask, max_new_tokens=3)
    assert m.training
    out[:, 0] = 5  # a normal tensor, editable
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_generate_restores_each_submodules_own_mode_also_when_it_raises(monkeypatch):
    # the whole model used to be set back to its own mode, so a submodule the caller had put in the
    # other mode (a frozen encoder in eval while the rest trains) came back in the model's mode
    m = _model(23, torch.float32, 8)
    m.train()
    m.encoder.eval()
    m.decoder.block[1].eval()
    m.decoder.block[1].layer[0].train()
    before = {name: mod.training for name, mod in m.named_modules()}
    ids, mask = _inputs(2, 5, 23, 8)
    m.generate(ids, mask, max_new_tokens=3)
    assert {name: mod.training for name, mod in m.named_modules()} == before
    m.generate(ids, mask, max_new_tokens=3, num_beams=2)
    assert {name: mod.training for name, mod in m.named_modules()} == before

    def fail(*args, **kwargs):
        assert not m.training and not m.decoder.block[1].layer[0].training  # eval during generation
        raise RuntimeError("encoder failed")

    monkeypatch.setattr(m, "encode", fail)
    with pytest.raises(RuntimeError, match="encoder failed"):
        m.generate(ids, mask, max_new_tokens=3)
    assert {name: mod.training for name, mod in m.named_modules()} == before


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(num_beams=0), "num_beams"),
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(eos_token_id=99), "eos_token_id"),
        (dict(eos_token_id=[]), "eos_token_id"),
        (dict(decoder_start_token_id=-1), "decoder_start_token_id"),
        (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
        (dict(no_repeat_ngram_size=1.5), "no_repeat_ngram_size"),
        (dict(encoder_repetition_penalty=0.0), "encoder_repetition_penalty"),
        (dict(encoder_repetition_penalty=-1.5), "encoder_repetition_penalty"),
        (dict(encoder_repetition_penalty=float("inf")), "encoder_repetition_penalty"),
        (dict(encoder_repetition_penalty=True), "encoder_repetition_penalty"),
        (dict(num_beams=2, length_penalty=float("nan")), "length_penalty must be a finite number"),
        (dict(num_beams=2, length_penalty=float("inf")), "length_penalty must be a finite number"),
        # token ids: no bool, float or string (a string's digits were read as ids, a float truncated)
        (dict(eos_token_id="12"), "eos_token_id must be an integer token id"),
        (dict(eos_token_id=1.5), "eos_token_id must be an integer token id"),
        (dict(eos_token_id=[1, None]), "eos_token_id must be an integer token id"),
        (dict(eos_token_id=True), "eos_token_id must be an integer token id"),
        (dict(pad_token_id=1.7), "pad_token_id must be an integer token id"),
        (dict(decoder_start_token_id=[0]), "decoder_start_token_id must be an integer token id"),
        (dict(num_return_sequences=True), "num_return_sequences"),
        (dict(use_cache="no"), "use_cache must be a bool"),
        (dict(num_beams=3, early_stopping=1), "early_stopping"),  # transformers reads 1 as False
        (dict(num_beams=2, eos_token_id=list(range(23))), "beam search needs fewer"),
    ],
)
def test_bad_arguments_raise_value_error(bad, match):
    m = _model(23, torch.float32, 9)
    ids, mask = _inputs(2, 5, 23, 9)
    with pytest.raises(ValueError, match=match):
        m.generate(ids, mask, **bad)


def test_token_ids_in_every_integer_form():
    m = _model(23, torch.float32, 9)
    ids, mask = _inputs(2, 5, 23, 9)
    want = m.generate(ids, mask, max_new_tokens=4, eos_token_id=1, pad_token_id=0, decoder_start_token_id=0)
    for eos in (torch.tensor(1), np.int64(1), [1, 1], (1,), torch.tensor([1]), np.array([1]), range(1, 2)):
        got = m.generate(ids, mask, max_new_tokens=4, eos_token_id=eos, pad_token_id=np.int32(0))
        assert torch.equal(got, want), eos
    got = m.generate(ids, mask, max_new_tokens=4, eos_token_id=1, decoder_start_token_id=torch.tensor(0))
    assert torch.equal(got, want)


def test_bad_inputs_raise_value_error():
    m = _model(23, torch.float32, 9)
    with pytest.raises(ValueError, match="input_ids"):
        m.generate(torch.randn(2, 5))
    with pytest.raises(ValueError, match="attention_mask"):
        m.generate(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"input_ids hold 23, outside the vocabulary \[0, 23\)"):
        m.generate(torch.tensor([[4, 23]]))
    with pytest.raises(ValueError, match="input_ids hold -1"):
        m.generate(torch.tensor([[-1, 4]]))


def test_kv_cache_grows_and_reorders():
    c = KVCache(capacity=2)
    k1, v1 = torch.randn(3, 2, 2, 4), torch.randn(3, 2, 2, 4)
    k, v = c.update(k1, v1)
    assert torch.equal(k, k1) and torch.equal(v, v1)
    k2, v2 = torch.randn(3, 2, 3, 4), torch.randn(3, 2, 3, 4)
    k, v = c.update(k2, v2)  # past the capacity: the buffers grow
    assert c.length == 5 and torch.equal(k, torch.cat([k1, k2], 2)) and torch.equal(v, torch.cat([v1, v2], 2))
    idx = torch.tensor([2, 0, 0])
    c.reorder(idx)
    k, v = c.k[:, :, :5], c.v[:, :, :5]
    assert torch.equal(k, torch.cat([k1, k2], 2)[idx]) and torch.equal(v, torch.cat([v1, v2], 2)[idx])


def test_generate_on_the_kernel_path_matches_hf(triton_backend):
    """The Triton kernels (interpreted on CPU) in the encoder and the first decode step (a non-zero
    query_offset takes the reference for now): same tokens as Hugging Face."""
    ours = _model(23, torch.float32, 10)
    hf = to_hf(ours).eval()
    ids, mask = _inputs(2, 7, 23, 10)
    out = ours.generate(ids, mask, max_new_tokens=4)
    ref = hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref), f"\nours {out}\nhf   {ref}"


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_no_repeat_ngram_size_removes_repeats_that_happen_without_it(kw):
    """The tiny random model repeats itself; with no_repeat_ngram_size=2 no bigram occurs twice in a
    generated sequence (start token included, up to its EOS)."""
    m = _model(19, torch.float32, 4, eos_boost=0.0)  # EOS rare: long sequences
    ids, mask = _inputs(4, 9, 19, 4)

    def repeats(out):
        n = 0
        for row in out.tolist():
            row = row[: row.index(1) + 1] if 1 in row[1:] else row
            grams = list(zip(row, row[1:]))
            n += len(grams) - len(set(grams))
        return n

    assert repeats(m.generate(ids, mask, max_new_tokens=12, **kw)) > 0
    assert repeats(m.generate(ids, mask, max_new_tokens=12, no_repeat_ngram_size=2, **kw)) == 0


@pytest.mark.parametrize("kw", [dict(), dict(num_beams=3)], ids=["greedy", "beam"])
def test_encoder_repetition_penalty_moves_generation_towards_input_tokens(kw):
    """p > 1 raises the share of generated tokens that occur in the input, p < 1 lowers it, p = 1 is
    the plain search (tokens up to each sequence's EOS, the start token left out)."""
    m = _model(41, torch.float32, 6, eos_boost=0.0)
    ids, mask = _inputs(6, 8, 41, 6)

    def share_from_input(out):
        hit = total = 0
        for row, src, keep in zip(out.tolist(), ids.tolist(), mask.tolist()):
            row = row[1:]
            row = row[: row.index(1)] if 1 in row else row
            words = {t for t, k in zip(src, keep) if k}
            hit += sum(t in words for t in row)
            total += len(row)
        return hit / total

    plain = m.generate(ids, mask, max_new_tokens=10, **kw)
    assert torch.equal(plain, m.generate(ids, mask, max_new_tokens=10, encoder_repetition_penalty=1.0, **kw))
    more = share_from_input(m.generate(ids, mask, max_new_tokens=10, encoder_repetition_penalty=3.0, **kw))
    less = share_from_input(m.generate(ids, mask, max_new_tokens=10, encoder_repetition_penalty=0.3, **kw))
    assert less < share_from_input(plain) < more, (less, share_from_input(plain), more)
