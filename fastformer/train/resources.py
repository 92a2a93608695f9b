"""CPU threads, denormal floats and a peak-memory estimate, all settled before the first training step.

Threads: `--threads N` wins, then OMP_NUM_THREADS, then an automatic choice: the physical cores this
process may use, fewer when the machine is already busy (the 1-minute load average says how many CPUs
other processes keep running). On a loaded machine, intra-op threads that wait for a CPU make every
step slower than one thread would.

Memory: parameters, gradients and optimizer state in fp32, plus the activations a training step keeps
for the backward pass at the micro-batch size and sequence length. The activation model was fitted to
the peak RSS of training steps measured on CPU for bert-tiny / bert-mini / t5-tiny at lengths 128 to
2048 (`bench/memory_estimate.py`; the estimates came out at 0.82x to 1.32x of the measured growth):
the eager attention of the CPU path keeps about three fp32 (B, H, Lq, Lk) tensors per attention
layer; the fused GPU kernels keep none (not measured on a GPU). It is an estimate, used to refuse runs
that cannot fit and to warn about runs that come close.

Denormals: a model that has trained for a while produces denormal floats (softmax probabilities of
far-off keys, activation tails and their gradients), and every CPU operation that touches one takes a
microcode assist: a CPU training step grew up to 1.6x slower over a run. `flush_denormals` turns on
flush-to-zero / denormals-are-zero on every CPU thread for the duration of training (values below
1.2e-38 in fp32 become 0); FASTFORMER_FLUSH_DENORMAL=0 leaves the threads as they are.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastformer.backend import compute_capability, cpu_has_bf16, fast_cuda

GB = 1024**3
# fp32 bytes per parameter for weights + gradients + optimizer state
OPTIMIZER_STATE = {"fusedadamw": 8, "adamw": 8, "sgd": 4, "rmsprop": 4}
SCORE_BYTES = 13  # per attention-score element kept for backward on the eager path (3 fp32 + a mask)
WARN_FRACTION = 0.8  # warn above this fraction of the available memory


# ---------------------------------------------------------------------------------------------------
# threads
# ---------------------------------------------------------------------------------------------------


def _physical_cores() -> int | None:
    """Distinct (package, core) pairs among the CPUs this process may use (Linux), else None."""
    try:
        allowed = os.sched_getaffinity(0)
        text = Path("/proc/cpuinfo").read_text()
    except (AttributeError, OSError):
        return None
    cores, cpu, phys = set(), None, None
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "processor" not in fields:
            continue
        cpu = int(fields["processor"])
        if cpu in allowed:
            phys = (fields.get("physical id", "0"), fields.get("core id", str(cpu)))
            cores.add(phys)
    return len(cores) or None


def _cgroup_cpus() -> float | None:
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def auto_threads() -> tuple[int, str]:
    """(threads, why) for this machine now."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(_physical_cores() or logical, logical)
    quota = _cgroup_cpus()
    if quota:
        cores = max(1, min(cores, int(quota)))
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    idle = max(1, int(logical - load + 0.5))
    n = max(1, min(cores, idle))
    why = f"auto: {cores} core{'s' if cores != 1 else ''}"
    if n < cores:
        why += f", load {load:.1f}"
    return n, why


def choose_threads(requested: int | None = None) -> tuple[int, str]:
    """(threads, source) a run would use, setting nothing: `requested` (--threads) first, then
    OMP_NUM_THREADS, then `auto_threads()`; source is "--threads", "OMP_NUM_THREADS" or "auto: ..."."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be at least 1, got {requested}")
        return requested, "--threads"
    if os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
    return auto_threads()


def set_threads(requested: int | None) -> tuple[int, str]:
    """Set torch's intra-op threads to `choose_threads(requested)`; returns (threads, source)."""
    n, why = choose_threads(requested)
    torch.set_num_threads(n)
    return n, why


FTZ_DAZ = 0x8040  # MXCSR bits: flush-to-zero | denormals-are-zero


def _flushes_here() -> bool:
    """Whether the calling thread flushes denormals now (a one-element product runs on this thread)."""
    return (torch.tensor([1e-40]) * 1.0).item() == 0.0


