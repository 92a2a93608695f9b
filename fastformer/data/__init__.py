"""data layer: the built-in corpus, tokenizer training, MLM and span-corruption collators, packing and
TSV reading; no model and no training here (layers: docs/design.md)."""
