"""FusedAdam / FusedAdamW over the compiled extension (csrc/), step-for-step equal to torch.optim.Adam/AdamW.

One optimizer step is one operator call per device (`torch.ops.fastformer.adam_step`) covering every
tensor of every parameter group: on CPU one OpenMP loop, on CUDA one kernel launch. Hyper-parameters
travel as one row of 8 numbers per group (`_group_row`); the operator increments each tensor's step
and computes its bias corrections in double precision, as torch's single-tensor Adam does in Python.

State layout is torch's: per parameter 'step' (a CPU scalar tensor, fp32 or fp64 under
torch.set_default_dtype(torch.float64), as torch makes it), 'exp_avg', 'exp_avg_sq',
'max_exp_avg_sq' (amsgrad) and, with master_weights=True for fp16/bf16 parameters, 'master_param'
(fp32; exp_avg/exp_avg_sq are then fp32 too). param_groups carry torch's keys plus 'master_weights'.
"""

from __future__ import annotations

import numbers
from itertools import chain

import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam
from torch.optim.optimizer import _get_scalar_dtype

from . import _ext

_LOW_PRECISION = (torch.float16, torch.bfloat16)
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def extension_available(device=None) -> bool:
    """True when the compiled extension is loaded and has kernels for `device` (default: "cuda" when a
    GPU is present, else "cpu"); False means torch's implementation is used there instead."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return _ext.supports(torch.device(device))


def _to_float(x) -> float:
    return float(x.item()) if torch.is_tensor(x) else float(x)


def _check_number(name: str, x) -> None:
    """ValueError naming the argument unless x is a real number or a 1-element real tensor (torch
    fails on lr="0.1" only later, comparing a str with a float; the kernel row needs a float)."""
    if torch.is_tensor(x):
        if x.numel() != 1 or x.is_complex():
            raise ValueError(f"{name}: a tensor {name} must have one real element")
    elif not isinstance(x, numbers.Real):
        raise ValueError(f"{name}: must be a number or a 1-element tensor, got {type(x).__name__} {x!r}")


def _check_betas(betas) -> None:
    """betas: two numbers in [0, 1); a wrong length would only fail at the first step otherwise."""
    try:
        n = len(betas)
    except TypeError:
        raise ValueError(f"betas: must be a pair (beta1, beta2), got {betas!r}") from None
    if n != 2:
        raise ValueError(f"betas: must be a pair (beta1, beta2), got {n} values: {betas!r}")
    for i, b in enumerate(betas):
        _check_number(f"betas[{i}]", b)
        if not 0.0 <= _to_float(b) < 1.0:
            raise ValueError(f"betas: invalid beta parameter at index {i}: {b}")


def _check_hyper(group: dict) -> None:
    """ValueError naming the argument for a bad lr, betas, eps or weight_decay (the constructor's
    arguments, or a group given to add_param_group)."""
    for name in ("lr", "eps", "weight_decay"):
        _check_number(name, group[name])
    if not 0.0 <= _to_float(group["lr"]):
        raise ValueError(f"lr: invalid learning rate {group['lr']}")
    if not 0.0 <= _to_float(group["eps"]):
        raise ValueError(f"eps: invalid epsilon value {group['eps']}")
    _check_betas(group["betas"])
    if not 0.0 <= _to_float(group["weight_decay"]):
        raise ValueError(f"weight_decay: invalid value {group['weight_decay']}")


class _ConflictError(ValueError, RuntimeError):
    """Options that cannot go together: a ValueError, and the RuntimeError torch raises for them."""


def _step_tensor(value) -> torch.Tensor:
    """A loaded 'step' as a fresh CPU scalar: fp32 or fp64 as saved (torch keeps the saved dtype),
    otherwise (a Python number from an old checkpoint) torch's default scalar dtype."""
    dtype = value.dtype if torch.is_tensor(value) and value.dtype in (torch.float32, torch.float64) else None
    return torch.tensor(_to_float(value), dtype=dtype or _get_scalar_dtype())


def _master_is_fp32_copy(master, p: torch.Tensor) -> bool:
    """Whether a loaded state["master_param"] can be p's master copy: fp32, p's shape. A checkpoint that
    went through torch's Adam carries the key cast to p's dtype (and no longer updated)."""
    return torch.is_tensor(master) and master.dtype == torch.float32 and master.shape == p.shape


