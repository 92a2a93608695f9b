"""Host side of the cross-entropy kernels: configurations, tuning candidates, launches.

    loss_rows, lse = ce_forward(logits, target, count=count, grad=grad)
    scale_rows_(grad, g)

The `@triton.jit` code is `cross_entropy.py` (the persistent kernel) and `cross_entropy_legacy.py`
(the first kernel, one program per row, kept as a tuning candidate); this module imports them, and
so triton, only when it launches. Every launch goes through `launch.launch`, so the kernel report
(`cross_entropy_registry.py`) captures the argument lists built here.

A configuration is a tuple (kind, BLOCK_V, size, num_stages, programs_per_sm):
- (1, 0, ept, stages, per_sm): the persistent kernel with the row kept on chip (ONE_BLOCK):
  BLOCK_V = next power of two >= V, num_warps = BLOCK_V / (32 * ept) (ept: elements per thread);
- (2, BLOCK_V, num_warps, stages, per_sm): the persistent kernel streaming rows in BLOCK_V blocks;
- (0, 0, 0, 0, 0): the first kernel with its own block size and warps (`legacy_config`).
Persistent launches start `per_sm` programs per SM. The tuner (`tuning.choose`, kernel name
"cross_entropy.fwd") picks among the default and `candidates()` per shape class on a GPU.
"""

from __future__ import annotations

import functools
import os

import torch

from . import tuning
from .launch import Launch, launch, on_tensor_device

TUNE_NAME = "cross_entropy.fwd"
LEGACY = (0, 0, 0, 0, 0)
# a row is kept on chip (read once, one exponential per element) up to this many bytes: 32768
# bf16 / fp16 classes, 16384 fp32 ones (fp32 32768 needs more than 64 registers a thread at 1024
# threads with Triton 3.9 and spills in its row loop)
ONE_BLOCK_MAX_BYTES = 65536
# the persistent kernel's candidates besides the default (which is always timed)
ONE_BLOCK_CANDIDATES = ((1, 0, 32, 2, 1), (1, 0, 16, 2, 1), (1, 0, 16, 2, 2), (1, 0, 32, 2, 2))
STREAM_CANDIDATES = (
    (2, 4096, 8, 3, 2),
    (2, 4096, 16, 3, 1),
    (2, 8192, 16, 3, 1),
    (2, 2048, 4, 4, 4),
    (2, 4096, 8, 4, 2),
)
SAFE = (2, 1024, 4, 1, 4)  # after an out-of-resources launch failure: the smallest footprint


def _interpreting(device: torch.device) -> bool:
    return device.type == "cpu" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


# ------------------------------------------------------------------------------------ configurations
def legacy_config(V: int, interpreting: bool, keep_row: bool = True) -> tuple[int, int, bool]:
    """(BLOCK_V, num_warps, ONE_BLOCK) of the first kernel; keep_row=False streams every row."""
    if interpreting:
        block = min(1024, _next_pow2(V))
        return block, 1, keep_row and block >= V
    if keep_row and 4096 < V <= 32768:
        block = _next_pow2(V)
        return block, (32 if block >= 16384 else 16), True
    block = min(4096, _next_pow2(V))
    return block, (16 if block >= 4096 else 8 if block >= 2048 else 4), keep_row and block >= V


def fits_one_block(V: int, itemsize: int, soft: bool, weighted: bool, unit_stride: bool = True) -> bool:
    """Whether the default keeps the row on chip: rows of at most ONE_BLOCK_MAX_BYTES with unit class
    stride and no second row of loads (a probability target or class weights would be kept too and
    spill; strided classes are loaded one by one, each with its own address, and spill)."""
    return unit_stride and not soft and not weighted and _next_pow2(V) * itemsize <= ONE_BLOCK_MAX_BYTES


