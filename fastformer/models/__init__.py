"""models layer: BERT-style encoder (bert.py), presets (presets.py); the T5-style model lives in t5.py."""
from .bert import BertConfig, BertEncoder, BertForMaskedLM, BertForSequenceClassification
from .convert import from_hf, to_hf
from .presets import BERT_PRESETS, get_preset, known_presets, preset_family

__all__ = ["BertConfig", "BertEncoder", "BertForMaskedLM", "BertForSequenceClassification", "BERT_PRESETS",
           "get_preset", "known_presets", "preset_family", "from_hf", "to_hf"]
