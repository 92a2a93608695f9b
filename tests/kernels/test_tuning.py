"""Self-tuning on CPU with a fake timer: the choice, the disk cache across processes, the switches,
failing and gate-rejected candidates, and the attention launchers' use of it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastformer.kernels import tuning

FACTS = ("Fake GPU 80GB", 90, "9.9.9")
DEFAULT = (64, 64, 4, 2)
CANDS = [(128, 64, 8, 3), (32, 32, 4, 1), (64, 128, 8, 2)]
KERNEL = "attention.fwd:d64"


class FakeTimer:
    """Times a candidate by what run(cfg) records: each config has a fixed fake duration; a config
    listed in `fail` raises (as a compile error or out-of-resources would)."""

    def __init__(self, ms, fail=()):
        self.ms, self.fail, self.timed, self.last = ms, set(fail), [], None

    def run(self, cfg):
        if cfg in self.fail:
            raise RuntimeError(f"out of resources for {cfg}")
        self.last = cfg

    def __call__(self, fn):
        fn()
        self.timed.append(self.last)
        return self.ms[self.last]


@pytest.fixture
def tune_env(tmp_path, monkeypatch):
    """An empty cache folder, tuning on, every candidate allowed by a gate file of our own."""
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(tuning.TUNE_ENV, raising=False)
    gates = tmp_path / "gates"
    gates.mkdir()
    verdicts = {tuning.config_id(c): {"failed": []} for c in CANDS}
    verdicts[tuning.config_id((64, 128, 8, 2))] = {"failed": ["no-loop-local-mem"]}
    (gates / "attention.json").write_text(json.dumps({"triton": {"9.9.9": {"sm_90": {KERNEL: verdicts}}}}))
    monkeypatch.setattr(tuning, "GATES_DIR", gates)
    tuning.reset()
    yield tmp_path
    tuning.reset()
    tuning.set_timer(None)
    tuning.set_tuning(None)


def _choose(timer, shape="bfloat16|d64|plain|L1024|BH64"):
    tuning.set_timer(timer)
    return tuning.choose(KERNEL, shape, DEFAULT, CANDS, timer.run, torch.device("cpu"), facts=FACTS)


def test_fastest_allowed_candidate_is_chosen_and_cached(tune_env):
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 3.0, (64, 128, 8, 2): 0.1})
    assert _choose(timer) == (128, 64, 8, 3)
    # the default is always timed; the candidate that failed a gate never is
    assert set(timer.timed) == {DEFAULT, (128, 64, 8, 3), (32, 32, 4, 1)}
    # the same shape class again: no timing at all
    timer.timed.clear()
    assert _choose(timer) == (128, 64, 8, 3) and timer.timed == []
    data = json.loads(tuning.cache_file(*FACTS[::2]).read_text())
    entry = data["entries"][f"{KERNEL}|bfloat16|d64|plain|L1024|BH64"]
    assert entry["config"] == [128, 64, 8, 3] and entry["timings_ms"]["64,64,4,2"] == 2.0
    assert [c["config"] for c in tuning.chosen()] == [[128, 64, 8, 3]]


def test_choice_is_reused_by_a_later_process_that_has_no_triton(tune_env):
    """A later process takes the cached choice without timing; the host-side modules (which the
    reference path imports) need no triton for any of it."""
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 3.0, (32, 32, 4, 1): 1.5})
    assert _choose(timer) == (32, 32, 4, 1)
    script = (
        "import sys\nsys.modules['triton'] = None\n"
        "import torch\nfrom fastformer.kernels import tuning\n"
        "import fastformer.kernels.attention_launch, fastformer.kernels.launch\n"
        "import fastformer.kernels.registry, fastformer.kernels.attention_registry\n"
        f"from pathlib import Path\ntuning.GATES_DIR = Path({str(tuning.GATES_DIR)!r})  # the same gate verdicts\n"
        "def boom(fn):\n    raise AssertionError('a cached choice must not be timed again')\n"
        "tuning.set_timer(boom)\n"
        f"print(tuning.choose({KERNEL!r}, 'bfloat16|d64|plain|L1024|BH64', {DEFAULT!r}, {CANDS!r}, lambda c: None,"
        f" torch.device('cpu'), facts={FACTS!r}))\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "(32, 32, 4, 1)"


def test_tune_off_pins_the_default(tune_env, monkeypatch):
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 1.0})
    monkeypatch.setenv(tuning.TUNE_ENV, "0")
    assert _choose(timer) == DEFAULT and timer.timed == []
    monkeypatch.delenv(tuning.TUNE_ENV)
    with tuning.use_tuning(False):
        assert _choose(timer) == DEFAULT and timer.timed == []
    assert not tuning.cache_file(*FACTS[::2]).exists()
    assert _choose(timer) == (128, 64, 8, 3)  # on again: tuned
    with tuning.use_tuning(False):  # a cached choice is not used either
        assert _choose(timer) == DEFAULT


def test_failing_candidate_is_skipped(tune_env):
    timer = FakeTimer({DEFAULT: 2.0, (32, 32, 4, 1): 1.0}, fail={(128, 64, 8, 3)})
    assert _choose(timer) == (32, 32, 4, 1)
    entry = tuning.chosen()[-1]
    assert "128,64,8,3" in entry["skipped"] and "out of resources" in entry["skipped"]["128,64,8,3"]
    # if every candidate fails, the default stands (and the launch itself reports the error)
    tuning.reset()
    timer = FakeTimer({}, fail={DEFAULT, *CANDS})
    assert _choose(timer, shape="other") == DEFAULT


def test_first_writer_wins_on_a_shared_cache(tune_env):
    path = tuning.cache_file(*FACTS[::2])
    path.parent.mkdir(parents=True)
    key = f"{KERNEL}|bfloat16|d64|plain|L1024|BH64"
    path.write_text(json.dumps({"entries": {key: {"config": [32, 32, 4, 1]}}}))
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 9.0})
    assert _choose(timer) == (32, 32, 4, 1) and timer.timed == []


@pytest.mark.parametrize(
    "written",
    [
        {"config": [256, 256, 16, 7]},  # not a candidate (an older fastformer's, a hand edit)
        {"config": [64, 128, 8, 2]},  # a candidate the gates reject on this GPU and Triton
        {"config": [64, 64]},  # another tuple layout
        {"config": "64,64,4,2"},
        {"config": None},
        None,
    ],
)
def test_an_invalid_cache_entry_is_never_launched_and_is_replaced(tune_env, written):
    path = tuning.cache_file(*FACTS[::2])
    path.parent.mkdir(parents=True)
    key = f"{KERNEL}|bfloat16|d64|plain|L1024|BH64"
    path.write_text(json.dumps({"entries": {key: written}}))
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 3.0})
    assert _choose(timer) == (128, 64, 8, 3)  # tuned as if there were no entry
    assert json.loads(path.read_text())["entries"][key]["config"] == [128, 64, 8, 3]


@pytest.mark.parametrize("content", ['{"entries": []}', "[1, 2]", '{"entries": {"k": 3}}', '{"entr', ""])
def test_a_malformed_cache_file_is_tuned_over(tune_env, content):
    path = tuning.cache_file(*FACTS[::2])
    path.parent.mkdir(parents=True)
    path.write_text(content)
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 3.0})
    assert _choose(timer) == (128, 64, 8, 3)


def test_the_cache_file_is_per_kernel_sources(tune_env):
    """Another fastformer's kernels (a config tuple may mean something else there) use another file."""
    name = tuning.cache_file(*FACTS[::2]).name
    assert name.startswith("Fake_GPU_80GB__triton-9.9.9__kernels-") and tuning.kernels_tag() in name


