"""TSV header rows with names the reader did not know, and inputs read wrongly without a word: a header
`tweet<TAB>sentiment` became a data row (a class "sentiment"), `review<TAB>sentiment` was refused as
having no label column, a folder was "no such file", and predict read a last column of sentences as
labels where finetune refused it."""

import random
import warnings

import pytest

from fastformer.data.corpus import DataError, FastformerWarning
from fastformer.data.tsv import LABEL_COLUMNS, TEXT_COLUMNS, read_inputs, read_tsv

ROWS = [(f"a good film {i}", "positive") for i in range(5)] + [(f"a bad film {i}", "negative") for i in range(5)]
TEXTS = [t for t, _ in ROWS]
LABELS = [y for _, y in ROWS]


def _write(path, header, rows=ROWS):
    path.write_text("".join(f"{line}\n" for line in ([header] if header else []) + [f"{t}\t{y}" for t, y in rows]))
    return path


@pytest.mark.parametrize(
    "header",
    [
        "tweet\tsentiment",  # was a data row: a third class "sentiment"
        "review\tsentiment",  # was refused: "header row (review, sentiment) has no label column"
        "text\tsentiment",
        "Utterance\tIntent",
        "question\ttopic",
        "sentence\tgold_label",
        "comment\tpolarity",
        "content\trating",
        "Review\tStars\t",  # a trailing tab
        "emotion\tmessage",  # label first
    ],
)
def test_a_header_with_a_known_text_or_label_name_is_a_header(tmp_path, header):
    cols = [c for c in header.split("\t") if c]
    label_first = cols[0].lower() in LABEL_COLUMNS
    rows = [(y, t) for t, y in ROWS] if label_first else ROWS
    p = _write(tmp_path / "h.tsv", header, rows)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a header recognised: nothing to warn about
        assert read_tsv(p) == (TEXTS, LABELS)
        assert read_inputs(p) == (TEXTS, LABELS)


def test_a_header_without_a_label_name_is_refused_naming_the_names(tmp_path):
    """sentence<TAB>mood is a header (sentence is known) but names no label column: read_tsv does not guess
    the label among unknown names (a score, an id) and says which names it knows; predict reads the
    texts without labels."""
    for header in ("sentence\tmood", "sentence\ttext", "tweet\tquery"):
        p = _write(tmp_path / "h.tsv", header)
        names = ", ".join(header.split("\t"))
        with pytest.raises(DataError, match=rf"header row \({names}\) has no label column: name it label \(or "):
            read_tsv(p)
        assert read_inputs(p) == (TEXTS, None)
    with pytest.raises(DataError, match="sentiment, polarity, gold_label"):
        read_tsv(p)
    assert {"tweet", "review", "question", "utterance"} <= set(TEXT_COLUMNS)
    assert {"sentiment", "polarity", "gold_label", "rating", "stars", "topic", "intent", "emotion"} <= set(
        LABEL_COLUMNS
    )
    assert "y" not in LABEL_COLUMNS and "title" not in TEXT_COLUMNS  # a label value / a column beside the text


def test_a_first_row_that_looks_like_a_header_is_said_once(tmp_path):
    """post<TAB>mood is no known header: the row stays data (a class of its own), but one warning says
    it looks like a header and names its cells."""
    p = _write(tmp_path / "p.tsv", "post\tmood")
    for read in (read_tsv, read_inputs):
        with pytest.warns(FastformerWarning) as rec:
            texts, labels = read(p)
        assert texts == ["post"] + TEXTS and labels == ["mood"] + LABELS  # not silently dropped either
        assert len(rec) == 1, [str(w.message) for w in rec]
        msg = str(rec[0].message)
        assert msg.startswith(f"{p}: the first row (post, mood) looks like a header: its label 'mood' occurs"), msg
        assert "text<TAB>label" in msg and rec[0].filename == __file__  # the caller's line


def test_no_header_warning_for_files_that_do_not_look_so(tmp_path):
    rng = random.Random(0)
    cases = {
        "short": [("one text", "odd")] + ROWS[:6],  # 7 rows: too few to tell
        "first_label_again": ROWS + [("more", "positive")],  # its label occurs elsewhere
        "another_single": [("first", "odd")] + ROWS + [("last", "rare")],  # other labels once too
        "many_classes": [(f"text {i}", f"c{rng.randrange(5)}") for i in range(40)],
        # a small slice of a real file whose first label happens to be rare: a sentence is no column name
        "sentence_first": [("Stocks fell sharply in early trading on Monday", "Business")] + ROWS,
    }
    for name, rows in cases.items():
        p = _write(tmp_path / f"{name}.tsv", None, rows)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert read_tsv(p)[1] == [y for _, y in rows], name
            assert read_inputs(p)[1] == [y for _, y in rows], name


def test_a_folder_is_said_to_be_a_folder(tmp_path):
    (tmp_path / "data.tsv").mkdir()
    for path in (tmp_path, tmp_path / "data.tsv"):
        for read in (read_tsv, read_inputs):
            with pytest.raises(DataError, match=r": is a folder, not a file$"):
                read(path)
    with pytest.raises(DataError, match=r"missing.tsv: no such file$"):
        read_tsv(tmp_path / "missing.tsv")


def test_predict_inputs_refuse_a_last_column_of_text_as_training_does(tmp_path):
    """A headerless label<TAB>text file: finetune refused it with a hint, predict read the sentences as
    labels (and the labels as the texts to classify)."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on mat far home big small".split()
    rows = [(rng.choice(["pos", "neg"]), " ".join(rng.choice(words) for _ in range(6)) + f" {i}") for i in range(60)]
    p = tmp_path / "label_first.tsv"
    p.write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    with pytest.raises(DataError, match="looks like text; its first column has only 2 distinct"):
        read_tsv(p)
    with pytest.raises(DataError, match=r"looks like text; its first column .* or text alone"):
        read_inputs(p)
    # with a header it is read, by both
    p.write_text("label\ttext\n" + p.read_text())
    assert read_inputs(p) == ([t for _, t in rows], [y for y, _ in rows])


def test_a_single_name_that_is_also_a_common_value_is_no_header(tmp_path):
    """question, sentiment, topic, ... are label values too (dialog acts, topics): alone they do not make
    the first row a header, which would drop an example (or refuse the file)."""
    rows = [("how are you today?", "question"), ("I am fine thanks", "statement")] * 5
    p = _write(tmp_path / "acts.tsv", None, rows)
    assert read_tsv(p) == ([t for t, _ in rows], [y for _, y in rows])
    assert read_inputs(p) == ([t for t, _ in rows], [y for _, y in rows])
    topics = [("stocks fell sharply", "finance"), ("fans loved the film", "sentiment")] * 5
    p = _write(tmp_path / "topics.tsv", None, topics)
    assert read_tsv(p) == ([t for t, _ in topics], [y for _, y in topics])


def test_among_several_known_names_the_unambiguous_one_wins(tmp_path):
    """review<TAB>rating<TAB>label: the label is label, not rating; GLUE QNLI's
    index<TAB>question<TAB>sentence<TAB>label: the text is sentence, not question."""
    p = tmp_path / "r.tsv"
    p.write_text("review\trating\tlabel\ngreat stuff\t5\tpos\nawful\t1\tneg\n")
    assert read_tsv(p) == (["great stuff", "awful"], ["pos", "neg"])
    p = tmp_path / "qnli.tsv"
    p.write_text("index\tquestion\tsentence\tlabel\n0\twho?\tthe cat did\tentailment\n")
    assert read_tsv(p) == (["the cat did"], ["entailment"])
