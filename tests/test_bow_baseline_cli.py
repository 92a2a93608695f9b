"""bench/bow_baseline.py's command line: a --train or --eval file that is missing or not text<TAB>label
is a one-line error naming the flag (exit 2), not a DataError traceback. Nothing is fitted."""

import pytest
from conftest import bench_script, run_bench_main

bow_baseline = bench_script("bow_baseline")


def _main(monkeypatch, *argv):
    return run_bench_main(monkeypatch, "bow_baseline", *argv)


@pytest.mark.parametrize("broken", ["--train", "--eval"])
def test_a_missing_or_unreadable_file_is_one_line(broken, tmp_path, monkeypatch, capsys):
    good = tmp_path / "good.tsv"
    good.write_text("a fine day\tpositive\na bad day\tnegative\n")
    missing = tmp_path / "missing.tsv"
    files = {"--train": str(good), "--eval": str(good), broken: str(missing)}
    monkeypatch.setattr(bow_baseline, "fit", lambda *a, **k: pytest.fail("a model was fitted"))
    assert _main(monkeypatch, *[x for kv in files.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{broken} {missing}: no such file" in err, err
    (tmp_path / "nolabel.tsv").write_text("just text\n")
    files[broken] = str(tmp_path / "nolabel.tsv")
    assert _main(monkeypatch, *[x for kv in files.items() for x in kv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and broken in err and "label" in err, err
