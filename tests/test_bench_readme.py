"""bench/README.md is generated from bench/README.in.md and bench/results/ by bench/make_readme.py: the
committed file must be what the script writes (no benchmark runs here), and the script must cope with
result files it does not know."""

import json
from pathlib import Path

import pytest
from conftest import bench_script

ROOT = Path(__file__).resolve().parents[1]
make_readme = bench_script("make_readme")


def test_committed_bench_readme_is_what_the_generator_writes(tmp_path):
    out = tmp_path / "README.md"
    assert make_readme.main(["--out", str(out)]) == 0
    committed = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    assert committed == out.read_text(encoding="utf-8"), (
        "bench/README.md does not match bench/README.in.md and bench/results/: run `python bench/make_readme.py` "
        "and commit bench/README.md"
    )
    assert make_readme.main(["--check"]) == 0
    # every result file is in it, by name
    for p in (ROOT / "bench" / "results").iterdir():
        if p.is_file() and not p.name.startswith("."):
            assert f"results/{p.name}" in committed, p.name


def _harness(path, name, rows, **meta):
    path.write_text(
        json.dumps(
            {"meta": {"benchmark": name, "device": "cpu-1threads-Some_CPU", "torch": "2.0", **meta}, "rows": rows}
        )
    )


def test_unknown_and_new_result_files_are_rendered_or_listed(tmp_path, capsys):
    res = tmp_path / "results"
    res.mkdir()
    # a benchmark the generator does not know: a generic table, constant columns in a note, errors listed
    _harness(
        res / "fancy_op_cpu-1threads-Some_CPU.json",
        "fancy_op",
        [
            {
                "benchmark": "fancy_op",
                "case": "n=8",
                "provider": "fastformer",
                "ms": 1.25,
                "dtype": "fp32",
                "nested": {},
            },
            {"benchmark": "fancy_op", "case": "n=8", "provider": "torch", "ms": 2.5, "dtype": "fp32", "nested": {}},
            {"benchmark": "fancy_op", "case": "n=9", "provider": "torch", "dtype": "fp32", "error": "OOM | big"},
        ],
        date="2030-01-02",
        commit="abc123",
    )
    (res / "fancy_op_cpu-1threads-Some_CPU.png").write_bytes(b"\x89PNG")
    # a known benchmark that has no committed result yet, with an unexpected shape (a string row)
    _harness(
        res / "t5_attention_NVIDIA_X.json",
        "t5_attention",
        [
            {"case": "encoder L=512", "provider": "fastformer", "ms": 0.5, "peak_extra_mb": 3.0, "dtype": "bfloat16"},
            {"case": "encoder L=512", "provider": "eager", "ms": 2.0, "peak_extra_mb": 30.0, "dtype": "bfloat16"},
        ],
        device="NVIDIA_X",
    )
    # the text-to-text experiment in the shape bench/text2text_benefit.py writes
    (res / "text2text_benefit_cpu.json").write_text(
        json.dumps(
            {
                "settings": {"seeds": [0, 1], "omp_num_threads": "1", "tag": "cpu", "data_dir": "/somewhere/agnews"},
                "machine": {"cpu": "Some EPYC 7000", "cores": 2, "threads": 2},
                "pretraining": {"model": "t5-tiny", "steps": 3000, "data": ["/somewhere/agnews/unlabeled.txt"]},
                "baseline": {
                    "method": "lead-10",
                    "rouge1": 0.2,
                    "rouge2": 0.05,
                    "rougeL": 0.17,
                    "exact_match": 0.0,
                    "n_eval": 2000,
                },
                "summary": {
                    "headlines": [
                        {
                            "n_train": 1000,
                            "pretrained": {k: [0.3, 0.01] for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
                            "random": {k: [0.2, 0.02] for k in ("rouge1", "rouge2", "rougeL", "exact_match")},
                            "rougeL_gain": [0.1, 0.01],
                        }
                    ],
                    "classification": [
                        {
                            "init": "pretrained",
                            "n_train": 100,
                            "text": [0.5, 0.1, [0, 1]],
                            "head": [0.4, 0.1, [0, 1]],
                            "text_minus_head": [0.1, 0.05],
                        }
                    ],
                },
                "results": [],
            }
        )
    )
    (res / "text2text_benefit_cpu_estimate.json").write_text(json.dumps({"settings": {}, "estimate": {}}))
    (res / "notes.json").write_text(json.dumps([1, 2, 3]))  # JSON, but no result format
    (res / "broken.json").write_text("{not json")
    (res / "run.log").write_text("log\n")

    text, covered = make_readme.render_results(res)
    assert covered == sorted(p.name for p in res.iterdir())  # nothing left out
    fancy = text[text.index("### `fancy_op`") :]
    assert "CPU: Some CPU, 1 thread; torch 2.0, measured 2030-01-02, commit `abc123`" in fancy
    assert "| case | provider | ms |" in fancy and "| n=8 | torch | 2.50 |" in fancy and "nested" not in fancy
    assert "Every row: dtype fp32." in fancy
    assert "Not measured: torch on n=9 (OOM \\| big)." in fancy
    assert "[fancy_op_cpu-1threads-Some_CPU.png](results/fancy_op_cpu-1threads-Some_CPU.png)" in fancy
    assert "### T5 relative-position attention" in text and "| encoder L=512 | 0.500 | 2.00 |" in text
    assert "| – | lead-10 baseline | 0.2000 |" in text and "+10.00 ± 1.00 points" in text
    assert "| pretrained | 100 | 0.5000 ± 0.1000 | 0.4000 ± 0.1000 | 0.1000 ± 0.0500 |" in text
    assert "/somewhere" not in text  # no paths from the machine that ran it
    assert "CPU runs (tag `cpu`; Some EPYC 7000, 2 threads per run)" in text
    for name, why in (
        ("notes.json", "no table"),
        ("broken.json", "not readable as JSON"),
        ("text2text_benefit_cpu_estimate.json", "no table"),
        ("run.log", "a log"),
    ):
        line = next(x for x in text.splitlines() if x.startswith(f"- [{name}]"))
        assert why in line, line
    # known sections come in the README's order, unknown benchmarks after them
    assert text.index("T5 relative-position") < text.index("Text-to-text benefit") < text.index("`fancy_op`")

    tpl = tmp_path / "README.in.md"
    tpl.write_text("# Benchmarks\n\n{{results}}\n")
    assert make_readme.render(tpl, res).startswith(make_readme.HEADER + "# Benchmarks\n\n### ")
    tpl.write_text("no marker\n")
    try:
        make_readme.render(tpl, res)
        raise AssertionError("a template without the marker must be refused")
    except ValueError as e:
        assert "{{results}}" in str(e)
    # --check on a stale README says which command fixes it
    stale = tmp_path / "stale.md"
    stale.write_text("old\n")
    assert make_readme.main(["--check", "--out", str(stale), "--results", str(res)]) == 1
    assert "run `python bench/make_readme.py`" in capsys.readouterr().err


def _attention_rows(case, kind, tflops):
    """Measured rows of one attention case: provider -> (fwd TFLOP/s, fwd+bwd TFLOP/s)."""
    return [
        {"benchmark": "attention", "case": case, "kind": kind, "provider": p, "fwd_tflops": f, "fwdbwd_tflops": fb}
        for p, (f, fb) in tflops.items()
    ]


@pytest.mark.parametrize(
    ("machine", "where"),
    [
        (None, "the file does not name the processor"),
        ({"cpu": "x86_64", "threads": 1}, "the file does not name the processor"),  # an architecture only
        ({"cpu": "AMD EPYC 7B13", "threads": 1}, "AMD EPYC 7B13, 1 thread per run"),
        ({"cpu": "AMD EPYC 7B13", "threads": None}, "AMD EPYC 7B13"),
    ],
)
def test_cpu_experiments_name_their_processor_when_the_file_records_it(machine, where):
    data = {"settings": {"tag": "t"}} | ({"machine": machine} if machine else {})
    assert make_readme._where("decoding_choice", Path("decoding_choice_t.json"), {}, data) == (
        f"`results/decoding_choice_t.json` — CPU runs (tag `t`; {where})"
    )


def test_attention_summary_is_recomputed_from_the_measured_rows(tmp_path):
    """The summary rows a results file carries are derived, and older code derived them differently: in
    the committed H200 file the T5 case compared plain attention (no bias) with SDPA carrying the bias
    (148×, where the T5 op is 20×). The README shows the summary of today's logic, from the rows."""
    res = tmp_path / "results"
    res.mkdir()
    rows = _attention_rows(
        "t5 B16 H12 L1024 d64",
        "t5",
        {"fastformer": (330.0, 200.0), "fastformer-t5": (20.0, 30.0), "sdpa-math": (10.0, 1.5)},
    ) + _attention_rows(
        "padded B32 H16 L512 d64",
        "padded",
        {"fastformer": (40.0, 40.0), "fastformer-varlen": (50.0, 50.0), "sdpa-cudnn": (80.0, 80.0)},
    )
    stale = [  # what the older summary code wrote
        {"benchmark": "attention", "case": "t5 B16 H12 L1024 d64", "ratio_fwdbwd": 133.33, "summary": True},
        {"benchmark": "attention", "case": "padded B32 H16 L512 d64", "ratio_fwdbwd": 0.625, "summary": True},
    ]
    _harness(res / "attention_NVIDIA_X.json", "attention", rows + stale, device="NVIDIA_X")
    text, _ = make_readme.render_results(res)
    assert "133.33×" not in text and "| t5 B16 H12 L1024 d64 | fastformer-t5 | 30.0 |" in text
    assert "| 20.00× | 2.00× | 0.15× |" in text  # fwd+bwd 30 / 1.5, fwd 20 / 10, T5 / plain 30 / 200
    assert "| padded B32 H16 L512 d64 | fastformer | 40.0 | 50.0 | sdpa-cudnn | 80.0 | 0.50× |" in text
    # the measured numbers themselves are left as they are
    assert json.loads((res / "attention_NVIDIA_X.json").read_text())["rows"][-1]["ratio_fwdbwd"] == 0.625


@pytest.mark.parametrize("provider", ["fastformer(cpu)", "fastformer(reference)"])
def test_cpu_attention_summary_shows_the_cpu_provider(tmp_path, provider):
    """On the CPU the fastformer provider is `fastformer(cpu)` (`fastformer(reference)` in older
    results): the summary names it and shows its TFLOP/s next to the ratio."""
    res = tmp_path / "results"
    res.mkdir()
    rows = _attention_rows(
        "dense B2 H2 L128 d64",
        "dense",
        {provider: (0.5, 0.25), "sdpa-math": (2.0, 1.0), "eager": (1.0, 0.5)},
    )
    _harness(res / "attention_cpu-1threads-Some_CPU.json", "attention", rows)
    text, _ = make_readme.render_results(res)
    assert f"| dense B2 H2 L128 d64 | {provider} | 0.250 | sdpa-math | 1.00 | 0.25× | 0.25× |" in text


def test_a_missing_results_folder_is_an_error(tmp_path, capsys):
    """--results naming no folder is refused (exit 2, one line): it used to render as a tree without
    results, and --check compared the README with that."""
    out = tmp_path / "README.md"
    assert make_readme.main(["--results", str(tmp_path / "nonexistent"), "--out", str(out)]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--results" in err and "nonexistent" in err
    assert make_readme.main(["--check", "--results", str(tmp_path / "nonexistent")]) == 2
