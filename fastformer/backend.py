"""Backend dispatch: which implementation an op runs.

    FASTFORMER_BACKEND=auto       (default) Triton kernels for CUDA tensors on a GPU of compute
                                  capability 8.0 or newer (older ones: the reference); for CPU tensors the fastest
                                  correct implementation torch itself has (e.g. torch's fused CPU
                                  attention), else the eager reference
    FASTFORMER_BACKEND=triton     force the Triton kernels (on CPU this needs TRITON_INTERPRET=1,
                                  which fastformer sets itself when imported with a CPU-only torch
                                  before triton is imported)
    FASTFORMER_BACKEND=reference  force the eager PyTorch reference

The same choice in code::

    ff.set_backend("reference")          # the whole process, like FASTFORMER_BACKEND
    with ff.use_backend("triton"):       # this thread, for the block
        ...
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from pathlib import Path

import torch

BACKENDS = ("auto", "triton", "reference")

_state = threading.local()  # this thread's use_backend block in force, if any


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return name.lower()


def _from_environment() -> tuple[str | None, str | None]:
    """(FASTFORMER_BACKEND's backend, None), or (None, the error) for a value that is none: said at the
    first use (a ValueError the CLI prints as one line), not as a traceback of `import fastformer`."""
    try:
        return _validate(os.environ.get("FASTFORMER_BACKEND", "auto")), None
    except ValueError as e:
        return None, f"FASTFORMER_BACKEND: {e}"


_process, _env_error = _from_environment()  # set_backend: every thread


def get_backend() -> str:
    """The backend in force in this thread: 'auto', 'triton' or 'reference'."""
    block = getattr(_state, "backend", None)
    if block is not None:
        return block
    if _process is None:
        raise ValueError(_env_error)
    return _process


def set_backend(name: str) -> None:
    """Set the backend for the whole process, as FASTFORMER_BACKEND does (threads that a library starts,
    e.g. nn.DataParallel's, included). Inside a `use_backend` block it also changes that block's
    choice until the block ends."""
    global _process
    _process = _validate(name)
    if getattr(_state, "backend", None) is not None:
        _state.backend = _process


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: the backend for the duration of a block, in this thread only (as torch.autocast
    and torch.no_grad are); other threads keep theirs. Blocks nest."""
    previous = getattr(_state, "backend", None)
    _state.backend = _validate(name)
    try:
        yield
    finally:
        _state.backend = previous


# The cache sits on this inner function: Dynamo ignores the constant mark on a functools.cache wrapper
# (it traces into the wrapper and warns), so triton_available itself stays a plain function.
@functools.cache
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # noqa: BLE001 - any import problem means "not available"
        return False
    return True


def _constant_under_compile(fn):
    """torch.compile calls fn while tracing and keeps its result as a constant (instead of tracing into
    the import and the cache around it, which it warns about)."""
    mark = getattr(getattr(torch, "compiler", None), "assume_constant_result", None)
    return mark(fn) if mark is not None else fn


@_constant_under_compile
def triton_available() -> bool:
    """True when triton imports (with a GPU, or on CPU under TRITON_INTERPRET=1)."""
    return _triton_imports()


# The kernels' tile configurations are built and gated for sm_80 and sm_90 (their bf16 tensor-core
# dots and shared-memory sizes); a Volta or Turing GPU (V100, T4) runs the reference under `auto`.
MIN_KERNEL_CAPABILITY = (8, 0)


@functools.cache  # on the inner function, as _triton_imports: the outer one is a constant under compile
def _capability_supported(index: int) -> bool:
    return tuple(torch.cuda.get_device_capability(index)) >= MIN_KERNEL_CAPABILITY


@_constant_under_compile
def kernels_supported(index: int) -> bool:
    """Whether `auto` runs the Triton kernels on CUDA device `index` (compute capability >= 8.0)."""
    return _capability_supported(index)


def compute_capability(index: int | torch.device) -> str:
    """'7.5', '9.0': CUDA device `index`'s compute capability, as messages name it."""
    return ".".join(map(str, torch.cuda.get_device_capability(index)))


def fast_cuda(device: torch.device | str) -> bool:
    """A CUDA device of compute capability >= 8.0: where training autocasts to bf16 and `auto` runs the
    fused kernels (on older GPUs training runs in fp32 and the ops run the reference)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return kernels_supported(device.index if device.index is not None else torch.cuda.current_device())


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str] | None:
    """The first processor's fields of /proc/cpuinfo (or of the given text of one); None when the
    file cannot be read (not Linux)."""
    try:
        text = cpuinfo if cpuinfo is not None else Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


# /proc/cpuinfo flags of CPUs with bf16 dot-product instructions (x86 AVX512-BF16, AMX; Arm BF16)
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU (per /proc/cpuinfo, or the given text of one) has bf16 dot-product instructions.
    With them a bf16 matmul runs several times faster than fp32 (a 2-core AMD EPYC with AVX512-BF16, two
    threads: 818 against 197 GFLOP/s at 1024^3); without them torch emulates it, far slower than fp32
    (a 2-core AMD EPYC with AVX2 only, one thread: 1.6 against 52 GFLOP/s)."""
    fields = cpuinfo_fields(cpuinfo) or {}
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 / Arm
    return any(f in flags.split() for f in BF16_FLAGS)


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def under_functorch(*tensors: torch.Tensor | None) -> bool:
    """Whether a torch.func transform (vmap, grad, jacrev, ...) wraps any of these tensors.

    The fused paths are autograd.Functions whose backward is a kernel, and their checks read values on
    the host; neither works inside a transform. There the ops run their torch-operation paths, which
    torch.func batches and differentiates (use_triton says no; linear_cross_entropy asks directly).
    """
    if torch.compiler.is_compiling():
        return False  # dynamo cannot trace the check below (a pybind builtin); it traces the transforms itself
    wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)
    return wrapped is not None and any(t is not None and wrapped(t) for t in tensors)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide whether an op given these tensors should launch its Triton kernel.

    auto: only for CUDA tensors on a GPU of compute capability >= 8.0 (and triton importable). triton:
    always, on CUDA tensors or, under the interpreter, CPU tensors; raising if that is impossible.
    reference: never; nor inside a torch.func transform (under_functorch).
    """
    backend = get_backend()
    if backend == "reference" or under_functorch(*tensors):
        return False
    if backend == "auto":
        index = _cuda_index(tensors)
        return index is not None and triton_available() and kernels_supported(index)
    on_cuda = all(t.is_cuda for t in tensors if t is not None)
    if not triton_available():
        raise RuntimeError("FASTFORMER_BACKEND=triton but triton cannot be imported")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "FASTFORMER_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before triton is imported"
        )
    return True


def below_kernel_gpu(*tensors: torch.Tensor) -> bool:
    """Backend auto with every tensor on a CUDA GPU older than the kernels support (compute capability
    below 8.0: a T4, a V100): attention then runs torch's own SDPA there instead of the eager
    reference, which would materialise the fp32 score matrix."""
    index = _cuda_index(tensors) if get_backend() == "auto" else None
    return index is not None and not kernels_supported(index)


def _cuda_index(tensors) -> int | None:
    """The device index of the first tensor when every tensor given (None skipped) is a CUDA tensor and
    there is at least one; else None. Stops at the first CPU tensor: this runs on every op call."""
    index = None
    for t in tensors:
        if t is None:
            continue
        if not t.is_cuda:
            return None
        if index is None:
            index = t.device.index
    return index


def cpu_fast_path(*tensors: torch.Tensor) -> bool:
    """True when an op should use torch's own implementation instead of the eager reference: backend
    auto and every tensor on the CPU (where the Triton kernels do not run). The op decides which torch
    function that is (see docs/ops.md, "CPU dispatch"); backend "reference" never takes it."""
    return get_backend() == "auto" and all(t.device.type == "cpu" for t in tensors if t is not None)
