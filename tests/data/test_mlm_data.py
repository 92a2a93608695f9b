"""MLM collator statistics, packing, dynamic padding, WordPiece tokenizer, TSV reading, corpus loading."""

import random

import pytest
import torch

from fastformer.data.corpus import DataError, FastformerWarning, load_texts, split_heldout
from fastformer.data.mlm import MLMCollator
from fastformer.data.packing import pack_stream, pad_batch, wrap
from fastformer.data.tokenizer import CLS, MASK, PAD, SEP, SPECIAL_TOKENS, encode_texts, special_ids, train_wordpiece
from fastformer.data.tsv import label_vocabulary, read_tsv

V = 1000


def _collator(**kw):
    return MLMCollator(vocab_size=V, mask_id=MASK, pad_id=PAD, special_ids=range(len(SPECIAL_TOKENS)), **kw)


def _examples(n=64, L=77, gen=None):
    out = []
    for i in range(n):
        body = torch.randint(len(SPECIAL_TOKENS), V, (L - 2 - (i % 13),), generator=gen)
        out.append(torch.cat([torch.tensor([CLS]), body, torch.tensor([SEP])]))
    return out


def test_collator_statistics_over_many_draws():
    coll = _collator()
    g = torch.Generator().manual_seed(0)
    n_cand = n_sel = n_mask = n_rand = n_same = 0
    for _ in range(40):
        ex = _examples(gen=g)
        b = coll(ex, g)
        ids, mask = pad_batch(ex, PAD, pad_to_multiple_of=8)
        sel = b["labels"] != -100
        special = torch.isin(ids, torch.arange(len(SPECIAL_TOKENS)))
        assert not (sel & special).any(), "a special token or padding was chosen"
        assert (b["labels"][sel] == ids[sel]).all(), "labels must be the original ids"
        cand = ~special
        n_cand += int(cand.sum())
        n_sel += int(sel.sum())
        n_mask += int((b["input_ids"][sel] == MASK).sum())
        changed = sel & (b["input_ids"] != ids) & (b["input_ids"] != MASK)
        n_rand += int(changed.sum())
        n_same += int((sel & (b["input_ids"] == ids)).sum())
        assert (b["input_ids"][~sel] == ids[~sel]).all(), "unselected tokens must be unchanged"
    p = n_sel / n_cand
    assert abs(p - 0.15) < 0.01, p
    assert abs(n_mask / n_sel - 0.8) < 0.02
    # A random replacement equals the original with probability ~1/V: count those as "same".
    assert abs(n_rand / n_sel - 0.1) < 0.015
    assert abs(n_same / n_sel - 0.1) < 0.015


def test_collator_is_seeded_and_pads_to_multiple_of_8():
    coll = _collator()
    ex = _examples(n=5, L=30)
    a = coll(ex, torch.Generator().manual_seed(7))
    b = coll(ex, torch.Generator().manual_seed(7))
    c = coll(ex, torch.Generator().manual_seed(8))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["labels"], c["labels"])
    assert a["input_ids"].shape == (5, 32) and a["attention_mask"].shape == (5, 32)
    assert a["attention_mask"].sum(1).tolist() == [e.numel() for e in ex]
    assert (a["input_ids"][~a["attention_mask"]] == PAD).all()
    full = coll([torch.arange(5, 21)] * 3, torch.Generator().manual_seed(0))
    assert full["attention_mask"] is None and full["input_ids"].shape == (3, 16)  # nothing padded: no mask