@contextlib.contextmanager
def flush_denormals(enabled: bool = True):
    """Flush-to-zero and denormals-are-zero on the calling thread and the intra-op threads for the
    block (the compiled extension's csrc/cpu_env.cpp; without it torch.set_flush_denormal, which
    reaches the calling thread only). Afterwards every thread gets the calling thread's previous mode;
    the thread count should not grow inside the block (threads created there are covered, parked
    ones the pool wakes later are not). Yields whether the mode is on. enabled=False or
    FASTFORMER_FLUSH_DENORMAL=0: nothing changes."""
    if not enabled or os.environ.get("FASTFORMER_FLUSH_DENORMAL", "1").strip() == "0":
        yield False
        return
    from .._extension import has_op

    threads = torch.get_num_threads()
    if has_op("set_denormal_mode_all"):
        previous = torch.ops.fastformer.set_denormal_mode_all(FTZ_DAZ, threads)
        on = previous >= 0

        def restore():
            if on:
                torch.ops.fastformer.set_denormal_mode_all(previous, max(threads, torch.get_num_threads()))

    else:
        before = _flushes_here()
        on = torch.set_flush_denormal(True)  # False where the CPU has no such mode

        def restore():
            if on:
                torch.set_flush_denormal(before)

    try:
        yield on
    finally:
        restore()


# ---------------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    weights: int  # parameters + gradients + optimizer state (bytes)
    activations: int  # kept for the backward pass of one micro-batch (bytes)
    available: int | None  # what the device has free now (bytes), None when unknown
    device: str

    @property
    def total(self) -> int:
        return self.weights + self.activations

    def describe(self) -> str:
        s = f"about {_size(self.total)}"
        if self.available is not None:
            s += f" of {_size(self.available)} available on {self.device}"
        return s


def _size(n: int) -> str:
    return f"{n / 2**20:.0f} MB" if n < GB else f"{n / GB:.1f} GB"


def available_memory(device: torch.device) -> int | None:
    """Free bytes on `device` now: CUDA's free memory, or on the CPU MemAvailable limited by the
    cgroup's memory limit."""
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # noqa: BLE001 - no estimate rather than no training
            return None
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = int(limit) - used
            avail = free if avail is None else min(avail, free)
    except (OSError, ValueError):
        pass
    return avail


def _attention_layers(cfg) -> list[tuple[int, str, str]]:
    """(heads, query side, key side) per attention layer; sides are "src" or "tgt"."""
    if hasattr(cfg, "hidden_size"):  # BERT-style encoder
        return [(cfg.num_heads, "src", "src")] * cfg.num_layers
    dec = cfg.num_decoder_layers or cfg.num_layers  # T5: encoder, decoder self + cross
    return [(cfg.num_heads, "src", "src")] * cfg.num_layers + [
        (cfg.num_heads, "tgt", "tgt"),
        (cfg.num_heads, "tgt", "src"),
    ] * dec


def _per_token_floats(cfg) -> tuple[int, int]:
    """fp32 values kept per source / target token across all layers (linear layers, norms, FFN)."""
    if hasattr(cfg, "hidden_size"):
        h, f = cfg.hidden_size, cfg.intermediate_size
        return cfg.num_layers * (10 * h + 2 * f), 0
    d, f, inner = cfg.d_model, cfg.d_ff, cfg.num_heads * cfg.d_kv
    enc = cfg.num_layers * (6 * d + 4 * inner + 3 * f)
    dec = (cfg.num_decoder_layers or cfg.num_layers) * (9 * d + 8 * inner + 3 * f)
    return enc, dec


def autocasts_bf16(device: torch.device | str, precision: str = "auto") -> bool:
    """Whether a training run on `device` with `precision` (TrainConfig.precision) runs its forward under
    bf16 autocast: "auto" on a CUDA GPU of compute capability >= 8.0 (where the fused kernels run),
    "bf16" everywhere, "fp32" nowhere. The Trainer and the memory estimate both follow this rule."""
    return fast_cuda(device) if precision == "auto" else precision == "bf16"


def precision_warning(device: torch.device | str, precision: str = "auto") -> str | None:
    """What a run on `device` with `precision` should be warned about, or None: bf16 asked for where
    the hardware would emulate it (a CPU without bf16 instructions, a GPU older than compute capability
    8.0), or "auto" falling back to fp32 and the reference ops on such a GPU."""
    device = torch.device(device)
    if precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        return (
            "--precision bf16 on a CPU without bf16 instructions (AVX512-BF16, AMX or Arm BF16): torch "
            "emulates bf16 matmuls there, which is slower than fp32; --precision fp32 (the default on CPU) "
            "is faster on this machine"
        )
    if device.type != "cuda" or fast_cuda(device) or precision == "fp32":
        return None
    capability = compute_capability(device.index if device.index is not None else torch.cuda.current_device())
    if precision == "bf16":
        # the GPU has no bf16 tensor cores: torch emulates them, and the fused kernels' tiles are built
        # for sm_80 / sm_90, so the ops run their fallbacks
        return (
            f"--precision bf16 on {device}, compute capability {capability}: bf16 needs 8.0 or newer, so "
            "its matmuls are emulated (slower than fp32) and the ops run torch's SDPA or their PyTorch "
            "reference instead of the fused kernels; --precision auto trains in fp32 there"
        )
    return (
        f"{device} has compute capability {capability}: training runs in fp32 "
        "(bf16 autocast needs 8.0 or newer), and the ops run torch's SDPA or their PyTorch reference "
        "instead of the fused kernels"
    )


