"""The bench harness: the scripts' --out checks, atomic result files (bench/cli_paths.py, harness.save)
and the CPU peak-memory measurement."""

import json

import pytest
from conftest import bench_script, run_bench_main

cli_paths = bench_script("cli_paths")


@pytest.mark.parametrize("script", ["bench_linear_cross_entropy", "memory_estimate", "gpu_check"])
def test_a_bad_out_folder_is_refused_before_anything_runs(script, tmp_path, monkeypatch, capsys):
    """--out "" used to mean the default folder (over the committed results) and --out FILE ended in a
    traceback after the benchmark had run; both are argument errors (exit 2) naming --out. (The first
    script's parser is harness.parser, which every bench_*.py shares.)"""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for bad, why in (("", "give a folder"), (str(a_file), "not a folder"), (str(a_file / "sub"), "cannot create")):
        assert run_bench_main(monkeypatch, script, "--out", bad) == 2
        err = capsys.readouterr().err
        assert "argument --out" in err and why in err, err
    assert a_file.read_text() == "x"


def test_make_readme_out_must_be_a_file_in_an_existing_folder(tmp_path, capsys):
    make_readme = bench_script("make_readme")
    for bad, why in ((str(tmp_path), "is a folder"), ("", "give a file"), (str(tmp_path / "no" / "R.md"), "not exist")):
        with pytest.raises(SystemExit) as e:
            make_readme.main(["--out", bad])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert make_readme.main(["--out", str(tmp_path / "R.md")]) == 0
    assert (tmp_path / "R.md").read_text().startswith("<!--")
    assert [p.name for p in tmp_path.iterdir()] == ["R.md"]  # no temporary file left beside it


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path):
    target = tmp_path / "r.json"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("new, half writ")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cli_paths.write_atomic(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    cli_paths.write_atomic(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new" and oct(target.stat().st_mode & 0o777) == "0o644"


def test_harness_save_writes_whole_files(tmp_path):
    harness = bench_script("harness")
    rows = [{"provider": "a", "n": 1, "ms": 2.0}, {"provider": "a", "n": 2, "ms": 3.0}]
    json_path, png_path = harness.save("demo", rows, out_dir=tmp_path, device="cpu", x="n", y="ms")
    assert json.loads(json_path.read_text())["rows"] == rows
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([json_path.name, png_path.name])


def test_cpu_peak_memory_counts_reused_heap_memory():
    """On CPU the peak is the growth of the peak RSS. Measured after timing the same call, it used to
    read 0 or less (the call's 8 MB buffers came from memory earlier calls had freed, already resident);
    the heap's free memory is now returned to the system first, so reuse counts."""
    import torch

    harness = bench_script("harness")
    x = torch.randn(1024, 2048)  # 8 MiB: below glibc's largest mmap threshold, so it lands on the heap

    def step():
        y = x * 2.0
        return (y + 1.0).sum()

    harness.time_ms(step, cpu_reps=5)
    peaks = [harness.peak_extra_bytes(step, device="cpu") for _ in range(3)]
    assert all(p is not None and p >= 8 * 2**20 for p in peaks), peaks
    assert harness.megabytes(None) is None and harness.megabytes(2**20) == 1.0


def test_cpu_model_names_arm_cpus_and_bare_x86_brands_apart():
    harness = bench_script("harness")
    x86 = "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t: fpu\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n"
    assert harness.cpu_model(x86) == "AMD EPYC 7B13"
    # a bare brand, as virtual machines show it for CPUs of different generations, gets their codes
    zen3 = "processor\t: 0\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t: fpu avx2\n"
    zen5 = zen3.replace(": 25", ": 26").replace(": 1\n", ": 2\n")
    assert harness.cpu_model(zen3) == "AMD EPYC family 25 model 1"
    assert harness.cpu_model(zen3) != harness.cpu_model(zen5)
    assert harness.cpu_model(x86.replace("AMD EPYC 7B13", "AMD EPYC")) == "AMD EPYC"  # no codes given
    neoverse = "processor\t: 0\nBogoMIPS\t: 2000.00\nCPU implementer\t: 0x41\nCPU part\t: 0xd40\n"
    graviton2 = neoverse.replace("0xd40", "0xd0c")
    assert harness.cpu_model(neoverse) != harness.cpu_model(graviton2)
    assert harness.cpu_model(neoverse).endswith("-0x41-0xd40")
    assert harness.cpu_model("") == (harness.platform.processor() or harness.platform.machine())


def test_cpu_machine_records_the_processor_model_not_the_architecture():
    harness = bench_script("harness")
    m = harness.cpu_machine(3)
    assert m["cpu"] == harness.cpu_model() and m["threads"] == 3 and m["cores"] >= 1
    assert m["torch"] == harness.torch.__version__ and m["python"].count(".") == 2
    assert harness.cpu_machine()["threads"] is None


def test_cpu_has_bf16_reads_the_instruction_flags():
    harness = bench_script("harness")
    zen3 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma\n"
    sapphire = "processor\t: 0\nmodel name\t: Intel Xeon\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
    graviton3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n"
    assert not harness.cpu_has_bf16(zen3) and not harness.cpu_has_bf16("")
    assert harness.cpu_has_bf16(sapphire) and harness.cpu_has_bf16(graviton3)
    assert not harness.cpu_has_bf16("flags\t: avx512f avx512bw\n")  # AVX-512 without its bf16 extension
