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


def test_text2text_summary_says_one_step():
    from fastformer.train.text2text import describe_summary

    generation = {"num_beams": 1, "max_new_tokens": 8}
    s = dict(steps=1, seconds=2.0, source="random init (t5-tiny)", n_eval=4, generation=generation)
    s.update(rouge1=0.5, rouge2=0.25, rougeL=0.5, exact_match=0.0, out_dir="runs/x")
    text = describe_summary(s)
    assert "1 step in 2 s" in text and "1 steps" not in text
    assert "2 steps in" in describe_summary({**s, "steps": 2})
