"""Model presets: name -> (family, config kwargs).

BERT sizes are the published ones (Turc et al. 2019 for tiny/mini/small, Devlin et al. 2019 for base):

    bert-tiny   2 layers, hidden 128, 2 heads,  FFN 512
    bert-mini   4 layers, hidden 256, 4 heads,  FFN 1024
    bert-small  4 layers, hidden 512, 8 heads,  FFN 2048
    bert-base  12 layers, hidden 768, 12 heads, FFN 3072

`t5-*` names are resolved lazily from `fastformer.models.t5.T5_PRESETS` (a dict name -> config kwargs,
owned by the encoder-decoder module), so this file never imports the T5 model.
"""
from __future__ import annotations

import importlib

BERT_PRESETS: dict[str, dict] = {
    "bert-tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
    "bert-mini": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
    "bert-small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
    "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
}

# Family -> (module, attribute) holding that family's presets, imported on first use.
_FAMILIES = {
    "bert": ("fastformer.models.presets", "BERT_PRESETS"),
    "t5": ("fastformer.models.t5", "T5_PRESETS"),
}


class UnknownPresetError(ValueError):
    """Raised for a preset name that no family knows."""


def preset_family(name: str) -> str:
    """'bert-base' -> 'bert', 't5-small' -> 't5'. Raises UnknownPresetError for other prefixes."""
    family = name.split("-", 1)[0].lower()
    if family not in _FAMILIES:
        raise UnknownPresetError(f"unknown model preset {name!r} (choose from {', '.join(known_presets())})")
    return family


def _family_presets(family: str) -> dict[str, dict]:
    module, attr = _FAMILIES[family]
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise UnknownPresetError(f"{family}-* presets are not available in this installation ({e})") from None


def get_preset(name: str) -> dict:
    """Config kwargs of preset `name` (a copy); the family is `preset_family(name)`."""
    family = preset_family(name)
    presets = _family_presets(family)
    if name not in presets:
        raise UnknownPresetError(f"unknown model preset {name!r} (choose from {', '.join(known_presets())})")
    return dict(presets[name])


def known_presets() -> list[str]:
    """Every preset name whose family module is importable."""
    names = []
    for family in _FAMILIES:
        try:
            names += list(_family_presets(family))
        except UnknownPresetError:
            pass
    return names
