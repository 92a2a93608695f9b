"""Backend dispatch: env var values, code switch, context manager, validation."""

import os

import pytest
import torch

import fastformer as ff
from fastformer.backend import use_triton


def test_default_backend_is_auto_or_env():
    assert ff.get_backend() in ("auto", "triton", "reference")


def test_set_and_context_manager_restore():
    before = ff.get_backend()
    with ff.use_backend("reference"):
        assert ff.get_backend() == "reference"
        assert not use_triton(torch.zeros(1))
        with ff.use_backend("triton"):
            assert ff.get_backend() == "triton"
        assert ff.get_backend() == "reference"
    assert ff.get_backend() == before


def _in_other_thread():
    import threading

    seen = []
    worker = threading.Thread(target=lambda: seen.append(ff.get_backend()))
    worker.start()
    worker.join()
    return seen[0]


def test_set_backend_is_process_wide_and_use_backend_per_thread():
    before = ff.get_backend()
    try:
        ff.set_backend("reference")  # like FASTFORMER_BACKEND: threads started by libraries see it
        assert ff.get_backend() == "reference" and _in_other_thread() == "reference"
        with ff.use_backend("triton"):  # a block is this thread's only
            assert ff.get_backend() == "triton" and _in_other_thread() == "reference"
            ff.set_backend("auto")  # takes effect at once, in the block too
            assert ff.get_backend() == "auto" and _in_other_thread() == "auto"
        assert ff.get_backend() == "auto"
    finally:
        ff.set_backend(before)


def test_auto_uses_reference_for_cpu_tensors():
    with ff.use_backend("auto"):
        assert not use_triton(torch.zeros(1))


def test_triton_forced_on_cpu_runs_interpreter():
    # conftest switches the interpreter on when there is no GPU
    with ff.use_backend("triton"):
        assert use_triton(torch.zeros(1))


def test_unknown_backend_is_value_error():
    with pytest.raises(ValueError, match="backend"):
        ff.set_backend("cuda-magic")


def test_cli_info_runs(capsys):
    from fastformer.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backend" in out


def test_readme_namespaces_reachable_after_plain_import():
    # the docs: `import fastformer as ff` then ff.models.from_hf / ff.optim / ff.integrations, without
    # importing the submodules by hand (a fresh process: this session has imported them already)
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import fastformer as ff; "
        "[getattr(ff.models, n) for n in ('from_hf', 'to_hf')]; "
        "ff.optim.FusedAdamW; ff.optim.extension_available; ff.integrations.patch_hf_model; "
        "ff.nn.MultiheadAttention; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_import_switches_the_interpreter_on_without_a_gpu():
    """docs/design.md: `import fastformer` switches Triton's interpreter on when there is no GPU, so
    ff.use_backend("triton") works on CPU tensors without any environment variable."""
    import subprocess
    import sys

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: the compiled kernels run")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTFORMER_BACKEND")}
    code = (
        "import torch, fastformer as ff\n"
        "with ff.use_backend('triton'):\n"
        "    q = torch.randn(1, 1, 4, 8)\n"
        "    ff.scaled_dot_product_attention(q, q, q)\n"
        "    print(float(ff.cross_entropy(torch.randn(3, 5), torch.tensor([0, 1, 4]))) > 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]


def test_a_bad_environment_backend_is_one_line_at_first_use():
    """FASTFORMER_BACKEND=nope made `import fastformer` (and so every command) end in a traceback."""
    import subprocess
    import sys

    env = {**os.environ, "FASTFORMER_BACKEND": "nope", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "fastformer", "info"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip() == (
        "fastformer: error: FASTFORMER_BACKEND: backend must be one of ('auto', 'triton', 'reference'), got 'nope'"
    )
    with pytest.raises(ValueError, match="got None"):
        ff.set_backend(None)


@pytest.fixture
def cuda_capability(monkeypatch):
    """Pretend a CUDA GPU of a chosen compute capability (nothing here launches on it)."""
    from fastformer import backend

    def use(cc):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
        backend._capability_supported.cache_clear()

    yield use
    backend._capability_supported.cache_clear()


def test_auto_runs_the_kernels_on_compute_capability_8_and_newer_only(cuda_capability, monkeypatch):
    """The kernels' tiles are built and gated for sm_80 / sm_90 and use bf16 tensor cores: on a T4 or
    V100 `auto` used to launch them anyway (bf16 dots do not compile for sm_75). There `auto` now runs
    the reference, and training runs in fp32 (fast_cuda is the trainer's autocast rule too)."""
    from types import SimpleNamespace

    from fastformer import backend

    monkeypatch.setattr(backend, "under_functorch", lambda *t: False)
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    fake = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    from fastformer.ops import attention_common

    for cc, fast in (((7, 5), False), ((7, 0), False), ((8, 0), True), ((9, 0), True), ((12, 0), True)):
        cuda_capability(cc)
        assert backend.fast_cuda("cuda:0") is fast and backend.use_triton(fake, None) is fast, cc
        # attention: the kernels, or on an older GPU torch's own SDPA (not the eager reference, which
        # would materialise the fp32 scores)
        path = attention_common.attention_path(fake, fake, fake, None, covered=True, dropout_p=0.0)
        assert path == ("kernel" if fast else "torch"), cc
        with ff.use_backend("triton"):  # forced: launched whatever the GPU
            assert backend.use_triton(fake)
        with ff.use_backend("reference"):
            assert attention_common.attention_path(fake, fake, covered=True, dropout_p=0.0) == "reference"
    assert not backend.fast_cuda("cpu")


def test_info_names_the_gpus_and_an_old_ones_fp32(cuda_capability, monkeypatch, capsys):
    from fastformer.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr("fastformer.optim.extension_available", lambda *a, **k: True)
    cuda_capability((7, 5))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "(CUDA yes: 2 x Tesla T4, compute capability 7.5)" in out
    assert "below 8.0: no fused kernels, training runs in fp32" in out
    cuda_capability((9, 0))
    assert main(["info"]) == 0
    assert "below 8.0" not in capsys.readouterr().out
