"""Shared test configuration: interpreter switch, per-dtype tolerances, device/backend fixtures.

Tests compare against a float64 reference by relative error ‖out − ref‖ / ‖ref‖ and use the
tolerance of the *input* dtype from TOLERANCES. Import the helpers with `from conftest import ...`.
"""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors in the interpreter; this must precede any triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastformer.backend import use_backend  # noqa: E402

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_script(name: str):
    """bench/<name>.py as a module, loaded once: registered in sys.modules (dataclasses look their
    module up there), with bench/ on sys.path (the scripts import their neighbours)."""
    if name not in sys.modules:
        if str(BENCH) not in sys.path:
            sys.path.insert(0, str(BENCH))
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_bench_main(monkeypatch, name: str, *argv) -> int | str | None:
    """bench/<name>.py's main() run with argv as its command line; its exit status (a SystemExit's
    code, or what main returned)."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *argv])
    try:
        return bench_script(name).main()
    except SystemExit as e:
        return e.code


# Relative-error tolerance per input dtype. fp32 on GPU includes tf32 matmuls (~3e-4);
# in the CPU interpreter fp32 dots are exact fp32.
TOLERANCES = {
    torch.float64: 1e-10,
    torch.float32: 2e-3 if HAS_CUDA else 1e-5,
    torch.float16: 5e-3,
    torch.bfloat16: 3e-2,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN anywhere gives inf)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff if denom == 0 else diff / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "output", factor: float = 1.0):
    """Assert rel_err(out, ref) <= factor * TOLERANCES[dtype], with a readable message."""
    err = rel_err(out, ref)
    tol = factor * TOLERANCES[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} > tolerance {tol:.1e} ({dtype})"


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (floats) so an element a kernel forgot to write fails the comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-12345)


def compile_ahead_of_time(script: str, timeout: int = 600):
    """Run `script` (Python source that compiles Triton kernels for a GPU target with
    triton.compile) in a subprocess with the interpreter off, from the repository root. Skips when
    this triton has no NVIDIA backend. Returns the CompletedProcess (text stdout/stderr)."""
    import subprocess
    import sys
    from pathlib import Path

    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton has no NVIDIA backend here: {exc}")
    root = Path(__file__).resolve().parents[1]
    # explicitly off: `import fastformer` would otherwise switch the interpreter on (no GPU here)
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=timeout
    )


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run by `make gpu-check`)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device():
    """The device kernels run on: CUDA when present, else CPU (Triton in the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run the test body once per backend."""
    with use_backend(request.param):
        yield request.param


@pytest.fixture
def triton_backend():
    with use_backend("triton"):
        yield "triton"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
