"""The kernel report: its readers on small known inputs, the launcher's specialization it reproduces,
and `scripts/kernel_report.py --ci --check` (the representative builds and every gate) as CI runs it.

The interpreter never compiles the kernels: this is where a GPU-only compile error, a spill in a main
loop or a lost async copy fails CI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HAS_CUDA

from fastformer.kernels import aot, registry, tuning
from fastformer.kernels import attention_launch as AL

ROOT = Path(__file__).resolve().parents[2]

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
        /*0030*/                   MUFU.EX2 R2, R3 ;
        /*0040*/                   STL [R1], R2 ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0060*/                   MUFU.EX2 R2, R3 ;
        /*0070*/                   MUFU.EX2 R5, R3 ;
.L_x_2:
        /*0080*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0090*/               @P1 BRA `(.L_x_0) ;
        /*00a0*/                   LDL R7, [R1] ;
        /*00b0*/                   EXIT ;
"""

TTGIR = """
  tt.func public @k(%arg0: i32) {
    %0 = scf.for %i = %c0 to %n step %c1 iter_args(%a = %z) -> (tensor<64x64xf32>) : i32 {
      %1 = tt.dot %x, %y, %a : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<64x64xf32>
      %2 = "tt.reduce"(%1) <{axis = 1 : i32}> ({
      ^bb0(%p: f32, %q: f32):
        %s = arith.addf %p, %q : f32
        tt.reduce.return %s : f32
      }) : (tensor<64x64xf32>) -> tensor<64xf32>
      %3 = ttng.warp_group_dot %x, %y, %a {isAsync = true} : !ttg.memdesc<64x64xbf16> -> tensor<64x64xf32>
      %4:2 = ttng.warp_group_dot_wait %3 {pendings = 0 : i32} : tensor<64x64xf32>
      scf.if %c {
        %5 = tt.dot %x, %y, %a : tensor<64x64xbf16> * tensor<64x64xbf16> -> tensor<64x64xf32>
      } else {
      }
      scf.yield %3 : tensor<64x64xf32>
    } loc(#loc1)
    tt.return
  }
"""


def test_sass_loops_and_per_iteration_counts():
    instrs, labels = aot.parse_sass(SASS)
    cfg = aot.sass_cfg(instrs, labels)
    assert len(cfg["loops"]) == 1
    loop = cfg["loops"][0]
    blocks = cfg["blocks"]

    def count(prefix):
        return lambda b: sum(1 for i in blocks[b] if instrs[i][1].startswith(prefix))

    # the two sides of the branch are not added up: the costlier one has 2 exp2
    assert aot.heaviest_path(cfg, loop, count("MUFU.EX2")) == 2
    assert aot.heaviest_path(cfg, loop, count("BAR.")) == 1
    assert aot.heaviest_path(cfg, loop, count("HMMA")) == 1
    in_loop = [i for b in loop["blocks"] for i in blocks[b]]
    # the STL inside the loop counts, the LDL after it does not
    assert sum(1 for i in in_loop if aot._is_local(instrs[i][1])) == 1


def test_ttgir_loop_dots():
    loops = aot.ttgir_loops(TTGIR)
    assert loops == [{"dots": 3, "inner": False}]  # tt.dot, warp_group_dot (not its _wait), the dot in scf.if


def test_occupancy_and_ptxas_log():
    assert aot.blocks_per_sm(90, 255, 131072, 8) == 1
    assert aot.blocks_per_sm(90, 128, 49152, 4) == 4
    assert aot.blocks_per_sm(80, 96, 200000, 4) == 0  # more shared memory than a block may have
    log = (
        "ptxas info : Used 182 registers, used 1 barriers\n"
        "    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads"
    )
    assert aot.parse_ptxas_log(log) == {
        "stack_bytes": 16,
        "spill_store_bytes": 8,
        "spill_load_bytes": 12,
        "registers": 182,
    }


