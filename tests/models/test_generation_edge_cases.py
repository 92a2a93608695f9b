"""Generation edge cases found by probing the public API as a user would: configs and low-level decode
arguments that used to fail far from their cause (IndexError, ZeroDivisionError, TypeError, a bare
RuntimeError inside the decode step) now raise a ValueError naming the field or argument. Tiny models,
CPU."""

import pytest
import torch

from fastformer.models.t5 import T5Config, T5EncoderForSequenceClassification, T5ForConditionalGeneration

TINY = dict(
    vocab_size=31,
    d_model=16,
    d_ff=24,
    d_kv=4,
    num_heads=2,
    num_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
)


def _model(**overrides):
    torch.manual_seed(0)
    return T5ForConditionalGeneration(T5Config(**{**TINY, **overrides})).eval()


@pytest.mark.parametrize("field", ["vocab_size", "d_model", "d_ff", "d_kv", "num_heads", "num_layers"])
def test_config_sizes_below_one_raise_value_error_naming_the_field(field):
    # num_heads=0 / d_kv=0 failed in the weight init with ZeroDivisionError, num_layers=0 at the first
    # forward or generate with IndexError: nothing said which field was wrong
    with pytest.raises(ValueError, match=f"T5Config {field} must be an int >= 1, got 0"):
        T5Config(**{**TINY, field: 0})
    with pytest.raises(ValueError, match=f"T5Config {field} must be an int >= 1, got True"):
        T5Config(**{**TINY, field: True})


def test_a_decoder_without_layers_is_refused_where_it_is_built():
    # the encoder-only classifier never builds a decoder, so its config may say 0 decoder layers; an
    # encoder-decoder with none generated an IndexError from generate
    cfg = T5Config(**{**TINY, "num_decoder_layers": 0})
    T5EncoderForSequenceClassification(cfg, num_labels=2)
    with pytest.raises(ValueError, match="num_decoder_layers must be an int >= 1, got 0"):
        T5ForConditionalGeneration(cfg)


@pytest.mark.parametrize("field", ["pad_token_id", "decoder_start_token_id"])
def test_generate_with_a_config_id_of_none_names_the_argument(field):
    # a config holding None (as a hand-written dict can) failed with "TypeError: '<=' not supported
    # between instances of 'int' and 'NoneType'"; passing the id to generate is the way out
    model = _model(**{field: None})
    ids = torch.randint(2, 31, (2, 5))
    for beams in (1, 2):
        with pytest.raises(ValueError, match=f"{field}: the model config has none"):
            model.generate(ids, max_new_tokens=3, num_beams=beams)
    out = model.generate(ids, max_new_tokens=3, **{field: 0})
    assert out.shape[0] == 2 and out.dtype == torch.int64


def test_start_cache_and_decode_bad_arguments_raise_value_error():
    # start_cache / decode are the documented way to write one's own decoding loop; wrong shapes used to
    # fail inside the decode step (ZeroDivisionError for repeat=0, RuntimeError for the rest)
    model = _model()
    ids = torch.randint(2, 31, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.bool)
    step = torch.zeros(3, 1, dtype=torch.int64)
    with torch.no_grad():
        enc = model.encode(ids, mask)
        with pytest.raises(ValueError, match="repeat must be an int >= 1"):
            model.start_cache(enc, mask, repeat=0)
        with pytest.raises(ValueError, match=r"attention_mask must be shaped like encoder_hidden_states' \(B, Lenc\)"):
            model.start_cache(enc, mask[:, :4])
        with pytest.raises(ValueError, match="encoder_hidden_states must be shaped"):
            model.start_cache(enc[0], mask[0])
        with pytest.raises(ValueError, match=r"decoder_input_ids must be shaped \(N, L\) with N = 6"):
            model.decode(step, model.start_cache(enc, mask, repeat=2))  # 3 rows for 3 inputs x 2 beams
        with pytest.raises(ValueError, match="decoder_input_ids must be shaped"):
            model.decode(step[:, 0], model.start_cache(enc, mask))
        # the right shapes still decode, and match the uncached decoder
        cache = model.start_cache(enc, mask, repeat=2)
        dec = torch.randint(0, 31, (6, 4))
        got = torch.cat([model.decode(dec[:, i : i + 1], cache) for i in range(4)], 1)
        ref = model.decode_uncached(dec, enc.repeat_interleave(2, 0), mask.repeat_interleave(2, 0))
    torch.testing.assert_close(got, ref)


def test_numpy_scalars_are_taken_as_the_python_numbers_they_hold():
    """max_new_tokens, num_beams, num_return_sequences, length_penalty, no_repeat_ngram_size and the
    encoder repetition penalty refused numpy scalars (a value read from an array or a config) that
    the token ids accepted; they now give what the Python numbers give. Bools are still refused."""
    import numpy as np

    model = _model()
    ids = torch.randint(2, TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    plain = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, length_penalty=0.5)
    plain.update(no_repeat_ngram_size=2, encoder_repetition_penalty=1.3)
    numpy = dict(max_new_tokens=np.int64(5), num_beams=np.int32(3), num_return_sequences=np.int64(2))
    numpy.update(length_penalty=np.float32(0.5), no_repeat_ngram_size=np.int8(2))
    numpy.update(encoder_repetition_penalty=np.float64(1.3))
    assert torch.equal(model.generate(ids, mask, **numpy), model.generate(ids, mask, **plain))
    for name in ("max_new_tokens", "num_beams", "no_repeat_ngram_size"):
        with pytest.raises(ValueError, match=name):
            model.generate(ids, mask, **{name: np.bool_(True)})
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1, got 2.0"):
        model.generate(ids, mask, max_new_tokens=2.0)
    # the decoding-loop API takes them too
    with torch.no_grad():
        enc = model.encode(ids, mask)
        cache = model.start_cache(enc, mask, repeat=np.int64(2))
    assert cache.repeat == 2 and type(cache.repeat) is int
