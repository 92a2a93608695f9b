"""The time budget of `make gpu-check` (bench/gpu_check.py), checked on CPU with fake durations."""

import os

import pytest
from conftest import bench_script

gpu_check = bench_script("gpu_check")
Step = gpu_check.Step


class FakeClock:
    """A clock that only moves when a fake step 'runs' for its fake duration (cut at the timeout)."""

    def __init__(self, durations):
        self.t, self.durations, self.calls = 0.0, durations, []

    def now(self):
        return self.t

    def run(self, step, timeout):
        self.calls.append((step.name, round(timeout, 1)))
        took = self.durations[step.name]
        if took == "boom":
            raise RuntimeError("broken step")
        self.t += min(took, timeout)
        return "timeout" if took > timeout else "ok"


def _run(todo, durations, budget, reserve=15.0):
    clock = FakeClock(durations)
    records = gpu_check.schedule(todo, budget, clock.run, clock.now, reserve=reserve)
    return {r["step"]: r for r in records}, clock


def test_decisive_steps_first_and_the_budget_is_kept():
    todo = [
        Step("attention", 120, 200),
        Step("ce", 30, 60),
        Step("bert", 150, 210),
        Step("tests", 45, 90),
        Step("ext_tests", 60, 120, if_time_remains=True),
        Step("small", 15, 40),
    ]
    durations = {"attention": 130, "ce": 25, "bert": 160, "tests": 40, "small": 10, "ext_tests": 50}
    rec, clock = _run(todo, durations, budget=420)
    # in priority order, the extension tests after everything else
    assert [n for n, _ in clock.calls] == ["attention", "ce", "bert", "tests", "small"]
    assert rec["ext_tests"]["status"] == "skipped"  # 55 s left after the rest, less the reserve: no
    assert clock.t <= 420 - 15
    assert all(rec[n]["status"] == "ok" for n in ("attention", "ce", "bert", "tests", "small"))


def test_a_long_step_is_skipped_but_later_short_ones_still_run():
    todo = [Step("a", 100, 150), Step("big", 200, 300), Step("short", 20, 40)]
    rec, clock = _run(todo, {"a": 100, "big": 200, "short": 20}, budget=200)
    assert rec["big"]["status"] == "skipped" and "needs about 200s" in rec["big"]["detail"]
    assert rec["short"]["status"] == "ok"


def test_an_overrunning_step_is_cut_at_its_limit_or_the_budget():
    todo = [Step("slow", 50, 80), Step("next", 30, 100)]
    rec, clock = _run(todo, {"slow": 1000, "next": 1000}, budget=200, reserve=10)
    assert rec["slow"]["status"] == "timeout" and rec["slow"]["seconds"] == 80  # its own limit
    assert rec["next"]["status"] == "timeout" and rec["next"]["seconds"] == 100  # its limit (110 s were left)
    rec, clock = _run([Step("slow", 50, 500)], {"slow": 1000}, budget=200, reserve=10)
    assert rec["slow"]["seconds"] == 190  # the budget


def test_a_broken_step_does_not_stop_the_run():
    rec, clock = _run([Step("bad", 10, 20), Step("good", 10, 20)], {"bad": "boom", "good": 5}, budget=100)
    assert rec["bad"]["status"].startswith("error: RuntimeError") and rec["good"]["status"] == "ok"


def test_the_real_plan_fits_nine_minutes():
    """The declared steps: the decisive benchmarks come first, no FlexAttention compile (quick runs),
    the extension tests last, and what usually runs fits the default budget."""
    todo = gpu_check.steps("python3", 8)
    names = [s.name for s in todo]
    assert names[:5] == ["attention", "cross_entropy", "bert_training", "t5_training", "hf_patch"]
    assert todo[-1].name == "extension_tests" and todo[-1].if_time_remains
    durations = {s.name: s.estimate for s in todo}
    rec, clock = _run(todo, durations, budget=500)
    assert clock.t <= 500 and all(rec[n]["status"] == "ok" for n in names[:6])
    assert max(s.limit for s in todo) <= 500


