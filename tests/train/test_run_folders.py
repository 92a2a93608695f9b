"""Output folders that never lose work: --out protection, SIGINT / SIGTERM, OS errors, validation.

The interrupt tests drive the Trainer with a toy model whose batch function sends the signal to its
own process at a chosen step, so which path runs (finish the step and save / stop at once) is
deterministic; the CLI tests (tests/test_cli.py) send real signals to a `python -m fastformer` child.
"""

import errno
import json
import os
import signal
import time

import pytest
import torch
from torch import nn
from train_helpers import finetune_config, make_tsv, tiny_config, tiny_corpus  # noqa: F401 (fixture)

import fastformer as ff
from fastformer.data.corpus import DataError
from fastformer.data.tsv import read_tsv
from fastformer.train import checkpoint as ckpt_mod
from fastformer.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fastformer.train.finetune import finetune
from fastformer.train.metrics import read_metrics
from fastformer.train.pretrain import pretrain
from fastformer.train.run_dir import FastformerWarning, OutputError
from fastformer.train.trainer import TrainConfig, Trainer, TrainingInterrupted

pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice")


# ---------------------------------------------------------------------------------------------------
# --out
# ---------------------------------------------------------------------------------------------------


def test_out_folder_is_refused_unless_resume_or_overwrite(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=2, eval_every=0))
    before = (out / "checkpoint.pt").read_bytes()
    with pytest.raises(OutputError, match=r"already holds a pretrain run.*--resume.*--overwrite"):
        pretrain(tiny_config(out, tiny_corpus, steps=2, eval_every=0))
    assert (out / "checkpoint.pt").read_bytes() == before

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "mine.txt").write_text("keep me")
    with pytest.raises(OutputError, match=r"not empty.*no fastformer run.*--overwrite"):
        pretrain(tiny_config(notes, tiny_corpus, steps=1, eval_every=0))
    # --overwrite replaces the run's files (a stale eval.json goes too) and leaves other files alone
    (out / "eval.json").write_text("{}")
    pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0, overwrite=True))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1 and not (out / "eval.json").exists()
    pretrain(tiny_config(notes, tiny_corpus, steps=1, eval_every=0, overwrite=True))
    assert (notes / "mine.txt").read_text() == "keep me" and (notes / "checkpoint.pt").is_file()

    with pytest.raises(OutputError, match="--resume.*--overwrite"):
        pretrain(tiny_config(out, tiny_corpus, steps=2, resume=True, overwrite=True))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile: exists and is not a folder"):
        pretrain(tiny_config(tmp_path / "afile", tiny_corpus, steps=1))


def test_a_refused_overwrite_leaves_the_old_run_as_it_was(tmp_path, tiny_corpus):
    """--overwrite removes the old run's files only once the new run's input has been checked: a typo, a
    bad data file or a tokenizer taken from the old run itself must not destroy it."""
    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0))
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError):
        pretrain(tiny_config(out, tmp_path / "empty.txt", steps=1, eval_every=0, overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    # the old run's own tokenizer is read before its files go
    pretrain(
        tiny_config(out, tiny_corpus, steps=1, eval_every=0, overwrite=True, tokenizer=str(out / "tokenizer.json"))
    )
    assert (out / "tokenizer.json").read_bytes() == files["tokenizer.json"]

    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    ft = tmp_path / "ft"
    finetune(finetune_config(out, train, ev, out_dir=str(ft)))
    files = {p.name: p.read_bytes() for p in ft.iterdir()}
    (tmp_path / "nolabel.tsv").write_text("text\tlabel\nsome text without a label\n")
    with pytest.raises(DataError):
        finetune(finetune_config(out, tmp_path / "nolabel.tsv", ev, out_dir=str(ft), overwrite=True))
    assert {p.name: p.read_bytes() for p in ft.iterdir()} == files


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_with_overwrite(tmp_path, tiny_corpus):
    out = tmp_path / "run"
    pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0))
    (out / "checkpoint.pt").unlink()  # config.json and tokenizer.json, no step saved
    with pytest.raises(OutputError, match=r"stopped before its first checkpoint: add --overwrite"):
        pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0))
    with pytest.raises(ckpt_mod.CheckpointError, match=r"stopped before its first checkpoint.*--overwrite"):
        pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0, resume=True))
    pretrain(tiny_config(out, tiny_corpus, steps=1, eval_every=0, overwrite=True))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 1


