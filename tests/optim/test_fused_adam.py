"""FusedAdam / FusedAdamW against torch.optim.Adam / AdamW: parity, checkpoints, GradScaler, master
weights, fallback. Parameters, moments and steps are compared after many steps by relative error."""

import copy
import io
import random
import warnings

import pytest
import torch
from conftest import assert_close

import fastformer as ff
from fastformer import _extension
from fastformer.optim import _ext

F32 = torch.float32
PAIRS = [(ff.optim.FusedAdam, torch.optim.Adam), (ff.optim.FusedAdamW, torch.optim.AdamW)]


def make_params(shapes, dtype=F32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype).requires_grad_(True) for s in shapes]


def clone_params(params, dtype=None):
    return [p.detach().clone().to(dtype or p.dtype).requires_grad_(True) for p in params]


def random_groups(params, rng, tensor_lr=False):
    """Split params into 1-3 groups with random hyper-parameters (the first group gets a tensor lr)."""
    k = rng.randint(1, min(3, len(params)))
    cuts = sorted(rng.sample(range(1, len(params)), k - 1)) if k > 1 else []
    groups, start = [], 0
    for end in cuts + [len(params)]:
        groups.append(
            dict(
                params=params[start:end],
                lr=rng.choice([1e-3, 3e-2, 0.1]),
                betas=(rng.choice([0.0, 0.3, 0.9]), rng.choice([0.5, 0.99, 0.999])),
                eps=rng.choice([1e-8, 1e-3]),
                weight_decay=rng.choice([0.0, 0.05]),
                amsgrad=rng.random() < 0.5,
                maximize=rng.random() < 0.3,
            )
        )
        start = end
    return groups


def lists_for(groups, params):
    """The same group layout for another list of parameters (tensor lr copied, not shared)."""
    out, i = [], 0
    for g in groups:
        n = len(g["params"])
        h = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in g.items() if k != "params"}
        out.append(dict(params=params[i : i + n], **h))
        i += n
    return out


def set_grads(a, b, step, seed, skip_every=0):
    gen = torch.Generator().manual_seed(seed * 1000 + step)
    for i, (p, q) in enumerate(zip(a, b)):
        if skip_every and i == 1 and step % skip_every == 0:
            p.grad = q.grad = None  # this parameter sits the step out: its step count falls behind
            continue
        g = torch.randn(p.shape, generator=gen).to(p.device)
        p.grad = g.to(p.dtype)
        q.grad = g.clone().to(q.dtype)


def assert_same_state(ours, theirs, pa, pb, dtype=F32, factor=1.0):
    for p, q in zip(pa, pb):
        assert_close(p, q, dtype, "param", factor)
        sa, sb = ours.state[p], theirs.state[q]
        assert set(sb) <= set(sa), f"state keys {set(sa)} vs torch {set(sb)}"
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            if k in sb:
                assert_close(sa[k], sb[k], dtype, k, factor)
        assert float(sa["step"]) == float(sb["step"])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("pair", PAIRS, ids=["Adam", "AdamW"])
def test_parity_100_steps(pair, seed, monkeypatch):
    ours_cls, torch_cls = pair
    # every tensor here must go through the extension, not torch's fallback
    monkeypatch.setattr(ff.optim.FusedAdam, "_fallback_step", lambda *a: pytest.fail("fallback used"))
    rng = random.Random(seed)
    shapes = [(), (7,), (33, 65), (3, 5, 17), (1,), (129,)]
    if seed == 0:
        shapes.append((1_000_003,))  # one large tensor: many chunks across threads
    pa = make_params(shapes, seed=seed)
    pb = clone_params(pa)
    groups = random_groups(pa, rng)
    if seed % 2 == 1:
        groups[0]["lr"] = torch.tensor(groups[0]["lr"])  # lr as a tensor
    ours = ours_cls(groups)
    theirs = torch_cls(lists_for(groups, pb), foreach=False)
    for step in range(100):
        set_grads(pa, pb, step, seed, skip_every=3)
        ours.step()
        theirs.step()
    assert_same_state(ours, theirs, pa, pb)


