"""ff.cross_entropy against torch (float64) and the reference, on both backends; kernels interpreted on CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

import fastformer as ff
from fastformer.reference import cross_entropy as ref

RED = ["mean", "sum", "none"]


def _expected(x, t, weight=None, ignore_index=-100, reduction="mean", eps=0.0, z=0.0):
    """Independent oracle: torch's own cross_entropy in float64, plus the z-loss term written out."""
    x64 = x.to(torch.float64)
    w64 = weight.to(torch.float64) if weight is not None else None
    out = F.cross_entropy(x64, t.long(), w64, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    if z:
        valid = (t != ignore_index).to(torch.float64)
        zrow = z * torch.logsumexp(x64, -1).pow(2) * valid
        out = out + {"none": zrow, "sum": zrow.sum(), "mean": zrow.sum() / valid.sum().clamp_min(1)}[reduction]
    return out


def _loss_and_grad(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x)
    (gx,) = torch.autograd.grad(loss, x, g.to(loss.dtype))
    return loss, gx


def _check(x, t, dtype, backend=None, factor=1.0, **kw):
    """Compare loss and d loss / d x (with a random upstream gradient) against the float64 oracle."""
    red = kw.get("reduction", "mean")
    g = torch.randn(x.shape[0], dtype=torch.float64) if red == "none" else torch.tensor(1.7, dtype=torch.float64)
    loss, gx = _loss_and_grad(
        lambda a: ff.cross_entropy(
            a, t, kw.get("weight"), kw.get("ignore_index", -100), red, kw.get("eps", 0.0), z_loss=kw.get("z", 0.0)
        ),
        x.to(dtype),
        g,
    )
    x64 = x.detach().to(torch.float64)
    eloss, egx = _loss_and_grad(lambda a: _expected(a, t, **kw), x64, g)
    assert loss.dtype == dtype and gx.dtype == dtype
    assert_close(loss, eloss, dtype, "loss", factor)
    assert_close(gx, egx, dtype, "grad input", factor)


@pytest.mark.parametrize("N,V", [(1, 10), (77, 1000), (130, 10), (3, 32003)])
@pytest.mark.parametrize("reduction", RED)
def test_shapes_vs_torch(backend, N, V, reduction):
    x = torch.randn(N, V) * 3
    t = torch.randint(0, V, (N,))
    _check(x, t, torch.float32, reduction=reduction)


@pytest.mark.parametrize("use_weight", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("z", [0.0, 1e-3])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("V", [1000, 2500])  # one block kept in registers / streamed twice (interpreter blocks: 1024)
def test_features_and_combinations(backend, use_weight, eps, z, reduction, V):
    N = 77
    x = torch.randn(N, V) * 2
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    weight = torch.rand(V) + 0.1 if use_weight else None
    _check(x, t, torch.float32, weight=weight, eps=eps, z=z, reduction=reduction)


def test_custom_ignore_index_and_int32_targets(backend):
    N, V = 130, 10
    x = torch.randn(N, V)
    t = torch.randint(0, V, (N,), dtype=torch.int32)
    t[::3] = 3  # a real class used as ignore_index, like torch allows
    _check(x, t, torch.float32, ignore_index=3, eps=0.2, reduction="mean")


def test_reference_matches_torch_in_float64():
    N, V = 77, 1000
    x = torch.randn(N, V, dtype=torch.float64)
    t = torch.randint(0, V, (N,))
    t[::4] = -100
    w = torch.rand(V, dtype=torch.float64)
    for red in RED:
        out = ref.cross_entropy(x, t, w, reduction=red, label_smoothing=0.3)
        assert_close(out, F.cross_entropy(x, t, w, reduction=red, label_smoothing=0.3), torch.float64, red)


def test_large_logits(backend):
    N, V = 77, 1000
    x = torch.randn(N, V) * 1e4
    t = torch.randint(0, V, (N,))
    _check(x, t, torch.float32, eps=0.1, z=1e-4, reduction="mean")
    _check(x, t, torch.float32, reduction="none")


@pytest.mark.parametrize("V", [129, 32003])  # a row kept on chip; a streamed one
def test_logits_at_a_huge_common_offset(backend, V):
    """torch's log_softmax works relative to the row max, so rows at a large common offset keep their
    loss: 1e30 everywhere gives log V (the kernels gave 0: max + log Σ rounds to the max), finfo.min
    everywhere too (x·log2 e overflowed to -inf: NaN), offsets of ±1e4..1e5 keep the noise on top,
    and a logit past FLT_MAX / log2 e stays finite (NaN)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, V, generator=g)
    x[0] = 1e30
    # finfo.min: a streamed row's probabilities hold down to -2.35e38 (docs/cross-entropy.md)
    x[1] = torch.finfo(torch.float32).min if V <= 16384 else -2e38
    x[2] += 1e4
    x[3] = 1.0
    x[3, 5] = 3e38
    x[4] -= 1e5
    t = torch.tensor([3, 0, 7, 5, 1, 2])
    # a streamed row takes x·log2 e - m·log2 e in its exponent (one scalar in the block loop): at
    # |m| = 1e5 that rounds the gradient to 1.3e-5 against float64
    factor = 1.0 if V <= 16384 else 2.0
    for red in ("none", "mean"):
        _check(x, t, torch.float32, reduction=red, factor=factor)
    if V <= 16384:  # label smoothing relative to the max too (a streamed row sums the logits as they are)
        rows = [0, 1, 2, 4, 5]
        _check(x[rows], t[rows], torch.float32, reduction="none", eps=0.1)


def test_fp16_input(backend):
    N, V = 77, 1000
    x = torch.randn(N, V) * 4
    t = torch.randint(0, V, (N,))
    t[::7] = -100
    _check(x.half().float(), t, torch.float16, eps=0.1, z=1e-3, reduction="mean")
    _check(x.half().float(), t, torch.float16, reduction="none")


@pytest.mark.parametrize("reduction", RED)
def test_all_ignored(backend, reduction):
    x = torch.randn(5, 10, requires_grad=True)
    t = torch.full((5,), -100)
    loss = ff.cross_entropy(x, t, reduction=reduction, z_loss=1e-2, label_smoothing=0.1)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))  # torch gives NaN for "mean": documented
    (gx,) = torch.autograd.grad(loss.sum(), x)
    assert torch.equal(gx, torch.zeros_like(gx))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mean_with_a_zero_weight_sum_is_zero(backend, eps):
    """Class weights of the targets that sum to 0: "mean" gives 0.0 and zero gradients (torch: NaN), with
    label smoothing too, whose term of a zero-weight target is not 0 (it gave the "sum" value)."""
    x = torch.randn(4, 10, requires_grad=True)
    t = torch.tensor([1, 3, -100, 1])
    w = torch.rand(10) + 0.5
    w[1] = w[3] = 0.0
    loss = ff.cross_entropy(x, t, w, reduction="mean", label_smoothing=eps)
    assert torch.equal(loss.detach(), torch.zeros_like(loss))
    (gx,) = torch.autograd.grad(loss, x)
    assert torch.equal(gx, torch.zeros_like(gx))


def test_non_contiguous_input_and_no_grad(backend):
    V, N = 1000, 77
    xt = torch.randn(V, N)
    x = xt.t()  # (N, V) with stride (1, N)
    t = torch.randint(0, V, (N,))
    _check(x, t, torch.float32, reduction="mean")
    with torch.no_grad():
        out = ff.cross_entropy(x, t, reduction="none")
    assert_close(out, _expected(x, t, reduction="none"), torch.float32, "no-grad loss")


def test_kernel_writes_every_element(triton_backend):
    """Launch the kernel directly on NaN-poisoned loss/grad buffers: every element, ignored rows included,
    must be written (ignored rows with zeros)."""
    from conftest import poison_

    from fastformer.kernels import cross_entropy_launch as K

    N, V = 130, 1000
    x = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    t[::2] = -100
    count = (t != -100).sum()
    grad = poison_(torch.empty_like(x))
    loss, lse = K.ce_forward(x, t, count=count, grad=grad, label_smoothing=0.1, z_loss=1e-3)
    assert torch.isfinite(grad).all() and torch.isfinite(loss).all() and torch.isfinite(lse).all()
    assert torch.equal(grad[::2], torch.zeros_like(grad[::2]))
    assert_close(lse[1::2], torch.logsumexp(x[1::2].double(), -1), torch.float32, "lse")
    expected = _expected(x, t, reduction="mean", eps=0.1, z=1e-3)
    assert_close(loss.sum(), expected, torch.float32, "loss")
    # in place: the gradient may overwrite the logits it is computed from
    y = x.clone()
    K.ce_forward(y, t, count=count, grad=y, label_smoothing=0.1, z_loss=1e-3)
    assert_close(y, grad, torch.float32, "in-place gradient")


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, t: ff.cross_entropy(x[0], t), "input"),
        (lambda x, t: ff.cross_entropy(x, t[:, None]), "target"),
        (lambda x, t: ff.cross_entropy(x, t[:-1]), "target"),
        (lambda x, t: ff.cross_entropy(x, t.float()), "target"),
        (lambda x, t: ff.cross_entropy(x.long(), t), "input"),
        (lambda x, t: ff.cross_entropy(x, t.to("meta")), "target"),
        (lambda x, t: ff.cross_entropy(x, t, torch.ones(9)), "weight"),
        (lambda x, t: ff.cross_entropy(x, t, torch.ones(10, device="meta")), "weight"),
        (lambda x, t: ff.cross_entropy(x, t, reduction="avg"), "reduction"),
        (lambda x, t: ff.cross_entropy(x, t, label_smoothing=1.5), "label_smoothing"),
        (lambda x, t: ff.cross_entropy(x, t, z_loss=-1.0), "z_loss"),
        (lambda x, t: ff.cross_entropy(x, t, ignore_index=1.5), "ignore_index"),
        (lambda x, t: ff.cross_entropy([[1.0]], t), "input"),
    ],
)
def test_bad_input(backend, call, match):
    x = torch.randn(4, 10)
    t = torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=match):
        call(x, t)


def _candidate_configs():
    from fastformer.kernels import cross_entropy_launch as CL

    return list(
        dict.fromkeys(
            [
                CL.LEGACY,
                *CL.ONE_BLOCK_CANDIDATES,
                *CL.STREAM_CANDIDATES,
                CL.SAFE,
                CL.default_config(9000, 2, False, False, False),
            ]
        )
    )


@pytest.mark.parametrize("cfg", _candidate_configs(), ids=lambda c: ",".join(map(str, c)))
def test_every_tuning_candidate(triton_backend, cfg):
    """Each configuration the tuner may choose on a GPU (today's kernel among them), forced and run in
    the interpreter with its own block size: class indices with weights, smoothing, z-loss and ignored
    rows; probability targets with a per-row gradient factor; strided K-dimensional rows; an
    out-of-range class index; linear cross-entropy. V = 9000 streams every block size declared."""
    from fastformer.kernels import cross_entropy_launch as CL
    from fastformer.kernels import tuning

    N, V = 7, 9000
    x = torch.randn(N, V) * 3
    t = torch.randint(0, V, (N,))
    t[2] = -100
    w = torch.rand(V) + 0.5
    p = torch.softmax(torch.randn(N, V), 1)
    with tuning.force_config(CL.TUNE_NAME, cfg):
        _check(x, t, torch.float32, weight=w, eps=0.1, z=1e-3, reduction="mean")
        xa = x.clone().requires_grad_(True)
        g = torch.randn(N)
        loss = ff.cross_entropy(xa, p, w, reduction="none", label_smoothing=0.2)
        (gx,) = torch.autograd.grad(loss, xa, g)
        x64 = x.double().requires_grad_(True)
        want = F.cross_entropy(x64, p.double(), w.double(), reduction="none", label_smoothing=0.2)
        (gw,) = torch.autograd.grad(want, x64, g.double())
        assert_close(loss, want, torch.float32, "soft loss")
        assert_close(gx, gw, torch.float32, "soft grad")
        # rows at one huge value: loss log V, as torch (a log-sum-exp of 1e30 rounds log V away); a
        # streamed row's probabilities hold down to -2.35e38 (docs/cross-entropy.md)
        xc = torch.full((2, V), 1e30)
        xc[1] = -2e38
        xc.requires_grad_(True)
        lc = ff.cross_entropy(xc, torch.tensor([3, 4]), reduction="none")
        assert torch.allclose(lc.detach(), torch.full((2,), math.log(V)), rtol=1e-5), lc
        (gc,) = torch.autograd.grad(lc.sum(), xc)
        assert torch.allclose(gc[:, :3], torch.full((2, 3), 1.0 / V), rtol=1e-4), gc[:, :3]
        xk = torch.randn(2, V, 3)  # class dim strided (stride 3)
        tk = torch.randint(0, V, (2, 3))
        assert_close(
            ff.cross_entropy(xk, tk, reduction="none"),
            F.cross_entropy(xk.double(), tk, reduction="none"),
            torch.float32,
            "K-dim loss",
        )
        grad = torch.empty_like(x)
        rows, _ = CL.ce_forward(x, torch.tensor([1, V, 3, -5, 0, 2, 8]), grad=grad)
        assert torch.isnan(rows[[1, 3]]).all() and torch.isnan(grad[[1, 3]]).all()
        assert torch.isfinite(rows[[0, 2, 4, 5, 6]]).all() and torch.isfinite(grad[[0, 2, 4, 5, 6]]).all()
        h, Wp = torch.randn(N, 8), torch.randn(V, 8) / 3
        hl, Wl = h.clone().requires_grad_(True), Wp.clone().requires_grad_(True)
        out = ff.linear_cross_entropy(hl, Wl, t, label_smoothing=0.1)
        h64, W64 = h.double().requires_grad_(True), Wp.double().requires_grad_(True)
        ref_out = F.cross_entropy(h64 @ W64.t(), t, label_smoothing=0.1)
        assert_close(out, ref_out, torch.float32, "linear loss")
        for a, e, name in zip(torch.autograd.grad(out, (hl, Wl)), torch.autograd.grad(ref_out, (h64, W64)), "xW"):
            assert_close(a, e, torch.float32, f"linear grad {name}")


def test_scale_rows_skips_a_factor_of_one(triton_backend):
    """backward's scaling: rows whose factor is exactly 1 keep their bits, the others are scaled."""
    from conftest import poison_

    from fastformer.kernels import cross_entropy_launch as CL

    x = torch.randn(5, 3000)
    y = x.clone()
    CL.scale_rows_(y, torch.ones(1))
    assert torch.equal(y, x)
    CL.scale_rows_(y, torch.tensor([1.0, 2.0, 1.0, -0.5, 0.0]))
    assert torch.equal(y[[0, 2]], x[[0, 2]])
    assert torch.equal(y[1], x[1] * 2) and torch.equal(y[3], x[3] * -0.5) and torch.equal(y[4], x[4] * 0)
    z = poison_(torch.empty(2, 10))
    CL.scale_rows_(z, torch.ones(1))  # a factor of 1 never reads or writes the rows
    assert torch.isnan(z).all()


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("V", [50257, 32000, 5000])  # streamed rows / a row kept on chip (32 and 8 warps)
def test_cuda_bf16(reduction, V):
    N = 333
    x = (torch.randn(N, V, device="cuda") * 3).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::9] = -100
    g = torch.randn(N, device="cuda") if reduction == "none" else torch.tensor(1.0, device="cuda")
    kw = dict(reduction=reduction, label_smoothing=0.1, z_loss=1e-4)
    xa = x.clone().requires_grad_(True)
    loss = ff.cross_entropy(xa, t, **kw)
    (gx,) = torch.autograd.grad(loss, xa, g.to(loss.dtype))
    xr = x.float().requires_grad_(True)
    eloss = ref.cross_entropy(xr, t, **kw)
    (egx,) = torch.autograd.grad(eloss, xr, g)
    assert loss.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    assert_close(loss, eloss, torch.bfloat16, "loss")
    assert_close(gx, egx, torch.bfloat16, "grad input")


@pytest.mark.cuda
@pytest.mark.parametrize("cfg", _candidate_configs(), ids=lambda c: ",".join(map(str, c)))
def test_cuda_every_tuning_candidate(cfg):
    """Each configuration the tuner may pick, forced, on the GPU (a row kept on chip for one-block
    configurations, streamed otherwise), against the fp32 reference."""
    from fastformer.kernels import cross_entropy_launch as CL
    from fastformer.kernels import tuning

    N, V = 301, (32000 if cfg[0] == 1 else 50000)
    x = (torch.randn(N, V, device="cuda") * 3).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::7] = -100
    kw = dict(label_smoothing=0.1, z_loss=1e-4)
    with tuning.force_config(CL.TUNE_NAME, cfg):
        xa = x.clone().requires_grad_(True)
        loss = ff.cross_entropy(xa, t, **kw)
        (gx,) = torch.autograd.grad(loss, xa)
    xr = x.float().requires_grad_(True)
    eloss = ref.cross_entropy(xr, t, **kw)
    (egx,) = torch.autograd.grad(eloss, xr)
    assert_close(loss, eloss, torch.bfloat16, "loss")
    assert_close(gx, egx, torch.bfloat16, "grad input")


@pytest.mark.cuda
def test_cuda_beyond_int32_offsets():
    """N * V > 2^31 elements: rows past the 2^31 boundary must read and write the right memory."""
    N, V = 8200, 262144
    assert N * V > 2**31
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, V, (N,), device="cuda")
    x.requires_grad_(True)
    loss = ff.cross_entropy(x, t, reduction="none")
    rows = torch.tensor([0, 4100, 8190, N - 1], device="cuda")  # 8190 * V > 2^31
    xs = x.detach()[rows].float().requires_grad_(True)
    eloss = F.cross_entropy(xs, t[rows], reduction="none")
    assert_close(loss[rows], eloss, torch.bfloat16, "loss of far rows")
    g = torch.zeros(N, device="cuda", dtype=torch.bfloat16)
    g[rows] = 1
    (gx,) = torch.autograd.grad(loss, x, g)
    (egx,) = torch.autograd.grad(eloss.sum(), xs)
    assert_close(gx[rows], egx, torch.bfloat16, "grad of far rows")
    assert float(gx[1].abs().max()) == 0.0