@pytest.mark.parametrize("special_ids", [[0, 1, 2, 3, 4, 49], [1, 2, 3, 4, 17, 30], [0, 2, 4, 6, 8, 10]])
def test_random_replacements_come_from_the_non_special_vocabulary_wherever_the_specials_lie(special_ids):
    # specials other than exactly 0..k (one at the end of the vocabulary, a gap, no id 0) were drawn
    # as replacements: the draw skipped specials only when they were the ids 0..k
    vocab, mask_id, pad_id = 50, 4, 0
    coll = MLMCollator(vocab_size=vocab, mask_id=mask_id, pad_id=pad_id, special_ids=special_ids, mlm_probability=0.5)
    special = torch.tensor(sorted(set(special_ids) | {mask_id, pad_id}))
    allowed = torch.tensor([i for i in range(vocab) if i not in special.tolist()])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab, dtype=torch.int64)
    for _ in range(30):
        ids = allowed[torch.randint(0, allowed.numel(), (64, 100), generator=g)]
        out, labels = coll.mask_tokens(ids, g)
        # a random replacement: a selected position neither masked nor (by chance) its own id
        replaced = (labels != -100) & (out != mask_id) & (out != ids)
        counts += torch.bincount(out[replaced], minlength=vocab)
    assert counts[special].sum() == 0, f"specials drawn: {counts[special].tolist()}"
    # uniform over the allowed ids (minus the chance of drawing the original): ~1/n each
    share = counts[allowed].float() / counts.sum()
    assert (share > 0).all() and (share - 1 / allowed.numel()).abs().max() < 0.35 / allowed.numel()


def test_contiguous_specials_keep_the_earlier_draw_bit_for_bit():
    # specials exactly 0..k: the replacement draw is randint(k + 1, V) as before, so earlier runs (their
    # seeds, their batches) reproduce, and the generator is left in the same state
    coll = _collator()
    ids = torch.randint(len(SPECIAL_TOKENS), V, (16, 40), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = CLS
    g_new, g_old = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    out, labels = coll.mask_tokens(ids, g_new)
    # the collator's draws as they were written before the non-contiguous case was fixed
    prob = torch.full(ids.shape, 0.15).masked_fill_(torch.isin(ids, torch.arange(len(SPECIAL_TOKENS))), 0.0)
    selected = torch.bernoulli(prob, generator=g_old).bool()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=g_old).bool() & selected
    to_random = torch.bernoulli(torch.full(ids.shape, 0.5), generator=g_old).bool() & selected & ~to_mask
    rand = torch.randint(len(SPECIAL_TOKENS), V, ids.shape, generator=g_old, dtype=torch.int64)
    expected = ids.clone()
    expected[to_mask] = MASK
    expected[to_random] = rand[to_random]
    assert torch.equal(out, expected) and torch.equal(labels, torch.where(selected, ids, -100))
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_collator_refuses_a_vocabulary_of_specials_only():
    with pytest.raises(ValueError, match="special_ids"):
        MLMCollator(vocab_size=5, mask_id=MASK, pad_id=PAD, special_ids=range(5))
    with pytest.raises(ValueError, match="vocab_size"):
        MLMCollator(vocab_size=0, mask_id=MASK, pad_id=PAD, special_ids=range(5))


def test_pack_stream_and_wrap():
    docs = [[5, 6, 7], [], [8, 9], [10, 11, 12, 13]]
    chunks = pack_stream(docs, 4, separator=3)
    assert [c.tolist() for c in chunks] == [[5, 6, 7, 3], [8, 9, 3, 10]]  # partial tail dropped
    assert [c.tolist() for c in pack_stream([[1, 2]], 4)] == [[1, 2]]  # kept when it is the only one
    assert [c.tolist() for c in wrap(chunks[:1], [CLS], [SEP])] == [[CLS, 5, 6, 7, 3, SEP]]
    with pytest.raises(ValueError, match="length"):
        pack_stream(docs, 0)


def test_wordpiece_tokenizer_roundtrip(tmp_path):
    texts = [f"the quick brown fox jumps over the lazy dog number {i}" for i in range(200)]
    tok = train_wordpiece(texts, vocab_size=120)
    assert [tok.token_to_id(s) for s in SPECIAL_TOKENS] == list(range(5)) and special_ids(tok) == [0, 1, 2, 3, 4]
    assert tok.get_vocab_size() <= 120
    ids = encode_texts(tok, ["The lazy dog"])[0]
    assert tok.decode(ids) == "the lazy dog"
    tok.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "tokenizer.json").stat().st_size > 0


