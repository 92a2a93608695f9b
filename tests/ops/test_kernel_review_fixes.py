"""Regressions of a static review of the Triton kernels for what only large tensors expose.

The interpreter computes int32 offsets with numpy int32, so an offset that wraps on a GPU wraps here
too. The tensors below are views into one large *uninitialised* CPU allocation: only the pages the
test writes are ever touched (the interpreter does not copy CPU storages), so the 8 GiB of address
space costs a few pages of memory. The views start 2^30 elements in, so a wrapped offset still lands
inside the allocation (on zeros) rather than crashing the process.
"""

from __future__ import annotations

import os

import pytest
import torch
import triton
import triton.language as tl

from fastformer.kernels import attention as K

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), reason="runs the kernels in Triton's interpreter"
)

OFF = 1 << 30  # elements before the view: where an offset that wrapped by -2^32 lands
STRIDE = 3 << 29  # 2 x STRIDE = 3 x 2^30 >= 2^31 wraps in int32 to -2^30


def _huge_view(shape, strides):
    """A float16 view of `shape` / `strides` at element OFF of an allocation large enough for it."""
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + 1
    big = torch.empty(OFF + span, dtype=torch.float16)  # never touched, never zeroed
    view = big.as_strided(shape, strides, OFF)
    view.copy_(torch.randn(shape, dtype=torch.float16))
    return view


def _backward(do, spec, q, k, v):
    from fastformer.kernels import attention_launch as A

    out, lse = A.attention_forward(q, k, v, spec)
    return A.attention_backward(do, q, k, v, out, lse, spec)[:3]


def _inputs(H, L, D):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, H, L, D, generator=g, dtype=torch.float16) for _ in range(3)]


def test_delta_pass_head_offset_beyond_int32():
    """dO whose head stride x head index passes 2^31 (a slice of a larger gradient): the Delta pass
    offset heads in int32 and read head 2's dO from 2^32 elements too low."""
    from fastformer.kernels.attention_launch import AttnSpec

    H, L, D = 3, 8, 16
    q, k, v = _inputs(H, L, D)
    do = _huge_view((1, H, L, D), (0, STRIDE, D, 1))
    spec = AttnSpec(scale=D**-0.5)
    got = _backward(do, spec, q, k, v)
    want = _backward(do.contiguous(), spec, q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name


def test_backward_dout_rows_beyond_int32():
    """dO whose row stride x row index passes 2^31: the backward copies it to contiguous rows instead of
    reading rows past 2^31 elements at wrapped offsets (the op layer checks q/k/v, not dO)."""
    from fastformer.kernels.attention_launch import AttnSpec

    H, L, D = 1, 3, 16
    q, k, v = _inputs(H, L, D)
    do = _huge_view((1, H, L, D), (0, 0, STRIDE, 1))
    spec = AttnSpec(scale=D**-0.5, causal=True)
    got = _backward(do, spec, q, k, v)
    want = _backward(do.contiguous(), spec, q, k, v)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert torch.equal(a, b), name


def test_legacy_ce_kernel_row_starting_with_masked_logits():
    """The legacy cross-entropy kernel (a tuning candidate on GPUs) streams rows longer than its block
    with an online softmax: a first block whose logits are all -inf (a masked range of the vocabulary)
    gave max -inf and exp(-inf - -inf) = NaN for the whole row."""
    import torch.nn.functional as F

    from fastformer.kernels import cross_entropy_launch as CL
    from fastformer.kernels import tuning

    V = 2500  # the interpreter's legacy block is 1024 columns: three blocks, the first all -inf
    x = torch.randn(3, V)
    x[:, :1100] = float("-inf")
    t = torch.tensor([1500, 2400, 1200])
    xr = x.clone().requires_grad_(True)
    want = F.cross_entropy(xr, t, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), xr)
    with tuning.force_config(CL.TUNE_NAME, CL.LEGACY):
        grad = torch.empty_like(x)
        loss, _ = CL.ce_forward(x, t, grad=grad)
    torch.testing.assert_close(loss, want.detach())
    torch.testing.assert_close(grad, want_grad)


@triton.jit
def _keep_block_kernel(OUT, row0, col0, seed, p, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Rows [row0, row0 + ROWS) x keys [col0, col0 + COLS) of the keep-mask of head program_id(0)."""
    om = row0 + tl.arange(0, ROWS)[:, None]
    on = col0 + tl.arange(0, COLS)[None, :]
    keep = K._keep_tile(seed, tl.program_id(0), om, on, p)
    tl.store(OUT + tl.arange(0, ROWS)[:, None] * COLS + tl.arange(0, COLS)[None, :], keep.to(tl.int8))


def _keep_block(row0: int, col0: int, rows: int = 16, cols: int = 16) -> torch.Tensor:
    """The dropout keep-mask (rows, cols) at query row row0, key col0 of head 0, seed 7, p 0.5."""
    out = torch.empty(rows, cols, dtype=torch.int8)
    _keep_block_kernel[(1,)](out, row0, col0, 7, 0.5, ROWS=rows, COLS=cols)
    return out.bool()


def test_dropout_counter_does_not_wrap_at_2_pow_32():
    """The Philox counter was row·Lk + col in 32 bits: it wraps at 2^32 elements per head, so with
    Lq = Lk = 65,536 query row 65,536 dropped exactly the keys row 0 drops. The counter is now the
    pair (col, row): distinct for every element of any length."""
    L = 1 << 16
    first = _keep_block(0, 0)
    assert 0.3 < first.float().mean() < 0.7
    for row0, col0 in ((L, 0), (0, L), (L, L), (1 << 31, 0)):
        assert not torch.equal(_keep_block(row0, col0), first), (row0, col0)  # equal by chance: 2^-256


def test_dropout_mask_of_a_square_tile_is_not_symmetric():
    """(col, row) and (row, col) are different counters: the mask is no transpose of itself."""
    block = _keep_block(0, 0, 32, 32)
    assert not torch.equal(block, block.T)