@pytest.mark.parametrize("pair", PAIRS, ids=["Adam", "AdamW"])
def test_state_dict_both_ways(pair):
    ours_cls, torch_cls = pair
    kw = dict(lr=0.05, betas=(0.8, 0.99), weight_decay=0.1, amsgrad=True)
    pa = make_params([(5, 3), (11,), ()], seed=4)
    pb = clone_params(pa)
    ours, theirs = ours_cls(pa, **kw), torch_cls(pb, **kw)
    for step in range(5):
        set_grads(pa, pb, step, 4)
        ours.step()
        theirs.step()
    sd_ours, sd_torch = ours.state_dict(), theirs.state_dict()
    # torch's layout: same state keys, 'step' a tensor, and every torch group key present
    assert set(sd_ours["state"][0]) >= {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert torch.is_tensor(sd_ours["state"][0]["step"])
    assert set(sd_torch["param_groups"][0]) <= set(sd_ours["param_groups"][0])

    def roundtrip(sd):  # through bytes, as a checkpoint file would be
        buf = io.BytesIO()
        torch.save(sd, buf)
        buf.seek(0)
        return torch.load(buf, map_location="cpu")

    # fastformer -> torch and torch -> fastformer, then continue both and compare with the originals
    pc, pd = clone_params(pa), clone_params(pb)
    torch_from_ours = torch_cls(pc, **kw)
    torch_from_ours.load_state_dict(roundtrip(sd_ours))
    ours_from_torch = ours_cls(pd, **kw)
    ours_from_torch.load_state_dict(roundtrip(sd_torch))
    for step in range(5, 10):
        gen = torch.Generator().manual_seed(step)
        for ps in (pa, pb, pc, pd):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            gen.manual_seed(step)
        for o in (ours, theirs, torch_from_ours, ours_from_torch):
            o.step()
    assert_same_state(ours, torch_from_ours, pa, pc)
    assert_same_state(ours_from_torch, theirs, pd, pb)


def test_grad_scaler_inf_step_changes_nothing():
    torch.manual_seed(5)
    pa = make_params([(17, 3), (9,)], seed=5)
    pb = clone_params(pa)
    ours, theirs = ff.optim.FusedAdamW(pa, lr=0.05), torch.optim.AdamW(pb, lr=0.05)
    sa = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    sb = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    assert ours._step_supports_amp_scaling
    for step in range(6):
        x = torch.randn(17, 3)
        if step == 3:
            x[0, 0] = float("inf")
        before = (copy.deepcopy(ours.state_dict()), [p.detach().clone() for p in pa])
        for opt, scaler, ps in ((ours, sa, pa), (theirs, sb, pb)):
            opt.zero_grad()
            loss = (ps[0] * x).sum() + (ps[1] ** 2).sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if step == 3:  # the inf step: no parameter, no state, no step count changed
            for p, q in zip(pa, before[1]):
                assert torch.equal(p, q)
            after = ours.state_dict()["state"]
            for k, st in before[0]["state"].items():
                for name, v in st.items():
                    assert torch.equal(after[k][name], v), name
        assert sa.get_scale() == sb.get_scale()
    assert_same_state(ours, theirs, pa, pb)
    # like torch's fused Adam, the gradients are left unscaled after a good step
    assert_close(pa[1].grad, pb[1].grad, F32, "unscaled grad")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_master_weights(dtype):
    shapes = [(31, 7), (130,), ()]
    ref = make_params(shapes, seed=6)  # fp32 reference: torch AdamW on an fp32 copy
    low = clone_params(ref, dtype)
    ref = clone_params([p.detach().to(dtype).float() for p in ref])  # start from the rounded values
    plain = clone_params(low)
    ours = ff.optim.FusedAdamW(low, lr=0.01, weight_decay=0.1, master_weights=True)
    no_master = ff.optim.FusedAdamW(plain, lr=0.01, weight_decay=0.1)
    theirs = torch.optim.AdamW(ref, lr=0.01, weight_decay=0.1)
    for step in range(20):
        gen = torch.Generator().manual_seed(step)
        for p, q, r in zip(low, plain, ref):
            g = torch.randn(p.shape, generator=gen).to(dtype)
            p.grad, q.grad, r.grad = g.clone(), g.clone(), g.float()
        ours.step()
        no_master.step()
        theirs.step()
    for p, q, r in zip(low, plain, ref):
        st = ours.state[p]
        assert st["master_param"].dtype == F32 and st["exp_avg"].dtype == F32
        assert_close(st["master_param"], r, F32, "master")
        assert torch.equal(p, st["master_param"].to(dtype)), "param is the rounded master"
        assert p.dtype == dtype and q.dtype == dtype
        assert_close(q, r, dtype, "no-master param (fp32 math, rounded storage)")
    # the fp32 master state survives a checkpoint round trip
    other = ff.optim.FusedAdamW(clone_params(low), lr=0.01, weight_decay=0.1, master_weights=True)
    other.load_state_dict(ours.state_dict())
    for st in other.state.values():
        assert st["master_param"].dtype == F32 and st["exp_avg_sq"].dtype == F32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pair", PAIRS, ids=lambda pair: pair[0].__name__)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_master_weights_continue_from_torchs_state(dtype, pair, amsgrad):
    """torch's Adam keeps the moments of a 16-bit parameter in 16 bits; loaded into master_weights=True,
    they become fp32 state and the steps continue like torch's in fp32 from that state."""
    ours_cls, torch_cls = pair  # eps 1e-4: torch's default 1e-8 is 0 in fp16, and its fp16 step divides by 0
    (p,) = make_params([(31, 7)], dtype=dtype, seed=3)
    theirs = torch_cls([p], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, eps=1e-4)
    p.grad = torch.randn_like(p)
    theirs.step()
    saved = copy.deepcopy(theirs.state_dict())
    (q,) = clone_params([p])
    ours = ours_cls([q], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, eps=1e-4, master_weights=True)
    ours.load_state_dict(copy.deepcopy(saved))
    (r,) = clone_params([p], F32)  # the reference: torch in fp32 from the same state
    fp32_state = {k: v.float() if k != "step" else v for k, v in saved["state"][0].items()}
    ref = torch_cls([r], lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, eps=1e-4)
    ref.load_state_dict({**saved, "state": {0: fp32_state}})
    for step in range(5):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)).to(dtype)
        q.grad, r.grad = g.clone(), g.float()
        ours.step()
        ref.step()
    st = ours.state[q]
    assert all(st[k].dtype == F32 for k in ("exp_avg", "exp_avg_sq", "master_param"))
    assert_close(st["master_param"], r, F32, "master")
    assert torch.equal(q, st["master_param"].to(dtype)), "param is the rounded master"


