"""Preset names: `t5-v1_1-small` / `t5-v1_1-base` name the T5 v1.1 shapes; the older `t5-small` / `t5-base`
still work everywhere (API, CLI, old run folders, --resume) with a DeprecatedPresetWarning where a user
types them, silently where an older run recorded them."""

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

import fastformer as ff
from fastformer.cli import main
from fastformer.models.presets import (
    DEPRECATED_PRESETS,
    DeprecatedPresetWarning,
    UnknownPresetError,
    canonical_preset,
    get_preset,
    known_presets,
    preset_family,
)
from fastformer.models.t5 import T5_PRESETS, T5Config

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice")

OLD_NEW = [("t5-small", "t5-v1_1-small"), ("t5-base", "t5-v1_1-base")]


@pytest.mark.parametrize("old,new", OLD_NEW)
def test_deprecated_name_resolves_to_its_preset_with_a_warning_at_the_callers_line(old, new):
    assert DEPRECATED_PRESETS[old] == new
    with pytest.warns(DeprecatedPresetWarning, match=f"'{old}' is deprecated.*not Hugging Face's.*'{new}'") as rec:
        kwargs = get_preset(old)
    assert kwargs == get_preset(new) == T5_PRESETS[new]
    assert rec[0].filename == __file__  # the user's line, not a line inside fastformer
    assert issubclass(DeprecatedPresetWarning, FutureWarning)  # shown to end users by default
    with pytest.warns(DeprecatedPresetWarning):
        assert T5Config.from_preset(old, vocab_size=99) == T5Config.from_preset(new, vocab_size=99)
    with pytest.warns(DeprecatedPresetWarning):
        assert T5_PRESETS[old] == T5_PRESETS[new]  # the table itself, indexed by the old name
    with pytest.warns(DeprecatedPresetWarning):
        assert T5_PRESETS.get(old) == T5_PRESETS[new] and T5_PRESETS.get("t5-huge") is None
    with pytest.warns(DeprecatedPresetWarning):
        assert canonical_preset(old) == new
    assert preset_family(old) == preset_family(new) == "t5"


def test_current_names_resolve_silently_and_are_the_only_ones_listed():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in known_presets():
            assert canonical_preset(name) == name and get_preset(name)
        assert canonical_preset("t5-small", warn=False) == "t5-v1_1-small"  # a recorded name: no warning
        assert canonical_preset(None, warn=False) is None
    assert set(known_presets()) == {
        "bert-tiny",
        "bert-mini",
        "bert-small",
        "bert-base",
        "t5-tiny",
        "t5-mini",
        "t5-v1_1-small",
        "t5-v1_1-base",
    }
    assert not set(DEPRECATED_PRESETS) & set(known_presets()) and not set(DEPRECATED_PRESETS) & set(T5_PRESETS)
    for mod in (ff.models,):
        assert mod.canonical_preset is canonical_preset and mod.DeprecatedPresetWarning is DeprecatedPresetWarning
    with pytest.raises(KeyError):
        T5_PRESETS["t5-huge"]
    with pytest.raises(UnknownPresetError, match="t5-huge"):
        get_preset("t5-huge")
    with pytest.raises(ValueError, match="unknown T5 preset"):
        T5Config.from_preset("t5-huge")