def test_gates_are_evaluated_where_they_apply():
    gates = (registry.Gate("small", "", lambda r: r["x"] < 3, lambda r: r["kernel"] == "a"),)
    rows = [
        {"kernel": "a", "config": "c1", "arch": "sm_90", "x": 1},
        {"kernel": "a", "config": "c2", "arch": "sm_90", "x": 5},
        {"kernel": "b", "config": "c1", "arch": "sm_90", "x": 9},
        {"kernel": "a", "config": "c3", "arch": "sm_80", "error": "CompilationError: boom"},
    ]
    res = registry.evaluate(gates, rows)
    assert [(r["config"], r["gate"], r["ok"]) for r in res] == [
        ("c1", "small", True),
        ("c2", "small", False),
        ("c3", "compiles", False),
    ]


def test_every_declared_candidate_has_committed_gate_verdicts():
    """A candidate added to attention_launch.CANDIDATES without rerunning the report would never be
    timed: the committed verdicts must cover every candidate, on both GPU generations (a TMA forward
    build on sm_90 only: it runs on compute capability 9.x and newer)."""
    data = json.loads((tuning.GATES_DIR / "attention.json").read_text())
    assert data["triton"], "no Triton version recorded"
    for version, per_arch in data["triton"].items():
        assert set(per_arch) == {"sm_80", "sm_90"}, version
        for (name, dclass), cfgs in AL.CANDIDATES.items():
            tune = AL.tune_name(name.removeprefix("t5"), dclass, name.startswith("t5"))
            for arch, kernels in per_arch.items():
                for cfg in cfgs:
                    if AL.is_tma(cfg) and arch != "sm_90":
                        continue
                    assert tuning.config_id(cfg) in kernels.get(tune, {}), (version, arch, tune, cfg)


def test_registry_t5_tables_are_the_ops():
    """The registry builds its T5 cases from integer facts, without importing the ops layer: they must be
    the ones the op builds for the default bucket configuration."""
    from fastformer.kernels import attention_registry as R
    from fastformer.ops.t5_attention import relative_position_buckets

    for bidirectional in (True, False):
        op = relative_position_buckets(bidirectional, 32, 128, "cpu")
        reg = R._t5_rel(bidirectional)
        assert (op.radius, op.sat_left, op.sat_right, op.bucket_left, op.bucket_right) == (
            reg.radius,
            reg.sat_left,
            reg.sat_right,
            reg.bucket_left,
            reg.bucket_right,
        )
        for name in ("bucket", "zpts", "zweights"):
            a, b = getattr(op, name), getattr(reg, name)
            assert a.shape == b.shape and a.dtype == b.dtype, name


WS_TTGIR = """
module attributes {"ttg.num-warps" = 4 : i32} {
    ttg.warp_specialize(%a) attributes {requestedRegisters = array<i32: 232, 232>}
    default {
      %0 = ttng.async_tma_copy_global_to_local %x
      ttg.warp_yield
    }
    partition0(%b: i32) num_warps(4) {
      %1 = ttng.warp_group_dot %p, %q, %r
      ttg.warp_return
    }
    partition1(%b: i32) num_warps(4) {
      %2 = ttng.warp_group_dot %p, %q, %r
      ttg.warp_return
    } : (i32) -> ()
}
"""


def test_warp_specialised_compute_warps():
    """A warp-specialised build's per-thread score elements count the warps of the regions that run
    the GEMMs (the two consumer groups), not the producer's."""
    assert aot.ttgir_compute_warps(WS_TTGIR) == 8
    assert aot.ttgir_compute_warps(TTGIR) is None


def test_every_cross_entropy_candidate_has_committed_gate_verdicts():
    """The same for the cross-entropy kernel: its declared candidates and today's kernel."""
    from fastformer.kernels import cross_entropy_launch as CL

    data = json.loads((tuning.GATES_DIR / "cross_entropy.json").read_text())
    assert data["triton"], "no Triton version recorded"
    for version, per_arch in data["triton"].items():
        assert set(per_arch) == {"sm_80", "sm_90"}, version
        for arch, kernels in per_arch.items():
            for cfg in (CL.LEGACY, *CL.ONE_BLOCK_CANDIDATES, *CL.STREAM_CANDIDATES):
                assert tuning.config_id(cfg) in kernels.get(CL.TUNE_NAME, {}), (version, arch, cfg)
            # today's kernel is always a candidate: it passes the candidate gates everywhere
            assert not kernels[CL.TUNE_NAME][tuning.config_id(CL.LEGACY)]["failed"], (version, arch)


