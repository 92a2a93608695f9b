"""ff.linear_cross_entropy == cross_entropy(F.linear(x, W, b)) for loss and the gradients of x, W, b.

Three implementations: "reference" (full logits, eager), "auto" on CPU (chunked, torch math), "triton"
(chunked, CE kernel interpreted on CPU). Chunks are forced small so several are exercised."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, bench_script, rel_err

import fastformer as ff

IMPLS = ["reference", "auto", "triton"]


def _expected(x, W, t, b, ignore_index=-100, reduction="mean", eps=0.0, z=0.0):
    """Float64 oracle from torch's own ops."""
    logits = F.linear(x.reshape(-1, x.shape[-1]), W, b)
    t = t.reshape(-1)
    out = F.cross_entropy(logits, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=eps)
    if z:
        valid = (t != ignore_index).to(logits.dtype)
        zrow = z * torch.logsumexp(logits, -1).pow(2) * valid
        out = out + {"none": zrow, "sum": zrow.sum(), "mean": zrow.sum() / valid.sum().clamp_min(1)}[reduction]
    return out.reshape(x.shape[:-1]) if reduction == "none" else out


def _run(impl, x, W, t, b, dtype, chunk_size=16, factor=1.0, **kw):
    red = kw.get("reduction", "mean")
    leaves = [a.detach().to(dtype).requires_grad_(True) if a is not None else None for a in (x, W, b)]
    leaves64 = [a.detach().to(torch.float64).requires_grad_(True) if a is not None else None for a in (x, W, b)]
    with ff.use_backend(impl):
        out = ff.linear_cross_entropy(
            leaves[0],
            leaves[1],
            t,
            leaves[2],
            kw.get("ignore_index", -100),
            red,
            kw.get("eps", 0.0),
            z_loss=kw.get("z", 0.0),
            chunk_size=chunk_size,
        )
    exp = _expected(*leaves64[:2], t, leaves64[2], **kw)
    g = torch.randn_like(exp) if red == "none" else torch.tensor(0.7, dtype=torch.float64)
    assert out.dtype == dtype and out.shape == exp.shape
    assert_close(out, exp, dtype, f"{impl} loss", factor)
    want = [a for a in leaves if a is not None]
    want64 = [a for a in leaves64 if a is not None]
    grads = torch.autograd.grad(out, want, g.to(dtype))
    grads64 = torch.autograd.grad(exp, want64, g)
    for name, a, e in zip(("x", "W", "b"), grads, grads64):
        assert a.dtype == dtype
        assert_close(a, e, dtype, f"{impl} grad {name}", factor)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("N,H,V", [(1, 16, 10), (77, 32, 1000), (130, 24, 10)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_matches_unfused(impl, N, H, V, reduction, with_bias):
    x = torch.randn(N, H)
    W = torch.randn(V, H) / H**0.5
    b = torch.randn(V) if with_bias else None
    t = torch.randint(0, V, (N,))
    if N > 1:
        t[::4] = -100  # ignored rows are dropped before the matmul: their grad of x must be 0
    _run(impl, x, W, t, b, torch.float32, reduction=reduction)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps,z", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-3)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_smoothing_and_z_loss(impl, eps, z, reduction):
    N, H, V = 77, 32, 1000
    x, W, b = torch.randn(N, H), torch.randn(V, H) / 4, torch.randn(V)
    t = torch.randint(0, V, (N,))
    t[1::3] = 7
    _run(impl, x, W, t, b, torch.float32, ignore_index=7, reduction=reduction, eps=eps, z=z)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("offset", [1e4, 1e30])
def test_logits_at_a_huge_common_offset(impl, offset):
    """A bias at a large common offset: the loss is formed relative to each row's max, as torch's
    log_softmax (at 1e30 the logits are all equal in fp32: loss log V, which max + log Σ rounded to 0)."""
    N, H, V = 13, 16, 300
    x, W = torch.randn(N, H), torch.randn(V, H) / 4
    b = torch.randn(V) + offset
    t = torch.randint(0, V, (N,))
    # at 1e4 the fp32 logits themselves round (ulp 1e-3): unfused torch in fp32 is 4.8e-5 off float64
    # there too; at 1e30 every logit is the bias, exactly
    factor = 10.0 if offset < 1e5 else 1.0
    _run(impl, x, W, t, b, torch.float32, reduction="none", factor=factor)
    if offset < 1e5:  # smoothing sums the logits: relative to the max where they sit within fp32 range of it
        _run(impl, x, W, t, b, torch.float32, reduction="mean", eps=0.1, factor=factor)


@pytest.mark.parametrize("impl", IMPLS)
def test_batched_input_and_default_chunking(impl):
    B, L, H, V = 3, 11, 16, 1000
    x, W = torch.randn(B, L, H), torch.randn(V, H) / 4
    t = torch.randint(0, V, (B, L))
    t[:, -3:] = -100
    _run(impl, x, W, t, None, torch.float32, chunk_size=None, reduction="none")
    _run(impl, x, W, t, None, torch.float32, chunk_size=None, reduction="mean", eps=0.1)


@pytest.mark.parametrize("impl", ["auto", "triton"])
def test_fp16(impl):
    N, H, V = 77, 32, 1000
    x, W, b = torch.randn(N, H).half(), (torch.randn(V, H) / 4).half(), torch.randn(V).half()
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    _run(impl, x, W, t, b, torch.float16, reduction="mean", eps=0.1, z=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps,z", [(0.0, 0.0), (0.1, 1e-3)])
def test_float64_is_float64_accurate(impl, reduction, eps, z):
    """float64 in, float64 accuracy out (1e-10 of torch): the loss rows, the 1/count scale and the
    bias-gradient sums were float32 on the chunked path (relative error ~3e-8)."""
    N, H, V = 77, 32, 1000
    x, W, b = torch.randn(N, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64) / 4, torch.randn(V)
    t = torch.randint(0, V, (N,))
    t[::5] = -100
    _run(impl, x, W, t, b.double(), torch.float64, reduction=reduction, eps=eps, z=z)


@pytest.mark.parametrize("impl", IMPLS)
def test_float64_probability_targets_and_a_second_backward(impl):
    N, H, V = 37, 16, 50
    x, W, b = (a.double().requires_grad_(True) for a in (torch.randn(N, H), torch.randn(V, H) / 4, torch.randn(V)))
    p = torch.softmax(torch.randn(N, V, dtype=torch.float64), 1)
    with ff.use_backend(impl):
        out = ff.linear_cross_entropy(x, W, p, b, label_smoothing=0.1, chunk_size=16)
    want = F.cross_entropy(F.linear(x, W, b), p, label_smoothing=0.1)
    assert out.dtype == torch.float64
    assert_close(out, want, torch.float64, "loss")
    expected = torch.autograd.grad(want, (x, W, b))
    for g in (0.7, -1.3):  # the forward's gradients rescaled for a second backward, in float64 too
        for name, a, e in zip(
            "xWb",
            torch.autograd.grad(out, (x, W, b), torch.tensor(g, dtype=torch.float64), retain_graph=True),
            expected,
        ):
            assert_close(a, e * g, torch.float64, f"grad {name} for grad_output {g}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(impl, reduction):
    x = torch.randn(6, 8, requires_grad=True)
    W = torch.randn(10, 8, requires_grad=True)
    b = torch.randn(10, requires_grad=True)
    t = torch.full((6,), -100)
    with ff.use_backend(impl):
        out = ff.linear_cross_entropy(x, W, t, b, reduction=reduction, z_loss=1e-2)
    assert torch.equal(out.detach(), torch.zeros_like(out))
    for g in torch.autograd.grad(out.sum(), (x, W, b)):
        assert torch.equal(g, torch.zeros_like(g))


def test_no_grad_and_frozen_weight():
    x = torch.randn(20, 8, requires_grad=True)
    W = torch.randn(50, 8)  # frozen projection: only x gets a gradient
    t = torch.randint(0, 50, (20,))
    out = ff.linear_cross_entropy(x, W, t, chunk_size=4)
    (gx,) = torch.autograd.grad(out, x)
    x64 = x.detach().double().requires_grad_(True)
    (egx,) = torch.autograd.grad(_expected(x64, W.double(), t, None), x64)
    assert_close(gx, egx, torch.float32, "grad x")
    with torch.no_grad():
        assert_close(ff.linear_cross_entropy(x, W, t), _expected(x.double(), W.double(), t, None), torch.float32)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, W, t, b: ff.linear_cross_entropy(x[0, 0], W, t[0]), "input"),  # 0-d (an unbatched (H,) is fine)
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W.double(), t), "weight"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W[:, :-1], t), "weight"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t[:-1]), "target"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t.float()), "target"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, b[:-1]), "bias"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, b.half()), "bias"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W.to("meta"), t), "weight"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, reduction="mean "), "reduction"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, label_smoothing=-0.1), "label_smoothing"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, chunk_size=0), "chunk_size"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, chunk_size=-5), "chunk_size"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, chunk_size=2.5), "chunk_size"),
        (lambda x, W, t, b: ff.linear_cross_entropy(x, W, t, chunk_size="a"), "chunk_size"),
    ],
)
def test_bad_input(call, match):
    x, W, b = torch.randn(5, 8), torch.randn(10, 8), torch.randn(10)
    t = torch.randint(0, 10, (5,))
    with pytest.raises(ValueError, match=match):
        call(x, W, t, b)