def test_sparse_grad_raises_value_error():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = ff.optim.FusedAdam(emb.parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert len(opt.state) == 0


def test_bad_hyper_parameters_raise():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        ff.optim.FusedAdam(p, lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        ff.optim.FusedAdamW(p, betas=(0.9, 1.0))


def test_extension_loaded_here():
    # the build (make test / pip install -e .) must produce the extension on this machine
    assert ff.optim.extension_available(), f"extension failed to load: {_extension._state['error']}"


def test_fallback_warns_once_and_matches_torch(monkeypatch):
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "error": ImportError("simulated")})
    monkeypatch.setitem(_ext._warned, "done", False)
    pa = make_params([(13, 5), (), (64,)], seed=7)
    pb = clone_params(pa)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ours = ff.optim.FusedAdam(pa, lr=0.02, weight_decay=0.01, amsgrad=True)
        ff.optim.FusedAdamW(clone_params(pa))
        theirs = torch.optim.Adam(pb, lr=0.02, weight_decay=0.01, amsgrad=True)
        for step in range(10):
            set_grads(pa, pb, step, 7)
            ours.step()
            theirs.step()
    msgs = [str(w.message) for w in rec if "fastformer" in str(w.message)]
    assert len(msgs) == 1 and "simulated" in msgs[0]
    assert not ff.optim.extension_available()
    assert_same_state(ours, theirs, pa, pb)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_parity(dtype):
    shapes = [(), (7,), (33, 65), (1_000_003,), (768, 768)]
    ref = make_params(shapes, seed=8, device="cuda")
    ref = clone_params([p.detach().to(dtype).float() for p in ref])
    low = clone_params(ref, dtype)
    kw = dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.05, amsgrad=True)
    ours = ff.optim.FusedAdamW(low, master_weights=dtype != F32, **kw)
    theirs = torch.optim.AdamW(ref, foreach=False, **kw)
    for step in range(20):
        gen = torch.Generator(device="cuda").manual_seed(step)
        for p, r in zip(low, ref):
            g = torch.randn(p.shape, generator=gen, device="cuda").to(dtype)
            p.grad, r.grad = g.clone(), g.float()
        ours.step()
        theirs.step()
    for p, r in zip(low, ref):
        assert_close(p, r, dtype if dtype != F32 else F32, "param")
        if dtype != F32:
            assert_close(ours.state[p]["master_param"], r, F32, "master", 10)


