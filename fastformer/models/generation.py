"""Generation for the T5-style encoder-decoder: greedy and beam search over a key/value cache.

    out = model.generate(input_ids, attention_mask, max_new_tokens=32)                   # greedy
    out = model.generate(input_ids, attention_mask, num_beams=4, length_penalty=1.0)    # beam search
    # out: (B · num_return_sequences, 1 + T) int64, column 0 the decoder start token

The encoder runs once per call; each decoder layer's cross-attention keys/values are projected from
its output once, on the B inputs (the beams of an input share them); decoder self-attention keeps a
preallocated key/value cache, so a step feeds one token per sequence and attends with
`ff.t5_attention(..., query_offset=t)` (query length 1 against the t + 1 cached keys; only that
(1, Lk) row of relative-position bias is ever formed).

Semantics follow Hugging Face `generate` (transformers 5) so that, given the same weights, the
tokens are the same:
- Greedy: argmax of the float32 logits; a sequence that emitted an EOS is continued with
  `pad_token_id`; the loop stops when every sequence has emitted an EOS or after `max_new_tokens`.
- Beam search: log-softmax in float32, the running beam scores added, the best 2·num_beams
  continuations kept (more with several EOS ids); a continuation ending in EOS (or reaching the length
  limit) among the first num_beams becomes a finished hypothesis scored
  sum_logprobs / generated_len ** length_penalty (generated_len counts the EOS, not the start token);
  `early_stopping` False (default: stop when no running beam can beat the worst finished one at the
  current length), True (stop as soon as num_beams hypotheses are finished) or "never".
  Positions after a hypothesis' end hold `pad_token_id`, or the first EOS id when `pad_token_id`
  is 0 (what Hugging Face writes there, e.g. for T5).
- `encoder_repetition_penalty` p != 1: the score s of every token id in `input_ids` (padding and
  EOS ids included, as Hugging Face does) becomes s * p where s > 0 and s / p otherwise, so p > 1 favours
  words of the input (against decoders that make up words instead of copying them) and p < 1 avoids
  them; on the logits in greedy search, on the log-probabilities in beam search, before
  `no_repeat_ngram_size`.
- `no_repeat_ngram_size` n > 0: a token that would complete an n-gram already in the sequence (start
  token included) gets score -inf: on the logits in greedy search, on the log-probabilities (before
  the beam scores are added) in beam search.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["KVCache", "DecoderCache", "generate", "greedy_search", "beam_search"]

_NEG = -1.0e9  # Hugging Face's "impossible" score, added in float32 as it does


class KVCache:
    """Keys/values of one self-attention layer, (N, H, capacity, D) buffers filled from position 0.

    `update(k, v)` appends (N, H, L, D) and returns views of everything so far (N, H, length, D); the
    buffers double when full. Inference only: the views alias buffers that later steps write."""

    def __init__(self, capacity: int = 0):
        self.capacity = max(int(capacity), 1)
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        n = k.shape[2]
        if self.k is None:
            shape = (k.shape[0], k.shape[1], max(self.capacity, n), k.shape[3])
            self.k, self.v = k.new_empty(shape), v.new_empty(shape[:3] + (v.shape[3],))
        elif self.length + n > self.k.shape[2]:
            grow = max(2 * self.k.shape[2], self.length + n)
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_empty(old.shape[:2] + (grow,) + old.shape[3:])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(self, name, new)
        end = self.length + n
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Rows of the batch become rows `index` (N,) of before (beam search)."""
        if self.k is not None and self.length:
            n = self.length
            self.k[:, :, :n] = self.k[:, :, :n].index_select(0, index)
            self.v[:, :, :n] = self.v[:, :, :n].index_select(0, index)


@dataclass
class DecoderCache:
    """Everything a decoder step reuses (built by the model's start_cache). self_attn: one KVCache per
    decoder layer (N = B·repeat rows); cross: per layer the encoder keys and values (B, H, Lenc, D);
    enc_mask: (B, 1, 1, Lenc) bool (True = real token) or None; attend: the attention function for the
    cross-attention; step: the model's decode step (ids, cache) -> decoder output; repeat: decoder
    rows per input (row b·repeat + r serves input b)."""

    self_attn: list
    cross: list
    enc_mask: torch.Tensor | None
    attend: Callable
    step: Callable
    repeat: int = 1

    @property
    def length(self) -> int:
        """Decoder positions already cached (the position of the next token)."""
        return self.self_attn[0].length if self.self_attn else 0

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.self_attn:
            c.reorder(index)


