"""models layer: BERT-style encoder (bert.py), presets (presets.py); the T5-style model lives in t5.py.

`load(DIR)` rebuilds a trained run folder for inference (loading.py); `to_hf` / `save_hf` export to
Hugging Face transformers (convert.py)."""

from .bert import BertConfig, BertEncoder, BertForMaskedLM, BertForSequenceClassification
from .convert import from_hf, save_hf, to_hf
from .loading import ARCHITECTURES, LoadedModel, RunFolderError, load, register_architecture
from .presets import (
    BERT_PRESETS,
    DEPRECATED_PRESETS,
    DeprecatedPresetWarning,
    canonical_preset,
    get_preset,
    known_presets,
    preset_family,
)

__all__ = [
    "BertConfig",
    "BertEncoder",
    "BertForMaskedLM",
    "BertForSequenceClassification",
    "BERT_PRESETS",
    "DEPRECATED_PRESETS",
    "DeprecatedPresetWarning",
    "canonical_preset",
    "get_preset",
    "known_presets",
    "preset_family",
    "from_hf",
    "to_hf",
    "save_hf",
    "load",
    "LoadedModel",
    "RunFolderError",
    "ARCHITECTURES",
    "register_architecture",
]