@pytest.mark.cuda
def test_cuda_one_kernel_launch_per_step():
    from fastformer._profiling import cuda_kernels_launched

    ps = make_params([(768, 768)] * 150 + [(3072,), (), (77,)], device="cuda", seed=9)
    opt = ff.optim.FusedAdamW(ps, lr=1e-3)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()  # state initialisation launches its own fills
    kernels = cuda_kernels_launched(opt.step)
    assert len(kernels) == 1 and "adam" in kernels[0], kernels


@pytest.mark.cuda
def test_cuda_state_dict_from_cpu_checkpoint():
    kw = dict(lr=0.02, weight_decay=0.1)
    pa = make_params([(40, 3), (5,)], seed=10, device="cuda")
    pb = clone_params(pa)
    theirs = torch.optim.AdamW(pb, fused=True, **kw)  # torch's fused layout: step on the device
    ours = ff.optim.FusedAdamW(pa, **kw)
    for _step in range(3):
        for p, q in zip(pa, pb):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        theirs.step()
    buf = io.BytesIO()
    torch.save(theirs.state_dict(), buf)
    buf.seek(0)
    loaded = ff.optim.FusedAdamW(clone_params(pb), **kw)
    loaded.load_state_dict(torch.load(buf, map_location="cpu"))
    for p, q in zip(loaded.param_groups[0]["params"], pb):
        st = loaded.state[p]
        assert st["exp_avg"].is_cuda and st["step"].device.type == "cpu"
        assert_close(st["exp_avg"], theirs.state[q]["exp_avg"], F32, "exp_avg")


@pytest.mark.cuda
def test_cuda_kernels_built():
    # `pip install -e .` on a machine with CUDA torch and nvcc must build the CUDA part too
    assert ff.optim.extension_available("cuda"), f"no CUDA kernels: {_extension._state['error']}"


@pytest.mark.cuda
def test_cuda_kernels_standalone(tmp_path):
    # the raw kernels without torch: every dtype combination, misaligned tensors, unscale, norms, clip
    import shutil
    import subprocess
    from pathlib import Path

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = Path(__file__).resolve().parents[2]
    exe = tmp_path / "adam_kernel_check"
    subprocess.run(
        [
            nvcc,
            "-std=c++17",
            "-O3",
            "-arch=native",
            f"-I{root / 'csrc'}",
            str(root / "tests/optim/adam_kernel_check.cu"),
            str(root / "csrc/adam_cuda.cu"),
            "-o",
            str(exe),
        ],
        check=True,
    )
    out = subprocess.run([str(exe)], capture_output=True, text=True)
    assert out.returncode == 0 and "KERNEL TEST PASS" in out.stdout, out.stdout + out.stderr


def test_adamw_signature_names_every_keyword():
    # FusedAdamW took **kw, so inspect.signature (IDEs, contract checks) did not show master_weights
    import inspect

    params = inspect.signature(ff.optim.FusedAdamW).parameters
    assert {"master_weights", "maximize", "foreach", "fused", "decoupled_weight_decay"} <= set(params)
    assert params["weight_decay"].default == 1e-2