def test_integer_like_ignore_index_and_numpy_scalars(backend):
    # torch accepts any integer-like ignore_index (numpy ints from configs, 0-d integer tensors)
    import numpy as np

    x = torch.randn(6, 9, dtype=torch.float64)
    t = torch.tensor([1, 2, 0, 8, 2, 5])
    want = F.cross_entropy(x, t, ignore_index=2)
    for ii in (np.int64(2), np.int32(2), torch.tensor(2)):
        assert torch.allclose(ff.cross_entropy(x, t, ignore_index=ii), want)
        assert torch.allclose(ff.linear_cross_entropy(x, torch.eye(9, dtype=torch.float64), t, ignore_index=ii), want)
    with pytest.raises(ValueError, match="ignore_index"):
        ff.cross_entropy(x, t, ignore_index=2.0)
    # numpy float scalars for label_smoothing / z_loss, as torch accepts
    got = ff.cross_entropy(x, t, label_smoothing=np.float32(0.25), z_loss=np.float32(0.0))
    assert torch.allclose(got, F.cross_entropy(x, t, label_smoothing=0.25))


def test_weight_requiring_grad_is_refused_like_torch(backend):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    w = torch.rand(5, requires_grad=True)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, t, w).backward()
    with pytest.raises(RuntimeError):
        ff.cross_entropy(x, t, w).backward()


def test_tuning_runs_never_touch_the_call_buffers(triton_backend, monkeypatch):
    """What the tuner times: each candidate on the first rows into scratch outputs. With the gradient
    written over the logits in place (linear cross-entropy's chunks), timing runs must leave both alone."""
    from fastformer.kernels import cross_entropy_launch as CL
    from fastformer.kernels import tuning

    timed = []

    def fake_choose(kernel, shape_class, default, cands, run, device, **kw):
        for cfg in (CL.LEGACY, CL.SAFE, default):
            run(cfg)
            timed.append(cfg)
        return default

    monkeypatch.setattr(tuning, "choose", fake_choose)
    N, V = 9, 2500
    x = torch.randn(N, V)
    t = torch.randint(0, V, (N,))
    y = x.clone()
    rows, _ = CL.ce_forward(y, t, count=torch.tensor(N), grad=y)  # in place
    assert len(timed) == 3
    grad = torch.empty_like(x)
    want, _ = CL.ce_forward(x, t, count=torch.tensor(N), grad=grad)
    assert torch.equal(rows, want) and torch.equal(y, grad)