_SPEC_SCRIPT = r"""
import json, sys, torch
from fastformer.kernels import aot
from fastformer.kernels import attention_launch as AL
from fastformer.kernels.launch import capture_launches

def launches(q, **kw):
    spec = AL.AttnSpec(scale=0.125, **kw)
    with capture_launches() as out:
        AL.attention_forward(q, q, q, spec)
    return out[0]

q = torch.empty(2, 4, 256, 64, device="meta", dtype=torch.float16)
aligned, _ = aot.build_key(launches(q), 90)
# a view one element in: its pointer is 2 bytes off the allocator's alignment
view = torch.empty(2 * 4 * 256 * 64 + 1, device="meta", dtype=torch.float16)[1:].view(2, 4, 256, 64)
shifted, _ = aot.build_key(launches(view), 90)
odd = torch.empty(2, 4, 77, 64, device="meta", dtype=torch.float16)
odd_spec, _ = aot.build_key(launches(odd, dropout_p=0.1, seed=32), 90)
print("SPEC" + json.dumps([aligned, shifted, odd_spec]))
"""


def _env():
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _nvidia_backend():
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and launched by the cuda tests")
def test_report_sees_the_launchers_specialization():
    """The report decides divisibility and constants with Triton's own runtime binder on the launcher's
    own arguments: aligned pointers and lengths are 16-divisible, a shifted view and L=77 are not,
    the dropout seed is never specialised, GROUP=1 becomes a constant."""
    _nvidia_backend()
    out = subprocess.run(
        [sys.executable, "-c", _SPEC_SCRIPT], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    aligned, shifted, odd = json.loads(next(ln for ln in out.stdout.splitlines() if ln.startswith("SPEC"))[4:])
    names = list(aligned["signature"])

    def div16(spec):
        return {names[int(k.strip("[]()").split(",")[0])] for k, v in spec["attrs"].items() if v}

    assert {"Q", "K", "V", "O", "Lq", "Lk", "s_qh"} <= div16(aligned)
    assert "Q" not in div16(shifted) and "O" in div16(shifted)
    assert not {"Lq", "Lk", "seed"} & div16(odd)
    assert aligned["signature"]["GROUP"] == "constexpr" and odd["signature"]["seed"] == "i32"


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the kernels are compiled and launched by the cuda tests")
def test_kernel_report_ci_check(tmp_path):
    """`kernel_report.py --ci --check`: the representative builds compile for sm_90 / sm_80 and every
    declared gate holds (earlier identical builds come from the report's cache)."""
    _nvidia_backend()
    out_json = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "kernel_report.py"),
            "--ci",
            "--check",
            "--quiet",
            "--json",
            str(out_json),
        ],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out_json.read_text())
    rows = report["rows"]
    assert {r["kernel"] for r in rows} == {
        "attention.fwd",
        "attention.delta",
        "attention.bwd",
        "attention.dq_finish",
        "cross_entropy.fwd",
        "cross_entropy.scale",
    }
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    assert not [r for r in rows if r.get("error")]
    assert report["gate_results"] and all(v["ok"] for v in report["gate_results"])
    for r in rows:
        assert r["registers"] > 0 and r["blocks_per_sm"] >= 1, r
        # the tile loops stage their tiles in shared memory; dQ's finishing pass is an element-wise copy
        assert r["shared_bytes"] > 0 or r["kernel"] in ("attention.dq_finish", "attention.delta"), r


# ----------------------------------------------------------------------------------------------
# the command line's own logic: --triton, --write-gates, the baseline, an empty selection
# ----------------------------------------------------------------------------------------------


