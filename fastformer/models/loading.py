"""Load a trained run folder for inference: `ff.models.load(DIR)`.

    model, tokenizer, labels = ff.models.load("runs/finetune")      # eval mode, on the CPU
    loaded = ff.models.load("runs/pretrain", device="cuda")
    loaded.kind        # "classifier" | "mlm" | "seq2seq"
    loaded.run_config  # the folder's config.json (normalised: always has run, architecture, kind)
    loaded(input_ids, attention_mask)  # the object is also the model itself (an nn.Module)

A run folder (written by `fastformer pretrain` or `fastformer finetune`) holds `config.json`,
`tokenizer.json` and `checkpoint.pt`. config.json names the model class (`architecture`) and its
constructor config (`model_config`); the class is looked up in `ARCHITECTURES`, a registry a new model
family joins with `register_architecture` (nothing here changes). Folders written before
config.json carried `architecture` are recognised from their other keys.

Checkpoints hold only tensors, numbers, strings and containers of those, so `torch.load(path)` with
torch's default `weights_only=True` reads them; `load_state_file` also reads older checkpoints that
stored numpy's random state as an array (numpy's array reconstruction is allowed, nothing else).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"
CHECKPOINT_NAME = "checkpoint.pt"


class RunFolderError(ValueError):
    """A folder that is not a (complete) fastformer run, or whose files cannot be read."""


# ---------------------------------------------------------------------------------------------------
# Architectures: class name in config.json -> (kind, builder)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """name: the class name recorded in config.json; kind: what the model does ("classifier", "mlm",
    "seq2seq", ...: `fastformer predict` picks its output by kind); build(model_config, num_labels)
    returns the module with freshly initialised weights."""

    name: str
    kind: str
    build: Callable[[dict, int | None], nn.Module]


ARCHITECTURES: dict[str, Architecture] = {}


def register_architecture(name: str, kind: str, build: Callable[[dict, int | None], nn.Module]) -> None:
    """Make `ff.models.load` (and so `fastformer predict` / `export`) know the model class `name`."""
    ARCHITECTURES[name] = Architecture(name, kind, build)


def _bert(cls_name: str):
    def build(cfg: dict, num_labels: int | None) -> nn.Module:
        from . import bert

        c = bert.BertConfig.from_dict(cfg)
        if cls_name == "BertForSequenceClassification":
            return bert.BertForSequenceClassification(c, _need_labels(num_labels, cls_name))
        return getattr(bert, cls_name)(c)

    return build


def _t5(cls_name: str):
    def build(cfg: dict, num_labels: int | None) -> nn.Module:
        from . import t5

        c = t5.T5Config.from_dict(cfg)
        if cls_name == "T5EncoderForSequenceClassification":
            return t5.T5EncoderForSequenceClassification(c, _need_labels(num_labels, cls_name))
        return getattr(t5, cls_name)(c)

    return build


def _need_labels(n: int | None, what: str) -> int:
    if not n:
        raise RunFolderError(f"{what}: config.json lists no labels")
    return n


register_architecture("BertForMaskedLM", "mlm", _bert("BertForMaskedLM"))
register_architecture("BertForSequenceClassification", "classifier", _bert("BertForSequenceClassification"))
register_architecture("T5ForConditionalGeneration", "seq2seq", _t5("T5ForConditionalGeneration"))
register_architecture("T5EncoderForSequenceClassification", "classifier", _t5("T5EncoderForSequenceClassification"))


def architecture_name(model: nn.Module) -> str:
    """The name config.json records for `model` (its class name; must be registered)."""
    name = type(model).__name__
    if name not in ARCHITECTURES:
        raise ValueError(f"{name} is not a registered architecture (known: {', '.join(ARCHITECTURES)})")
    return name


# ---------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------


def _legacy_numpy_globals() -> list:
    """What a checkpoint that pickled numpy's random state (a uint32 array) needs beyond torch's
    weights-only allowlist: numpy's array reconstruction, ndarray, dtype and the uint32 dtype."""
    import numpy as np

    try:
        reconstruct = np._core.multiarray._reconstruct
    except AttributeError:  # numpy < 2
        reconstruct = np.core.multiarray._reconstruct
    items = [reconstruct, np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):
        items.append(np.dtypes.UInt32DType)
    # a file pickled under numpy 1.x names the function by its old module path
    items.append((reconstruct, "numpy.core.multiarray._reconstruct"))
    return items


