"""Text corpora: user files/folders (`--data`) and a built-in corpus that needs no download.

The built-in corpus is the docstrings of the installed Python standard library and, to reach a few MB,
of installed site-packages, extracted with `ast` (nothing is imported or executed). It is built once
and cached under $FASTFORMER_CACHE (default ~/.cache/fastformer).
"""

from __future__ import annotations

import ast
import contextlib
import os
import sysconfig
import warnings
from collections.abc import Sequence
from pathlib import Path

TEXT_SUFFIXES = {".txt", ".text", ".md", ".rst", ".tsv", ".csv", ".json", ".jsonl", ""}
BUILTIN_TARGET_CHARS = 6_000_000
HELDOUT_WARN_SHARE = 0.10  # split_heldout warns when the held-out documents hold more of the text


class DataError(ValueError):
    """Missing, unreadable or empty input data."""


class FastformerWarning(UserWarning):
    """A warning about the user's input or setup (the CLI prints it as one `fastformer: warning:` line).
    Defined here, in the data layer, so that data readers can warn too; `fastformer.train.run_dir`
    re-exports it."""


@contextlib.contextmanager
def named_by(flag: str, errors: tuple[type[ValueError], ...] = ()):
    """A DataError (or one of `errors`) raised inside the block says which flag (--train, --eval,
    --input, --model) named the file."""
    try:
        yield
    except (DataError, *errors) as e:
        if str(e).startswith(flag):
            raise
        raise type(e)(f"{flag} {e}") from None


def cache_dir() -> Path:
    return Path(os.environ.get("FASTFORMER_CACHE", Path.home() / ".cache" / "fastformer"))


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError, RecursionError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            # Skip one-liners: they are mostly "Return x." and teach the model little.
            if doc and len(doc) > 80:
                out.append(doc.strip())
    return out


def _source_roots() -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"])]
    for key in ("purelib", "platlib"):
        p = Path(paths[key])
        if p not in roots:
            roots.append(p)
    return roots


def build_builtin_corpus(target_chars: int = BUILTIN_TARGET_CHARS) -> list[str]:
    """Docstrings of the standard library first, then of site-packages, until ~target_chars."""
    docs, total = [], 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for root in _source_roots():
        files = sorted(root.rglob("*.py"))
        for f in files:
            rel = f.relative_to(root).parts
            if any(p in ("test", "tests", "idlelib", "__pycache__") for p in rel):
                continue
            if root == stdlib and "site-packages" in rel:
                continue
            for d in _docstrings(f):
                docs.append(d)
                total += len(d)
            if total >= target_chars:
                return docs
    return docs


def _builtin_path() -> Path:
    return cache_dir() / f"builtin_corpus_v1_{BUILTIN_TARGET_CHARS}.txt"


def builtin_corpus_cached() -> bool:
    """Whether builtin_corpus() reads its cache (else it first scans the installed Python: seconds)."""
    return _builtin_path().exists()


def builtin_corpus() -> list[str]:
    """The built-in corpus as documents (cached on disk after the first call)."""
    path = _builtin_path()
    if path.exists():
        text = path.read_text(encoding="utf-8")
        return [d for d in text.split("\n\f\n") if d.strip()]
    docs = build_builtin_corpus()
    if not docs:
        raise DataError("could not build the built-in corpus: no docstrings found in the installed Python")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("\n\f\n".join(docs), encoding="utf-8")
    os.replace(tmp, path)
    return docs


_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


def _head(f: Path) -> bytes | None:
    """The first 8 KB of `f` (None when it cannot be read)."""
    try:
        with f.open("rb") as fh:
            return fh.read(8192)
    except OSError:
        return None


def _binary(head: bytes) -> bool:
    """NUL bytes in the first 8 KB and no UTF-16 byte-order mark."""
    return b"\0" in head and not head.startswith(_UTF16_BOMS)


def _looks_like_text(f: Path) -> bool:
    """Text when its first 8 KB are not empty and hold no NUL byte, or when it starts with a UTF-16
    byte-order mark."""
    head = _head(f)
    return bool(head) and not _binary(head)


def _read_text(f: Path) -> str:
    """UTF-8 (BOM optional; undecodable bytes replaced) or, with its byte-order mark, UTF-16."""
    with f.open("rb") as fh:
        utf16 = fh.read(2) in _UTF16_BOMS
    return f.read_text(encoding="utf-16" if utf16 else "utf-8-sig", errors="replace")


