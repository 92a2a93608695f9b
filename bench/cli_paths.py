"""Checked output paths for the bench scripts' command lines (standard library only, so that
gpu_check.py can check its arguments before anything imports torch), and atomic file writes.

- out_folder: argparse `type=` for --out DIR: refuses an empty value (which used to mean the default
  folder silently), a path that exists as a file, and one that cannot be created or written in (the
  folder itself is made when the first result is saved).
- out_file: argparse `type=` for --out FILE: refuses an empty value, a folder, and a file whose folder
  does not exist.
- write_atomic: replace a file by writing a temporary file beside it and renaming it over, so that a
  run stopped mid-write (a time limit, Ctrl-C) leaves the previous file or the new one, never half of one.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def out_folder(value: str) -> Path:
    if not value.strip():
        raise argparse.ArgumentTypeError("give a folder (an empty value is not the default folder)")
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: exists and is not a folder")
    # nothing is created here (a run that refuses its other arguments writes nothing): the nearest
    # existing folder above must be one the results' folders can be made in
    above = path.absolute()
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: cannot create the folder ({above} is not a folder)")
    if not os.access(above, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{value}: cannot write in {above}")
    return path


def out_file(value: str) -> Path:
    if not value.strip():
        raise argparse.ArgumentTypeError("give a file name")
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: is a folder; give the file's path")
    if not path.absolute().parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: its folder {path.absolute().parent} does not exist")
    return path


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """write(tmp) writes the content to tmp, a file in path's folder; tmp then replaces path."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