def _master_is_current(master, p: torch.Tensor) -> bool:
    """Whether state["master_param"] is still the fp32 copy of p (it rounds to p's values): checked when
    the step plan is built, i.e. at the first step after a load, once the model's weights are loaded
    too (whichever was loaded first), after p.data was replaced, or after p was written in place."""
    return _master_is_fp32_copy(master, p) and torch.equal(master.to(device=p.device, dtype=p.dtype), p.detach())


def _unscale(g: torch.Tensor, grad_scale: torch.Tensor) -> torch.Tensor:
    """Divide g by the GradScaler scale in fp32 (float64 for float64) and write the result back (as
    torch's fused Adam does); returns the quotient. The scale (e.g. 65536) is inf in fp16, so dividing in g's
    dtype would zero an fp16 gradient."""
    wide = torch.promote_types(g.dtype, torch.float32)  # float64 stays float64
    g32 = g.to(wide) / grad_scale.to(device=g.device, dtype=wide)
    g.copy_(g32)
    return g32


def _group_row(group: dict) -> list[float]:
    """The 8 numbers per parameter group the operator reads (csrc/adam_host.h, kGroupRow); the
    per-tensor bias corrections are derived from them and each tensor's step in C++."""
    beta1, beta2 = group["betas"]
    return [
        _to_float(group["lr"]),
        _to_float(beta1),
        _to_float(beta2),
        float(group["eps"]),
        float(group["weight_decay"]),
        float(bool(group["decoupled_weight_decay"])),
        float(bool(group["maximize"])),
        float(bool(group["amsgrad"])),
    ]