def default_config(
    V: int,
    itemsize: int,
    soft: bool,
    weighted: bool,
    interpreting: bool,
    unit_stride: bool = True,
    smooth: bool = False,
) -> tuple:
    """The built-in configuration (what runs untuned, on CPU, and with FASTFORMER_TUNE=0). Streamed
    rows with more per-lane sums (smoothing, weights, a probability target) or strided classes take
    2048-wide blocks: 4096 needs over 128 registers a thread there (one block of 8 warps per SM)."""
    if interpreting:
        # the interpreter runs whole blocks as numpy arrays: rows up to 1024 classes in one block,
        # longer ones stream in 1024-wide blocks (tests cover both with small V)
        return (1, 0, 1024, 1, 1) if V <= 1024 else (2, 1024, 1, 2, 1)
    if fits_one_block(V, itemsize, soft, weighted, unit_stride):
        block = max(_next_pow2(V), 32)
        ept = 32 if itemsize <= 2 else 16  # 64 bytes of row a thread
        warps = max(1, min(32, block // (32 * ept)))
        return (1, 0, block // (32 * warps), 2, max(1, 16 // warps))
    if soft or weighted or smooth or not unit_stride:
        return (2, 2048, 8, 3, 2)
    return (2, 4096, 8, 3, 2)


def candidates(V: int, itemsize: int, soft: bool, weighted: bool, interpreting: bool, unit_stride: bool = True) -> list:
    """Tuning candidates besides the default: the legacy (one program per row) kernel always, the persistent kernel's
    one-block configurations where the row fits 32 warps with unit class stride, the streaming ones
    always. None on CPU."""
    if interpreting:
        return []
    out = [LEGACY]
    block = _next_pow2(V)
    if unit_stride:
        out += [c for c in ONE_BLOCK_CANDIDATES if 1 <= block // (32 * c[2]) <= 32 and block >= 32 * c[2]]
    out += [c for c in STREAM_CANDIDATES if c[1] < block]
    return out


def resolve(cfg: tuple, V: int, interpreting: bool) -> dict:
    """The launch parameters of a configuration for rows of V classes: kernel kind, BLOCK_V,
    num_warps, NUM_STAGES, ONE_BLOCK, programs per SM."""
    kind = cfg[0]
    if kind == 0:
        block, warps, one = legacy_config(V, interpreting)
        return dict(kind=0, block=block, warps=warps, stages=1, one=one, per_sm=0)
    if kind == 1:
        block = max(_next_pow2(V), 1)
        if interpreting:
            return dict(kind=1, block=block, warps=1, stages=cfg[3], one=True, per_sm=cfg[4])
        warps = max(1, min(32, block // (32 * cfg[2])))
        return dict(kind=1, block=block, warps=warps, stages=cfg[3], one=True, per_sm=cfg[4])
    block = cfg[1]
    return dict(kind=2, block=block, warps=cfg[2], stages=cfg[3], one=block >= V, per_sm=cfg[4])


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def programs(rows: int, per_sm: int, device: torch.device) -> int:
    """Persistent grid size: per_sm programs per SM (132 SMs assumed for "meta" tensors, the report's
    H100/H200); in the interpreter 3, so that tests walk the row loop with a stride."""
    if device.type == "cuda":
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    elif device.type == "meta":
        sms = 132
    else:
        return max(1, min(rows, 3))
    return max(1, min(rows, sms * max(1, per_sm)))


def shape_class(
    V: int, rows: int, dtype: torch.dtype, soft: bool, weighted: bool, smooth: bool, grad: bool, strided: bool = False
) -> str:
    """What a tuning choice is cached for: dtype, power-of-two buckets of V and of the rows, features."""
    feats = (
        "".join(f for f, on in (("s", soft), ("w", weighted), ("l", smooth), ("g", grad), ("k", strided)) if on) or "-"
    )
    return f"{str(dtype).replace('torch.', '')}|V{tuning.bucket(V)}|R{tuning.bucket(rows, 256, 65536)}|{feats}"


# --------------------------------------------------------------------------------------------- launch
def _rows_layout(t: torch.Tensor):
    """(N, V) or (N, V, D) -> (D, stride over n, stride over d, stride over classes)."""
    if t.dim() == 2:
        return 1, t.stride(0), 0, t.stride(1)
    return t.shape[2], t.stride(0), t.stride(2), t.stride(1)


def _make(cfg: tuple, a: dict) -> Launch:
    """The Launch of configuration cfg over the prepared arguments a (see ce_forward)."""
    interp = _interpreting(a["logits"].device)
    p = resolve(cfg, a["V"], interp)
    flags = dict(
        HAS_WEIGHT=a["weight"] is not None,
        HAS_GSCALE=a["gscale"] is not None,
        COMPUTE_GRAD=a["grad"] is not None,
        SMOOTH=a["eps"] > 0.0,
        MEAN=a["count"] is not None,
        SOFT=a["soft"],
        BLOCK_V=p["block"],
        ONE_BLOCK=p["one"],
    )
    dummy = a["loss"]  # any valid pointer for the arguments a specialisation never reads
    grad = a["grad"] if a["grad"] is not None else a["logits"]
    head = (
        a["logits"],
        *a["l_strides"],
        grad,
        *a["g_strides"],
        a["target"],
        *a["t_strides"],
        a["weight"] if a["weight"] is not None else dummy,
        a["wsum"] if a["wsum"] is not None else dummy,
        a["count"] if a["count"] is not None else dummy,
        a["wden"] if a["wden"] is not None else dummy,
        a["gscale"] if a["gscale"] is not None else dummy,
        a["gs_stride"],
        a["loss"],
        a["lse"],
    )
    tail = (a["V"], a["D"], a["ignore_index"], a["eps"], a["z"])
    rows = a["rows"]
    if p["kind"] == 0:
        from .cross_entropy_legacy import _ce_fwd_kernel

        return Launch(
            _ce_fwd_kernel, (rows,), head + tail, dict(flags, num_warps=p["warps"]), name=TUNE_NAME, config=tuple(cfg)
        )
    from .cross_entropy import _ce_rows_kernel

    grid = (programs(rows, p["per_sm"], a["logits"].device),)
    return Launch(
        _ce_rows_kernel,
        grid,
        head + (rows,) + tail,
        dict(flags, NUM_STAGES=p["stages"], num_warps=p["warps"]),
        name=TUNE_NAME,
        config=tuple(cfg),
    )


def _scratch(a: dict, max_rows: int) -> dict:
    """The arguments over the first rows only, with fresh outputs: what the tuner may launch again
    and again (the real gradient buffer may alias the logits, so it is never written while timing)."""
    rows = min(a["rows"], max_rows)
    b = dict(a, rows=rows, loss=torch.empty(rows, dtype=torch.float32, device=a["loss"].device))
    b["lse"] = torch.empty_like(b["loss"])
    if a["grad"] is not None:
        b["grad"] = torch.empty_like(a["logits"][: -(-rows // a["D"])])
        b["g_strides"] = tuple(_rows_layout(b["grad"])[1:])
    return b


def _out_of_resources() -> type:
    from triton.runtime.errors import OutOfResources

    return OutOfResources


@on_tensor_device
def ce_forward(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    weight_den: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    grad: torch.Tensor | None = None,
    gscale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the cross-entropy kernel over rows = (batch entry, position).

    logits: (N, V) or (N, V, D) (class dim second: D positions per batch entry, e.g. d1*...*dK of a
    K-dimensional loss), any strides. target: class indices, contiguous (N,) / (N, D) of any integer
    dtype; or a floating-point probability target shaped like logits (any strides): soft targets.
    count: 0-d number of non-ignored rows for reduction "mean" (soft: of rows; None: rows unscaled,
    as for "sum"/"none"). weight: (V,) fp32 class weights or None; weight_den: 0-d fp32 sum of
    weight[t] over non-ignored rows (needed for "mean" with weights and class indices).
    grad: buffer shaped like logits (any strides; may be `logits` itself) to receive d loss / d logits,
    or None for the loss only. gscale: (N*D,) or one-element factor folded into grad.
    Returns (loss_rows, lse): fp32 (N*D,) each, row n*D + d; loss_rows already carries the "mean"
    scaling. A class index outside [0, V) other than ignore_index gives its row NaN loss and gradient.
    """
    N, V = logits.shape[0], logits.shape[1]
    D, s_ln, s_ld, s_lc = _rows_layout(logits)
    rows = N * D
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows == 0:
        return loss, lse
    soft = target.is_floating_point()
    if soft:
        assert target.shape == logits.shape, "a probability target is shaped like the logits"
        t_strides = _rows_layout(target)[1:]
    else:
        assert target.numel() == rows and target.is_contiguous(), "class indices: one per row, contiguous"
        t_strides = (0, 0, 0)
    if grad is not None:
        assert grad.shape == logits.shape
        g_strides = _rows_layout(grad)[1:]
    else:
        g_strides = (0, 0, 0)
    if count is not None and weight is not None and not soft:
        assert weight_den is not None, "reduction mean with class weights needs weight_den"
    a = dict(
        logits=logits,
        l_strides=(s_ln, s_ld, s_lc),
        grad=grad,
        g_strides=g_strides,
        target=target,
        t_strides=t_strides,
        weight=weight,
        wsum=weight.sum(dtype=torch.float32) if weight is not None else None,
        count=count,
        wden=weight_den if (count is not None and weight is not None and not soft) else None,
        gscale=gscale,
        gs_stride=(gscale.stride(0) if gscale.numel() > 1 else 0) if gscale is not None else 0,
        loss=loss,
        lse=lse,
        rows=rows,
        V=V,
        D=D,
        ignore_index=int(ignore_index),
        eps=float(label_smoothing),
        z=float(z_loss),
        soft=soft,
    )
    interp = _interpreting(logits.device)
    weighted = weight is not None
    unit = s_lc == 1
    default = default_config(V, logits.element_size(), soft, weighted, interp, unit, a["eps"] > 0.0)
    cands = candidates(V, logits.element_size(), soft, weighted, interp, unit)
    sc = shape_class(V, rows, logits.dtype, soft, weighted, a["eps"] > 0.0, grad is not None, not unit)
    scratch = []

    def run(c):  # the tuner's timed launch: the first rows, into scratch outputs made once
        if not scratch:
            scratch.append(_scratch(a, 4096))
        launch(_make(c, scratch[0]))

    cfg = tuning.choose(TUNE_NAME, sc, default, cands, run, logits.device)
    try:
        launch(_make(cfg, a))
    except _out_of_resources():
        launch(_make(SAFE, a))
    return loss, lse


@on_tensor_device
def scale_rows_(grad: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """grad: (N, V) or (N, V, D), any strides, scaled in place by g: (N*D,) per row (row n*D + d) or a
    one-element tensor. Rows whose factor is exactly 1 are not touched (a scalar 1: no gradient
    bytes move)."""
    N, V = grad.shape[0], grad.shape[1]
    D, s_gn, s_gd, s_gc = _rows_layout(grad)
    rows = N * D
    if rows == 0:
        return grad
    from .cross_entropy import _scale_rows_kernel

    interp = _interpreting(grad.device)
    block = min(1024 if interp else 4096, _next_pow2(V))
    warps = 1 if interp else (8 if block >= 4096 else 4)
    g = g.reshape(-1)
    scalar = g.numel() == 1
    launch(
        Launch(
            _scale_rows_kernel,
            (programs(rows, 4, grad.device),),
            (grad, s_gn, s_gd, s_gc, g, 0 if scalar else g.stride(0), rows, V, D),
            dict(BLOCK_V=block, SCALAR=scalar, NUM_STAGES=1 if interp else 3, num_warps=warps),
            name="cross_entropy.scale",
        )
    )
    return grad
