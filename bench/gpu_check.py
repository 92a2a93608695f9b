"""`make gpu-check`: every GPU measurement and GPU test in one command of at most about 9 minutes.

    python bench/gpu_check.py [--out DIR] [--budget SECONDS] [--only NAME ...] [--full] [--allow-cpu]

Where torch has no CUDA it refuses (exit 2) before writing anything: its benchmarks would measure the
CPU into DIR (by default bench/results, over the committed CPU results). `--allow-cpu` runs them there
anyway (`make bench` does); the `cuda` test steps are then not run and reported as skipped, and the
CPU benchmarks (CPU dispatch, generation, the memory estimate) run too. `--only` names steps (an
unknown name is an error, exit 2), `--budget` is a positive number of seconds.

Steps run in priority order, each in its own process with a time limit, so a step that fails or
overruns loses nothing else: attention fwd+bwd against every SDPA backend (with T5 against plain
attention), cross-entropy against copy bandwidth, BERT-base and T5-base training steps against
Hugging Face, the Hugging Face patch, the kernels' `cuda` tests, the remaining benchmarks, and the
extension's `cuda` tests only if time remains. A step starts only if its usual duration (STEPS'
`estimate`) fits in what is left of the budget; it is stopped at its `limit` or at the budget.
Every benchmark saves its rows after each case, so a stopped step keeps what it finished.
Ctrl-C stops the running step's processes, starts no further step, writes the run's record and
exits 130.

Into DIR go the results (file names carry the device), gpu_check_<device>.json (steps, summaries,
the tuner's choices) and gpu_tests_<device>.log (this run's test output; a run with a test step
replaces the previous one's). Meanwhile, in the background: the fused-Adam extension builds, and the
kernel report compiles the attention and cross-entropy kernels' tuning candidates for this GPU, so
the tuning the benchmarks trigger at first use finds them in Triton's cache. Their logs, the compile's
report and the tuner's cache go to DIR/gpu_check_<device>_work/, a folder that bench/make_readme.py
does not render and git ignores. The tuner's choices (kernel, shape class, chosen and default config,
their timings) are printed with the short table that ends the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from cli_paths import out_folder, write_atomic

EXT_TESTS = ("tests/optim", "tests/train", "tests/integrations")


@dataclasses.dataclass
class Step:
    """One unit of the run. estimate: seconds it usually takes on an H100/H200 (planning only);
    limit: the most it may take. bench: a bench module run with run(quick, out_dir); cmd: a command.
    needs_build: wait for the extension build first; if_time_remains: after every other step;
    cpu_only: a CPU benchmark, in the plan only where there is no CUDA (`make bench`) or when --only names it."""

    name: str
    estimate: float
    limit: float
    bench: str | None = None
    cmd: list | None = None
    env: dict = dataclasses.field(default_factory=dict)
    needs_build: bool = False
    if_time_remains: bool = False
    cpu_only: bool = False


def steps(py: str, xdist: int) -> list:
    par = ["-n", str(xdist)] if xdist > 1 else []
    ignore = [f"--ignore={t}" for t in EXT_TESTS]
    pytest = [py, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider"]
    return [
        Step("attention", 120, 200, bench="bench_attention"),
        Step("cross_entropy", 30, 60, bench="bench_cross_entropy"),
        Step("bert_training", 150, 210, bench="bench_bert_training", needs_build=True),
        Step("t5_training", 70, 120, bench="bench_t5_training", needs_build=True),
        Step("hf_patch", 70, 120, bench="bench_hf_patch", needs_build=True),
        Step("kernel_tests", 45, 90, cmd=pytest + par + ["tests"] + ignore),
        Step("t5_attention", 40, 90, bench="bench_t5_attention"),
        Step("linear_cross_entropy", 15, 40, bench="bench_linear_cross_entropy"),
        Step("adam", 20, 40, bench="bench_adam", needs_build=True),
        # CPU benchmarks (estimates: 2 CPU threads), so that `make bench` runs every benchmark script
        Step("cpu_dispatch", 60, 300, bench="bench_cpu_dispatch", cpu_only=True),
        Step("generation", 40, 300, bench="bench_generation", cpu_only=True),
        Step("memory_estimate", 90, 400, bench="memory_estimate", cpu_only=True),
        Step("cpu_precision", 30, 300, bench="bench_cpu_precision", cpu_only=True),
        Step("extension_tests", 60, 120, cmd=pytest + list(EXT_TESTS), needs_build=True, if_time_remains=True),
    ]


def plan(todo: list, only: list | None, cuda: bool) -> list:
    """The steps to run: those --only names, else every step, less the CPU-only ones where there is CUDA
    (a GPU run's budget is for the GPU)."""
    if only:
        return [s for s in todo if s.name in only]
    return [s for s in todo if not (cuda and s.cpu_only)]


def check_args(only: list | None, budget: float, names: list) -> str | None:
    """The one-line error for arguments that would run nothing or ignore the budget, else None."""
    if only is not None:
        unknown = [n for n in only if n not in names] if only else ["(no name)"]
        if unknown:
            return f"gpu-check: --only {' '.join(unknown)}: no such step (steps: {' '.join(names)})"
    if not math.isfinite(budget) or budget <= 0:
        return f"gpu-check: --budget {budget:g}: give a positive number of seconds"
    return None


INTERRUPTED = "interrupted"


def schedule(
    todo: list, budget: float, run: Callable[[Step, float], str], now: Callable[[], float], reserve: float = 15.0
) -> list:
    """Run the steps within `budget` seconds (less `reserve` for the closing table): in order, those
    marked if_time_remains last; a step starts only if its estimate fits in what is left, and runs
    at most min(limit, what is left). run(step, timeout) returns a status ("ok", "failed",
    "timeout", ...). Ctrl-C (KeyboardInterrupt) during a step records it as "interrupted" and the
    steps after it as skipped. Returns one record per step, skipped ones included."""
    start = now()
    order = [s for s in todo if not s.if_time_remains] + [s for s in todo if s.if_time_remains]
    records = []
    for step in order:
        left = budget - reserve - (now() - start)
        if left < min(step.estimate, step.limit):
            records.append(
                {
                    "step": step.name,
                    "status": "skipped",
                    "seconds": 0.0,
                    "detail": f"{max(left, 0):.0f}s left, needs about {step.estimate:.0f}s",
                }
            )
            continue
        timeout = min(step.limit, left)
        t0 = now()
        try:
            status = run(step, timeout)
        except KeyboardInterrupt:  # Ctrl-C: this step's child is stopped; no further step starts
            status = INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - one broken step must not stop the others
            status = f"error: {type(exc).__name__}: {exc}"
        records.append(
            {"step": step.name, "status": status, "seconds": round(now() - t0, 1), "limit": round(timeout, 1)}
        )
        if status == INTERRUPTED:
            done = {r["step"] for r in records}
            records += [
                {"step": s.name, "status": "skipped", "seconds": 0.0, "detail": "interrupted"}
                for s in order
                if s.name not in done
            ]
            break
    return records


# ----------------------------------------------------------------------------------------------
# running steps for real
# ----------------------------------------------------------------------------------------------


def _child(name: str, out: Path, quick: bool, rows_file: Path) -> int:
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = mod.run(quick=quick, out_dir=out) or []
    rows_file.write_text(json.dumps(rows, default=str))
    # memory_estimate records a failed case as a row with its error: the step failed (the other
    # benchmarks' error rows are a provider that cannot run a case, e.g. out of memory: expected)
    failed = name == "memory_estimate" and any(isinstance(r, dict) and r.get("error") for r in rows)
    return 1 if failed else 0


def pytest_status(status: str, output: str) -> str:
    """The status of a pytest step from its exit status and its output: "ok" only when a test passed
    (a run whose tests were all skipped or deselected, e.g. `-m cuda` without a usable GPU, tested nothing)."""
    if status == "failed (exit 5)":  # pytest: no tests collected (all deselected)
        return "skipped: no tests ran"
    if status != "ok":
        return status
    summary = [ln for ln in output.splitlines() if re.search(r"\d+ (passed|skipped|deselected|failed)", ln)]
    if not summary or not re.search(r"\b\d+ passed\b", summary[-1]):
        return "skipped: no CUDA tests ran"
    return status


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop proc's whole process group: SIGTERM, then SIGKILL after 10 s."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    except ProcessLookupError:
        pass


def _run_proc(cmd: list, timeout: float, env: dict, log: Path | None = None) -> str:
    """Run cmd in its own process group; on timeout the whole group is stopped. The group is in a new
    session, so Ctrl-C at the terminal does not reach it: on KeyboardInterrupt (or any other exception
    while waiting) it is stopped here too, before the exception goes on."""
    out = open(log, "a") if log else None
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            start_new_session=True,
            stdout=out or None,
            stderr=subprocess.STDOUT if out else None,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc)
            return "timeout"
        except BaseException:
            _stop_group(proc)
            raise
        return "ok" if rc == 0 else f"failed (exit {rc})"
    finally:
        if out:
            out.close()


