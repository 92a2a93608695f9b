"""FusedAdam / FusedAdamW against torch where a user leaves the common path: GradScaler with 16-bit
parameters on torch's fallback, optimizer state reset or replaced between steps, `p.data` replaced,
a checkpoint of master weights that went through torch's AdamW, a parameter listed twice, the
float64 default dtype, malformed arguments and the FASTFORMER_* switches. Each test failed before
its fix."""

import copy
import os
import runpy
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import setuptools
import torch
from conftest import assert_close

import fastformer as ff
from fastformer import _extension
from fastformer.optim import _ext

F32 = torch.float32
ROOT = Path(__file__).resolve().parents[2]


def twins(shapes, dtype=F32, seed=0):
    """Two lists of equal parameters (ours, torch's)."""
    gen = torch.Generator().manual_seed(seed)
    a = [torch.randn(s, generator=gen).to(dtype).requires_grad_(True) for s in shapes]
    return a, [p.detach().clone().requires_grad_(True) for p in a]


def set_same_grads(a, b, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p, q in zip(a, b):
        g = torch.randn(p.shape, generator=gen)
        p.grad, q.grad = g.to(p.dtype), g.to(q.dtype)


@pytest.fixture
def no_extension(monkeypatch):
    """torch's fallback for every parameter, without the once-per-process warning."""
    monkeypatch.setattr(_extension, "_state", {"loaded": False, "error": ImportError("simulated")})
    monkeypatch.setitem(_ext._warned, "done", True)


@pytest.fixture
def quiet_fallback(monkeypatch):
    """The 'no kernel for some parameters' warning is expected here; keep it out of other tests."""
    monkeypatch.setitem(_ext._warned, "done", True)


# --------------------------------------------------------------- 1. GradScaler on the fallback path
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["non-contiguous", "no-extension"])
def test_grad_scaler_16bit_fallback_matches_torch_fused(dtype, path, request):
    """The fallback divided an fp16 gradient by the scale cast to fp16 (65536 -> inf): zero
    gradients, NaN parameters. Now it unscales in fp32 like torch's fused Adam, whose result it
    must follow, and an inf/NaN step still changes nothing."""
    request.getfixturevalue("no_extension" if path == "no-extension" else "quiet_fallback")
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(5, 3, generator=gen).to(dtype)
    if path == "non-contiguous":
        init = init.t()  # (3, 5), not contiguous: no kernel takes it
    p = torch.nn.Parameter(init.clone())
    q = torch.nn.Parameter(init.clone())
    ours = ff.optim.FusedAdam([p], lr=0.1)
    theirs = torch.optim.Adam([q], lr=0.1, fused=True)
    sa, sb = torch.amp.GradScaler("cpu"), torch.amp.GradScaler("cpu")
    for step in range(6):
        x = torch.randn(p.shape, generator=gen) * 1e-3  # small gradients: fp16 moments underflow
        if step == 2:
            x[0, 0] = float("inf")
        before = (p.detach().clone(), float(ours.state[p].get("step", 0)))
        for opt, scaler, w in ((ours, sa, p), (theirs, sb, q)):
            opt.zero_grad()
            scaler.scale((w.float() * x).sum()).backward()
            scaler.step(opt)
            scaler.update()
        if step == 2:  # the inf step: nothing changed
            assert torch.equal(p, before[0]) and float(ours.state[p]["step"]) == before[1] == 2
        else:
            assert_close(p.grad, q.grad, dtype, "unscaled grad")
    assert torch.isfinite(p).all()
    assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"]) == 5
    assert_close(p, q, dtype, "param")
    for k in ("exp_avg", "exp_avg_sq"):
        assert_close(ours.state[p][k], theirs.state[q][k], dtype, k)


# ------------------------------------------------------------------------- 2. state reset, p.data
def _reset(opt, params, how):
    p = params[0]
    if how == "clear":
        opt.state.clear()
    elif how == "new-dict":
        opt.state = defaultdict(dict)
    elif how == "del":
        del opt.state[p]
    elif how == "assign-empty":
        opt.state[p] = {}
    elif how == "clear-entry":
        opt.state[p].clear()


