"""Input files that used to be read wrongly or refused with a misleading message: a stray blank line in
a --data file, TSV rows ending in a tab, a lone carriage return in a TSV field, a Unigram --vocab-size
below the text's characters, a span --seq-len beyond the sentinels."""

import random
import warnings

import pytest

from fastformer.data.corpus import DataError, FastformerWarning, load_texts, split_heldout
from fastformer.data.span_corruption import max_inputs_length, noise_counts, span_corruption_lengths
from fastformer.data.text2text import read_generation_inputs, read_pairs
from fastformer.data.tsv import read_inputs, read_tsv
from fastformer.data.unigram_tokenizer import train_unigram


def _lines(n=1500, seed=0):
    rng = random.Random(seed)
    words = "the a cat dog sat ran on mat far home big small river market price rose fell".split()
    return [" ".join(rng.choice(words) for _ in range(30)) for _ in range(n)]


# ---- the held-out slice of a corpus of few, large documents ----


def test_a_stray_blank_line_gives_one_warning_about_the_held_out_share(tmp_path):
    """One blank line in a one-document-per-line file makes two documents, one of them held out (half
    the text) without a word: now a warning says how much of the text is held out, why, what to do."""
    lines = _lines()
    (tmp_path / "lines.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "blank.txt").write_text("\n".join(lines[:700]) + "\n\n" + "\n".join(lines[700:]) + "\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a corpus of many documents: no warning
        train, held = split_heldout(load_texts([tmp_path / "lines.txt"]))
    assert len(held) == 30 and len(train) == 1470
    docs = load_texts([tmp_path / "blank.txt"])
    assert len(docs) == 2
    with pytest.warns(FastformerWarning) as rec:
        train, held = split_heldout(docs)
    assert len(rec) == 1, [str(w.message) for w in rec]
    msg = str(rec[0].message)
    share = sum(map(len, held)) / sum(map(len, docs))
    assert msg.startswith(f"the held-out slice is 1 of 2 documents but holds {share:.0%} of the text"), msg
    assert "blank lines" in msg and "remove stray blank lines" in msg, msg
    assert len(train) == 1 and len(held) == 1  # which documents are held out is unchanged


def test_the_held_out_documents_stay_the_same():
    """Existing runs stay reproducible: the slice is drawn as before (values of the earlier version)."""
    assert split_heldout([f"d{i}" for i in range(100)])[1] == ["d71", "d80"]
    held = split_heldout([f"d{i}" for i in range(1000)])[1]
    assert held[:5] == ["d44", "d56", "d258", "d306", "d314"] and len(held) == 20


def test_the_held_out_warning_is_given_on_the_main_process_only(monkeypatch):
    import fastformer.data.corpus as corpus

    monkeypatch.setattr(corpus, "_first_process", lambda: False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_heldout(["a short document", "a much longer document " * 50])


# ---- TSV rows ----


def test_rows_ending_in_a_tab_are_read_without_a_header_too(tmp_path):
    """`good movie<TAB>pos<TAB>`: read with a header; without one it was refused ("empty label",
    "empty target") or, for predict, the label was glued into the text."""
    p = tmp_path / "t.tsv"
    p.write_text("good movie\tpos\t\nbad movie\tneg\t \n")
    expected = (["good movie", "bad movie"], ["pos", "neg"])
    assert read_tsv(p) == expected
    assert read_pairs(p) == expected
    assert read_inputs(p) == expected
    assert read_generation_inputs(p) == expected
    (tmp_path / "h.tsv").write_text("sentence\tlabel\t\ngood movie\tpos\t\nbad movie\tneg\n")
    assert read_tsv(tmp_path / "h.tsv") == expected
    assert read_pairs(tmp_path / "h.tsv") == expected
    # texts alone, each row ending in a tab: texts, no labels
    (tmp_path / "x.tsv").write_text("good movie\t\nbad movie\t\n")
    assert read_inputs(tmp_path / "x.tsv") == (["good movie", "bad movie"], None)


def test_rows_ending_in_a_tab_keep_a_tab_inside_a_text(tmp_path):
    """Every line ending in a tab and a text holding a tab: with a header the rows were fitted to the
    header's width counting its trailing empty cell, so the text's second half became the label;
    without one the file was refused ("empty label") unless all rows had the same width."""
    (tmp_path / "h.tsv").write_text("text\tlabel\t\ngood\tmovie\tpos\t\nbad film\tneg\t\n")
    assert read_tsv(tmp_path / "h.tsv") == (["good\tmovie", "bad film"], ["pos", "neg"])
    (tmp_path / "p.tsv").write_text("input\ttarget\t\nsome\tinput\tout one\t\nother input\tout two\t\n")
    assert read_pairs(tmp_path / "p.tsv") == (["some\tinput", "other input"], ["out one", "out two"])
    assert read_generation_inputs(tmp_path / "p.tsv") == (["some\tinput", "other input"], ["out one", "out two"])
    (tmp_path / "n.tsv").write_text("good movie\tpos\t\nbad\tfilm\tneg\t\nfine one\tpos\t\n")
    assert read_tsv(tmp_path / "n.tsv") == (["good movie", "bad\tfilm", "fine one"], ["pos", "neg", "pos"])


def test_trailing_tabs_change_nothing_else(tmp_path):
    """Only a whole headerless table of rows ending in a tab loses that last cell: a header with a
    trailing tab keeps its columns, a text with a tab keeps it, and a missing label is still one."""
    (tmp_path / "h.tsv").write_text("input\t\nhello\tbonjour\nbye\tau revoir\n")  # header ends in a tab
    assert read_pairs(tmp_path / "h.tsv") == (["hello", "bye"], ["bonjour", "au revoir"])
    assert read_generation_inputs(tmp_path / "h.tsv") == (["hello", "bye"], ["bonjour", "au revoir"])
    (tmp_path / "t.tsv").write_text("text\t\nhello\tpos\nbye\tneg\n")
    assert read_inputs(tmp_path / "t.tsv") == (["hello", "bye"], None)
    ragged = tmp_path / "r.tsv"  # rows of different widths: a tab inside a text, not a table's last column
    ragged.write_text("hello world\t\nthe cat\tsat on the mat\t\nfine day\t\n")
    assert read_inputs(ragged)[0] == ["hello world", "the cat\tsat on the mat", "fine day"]
    (tmp_path / "m.tsv").write_text("a\tb\tpos\nc\td\t\n")
    with pytest.raises(DataError, match="data row 2 has an empty label"):
        read_tsv(tmp_path / "m.tsv")
    with pytest.raises(DataError, match="data row 2 has an empty target"):
        read_pairs(tmp_path / "m.tsv")


def test_an_empty_label_before_trailing_tabs_is_still_an_empty_label(tmp_path):
    (tmp_path / "e.tsv").write_text("good movie\tpos\nbad movie\t\t\n")
    with pytest.raises(DataError, match="data row 2 has an empty label"):
        read_tsv(tmp_path / "e.tsv")
    with pytest.raises(DataError, match="data row 2 has an empty target"):
        read_pairs(tmp_path / "e.tsv")
    # a header naming three columns: an empty last one is an empty label, not a missing column
    (tmp_path / "i.tsv").write_text("idx\tsentence\tlabel\n0\tgood movie\tpos\n1\tbad movie\t\n")
    with pytest.raises(DataError, match="data row 2 has an empty label"):
        read_tsv(tmp_path / "i.tsv")


def test_a_lone_carriage_return_stays_in_its_row(tmp_path):
    """csv.reader ended a row at a lone \\r, so the file was refused ("data row 1 has no label column")."""
    p = tmp_path / "cr.tsv"
    p.write_bytes(b"good\rmovie\tpos\nbad movie\tneg\n")
    assert read_tsv(p) == (["good movie", "bad movie"], ["pos", "neg"])
    assert read_pairs(p) == (["good movie", "bad movie"], ["pos", "neg"])
    assert read_inputs(p) == (["good movie", "bad movie"], ["pos", "neg"])
    # CRLF endings, and a file whose rows all end with \r (old Mac): rows as before
    for raw in (
        b"text\tlabel\r\ngood movie\tpos\r\nbad movie\tneg\r\n",
        b"good movie\tpos\rbad movie\tneg\r",
        b"good movie\tpos\rbad movie\tneg\n",  # old Mac rows with a final \n
        b"sentence\tlabel\rgood movie\tpos\rbad movie\tneg\r\n",
    ):
        p.write_bytes(raw)
        assert read_tsv(p) == (["good movie", "bad movie"], ["pos", "neg"])
        assert read_pairs(p) == (["good movie", "bad movie"], ["pos", "neg"])


# ---- tokenizer and span objective limits ----


def test_a_unigram_vocab_size_below_the_characters_is_a_data_error():
    """It was a bare `Exception: The vocabulary is not large enough to contain all chars` traceback."""
    rng = random.Random(0)
    texts = ["".join(chr(0x4E00 + rng.randint(0, 399)) for _ in range(30)) + " ab" for _ in range(300)]
    with pytest.raises(DataError) as info:
        train_unigram(texts, 502)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("--vocab-size 502 is too small for this text"), msg
    assert "403 distinct characters" in msg and "use --vocab-size 507 or more" in msg, msg
    assert 403 < train_unigram(texts, 507).get_vocab_size() <= 507  # the size it names is enough


@pytest.mark.parametrize("size", [503, 504, 505, 506])
def test_a_unigram_vocabulary_never_exceeds_vocab_size(size):
    """Just above characters + sentinels the trainer did not fail but overshot its target: --vocab-size
    503 for 403 characters gave 512 entries. Such a size is refused, naming the size that is enough."""
    rng = random.Random(0)
    texts = ["".join(chr(0x4E00 + rng.randint(0, 399)) for _ in range(30)) + " ab" for _ in range(300)]
    with pytest.raises(DataError, match="use --vocab-size 507 or more"):
        train_unigram(texts, size)


def test_max_inputs_length_is_the_longest_seq_len_the_sentinels_allow():
    assert max_inputs_length(100) == 1809
    for n in (1, 2, 7, 100):
        m = max_inputs_length(n)
        assert noise_counts(span_corruption_lengths(m)[0])[1] <= n < noise_counts(span_corruption_lengths(m + 1)[0])[1]


def test_a_text_file_has_one_input_per_line_whatever_its_characters(tmp_path):
    """str.splitlines also ended lines at U+2028, form feeds, \\x0b, U+0085 and a lone CR: a 4-line file
    gave 7 inputs, so predict's output rows no longer matched the file's lines."""
    p = tmp_path / "in.txt"
    p.write_bytes("Stocks fell\nThe team won\u2028the cup\nOil\x0crose\x85again\nA good\rmovie\n\n".encode())
    want = ["Stocks fell", "The team won\u2028the cup", "Oil\x0crose\x85again", "A good movie"]
    assert read_inputs(p) == (want, None)
    assert read_generation_inputs(p) == (want, None)
    mac = tmp_path / "mac.txt"  # no line feed at all: carriage returns end the lines
    mac.write_bytes(b"first line\rsecond line\r")
    assert read_inputs(mac) == (["first line", "second line"], None)