def test_quick_set_compiles_no_flex_attention():
    """FlexAttention compiles per shape: the quick set (what gpu-check runs) never asks for it."""
    t5 = bench_script("bench_t5_attention")
    assert "flex" not in t5.providers_for(quick=True) and "flex" in t5.providers_for(quick=False)
    att = bench_script("bench_attention")
    for case in att._cases(quick=True, cuda=True):
        provs = att._providers(case, cuda=True, quick=True)
        assert "flex" not in provs and "fastformer" in provs
        assert ("fastformer-default" in provs) == (case["kind"] == "dense")


# ----------------------------------------------------------------------------------------------
# no CUDA: refuse, or (--allow-cpu) run without reporting the cuda tests as passed
# ----------------------------------------------------------------------------------------------


def test_refuses_without_cuda(tmp_path, monkeypatch, capsys):
    """Where torch has no CUDA, gpu-check stops at once (exit 2, one line) and writes nothing: it used
    to run the CPU benchmarks into bench/results, over the committed CPU results, and report the cuda
    tests, all skipped, as ok."""
    monkeypatch.setattr(gpu_check, "_cuda_available", lambda: False)
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--only", "kernel_tests", "--xdist", "1"]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA" in err and "--allow-cpu" in err


def test_allow_cpu_runs_without_the_cuda_tests(tmp_path, monkeypatch):
    """--allow-cpu (what `make bench` passes): the run goes on, the cuda test steps are not run and are
    reported as skipped, not ok."""
    import json

    monkeypatch.setattr(gpu_check, "_cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_run_proc", lambda *a, **k: pytest.fail("a cuda test step ran without CUDA"))
    out = tmp_path / "out"
    argv = ["--out", str(out), "--only", "kernel_tests", "--budget", "200", "--xdist", "1", "--allow-cpu"]
    assert gpu_check.main(argv) == 0
    (result,) = out.glob("gpu_check_*.json")
    (step,) = json.loads(result.read_text())["steps"]
    assert step["step"] == "kernel_tests" and step["status"].startswith("skipped") and "CUDA" in step["status"]


def test_a_pytest_step_that_ran_no_test_is_not_ok(tmp_path):
    """A pytest step is ok only when a test passed: all skipped (-m cuda where the cuda tests skip
    themselves) or all deselected (pytest's exit 5) is reported as skipped. Only this run's part of
    the shared log counts."""
    import sys
    import time

    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a GPU\n")
    (tmp_path / "test_some.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.cuda\ndef test_passes():\n    pass\n\n"
        "@pytest.mark.cuda\n@pytest.mark.skip(reason='no GPU')\ndef test_skips():\n    pass\n\n"
        "def test_not_cuda():\n    pass\n"
    )
    base = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(tmp_path / "pytest.ini")]
    base += ["--rootdir", str(tmp_path), "-m", "cuda", str(tmp_path / "test_some.py")]
    runner = gpu_check.Runner(tmp_path, False, dict(os.environ), None, time.monotonic, time.monotonic() + 600)
    assert runner(Step("passing", 1, 60, cmd=base), 60) == "ok"
    assert runner(Step("only_skips", 1, 60, cmd=[*base, "-k", "skips"]), 60).startswith("skipped")
    assert gpu_check.pytest_status("failed (exit 5)", "3 deselected in 0.1s").startswith("skipped")
    assert gpu_check.pytest_status("ok", "2 passed, 1 skipped, 4 deselected in 1.0s") == "ok"
    assert gpu_check.pytest_status("failed (exit 1)", "1 failed, 2 passed in 1.0s") == "failed (exit 1)"


