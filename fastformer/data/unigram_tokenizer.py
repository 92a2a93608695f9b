"""Unigram (SentencePiece-style) tokenizer for the T5 path, trained with Hugging Face `tokenizers`.

    tok = train_unigram(texts, vocab_size=8000)
    tok.save("tokenizer.json"); tok = load_unigram("tokenizer.json")

T5's conventions: <pad>=0, </s>=1 (EOS), <unk>=2, then the learned pieces, then 100 sentinel tokens
<extra_id_99> ... <extra_id_0> at the end of the vocabulary (so <extra_id_0> has the highest id, as
in T5's released vocabularies). Text is NFKC-normalised, every run of whitespace (newlines included)
becomes one space, as T5's SentencePiece normaliser does, and words carry the SentencePiece "▁"
prefix, so decoding restores the spaces (not the newlines).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from .corpus import DataError

PAD_TOKEN, EOS_TOKEN, UNK_TOKEN = "<pad>", "</s>", "<unk>"
PAD, EOS, UNK = 0, 1, 2
NUM_SENTINELS = 100


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def train_unigram(texts: Sequence[str], vocab_size: int = 8000, *, num_sentinels: int = NUM_SENTINELS) -> Tokenizer:
    """Train on `texts`; the final vocabulary has at most `vocab_size` entries, sentinels included
    (a small corpus may yield fewer learned pieces)."""
    if vocab_size < num_sentinels + 3 + 32:
        raise ValueError(f"--vocab-size {vocab_size} is too small (need at least {num_sentinels + 3 + 32})")
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size - num_sentinels,
        special_tokens=[PAD_TOKEN, EOS_TOKEN, UNK_TOKEN],
        unk_token=UNK_TOKEN,
        show_progress=False,
    )
    try:
        tok.train_from_iterator(list(texts), trainer=trainer, length=len(texts))
    except Exception as e:  # tokenizers raises a bare Exception
        if "not large enough to contain all chars" not in str(e):
            raise
        raise _too_small(vocab_size, _distinct_chars(tok, texts), num_sentinels) from None
    # just above the characters the trainer does not fail but overshoots its target (it keeps every
    # character and the special tokens, then adds pieces): a vocabulary larger than asked is refused too
    if tok.get_vocab_size() + num_sentinels > vocab_size:
        raise _too_small(vocab_size, _distinct_chars(tok, texts), num_sentinels)
    tok.model = _canonical_model(tok)
    tok.add_special_tokens([sentinel_token(i) for i in reversed(range(num_sentinels))])
    for name, i in ((PAD_TOKEN, PAD), (EOS_TOKEN, EOS), (UNK_TOKEN, UNK)):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"{name} must have id {i}, got {tok.token_to_id(name)}")
    return tok


def _too_small(vocab_size: int, chars: int, num_sentinels: int) -> DataError:
    """The error for a --vocab-size below what the text needs: its characters, the 3 special tokens, one
    learned piece (with none to spare the trainer overshoots its target) and the sentinels."""
    return DataError(
        f"--vocab-size {vocab_size} is too small for this text: it has {chars:,} distinct characters (after "
        f"NFKC normalisation), each of which the Unigram tokenizer keeps as a piece, besides its 3 special "
        f"tokens and the {num_sentinels} sentinels; use --vocab-size {chars + 4 + num_sentinels} or more"
    )


def _distinct_chars(tok: Tokenizer, texts: Sequence[str]) -> int:
    """The characters the Unigram trainer must keep: those of the normalised texts, the word prefix ▁
    in place of the space."""
    chars = {"▁"}
    for t in texts:
        chars.update(tok.normalizer.normalize_str(t))
    chars.discard(" ")
    return len(chars)


def _canonical_model(tok: Tokenizer) -> models.Unigram:
    """The trained Unigram model with reproducible ids and scores.

    The trainer is not deterministic (hash-map iteration order inside `tokenizers`): two runs on the
    same text learn the same pieces but in a different order and with log-probabilities differing in
    the 4th decimal. Pieces are therefore re-numbered in sorted order (special tokens keep ids 0-2)
    and scores rounded to 2 decimals, so a re-run gives the same tokenizer.json in all but rare near-ties."""
    vocab = json.loads(tok.to_str())["model"]["vocab"]  # [[piece, score], ...]
    specials = [PAD_TOKEN, EOS_TOKEN, UNK_TOKEN]
    head = [(p, 0.0) for p in specials]
    pieces = sorted((p, round(float(sc), 2)) for p, sc in vocab if p not in specials)
    return models.Unigram(head + pieces, unk_id=UNK, byte_fallback=False)


def sentinel_ids(tok: Tokenizer, n: int | None = None) -> list[int]:
    """Ids of <extra_id_0>, <extra_id_1>, ... (all of them, or the first n). Raises if one is missing."""
    out = []
    i = 0
    while n is None or i < n:
        t = tok.token_to_id(sentinel_token(i))
        if t is None:
            if n is None and i > 0:
                break
            raise ValueError(f"tokenizer has no sentinel token {sentinel_token(i)}")
        out.append(t)
        i += 1
    return out


def encode(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added (batched in Rust)."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]


def load_unigram(path: str | Path) -> Tokenizer:
    return Tokenizer.from_file(str(path))
