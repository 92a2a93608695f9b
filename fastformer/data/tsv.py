"""Tab-separated classification data: `text<TAB>label` rows, with or without a header row.

A header is recognised when its first row names a text or label column (STRONG_TEXT_COLUMNS: text,
sentence, review, ...; STRONG_LABEL_COLUMNS: label, class, ...), or two columns by the names that are
also common values (tweet, question, sentiment, topic, ...), in any case; a header without a label
name (`sentence<TAB>score`) is refused by read_tsv, which does not guess the label among other
columns (a score, an id). Without a header the last column is
the label and everything before it (joined by tabs) the text; with a header, a row with more columns
than the header has tabs in its text column, which takes the extra ones. A first row not taken as a
header whose label occurs nowhere else, in a file of 8 rows or more whose other labels all occur at
least twice, is read as data with a warning (a header with names not recognised). Labels may be
strings or integers; they are mapped to class indices in sorted order (integers numerically), each
label string kept as it is spelled for reporting. Rows end at LF or CRLF; a lone CR is read as in
_split_rows (a space inside a field, a row end in an old Mac file), and a file whose rows all end in
a tab is read without that empty last cell. A folder is refused as one, not as a missing file.

Files are UTF-8 (a byte-order mark is allowed) or UTF-16 with its byte-order mark; a file with NUL
bytes and no UTF-16 mark is refused as binary, and bytes that are not UTF-8 (a Latin-1 file) are read
as U+FFFD with a warning naming the file. `read_inputs` reads the texts to predict: a .tsv in
the same format with the label column optional, any other file one text per non-empty line.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from .corpus import DataError, FastformerWarning, _first_process

# Column names a header row is recognised by (compared without case), in order of preference when
# several cells match. The first names of each list are unambiguous: one of them makes the first row a
# header. The others (tweet, question, sentiment, topic, ...) are also common label or text values
# (a dialog-act label "question", a topic "sentiment"), so they make a header only two at a time
# (tweet<TAB>sentiment), never alone. "y" (a label value, as in y/n) and titles or headlines (beside a
# text column, title<TAB>text<TAB>label, the text column must stay the text) are not names.
STRONG_TEXT_COLUMNS = ("sentence", "text", "sentence1", "content", "review", "document")
STRONG_LABEL_COLUMNS = ("label", "labels", "class", "category", "target")
TEXT_COLUMNS = STRONG_TEXT_COLUMNS + (
    "tweet",
    "comment",
    "question",
    "utterance",
    "message",
    "passage",
    "query",
    "input",
)
LABEL_COLUMNS = STRONG_LABEL_COLUMNS + (
    "sentiment",
    "polarity",
    "gold_label",
    "rating",
    "stars",
    "topic",
    "intent",
    "emotion",
)
HEADER_LIKE_MIN_ROWS = 8  # fewer rows: a label seen once says nothing about the first row
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")


class NotUTF8Warning(FastformerWarning, UnicodeWarning):
    """A file that is not UTF-8, read with its undecodable bytes as U+FFFD (one `fastformer: warning:`
    line in the CLI; still a UnicodeWarning for filters)."""


def _read_text(p: Path, path) -> str:
    """The file's text; DataError for a binary file."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw.startswith(_UTF16_BOMS):
        return raw.decode("utf-16", errors="replace")
    if b"\0" in raw[:8192]:
        raise DataError(f"{path}: looks like a binary file (NUL bytes), not tab-separated UTF-8 / UTF-16 text")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        text = raw.decode("utf-8-sig", errors="replace")
        warnings.warn(
            f"{path}: not UTF-8 (first bad byte at offset {err.start}); {text.count(chr(0xFFFD))} undecodable "
            "byte sequence(s) read as U+FFFD. Convert the file to UTF-8 (e.g. `iconv -f latin1 -t utf-8`)",
            NotUTF8Warning,
            stacklevel=4,
        )
        return text


def _cr_ends_rows(text: str) -> bool:
    """Whether the lone CRs of a text (CRLF already turned into LF) end rows: see _split_rows."""
    if "\r" not in text:
        return False
    if "\n" not in text:
        return True
    pieces = [p for line in text.split("\n") for p in line.split("\r") if p.strip()]
    return all("\t" in p for p in pieces)


def text_lines(text: str) -> list[str]:
    """The non-blank lines of a one-text-per-line file, stripped. Lines end at LF and CRLF, and at a
    lone CR only in a file without LF (old Mac); str.splitlines also ends them at form feeds, U+2028,
    U+0085 and more, which gives more texts than the file has lines."""
    text = text.replace("\r\n", "\n")
    text = text.replace("\r", " " if "\n" in text else "\n")
    return [ln.strip() for ln in text.split("\n") if ln.strip()]