def test_the_tuning_switch_holds_in_other_threads(tune_env):
    """Autograd runs a CUDA backward on its own device thread: `use_tuning(False)` must reach it."""
    import threading

    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 3.0})
    got = []
    with tuning.use_tuning(False):
        worker = threading.Thread(target=lambda: got.append(_choose(timer)))
        worker.start()
        worker.join()
    assert got == [DEFAULT] and timer.timed == []
    assert tuning.tuning_enabled()  # restored after the block


def test_nothing_is_tuned_on_cpu_or_for_unknown_candidates(tune_env):
    def boom(fn):
        raise AssertionError("must not time")

    tuning.set_timer(boom)
    # a real CPU device (no facts): the default, untimed
    assert tuning.choose(KERNEL, "x", DEFAULT, CANDS, lambda c: None, torch.device("cpu")) == DEFAULT
    # a kernel the gate file does not know: only the default is allowed, so nothing is timed
    assert (
        tuning.choose("attention.dq:d128", "x", DEFAULT, CANDS, lambda c: None, torch.device("cpu"), facts=FACTS)
        == DEFAULT
    )


def test_gate_lookup_rules():
    res = {
        "triton": {
            "3.6.0": {"sm_80": {"k": {"1,2,3,4": {"failed": []}}}, "sm_90": {"k": {"1,2,3,4": {"failed": ["fits"]}}}},
            "3.9.0": {"sm_90": {"k": {"1,2,3,4": {"failed": []}}}},
        }
    }
    cfg = (1, 2, 3, 4)
    assert tuning.gates_allow("k", cfg, 80, "3.6.0", res)
    assert tuning.gates_allow("k", cfg, 86, "3.6.0", res)  # sm_86: judged by sm_80
    assert not tuning.gates_allow("k", cfg, 90, "3.6.0", res)
    assert tuning.gates_allow("k", cfg, 100, "3.9.0", res)  # sm_100: judged by sm_90
    assert not tuning.gates_allow("k", cfg, 90, "4.0.0", res)  # unknown version: must pass everywhere
    assert not tuning.gates_allow("k", (9, 9, 9, 9), 90, "3.9.0", res)