def _int_arg(value, name: str, lo: int, note: str = "") -> int:
    """value as a Python int; ValueError naming `name` unless it is an integer (numpy's too, not a
    bool) >= lo."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}{note}, got {value!r}")
    return int(value)


def _token_id(value, name: str) -> int:
    """A token id: an int, a numpy integer or an integer 0-d tensor (as Hugging Face takes); bools,
    floats and strings are refused rather than truncated or read digit by digit."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer token id, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer token id, got {value!r}") from None


def _eos_list(eos) -> list[int]:
    """eos_token_id: one id, or several (a list, tuple, range, set, 1-D tensor or numpy array of ids;
    duplicates dropped, order kept)."""
    if eos is None:
        return []
    if hasattr(eos, "tolist") and getattr(eos, "ndim", None) in (0, 1):  # a tensor or numpy value / array
        eos = eos.tolist()  # a Python int (0-d; a float or bool stays one, and is refused) or a list
    if isinstance(eos, (str, bytes)) or not isinstance(eos, Iterable):
        ids = [_token_id(eos, "eos_token_id")]
    else:
        ids = [_token_id(e, "eos_token_id") for e in eos]
    return list(dict.fromkeys(ids))


def _shape(t) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def _check_inputs(input_ids, attention_mask):
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.int64, torch.int32)
    ):
        raise ValueError(f"input_ids must be an integer tensor shaped (B, L), got {_shape(input_ids)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must be shaped like input_ids {tuple(input_ids.shape)}, got {_shape(attention_mask)}"
            )
        if attention_mask.is_floating_point():
            raise ValueError("attention_mask must be bool or 0/1 integers (True/1 = real token)")