def _kernel_report():
    """scripts/kernel_report.py as a module (it sets TRITON_INTERPRET=0 for its builds: restored here,
    the tests of this process run the interpreter)."""
    import importlib.util

    before = os.environ.get("TRITON_INTERPRET")
    try:
        spec = importlib.util.spec_from_file_location("kernel_report", ROOT / "scripts" / "kernel_report.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        if before is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = before
    return mod


def _run_report(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "kernel_report.py"), *args],
        cwd=ROOT,
        env=env or _env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_triton_versions_compare_as_versions():
    kr = _kernel_report()
    assert kr.same_version("3.9", "3.9.0") and kr.same_version("3.9.0", "3.9") and kr.same_version("3.6.0", "3.6.0")
    assert not kr.same_version("3.9", "3.9.1") and not kr.same_version("3.6.0", "3.9.0")


def test_triton_flag_never_respawns_for_the_installed_version(monkeypatch):
    """--triton 3.9 with 3.9.0 installed is the installed Triton: no install, no subprocess (it used to
    compare the strings and start itself again, forever). A subprocess started for a version it then
    does not import stops with an error instead of starting another."""
    import triton

    kr = _kernel_report()

    def no_install(*a, **k):
        raise AssertionError("kernel_report tried to install Triton and start a subprocess")

    monkeypatch.setattr(kr, "_install_triton", no_install)
    monkeypatch.delenv(kr.CHILD_ENV, raising=False)
    other_spelling = triton.__version__ + ".0"
    # the selection builds nothing: the run stops before any compile
    assert kr.main(["--triton", other_spelling, "--arch", "75", "--check", "--quiet"]) == 2
    monkeypatch.setenv(kr.CHILD_ENV, "0.0.1")
    assert kr.main(["--triton", "0.0.1", "--quiet"]) == 2


def _fake_candidates():
    from types import SimpleNamespace as NS

    def cand(tune, config, case, variant, archs=(90, 80)):
        return NS(tune_name=tune, config=config, case=NS(name=case, variant=variant, archs=archs))

    return [
        cand("fam.fwd:d64", (64, 64, 4, 2), "plain A", "plain"),
        cand("fam.fwd:d64", (64, 64, 4, 2), "causal A", "causal"),
        cand("fam.fwd:d64", (128, 64, 8, 2), "plain B", "plain"),
        cand("fam.fwd:d64", (128, 64, 8, 2), "causal B", "causal"),
    ]


def test_write_gates_merges_into_the_recorded_verdicts(tmp_path, monkeypatch):
    """--write-gates with --arch / --match replaces the verdicts of what it built and nothing else: the
    other arch and the other candidates stay (they used to vanish, and with them every candidate but
    the rebuilt ones on every GPU). A config built in only some of its cases keeps the recorded
    failures; one rebuilt in all of them gets the new verdict; undeclared configs are dropped."""
    kr = _kernel_report()
    monkeypatch.setattr(tuning, "GATES_DIR", tmp_path)
    A, B = tuning.config_id((64, 64, 4, 2)), tuning.config_id((128, 64, 8, 2))
    recorded = {
        "triton": {
            "9.9.9": {
                arch: {
                    "fam.fwd:d64": {
                        A: {"failed": ["no-loop-local-mem"], "variants": ["causal", "plain"]},
                        B: {"failed": ["fits"], "variants": ["causal", "plain"]},
                        "1,2,3,4": {"failed": [], "variants": ["plain"]},
                    }
                }
                for arch in ("sm_80", "sm_90")
            },
            "1.0.0": {"sm_90": {"fam.fwd:d64": {A: {"failed": [], "variants": ["plain"]}}}},
        }
    }
    (tmp_path / "fam.json").write_text(json.dumps(recorded))
    rows = [  # --arch 90: A rebuilt in its plain case only, B in both
        {"config": "plain A", "arch": "sm_90", "variant": "plain"},
        {"config": "plain B", "arch": "sm_90", "variant": "plain"},
        {"config": "causal B", "arch": "sm_90", "variant": "causal"},
    ]
    verdicts = [{"config": c, "arch": "sm_90", "gate": "fits", "ok": True} for c in ("plain A", "plain B", "causal B")]
    kr.write_gate_results("fam", "9.9.9", rows, verdicts, _fake_candidates())
    data = json.loads((tmp_path / "fam.json").read_text())
    assert data["triton"]["1.0.0"] == recorded["triton"]["1.0.0"]
    got = data["triton"]["9.9.9"]
    assert set(got) == {"sm_80", "sm_90"}
    assert got["sm_80"]["fam.fwd:d64"] == {
        k: v for k, v in recorded["triton"]["9.9.9"]["sm_80"]["fam.fwd:d64"].items() if k != "1,2,3,4"
    }
    # A: the causal case was not rebuilt, so its recorded failure stays; B passed in every case
    assert got["sm_90"]["fam.fwd:d64"][A]["failed"] == ["no-loop-local-mem"]
    assert got["sm_90"]["fam.fwd:d64"][B] == {"failed": [], "variants": ["causal", "plain"]}
    assert "1,2,3,4" not in got["sm_90"]["fam.fwd:d64"]
    assert tuning.gates_allow("fam.fwd:d64", (128, 64, 8, 2), 90, "9.9.9", data)
    assert not tuning.gates_allow("fam.fwd:d64", (128, 64, 8, 2), 80, "9.9.9", data)
    assert not tuning.gates_allow("fam.fwd:d64", (64, 64, 4, 2), 90, "9.9.9", data)