NO_CUDA = "skipped: no CUDA here"


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        return False


class Runner:
    """Runs steps as subprocesses; collects the benchmarks' summary rows. The test steps' output goes to
    tests_log (default OUT/gpu_tests.log), which the run's first test step starts afresh: the log is of
    this run only, the same run as the results beside it."""

    def __init__(
        self,
        out: Path,
        full: bool,
        env: dict,
        build: subprocess.Popen | None,
        now,
        budget_end,
        cuda: bool = True,
        tests_log: Path | None = None,
    ):
        self.out, self.full, self.env, self.build, self.cuda = out, full, env, build, cuda
        self.now, self.budget_end = now, budget_end
        self.tests_log = tests_log or out / "gpu_tests.log"
        self._log_started = False
        self.summary: list = []

    def _wait_build(self, step: Step) -> None:
        if self.build is None or self.build.poll() is not None:
            return
        wait = max(0.0, self.budget_end - self.now() - step.estimate)
        print(f"[gpu-check] {step.name}: waiting up to {wait:.0f}s for the extension build", flush=True)
        try:
            self.build.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            print("[gpu-check] the extension is not built yet: its users fall back to torch", flush=True)

    def __call__(self, step: Step, timeout: float) -> str:
        if step.needs_build:
            self._wait_build(step)
            timeout = min(timeout, max(self.budget_end - self.now(), 1.0))
        print(f"=== {step.name} (limit {timeout:.0f}s)", flush=True)
        env = dict(self.env, **step.env)
        if step.cmd is not None:
            is_pytest = "pytest" in step.cmd
            if is_pytest and not self.cuda:
                return NO_CUDA
            log = self.tests_log if is_pytest else None
            if log is not None and not self._log_started:  # a previous run's log is not this run's
                log.unlink(missing_ok=True)
                self._log_started = True
            start = log.stat().st_size if log is not None and log.exists() else 0
            status = _run_proc(step.cmd, timeout, env, log)
            if log is not None and log.exists():
                with open(log, errors="replace") as f:  # this run's part of the log
                    f.seek(start)
                    output = f.read()
                print("".join(output.splitlines(keepends=True)[-6:]), flush=True)
                status = pytest_status(status, output)
            return status
        rows_file = self.out / f".{step.bench}.rows.json"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            step.bench,
            "--out",
            str(self.out),
            "--rows-file",
            str(rows_file),
        ] + (["--full"] if self.full else [])
        status = _run_proc(cmd, timeout, env)
        if rows_file.exists():
            self.summary += json.loads(rows_file.read_text())
            rows_file.unlink()
        return status


