"""Output folders: what may be written where, and OS errors as one line naming the flag and the path.

- `prepare_out_dir` refuses a non-empty `--out` that is not this command's own run to resume, unless
  `--overwrite` is given; fine-tuning never writes into a pre-training folder. It only checks: the
  previous run's files are removed by `make_out_dir(out, replace=True)` (other files are left), which
  the commands call once the new run's data, tokenizer and memory checks have passed, so a refused
  command (a typo, a bad file) leaves the old run as it was.
- `os_error_message` / `writing(...)` turn an OSError (disk full, read-only, a file where a folder
  should be, permission) into an `OutputError` whose one-line message names the flag and the path.
- `stored_train_config` reads the settings of the run in a folder (what `--resume` continues).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from fastformer.data.corpus import FastformerWarning as FastformerWarning  # defined in the data layer, re-exported
from fastformer.models.loading import CHECKPOINT_NAME, CONFIG_NAME, run_of

from .checkpoint import replaced_atomically

# Files a pretrain / finetune run writes; --overwrite removes exactly these (and checkpoint temp files).
RUN_FILES = (
    CHECKPOINT_NAME,
    CONFIG_NAME,
    "tokenizer.json",
    "metrics.jsonl",
    "loss.png",
    "eval.json",
    "predictions.tsv",
)


class OutputError(ValueError):
    """An output folder or file that cannot be used (wrong kind, not empty, not writable)."""


def os_error_message(flag: str, path: str | Path, e: OSError, note: str = "") -> str:
    """'--out runs/x: cannot write checkpoint.pt: No space left on device; <note>'."""
    path = Path(path)
    target = Path(e.filename) if e.filename else None
    what = ""
    if target is not None and target != path:
        try:
            what = f" {target.relative_to(path)}"
        except ValueError:
            what = f" {target}"
    if isinstance(e, (FileExistsError, NotADirectoryError)) and (target is None or target == path or path.is_file()):
        msg = f"{flag} {path}: exists and is not a folder"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT):
        msg = f"{flag} {path}: cannot write{what}: no space left on the device"
    elif e.errno == errno.EROFS:
        msg = f"{flag} {path}: cannot write{what}: read-only file system"
    elif e.errno in (errno.EACCES, errno.EPERM):
        msg = f"{flag} {path}: cannot write{what}: permission denied"
    elif e.errno == errno.EFBIG:
        msg = f"{flag} {path}: cannot write{what}: file too large for the file system or the process's file size limit"
    else:
        msg = f"{flag} {path}: cannot write{what}: {e.strerror or e}"
    return msg + (f"; {note}" if note else "")


@contextlib.contextmanager
def writing(flag: str, path: str | Path, note: str = ""):
    """Turn an OSError raised inside the block into an OutputError naming `flag` and `path`."""
    try:
        yield
    except OSError as e:
        raise OutputError(os_error_message(flag, path, e, note)) from None


def run_kind(folder: Path) -> str | None:
    """ "pretrain" / "finetune" for a fastformer run folder, None for anything else."""
    cfg = folder / CONFIG_NAME
    if cfg.is_file():
        try:
            d = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if isinstance(d, dict) and (
            d.get("run") in ("pretrain", "finetune") or ("objective" in d and "model_config" in d)
        ):  # before config.json said "run"
            return run_of(d)
        return None
    if (folder / "eval.json").is_file() and (folder / CHECKPOINT_NAME).is_file():  # an older fine-tuning folder
        return "finetune"
    return None


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def check_steps_done(steps: int | None, done: int, out: str | Path) -> None:
    """A resumed run whose --steps is below the `done` steps of its checkpoint: OutputError, one line."""
    if steps is not None and done > steps:
        raise OutputError(
            f"--steps {steps}: the run in {out} has already done {done} steps; give --steps {done} or more "
            "to continue it"
        )


def prepare_out_dir(out: str | Path, *, run: str, resume: bool, overwrite: bool, steps: int | None = None) -> None:
    """Check that `run` ("pretrain" | "finetune") may write into `out` (with overwrite, the files of the
    run that is there are removed later, by make_out_dir(out, replace=True)). With resume, `steps` (the
    run's length, None for a time budget) must not be below the checkpoint's step: checked here, before
    config.json is written again. Raises OutputError / CheckpointError with one line that names the folder and the
    ways out."""
    from .checkpoint import CheckpointError

    out = Path(out)
    if resume and overwrite:
        raise OutputError("--resume continues the run in --out and --overwrite replaces it: give one of them")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out}: exists and is not a folder; choose another --out")
    kind = run_kind(out) if out.is_dir() else None
    if run == "finetune" and kind == "pretrain":
        raise OutputError(
            f"--out {out} holds a pre-training run; fine-tuning never writes into one (its "
            "checkpoint and tokenizer would be replaced): choose another --out"
        )
    started = (out / CHECKPOINT_NAME).is_file()
    if resume:
        if not started and kind == run:
            raise CheckpointError(
                f"--resume: the {run} run in {out} stopped before its first checkpoint, so "
                "there is nothing to continue: start it again with --overwrite"
            )
        if not started:
            raise CheckpointError(f"--resume: no checkpoint in {out}")
        if kind not in (run, None):
            raise CheckpointError(f"--resume: {out} holds a {kind} run, not a {run} run")
        if steps is not None:
            from .checkpoint import checkpoint_step

            check_steps_done(steps, checkpoint_step(out / CHECKPOINT_NAME), out)
        return
    entries = _entries(out)
    if not entries:
        return
    if not overwrite:
        if kind == run and not started:
            raise OutputError(
                f"--out {out} holds a {run} run that stopped before its first checkpoint: add "
                "--overwrite to start it again (or choose another --out)"
            )
        if kind == run:
            raise OutputError(
                f"--out {out} already holds a {run} run: add --resume to continue it, or --overwrite "
                "to replace it (or choose another --out)"
            )
        if kind:
            raise OutputError(f"--out {out} holds a {kind} run: choose another --out, or add --overwrite to replace it")
        raise OutputError(
            f"--out {out} is not empty ({len(entries)} entries) and holds no fastformer run: choose "
            "another --out, or add --overwrite to write into it"
        )


def check_init_folder(init: Path) -> None:
    """CheckpointError unless `init` (--init) is a folder holding a run's config, tokenizer and
    checkpoint; a missing folder is said to be missing, not to lack a file."""
    from .checkpoint import CheckpointError

    if not init.exists():
        raise CheckpointError(f"--init {init}: no such folder")
    if not init.is_dir():
        raise CheckpointError(f"--init {init}: not a folder (--init takes a pretrain output folder)")
    for f in (CONFIG_NAME, "tokenizer.json", CHECKPOINT_NAME):
        if not (init / f).is_file():
            raise CheckpointError(f"--init {init}: not a pretrain output folder (no {f})")


def data_digest(items: Iterable[str]) -> str:
    """A fingerprint of a run's data (SHA-256 of the documents, or of the rows of a TSV), kept in
    config.json so that --resume notices data that changed since the run began."""
    h = hashlib.sha256()
    for d in items:
        h.update(d.encode("utf-8", "surrogatepass"))
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def started_on_other_data(out: str | Path, key: str, digest: str) -> dict | None:
    """The config.json of the run in `out` when its `key` digest differs from `digest` (--resume on
    changed data: the caller warns), else None; a config.json from before digests were recorded, or
    an unreadable one, is not checked."""
    try:
        before = json.loads((Path(out) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(before, dict) or before.get(key) in (None, digest):
        return None
    return before


def rows_digests(out: str | Path, cfg, main: bool, train: Iterable[tuple], eval_: Iterable[tuple]) -> dict[str, str]:
    """config.json's fingerprints (train_digest, eval_digest) of a fine-tuning run's --train and --eval
    rows, (text, label) or (input, target). On --resume (cfg.resume, main process) one warning per
    file whose rows differ from those the run began with; the run goes on."""
    import warnings

    digests = {
        f"{name}_digest": data_digest("\t".join(map(str, row)) for row in rows)
        for name, rows in (("train", train), ("eval", eval_))
    }
    for name, path in (("train", cfg.train), ("eval", cfg.eval)):
        if cfg.resume and main and started_on_other_data(out, f"{name}_digest", digests[f"{name}_digest"]) is not None:
            warnings.warn(
                f"--{name} {path} changed since this run began: the resumed run "
                f"{'trains' if name == 'train' else 'evaluates'} on the new rows, so it is no longer the "
                "run an uninterrupted one would have been",
                FastformerWarning,
                stacklevel=3,
            )
    return digests


def make_out_dir(out: str | Path, *, replace: bool = False) -> None:
    """Create --out (main process). replace (--overwrite): first remove the files of the run that was
    there, and only those; called after the new run's input was checked, right before its first write."""
    with writing("--out", out):
        if replace:
            for p in _entries(Path(out)):
                if p.name in RUN_FILES or any(p.name.startswith(f".{f}.tmp") for f in RUN_FILES):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        Path(out).mkdir(parents=True, exist_ok=True)


def write_file(out: str | Path, name: str, text: str) -> None:
    """Write out/name atomically (a temporary file renamed over it: a reader, another rank of a resumed
    run or a crash, sees the old file or the new one, never half of one); an OSError becomes an
    OutputError naming --out."""
    with writing("--out", out), replaced_atomically(Path(out) / name) as tmp:
        tmp.write_text(text)


def write_run_files(out: str | Path, replace: bool, config: dict, tokenizer_json: str | None) -> None:
    """The run's first files (main process, called by the trainer before the first step): --out made
    (with --overwrite, the replaced run's files removed first), tokenizer.json unless None, config.json."""
    make_out_dir(out, replace=replace)
    if tokenizer_json is not None:
        write_file(out, "tokenizer.json", tokenizer_json)
    write_file(out, "config.json", json.dumps(config, indent=2, default=str))


def stored_run_config(out: str | Path) -> dict:
    """The config.json the run in `out` wrote at its start (what --resume rebuilds the run from)."""
    from .checkpoint import CheckpointError

    path = Path(out) / CONFIG_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"--resume: no {CONFIG_NAME} in {out}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--resume: cannot read {path} ({e})") from None


def stored_train_config(out: str | Path) -> dict:
    """The settings (`train` section of config.json) of the run in `out`, with `warmup_steps` back to
    None where the run used the default warmup, so that it follows a changed --steps."""
    train = dict(stored_run_config(out).get("train") or {})
    if train.get("warmup_default"):
        train["warmup_steps"] = None
    train.pop("warmup_default", None)
    return train