def test_finetune_never_writes_into_a_pretraining_folder(tmp_path, tiny_corpus):
    pre = tmp_path / "pre"
    pretrain(tiny_config(pre, tiny_corpus, steps=1, eval_every=0))
    files = {p.name: p.read_bytes() for p in pre.iterdir()}
    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    for overwrite in (False, True):
        with pytest.raises(OutputError, match="pre-training run"):
            finetune(finetune_config(pre, train, ev, overwrite=overwrite))
    assert {p.name: p.read_bytes() for p in pre.iterdir()} == files


# ---------------------------------------------------------------------------------------------------
# interrupts (a toy model: the signal is sent from inside the batch function)
# ---------------------------------------------------------------------------------------------------


def _toy_trainer(out, *, steps=8, on_batch=None, resume=False, save_every=2):
    torch.manual_seed(0)
    model = nn.Linear(6, 3)

    def batch_fn(step, micro):
        if on_batch is not None:
            on_batch(step)
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(8, 6, generator=g), "y": torch.randint(0, 3, (8,), generator=g)}

    def step_fn(m, b, train):
        return ff.cross_entropy(m(b["x"]), b["y"], reduction="sum"), 8, {}

    cfg = TrainConfig(
        out_dir=str(out),
        steps=steps,
        optimizer="adamw",
        log_every=1,
        progress=False,
        save_every=save_every,
        resume=resume,
    )
    return Trainer(
        model,
        cfg,
        batch_fn=batch_fn,
        step_fn=step_fn,
        tokens_fn=lambda b: 8,
        fingerprint={"toy": 1},
        device=torch.device("cpu"),
    )


def _send(signum, times=1):
    for _ in range(times):
        os.kill(os.getpid(), signum)
        time.sleep(0.01)  # the Python handler runs before the next signal is sent


def test_sigterm_finishes_the_step_writes_the_checkpoint_and_resume_reports_the_whole_run(tmp_path):
    out = tmp_path / "toy"
    # the handlers in place before the run (SIG_IGN for SIGINT under nohup or a background shell)
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(TrainingInterrupted) as info:
        _toy_trainer(out, on_batch=lambda s: s == 3 and _send(signal.SIGTERM)).train()
    e = info.value
    assert e.saved and e.step == 3 and e.exit_code == 143 and "SIGTERM" in str(e)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)  # torch's default loader reads it
    assert ck["step"] == 3 and ck["progress"]["tokens"] == 3 * 8 and ck["progress"]["seconds"] > 0
    assert {s: signal.getsignal(s) for s in before} == before  # the run restored them
    res = _toy_trainer(out, resume=True).train()
    assert res.step == 8 and res.resumed_from == 3
    assert res.tokens == 8 * 8 and res.seconds > res.session_seconds  # the whole run, not this session
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))


def test_second_sigint_stops_at_once_with_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "toy"
    with pytest.raises(TrainingInterrupted) as info:
        _toy_trainer(out, on_batch=lambda s: s == 5 and _send(signal.SIGINT, times=2)).train()
    e = info.value
    assert not e.saved and e.step == 4 and e.exit_code == 130 and "intact" in str(e)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_second_sigint_during_the_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """The first Ctrl-C asks for a checkpoint; a second one arrives while it is being written."""
    out = tmp_path / "toy"
    real_save = torch.save

    def save_then_interrupt(obj, f, *a, **k):
        if obj.get("step") == 3:
            f.write(b"half a checkpoint")
            _send(signal.SIGINT)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", save_then_interrupt)
    with pytest.raises(TrainingInterrupted) as info:
        _toy_trainer(out, on_batch=lambda s: s == 3 and _send(signal.SIGINT)).train()
    assert not info.value.saved and info.value.step == 2
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no temp file left