def test_cli_prints_the_warning_as_one_line_and_lists_current_names():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    r = subprocess.run(
        [sys.executable, "-m", "fastformer", "pretrain", "--objective", "mlm", "--model", "t5-small", "--steps", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 2, r.stderr
    assert (
        err[0].startswith("fastformer: warning: model preset 't5-small' is deprecated") and "'t5-v1_1-small'" in err[0]
    )
    assert "the mlm objective trains bert-* presets" in err[1]  # the new name in the error, the run refused
    from fastformer.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices
    for cmd in ("pretrain", "finetune"):
        flat = " ".join(sub[cmd].format_help().split())
        assert "t5-v1_1-small" in flat and "t5-v1_1-base" in flat and "t5-small" not in flat, cmd


def _make_old(out, old):
    """Rewrite run folder `out` as an older fastformer wrote it: its preset recorded as `old`."""
    cfg = json.loads((out / "config.json").read_text())
    new = cfg["model"]
    cfg["model"] = cfg["train"]["model"] = old
    if "source" in cfg:
        cfg["source"] = cfg["source"].replace(f"({new}", f"({old}")
    (out / "config.json").write_text(json.dumps(cfg))
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    fp = ck["fingerprint"]
    if "model" in fp:
        fp["model"] = old
    if "source" in fp:
        fp["source"] = fp["source"].replace(f"({new}", f"({old}")
    torch.save(ck, out / "checkpoint.pt")


SPAN = [
    "--objective",
    "span",
    "--batch-size",
    "4",
    "--seq-len",
    "32",
    "--vocab-size",
    "150",
    "--device",
    "cpu",
    "--no-progress",
]


def test_old_runs_recorded_under_a_deprecated_name_resume_and_load(tmp_path, monkeypatch, capsys):
    """A run folder whose config.json and checkpoint say 't5-old' (an alias of t5-tiny here, so the test
    trains a tiny model; the real aliases take the same path) resumes with the recorded name, the old
    name or the new one, feeds a fine-tuning, and loads."""
    monkeypatch.setitem(DEPRECATED_PRESETS, "t5-old", "t5-tiny")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"the {i} film was a story of {i % 7} actors and a plot . " * 3 for i in range(60)))
    pre = tmp_path / "pre"
    assert (
        main(["pretrain", "--data", str(corpus), *SPAN, "--model", "t5-tiny", "--steps", "2", "--out", str(pre)]) == 0
    )
    _make_old(pre, "t5-old")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecatedPresetWarning)  # a recorded name: no warning
        assert (
            main(["pretrain", "--data", str(corpus), "--out", str(pre), "--resume", "--steps", "3", "--no-progress"])
            == 0
        )
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(corpus),
                    "--out",
                    str(pre),
                    "--resume",
                    "--steps",
                    "4",
                    "--model",
                    "t5-tiny",
                    "--no-progress",
                ]
            )
            == 0
        )
    with pytest.warns(DeprecatedPresetWarning, match="'t5-old'"):  # typed by the user: warned
        assert (
            main(
                [
                    "pretrain",
                    "--data",
                    str(corpus),
                    "--out",
                    str(pre),
                    "--resume",
                    "--steps",
                    "5",
                    "--model",
                    "t5-old",
                    "--no-progress",
                ]
            )
            == 0
        )
    assert torch.load(pre / "checkpoint.pt", weights_only=True)["step"] == 5
    assert json.loads((pre / "config.json").read_text())["model"] == "t5-tiny"  # recorded as the current name
    loaded = ff.models.load(pre)
    assert loaded.kind == "seq2seq" and loaded.model.config.d_model == 128

    # fine-tuning from a random-init preset given by the old name, then resumed after "an upgrade"
    rows = "\n".join(f"the {i} film\t{'pos' if i % 2 else 'neg'}" for i in range(40))
    (tmp_path / "t.tsv").write_text(rows + "\n")
    ft = tmp_path / "ft"
    args = [
        "finetune",
        "--train",
        str(tmp_path / "t.tsv"),
        "--eval",
        str(tmp_path / "t.tsv"),
        "--batch-size",
        "8",
        "--vocab-size",
        "150",
        "--max-len",
        "16",
        "--device",
        "cpu",
        "--no-progress",
        "--out",
        str(ft),
    ]
    with pytest.warns(DeprecatedPresetWarning):
        assert main(args + ["--model", "t5-old", "--steps", "2"]) == 0
    assert json.loads((ft / "config.json").read_text())["source"] == "random init (t5-tiny)"
    _make_old(ft, "t5-old")
    assert main(["finetune", "--out", str(ft), "--resume", "--steps", "3", "--no-progress"]) == 0
    # fine-tuning from the old pre-training folder records its preset under the current name
    ft2 = tmp_path / "ft2"
    _make_old(pre, "t5-old")
    assert main(args[:-1] + [str(ft2), "--init", str(pre), "--steps", "1"]) == 0
    assert json.loads((ft2 / "config.json").read_text())["model"] == "t5-tiny"
    capsys.readouterr()


def test_finetune_lr_default_follows_the_task(monkeypatch):
    """No --lr: classify leaves it to FinetuneConfig (None: the model width's rule, resolved when the model
    is built), text2text uses Text2TextConfig's (5e-4); --help says both; an explicit --lr is used by
    either."""
    import fastformer.train.finetune as fin
    import fastformer.train.text2text as t2t
    from fastformer.cli import build_parser

    seen = {}
    monkeypatch.setattr(fin, "finetune", lambda cfg: seen.setdefault("classify", cfg) and {})
    monkeypatch.setattr(t2t, "finetune_text2text", lambda cfg: seen.setdefault("text2text", cfg) and {})
    monkeypatch.setattr("fastformer.cli._is_main", lambda: False)
    base = ["finetune", "--train", "a.tsv", "--eval", "b.tsv"]
    assert main(base) == 0 and main(base + ["--task", "text2text"]) == 0
    assert seen["classify"].lr is None and fin.FinetuneConfig.lr is None
    assert seen["text2text"].lr == 5e-4 == t2t.Text2TextConfig.lr
    seen.clear()
    assert main(base + ["--lr", "3e-3"]) == 0 and main(base + ["--task", "text2text", "--lr", "3e-3"]) == 0
    assert seen["classify"].lr == seen["text2text"].lr == 3e-3
    help_ = " ".join(build_parser()._subparsers._group_actions[0].choices["finetune"].format_help().split())
    assert "--lr LR peak learning rate (default: 1e-4 x 768 / the model's hidden size" in help_
    assert "0.0005 for --task text2text)" in help_