def estimate_memory(
    model: torch.nn.Module,
    *,
    batch_size: int,
    seq_len: int,
    target_len: int = 0,
    head_rows: float = 0.0,
    optimizer: str = "fusedadamw",
    device: torch.device,
    fused_attention: bool | None = None,
    processes: int = 1,
    precision: str = "auto",
) -> MemoryEstimate:
    """Peak training memory of one process's step, and what `device` has free.

    batch_size, seq_len: the micro-batch (examples, tokens per example); target_len: decoder tokens
    per example (encoder-decoder models); head_rows: rows per micro-batch that go through the
    vocabulary projection (predicted tokens); fused_attention: the score matrix is never stored
    (default: on a CUDA GPU of compute capability >= 8.0); processes: processes on this machine
    sharing the device's memory (DDP on CPU); precision: the run's TrainConfig.precision (activations
    in 2 bytes where it autocasts to bf16, autocasts_bf16)."""
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    weights = n_params * (8 + OPTIMIZER_STATE.get(optimizer, 8))
    if fused_attention is None:
        fused_attention = fast_cuda(device)  # where the fused kernels run, whatever the precision
    act_bytes = 2 if autocasts_bf16(device, precision) else 4
    src, tgt = seq_len, target_len
    scores = (
        0
        if fused_attention
        else sum(h * (src if q == "src" else tgt) * (src if k == "src" else tgt) for h, q, k in _attention_layers(cfg))
    )
    enc_f, dec_f = _per_token_floats(cfg)
    vocab = cfg.vocab_size
    per_example = (enc_f * src + dec_f * tgt) * act_bytes + scores * (SCORE_BYTES if not fused_attention else 0)
    activations = batch_size * per_example + int(head_rows * vocab * 3 * 4)
    avail = available_memory(device)
    if avail is not None and processes > 1:
        avail //= processes
    return MemoryEstimate(int(weights), int(activations), avail, str(device))


def check_memory(est_fn, *, batch_size: int, len_flag: str, seq_len: int, grad_accum: int, warn) -> MemoryEstimate:
    """Refuse (ValueError) when est_fn(batch_size, seq_len) cannot fit in the available memory, with
    the estimate and a smaller --batch-size (same examples per step through --grad-accum) or a
    shorter sequence that fits; call `warn(message)` when it comes close."""
    est = est_fn(batch_size, seq_len)
    if est.available is None:
        return est
    budget = est.available
    if est.total <= WARN_FRACTION * budget:
        return est
    if est.total <= budget:
        warn(
            f"training needs {est.describe()}: close to the limit; a smaller --batch-size (with --grad-accum) "
            f"or {len_flag} leaves room"
        )
        return est
    fits = [
        b
        for b in (batch_size // d for d in (2, 4, 8, 16, 32, 64, 128, 256))
        if b >= 1 and est_fn(b, seq_len).total <= WARN_FRACTION * budget
    ]
    if fits:
        b = fits[0]
        accum = grad_accum * -(-batch_size // b)
        hint = f"try --batch-size {b} --grad-accum {accum} (the same examples per step)"
    else:
        lengths = [
            n
            for n in (seq_len // d for d in (2, 4, 8, 16, 32))
            if n >= 8 and est_fn(1, n).total <= WARN_FRACTION * budget
        ]
        hint = (
            f"even --batch-size 1 does not fit: try {len_flag} {lengths[0]} with --batch-size 1"
            if lengths
            else "it does not fit even at --batch-size 1: choose a smaller --model"
        )
    raise ValueError(
        f"--batch-size {batch_size} {len_flag} {seq_len} needs {est.describe()} "
        f"(weights + optimizer {_size(est.weights)}, activations {_size(est.activations)}): "
        f"it cannot fit; {hint}, or --no-memory-check to try anyway"
    )