def test_attention_launchers_ask_the_tuner(monkeypatch):
    """Every tile-configured attention job goes through tuning.choose with its name and shape class;
    force_config reaches the launch (checked by capturing the launches of meta tensors): the forward,
    the five-GEMM backward (one kernel + the dQ finishing pass), and an eight-value backward choice that
    runs the seven-GEMM pair with its two configurations."""
    from fastformer.kernels import attention_launch as AL
    from fastformer.kernels.launch import capture_launches

    asked = []
    real = tuning.choose
    monkeypatch.setattr(tuning, "choose", lambda *a, **k: (asked.append(a[:2]), real(*a, **k))[1])
    q = torch.empty(2, 4, 100, 64, device="meta", dtype=torch.bfloat16)
    spec = AL.AttnSpec(scale=0.125, causal=True)
    with capture_launches() as launches, tuning.force_config("attention.bwd:d64", (32, 64, 4, 2)):
        out, lse = AL.attention_forward(q, q, q, spec)
        AL.attention_backward(torch.empty_like(out), q, q, q, out, lse, spec)
    assert [n for n, _ in asked] == ["attention.fwd:d64", "attention.bwd:d64"]
    assert asked[0][1] == "bfloat16|d64|causal|L128|BH8"
    assert [x.name for x in launches] == ["attention.fwd", "attention.delta", "attention.bwd", "attention.dq_finish"]
    bwd = launches[2]
    assert bwd.config == (32, 64, 4, 2) and bwd.grid == (2, 8) and bwd.kwargs["BLOCK_N"] == 64
    assert bwd.kwargs["COMPUTE_DQ"] and bwd.kwargs["SPIN"] == (not AL._interpreting())
    with capture_launches() as launches, tuning.force_config("attention.bwd:d64", (32, 64, 4, 2, 64, 32, 4, 2)):
        AL.attention_backward(torch.empty_like(out), q, q, q, out, lse, spec)
    assert [x.name for x in launches] == ["attention.delta", "attention.dkdv", "attention.dq"]
    assert launches[1].config == (32, 64, 4, 2) and not launches[1].kwargs["COMPUTE_DQ"]
    assert launches[2].config == (64, 32, 4, 2) and launches[2].grid == (2, 8)


