"""Text-to-text pairs: TSV reading with and without a header, encoding with EOS, the seq2seq collator."""

import pytest
import torch

from fastformer.data.corpus import DataError, FastformerWarning
from fastformer.data.text2text import Seq2SeqCollator, encode_pairs, read_generation_inputs, read_pairs
from fastformer.data.unigram_tokenizer import EOS, train_unigram


def _write(tmp_path, text, name="pairs.tsv"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def test_header_input_target(tmp_path):
    p = _write(tmp_path, "input\ttarget\nThe cat sat.\tcat sits\nA dog ran far.\tdog runs\n")
    assert read_pairs(p) == (["The cat sat.", "A dog ran far."], ["cat sits", "dog runs"])


def test_header_columns_in_any_order_and_classification_style(tmp_path):
    p = _write(tmp_path, "headline\tid\tdescription\nshort one\t7\ta long text\n")
    assert read_pairs(p) == (["a long text"], ["short one"])
    p = _write(tmp_path, "sentence\tlabel\ngreat film\tpositive\nawful\tnegative\n", "cls.tsv")
    assert read_pairs(p) == (["great film", "awful"], ["positive", "negative"])


def test_no_header_last_column_is_the_target(tmp_path):
    # a tab inside the input: everything before the last column is the input; a UTF-8 BOM is dropped
    p = _write(tmp_path, "\ufeffone\ttwo\tthree\nfour\tfive\n\n")
    assert read_pairs(p) == (["one\ttwo", "four"], ["three", "five"])


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("input\ttarget\n", "no data rows"),
        ("a\tb\nonly one column\n", "row 2"),
        ("input\ttarget\nx\n", "row 1"),
        ("input\ttarget\na\tb\nc\t  \n", "row 2 has an empty target"),
    ],
)
def test_bad_files_raise_data_error(tmp_path, text, match):
    with pytest.raises(DataError, match=match):
        read_pairs(_write(tmp_path, text))
    with pytest.raises(DataError, match="no such file"):
        read_pairs(tmp_path / "missing.tsv")


def test_binary_and_utf16_files(tmp_path):
    p = tmp_path / "bin.tsv"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(DataError, match="binary"):
        read_pairs(p)
    p = tmp_path / "u16.tsv"
    p.write_bytes("input\ttarget\nein Satz\tSatz\n".encode("utf-16"))
    assert read_pairs(p) == (["ein Satz"], ["Satz"])


def test_generation_inputs_with_and_without_targets(tmp_path):
    assert read_generation_inputs(_write(tmp_path, "description\theadline\nlong text\tshort\n")) == (
        ["long text"],
        ["short"],
    )
    assert read_generation_inputs(_write(tmp_path, "a b\tc\nd\te\n", "x.tsv")) == (["a b", "d"], ["c", "e"])
    assert read_generation_inputs(_write(tmp_path, "just one\nand two\n", "y.tsv")) == (["just one", "and two"], None)
    assert read_generation_inputs(_write(tmp_path, "x\ty\n\nsecond line\n", "z.txt")) == (["x\ty", "second line"], None)
    with pytest.raises(DataError, match="no such file"):
        read_generation_inputs(tmp_path / "missing.txt")
    # a header naming the input column alone is a header, not a text; tabs in a headed row's text stay in it
    assert read_generation_inputs(_write(tmp_path, "input\napple pie\nsun\n", "h.tsv")) == (["apple pie", "sun"], None)
    assert read_generation_inputs(_write(tmp_path, "input\ttarget\nNEW\tYORK\tcity\n", "t.tsv")) == (
        ["NEW\tYORK"],
        ["city"],
    )
    assert read_pairs(_write(tmp_path, "input\ttarget\nNEW\tYORK\tcity\n", "t.tsv")) == (["NEW\tYORK"], ["city"])


def test_a_file_that_is_not_utf8_is_read_with_a_warning(tmp_path):
    p = tmp_path / "latin1.tsv"
    p.write_bytes("input\ttarget\ncaf\u00e9 au lait\tcaf\u00e9\n".encode("latin-1"))
    with pytest.warns(UnicodeWarning, match=r"latin1.tsv: not UTF-8 .* 2 undecodable") as rec:
        inputs, targets = read_pairs(p)
    assert issubclass(rec[0].category, FastformerWarning)  # the CLI prints it as one `fastformer: warning:` line
    assert inputs == ["caf\ufffd au lait"] and targets == ["caf\ufffd"]


def test_encode_pairs_truncates_before_eos_and_collator_pads():
    tok = train_unigram(["the cat sat on the mat", "a dog ran in the park"] * 20, vocab_size=200)
    ex = encode_pairs(
        tok,
        ["the cat sat on the mat", "a dog"],
        ["cat", "a dog ran in the park"],
        max_len=5,
        max_target_len=4,
        eos_id=EOS,
    )
    for src, tgt in ex:
        assert src[-1] == EOS and tgt[-1] == EOS and len(src) <= 5 and len(tgt) <= 4
        assert EOS not in src[:-1].tolist() and EOS not in tgt[:-1].tolist()
    assert len(ex[0][0]) == 5 and len(ex[1][1]) == 4  # truncated ones keep their EOS
    batch = Seq2SeqCollator(pad_id=0, pad_to_multiple_of=8)(ex)
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].shape == (2, 8)
    for i, (src, tgt) in enumerate(ex):
        n, m = len(src), len(tgt)
        assert torch.equal(batch["input_ids"][i, :n], src) and bool((batch["input_ids"][i, n:] == 0).all())
        assert batch["attention_mask"][i].tolist() == [True] * n + [False] * (8 - n)
        assert torch.equal(batch["labels"][i, :m], tgt) and bool((batch["labels"][i, m:] == -100).all())
    with pytest.raises(ValueError, match="max_len"):
        encode_pairs(tok, ["a"], ["b"], max_len=1, max_target_len=4, eos_id=EOS)


def test_generation_inputs_with_some_empty_targets_say_they_are_not_scored(tmp_path):
    """One empty target turned scoring off for the whole file without a word; the generations are
    still made (the inputs come back), and the warning says why there is no ROUGE."""
    p = _write(tmp_path, "input\ttarget\na b\tc\nd e\t \nf g\th\n")
    with pytest.warns(FastformerWarning, match=r"1 of 3 rows have an empty target \(the first is data row 2\)"):
        assert read_generation_inputs(p) == (["a b", "d e", "f g"], None)