def _files_under(p: Path) -> tuple[list[Path], list[Path]]:
    """(text files, skipped binary files) of a `--data` path: the file itself, or the files under a
    folder that are not hidden. Every file found in a folder is checked: one with NUL bytes in its
    first 8 KB and no UTF-16 byte-order mark is skipped whatever its suffix; an empty or unreadable one
    is kept (to give no documents, or its read error) only with a text suffix or none."""
    if p.is_file():
        return [p], []
    files, skipped = [], []
    for f in sorted(p.rglob("*")):
        if not f.is_file() or any(part.startswith(".") for part in f.relative_to(p).parts):
            continue
        head = _head(f)
        if head and _binary(head):
            skipped.append(f)
        elif head or f.suffix.lower() in TEXT_SUFFIXES:
            files.append(f)
    return files, skipped


def _first_process() -> bool:
    """False on the other ranks of a torchrun job: a warning about the data is given once per job."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _documents(text: str) -> list[str]:
    """A blank line separates documents. A file with no blank line but several lines is read as one
    document per line (the usual layout of an article or sentence corpus): its lines then get a
    separator between them when packed, and the held-out split can draw whole lines."""
    docs = [d.strip() for d in text.split("\n\n") if d.strip()]
    if len(docs) == 1:
        lines = [ln.strip() for ln in docs[0].splitlines() if ln.strip()]
        if len(lines) > 1:
            return lines
    return docs


def _warn_if_read_again(files: list[Path], raw: str, seen: dict[Path, str]) -> None:
    """A file that two `--data` paths reach (the same path twice, or a file and its folder) is read
    twice, as `cat f f` would: its documents count double, and the held-out slice can draw one copy
    while training sees the other. Warn once per `--data` path; record the files it reaches."""
    again = [f for f in files if f.resolve() in seen]
    if again and _first_process():
        first = again[0]
        via = seen[first.resolve()]
        what = (
            f"--data {raw} is given twice"
            if Path(via).resolve() == Path(raw).resolve()
            else f"--data {raw}: {len(again)} file(s) are also given by --data {via} (the first {first})"
        )
        warnings.warn(
            f"{what}; their documents are read twice and the held-out slice can share them with training",
            FastformerWarning,
            stacklevel=3,
        )
    for f in files:
        seen.setdefault(f.resolve(), raw)


def load_texts(paths: Sequence[str | Path] | None) -> list[str]:
    """Documents from text files / folders (a blank line separates documents; a file without blank
    lines has one document per line), or the built-in
    corpus when `paths` is empty. Raises DataError for a missing path or no text at all."""
    if not paths:
        return builtin_corpus()
    docs: list[str] = []
    seen: dict[Path, str] = {}  # resolved file -> the --data path that first reached it
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise DataError(f"--data {raw}: no such file or directory")
        files, skipped = _files_under(p)
        if skipped and _first_process():
            warnings.warn(
                f"--data {raw}: skipped {len(skipped)} binary file(s) (NUL bytes, not UTF-8 / UTF-16 text), "
                f"the first {skipped[0]}",
                FastformerWarning,
                stacklevel=2,
            )
        if not files:
            raise DataError(f"--data {raw}: folder contains no text files")
        if p.is_file() and p.stat().st_size and not _looks_like_text(p):
            raise DataError(f"--data {raw}: looks like a binary file (NUL bytes), not UTF-8 / UTF-16 text")
        _warn_if_read_again(files, raw, seen)
        for f in files:
            try:
                text = _read_text(f)
            except OSError as e:
                raise DataError(f"--data {f}: cannot read ({e.strerror})") from None
            docs += _documents(text)
    if not docs:
        raise DataError(f"--data {' '.join(map(str, paths))}: no text found (empty files)")
    return docs


def split_heldout(
    docs: Sequence[str], fraction: float = 0.02, seed: int = 1234, max_docs: int = 500
) -> tuple[list[str], list[str]]:
    """(train, eval) documents: a fixed random held-out slice (independent of the run's seed).

    The slice is a share of the documents, not of the text: when its documents hold more than
    `HELDOUT_WARN_SHARE` of the characters (a few large documents), a FastformerWarning says so."""
    import random

    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_eval = min(max_docs, max(1, int(len(docs) * fraction))) if len(docs) > 1 else 0
    eval_idx = set(order[:n_eval])
    train = [d for i, d in enumerate(docs) if i not in eval_idx]
    held = [docs[i] for i in sorted(eval_idx)]
    total, held_chars = sum(map(len, docs)), sum(map(len, held))
    if total and held_chars > HELDOUT_WARN_SHARE * total and _first_process():
        warnings.warn(
            f"the held-out slice is {n_eval} of {len(docs)} documents but holds {held_chars / total:.0%} of the "
            f"text ({held_chars:,} of {total:,} characters), which training never sees: the corpus has few, "
            "large documents (in a --data file, blank lines make each block of lines one document, so one "
            "stray blank line turns a file of one document per line into a few large ones); remove stray "
            "blank lines, or split the text into more documents",
            FastformerWarning,
            stacklevel=2,
        )
    return train, held