@pytest.mark.parametrize("how", ["clear", "new-dict", "del", "assign-empty", "clear-entry"])
@pytest.mark.parametrize("path", ["kernel", "no-extension"])
def test_state_reset_starts_afresh_like_torch(how, path, request):
    """ff cached each parameter's state dict and kept updating the orphaned moments after a reset
    (and state_dict() saved no state); torch starts fresh moments and step count."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    pa, pb = twins([(7, 3), (11,)], seed=2)
    ours = ff.optim.FusedAdamW(pa, lr=0.05, amsgrad=True)
    theirs = torch.optim.AdamW(pb, lr=0.05, amsgrad=True)
    for step in range(6):
        set_same_grads(pa, pb, step)
        ours.step()
        theirs.step()
        if step == 2:
            _reset(ours, pa, how)
            _reset(theirs, pb, how)
    for p, q in zip(pa, pb):
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
            assert_close(ours.state[p][k], theirs.state[q][k], F32, k)
        assert_close(p, q, F32, "param")
    saved = ours.state_dict()["state"]
    assert set(saved) == {0, 1} and float(saved[0]["step"]) == float(theirs.state[pb[0]]["step"])


def test_param_data_replaced_like_torch(quiet_fallback, monkeypatch):
    """p.data replaced by a same-shape non-contiguous tensor: torch steps, ff raised 'params must be
    contiguous CPU tensors' (a cached kernel verdict); by another shape: torch raises, ff stepped."""
    pa, pb = twins([(3, 4), (5,)], seed=3)
    ours, theirs = ff.optim.FusedAdam(pa, lr=0.1), torch.optim.Adam(pb, lr=0.1)
    for step in range(4):
        if step == 2:
            new = torch.randn(4, 3, generator=torch.Generator().manual_seed(9)).t()
            pa[0].data, pb[0].data = new.clone(), new.clone()
            assert not pa[0].is_contiguous()
        set_same_grads(pa, pb, step)
        ours.step()
        theirs.step()
    for p, q in zip(pa, pb):
        assert_close(p, q, F32, "param")
        assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], F32, "exp_avg_sq")
    # another shape with the old state: both refuse to step
    pa[1].data, pb[1].data = torch.zeros(6), torch.zeros(6)
    set_same_grads(pa, pb, 9)
    with pytest.raises(RuntimeError):
        theirs.step()
    with pytest.raises(ValueError, match="params: .*shape"):
        ours.step()
    # (torch has stepped pb[0] before failing; ff changed nothing.) p.data contiguous again and a
    # fresh state for the reshaped parameter: both back on the kernel
    del ours.state[pa[1]]
    pa[0].data = pa[0].detach().contiguous()
    monkeypatch.setattr(ff.optim.FusedAdam, "_fallback_step", lambda *a: pytest.fail("fallback used"))
    ours.step()
    assert float(ours.state[pa[1]]["step"]) == 1 and float(ours.state[pa[0]]["step"]) == 5