def test_read_tsv_styles(tmp_path):
    (tmp_path / "h.tsv").write_text("sentence\tlabel\nfine film\t1\nbad film\t0\n")
    (tmp_path / "t.tsv").write_text("label\ttext\npos\tfine film\nneg\tbad film\n")
    (tmp_path / "n.tsv").write_text("fine film\tSci/Tech\nbad film\tWorld\n\n")
    assert read_tsv(tmp_path / "h.tsv") == (["fine film", "bad film"], ["1", "0"])
    assert read_tsv(tmp_path / "t.tsv") == (["fine film", "bad film"], ["pos", "neg"])
    assert read_tsv(tmp_path / "n.tsv") == (["fine film", "bad film"], ["Sci/Tech", "World"])
    (tmp_path / "o.tsv").write_text("label\ttitle\npos\tfine film\nneg\tbad film\n")  # text column unnamed
    assert read_tsv(tmp_path / "o.tsv") == (["fine film", "bad film"], ["pos", "neg"])
    assert label_vocabulary(["10", "2", "1"]) == ["1", "2", "10"]
    assert label_vocabulary(["b", "a"]) == ["a", "b"]


@pytest.mark.parametrize(
    "content,match",
    [("only text\nmore text\n", "no label column"), ("sentence\tscore\nx\t1\n", "no label column"), ("", "empty")],
)
def test_read_tsv_errors(tmp_path, content, match):
    (tmp_path / "bad.tsv").write_text(content)
    with pytest.raises(DataError, match=match):
        read_tsv(tmp_path / "bad.tsv")