def test_make_bench_allows_cpu_and_gpu_check_does_not():
    """`make bench` runs gpu_check.py on CPU machines on purpose; `make gpu-check` must refuse there."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    make = (root / "Makefile").read_text()
    bench = make.split("\nbench:", 1)[1].split("\n\n", 1)[0]
    assert "bench/gpu_check.py" in bench and "--allow-cpu" in bench
    assert "--allow-cpu" not in (root / "scripts" / "gpu_check.sh").read_text()


# ----------------------------------------------------------------------------------------------
# arguments that would run nothing or ignore the budget are refused before anything is written
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--only", "nonexistent"], "--only"),
        (["--only", "attention", "atention"], "--only"),
        (["--only"], "--only"),
        (["--budget", "nan"], "--budget"),
        (["--budget", "inf"], "--budget"),
        (["--budget", "-5"], "--budget"),
        (["--budget", "0"], "--budget"),
    ],
)
def test_bad_only_or_budget_is_refused(argv, flag, tmp_path, monkeypatch, capsys):
    """An unknown --only name used to run nothing and exit 0 with "steps": []; --budget nan enforced
    nothing (and wrote NaN into the JSON), a negative budget skipped every step."""
    monkeypatch.setattr(gpu_check, "_cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_run_proc", lambda *a, **k: pytest.fail("a step ran"))
    out = tmp_path / "out"
    assert gpu_check.main(["--out", str(out), "--allow-cpu", "--xdist", "1", *argv]) == 2
    assert not out.exists()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err
    if flag == "--only":
        assert "attention" in err and "extension_tests" in err  # the valid names


def test_every_benchmark_script_is_a_step_and_the_cpu_ones_stay_off_the_gpu_plan():
    """`make bench` runs gpu_check.py --allow-cpu: every bench/bench_*.py and memory_estimate.py is a
    step of it (bench_cpu_dispatch, bench_generation and memory_estimate used to be left out). The CPU
    ones are not in a GPU run's plan, unless --only names them."""
    from pathlib import Path

    todo = gpu_check.steps("python3", 1)
    benches = {s.bench for s in todo if s.bench}
    scripts = {p.stem for p in (Path(gpu_check.HERE)).glob("bench_*.py")} | {"memory_estimate"}
    assert scripts <= benches, scripts - benches
    for s in todo:
        if s.bench:
            assert hasattr(bench_script(s.bench), "run"), s.bench
    cpu_only = {s.name for s in todo if s.cpu_only}
    assert cpu_only == {"cpu_dispatch", "generation", "memory_estimate", "cpu_precision"}
    gpu = [s.name for s in gpu_check.plan(todo, None, cuda=True)]
    assert not cpu_only & set(gpu) and gpu[-1] == "extension_tests"
    assert cpu_only <= {s.name for s in gpu_check.plan(todo, None, cuda=False)}
    assert [s.name for s in gpu_check.plan(todo, ["generation"], cuda=True)] == ["generation"]


# ----------------------------------------------------------------------------------------------
# what a GPU run leaves in OUT: results named for the device, scratch in a folder
# ----------------------------------------------------------------------------------------------


def _fake_gpu_run(tmp_path, monkeypatch, out, passed):
    """One `make gpu-check` with CUDA faked: the background jobs write their logs and report, the test
    step prints a pytest summary into its log."""

    def background(py, work, env):
        for name in ("build.log", "kernel_report.log", "kernel_report.json"):
            (work / name).write_text("scratch\n")
        (work / "tuning").mkdir(exist_ok=True)
        return None, None

    def run_proc(cmd, timeout, env, log=None):
        with open(log, "a") as f:
            f.write(f"{passed} passed in 0.1s\n")
        return "ok"

    monkeypatch.setattr(gpu_check, "_cuda_available", lambda: True)
    monkeypatch.setattr(gpu_check, "_start_background", background)
    monkeypatch.setattr(gpu_check, "_run_proc", run_proc)
    argv = ["--out", str(out), "--only", "kernel_tests", "--budget", "200", "--xdist", "1"]
    assert gpu_check.main(argv) == 0