# ------------------------------------------------------------ 3. master weights through torch's AdamW
@pytest.mark.parametrize("path", ["kernel", "no-extension"])
def test_master_weights_resume_after_torch_adamw(path, request):
    """ff (master_weights) -> torch AdamW -> ff: torch carries 'master_param' cast to bf16 and stale;
    ff crashed on it ("master 0 must be a contiguous fp32 tensor" / "expected dtype float"). The
    stale copy is dropped and rebuilt from the parameter, so ff continues like torch in fp32 from
    torch's state."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    kw = dict(lr=0.1, weight_decay=0.01)
    p = torch.nn.Parameter(torch.randn(6, 5, generator=torch.Generator().manual_seed(5)).bfloat16())
    a = ff.optim.FusedAdamW([p], master_weights=True, **kw)
    p.grad = torch.randn_like(p)
    a.step()
    t = torch.optim.AdamW([p], **kw)
    t.load_state_dict(a.state_dict())
    assert t.state[p]["master_param"].dtype == torch.bfloat16  # what torch carries along
    p.grad = torch.randn_like(p)
    t.step()
    saved = t.state_dict()
    b = ff.optim.FusedAdamW([p], master_weights=True, **kw)
    b.load_state_dict(copy.deepcopy(saved))
    assert "master_param" not in b.state[p]
    r = torch.nn.Parameter(p.detach().float())  # the reference: torch in fp32 from torch's state
    ref = torch.optim.AdamW([r], **kw)
    fp32 = {k: v.float() for k, v in saved["state"][0].items() if k != "master_param"}
    ref.load_state_dict({**saved, "state": {0: fp32}})
    for step in range(3):
        g = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
        p.grad, r.grad = g.bfloat16(), g.bfloat16().float()
        b.step()
        ref.step()
    st = b.state[p]
    assert st["master_param"].dtype == F32 and float(st["step"]) == float(ref.state[r]["step"]) == 5
    assert_close(st["master_param"], r, F32, "master")
    assert torch.equal(p, st["master_param"].bfloat16())


def test_current_master_weights_survive_load():
    """Only a stale master copy is dropped: ff's own checkpoint keeps its fp32 master."""
    p = torch.nn.Parameter(torch.randn(40).bfloat16())
    a = ff.optim.FusedAdamW([p], lr=0.01, master_weights=True)
    p.grad = torch.randn_like(p)
    a.step()
    b = ff.optim.FusedAdamW([p], lr=0.01, master_weights=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.state[p]["master_param"], a.state[p]["master_param"])


def test_master_weights_survive_either_load_order():
    """Optimizer state loaded before the model's weights keeps its fp32 master copy: it is compared with
    the parameter at the next step, not at load (the parameter then still holds fresh weights)."""

    def make():
        torch.manual_seed(1)
        return torch.nn.Linear(16, 16).to(torch.bfloat16)

    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).bfloat16()
    m = make()
    opt = ff.optim.FusedAdamW(m.parameters(), lr=1e-3, master_weights=True)
    for _ in range(3):
        opt.zero_grad()
        m(x).float().pow(2).mean().backward()
        opt.step()
    model_sd, opt_sd = copy.deepcopy(m.state_dict()), copy.deepcopy(opt.state_dict())
    masters = []
    for optimizer_first in (False, True):
        m2 = make()
        o2 = ff.optim.FusedAdamW(m2.parameters(), lr=1e-3, master_weights=True)
        if optimizer_first:
            o2.load_state_dict(copy.deepcopy(opt_sd))
            m2.load_state_dict(model_sd)
        else:
            m2.load_state_dict(model_sd)
            o2.load_state_dict(copy.deepcopy(opt_sd))
        o2.zero_grad()
        m2(x).float().pow(2).mean().backward()
        o2.step()
        masters.append(o2.state[m2.weight]["master_param"].clone())
    assert torch.equal(masters[0], masters[1])


def test_grad_scaler_keeps_float64_gradients_exact():
    """The unscale of torch's path runs in float64 for float64 gradients (fp32 only widens fp16/bf16)."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    opt = ff.optim.FusedAdam([p], lr=1e-3)
    g = torch.tensor([1.0, 1e-9, 3.0], dtype=torch.float64) * (1 + 1e-12)
    p.grad = g.clone()
    opt.grad_scale, opt.found_inf = torch.tensor(3.0), torch.tensor(0.0)  # what GradScaler.step hands over
    opt.step()
    assert torch.equal(p.grad, g / 3.0)


# ------------------------------------------------------------------------ 4. a parameter listed twice
@pytest.mark.parametrize("path", ["kernel", "no-extension", "grad-scaler"])
def test_duplicate_parameter_steps_twice_like_torch(path, request):
    """[p, p, q]: torch steps p twice in sequence (step count 2 after one step()). In one kernel call
    both entries saw the step count already at 2, and with >1 OpenMP thread they raced."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the large tensor is split over threads: the race needs two
    try:
        pa, pb = twins([(200_000,), (17,)], seed=6)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch: "duplicate parameters" (both optimizers)
            ours = ff.optim.FusedAdam([pa[0], pa[0], pa[1]], lr=0.01, weight_decay=0.1, amsgrad=True)
            theirs = torch.optim.Adam([pb[0], pb[0], pb[1]], lr=0.01, weight_decay=0.1, amsgrad=True)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10) if path == "grad-scaler" else None
        if scaler is not None:
            scaler.scale(torch.ones(()))  # the scaler's state starts with its first scale()
        for step in range(4):
            set_same_grads(pa, pb, step)
            if scaler is not None:  # power-of-two scale: the unscaled gradient is exact
                for p in pa:
                    p.grad.mul_(scaler.get_scale())
                scaler.step(ours)
                scaler.update()
                assert_close(pa[0].grad, pb[0].grad, F32, "unscaled once")
            else:
                ours.step()
            theirs.step()
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(pa, pb):
        assert float(ours.state[p]["step"]) == float(theirs.state[q]["step"])
        assert_close(p, q, F32, "param")
        assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], F32, "exp_avg_sq")
    assert float(ours.state[pa[0]]["step"]) == 8