def test_baseline_explicit_must_exist_and_a_missing_default_is_said(tmp_path, monkeypatch):
    """An explicit --baseline that cannot be read is an error (the no-regression gates used to be
    dropped silently); a Triton version without a committed report gets a note saying they were skipped."""
    kr = _kernel_report()
    with pytest.raises(ValueError, match="nope.json"):
        kr.resolve_baseline(str(tmp_path / "nope.json"), "3.9.0")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError):
        kr.resolve_baseline(str(tmp_path / "bad.json"), "3.9.0")
    monkeypatch.setattr(kr, "baseline_path", lambda version: tmp_path / f"kernel_report_triton-{version}.json")
    rows, note = kr.resolve_baseline(None, "0.0.1")
    assert rows is None and "no-regression gates were skipped" in note and "0.0.1" in note
    row = {"kernel": "k", "config": "c", "arch": "sm_90", "spill_bytes": 0, "loop_local_mem_ops": 0}
    (tmp_path / "kernel_report_triton-0.0.2.json").write_text(json.dumps({"rows": [dict(row, blocks_per_sm=2)]}))
    rows, note = kr.resolve_baseline(None, "0.0.2")
    assert note == "" and [v["ok"] for v in kr.compare_baseline([dict(row, blocks_per_sm=1)], rows)] == [
        True,
        True,
        False,
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--ci", "--baseline", "/nonexistent/kernel_report.json"],
        ["--arch", "100"],
        ["--arch", "75"],
        ["--match", "no_such_case"],
    ],
)
def test_check_fails_when_nothing_is_checked(args):
    """`--check` with an unreadable --baseline or a selection that builds no case exits 2 at once, with a
    message (it used to report '0 gate checks, 0 failed', or drop the no-regression gates, and pass)."""
    _nvidia_backend()
    proc = _run_report("--check", "--quiet", *args, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "cannot read the baseline" in proc.stderr or "builds no case" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "argv, says",
    [
        # a ValueError traceback and exit 1, which --check uses for a failed gate
        (["--family", "nosuch", "--check"], "--family nosuch"),
        (["--family", "attention", "nosuch"], "nosuch"),
        # it used to build everything and record nothing (docs/kernels.md: --candidates --write-gates)
        (["--write-gates"], "--candidates"),
    ],
)
def test_impossible_requests_are_refused_before_any_build(argv, says, monkeypatch, capsys):
    """A request the report cannot carry out is a one-line error, exit 2, before anything is built
    (under --check, exit 1 means that a gate failed)."""
    kernel_report = _kernel_report()
    monkeypatch.setattr(kernel_report, "run_tasks", lambda *a, **k: pytest.fail("kernel_report built something"))
    assert kernel_report.main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "Traceback" not in err, err