def test_hopper_forward_is_the_tma_build_where_it_can_run(monkeypatch):
    """Captured for sm_90 (as the kernel report does), a 16-bit forward with rows aligned to 16 bytes is
    the TMA build with a warp-specialised loop; a mask tensor keeps TMA off the warp specialiser (its
    per-tile loads), a view 2 bytes off alignment and sm_80 run the pointer build."""
    from fastformer.kernels import attention_launch as AL
    from fastformer.kernels.launch import capture_launches, for_arch

    monkeypatch.setattr(AL, "_triton_has_tma", lambda: True)
    monkeypatch.setattr(AL, "_interpreting", lambda: False)

    def fwd(q, arch, **kw):
        with capture_launches() as launches, for_arch(arch):
            AL.attention_forward(q, q, q, AL.AttnSpec(scale=0.125, **kw))
        return launches[0]

    q = torch.empty(2, 4, 256, 64, device="meta", dtype=torch.bfloat16)
    item = fwd(q, 90)
    assert item.kwargs["TMA"] and item.kwargs["WS"] and len(item.config) == 5 and item.kwargs["num_warps"] == 4
    assert not item.kwargs["WS_MASKED"]  # 256 keys: whole blocks, nothing to mask
    assert fwd(q, 90, causal=True).kwargs["WS_MASKED"]
    mask = torch.empty(2, 1, 256, 256, device="meta", dtype=torch.uint8).expand(2, 4, 256, 256)
    masked = fwd(q, 90, mask=mask)
    assert not masked.kwargs["TMA"] and len(masked.config) == 4
    view = torch.empty(2 * 4 * 256 * 64 + 1, device="meta", dtype=torch.bfloat16)[1:].view(2, 4, 256, 64)
    assert not fwd(view, 90).kwargs["TMA"]
    assert not fwd(q, 80).kwargs["TMA"]
    with AL.use_variants(fwd="pointer"):
        assert not fwd(q, 90).kwargs["TMA"]


def test_launchers_run_on_the_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a launcher given tensors on another GPU makes theirs
    current for the call (checked with a stand-in tensor and torch.cuda stubs; no GPU here)."""
    from types import SimpleNamespace

    from fastformer.kernels import attention_launch, cross_entropy_launch
    from fastformer.kernels.launch import on_tensor_device

    entered = []

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device.index)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    launcher = on_tensor_device(lambda t, x: ("ran", x))
    on_gpu1 = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=1))
    on_gpu0 = SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))
    assert launcher(on_gpu1, 7) == ("ran", 7) and entered == [1]
    assert launcher(on_gpu0, 8) == ("ran", 8) and entered == [1]  # already current: nothing to switch
    assert launcher(torch.zeros(1), 9) == ("ran", 9) and entered == [1]  # CPU (the interpreter)
    for fn in (attention_launch.attention_forward, attention_launch.attention_backward):
        assert fn.__wrapped__ is not None
    for fn in (cross_entropy_launch.ce_forward, cross_entropy_launch.scale_rows_):
        assert fn.__wrapped__ is not None


def test_tuning_blocks_of_two_threads_may_end_in_any_order(tune_env):
    import threading

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with tuning.use_tuning(False):
            a_in.set()
            b_in.wait()
        a_out.set()

    def second():
        a_in.wait()
        with tuning.use_tuning(True):
            b_in.set()
            a_out.wait()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tuning.tuning_enabled()  # both blocks over: back to FASTFORMER_TUNE (on), not left off


def test_the_kernels_tag_skips_editor_files(tmp_path, monkeypatch):
    """An editor's lock file (a dangling `.#tuning.py` link) must not break every tuned launch."""
    import shutil

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    for f in Path(tuning.__file__).parent.glob("*.py"):
        shutil.copy(f, kernels / f.name)
    (kernels / ".#tuning.py").symlink_to(tmp_path / "nowhere")
    monkeypatch.setattr(tuning, "__file__", str(kernels / "tuning.py"))
    tuning.kernels_tag.cache_clear()
    try:
        assert len(tuning.kernels_tag()) == 12
    finally:
        tuning.kernels_tag.cache_clear()


def test_a_cache_that_cannot_be_replaced_or_read_is_left_alone(tune_env, monkeypatch):
    """A failed rename leaves no temporary file behind, and a cache file this process cannot read is
    never rewritten (that would drop the entries of every other process): the choice stays in memory."""
    path = tuning.cache_file(*FACTS[::2])
    path.mkdir(parents=True)  # os.replace onto a folder fails
    timer = FakeTimer({DEFAULT: 2.0, (128, 64, 8, 3): 1.0, (32, 32, 4, 1): 3.0})
    assert _choose(timer) == (128, 64, 8, 3)
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".lock").name])
    path.rmdir()
    path.write_text(json.dumps({"entries": {"someone|else": {"config": list(DEFAULT)}}}))
    tuning.reset()
    monkeypatch.setattr(tuning.os, "access", lambda p, mode: Path(p) != path)  # root reads anything: pretend
    assert _choose(timer) == (128, 64, 8, 3)
    assert json.loads(path.read_text())["entries"] == {"someone|else": {"config": list(DEFAULT)}}