def test_load_texts_files_folders_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("first doc line\n\nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third doc\n")
    assert load_texts([tmp_path / "a.txt"]) == ["first doc line", "second doc"]
    assert load_texts([tmp_path]) == ["first doc line", "second doc", "third doc"]
    with pytest.raises(DataError, match="no such file"):
        load_texts([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no text"):
        load_texts([tmp_path / "empty.txt"])
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_texts([tmp_path / "emptydir"])
    # no blank line at all but several lines (one article per line): a document per line
    (tmp_path / "lines.txt").write_text("first article\nsecond article\n\n")
    assert load_texts([tmp_path / "lines.txt"]) == ["first article", "second article"]
    train, held = split_heldout([f"d{i}" for i in range(100)])
    assert len(held) == 2 and not set(train) & set(held) and len(train) + len(held) == 100


def test_load_texts_warns_when_two_paths_reach_one_file(tmp_path):
    """`--data f f` (or a file and its folder) reads the file twice, as `cat f f` does; a held-out
    document can then also be a training one, so it is said, once per repeating path."""
    import warnings

    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.txt").write_text("three\n")
    with pytest.warns(FastformerWarning, match=r"--data .*a\.txt is given twice; their documents are read twice"):
        docs = load_texts([tmp_path / "a.txt", tmp_path / "a.txt"])
    assert docs == ["one", "two", "one", "two"]
    with pytest.warns(FastformerWarning, match=r"1 file\(s\) are also given by --data .*a\.txt"):
        assert len(load_texts([tmp_path / "a.txt", tmp_path])) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_texts([tmp_path / "a.txt", tmp_path / "b.txt"]) == ["one", "two", "three"]


def test_wordpiece_vocabulary_is_reproducible_across_processes():
    # the trainer's ##-symbol ids came from a per-process random hash order, so two runs of the
    # same command learned different vocabularies (and an uninterrupted run differed from a resumed one)
    import subprocess
    import sys

    code = (
        "import random, json; from fastformer.data.tokenizer import train_wordpiece; r = random.Random(0); "
        "t = [' '.join(''.join(r.choice('abcdefgh') for _ in range(r.randint(2, 6))) for _ in range(10)) "
        "for _ in range(200)]; print(json.dumps(train_wordpiece(t, vocab_size=300).get_vocab(), sort_keys=True))"
    )
    outs = {
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(outs) == 1


def test_bom_header_and_crlf_tsv_and_unknown_suffix_text_files(tmp_path):
    # a UTF-8 BOM (Excel/Windows export) must not hide the header row; CRLF endings are fine
    (tmp_path / "bom.tsv").write_bytes("\ufefftext\tlabel\r\nfine film\tpos\r\nbad film\tneg\r\n".encode())
    assert read_tsv(tmp_path / "bom.tsv") == (["fine film", "bad film"], ["pos", "neg"])
    # a folder of text files with other suffixes (wiki.train.raw, ...) is read; binary files are not
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "wiki.train.raw").write_text("raw text doc\n")
    (tmp_path / "c" / "blob.bin").write_bytes(b"\x00\x01binary")
    with pytest.warns(FastformerWarning, match="skipped 1 binary file"):
        assert load_texts([tmp_path / "c"]) == ["raw text doc"]


def test_headerless_extra_columns_stay_in_the_text_and_binary_data_is_refused(tmp_path):

    (tmp_path / "t.tsv").write_text("a title\tits body\tSports\nother\ttext\tWorld\n")
    assert read_tsv(tmp_path / "t.tsv") == (["a title\tits body", "other\ttext"], ["Sports", "World"])
    (tmp_path / "x.bin").write_bytes(b"\x00\x01\x02binary\x00" * 100)
    with pytest.raises(DataError, match="binary"):
        load_texts([tmp_path / "x.bin"])
    (tmp_path / "u16.txt").write_text("first document\n\nsecond one", encoding="utf-16")  # with its BOM
    assert load_texts([tmp_path / "u16.txt"]) == ["first document", "second one"]


def test_a_folder_skips_binary_files_whatever_their_suffix_with_one_warning(tmp_path):
    """A binary file named in --data is refused; one found in a folder used to be read as text when its
    suffix was a text one or none (an executable, a .txt with NUL bytes): now skipped, said once."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("a text document\n")
    (d / "lsbin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)  # an executable
    (d / "nul.txt").write_bytes(b"x\0y")
    (d / "u16.txt").write_text("a UTF-16 document", encoding="utf-16")  # NUL bytes, but its BOM: text
    (d / "empty.txt").write_text("")
    with pytest.warns(FastformerWarning) as rec:
        assert load_texts([d]) == ["a text document", "a UTF-16 document"]
    assert len(rec) == 1, [str(w.message) for w in rec]
    msg = str(rec[0].message)
    assert f"--data {d}: skipped 2 binary file(s)" in msg and msg.endswith(str(d / "lsbin")), msg
    (d / "a.txt").unlink()
    (d / "u16.txt").unlink()
    with pytest.warns(FastformerWarning, match="skipped 2"), pytest.raises(DataError, match="no text"):
        load_texts([d])


def test_headerless_label_first_file_is_refused_with_a_hint(tmp_path):
    """label<TAB>text without a header would train on every text as its own class: refused, saying why;
    the same rows with a header, or many short labels (a real many-class task), are read."""
    rng = random.Random(0)
    words = "the a cat dog sat ran on mat far home big small".split()
    rows = [(rng.choice(["pos", "neg"]), " ".join(rng.choice(words) for _ in range(6)) + f" {i}") for i in range(60)]
    (tmp_path / "lf.tsv").write_text("".join(f"{label}\t{text}\n" for label, text in rows))
    with pytest.raises(DataError, match=r"lf.tsv: without a header .* 60 distinct values in 60 rows.*only 2 distinct"):
        read_tsv(tmp_path / "lf.tsv")
    (tmp_path / "lfh.tsv").write_text("label\ttext\n" + "".join(f"{label}\t{text}\n" for label, text in rows))
    assert read_tsv(tmp_path / "lfh.tsv")[1] == [label for label, _ in rows]
    (tmp_path / "many.tsv").write_text("".join(f"{text}\tclass_{i}\n" for i, (_, text) in enumerate(rows)))
    assert len(set(read_tsv(tmp_path / "many.tsv")[1])) == 60  # one-word labels: a many-class file
