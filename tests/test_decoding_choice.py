"""bench/decoding_choice.py: a decoding setting is chosen on the first test pairs and scored on the others."""

import pytest
from conftest import bench_script

dc = bench_script("decoding_choice")


def test_grid_starts_with_plain_decoding_and_has_no_duplicates():
    assert dc.decoding_grid([2.0, 1.0, 2.0], [3, 0]) == [(1.0, 0), (2.0, 3), (2.0, 0), (1.0, 3)]
    assert dc.decoding_grid([1.5], [3])[0] == dc.PLAIN  # plain is always a candidate
    with pytest.raises(ValueError, match="penalties"):
        dc.decoding_grid([0.0], [0])
    with pytest.raises(ValueError, match="no-repeat"):
        dc.decoding_grid([1.0], [-1])


TARGETS = ["a b", "c d", "e f", "g h", "i j", "k l"]


def _preds(select_right, rest_right):
    """Predictions equal to the targets where `*_right`, another text elsewhere (first 2 = select rows)."""
    return [t if (select_right if i < 2 else rest_right) else "zz" for i, t in enumerate(TARGETS)]


def test_setting_best_on_select_rows_is_chosen_and_scored_on_the_other_rows_only():
    good_early = (2.0, 0)  # right on the select rows, wrong on the rest: chosen, then scores 0
    preds = {
        run: {dc.PLAIN: _preds(False, True), good_early: _preds(True, False), (4.0, 3): _preds(False, False)}
        for run in ("pretrained_seed0", "random_seed0")
    }
    got = dc.choose_and_score(preds, TARGETS, n_select=2, lead=dc.lead_texts(TARGETS[:2] + ["x"] * 4, 1))
    assert got["lead_baseline"]["rougeL"] == 0.0  # scored on the other rows only, where the lead is wrong
    assert got["chosen"] == {"encoder_repetition_penalty": 2.0, "no_repeat_ngram_size": 0}
    assert got["select"] == {"erp1_nr0": 0.0, "erp2_nr0": 1.0, "erp4_nr3": 0.0}
    assert got["n_select"] == 2 and got["n_scored"] == 4
    for run in preds:
        assert got["scores"][run]["chosen"]["rougeL"] == 0.0
        assert got["scores"][run]["plain"]["rougeL"] == 1.0


def test_a_tie_keeps_plain_decoding_and_the_mean_runs_over_all_runs():
    # run A: the penalty wins on the select rows; run B: plain does; the mean ties -> plain (listed first)
    preds = {
        "A": {dc.PLAIN: _preds(False, True), (1.3, 3): _preds(True, True)},
        "B": {dc.PLAIN: _preds(True, True), (1.3, 3): _preds(False, True)},
    }
    assert dc.choose_and_score(preds, TARGETS, 2)["chosen"] == {
        "encoder_repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
    }


def test_bad_splits_and_settings_are_refused():
    preds = {"A": {dc.PLAIN: list(TARGETS)}}
    for n in (0, len(TARGETS)):
        with pytest.raises(ValueError, match="--select-decoding"):
            dc.choose_and_score(preds, TARGETS, n)
    with pytest.raises(ValueError, match="same settings"):
        dc.choose_and_score({"A": {dc.PLAIN: TARGETS}, "B": {(2.0, 0): TARGETS}}, TARGETS, 2)


def test_predictions_are_cached_per_run_setting_and_inputs(tmp_path):
    calls = []

    def generate(out=("x  y", "a\nb", "")):
        calls.append(1)
        return list(out)

    inputs = ["i1", "i2", "i3"]
    first = dc.cached_predictions(tmp_path, (1.3, 3), inputs, generate, max_len=16)
    assert first == ["x y", "a b", ""] and (tmp_path / "decoding" / "erp1.3_nr3.txt").is_file()
    assert dc.cached_predictions(tmp_path, (1.3, 3), inputs, generate, max_len=16) == first and len(calls) == 1
    # other inputs (same count) or other generation settings: generated again, never the stale file
    dc.cached_predictions(tmp_path, (1.3, 3), ["i1", "i2", "other"], generate, max_len=16)
    dc.cached_predictions(tmp_path, (1.3, 3), ["i1", "i2", "other"], generate, max_len=32)
    assert len(calls) == 3
    with pytest.raises(RuntimeError, match="3 predictions for 4 inputs"):
        dc.cached_predictions(tmp_path, (1.3, 3), inputs + ["i4"], generate, max_len=16)


def test_grid_refuses_values_that_share_a_file_name():
    with pytest.raises(ValueError, match="too close"):
        dc.decoding_grid([1.0, 1.0000001], [0])
    with pytest.raises(ValueError, match="finite"):
        dc.decoding_grid([float("inf")], [0])