# ---------------------------------------------------------------------------------------------------
# OS errors
# ---------------------------------------------------------------------------------------------------


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are used (torch.save gets this file)."""

    def __init__(self, f, room):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_full_disk_is_one_line_naming_out_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    out = tmp_path / "toy"
    trainer = _toy_trainer(out, steps=6, save_every=2)
    real_open = open
    calls = {"n": 0}

    def open_on_a_small_disk(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if ".checkpoint.pt.tmp" in str(path):
            calls["n"] += 1
            if calls["n"] == 2:  # the step-2 checkpoint fits, the step-4 one does not
                return _FullDisk(f, room=100)
        return f

    monkeypatch.setattr(ckpt_mod, "open", open_on_a_small_disk, raising=False)
    with pytest.raises(OutputError) as info:
        trainer.train()
    msg = str(info.value)
    assert msg.startswith(f"--out {out}: cannot write checkpoint.pt: no space left on the device")
    assert msg.endswith("the previous checkpoint (step 2) is intact") and "\n" not in msg
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]


def test_save_checkpoint_raises_the_os_error_not_torchs_wrapper(tmp_path, monkeypatch):
    real_open = open
    monkeypatch.setattr(
        ckpt_mod, "open", lambda p, m="r", *a, **k: _FullDisk(real_open(p, m, *a, **k), 10), raising=False
    )
    with pytest.raises(OSError) as info:
        save_checkpoint({"w": torch.zeros(1000)}, tmp_path / "checkpoint.pt")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(tmp_path / "checkpoint.pt")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out_is_named(tmp_path, tiny_corpus, monkeypatch):
    """Read-only or permission-denied --out (simulated: the tests may run as root)."""
    from pathlib import Path

    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if self.name == "ro":
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputError, match=r"^--out .*ro: cannot write: read-only file system$"):
        pretrain(tiny_config(tmp_path / "ro", tiny_corpus, steps=1))
    # a file the run writes atomically is named as itself, not as its temporary file
    real_write = Path.write_text

    def denied(self, *a, **k):
        if self.name.startswith(".config.json.tmp"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_write(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", denied)
    with pytest.raises(OutputError, match=r"^--out .*rw: cannot write config.json: permission denied$"):
        pretrain(tiny_config(tmp_path / "rw", tiny_corpus, steps=1))


# ---------------------------------------------------------------------------------------------------
# validation, fine-tuning folders, resume
# ---------------------------------------------------------------------------------------------------


def test_nonsense_settings_and_files_are_refused(tmp_path, tiny_corpus):
    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    with pytest.raises(ValueError, match="--max-len must be at least 8"):
        finetune(finetune_config(tmp_path / "a", train, ev, max_len=0))
    with pytest.raises(ValueError, match="--warmup-steps 50 is more than --steps 5"):
        pretrain(tiny_config(tmp_path / "b", tiny_corpus, steps=5, warmup_steps=50))
    empty = tmp_path / "empty_label.tsv"
    empty.write_text("sentence\tlabel\na fine film\tpos\na dull film\t\n")
    with pytest.raises(DataError, match="data row 2 has an empty label"):
        read_tsv(empty)
    binary = tmp_path / "data.tsv"
    binary.write_bytes(b"PK\x03\x04\x00\x00binary\tstuff\n" * 10)
    with pytest.raises(DataError, match="binary file"):
        read_tsv(binary)
    utf16 = tmp_path / "utf16.tsv"
    utf16.write_text("text\tlabel\nun bon film\tpos\n", encoding="utf-16")
    assert read_tsv(utf16) == (["un bon film"], ["pos"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_model_selection_survives_resume(tmp_path):
    """The selection (best held-out weights) is in the checkpoint: an interrupted and resumed run keeps
    the weights an uninterrupted one keeps, a finished run resumed keeps its record, and the finished
    checkpoint carries the last training weights for a resume with more --steps."""
    train, ev = make_tsv(tmp_path / "train.tsv", 60), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    kw = dict(steps=8, eval_every=1, val_fraction=0.3, lr=2e-2)
    full, part = tmp_path / "full", tmp_path / "part"
    finetune(finetune_config(full, train, ev, **kw))
    finetune(finetune_config(part, train, ev, stop_at=5, **kw))
    finetune(finetune_config(part, train, ev, resume=True, **kw))
    keys = ("selected_step", "val_accuracy", "accuracy", "eval_loss", "steps")
    first = json.loads((full / "eval.json").read_text())
    assert first["selected_step"] < 5  # chosen before the interruption: the resumed session must know it
    assert {k: first[k] for k in keys} == {k: json.loads((part / "eval.json").read_text())[k] for k in keys}
    a, b = load_checkpoint(full / "checkpoint.pt"), load_checkpoint(part / "checkpoint.pt")
    for key in ("model", "train_model"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key])
    assert a["selection"]["best_step"] == first["selected_step"]
    # the weights are stored once each: the selected ones as "model" (not again in the selection)
    assert a["selection"]["best_is_model"] and a["selection"]["best_state"] is None
    if first["selected_step"] < first["steps"]:  # the selected weights are not the last ones
        assert not all(torch.equal(a["model"][n], a["train_model"][n]) for n in a["model"])
    # resuming the finished run changes nothing: the same weights, the same record
    finetune(finetune_config(full, train, ev, resume=True, **kw))
    again = json.loads((full / "eval.json").read_text())
    assert {k: again[k] for k in keys} == {k: first[k] for k in keys}
    c = load_checkpoint(full / "checkpoint.pt")
    assert all(torch.equal(a["model"][n], c["model"][n]) for n in a["model"])


def test_finetune_folder_has_config_warns_on_a_tiny_eval_file_and_resumes_exactly(tmp_path):
    train, ev = make_tsv(tmp_path / "train.tsv", 48), make_tsv(tmp_path / "eval.tsv", 6, seed=1)
    full = tmp_path / "full"
    with pytest.warns(FastformerWarning, match="only 6 example"):
        finetune(finetune_config(full, train, ev))
    cfg = json.loads((full / "config.json").read_text())
    assert cfg["run"] == "finetune" and cfg["kind"] == "classifier" and cfg["labels"] == ["neg", "pos"]
    assert cfg["architecture"] == "BertForSequenceClassification" and cfg["threads"] >= 1
    part = tmp_path / "part"
    with pytest.warns(FastformerWarning):
        s = finetune(finetune_config(part, train, ev, stop_at=3))
    assert s["steps"] == 3
    with pytest.warns(FastformerWarning):
        s = finetune(finetune_config(part, train, ev, resume=True))
    keys = ("step", "loss", "lr", "eval_loss", "eval_accuracy")
    a = [{k: r.get(k) for k in keys} for r in read_metrics(full / "metrics.jsonl")]
    b = [{k: r.get(k) for k in keys} for r in read_metrics(part / "metrics.jsonl")]
    assert a == b and s["resumed_from"] == 3


def _equal_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_finetune_resume_from_init_reads_the_run_not_the_init_folder(tmp_path, tiny_corpus):
    """A resumed run from --init is the uninterrupted one even when the --init folder has changed
    (another tokenizer) or gone since: its tokenizer and model config come from the run's --out."""
    import shutil

    pre = tmp_path / "pre"
    pretrain(tiny_config(pre, tiny_corpus, steps=2, eval_every=0))
    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    full, part, init = tmp_path / "full", tmp_path / "part", tmp_path / "init"
    shutil.copytree(pre, init)
    kw = dict(model=None, vocab_size=None, val_fraction=0.0)
    finetune(finetune_config(full, train, ev, init=str(pre), **kw))
    finetune(finetune_config(part, train, ev, init=str(init), stop_at=3, **kw))
    tokenizer = (part / "tokenizer.json").read_text()
    # the init folder now holds another pre-training run (another tokenizer, same shapes)
    other = tmp_path / "other_corpus.txt"
    other.write_text("\n".join(f"zebra quokka {i} lorem ipsum dolor sit amet" for i in range(300)))
    pretrain(tiny_config(init, other, steps=2, eval_every=0, overwrite=True))
    assert (init / "tokenizer.json").read_text() != tokenizer
    finetune(finetune_config(part, train, ev, init=str(init), resume=True, **kw))
    assert (part / "tokenizer.json").read_text() == tokenizer
    assert _equal_weights(
        load_checkpoint(full / "checkpoint.pt")["model"], load_checkpoint(part / "checkpoint.pt")["model"]
    )
    shutil.rmtree(init)  # gone: a resume of the finished run still reads its own folder
    s = finetune(finetune_config(part, train, ev, init=str(init), resume=True, **kw))
    assert s["steps"] == 6
    with pytest.raises(CheckpointError, match=r"pooling='cls'; this command gives 'mean' \(--pooling\)"):
        finetune(finetune_config(part, train, ev, init=str(init), resume=True, pooling="mean", **kw))


