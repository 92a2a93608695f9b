"""Model presets: name -> (family, config kwargs).

BERT sizes are the published ones (Turc et al. 2019 for tiny/mini/small, Devlin et al. 2019 for base):

    bert-tiny   2 layers, hidden 128, 2 heads,  FFN 512
    bert-mini   4 layers, hidden 256, 4 heads,  FFN 1024
    bert-small  4 layers, hidden 512, 8 heads,  FFN 2048
    bert-base  12 layers, hidden 768, 12 heads, FFN 3072

T5 presets (`fastformer.models.t5.T5_PRESETS`, resolved lazily so this file never imports the T5 model)
all have the T5 v1.1 architecture: gated-GELU feed-forward, no biases, an untied LM head, RMS norm.

    t5-tiny         2 + 2 layers, d_model 128, 4 heads of 32, d_ff 256 (fastformer's own CPU size)
    t5-mini         4 + 4 layers, d_model 256, 4 heads of 64, d_ff 1024 (fastformer's own, bert-mini's shape)
    t5-v1_1-small   8 + 8 layers, d_model 512, 6 heads of 64, d_ff 1024 (google/t5-v1_1-small)
    t5-v1_1-base   12 + 12 layers, d_model 768, 12 heads of 64, d_ff 2048 (google/t5-v1_1-base)

Hugging Face's `t5-small` / `t5-base` are the original T5 (ReLU feed-forward, a head tied to the
embedding, other sizes): a different model. The names `t5-small` and `t5-base` are therefore deprecated
aliases of the v1.1 presets (`DEPRECATED_PRESETS`): they still resolve everywhere a preset is accepted,
with a `DeprecatedPresetWarning`, and a run recorded under them resumes and loads as before.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

# Old name -> the preset it names. Resolved with a warning where a user gives the name
# (`canonical_preset`), silently where an older run folder recorded it (`warn=False`).
DEPRECATED_PRESETS: dict[str, str] = {
    "t5-small": "t5-v1_1-small",
    "t5-base": "t5-v1_1-base",
}


class DeprecatedPresetWarning(FutureWarning):
    """A preset given by a deprecated name. A FutureWarning, not a DeprecationWarning: the names are
    typed by end users (`fastformer pretrain --model t5-small`), for whom Python hides DeprecationWarning,
    and the old name suggests a different model (Hugging Face's t5-small), which they need to know."""


class PresetTable(dict):
    """A family's presets, name -> config kwargs. Iterating lists the current names only; indexing with a
    deprecated name (`T5_PRESETS["t5-small"]`) still returns its preset, with a DeprecatedPresetWarning."""

    def __missing__(self, name):
        if isinstance(name, str) and DEPRECATED_PRESETS.get(name) in self:
            return self[canonical_preset(name)]
        raise KeyError(name)

    def get(self, name, default=None):
        return (
            self[name] if name in self or (isinstance(name, str) and DEPRECATED_PRESETS.get(name) in self) else default
        )


BERT_PRESETS: dict[str, dict] = PresetTable(
    {
        "bert-tiny": dict(num_layers=2, hidden_size=128, num_heads=2, intermediate_size=512),
        "bert-mini": dict(num_layers=4, hidden_size=256, num_heads=4, intermediate_size=1024),
        "bert-small": dict(num_layers=4, hidden_size=512, num_heads=8, intermediate_size=2048),
        "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),
    }
)

# Family -> (module, attribute) holding that family's presets, imported on first use.
_FAMILIES = {
    "bert": ("fastformer.models.presets", "BERT_PRESETS"),
    "t5": ("fastformer.models.t5", "T5_PRESETS"),
}


class UnknownPresetError(ValueError):
    """Raised for a preset name that no family knows."""


def _outside_fastformer() -> int:
    """The stacklevel of the first frame outside the fastformer package: the warning points at the
    user's line, however deep inside fastformer the name was resolved."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, frame = 2, sys._getframe(2)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(root + os.sep):
        level, frame = level + 1, frame.f_back
    return level


def canonical_preset(name: str, *, warn: bool = True) -> str:
    """The current name of preset `name`: itself, or for a deprecated alias the preset it names
    ('t5-small' -> 't5-v1_1-small', with a DeprecatedPresetWarning unless `warn` is False). Unknown
    names are returned unchanged (`get_preset` reports them)."""
    new = DEPRECATED_PRESETS.get(name) if isinstance(name, str) else None
    if new is None:
        return name
    if warn:
        warnings.warn(
            f"model preset {name!r} is deprecated: it is the T5 v1.1 shape (gated-GELU, untied head), "
            f"not Hugging Face's {name}; use {new!r}",
            DeprecatedPresetWarning,
            stacklevel=_outside_fastformer(),
        )
    return new


def preset_family(name: str) -> str:
    """'bert-base' -> 'bert', 't5-v1_1-small' -> 't5'. Raises UnknownPresetError for other prefixes."""
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
    """Config kwargs of preset `name` (a copy); the family is `preset_family(name)`. A deprecated name
    resolves to its preset with a DeprecatedPresetWarning."""
    name = canonical_preset(name)
    family = preset_family(name)
    presets = _family_presets(family)
    if name not in presets:
        raise UnknownPresetError(f"unknown model preset {name!r} (choose from {', '.join(known_presets())})")
    return dict(presets[name])


def known_presets() -> list[str]:
    """Every current preset name whose family module is importable (deprecated aliases: DEPRECATED_PRESETS)."""
    names = []
    for family in _FAMILIES:
        try:
            names += list(_family_presets(family))
        except UnknownPresetError:
            pass
    return names