# ------------------------------------------------ review additions: run on CPU here and on a GPU
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def _offset_view(values: torch.Tensor, dtype, device, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(base, view): `values` in `dtype` at element `offset` of a base one element longer, so the
    view's address is not 16-byte aligned for offset 1 (the kernels' scalar path) and is for 0."""
    base = torch.full((values.numel() + 1,), -7.0, dtype=dtype, device=device)
    view = base[offset : offset + values.numel()]
    view.copy_(values)
    return base, view


@pytest.mark.parametrize("device", DEVICES)
def test_offset_views_and_mixed_dtypes_in_one_call_match_torch(device):
    """One extension call (one launch on CUDA) over fp32, bf16 and fp16 parameters (16-bit with master
    weights), each aligned or a view at a misaligned address, sizes around the vector width and the
    CUDA chunk (16384), gradients misaligned views too; Adam with L2 decay, maximize and amsgrad in one
    group, AdamW's decoupled decay in the other. Compared with torch in fp32; the element in front of
    each view is never written."""
    gen = torch.Generator().manual_seed(21)
    sizes, dtypes = [1, 7, 8, 3 * 16384 + 5], [F32, torch.bfloat16, torch.float16]
    ours, ref, bases = [], [], []
    for i, (dtype, n) in enumerate((d, n) for d in dtypes for n in sizes):
        base, view = _offset_view(torch.randn(n, generator=gen), dtype, device, offset=i % 2 if n > 1 else 1)
        bases.append(base)
        ours.append(torch.nn.Parameter(view))
        ref.append(view.detach().float().clone().requires_grad_(True))
    half = len(ours) // 2
    hyper = [
        dict(lr=0.02, weight_decay=0.05, maximize=True, amsgrad=True),
        dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True),
    ]
    opt = ff.optim.FusedAdam(
        [dict(params=ours[:half], **hyper[0]), dict(params=ours[half:], **hyper[1])], master_weights=True
    )
    theirs = torch.optim.Adam([dict(params=ref[:half], **hyper[0]), dict(params=ref[half:], **hyper[1])], foreach=False)
    grad_bases = []
    for _step in range(4):
        grad_bases.clear()
        for i, (p, r) in enumerate(zip(ours, ref)):
            gb, g = _offset_view(torch.randn(p.numel(), generator=gen), p.dtype, device, offset=(i + 1) % 2)
            grad_bases.append(gb)
            p.grad, r.grad = g, g.detach().float().clone()
        opt.step()
        theirs.step()
    assert all(opt._plan[id(p)][3] for p in ours), "a parameter took torch's path instead of the kernel"
    for p, r, base, gb in zip(ours, ref, bases, grad_bases):
        if p.dtype == F32:
            assert_close(p, r, F32, f"param n={p.numel()}")
        else:
            assert_close(p.float(), r, p.dtype, f"{p.dtype} param n={p.numel()}")
            assert_close(opt.state[p]["master_param"], r, F32, f"{p.dtype} master n={p.numel()}", 10)
        for b, view in ((base, p), (gb, p.grad)):  # the element in front of or after the view
            assert b[0 if view.data_ptr() != b.data_ptr() else -1].item() == -7.0


@pytest.mark.parametrize("device", DEVICES)
def test_grad_scaler_on_the_kernel_path_matches_torch_fused(device):
    """GradScaler hands grad_scale / found_inf to the step: with an inf gradient nothing changes (not
    the step count, not the still-scaled gradients); otherwise the gradients are unscaled in place
    and the step matches torch's fused AdamW (fp32, the same scaler sequence)."""
    gen = torch.Generator().manual_seed(22)
    shapes = [(5, 3), (16384 + 3,), (7,)]
    pa = [torch.randn(s, generator=gen).to(device).requires_grad_(True) for s in shapes]
    pb = [p.detach().clone().requires_grad_(True) for p in pa]
    ours = ff.optim.FusedAdamW(pa, lr=0.05, weight_decay=0.1)
    theirs = torch.optim.AdamW(pb, lr=0.05, weight_decay=0.1, fused=True)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**10) for _ in range(2)]
    for step in range(5):
        gs = [torch.randn(s, generator=gen).to(device) for s in shapes]
        if step == 2:
            gs[1][123] = float("inf")
        before = ([p.detach().clone() for p in pa], [float(ours.state[p]["step"]) for p in pa if p in ours.state])
        for opt, scaler, ps in ((ours, scalers[0], pa), (theirs, scalers[1], pb)):
            opt.zero_grad()
            scaler.scale(sum((p * g).sum() for p, g in zip(ps, gs))).backward()
            scaler.step(opt)
            scaler.update()
        if step == 2:
            assert all(torch.equal(p, q) for p, q in zip(pa, before[0]))
            assert [float(ours.state[p]["step"]) for p in pa] == before[1]
            assert torch.isinf(pa[1].grad[123])  # left scaled, as torch's fused step leaves it
        else:
            assert_close(pa[0].grad, pb[0].grad, F32, "unscaled grad")
    assert scalers[0].get_scale() == scalers[1].get_scale()
    for p, q in zip(pa, pb):
        assert_close(p, q, F32, "param")
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == 4.0