def load_state_file(path: str | Path, map_location: Any = "cpu") -> dict:
    """torch.load(path, weights_only=True); an older checkpoint holding numpy's random state is read
    with numpy's array types allowed as well. Raises RunFolderError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as first:  # noqa: BLE001 - any unpickling failure means the same thing to the user
        if "numpy" not in str(first):
            raise RunFolderError(
                f"{path}: cannot load checkpoint ({type(first).__name__}: "
                f"{str(first).splitlines()[0] if str(first) else ''})"
            ) from None
    try:
        with torch.serialization.safe_globals(_legacy_numpy_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise RunFolderError(
            f"{path}: cannot load checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise RunFolderError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise RunFolderError(f"{path}: cannot read ({e.strerror})") from None


def run_of(cfg: dict) -> str:
    """ "pretrain" or "finetune" for a run's config.json (inferred where it predates the `run` key: a
    fine-tuning config has labels, or a task other than its pre-training objective)."""
    if cfg.get("run") in ("pretrain", "finetune"):
        return cfg["run"]
    finetuned = "labels" in cfg or cfg.get("task", cfg.get("objective")) != cfg.get("objective")
    return "finetune" if finetuned else "pretrain"


def _legacy_architecture(cfg: dict, finetuned: bool) -> str | None:
    """The model class of a config.json without `architecture`: a classifier when it lists labels, else
    the model its objective pre-trains (a text-to-text fine-tuning keeps the encoder-decoder)."""
    mc = cfg.get("model_config") or {}
    if finetuned and cfg.get("labels"):
        return (
            "BertForSequenceClassification"
            if "hidden_size" in mc
            else ("T5EncoderForSequenceClassification" if "d_model" in mc else None)
        )
    return {"mlm": "BertForMaskedLM", "span": "T5ForConditionalGeneration"}.get(cfg.get("objective"))


def read_run_config(path: str | Path) -> dict:
    """config.json of a run folder, normalised so that it always has `run` ("pretrain" | "finetune"),
    `architecture`, `kind`, `model_config`, `objective` and `labels` (None for a model without
    classes). Folders from earlier versions (a fine-tuning folder without config.json, a config.json
    without `architecture`) are recognised from eval.json and the checkpoint."""
    d = Path(path)
    if not d.is_dir():
        raise RunFolderError(f"{d}: no such folder" if not d.exists() else f"{d}: not a folder")
    cfg_path = d / CONFIG_NAME
    if cfg_path.is_file():
        cfg = _read_json(cfg_path)
        run = run_of(cfg)
    elif (d / "eval.json").is_file() and (d / CHECKPOINT_NAME).is_file():
        # a fine-tuning folder from before fine-tuning wrote config.json: its checkpoint's fingerprint
        # has the model config and the labels
        ev = _read_json(d / "eval.json")
        fp = load_state_file(d / CHECKPOINT_NAME).get("fingerprint", {})
        cfg = {
            "run": "finetune",
            "labels": ev.get("labels") or fp.get("labels"),
            "model_config": fp.get("model_config"),
            "source": ev.get("source"),
        }
        run = "finetune"
    else:
        raise RunFolderError(f"{d}: not a fastformer run folder (no {CONFIG_NAME})")
    cfg = dict(cfg, run=run)
    arch = cfg.get("architecture") or _legacy_architecture(cfg, run == "finetune")
    if arch not in ARCHITECTURES:
        raise RunFolderError(f"{cfg_path}: unknown model architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    cfg["architecture"] = arch
    cfg["kind"] = ARCHITECTURES[arch].kind
    if not cfg.get("objective"):
        cfg["objective"] = "span" if arch.startswith("T5") else "mlm"
    cfg.setdefault("labels", None)
    if not isinstance(cfg.get("model_config"), dict):
        raise RunFolderError(f"{cfg_path}: no model_config")
    return cfg


# ---------------------------------------------------------------------------------------------------
# The load API
# ---------------------------------------------------------------------------------------------------


class LoadedModel(nn.Module):
    """What `load` returns: the trained model, ready for inference, with what it needs around it.

    Use it as the model: it is an nn.Module (in eval mode) whose forward is the model's, and any other
    attribute it lacks is the model's (`generate`, `encoder`, ...). Or unpack it as
    `model, tokenizer, labels`. Attributes: model, the underlying nn.Module; tokenizer, a
    `tokenizers.Tokenizer` whose encode() frames a text as training did (models/framing.py); labels,
    class names in output order (a classifier) or None; kind, "classifier" | "mlm" | "seq2seq";
    run_config, the run's normalised config.json; path, the folder. (`config` is the model's, as for
    the model itself.)"""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        labels: list[str] | None,
        kind: str,
        run_config: dict,
        path: Path = Path("."),
    ):
        super().__init__()
        self.model = model
        self.tokenizer, self.labels, self.kind, self.run_config = tokenizer, labels, kind, run_config
        self.path = Path(path)
        self.train(model.training)

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (`model`)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("__"):
                raise
            return getattr(model, name)

    def __iter__(self):
        return iter((self.model, self.tokenizer, self.labels))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, path={str(self.path)!r}, labels={self.labels!r}"


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """Rebuild the model of a pretrain / finetune output folder with its trained weights.

    Returns a LoadedModel (unpacks as `model, tokenizer, labels`): the model in eval mode on `device`
    (in `dtype` when given), the folder's tokenizer and, for a classifier, its label names in the
    order of the logits. Raises RunFolderError (a ValueError) naming the folder and what is missing."""
    from tokenizers import Tokenizer

    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device {device!r}: not a device ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: no CUDA GPU is available (load on 'cpu')")
    d = Path(path)
    cfg = read_run_config(d)
    for name in (TOKENIZER_NAME, CHECKPOINT_NAME):
        if not (d / name).is_file():
            raise RunFolderError(f"{d}: no {name} (an unfinished or damaged run folder)")
    try:
        tok = Tokenizer.from_file(str(d / TOKENIZER_NAME))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
        raise RunFolderError(
            f"{d / TOKENIZER_NAME}: not a tokenizer.json ({str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    labels = cfg.get("labels")
    arch = ARCHITECTURES[cfg["architecture"]]
    try:
        model = arch.build(cfg["model_config"], len(labels) if labels else None)
    except (TypeError, ValueError) as e:
        raise RunFolderError(f"{d / CONFIG_NAME}: model_config does not build a {arch.name} ({e})") from None
    state = load_state_file(d / CHECKPOINT_NAME)
    weights = state.get("model", state)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise RunFolderError(
            f"{d / CHECKPOINT_NAME}: weights do not fit {arch.name} ({str(e).splitlines()[0]})"
        ) from None
    model.to(device=device, dtype=dtype).eval()
    from .framing import framed_tokenizer, framing_of

    framing = framing_of(model)
    if framing is not None:
        try:
            tok = framed_tokenizer(tok, framing)  # encode(text) frames the text as training did
        except ValueError:
            pass  # a tokenizer without the family's special tokens: bare encode(), as it was saved
    return LoadedModel(model, tok, list(labels) if labels else None, arch.kind, cfg, d)
