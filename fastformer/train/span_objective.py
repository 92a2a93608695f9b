"""The span-corruption objective (T5-style): Unigram tokenizer with sentinels, packed raw chunks whose
corrupted inputs are exactly `seq_len` long, T5 v1.1 encoder-decoder; fine-tuning = encoder + head.

Registered as "span" in `fastformer.train.objectives.OBJECTIVES`; the trainer calls the methods of
the `Objective` interface documented there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastformer.data.span_corruption import (
    SpanCorruptionCollator,
    max_inputs_length,
    noise_counts,
    span_corruption_lengths,
)
from fastformer.data.unigram_tokenizer import EOS, PAD, encode, sentinel_ids, train_unigram
from fastformer.models.presets import canonical_preset
from fastformer.models.t5 import T5_PRESETS, T5Config, T5EncoderForSequenceClassification, T5ForConditionalGeneration

from .objectives import Objective


def check_seq_len(tokenizer, seq_len: int) -> None:
    """Refuse a --seq-len whose examples need more sentinels than the tokenizer has (one per noise
    span: 100 sentinels allow at most 1809), before any example is made or file written; the collator
    would otherwise fail at the first batch."""
    n_sentinels = len(sentinel_ids(tokenizer))
    longest = max_inputs_length(n_sentinels)
    if seq_len > longest:
        spans = noise_counts(span_corruption_lengths(seq_len)[0])[1]
        raise ValueError(
            f"--seq-len {seq_len} is too long for the span objective: an example of that length has {spans} "
            f"noise spans, one sentinel token each, and the tokenizer has {n_sentinels} sentinels; "
            f"the longest --seq-len they allow is {longest}"
        )


class SpanObjective(Objective):
    name = "span"
    accuracy_name = "token accuracy"  # target tokens (sentinels + span tokens + EOS), teacher-forced
    family = "t5"
    default_model = "t5-tiny"

    # -- data -------------------------------------------------------------------------------------
    def build_tokenizer(self, texts: Sequence[str], vocab_size: int):
        return train_unigram(texts, vocab_size)

    def check_tokenizer(self, tokenizer, source):
        """The collator needs the sentinels <extra_id_0>, ...: another tokenizer (an mlm run's WordPiece
        one) is refused naming where it came from (`source`: "--tokenizer PATH", a folder's file)."""
        from fastformer.data.corpus import DataError

        try:
            sentinel_ids(tokenizer)
        except ValueError as e:
            raise DataError(
                f"{source}: {e}: not a tokenizer of the span objective (a Unigram tokenizer with sentinels, "
                "as a span run writes)"
            ) from None

    def check_seq_len(self, tokenizer, seq_len: int) -> None:
        check_seq_len(tokenizer, seq_len)

    def make_examples(self, texts, tokenizer, seq_len, *, packing: bool = True) -> list[torch.Tensor]:
        """Raw token chunks (no EOS). packing=True: the concatenated stream cut into chunks of the raw
        length whose corrupted input is exactly seq_len (T5's recipe; 512 -> 568 raw tokens);
        packing=False: one chunk per non-empty line, truncated to that length."""
        if seq_len < 8:
            raise ValueError(f"--seq-len must be at least 8, got {seq_len}")
        check_seq_len(tokenizer, seq_len)
        raw, _ = span_corruption_lengths(seq_len)
        if packing:
            stream = torch.tensor([t for ids in encode(tokenizer, texts) for t in ids], dtype=torch.int64)
            n_full = stream.numel() // raw
            chunks = list(stream[: n_full * raw].view(n_full, raw).unbind(0)) if n_full else []
            if not chunks and stream.numel() >= 2:  # a corpus shorter than one chunk
                chunks = [stream]
            return [c.clone() for c in chunks]
        lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip()]
        return [torch.tensor(ids[:raw], dtype=torch.int64) for ids in encode(tokenizer, lines) if ids]

    def make_collator(self, tokenizer, seq_len):
        check_seq_len(tokenizer, seq_len)
        return SpanCorruptionCollator(sentinel_ids(tokenizer), pad_id=PAD, eos_id=EOS, pad_to_multiple_of=8)

    # -- model ------------------------------------------------------------------------------------
    def build_model(self, preset, tokenizer, *, seq_len) -> nn.Module:
        preset = canonical_preset(preset)
        if preset not in T5_PRESETS:
            raise ValueError(f"--model {preset}: the span objective trains t5-* presets ({', '.join(T5_PRESETS)})")
        cfg = T5Config.from_preset(
            preset,
            vocab_size=tokenizer.get_vocab_size(),
            pad_token_id=PAD,
            eos_token_id=EOS,
            decoder_start_token_id=PAD,
        )
        return T5ForConditionalGeneration(cfg)

    def model_config(self, model) -> dict:
        return model.config.to_dict()

    def step(self, model, batch, *, train=True):
        out = model(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch.get("decoder_input_ids"),
            batch["labels"],
            return_logits=not train,
        )
        metrics = {}
        if not train:
            valid = batch["labels"] != -100
            metrics["correct"] = int(((out.logits.argmax(-1) == batch["labels"]) & valid).sum())
        return out.loss_sum, out.n_predicted, metrics

    def input_tokens(self, batch) -> int:
        mask = batch.get("attention_mask")
        return int(mask.sum()) if mask is not None else batch["input_ids"].numel()

    def flops_per_token(self, model, seq_len) -> float:
        """Training FLOPs per input token: 6 × encoder parameters, plus 6 × (decoder + LM head) for
        each target token (targets ≈ 0.22 × inputs), plus the attention score/value matmuls."""
        cfg = model.config
        raw, tgt = span_corruption_lengths(seq_len)
        r = tgt / seq_len
        enc = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
        dec = sum(p.numel() for n, p in model.named_parameters() if n.startswith("decoder."))
        head = cfg.d_model * cfg.vocab_size
        inner = cfg.num_heads * cfg.d_kv
        attn = 12.0 * inner * (cfg.num_layers * seq_len + r * cfg.num_decoder_layers * (tgt + seq_len))
        return 6.0 * enc + 6.0 * r * (dec + head) + attn

    def memory_shape(self, seq_len):
        target = span_corruption_lengths(seq_len)[1]
        return target, float(target)

    # -- fine-tuning ------------------------------------------------------------------------------
    def encode_for_classification(self, tokenizer, texts, max_len) -> list[torch.Tensor]:
        """text tokens + </s>, at most max_len long (T5 encodes inputs with a final EOS)."""
        return [torch.tensor(ids[: max_len - 1] + [EOS], dtype=torch.int64) for ids in encode(tokenizer, texts)]

    def build_classifier(self, model_config, num_labels, pretrained_state=None) -> nn.Module:
        model = T5EncoderForSequenceClassification(T5Config.from_dict(model_config), num_labels)
        if pretrained_state is not None:
            model.load_pretrained(pretrained_state)
        return model