def _eval_mode(model) -> dict:
    """Switch `model` to eval mode; returns every submodule's mode before (module -> training), for
    _restore_modes. Recorded per module, not once for the model: `model.train(was_training)` would also
    flip a submodule the caller had put in the other mode (a frozen encoder in eval while the rest
    trains)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    return modes


def _restore_modes(modes: dict) -> None:
    """Give each module back the mode _eval_mode recorded. The flag is set directly: `train(mode)`
    recurses into the children and would overwrite the modes set before it."""
    for m, training in modes.items():
        m.training = training


def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 20,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    num_return_sequences: int = 1,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    decoder_start_token_id: int | None = None,
    no_repeat_ngram_size: int = 0,
    encoder_repetition_penalty: float = 1.0,
    use_cache: bool = True,
) -> torch.Tensor:
    """input_ids, attention_mask: (B, Lin) (mask bool or 0/1, True = real token; any padding side)
    -> generated ids (B · num_return_sequences, 1 + T), T <= max_new_tokens, column 0 the start token.

    Token ids default to the model config's (eos_token_id, pad_token_id, decoder_start_token_id).
    The model runs in eval mode; afterwards every submodule has its own mode back.
    use_cache=False recomputes the whole decoder prefix each step (slow; the cache's oracle)."""
    cfg = model.config
    _check_inputs(input_ids, attention_mask)
    # numbers.Integral / numbers.Real: numpy scalars (a value read from a config or an array) are taken
    # as Python's, as the token ids are; bools are refused
    max_new_tokens = _int_arg(max_new_tokens, "max_new_tokens", 1)
    num_beams = _int_arg(num_beams, "num_beams", 1)
    if (
        isinstance(num_return_sequences, bool)
        or not isinstance(num_return_sequences, numbers.Integral)
        or not 1 <= num_return_sequences <= num_beams
    ):
        raise ValueError(
            f"num_return_sequences must be an int in [1, num_beams={num_beams}], got {num_return_sequences!r}"
        )
    num_return_sequences = int(num_return_sequences)
    if (
        isinstance(length_penalty, bool)
        or not isinstance(length_penalty, numbers.Real)
        or not math.isfinite(length_penalty)
    ):
        raise ValueError(f"length_penalty must be a finite number, got {length_penalty!r}")
    length_penalty = float(length_penalty)
    no_repeat_ngram_size = _int_arg(no_repeat_ngram_size, "no_repeat_ngram_size", 0, " (0: off)")
    p = check_encoder_repetition_penalty(encoder_repetition_penalty)
    if not (early_stopping is True or early_stopping is False or early_stopping == "never"):  # 1 is not True
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    if not isinstance(use_cache, bool):
        raise ValueError(f"use_cache must be a bool, got {use_cache!r}")
    eos = _eos_list(cfg.eos_token_id if eos_token_id is None else eos_token_id)
    if eos_token_id is not None and not eos:
        raise ValueError("eos_token_id must name at least one token id (None: the model config's)")
    pad = cfg.pad_token_id if pad_token_id is None else _token_id(pad_token_id, "pad_token_id")
    start = (
        cfg.decoder_start_token_id
        if decoder_start_token_id is None
        else _token_id(decoder_start_token_id, "decoder_start_token_id")
    )
    for name, value in (("pad_token_id", pad), ("decoder_start_token_id", start)):
        if value is None:  # a config built with None: else a TypeError in the range check below
            raise ValueError(f"{name}: the model config has none (None); pass {name}=<token id> to generate")
    # a config's id as a Python int too (a numpy or 0-d tensor id would otherwise flow on as one)
    pad, start = _token_id(pad, "config.pad_token_id"), _token_id(start, "config.decoder_start_token_id")
    V = cfg.vocab_size
    if num_beams > 1 and max(2, 1 + len(eos)) * num_beams > num_beams * V:
        # each step keeps the best max(2, 1 + #eos) candidates per beam, which must not exceed the
        # num_beams * V there are
        raise ValueError(f"eos_token_id names {len(eos)} ids: beam search needs fewer than the vocabulary's {V}")
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [pad]), ("decoder_start_token_id", [start])):
        if any(not 0 <= i < V for i in ids):
            raise ValueError(f"{name} {ids if len(ids) > 1 else ids[0]} is outside the vocabulary [0, {V})")
    lo, hi = int(input_ids.min()), int(input_ids.max())  # one host sync; an embedding lookup would fail deep inside
    if lo < 0 or hi >= V:
        raise ValueError(f"input_ids hold {lo if lo < 0 else hi}, outside the vocabulary [0, {V})")
    modes = _eval_mode(model)
    try:
        # inference mode: no autograd bookkeeping on the many small ops of a decode step
        with torch.inference_mode():
            if num_beams == 1:
                out = greedy_search(
                    model,
                    input_ids,
                    attention_mask,
                    max_new_tokens=max_new_tokens,
                    eos=eos,
                    pad=pad,
                    start=start,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    encoder_repetition_penalty=p,
                    use_cache=use_cache,
                )
            else:
                out = beam_search(
                    model,
                    input_ids,
                    attention_mask,
                    max_new_tokens=max_new_tokens,
                    num_beams=num_beams,
                    length_penalty=float(length_penalty),
                    early_stopping=early_stopping,
                    num_return_sequences=num_return_sequences,
                    eos=eos,
                    pad=pad,
                    start=start,
                    no_repeat_ngram_size=no_repeat_ngram_size,
                    encoder_repetition_penalty=p,
                    use_cache=use_cache,
                )
    finally:
        _restore_modes(modes)
    return out.clone()  # a normal tensor (inference tensors refuse in-place edits outside)