def _split_rows(text: str, is_header) -> list[list[str]]:
    """The non-blank rows of a TSV text, split at tabs (no quoting: a quote is an ordinary character).

    Row ends: LF and CRLF. A lone CR is a row end too (classic Mac line endings, perhaps with a final
    LF) in a file without LF, or when every piece it separates holds a tab (a row of columns);
    otherwise it is a space inside its row ("good", CR, "movie<TAB>pos": csv.reader cut that text in
    two). A file whose every line ends with a tab loses that last empty cell on every row: with a
    header (of two cells or more, then fitted to by _fit_to_header), or without one when every row has
    three cells or more (a row with more cells than others has tabs in its text). A header alone
    ending in a tab keeps its unnamed last column. `is_header(row)` says whether the first row is a
    header."""
    text = text.replace("\r\n", "\n")
    text = text.replace("\r", "\n" if _cr_ends_rows(text) else " ")
    rows = [r.split("\t") for r in text.split("\n")]
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        return rows
    least = 2 if is_header(rows[0]) else 3
    if len(rows[0]) >= least and all(len(r) >= 2 and not r[-1].strip() for r in rows):
        return [r[:-1] for r in rows]
    return rows


def _rows(path, is_header=None) -> list[list[str]]:
    """The rows of a TSV file (_split_rows); is_header(row): whether the first row is a header (default:
    it names a text or label column). DataError for a missing or empty file."""
    p = _existing_file(path)
    rows = _split_rows(_read_text(p, path), is_header or (lambda r: _header([r]) is not None))
    if not rows:
        raise DataError(f"{path}: file is empty")
    return rows


