"""The MLM objective (BERT-style): WordPiece tokenizer, [CLS] chunk [SEP] examples, 80/10/10 masking,
BertForMaskedLM with the sparse tied head; fine-tuning = BertForSequenceClassification."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastformer.data.mlm import MLMCollator
from fastformer.data.packing import pack_stream, wrap
from fastformer.data.tokenizer import CLS, MASK, PAD, SEP, encode_texts, special_ids, train_wordpiece
from fastformer.models.bert import BertConfig, BertForMaskedLM, BertForSequenceClassification
from fastformer.models.presets import get_preset, preset_family

from .objectives import Objective


class MLMObjective(Objective):
    name = "mlm"
    accuracy_name = "MLM accuracy"  # masked positions predicted correctly
    family = "bert"
    default_model = "bert-tiny"

    def build_tokenizer(self, texts: Sequence[str], vocab_size: int):
        return train_wordpiece(texts, vocab_size)

    def check_tokenizer(self, tokenizer, source):
        from fastformer.data.tokenizer import check_wordpiece_specials

        check_wordpiece_specials(tokenizer, source)

    def make_examples(self, texts, tokenizer, seq_len, *, packing: bool = True):
        if seq_len < 8:
            raise ValueError(f"--seq-len must be at least 8, got {seq_len}")
        if packing:
            docs = encode_texts(tokenizer, texts)
            chunks = pack_stream(docs, seq_len - 2, separator=SEP)
        else:
            lines = [ln.strip() for t in texts for ln in t.splitlines() if ln.strip()]
            chunks = [
                torch.tensor(ids[: seq_len - 2], dtype=torch.int64) for ids in encode_texts(tokenizer, lines) if ids
            ]
        return wrap(chunks, [CLS], [SEP])

    def make_collator(self, tokenizer, seq_len):
        return MLMCollator(
            vocab_size=tokenizer.get_vocab_size(),
            mask_id=MASK,
            pad_id=PAD,
            special_ids=special_ids(tokenizer),
            pad_to_multiple_of=8,
        )

    def build_model(self, preset, tokenizer, *, seq_len):
        if preset_family(preset) != self.family:
            raise ValueError(f"--model {preset}: the mlm objective trains bert-* presets")
        cfg = BertConfig.from_dict(
            {
                **get_preset(preset),
                "vocab_size": tokenizer.get_vocab_size(),
                # batches pad to a multiple of 8: the table covers the padded length too
                "max_position": max(512, -(-seq_len // 8) * 8),
                "pad_token_id": PAD,
            }
        )
        return BertForMaskedLM(cfg)

    def model_config(self, model):
        return model.config.to_dict()

    def step(self, model, batch, *, train=True):
        loss, n, logits, target = model(
            batch["input_ids"], batch.get("attention_mask"), batch["labels"], return_logits=not train
        )
        metrics = {}
        if not train:
            metrics["correct"] = int((logits.argmax(-1) == target).sum())
        return loss, n, metrics

    def flops_per_token(self, model, seq_len):
        # 6 * non-embedding parameters (the MLM head runs on ~15% of tokens: counted below) plus
        # attention scores/values: 12 * layers * hidden * seq_len per token (forward + backward).
        cfg = model.config
        emb = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
        body = sum(p.numel() for p in model.parameters()) - emb
        head = 0.15 * 6 * cfg.hidden_size * cfg.vocab_size
        return 6.0 * body + 12.0 * cfg.num_layers * cfg.hidden_size * seq_len + head

    def memory_shape(self, seq_len):
        return 0, 0.15 * seq_len  # the masked positions only reach the vocabulary projection

    def encode_for_classification(self, tokenizer, texts, max_len):
        ids = encode_texts(tokenizer, texts)
        return [torch.tensor([CLS] + x[: max_len - 2] + [SEP], dtype=torch.int64) for x in ids]

    def build_classifier(self, model_config, num_labels, pretrained_state=None):
        model = BertForSequenceClassification(BertConfig.from_dict(model_config), num_labels)
        if pretrained_state is not None:
            enc = {k[len("encoder.") :]: v for k, v in pretrained_state.items() if k.startswith("encoder.")}
            model.encoder.load_state_dict(enc)
        return model
