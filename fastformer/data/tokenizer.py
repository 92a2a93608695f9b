"""WordPiece tokenizer (BERT-style) trained on the corpus with Hugging Face `tokenizers`.

Special tokens and their fixed ids: [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.
Saved and loaded as a single `tokenizer.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PAD, UNK, CLS, SEP, MASK = range(len(SPECIAL_TOKENS))


def train_wordpiece(texts: Sequence[str], vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    """A lower-casing WordPiece tokenizer with BERT's normaliser and pre-tokeniser."""
    if vocab_size < len(SPECIAL_TOKENS) + 32:
        raise ValueError(f"--vocab-size {vocab_size} is too small (need at least {len(SPECIAL_TOKENS) + 32})")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, clean_text=True, handle_chinese_chars=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    # The trainer numbers the "##c" continuation symbols in hash-map order (random on every run) and
    # breaks ties between equally frequent merges by symbol id, so the learned vocabulary itself
    # changed from run to run. Handing it every "##c" up front, as extra special tokens in sorted
    # order, fixes their ids and so makes the merges (and the vocabulary) reproducible. (The trainer
    # puts each of them in the vocabulary anyway, so vocab_size means what it did.)
    seeds = _continuation_symbols(tok, texts)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS + seeds, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    # Renumber canonically so the same vocabulary always gets the same ids (specials first, then
    # words, then ##-pieces, sorted), in a fresh Tokenizer so the seeds are not left as added tokens.
    vocab = tok.get_vocab()
    rest = sorted((t for t in vocab if t not in SPECIAL_TOKENS), key=lambda t: (t.startswith("##"), t))
    fresh = Tokenizer(
        models.WordPiece(
            {t: i for i, t in enumerate(SPECIAL_TOKENS + rest)}, unk_token="[UNK]", max_input_chars_per_word=100
        )
    )
    fresh.normalizer, fresh.pre_tokenizer, fresh.decoder = tok.normalizer, tok.pre_tokenizer, tok.decoder
    fresh.add_special_tokens(SPECIAL_TOKENS)
    tok = fresh
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, "special tokens must have ids 0..4"
    return tok


def _continuation_symbols(tok: Tokenizer, texts: Sequence[str]) -> list[str]:
    """Sorted "##c" for every character c that occurs inside a pre-tokenised word (not first)."""
    chars: set[str] = set()
    for text in texts:
        for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)):
            chars.update(word[1:])
    return ["##" + c for c in sorted(chars)]


def special_ids(tok: Tokenizer) -> list[int]:
    """Ids of every special token of `tok` (added tokens flagged special)."""
    return sorted(i for i, t in tok.get_added_tokens_decoder().items() if t.special)


def tokenizer_from_json(text: str, source: str) -> Tokenizer:
    """A tokenizer from its JSON text; a file that is not one raises DataError naming `source`."""
    from .corpus import DataError

    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise DataError(
            f"{source}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None


def load_tokenizer(path: str | Path) -> Tokenizer:
    return tokenizer_from_json(Path(path).read_text(), str(path))


def check_wordpiece_specials(tok: Tokenizer, source: str) -> None:
    """The MLM objective's fixed special ids ([PAD]=0 ... [MASK]=4): another tokenizer (e.g. a span
    run's Unigram one) would train silently on wrong ids."""
    from .corpus import DataError

    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise DataError(
                f"{source}: not a WordPiece tokenizer of the mlm objective ({name} should have id {i}, "
                f"has {tok.token_to_id(name)})"
            )


def encode_texts(tok: Tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids (no special tokens added) of each text; batched in Rust."""
    return [e.ids for e in tok.encode_batch(list(texts), add_special_tokens=False)]