@pytest.mark.cuda
def test_cuda_kernels_runnable_probe():
    """The build has code for this GPU (the probe _ext.supports asks once per device), and the probe
    leaves no CUDA error behind for torch's next launch check."""
    for i in range(torch.cuda.device_count()):
        assert torch.ops.fastformer.cuda_kernels_runnable(i), torch.cuda.get_device_name(i)
        assert _ext.supports(torch.device("cuda", i))
    x = torch.ones(3, device="cuda") * 2
    torch.cuda.synchronize()
    assert x.sum().item() == 6.0


@pytest.mark.cuda
def test_cuda_parameters_on_another_device_than_the_current_one():
    """Parameters on the last GPU while the current device is cuda:0: the binding's device guard and
    stream; compared with torch, clip_grad_norm_ too."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.set_device(0)
    pa = make_params([(33, 65), (16384 + 9,)], device=dev, seed=23)
    pb = clone_params(pa)
    ours, theirs = ff.optim.FusedAdamW(pa, lr=0.01), torch.optim.AdamW(pb, lr=0.01, foreach=False)
    for step in range(3):
        gen = torch.Generator(device=dev).manual_seed(step)
        for p, q in zip(pa, pb):
            p.grad = torch.randn(p.shape, generator=gen, device=dev)
            q.grad = p.grad.clone()
        n1 = ff.optim.clip_grad_norm_(pa, 1.0)
        n2 = torch.nn.utils.clip_grad_norm_(pb, 1.0)
        assert n1.device == dev
        assert_close(n1, n2, F32, "norm")
        ours.step()
        theirs.step()
    torch.cuda.synchronize(dev)
    assert_same_state(ours, theirs, pa, pb)


@pytest.mark.cuda
def test_cuda_tensor_over_2_31_elements():
    """One bf16 parameter of 2**31 + 1000 elements (~17 GB with its gradient and state): element
    indices past 2**31 must not wrap (int64 offsets in the kernel). Checked against torch on windows
    at the start, across 2**31 and at the end."""
    n, w = 2**31 + 1000, 4096
    if torch.cuda.mem_get_info()[0] < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    bf16 = torch.bfloat16
    p = torch.nn.Parameter(torch.empty(n, dtype=bf16, device="cuda"))
    g = torch.empty(n, dtype=bf16, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(24)
    with torch.no_grad():
        for b in range(0, n, 2**28):
            p[b : b + 2**28].normal_(generator=gen)
            g[b : b + 2**28].normal_(generator=gen)
    windows = [slice(0, w), slice(2**31 - w, 2**31 + w), slice(n - w, n)]
    refs = [p.detach()[s].float().clone().requires_grad_(True) for s in windows]
    for r, s in zip(refs, windows):
        r.grad = g[s].float()
    kw = dict(lr=0.01, weight_decay=0.1)
    p.grad = g
    ff.optim.FusedAdamW([p], **kw).step()
    torch.optim.AdamW(refs, foreach=False, **kw).step()
    for r, s in zip(refs, windows):
        assert_close(p.detach()[s].float(), r.detach().to(bf16).float(), bf16, f"param [{s.start}:{s.stop}]")
    del p, g
    torch.cuda.empty_cache()