def _start_background(py: str, work: Path, env: dict) -> tuple:
    """The extension build and the tuning candidates' compile, at low priority; their logs and the
    compile's report go to `work` (see work_dir)."""
    build_log = open(work / "build.log", "w")
    build = subprocess.Popen(
        [
            "nice",
            "-n",
            "5",
            py,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-build-isolation",
            "--no-deps",
            "--no-index",
            "-e",
            ".",
        ],
        cwd=ROOT,
        env=dict(env, MAX_JOBS=env.get("MAX_JOBS", "6")),
        stdout=build_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    warm = None
    if os.environ.get("GPU_CHECK_WARM", "1") != "0":
        warm_log = open(work / "kernel_report.log", "w")
        variants = ["plain bf16", "causal bf16", "klen bf16", "varlen bf16", "t5 bf16", "plain fp32"]
        warm = subprocess.Popen(
            [
                "nice",
                "-n",
                "10",
                py,
                "scripts/kernel_report.py",
                "--family",
                "attention",
                "cross_entropy",
                "--arch",
                "90",
                "--candidates",
                "--jobs",
                os.environ.get("GPU_CHECK_WARM_JOBS", "6"),
                "--quiet",
                "--no-cache",
                "--match",
                *variants,
                "--json",
                str(work / "kernel_report.json"),
            ],
            cwd=ROOT,
            env=env,
            stdout=warm_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return build, warm


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def work_dir(out: Path, dev: str) -> Path:
    """OUT/gpu_check_<device>_work: what a run writes besides results (the build's and the compile's logs,
    the compile's kernel report, the tuner's cache). A folder: bench/make_readme.py renders only the
    files of OUT, and git ignores the folders of bench/results; named for the device, so that runs on
    different GPUs into one OUT keep their own tuner caches."""
    return out / f"gpu_check_{dev}_work"


def tuning_table(tune_dir: Path) -> list:
    """The tuner's choices from the cache files under tune_dir."""
    rows = []
    for path in sorted(tune_dir.glob("*.json")):
        try:
            entries = json.loads(path.read_text()).get("entries", {})
        except ValueError:
            continue
        for key, e in sorted(entries.items()):
            kernel, _, shape = key.partition("|")
            t = e.get("timings_ms", {})
            chosen, default = ",".join(map(str, e.get("config", []))), ",".join(map(str, e.get("default", [])))
            gain = t[default] / t[chosen] if t.get(default) and t.get(chosen) else None
            rows.append(
                {
                    "kernel": kernel,
                    "shape": shape,
                    "chosen": chosen,
                    "default": default,
                    "default_over_chosen": gain,
                    "skipped": len(e.get("skipped", {})),
                }
            )
    return rows


def _line(d: dict, keys: list, width: int = 150) -> str:
    parts = []
    for k in keys:
        v = d.get(k)
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return "  ".join(parts)[:width]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out", type=out_folder, default=str(HERE / "results"), help="results folder (default bench/results)"
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=os.environ.get("GPU_CHECK_BUDGET", "500"),  # a string default goes through type=float
        help="total seconds for the steps, positive (the command itself takes a little more)",
    )
    ap.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="step names (e.g. attention cross_entropy; a CPU-only step runs on a GPU machine too when named)",
    )
    ap.add_argument("--full", action="store_true", help="full sweeps instead of the short settings")
    ap.add_argument("--xdist", type=int, default=os.environ.get("XDIST", "8"))
    ap.add_argument(
        "--allow-cpu",
        action="store_true",
        help="run even where torch has no CUDA (the CPU benchmarks; the cuda test steps are skipped)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    error = check_args(args.only, args.budget, [s.name for s in steps(sys.executable, args.xdist)])
    if error and not args.child:  # before anything is written
        print(error, file=sys.stderr)
        return 2
    cuda = args.child is not None or _cuda_available()
    if not cuda and not args.allow_cpu:
        print(
            "gpu-check: torch has no CUDA here (torch.cuda.is_available() is False): nothing written; "
            "--allow-cpu runs the benchmarks on the CPU anyway",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child(args.child, out, not args.full, Path(args.rows_file))

    from harness import device_name

    t_start = time.monotonic()
    py = sys.executable
    dev = device_name()
    work = work_dir(out, dev)
    tune_dir = work / "tuning"
    env = dict(os.environ, PYTHONUNBUFFERED="1", FASTFORMER_TUNE_CACHE=str(tune_dir))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    print(f"[gpu-check] {dev}, budget {args.budget:.0f}s", flush=True)
    try:
        import torch
        import triton

        print(
            f"[gpu-check] torch {torch.__version__} cuda {torch.version.cuda} triton {triton.__version__}", flush=True
        )
    except Exception:  # noqa: BLE001
        traceback.print_exc()
    todo = plan(steps(py, args.xdist), args.only, cuda)
    # on a CPU machine (`make bench`) the package is already built and there is nothing to compile for
    build, warm = None, None
    if cuda:
        work.mkdir(parents=True, exist_ok=True)
        print(f"[gpu-check] build and compile logs, the tuner's cache: {work}", flush=True)
        build, warm = _start_background(py, work, env)
    tests_log = out / f"gpu_tests_{dev}.log"
    runner = Runner(out, args.full, env, build, time.monotonic, t_start + args.budget, cuda=cuda, tests_log=tests_log)
    try:
        records = schedule(todo, args.budget - (time.monotonic() - t_start), runner, time.monotonic)
    finally:
        _stop(warm)
        _stop(build)
    tuned = tuning_table(tune_dir)
    result = {
        "device": dev,
        "budget_s": args.budget,
        "seconds": round(time.monotonic() - t_start, 1),
        "steps": records,
        "summary": runner.summary,
        "tuning": tuned,
    }
    text = json.dumps(result, indent=1, default=str)
    write_atomic(out / f"gpu_check_{dev}.json", lambda tmp: tmp.write_text(text))

    print(f"\n##### gpu-check on {dev}: {result['seconds']:.0f}s #####")
    for r in records:
        print(f"{r['step']:<22} {r['status']:<18} {r['seconds']:>6.1f}s  {r.get('detail', '')}")
    if tuned:
        print("tuning (default ms / chosen ms):")
        for t in tuned:
            print("  " + _line(t, ["kernel", "shape", "chosen", "default", "default_over_chosen"]))
    for r in runner.summary:
        keys = [k for k in r if k not in ("benchmark", "case")]
        print(f"{str(r.get('benchmark', '?'))[:14]:<14} {str(r.get('case', ''))[:32]:<32} {_line(r, keys, 110)}")
    if any(r["status"] == INTERRUPTED for r in records):
        print("[gpu-check] interrupted: the steps that finished and the rows saved so far are kept")
        return 130
    bad = [r for r in records if r["status"] not in ("ok", NO_CUDA)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