# --------------------------------------------------------------------- 6. arguments, default dtype
def test_bad_arguments_raise_value_error_naming_them():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="lr"):
        ff.optim.FusedAdam(p, lr="0.1")
    with pytest.raises(ValueError, match="lr"):
        ff.optim.FusedAdamW(p, lr=torch.tensor([0.1, 0.2]))
    for betas in ((0.9,), (0.9, 0.99, 0.999), 0.9):
        with pytest.raises(ValueError, match="betas"):
            ff.optim.FusedAdam(p, betas=betas)
    with pytest.raises(ValueError, match="eps"):
        ff.optim.FusedAdam(p, eps="1e-8")
    ff.optim.FusedAdam(p, lr=torch.tensor(0.1), betas=[0.8, 0.9])  # a tensor lr and a list are fine
    q = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    q.grad = torch.ones_like(q)
    with pytest.raises(ValueError, match="complex"):
        ff.optim.FusedAdam([q]).step()


@pytest.mark.parametrize("path", ["kernel", "no-extension"])
def test_step_dtype_follows_default_dtype(path, request):
    """torch keeps 'step' in float64 under torch.set_default_dtype(torch.float64); ff kept fp32."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pa, pb = twins([(8, 3), ()], dtype=F32, seed=7)
        ours, theirs = ff.optim.FusedAdam(pa, lr=0.1), torch.optim.Adam(pb, lr=0.1)
        for step in range(3):
            set_same_grads(pa, pb, step)
            ours.step()
            theirs.step()
        other = ff.optim.FusedAdam([p.detach().clone().requires_grad_() for p in pa], lr=0.1)
        other.load_state_dict(theirs.state_dict())
    finally:
        torch.set_default_dtype(old)
    for p, q in zip(pa, pb):
        assert ours.state[p]["step"].dtype == theirs.state[q]["step"].dtype == torch.float64
        assert float(ours.state[p]["step"]) == 3.0
        assert_close(p, q, F32, "param")
    assert all(st["step"].dtype == torch.float64 for st in other.state.values())


# --------------------------------------------------------------------------------- 5. env switches
@pytest.mark.parametrize("value", ["0", "false", "OFF", "No", ""])
def test_disable_ext_off_values_keep_the_extension(value, monkeypatch):
    if not ff.optim.extension_available():
        pytest.skip("extension not built here")
    monkeypatch.setattr(_extension, "_state", {"loaded": None, "error": None})
    monkeypatch.setenv("FASTFORMER_DISABLE_EXT", value)
    assert _extension.load(), _extension._state["error"]


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_disable_ext_on_values_disable(value, monkeypatch):
    monkeypatch.setattr(_extension, "_state", {"loaded": None, "error": None})
    monkeypatch.setenv("FASTFORMER_DISABLE_EXT", value)
    assert not _extension.load()


def test_setup_py_env_flags(monkeypatch):
    """setup.py: FASTFORMER_NO_EXT=0 / FASTFORMER_PORTABLE=0 meant 'set', so the extension was not built
    or built without -march=native. The module runs with setuptools.setup replaced."""
    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    for name in ("FASTFORMER_NO_EXT", "FASTFORMER_PORTABLE"):
        monkeypatch.delenv(name, raising=False)
    mod = runpy.run_path(str(ROOT / "setup.py"))
    flag = mod["_env_flag"]
    for value, on in (("0", False), ("false", False), ("Off", False), ("no", False), ("", False), ("1", True)):
        monkeypatch.setenv("FASTFORMER_NO_EXT", value)
        assert flag("FASTFORMER_NO_EXT") is on, value
        assert bool(mod["_ext_modules_and_cmdclass"]()[0]) is not on, value
    monkeypatch.setenv("FASTFORMER_PORTABLE", "0")
    if os.uname().machine == "x86_64":
        assert "-march=native" in mod["_cxx_flags"]()
    monkeypatch.setenv("FASTFORMER_PORTABLE", "1")
    assert "-march=native" not in mod["_cxx_flags"]()
    # FASTFORMER_CUDA_ARCHS in torch's form: "90a" was written "90.a", which torch rejects
    arch = mod["_torch_arch"]
    assert [arch(a) for a in ("80", "90", "90a", "100", "120f")] == ["8.0", "9.0", "9.0a", "10.0", "12.0f"]
    assert arch("sm_90") is None
    monkeypatch.setenv("FASTFORMER_CUDA_ARCHS", "80, sm_90;90a")  # a bad entry is dropped, not fatal
    assert mod["_cuda_archs"]() == ["80", "90a"]
    # SASS for each architecture and the PTX of the highest plain one, so a newer GPU (sm_100) JIT-compiles
    # it instead of finding no kernel image; "90a" PTX would run on sm_90a only
    assert mod["_gencode"](["80", "90"]) == [
        *("-gencode", "arch=compute_80,code=sm_80"),
        *("-gencode", "arch=compute_90,code=sm_90"),
        *("-gencode", "arch=compute_90,code=compute_90"),
    ]
    assert mod["_gencode"](["80", "90a"])[-1] == "arch=compute_80,code=compute_80"
    assert mod["_gencode"](["90a"]) == ["-gencode", "arch=compute_90a,code=sm_90a"]


@pytest.mark.parametrize("path", ["kernel", "no-extension"])
def test_param_data_replaced_restarts_master_copy(path, request):
    """With master weights the step reads the fp32 copy, not p: after p.data = new values the
    stale copy would silently put the old weights back. It restarts from the new values, keeping
    the moments (like torch, which keeps the state of a same-shape parameter)."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    p = torch.nn.Parameter(torch.randn(20, generator=torch.Generator().manual_seed(8)).bfloat16())
    r = torch.nn.Parameter(p.detach().float())
    ours = ff.optim.FusedAdamW([p], lr=0.01, master_weights=True)
    ref = torch.optim.AdamW([r], lr=0.01)
    for step in range(4):
        if step == 2:
            new = torch.randn(20, generator=torch.Generator().manual_seed(9)).bfloat16()
            p.data, r.data = new.clone(), new.float()
        g = torch.randn(20, generator=torch.Generator().manual_seed(step)).bfloat16()
        p.grad, r.grad = g, g.float()
        ours.step()
        ref.step()
    assert_close(ours.state[p]["master_param"], r, F32, "master")
    assert_close(p, r, torch.bfloat16, "param")