def test_an_eval_only_label_does_not_change_the_head_or_training(tmp_path):
    """--eval never steers training: a label only the eval file has gets no head output (it once got
    one, which changed every step's softmax); its examples count as misses and stay out of the loss."""
    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    extra = tmp_path / "eval_extra.tsv"
    extra.write_text(ev.read_text() + "some neutral words here\tneutral\n")
    kw = dict(val_fraction=0.0, eval_every=2)
    a = finetune(finetune_config(tmp_path / "a", train, ev, **kw))
    with pytest.warns(FastformerWarning, match=r"\['neutral'\] never appear"):
        b = finetune(finetune_config(tmp_path / "b", train, extra, **kw))
    assert a["labels"] == b["labels"] == ["neg", "pos"]
    wa = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["model"]
    assert _equal_weights(wa, load_checkpoint(tmp_path / "b" / "checkpoint.pt")["model"])
    # the extra example is a miss; the loss is over the 24 examples the model has an output for
    assert b["accuracy"] == pytest.approx(a["accuracy"] * 24 / 25)
    assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-6)
    assert (a["n_eval_scored"], b["n_eval_scored"]) == (24, 24)
    # no eval row the model could score: no loss at all (not 0.0, which reads as perfect), anywhere
    only = tmp_path / "eval_only_unseen.tsv"
    only.write_text("".join(f"neutral words {i}\tneutral\n" for i in range(24)))
    with pytest.warns(FastformerWarning, match="never appear"):
        c = finetune(finetune_config(tmp_path / "c", train, only, **kw))
    assert (c["accuracy"], c["eval_loss"], c["n_eval_scored"]) == (0.0, None, 0)
    assert json.loads((tmp_path / "c" / "eval.json").read_text())["eval_loss"] is None
    # with model selection on: the final --eval evaluation took part in the selection (and crashed on
    # the missing loss); it is scored alone
    with pytest.warns(FastformerWarning, match="never appear"):
        d = finetune(finetune_config(tmp_path / "d", train, only, val_fraction=0.25, eval_every=2))
    assert (d["accuracy"], d["eval_loss"]) == (0.0, None) and d["selected_step"] >= 1


