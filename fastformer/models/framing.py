"""How fastformer frames a text for each model family, as a tokenizer post-processor.

Training encodes a text as `[CLS] text [SEP]` for a BERT model and as `text </s>` for a T5 model
(encoder inputs end with EOS). `framed_tokenizer` returns a copy of a `tokenizers.Tokenizer` whose
`encode(text)` gives exactly those ids (`add_special_tokens=False` still gives the bare tokens), so a
user's `tokenizer.encode(text).ids` feeds the model what it was trained on. `fastformer export` uses the
same framing for the Hugging Face tokenizer it writes.
"""

from __future__ import annotations

from typing import NamedTuple

from torch import nn

from .bert import BertEncoder, BertForMaskedLM, BertForSequenceClassification
from .t5 import T5EncoderForSequenceClassification, T5ForConditionalGeneration, T5Stack


class Framing(NamedTuple):
    single: str  # TemplateProcessing template for one text
    pair: str  # ... for a pair of texts
    specials: tuple[str, ...]  # the special tokens the templates use


BERT_FRAMING = Framing("[CLS] $A [SEP]", "[CLS] $A [SEP] $B:1 [SEP]:1", ("[CLS]", "[SEP]"))
T5_FRAMING = Framing("$A </s>", "$A </s> $B </s>", ("</s>",))


def framing_of(model: nn.Module) -> Framing | None:
    """The framing training used for `model`, None for a model of another family."""
    if isinstance(model, (BertEncoder, BertForMaskedLM, BertForSequenceClassification)):
        return BERT_FRAMING
    if isinstance(model, (T5ForConditionalGeneration, T5EncoderForSequenceClassification, T5Stack)):
        return T5_FRAMING
    return None


def framed_tokenizer(tokenizer, framing: Framing):
    """A copy of `tokenizer` (a tokenizers.Tokenizer) whose encode() adds `framing`'s special tokens.

    Raises ValueError naming the special tokens the tokenizer lacks."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(tokenizer.to_str())
    missing = [t for t in framing.specials if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer: lacks the special token(s) {missing} that the model's inputs are framed with")
    tok.post_processor = processors.TemplateProcessing(
        single=framing.single, pair=framing.pair, special_tokens=[(t, tok.token_to_id(t)) for t in framing.specials]
    )
    return tok