class _Bucket:
    """The tensors of one device that go to one extension call: one row per tensor, (param, grad,
    exp_avg, exp_avg_sq, max_exp_avg_sq, master, step, group code), turned into the operator's
    lists at call time (one append per tensor in the step's hot loop instead of eight)."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.wide_steps = False  # some 'step' is fp64 (torch.set_default_dtype(torch.float64))

    def calls(self) -> list[list[tuple]]:
        """The operator's argument lists, once per call. Usually one call; a parameter listed twice
        in its group (torch allows it, with a warning) goes to one call per occurrence: torch steps
        it twice in sequence, while in one call both entries would share the state (a data race
        across threads, and both would see the step count already advanced)."""
        cols = list(zip(*self.rows))
        if len(set(map(id, cols[0]))) == len(cols[0]):
            return [cols]
        rounds: list[list[tuple]] = []
        seen: dict[int, int] = {}
        for row in self.rows:
            r = seen[id(row[0])] = seen.get(id(row[0]), -1) + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append(row)
        return [list(zip(*rows)) for rows in rounds]


class FusedAdam(Optimizer):
    """torch.optim.Adam with a fused C++/CUDA step.

    Args as torch.optim.Adam (params, lr float or 1-element tensor, betas, eps, weight_decay,
    amsgrad, maximize, decoupled_weight_decay), plus master_weights: keep an fp32 copy of fp16/bf16
    parameters (and fp32 moments) in the state and write the parameter back rounded. Without it,
    low-precision parameters are updated in fp32 math and stored rounded.
    capturable / differentiable, sparse gradients and complex parameters are not supported (step()
    raises ValueError for the latter two); foreach / fused are accepted and ignored.
    Works under torch.amp.GradScaler (the unscale happens inside the step; a step whose gradients
    have an inf/NaN changes nothing, including the step count).
    """

    _default_decoupled = False

    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        *,
        maximize=False,
        master_weights=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=None,
    ):
        if decoupled_weight_decay is None:
            decoupled_weight_decay = self._default_decoupled
        _check_hyper(dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        if capturable or differentiable:
            raise ValueError("capturable / differentiable: not supported by FusedAdam (use torch.optim.Adam)")
        if fused and foreach:  # torch refuses the pair too (RuntimeError)
            raise _ConflictError("fused and foreach cannot be True together")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            foreach=foreach,
            capturable=False,
            differentiable=False,
            fused=None,
            decoupled_weight_decay=bool(decoupled_weight_decay),
            master_weights=bool(master_weights),
        )
        super().__init__(params, defaults)
        # GradScaler: hand us grad_scale / found_inf instead of unscaling and checking itself.
        self._step_supports_amp_scaling = True
        if not _ext.load():
            _ext.warn_fallback(type(self).__name__)

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, with the constructor's checks on the group's own lr, betas, eps and
        weight_decay (torch takes lr="0.1" or betas=(0.9, 1.5) there and fails, or diverges, later)."""
        super().add_param_group(param_group)
        try:
            _check_hyper(self.param_groups[-1])
        except ValueError:
            del self.param_groups[-1]  # nothing added
            raise
        self.param_groups[-1]["betas"] = tuple(self.param_groups[-1]["betas"])

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = {}
        self._master_versions = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)
            group.setdefault("decoupled_weight_decay", self._default_decoupled)
            group.setdefault("master_weights", self.defaults.get("master_weights", False))

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict):
        """torch's load, except that 'step' is kept as a CPU scalar (fp32, or fp64 as saved), the fp32
        state of fp16/bf16 parameters (master weights, moments) is not cast down to the parameter
        dtype, and a master copy that is not fp32 is dropped; one that no longer rounds to the
        parameter at the next step (checked then, so the model may be loaded after the optimizer) is
        rebuilt from the parameter."""
        keep = {}
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for sid, p in zip(saved_ids, params):
            st = state_dict["state"].get(sid)
            if st and p.dtype in _LOW_PRECISION:
                keep[p] = {
                    k: v for k, v in st.items() if k != "step" and torch.is_tensor(v) and v.dtype == torch.float32
                }
        super().load_state_dict(state_dict)
        self._plan = {}
        for p, st in self.state.items():
            if "step" in st:
                st["step"] = _step_tensor(st["step"])
            for k, v in keep.get(p, {}).items():
                st[k] = v.to(device=p.device, dtype=torch.float32, copy=True)
            if "master_param" in st and not _master_is_fp32_copy(st["master_param"], p):
                del st["master_param"]  # its values are compared with p's at the first step (_init_state)

    # -- the step ------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict, master: bool) -> dict:
        """p's state as the step needs it (run when its plan entry is built): torch's fresh moments
        and step, fp32 moments and an fp32 copy of p with master weights, 'step' on the CPU."""
        state = self.state[p]
        sdtype = torch.float32 if master else p.dtype
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())  # fp64 under default fp64, as torch
            state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        if master:  # moments loaded from torch's Adam are in the parameter's dtype: master weights keep fp32
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state and state[key].dtype != torch.float32:
                    state[key] = state[key].to(torch.float32)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        if master and "master_param" in state and not _master_is_current(state["master_param"], p):
            del state["master_param"]  # p.data was replaced: the step continues from the new values
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        if state["step"].device.type != "cpu":
            state["step"] = state["step"].to("cpu")
        return state

    def _check_param(self, p: torch.Tensor) -> None:
        """ValueError for a parameter the step cannot take (checked before its plan entry is built):
        complex, or state of another shape (p.data was replaced; torch fails inside its step)."""
        if p.is_complex():
            raise ValueError(f"{type(self).__name__}: complex parameters are not supported")
        state = self.state.get(p) or {}
        for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param"):
            if torch.is_tensor(state.get(k)) and state[k].shape != p.shape:
                raise ValueError(
                    f"params: a parameter of shape {tuple(p.shape)} has optimizer state {k!r} of shape "
                    f"{tuple(state[k].shape)} (p.data was replaced; reset opt.state[p] to start it afresh)"
                )

    def _plan_entry(self, p: torch.Tensor, group: dict, key: tuple) -> tuple:
        """Initialise p's state and decide once whether the extension takes it; the entry is reused
        while its key and state dict stay the same (checked every step in `_sort`)."""
        amsgrad, mw = key[-2:]
        master = bool(mw and p.dtype in _LOW_PRECISION)
        state = self._init_state(p, group, master)
        wide = state["step"].dtype != torch.float32
        return key, state, master, self._kernel_ok(p, state, amsgrad, master), wide, p.device

    @staticmethod
    def _kernel_ok(p: torch.Tensor, state: dict, amsgrad: bool, master: bool) -> bool:
        """Whether the extension takes this parameter and its state (cached in the step plan)."""
        m, v = state["exp_avg"], state["exp_avg_sq"]
        tensors = (
            [p, m, v] + ([state["max_exp_avg_sq"]] if amsgrad else []) + ([state["master_param"]] if master else [])
        )
        return (
            _ext.supports(p.device)
            and p.dtype in _KERNEL_DTYPES
            and m.dtype == v.dtype
            and m.dtype in (torch.float32, p.dtype)
            and (not master or m.dtype == torch.float32)
            and (not amsgrad or state["max_exp_avg_sq"].dtype == m.dtype)
            and all(t.is_contiguous() and t.device == p.device for t in tensors)
        )

    @torch.no_grad()
    def step(self, closure=None):
        """One Adam step over every parameter with a gradient. closure: re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # 1. GradScaler (set by scaler.step): skip the whole step when any gradient was inf/NaN.
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and _to_float(found_inf) != 0.0:
            return loss
        # 2. Sort tensors into one extension call per device, or torch's path where no kernel fits
        #    (_sort). Nothing changes until every gradient is checked: parameters without a valid
        #    cached entry are only collected on the first pass; their entries (which initialise state)
        #    are built after that, and a second pass sorts them in.
        plan = self.__dict__.setdefault("_plan", {})
        buckets, fallback, stale, masters = self._sort(plan, build=False)
        if stale:
            for p, _, _ in stale:
                self._check_param(p)
            buckets, fallback, _, masters = self._sort(plan, build=True)
        # 3. One fused call per device: every tensor, every group. The operator increments each
        #    tensor's step and derives its bias corrections from its group's row.
        if buckets:
            rows = [x for group in self.param_groups for x in _group_row(group)]
        for device, b in buckets.items():
            gs = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
            for r, cols in enumerate(b.calls()):
                self._kernel_call(cols, b.wide_steps, rows, gs if r == 0 else None)  # later: grads unscaled
        if fallback:
            if _ext.load():
                kinds = sorted({f"{p.dtype} on {p.device.type}" for _, params in fallback for p in params})
                _ext.warn_fallback(
                    f"{type(self).__name__} (for those parameters)",
                    why="the extension has no kernel for some parameters "
                    f"({', '.join(kinds)}, or non-contiguous / mixed-dtype state)",
                )
            for group, params in fallback:
                self._fallback_step(group, params, grad_scale)
        # 4. The versions of the parameters with a master copy as this step left them: a later
        #    in-place write (not the optimizer's) is then seen at the next step (_sort).
        versions = self.__dict__.setdefault("_master_versions", {})
        for p in masters:
            versions[id(p)] = p._version
        return loss

    def _sort(self, plan: dict, build: bool) -> tuple[dict, list, list, list]:
        """The step's tensors: a _Bucket per device for the extension, (group, params) lists for
        torch's path, the (param, group, key) whose cached entry is missing or stale, and the sorted
        parameters that have a master copy; with build=True those entries are built here
        (initialising state) and sorted in. Raises
        ValueError for a sparse gradient before anything changes.

        The per-parameter checks are cached (plan, by id(p)) so a step costs little Python time.
        An entry is rebuilt when its state dict was replaced or emptied (opt.state.clear(), a new
        opt.state, del opt.state[p]: torch then starts afresh), when p.data was replaced (pointer,
        dtype, shape or strides differ), when the group's amsgrad / master_weights changed, or, for a
        parameter with a master copy, when p was written in place since the last step (its version
        counter moved: model.load_state_dict, p.copy_, a pruning mask), so that the copy is checked
        against p's values again. The
        state identity check also makes a reused id(p) safe. The device needs no check: tensors on
        different devices never share an address while both are alive."""
        states = self.state
        versions = self.__dict__.setdefault("_master_versions", {})
        masters: list[torch.Tensor] = []
        buckets: dict[torch.device, _Bucket] = {}
        fallback: list[tuple[dict, list]] = []
        stale: list[tuple] = []
        for gi, group in enumerate(self.param_groups):
            amsgrad, mw = bool(group["amsgrad"]), bool(group["master_weights"])
            slow = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError(
                        f"{type(self).__name__}: sparse gradients are not supported (param.grad is sparse); "
                        "use torch.optim.SparseAdam"
                    )
                dtype = p.dtype
                key = (p.data_ptr(), dtype, p.shape, p.stride(), amsgrad, mw)  # inline: the hot path
                entry = plan.get(id(p))
                if (
                    entry is None
                    or entry[0] != key
                    or not entry[1]
                    or states.get(p) is not entry[1]
                    or (entry[2] and (versions.get(id(p)) != p._version or "master_param" not in entry[1]))
                ):
                    if not build:
                        stale.append((p, group, key))
                        continue
                    entry = plan[id(p)] = self._plan_entry(p, group, key)
                _, state, master, ok, wide, device = entry
                if master:
                    masters.append(p)
                if not (ok and g.dtype == dtype and g.is_contiguous()):
                    slow.append(p)
                    continue
                b = buckets.get(device)
                if b is None:
                    b = buckets[device] = _Bucket()
                if wide:
                    b.wide_steps = True
                v = state["exp_avg_sq"]
                b.rows.append(
                    (
                        p,
                        g,
                        state["exp_avg"],
                        v,
                        state["max_exp_avg_sq"] if amsgrad else v,
                        state["master_param"] if master else p,
                        state["step"],
                        2 * gi + master,
                    )
                )
            if slow:
                fallback.append((group, slow))
        return buckets, fallback, stale, masters

    @staticmethod
    def _kernel_call(cols: list[tuple], wide_steps: bool, rows: list[float], grad_scale) -> None:
        """One torch.ops.fastformer.adam_step over a bucket's lists (_Bucket.calls). The operator
        counts steps in fp32; fp64 step tensors (torch's under a float64 default dtype) go through
        fp32 copies."""
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps, tensor_group = cols
        steps32 = [s.to(torch.float32) for s in steps] if wide_steps else steps
        torch.ops.fastformer.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps32, tensor_group, rows, grad_scale
        )
        # the operator writes through raw pointers, which autograd does not see: bump the versions as
        # torch's in-place ops do, so a backward through a graph that saved a parameter (or a gradient,
        # which the unscale rewrote) before this step raises instead of using the new values
        _ext.bump_versions(params if grad_scale is None else params + grads)
        if wide_steps:
            for s, s32 in zip(steps, steps32):
                if s is not s32:
                    s.copy_(s32)

    def _fallback_step(self, group: dict, params: list, grad_scale) -> None:
        """torch's single-tensor Adam on the same state (it increments 'step' itself, and steps a
        parameter listed twice twice, in sequence, as torch does). fp16/bf16 tensors are stepped in
        fp32 copies and written back rounded, as the kernels do: in fp16 itself eps=1e-8 is 0 and
        a small gradient's square underflows, so the update would be inf."""
        ps, gs, ms, vs, vmaxs, steps, masters = [], [], [], [], [], [], []
        unscaled: dict[int, torch.Tensor] = {}  # id(grad) -> fp32 unscaled grad: each grad once
        work: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(stored) -> (stored, fp32 copy)

        def up(t: torch.Tensor) -> torch.Tensor:  # one copy per tensor, shared by repeated params
            if t.dtype not in _LOW_PRECISION:
                return t
            if id(t) not in work:
                work[id(t)] = (t, t.to(torch.float32))
            return work[id(t)][1]

        for p in params:
            state = self.state[p]
            g = p.grad
            if grad_scale is not None:
                if id(g) not in unscaled:
                    unscaled[id(g)] = _unscale(g, grad_scale)
                g = unscaled[id(g)]
            master = "master_param" in state and bool(group["master_weights"])
            ps.append(up(state["master_param"] if master else p))
            gs.append(g.to(ps[-1].dtype))
            ms.append(up(state["exp_avg"]))
            vs.append(up(state["exp_avg_sq"]))
            if group["amsgrad"]:
                vmaxs.append(up(state["max_exp_avg_sq"]))
            steps.append(state["step"])
            masters.append(master)
        beta1, beta2 = group["betas"]
        _torch_adam(
            ps,
            gs,
            ms,
            vs,
            vmaxs,
            steps,
            foreach=False,
            capturable=False,
            differentiable=False,
            fused=False,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            amsgrad=bool(group["amsgrad"]),
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=bool(group["maximize"]),
        )
        for stored, copy in work.values():
            stored.copy_(copy)
        for p, src, master in zip(params, ps, masters):
            if master:
                p.copy_(src)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW with a fused C++/CUDA step (decoupled weight decay, default 1e-2).
    Same arguments as FusedAdam."""

    _default_decoupled = True

    def __setstate__(self, state):
        """As torch.optim.AdamW: weight decay stays decoupled, also after loading an Adam checkpoint
        (whose groups say decoupled_weight_decay=False)."""
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    # explicit keywords (not **kw) so that inspect.signature / IDEs show master_weights and the rest
    def __init__(
        self,
        params,
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=1e-2,
        amsgrad=False,
        *,
        maximize=False,
        master_weights=False,
        foreach=None,
        capturable=False,
        differentiable=False,
        fused=None,
        decoupled_weight_decay=True,
    ):
        if not decoupled_weight_decay:  # AdamW's decay is decoupled (torch's AdamW has no such switch)
            raise ValueError(
                "decoupled_weight_decay: FusedAdamW always decouples weight decay; use FusedAdam for L2 decay"
            )
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            master_weights=master_weights,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=decoupled_weight_decay,
        )