@pytest.mark.parametrize("write", ["copy_", "load_state_dict", "mul_", "data_then_drop_master"])
@pytest.mark.parametrize("path", ["kernel", "no-extension"])
def test_in_place_write_restarts_master_copy(path, write, request):
    """The same for a write into p's own storage between steps (a rollback with
    model.load_state_dict, p.copy_, a pruning mask): the stale fp32 copy would put the old weights back."""
    if path == "no-extension":
        request.getfixturevalue("no_extension")
    model = torch.nn.Linear(5, 4, bias=False).bfloat16()
    p = model.weight
    r = torch.nn.Parameter(p.detach().float())
    ours = ff.optim.FusedAdamW([p], lr=0.01, master_weights=True)
    ref = torch.optim.AdamW([r], lr=0.01)
    for step in range(4):
        if step == 2:
            new = torch.randn(4, 5, generator=torch.Generator().manual_seed(9)).bfloat16()
            with torch.no_grad():
                if write == "copy_":
                    p.copy_(new)
                elif write == "load_state_dict":
                    model.load_state_dict({"weight": new})
                elif write == "data_then_drop_master":  # .data has its own version counter: the
                    p.data.copy_(new)  # documented way out is to drop the stale copy
                    del ours.state[p]["master_param"]
                else:
                    new = p.detach() * (new > 0)
                    p.mul_(new != 0)
                r.data = new.float()
        g = torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).bfloat16()
        p.grad, r.grad = g, g.float()
        ours.step()
        ref.step()
    assert_close(ours.state[p]["master_param"], r, F32, "master")
    assert_close(p, r, torch.bfloat16, "param")


