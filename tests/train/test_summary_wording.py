"""The end-of-run summary names the accuracy the objective actually measures (the metric key stays
`eval_accuracy` for every objective: metrics.jsonl readers rely on it)."""

import json

import pytest

from fastformer.train.objectives import get_objective

# tiny generated corpora: a held-out slice of one or two examples, said in a warning
pytestmark = pytest.mark.filterwarnings("ignore:the held-out slice", "ignore:--eval .* has only")


def test_each_objective_names_its_accuracy():
    assert get_objective("mlm").accuracy_name == "MLM accuracy"
    assert get_objective("span").accuracy_name == "token accuracy"


def test_span_pretrain_summary_says_token_accuracy(tmp_path, capsys):
    from fastformer import cli

    corpus = tmp_path / "corpus.txt"
    # 100 documents (blank-line separated) so the held-out slice is long enough for an eval example
    corpus.write_text(
        "\n\n".join(
            " ".join(f"doc {d} line {i} is about cats and dogs and rivers ." for i in range(12)) for d in range(100)
        )
    )
    out = tmp_path / "pre"
    rc = cli.main(
        [
            "pretrain",
            "--objective",
            "span",
            "--model",
            "t5-tiny",
            "--data",
            str(corpus),
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--vocab-size",
            "150",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--no-progress",
            "--log-every",
            "1",
        ]
    )
    assert rc in (0, None)
    printed = capsys.readouterr().out
    assert "eval token accuracy" in printed and "MLM" not in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_accuracy" in rows[-1]