@pytest.mark.cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cuda_bf16(reduction):
    N, H, V = 1000, 256, 32003
    x = torch.randn(N, H, device="cuda").bfloat16()
    W = (torch.randn(V, H, device="cuda") / 16).bfloat16()
    b = torch.randn(V, device="cuda").bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    t[::3] = -100
    leaves = [a.clone().requires_grad_(True) for a in (x, W, b)]
    out = ff.linear_cross_entropy(*leaves[:2], t, leaves[2], reduction=reduction, label_smoothing=0.1, chunk_size=256)
    f32 = [a.float().requires_grad_(True) for a in (x, W, b)]
    exp = F.cross_entropy(F.linear(f32[0], f32[1], f32[2]), t, reduction=reduction, label_smoothing=0.1)
    g = torch.randn_like(exp) if reduction == "none" else torch.tensor(1.0, device="cuda")
    assert_close(out, exp, torch.bfloat16, "loss")
    for name, a, e in zip("xWb", torch.autograd.grad(out, leaves, g.bfloat16()), torch.autograd.grad(exp, f32, g)):
        assert a.dtype == torch.bfloat16
        assert_close(a, e, torch.bfloat16, f"grad {name}")


def test_under_autocast_like_torch(backend):
    # torch.autocast: F.linear runs in bf16 and cross_entropy in fp32, so an fp32 weight (nn.Linear)
    # with bf16 hidden states works and the loss is fp32; grads reach the fp32 leaves
    x = torch.randn(10, 16, requires_grad=True)
    lin = torch.nn.Linear(16, 37)
    t = torch.randint(0, 37, (10,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = x.to(torch.bfloat16)
        want = F.cross_entropy(lin(h), t)
        got = ff.linear_cross_entropy(h, lin.weight, t, lin.bias)
        ce = ff.cross_entropy(lin(h), t)
    assert got.dtype == ce.dtype == want.dtype == torch.float32
    # computed in float32 from the bf16 logits and not rounded to bf16 on the way (bf16 steps near 3.6
    # are 0.016): the loss torch reports, to float32 rounding
    assert abs(got.item() - want.item()) < 1e-5 * want.item() and abs(ce.item() - want.item()) < 1e-5 * want.item()
    gx, gw = torch.autograd.grad(got, (x, lin.weight))
    wx, ww = torch.autograd.grad(want, (x, lin.weight))
    assert gw.dtype == torch.float32 and rel_err(gx, wx) < 5e-2 and rel_err(gw, ww) < 5e-2
    for reduction in ("sum", "none"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = lin(h)
            want = F.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1)
            outs = (
                ff.linear_cross_entropy(h, lin.weight, t, lin.bias, reduction=reduction, label_smoothing=0.1),
                ff.cross_entropy(logits, t, reduction=reduction, label_smoothing=0.1),
                ff.nn.CrossEntropyLoss(reduction=reduction, label_smoothing=0.1)(logits, t),
            )
        for out in outs:
            assert out.dtype == torch.float32 and rel_err(out.detach(), want.detach()) < 1e-5


@pytest.mark.parametrize("impl,N,H,V,chunk", [("auto", 3072, 256, 4000, None), ("triton", 384, 64, 1000, 64)])
def test_bf16_weight_gradient_as_accurate_as_unfused(impl, N, H, V, chunk):
    """grad_W is accumulated over the row chunks in bf16 (no fp32 (V, H) buffer): with the default
    chunking (MAX_CHUNKS chunks here) its error against float64 stays within 2x of the unfused bf16
    path's (one rounding). The interpreter case forces as many chunks on a smaller problem."""
    import importlib

    L = importlib.import_module("fastformer.ops.linear_cross_entropy")
    rows = chunk or L._chunk_rows(N, H, V, torch.device("cpu"), None, 2)
    assert -(-N // rows) == L.MAX_CHUNKS
    torch.manual_seed(0)
    x = torch.randn(N, H).bfloat16()
    W = (torch.randn(V, H) * (2 / H**0.5)).bfloat16()
    b = torch.randn(V).bfloat16()
    t = torch.randint(0, V, (N,))
    t[::7] = -100

    def grads(fn, dtype):
        leaves = [a.to(dtype).requires_grad_(True) for a in (x, W, b)]
        return torch.autograd.grad(fn(*leaves), leaves)

    exact = grads(lambda a, w, c: F.cross_entropy(F.linear(a, w, c), t), torch.float64)
    unfused = grads(lambda a, w, c: F.cross_entropy(F.linear(a, w, c), t), torch.bfloat16)
    with ff.use_backend(impl):
        fused = grads(lambda a, w, c: ff.linear_cross_entropy(a, w, t, c, chunk_size=chunk), torch.bfloat16)
    for name, f, u, e in zip("xWb", fused, unfused, exact):
        assert f.dtype == torch.bfloat16
        assert rel_err(f, e) <= 2 * rel_err(u, e), f"grad {name}: {rel_err(f, e):.2e} vs unfused {rel_err(u, e):.2e}"


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_every_row_kept_without_a_host_sync(triton_backend, monkeypatch, reduction):
    """Under CUDA graph capture the kept-row count cannot be read on the host: every row goes through
    the chunks and the kernel gives the ignored ones zero loss and gradients (same results)."""
    import importlib

    L = importlib.import_module("fastformer.ops.linear_cross_entropy")
    monkeypatch.setattr(L, "_sync_free", lambda x: True)
    N, H, V = 40, 16, 300
    x, W, b = torch.randn(N, H), torch.randn(V, H) / 4, torch.randn(V)
    t = torch.randint(0, V, (N,))
    t[::3] = -100
    _run("triton", x, W, t, b, torch.float32, chunk_size=16, reduction=reduction, eps=0.1, z=1e-3)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS is read from Linux /proc")
def test_cpu_memory_gate():
    """bench_linear_cross_entropy --memory-gate, in a fresh process: N=8192, H=512, V=32000 on CPU, in
    bf16 where the CPU has bf16 instructions, else fp32 (an emulated bf16 matmul took over ten minutes
    per provider on an AVX2-only CPU); peak RSS above the inputs and the returned gradients at most 1/8
    of the unfused path's."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(root / "bench" / "bench_linear_cross_entropy.py"), "--memory-gate"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.stdout.strip(), proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["passed"] and proc.returncode == 0, res
    assert res["ff_extra_MB"] <= res["unfused_extra_MB"] / 8, res
    harness = bench_script("harness")
    assert res["case"].endswith("bfloat16" if harness.cpu_has_bf16() else "float32"), res