def _existing_file(path) -> Path:
    """`path` as a Path; DataError when it is missing or a folder (which "no such file" would hide)."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{path}: is a folder, not a file")
    if not p.is_file():
        raise DataError(f"{path}: no such file")
    return p


def _header(rows: list[list[str]]) -> tuple[int | None, int | None] | None:
    """(text column, label column or None) when the first row is a header, else None: it holds one of
    the unambiguous names, or two known names. Among several matching cells the name earlier in
    TEXT_COLUMNS / LABEL_COLUMNS wins (index<TAB>question<TAB>sentence<TAB>label: the text is sentence;
    review<TAB>rating<TAB>label: the label is label)."""
    head = [c.strip().lower() for c in rows[0]]
    known = [h for h in head if h in TEXT_COLUMNS or h in LABEL_COLUMNS]
    if not any(h in STRONG_TEXT_COLUMNS or h in STRONG_LABEL_COLUMNS for h in head) and len(known) < 2:
        return None

    def best(names: tuple[str, ...]) -> int | None:
        cols = [i for i, h in enumerate(head) if h in names]
        return min(cols, key=lambda i: names.index(head[i])) if cols else None

    label_col = best(LABEL_COLUMNS)
    # no known text column name (label<TAB>title, ...): the first column that is not the label
    text_col = best(TEXT_COLUMNS)
    if text_col is None:
        text_col = next((i for i in range(len(head)) if i != label_col), None)
    return text_col, label_col


def _fit_to_header(row: list[str], width: int, text_col: int) -> list[str]:
    """A data row with more fields than its header (`width` columns) had tabs in its text: the text
    column takes the extra fields back, joined by tabs, and the columns after it shift into place."""
    while len(row) > width and not row[-1].strip():  # a trailing tab is not a tab in the text
        row = row[:-1]
    extra = len(row) - width
    if extra <= 0:
        return row
    return row[:text_col] + ["\t".join(row[text_col : text_col + extra + 1])] + row[text_col + extra + 1 :]


def read_tsv(path: str | Path) -> tuple[list[str], list[str]]:
    """(texts, raw label strings) of a TSV file. Raises DataError naming the file and the problem."""
    rows = _rows(path)
    header = _header(rows)
    text_col, label_col = 0, -1
    if header is not None:
        head = [c.strip().lower() for c in rows[0]]
        rows = rows[1:]
        text_col, label_col = header
        if label_col is None:
            # not guessed: an unknown name beside the text may be a score or an id, not the label
            raise DataError(
                f"{path}: header row ({', '.join(h for h in head if h)}) has no label column: name it label "
                f"(or {', '.join(LABEL_COLUMNS[1:])})"
            )
        text_col = 0 if text_col is None else text_col
        rows = [_fit_to_header(r, len(head), text_col) for r in rows]
    elif max(len(r) for r in rows) < 2:
        raise DataError(f"{path}: no label column (expected text<TAB>label rows)")
    texts, labels = [], []
    for n, r in enumerate(rows, start=1):
        if len(r) < 2 or (label_col != -1 and len(r) <= max(label_col, text_col)):
            raise DataError(f"{path}: data row {n} has no label column (expected text<TAB>label)")
        # headerless rows with more than two columns: the text is everything before the label (a tab
        # inside the text), not just the first column
        texts.append(r[text_col] if label_col != -1 else "\t".join(r[:-1]))
        label = r[label_col].strip()
        if not label:
            raise DataError(f"{path}: data row {n} has an empty label")
        labels.append(label)
    if not texts:
        raise DataError(f"{path}: no data rows")
    if header is None:
        _check_label_column(path, rows, labels)
        _warn_if_header_like(path, rows[0], labels)
    return texts, labels


def _check_label_column(path, rows: list[list[str]], labels: list[str], *, texts_alone: bool = False) -> None:
    """Refuse a headerless file whose last column reads as text, not labels (a label<TAB>text file):
    more distinct values than half the rows (and over 20), most of them three words or more.
    `texts_alone`: the file may hold texts without labels too (predict), and the advice says so."""
    distinct = len(set(labels))
    if distinct <= max(20, len(labels) // 2):
        return
    words = sorted(len(label.split()) for label in labels)
    if words[len(words) // 2] < 3:
        return
    firsts = len({r[0].strip() for r in rows})
    hint = (
        f"; its first column has only {firsts} distinct value(s): a label<TAB>text file? "
        if firsts <= max(20, len(rows) // 10)
        else "; "
    )
    raise DataError(
        f"{path}: without a header the last column is the label, but it holds {distinct} distinct values in "
        f"{len(labels)} rows, most of them several words long: that looks like text{hint}"
        "put the label last (text<TAB>label) or add a header row naming the columns (e.g. label<TAB>text"
        f"{'; or text alone, for texts with tabs and no label' if texts_alone else ''})"
    )


def _warn_if_header_like(path, first: list[str], labels: list[str]) -> None:
    """Warn when the first row of a headerless file looks like a header whose column names are not
    known (tweet<TAB>mood): its label occurs nowhere else while every other label occurs at least
    twice, and its cells are short, as names are. It stays a data row (a guess could drop a real
    example); the warning names its cells."""
    if len(labels) < HEADER_LIKE_MIN_ROWS:
        return
    if any(len(c.split()) > 3 for c in first):  # column names are short; a sentence is a data row
        return
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    if counts[labels[0]] != 1 or min(n for label, n in counts.items() if label != labels[0]) < 2:
        return
    if not _first_process():
        return
    cells = ", ".join(c.strip() for c in first if c.strip())
    warnings.warn(
        f"{path}: the first row ({cells}) looks like a header: its label {labels[0]!r} occurs nowhere else, "
        "every other label at least twice. It was read as a data row (a class of its own); if it names the "
        "columns, use names fastformer recognises, e.g. text<TAB>label (docs/training.md lists them)",
        FastformerWarning,
        stacklevel=3,
    )


def read_inputs(path: str | Path) -> tuple[list[str], list[str] | None]:
    """Texts to predict and, when the file has them, their labels.

    `.tsv`: a header naming a text column (label column optional), or headerless `text<TAB>label`
    rows (every row with a tab; a last column that reads as text is refused, as read_tsv refuses it),
    or one text per row. Anything else: one text per non-empty line."""
    if Path(path).suffix.lower() != ".tsv":
        p = _existing_file(path)
        texts = text_lines(_read_text(p, path))
        if not texts:
            raise DataError(f"{path}: no text (empty file)")
        return texts, None
    rows = _rows(path)
    header = _header(rows)
    if header is not None:
        text_col, label_col = header
        if text_col is None:
            raise DataError(f"{path}: header row has no text column")
        rows = [_fit_to_header(r, len(rows[0]), text_col) for r in rows[1:]]
        texts = [r[text_col] if len(r) > text_col else "" for r in rows]
        labels = None
        if label_col is not None:
            labels = [r[label_col].strip() if len(r) > label_col else "" for r in rows]
            labels = labels if all(labels) else None
    elif all(len(r) >= 2 for r in rows):
        texts, labels = ["\t".join(r[:-1]) for r in rows], [r[-1].strip() for r in rows]
        labels = labels if all(labels) else None
        if labels:  # as training reads it: a last column of sentences is no label column
            _check_label_column(path, rows, labels, texts_alone=True)
            _warn_if_header_like(path, rows[0], labels)
    else:
        texts, labels = ["\t".join(r) for r in rows], None
    if not texts:
        raise DataError(f"{path}: no data rows")
    return texts, labels


def label_vocabulary(*label_lists: list[str]) -> list[str]:
    """The distinct label strings over all lists, sorted: numerically when every label is an integer
    ("2" before "10"). Each keeps its spelling ("01" stays "01", and "1" and "01" are two labels)."""
    names = set().union(*map(set, label_lists))
    try:
        return sorted(names, key=lambda n: (int(n), n))
    except ValueError:
        return sorted(names)