def test_the_default_learning_rate_is_the_number_a_user_would_type():
    """1e-4 * 768 / 128 is 0.0006000000000000001: repeating --lr 0.0006 on --resume was refused."""
    from fastformer import cli
    from fastformer.train.finetune import default_lr

    assert default_lr({"hidden_size": 128}) == 6e-4 and default_lr({"d_model": 256}) == 3e-4
    assert cli._norm("lr", 0.0006000000000000001) == cli._norm("lr", 0.0006)


def test_a_run_whose_head_had_an_eval_only_label_still_resumes(tmp_path, monkeypatch):
    """An older version gave an eval-only label a head output: such a run resumes with the classes its
    checkpoint has (its fingerprint's labels), and its folder stays loadable."""
    import fastformer.train.finetune as ft

    train, ev = make_tsv(tmp_path / "train.tsv", 40), make_tsv(tmp_path / "eval.tsv", 24, seed=1)
    extra = tmp_path / "eval_extra.tsv"
    extra.write_text(ev.read_text() + "some neutral words here\tneutral\n")
    part = tmp_path / "part"
    kw = dict(val_fraction=0.0)
    with monkeypatch.context() as m:  # the older classes: train and eval labels together
        real = ft.label_vocabulary
        m.setattr(ft, "label_vocabulary", lambda *labels: real(*labels, *([] if len(labels) > 1 else [["neutral"]])))
        finetune(finetune_config(part, train, extra, stop_at=3, **kw))
    assert json.loads((part / "config.json").read_text())["labels"] == ["neg", "neutral", "pos"]
    s = finetune(finetune_config(part, train, extra, resume=True, **kw))
    assert s["steps"] == 6 and s["labels"] == ["neg", "neutral", "pos"]
    assert ff.models.load(part).labels == ["neg", "neutral", "pos"]


def test_a_bert_seq_len_above_512_and_not_a_multiple_of_8_trains(tmp_path, tiny_corpus):
    """Batches pad to a multiple of 8: --seq-len 513 made a 513-position table and a 520-token batch,
    which failed at the first step after the run folder was written."""
    s = pretrain(tiny_config(tmp_path / "run", tiny_corpus, seq_len=513, steps=1, batch_size=1, eval_every=0))
    assert s["steps"] == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["model_config"]["max_position"] == 520


def test_overwrite_removes_the_temporary_files_a_killed_run_left(tmp_path):
    from fastformer.train.run_dir import make_out_dir

    for name in (".checkpoint.pt.tmp12", ".config.json.tmp34", ".tokenizer.json.tmp56", "notes.txt"):
        (tmp_path / name).write_text("x")
    make_out_dir(tmp_path, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # a file of the user's stays