def test_a_gpu_run_names_its_files_for_the_device_and_keeps_scratch_apart(tmp_path, monkeypatch):
    """The tests' log, the build and compile logs, the compile's report and the tuner's cache used to be
    written into OUT without the device in their names (gpu_tests.log appended run after run,
    kernel_report_gpu.json rendered as a kernel report): OUT's files now all name the device, the log
    is this run's, the rest is in a folder that make_readme does not render and git ignores; so
    `make gpu-check` then `python bench/make_readme.py` leaves a consistent tree."""
    import json
    import subprocess
    from pathlib import Path

    from harness import device_name

    make_readme = bench_script("make_readme")
    dev = device_name()
    out = tmp_path / "results"
    _fake_gpu_run(tmp_path, monkeypatch, out, passed=3)
    _fake_gpu_run(tmp_path, monkeypatch, out, passed=4)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == [f"gpu_check_{dev}.json", f"gpu_tests_{dev}.log"]
    assert (out / f"gpu_tests_{dev}.log").read_text() == "4 passed in 0.1s\n"  # this run's only
    (work,) = [p for p in out.iterdir() if p.is_dir()]
    assert dev in work.name and (work / "build.log").exists() and (work / "tuning").is_dir()
    assert json.loads((out / f"gpu_check_{dev}.json").read_text())["steps"][0]["status"] == "ok"
    readme = tmp_path / "README.md"
    assert make_readme.main(["--results", str(out), "--out", str(readme)]) == 0
    assert make_readme.main(["--check", "--results", str(out), "--out", str(readme)]) == 0
    text = readme.read_text()
    assert all(f"results/{name}" in text for name in files) and "### Kernel report" not in text
    # git ignores the scratch folder of a run into bench/results
    root = Path(gpu_check.ROOT)
    probe = f"bench/results/{work.name}/build.log"
    r = subprocess.run(["git", "-C", str(root), "check-ignore", "-q", probe], capture_output=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout")
    assert r.returncode == 0, f"{probe} is not ignored by git"


def test_ctrl_c_stops_the_step_and_no_later_step_starts():
    """KeyboardInterrupt during a step: recorded as interrupted, the steps after it skipped, not run."""

    def run(step, timeout):
        if step.name == "b":
            raise KeyboardInterrupt
        return "ok"

    records = gpu_check.schedule([Step("a", 1, 5), Step("b", 1, 5), Step("c", 1, 5)], 100, run, lambda: 0.0)
    assert [(r["step"], r["status"]) for r in records] == [("a", "ok"), ("b", "interrupted"), ("c", "skipped")]
    assert records[2]["detail"] == "interrupted"


def test_ctrl_c_kills_the_step_process_group(tmp_path):
    """A step runs in a session of its own, out of reach of the terminal's Ctrl-C: _run_proc stops its
    whole group (the child and its children) when interrupted, instead of leaving it running."""
    import signal
    import sys
    import time

    pids = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{kid.pid}}')\n"
        "time.sleep(120)\n"
    )

    def interrupt(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 3.0)
    try:
        with pytest.raises(KeyboardInterrupt):
            gpu_check._run_proc([sys.executable, "-c", script], 60, dict(os.environ))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert pids.exists(), "the step did not start within 3 s"
    for pid in map(int, pids.read_text().split()):
        for _ in range(50):  # the grandchild is reaped by init, which may take a moment
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # a zombie: dead, waiting for its parent to reap it
            time.sleep(0.1)
        else:
            pytest.fail(f"process {pid} of the interrupted step is still running")


def test_ctrl_c_keeps_the_run_record_and_exits_130(tmp_path, monkeypatch, capsys):
    import json

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(gpu_check, "_cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "_run_proc", interrupted)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--only", "cpu_dispatch", "generation", "--budget", "500", "--allow-cpu"]
    assert gpu_check.main(argv) == 130
    (result,) = out.glob("gpu_check_*.json")
    steps = {s["step"]: s["status"] for s in json.loads(result.read_text())["steps"]}
    assert steps == {"cpu_dispatch": "interrupted", "generation": "skipped"}
    assert "interrupted" in capsys.readouterr().out
