"""FusedAdam / FusedAdamW over the compiled extension (csrc/), step-for-step equal to torch.optim.Adam/AdamW.

One optimizer step is one operator call per device (`torch.ops.fastformer.adam_step`) covering every
tensor of every parameter group: on CPU one OpenMP loop, on CUDA one kernel launch. Hyper-parameters
travel as one row of 8 numbers per group (`_group_row`); the operator increments each tensor's step
and computes its bias corrections in double precision, as torch's single-tensor Adam does in Python.

State layout is torch's: per parameter 'step' (fp32 scalar tensor on CPU), 'exp_avg', 'exp_avg_sq',
'max_exp_avg_sq' (amsgrad) and, with master_weights=True for fp16/bf16 parameters, 'master_param'
(fp32; exp_avg/exp_avg_sq are then fp32 too). param_groups carry torch's keys plus 'master_weights'.
"""

from __future__ import annotations

from itertools import chain

import torch
from torch.optim import Optimizer
from torch.optim.adam import adam as _torch_adam

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
    """The tensors of one device that go to one extension call."""

    def __init__(self):
        self.params, self.grads, self.exp_avgs, self.exp_avg_sqs = [], [], [], []
        self.max_exp_avg_sqs, self.masters, self.steps, self.tensor_group = [], [], [], []


class FusedAdam(Optimizer):
    """torch.optim.Adam with a fused C++/CUDA step.

    Args as torch.optim.Adam (params, lr float or 1-element tensor, betas, eps, weight_decay,
    amsgrad, maximize, decoupled_weight_decay), plus master_weights: keep an fp32 copy of fp16/bf16
    parameters (and fp32 moments) in the state and write the parameter back rounded. Without it,
    low-precision parameters are updated in fp32 math and stored rounded.
    capturable / differentiable are not supported; foreach / fused are accepted and ignored.
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
        if torch.is_tensor(lr) and lr.numel() != 1:
            raise ValueError("lr: a tensor lr must have one element")
        if not 0.0 <= _to_float(lr):
            raise ValueError(f"lr: invalid learning rate {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"eps: invalid epsilon value {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= _to_float(b) < 1.0:
                raise ValueError(f"betas: invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"weight_decay: invalid value {weight_decay}")
        if capturable or differentiable:
            raise ValueError("capturable / differentiable: not supported by FusedAdam (use torch.optim.Adam)")
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

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = {}
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
        """torch's load, except that 'step' is kept as an fp32 CPU scalar and the fp32 state of
        fp16/bf16 parameters (master weights, moments) is not cast down to the parameter dtype."""
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
                st["step"] = torch.tensor(_to_float(st["step"]), dtype=torch.float32)
            for k, v in keep.get(p, {}).items():
                st[k] = v.to(device=p.device, dtype=torch.float32, copy=True)

    # -- the step ------------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict, master: bool) -> dict:
        state = self.state[p]
        sdtype = torch.float32 if master else p.dtype
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=sdtype, memory_format=torch.preserve_format)
        if master:  # moments loaded from torch's Adam are in the parameter's dtype: master weights keep fp32
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                if key in state and state[key].dtype != torch.float32:
                    state[key] = state[key].to(torch.float32)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg_sq"], memory_format=torch.preserve_format)
        if master and "master_param" not in state:
            state["master_param"] = p.detach().to(torch.float32, copy=True)
        if state["step"].device.type != "cpu":
            state["step"] = state["step"].to("cpu", torch.float32)
        return state

    @staticmethod
    def _kernel_ok(p: torch.Tensor, state: dict, amsgrad: bool, master: bool) -> bool:
        """Whether the extension takes this parameter and its state (checked once, then cached)."""
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
        # 2. Validate everything before any state changes.
        for group in self.param_groups:
            for p in group["params"]:
                g = p.grad
                if g is not None and (g.is_sparse or p.is_complex()):
                    raise ValueError(
                        f"{type(self).__name__}: "
                        + (
                            "sparse gradients are not supported (param.grad is sparse); use torch.optim.SparseAdam"
                            if g.is_sparse
                            else "complex parameters are not supported"
                        )
                    )
        # 3. Sort tensors into one extension call per device, or torch's path where no kernel fits.
        #    The per-parameter checks are cached (self._plan) so a step costs little Python time.
        plan = self.__dict__.setdefault("_plan", {})
        buckets: dict[torch.device, _Bucket] = {}
        fallback: list[tuple[dict, list]] = []
        for gi, group in enumerate(self.param_groups):
            amsgrad, mw = bool(group["amsgrad"]), bool(group["master_weights"])
            slow = []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                entry = plan.get(p)
                if entry is None or entry[0] != amsgrad or entry[1] != mw:
                    master = mw and p.dtype in _LOW_PRECISION
                    state = self._init_state(p, group, master)
                    entry = plan[p] = (amsgrad, mw, master, self._kernel_ok(p, state, amsgrad, master), state)
                _, _, master, ok, state = entry
                if not (ok and g.dtype == p.dtype and g.is_contiguous()):
                    slow.append(p)
                    continue
                b = buckets.get(p.device)
                if b is None:
                    b = buckets[p.device] = _Bucket()
                v = state["exp_avg_sq"]
                b.params.append(p)
                b.grads.append(g)
                b.exp_avgs.append(state["exp_avg"])
                b.exp_avg_sqs.append(v)
                b.max_exp_avg_sqs.append(state["max_exp_avg_sq"] if amsgrad else v)
                b.masters.append(state["master_param"] if master else p)
                b.steps.append(state["step"])
                b.tensor_group.append(2 * gi + int(master))
            if slow:
                fallback.append((group, slow))
        # 4. One fused call per device: every tensor, every group. The operator increments each
        #    tensor's step and derives its bias corrections from its group's row.
        if buckets:
            rows = [x for group in self.param_groups for x in _group_row(group)]
        for device, b in buckets.items():
            gs = None if grad_scale is None else grad_scale.to(device=device, dtype=torch.float32)
            torch.ops.fastformer.adam_step(
                b.params,
                b.grads,
                b.exp_avgs,
                b.exp_avg_sqs,
                b.max_exp_avg_sqs,
                b.masters,
                b.steps,
                b.tensor_group,
                rows,
                gs,
            )
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
        return loss

    def _fallback_step(self, group: dict, params: list, grad_scale) -> None:
        """torch's single-tensor Adam on the same state (it increments 'step' itself)."""
        ps, gs, ms, vs, vmaxs, steps, masters = [], [], [], [], [], [], []
        for p in params:
            state = self.state[p]
            g = p.grad
            if grad_scale is not None:
                g.div_(grad_scale.to(device=g.device, dtype=g.dtype))
            master = "master_param" in state and bool(group["master_weights"])
            ps.append(state["master_param"] if master else p)
            gs.append(g.to(ps[-1].dtype))
            ms.append(state["exp_avg"])
            vs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                vmaxs.append(state["max_exp_avg_sq"])
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
        for p, src, master in zip(params, ps, masters):
            if master:
                p.copy_(src)


class FusedAdamW(FusedAdam):
    """torch.optim.AdamW with a fused C++/CUDA step (decoupled weight decay, default 1e-2).
    Same arguments as FusedAdam."""

    _default_decoupled = True

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