class _Stepper:
    """Next-token logits (N, V) float32 for the last token of each running sequence, with or without
    the cache; `reorder` follows the beams."""

    def __init__(self, model, enc, enc_mask, n_rep: int, capacity: int, use_cache: bool):
        self.model, self.use_cache = model, use_cache
        if use_cache:  # keys/values projected once, on the B inputs; the beams share them
            self.cache = model.start_cache(enc, enc_mask, capacity=capacity, repeat=n_rep)
        else:
            self.enc = enc.repeat_interleave(n_rep, 0)
            self.enc_mask = None if enc_mask is None else enc_mask.repeat_interleave(n_rep, 0)

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """seqs: (N, t) decoder tokens so far (start token first) -> (N, V) float32."""
        if self.use_cache:
            out = self.model.decode(seqs[:, self.cache.length :], self.cache)
        else:
            out = self.model.decode_uncached(seqs, self.enc, self.enc_mask)
        return out[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        if self.use_cache:
            self.cache.reorder(index)


def ban_repeated_ngrams(seqs: torch.Tensor, n: int, scores: torch.Tensor) -> torch.Tensor:
    """scores (N, V) with -inf, in place, at every token that would complete an n-gram already present
    in seqs (N, t) (the tokens so far): the tokens that followed an earlier occurrence of the last
    n - 1 tokens (n = 1: every token so far). Nothing while t < n. Returns scores."""
    t = seqs.shape[1]
    if n <= 0 or t < n:
        return scores
    grams = seqs.unfold(1, n, 1)  # (N, t - n + 1, n): every n-gram so far
    seen = (grams[:, :, :-1] == seqs[:, t - n + 1 :][:, None, :]).all(-1)  # its first n - 1 = the last n - 1
    rows, at = seen.nonzero(as_tuple=True)
    scores[rows, grams[rows, at, -1]] = float("-inf")
    return scores


def check_encoder_repetition_penalty(p, name: str = "encoder_repetition_penalty") -> float:
    """p as a float; ValueError naming `name` unless p is a finite number > 0 (not a bool)."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not math.isfinite(p) or p <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (1: off), got {p!r}")
    return float(p)


def favour_input_tokens(input_ids: torch.Tensor, penalty: float, scores: torch.Tensor) -> torch.Tensor:
    """scores (N, V) with the encoder repetition penalty at the ids of input_ids (B, Lin), N = B · K
    (the K rows of input b are b·K .. b·K + K - 1): s -> s * penalty where s > 0, s / penalty otherwise.
    Returns new scores (Hugging Face's EncoderRepetitionPenaltyLogitsProcessor, the same operations)."""
    if scores.shape[0] != input_ids.shape[0]:
        input_ids = input_ids.repeat_interleave(scores.shape[0] // input_ids.shape[0], 0)
    s = scores.gather(1, input_ids)
    inv = 1.0 / penalty  # Hugging Face multiplies by 1 / penalty and divides by it: the same rounding
    return scores.scatter(1, input_ids, torch.where(s < 0, s * inv, s / inv))


def process_scores(
    scores: torch.Tensor, seqs: torch.Tensor, input_ids: torch.Tensor, encoder_repetition_penalty: float, ngram: int
) -> torch.Tensor:
    """Next-token scores (N, V) after the score rules, in Hugging Face's order: the encoder repetition
    penalty (favour_input_tokens), then the n-gram ban on the tokens so far seqs (N, t)
    (ban_repeated_ngrams, in place). The same for greedy (logits) and beam search (log-probabilities)."""
    if encoder_repetition_penalty != 1.0:
        scores = favour_input_tokens(input_ids, encoder_repetition_penalty, scores)
    if ngram:
        ban_repeated_ngrams(seqs, ngram, scores)
    return scores


def greedy_search(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens,
    eos,
    pad,
    start,
    no_repeat_ngram_size=0,
    encoder_repetition_penalty=1.0,
    use_cache=True,
):
    """Greedy decoding (see the module docstring). Returns (B, 1 + T) int64."""
    B = input_ids.shape[0]
    dev = input_ids.device
    enc = model.encode(input_ids, attention_mask)
    stepper = _Stepper(model, enc, attention_mask, 1, max_new_tokens, use_cache)
    seqs = torch.full((B, 1 + max_new_tokens), start, dtype=torch.int64, device=dev)
    eos_t = torch.tensor(eos, dtype=torch.int64, device=dev)
    unfinished = torch.ones(B, dtype=torch.bool, device=dev)
    t = 1
    while t < 1 + max_new_tokens:
        logits = stepper.logits(seqs[:, :t])
        logits = process_scores(logits, seqs[:, :t], input_ids, encoder_repetition_penalty, no_repeat_ngram_size)
        nxt = logits.max(-1).indices  # argmax (first maximum), faster on CPU
        if eos:
            nxt = torch.where(unfinished, nxt, pad)
        seqs[:, t] = nxt
        t += 1
        if eos:
            unfinished &= ~torch.isin(nxt, eos_t)
            if not bool(unfinished.any()):
                break
    return seqs[:, :t]


def beam_search(
    model,
    input_ids,
    attention_mask,
    *,
    max_new_tokens,
    num_beams,
    length_penalty=1.0,
    early_stopping=False,
    num_return_sequences=1,
    eos,
    pad,
    start,
    no_repeat_ngram_size=0,
    encoder_repetition_penalty=1.0,
    use_cache=True,
):
    """Beam search (see the module docstring). Returns (B · num_return_sequences, 1 + T) int64."""
    B, K = input_ids.shape[0], num_beams
    dev = input_ids.device
    max_length = 1 + max_new_tokens
    fill = pad if pad else (eos[0] if eos else -1)
    enc = model.encode(input_ids, attention_mask)
    stepper = _Stepper(model, enc, attention_mask, K, max_new_tokens, use_cache)
    n_keep = max(2, 1 + len(eos)) * K
    is_top = torch.zeros(n_keep, dtype=torch.bool, device=dev)
    is_top[:K] = True
    eos_t = torch.tensor(eos, dtype=torch.int64, device=dev)
    rows = torch.arange(B, device=dev)[:, None] * K  # flat row of beam 0 of each input

    run_seq = torch.full((B, K, max_length), fill, dtype=torch.int64, device=dev)
    run_seq[:, :, 0] = start
    run_score = torch.zeros(B, K, dtype=torch.float32, device=dev)
    run_score[:, 1:] = _NEG  # all beams equal: expand beam 0 only
    fin_seq = run_seq.clone()
    fin_score = torch.full((B, K), _NEG, dtype=torch.float32, device=dev)
    fin_len = torch.zeros(B, K, dtype=torch.int64, device=dev)  # generated tokens of each hypothesis
    is_fin = torch.zeros(B, K, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)

    cur = 1
    while True:
        so_far = run_seq.view(B * K, max_length)[:, :cur]
        logp = F.log_softmax(stepper.logits(so_far), dim=-1)
        logp = process_scores(logp, so_far, input_ids, encoder_repetition_penalty, no_repeat_ngram_size)
        V = logp.shape[-1]
        total = (logp.view(B, K, V) + run_score[:, :, None]).view(B, K * V)
        # (1) the best n_keep continuations over all beams of each input
        top_lp, top_idx = torch.topk(total, n_keep)
        src = top_idx // V  # (B, n_keep) beam each one extends
        tok = top_idx % V
        top_seq = run_seq.gather(1, src[:, :, None].expand(B, n_keep, max_length))
        top_seq[:, :, cur] = tok
        ends = torch.isin(tok, eos_t) if eos else torch.zeros_like(tok, dtype=torch.bool)
        if cur + 1 >= max_length:
            ends = torch.ones_like(ends)
        # (2) the best K that go on become the running beams
        alive_lp = top_lp + ends.to(torch.float32) * _NEG
        keep = torch.topk(alive_lp, K).indices
        run_seq = top_seq.gather(1, keep[:, :, None].expand(B, K, max_length))
        run_score = alive_lp.gather(1, keep)
        parent = src.gather(1, keep)
        # (3) the ones that ended among the first K compete with the finished hypotheses
        gen_len = cur + 1 - 1
        cand = top_lp / (gen_len**length_penalty)
        full = is_fin.all(-1, keepdim=True) & (early_stopping is True)
        cand += full.to(torch.float32) * _NEG
        cand += (~improvable).to(torch.float32) * _NEG
        just = ends & is_top[None, :]
        cand += (~just) * _NEG
        best = torch.topk(torch.cat([fin_score, cand], 1), K).indices
        fin_seq = torch.cat([fin_seq, top_seq], 1).gather(1, best[:, :, None].expand(B, K, max_length))
        fin_score = torch.cat([fin_score, cand], 1).gather(1, best)
        fin_len = torch.cat([fin_len, torch.full_like(tok, gen_len)], 1).gather(1, best)
        is_fin = torch.cat([is_fin, just], 1).gather(1, best)
        # (4) the cache follows the running beams
        stepper.reorder((parent + rows).view(-1))
        cur += 1
        # (5) stop when no input can improve, all are full (early_stopping=True) or nothing can go on
        hyp_len = (max_length - 1) if (early_stopping == "never" and length_penalty > 0.0) else (cur - 1)
        best_running = run_score[:, :1] / (hyp_len**length_penalty)
        worst_fin = torch.where(is_fin, fin_score.min(1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_fin).any(-1, keepdim=True)
        go_on = bool(improvable.any()) and not (bool(is_fin.all()) and early_stopping is True) and not bool(ends.all())
        if not go_on:
            break
    R = num_return_sequences
    out = fin_seq[:, :R].reshape(B * R, max_length)
    length = 1 + int(fin_len[:, :R].max())
    return out[:, :length]