def test_add_param_group_checks_and_adamw_stays_decoupled():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = ff.optim.FusedAdamW([a])
    for bad, name in (({"lr": "0.1"}, "lr"), ({"betas": (0.9,)}, "betas"), ({"betas": (0.9, 1.5)}, "betas")):
        with pytest.raises(ValueError, match=name):
            opt.add_param_group({"params": [b], **bad})
        assert len(opt.param_groups) == 1  # nothing added
    with pytest.raises(RuntimeError, match="fused and foreach"):  # torch's error type, and a ValueError
        ff.optim.FusedAdamW([a], fused=True, foreach=True)
    # AdamW is decoupled: a switch to L2 decay would be undone by the next load_state_dict
    with pytest.raises(ValueError, match="decoupled_weight_decay: FusedAdamW always decouples"):
        ff.optim.FusedAdamW([a], decoupled_weight_decay=False)
    # an Adam checkpoint loaded into AdamW: torch's AdamW keeps the decay decoupled, so must we
    src = torch.optim.Adam([torch.ones(3, requires_grad=True)], weight_decay=0.3)
    src.param_groups[0]["params"][0].grad = torch.ones(3)
    src.step()
    results = []
    for cls in (torch.optim.AdamW, ff.optim.FusedAdamW):
        q = torch.ones(3, requires_grad=True)
        opt = cls([q], weight_decay=0.3)
        opt.load_state_dict(copy.deepcopy(src.state_dict()))
        assert opt.param_groups[0]["decoupled_weight_decay"] is True
        q.grad = torch.zeros(3)
        opt.step()
        results.append(q.detach())
    assert torch.equal(results[0], results[1])


# ------------------------------------------------------------------ 6. autograd sees the kernel's writes
@pytest.mark.parametrize("cls", [torch.optim.Adam, ff.optim.FusedAdam, ff.optim.FusedAdamW])
def test_step_between_forward_and_backward_is_caught_as_torch_does(cls):
    """The kernel writes parameters through raw pointers; without a version bump a backward through a
    graph that saved the parameter before step() silently used the updated weights."""
    if cls is not torch.optim.Adam and not ff.optim.extension_available():
        pytest.skip("extension not built here")
    w = torch.nn.Parameter(torch.randn(3, 3))
    opt = cls([w], lr=0.1)
    x = torch.randn(2, 3, requires_grad=True)
    w.grad = torch.ones(3, 3)
    y = (x @ w).sum()  # saves w for x's gradient
    v0 = w._version
    opt.step()
    assert w._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_scaled_step_bumps_the_unscaled_grads_version():
    """Under GradScaler the kernel unscales the gradients in place: their version moves too."""
    if not ff.optim.extension_available():
        pytest.skip("extension not built here")
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = ff.optim.FusedAdam([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((w * w).sum()).backward()
    v_grad, v_w = w.grad._version, w._version
    scaler.step(opt)
    assert w.grad._version > v_grad and w._version > v_w
