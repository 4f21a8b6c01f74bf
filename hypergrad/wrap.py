"""``hg.wrap``: learn the learning rate of an existing optimizer instance.

For an optimizer whose update is proportional to its learning rate, ``x_s = x_{s-1} + lr_s D_s``
with ``D_s`` independent of ``lr_s``, the one-step hyper-gradient needs nothing but the update
that was actually applied:

    d f_t / d lr  =  < g_t , D_s >  =  < g_t , x_s - x_{s-1} > / lr_s .

So the wrapper keeps one copy of the parameters from before the previous step (one
parameter-sized buffer) and works with any implementation of the optimizer (for-loop, foreach,
fused, third-party).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .core import Hyper, HyperOptimizer, HyperVar, _TRANSFORMS, _fmt, _opaque_to_dynamo, drive, hyper_dtype

__all__ = ["wrap", "WrappedOptimizer", "PROPORTIONAL"]

# Optimizers whose update is lr * (something independent of lr), weight decay included
# (exact classes: a subclass may change the update, so it needs assume_proportional=True).
PROPORTIONAL = {
    "torch.optim.SGD", "torch.optim.Adam", "torch.optim.AdamW", "torch.optim.NAdam", "torch.optim.RAdam",
    "torch.optim.Adamax", "torch.optim.RMSprop", "torch.optim.Adadelta", "torch.optim.Adagrad",
    "torch.optim.Muon", "lion_pytorch.Lion", "pytorch_optimizer.Lion", "pytorch_optimizer.Adan",
    "pytorch_optimizer.Yogi",
}
# ... and those whose update is not, with the reason.
NOT_PROPORTIONAL = {
    "torch.optim.LBFGS": "its line search and curvature pairs make the step a non-linear function of lr",
    "torch.optim.Rprop": "its step sizes start at lr and are clipped to step_sizes, so the update is not "
                         "lr times a fixed direction",
    "torch.optim.ASGD": "its step size eta = lr / (1 + lambd lr t)^alpha is not proportional to lr",
    "torch.optim.Adafactor": "its relative step min(lr, 1/sqrt(t)) is not proportional to lr (use hg.Adafactor)",
    "torch.optim.SparseAdam": "its gradients are sparse, which the hyper-gradient does not support",
}


def _resolve(name: str):
    mod, _, attr = name.rpartition(".")
    try:
        return getattr(__import__(mod, fromlist=[attr]), attr)
    except (ImportError, AttributeError):
        return None


def _lookup(table, optimizer):
    for name in table:
        cls = _resolve(name)
        if cls is not None and type(optimizer) is cls:
            return name
    return None


_LR = Hyper("lr", "lr", bounds=(1e-12, None), auto_reparam="log", doc="learning rate")


def _qualname(obj) -> str:
    t = type(obj)
    return f"{t.__module__}.{t.__qualname__}"


def wrap(optimizer: torch.optim.Optimizer, hyper: HyperOptimizer, *, scope: str = "group",
         bounds: tuple | None = None, reparam: str | None = None,
         assume_proportional: bool = False) -> "WrappedOptimizer":
    """Learn the learning rate of ``optimizer`` (any ``torch.optim.Optimizer`` instance whose
    update is proportional to its lr) with the hyper level ``hyper``.

    ``scope`` is ``"group"`` (one lr per param group) or ``"shared"`` (one for all groups).
    ``bounds=(lo, hi)`` projects the learned lr (default ``(1e-12, inf)``: an lr of exactly 0
    applies no update and so reveals no hyper-gradient); ``reparam="log"`` learns ``log lr``.
    Optimizers not known to qualify are refused unless ``assume_proportional=True``.
    The returned object has the face of a hypergrad optimizer: ``step``, ``zero_grad``,
    ``param_groups``, ``hyperparameters()``, ``hypergradients()``, ``state_dict()``, ``hyper``.
    """
    return WrappedOptimizer(optimizer, hyper, scope=scope, bounds=bounds, reparam=reparam,
                            assume_proportional=assume_proportional)


class WrappedOptimizer:
    """An existing optimizer whose learning rate is learned by hyper-gradient descent
    (see :func:`wrap`)."""

    def __init__(self, optimizer, hyper, *, scope="group", bounds=None, reparam=None,
                 assume_proportional=False):
        if isinstance(optimizer, (HyperOptimizer, WrappedOptimizer)):
            raise TypeError("hg.wrap: this is already a hypergrad optimizer; pass hyper= to its "
                            "constructor instead")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"hg.wrap expects a torch.optim.Optimizer instance, got {type(optimizer).__name__}")
        bad = _lookup(NOT_PROPORTIONAL, optimizer)
        if bad is not None:
            raise ValueError(f"hg.wrap cannot learn the lr of {bad}: {NOT_PROPORTIONAL[bad]}")
        if _lookup(PROPORTIONAL, optimizer) is None and not assume_proportional:
            raise ValueError(f"hg.wrap: {_qualname(optimizer)} is not known to apply an update proportional to its lr; "
                             f"if it does (x_new = x + lr * D with D independent of lr), pass "
                             f"assume_proportional=True")
        if not isinstance(hyper, HyperOptimizer):
            raise TypeError("hg.wrap needs hyper=, a hypergrad optimizer constructed without params "
                            "(e.g. hg.SGD(lr=1e-4))")
        if hyper._hg_bound:
            raise ValueError("hyper level is already in use by another optimizer")
        if scope not in ("group", "shared"):
            raise ValueError(f"hg.wrap: scope must be 'group' or 'shared' (one lr per param group of the "
                             f"wrapped optimizer), got {scope!r}")
        if reparam not in (None, "log"):
            raise ValueError(f"hg.wrap: reparam must be None or 'log', got {reparam!r}")
        for g in optimizer.param_groups:
            for p in g["params"]:
                if p.is_complex():
                    raise TypeError("hg.wrap: complex parameters are not supported")
        self.optimizer = optimizer
        self._hg_hyper = hyper
        self._hg_learn = ("lr",)
        self._scope = scope
        self._transform = _TRANSFORMS[reparam]
        lo, hi = _LR.default_bounds()
        if bounds is not None:
            lo = lo if bounds[0] is None else float(bounds[0])
            hi = hi if bounds[1] is None else float(bounds[1])
        self._bounds = (lo, hi)
        self._hg_vars: list[dict[str, HyperVar]] = []
        self._written: list[float] = []
        self._prev: dict[Tensor, Tensor] = {}
        self._lr_used: list[Tensor | None] = []
        self.hyper_steps_skipped = 0
        self.steps_skipped = 0
        self._hg_t = 0
        self._hg_step_id = 0
        self._hg_clip = None
        self._hg_shard_group = None
        self._hg_skip_nonfinite = True
        self._hg_ok = True
        self._hg_covered: set[int] = set()
        self._step_pre_hooks: OrderedDict = OrderedDict()
        self._step_post_hooks: OrderedDict = OrderedDict()
        for g in optimizer.param_groups:
            self._add_group(g)
        hyper._hg_bind(self)

    # ------------------------------------------------------------- the optimizer's face
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    @property
    def hyper(self):
        return self._hg_hyper

    @property
    def below(self):
        return None

    @property
    def levels(self):
        out = [self]
        while out[-1].hyper is not None:
            out.append(out[-1].hyper)
        return out

    @property
    def learned(self):
        return self._hg_learn

    def zero_grad(self, set_to_none: bool = True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group):
        self.optimizer.add_param_group(param_group)
        self._add_group(self.optimizer.param_groups[-1])
        self._hg_hyper._hg_attach(self, [self._hg_vars[-1]])

    def hyperparameters(self, group: int = 0):
        self._hg_sync()
        return {"lr": self._hg_vars[group]["lr"].entry()}

    def hypergradients(self, group: int = 0):
        return {"lr": self._hg_vars[group]["lr"].grad[0]}

    def __repr__(self):
        return f"hg.wrap({self.optimizer!r}, hyper={type(self._hg_hyper).__name__})"

    def register_step_pre_hook(self, hook):
        """As torch.optim.Optimizer's: ``hook(optimizer, args, kwargs)`` before each step; it
        may return new ``(args, kwargs)``."""
        handle = RemovableHandle(self._step_pre_hooks)
        self._step_pre_hooks[handle.id] = hook
        return handle

    def register_step_post_hook(self, hook):
        """As torch.optim.Optimizer's: ``hook(optimizer, args, kwargs)`` after each step."""
        handle = RemovableHandle(self._step_post_hooks)
        self._step_post_hooks[handle.id] = hook
        return handle

    def step(self, closure=None):
        args, kwargs = (), {"closure": closure}
        for hook in list(self._step_pre_hooks.values()):
            res = hook(self, args, kwargs)
            if res is not None:
                args, kwargs = res
        out = self._step(*args, **kwargs)
        for hook in list(self._step_post_hooks.values()):
            hook(self, args, kwargs)
        return out

    @_opaque_to_dynamo
    @torch.no_grad()
    def _step(self, closure=None):
        return drive(self, closure)

    # ------------------------------------------------------------- level protocol
    def _add_group(self, g):
        gi = len(self._hg_vars)
        lr = g["lr"]
        lr = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
        lo, hi = self._bounds
        if not lo <= lr <= hi:
            raise ValueError(f"hg.wrap: lr = {_fmt(lr)} (param group {gi}) is outside the projection bounds "
                             f"[{_fmt(lo)}, {_fmt(hi)}] of a learned lr; an lr of 0 applies no update and "
                             f"reveals no hyper-gradient")
        params = g["params"]
        if self._scope == "shared" and self._hg_vars:
            hv = self._hg_vars[0]["lr"]
            if float(hv.value[0]) != lr:
                raise ValueError(f"hg.wrap: scope 'shared' but param group {gi} has lr {_fmt(lr)}, "
                                 f"not {_fmt(float(hv.value[0]))}")
        else:
            devices = {p.device for p in params}
            if len(devices) > 1:
                raise ValueError(f"hg.wrap: parameters on several devices ({sorted(map(str, devices))}) in "
                                 f"param group {gi}: one lr tensor cannot live on all of them")
            dev = next(iter(devices)) if devices else torch.device("cpu")
            value = torch.tensor(lr, dtype=hyper_dtype(p.dtype for p in params), device=dev)
            hv = HyperVar(_LR, self._scope, True, self._transform, self._bounds, [value])
        self._hg_vars.append({"lr": hv})
        self._written.append(lr)
        self._lr_used.append(None)

    def _hg_learned_vars(self, vars_list=None):
        seen, out = set(), []
        for vars in (self._hg_vars if vars_list is None else vars_list):
            hv = vars["lr"]
            if id(hv) not in seen:
                seen.add(id(hv))
                out.append(hv)
        return out

    def _hg_sync(self):
        for gi, g in enumerate(self.param_groups):
            lr = g["lr"]
            lr = float(lr.detach()) if isinstance(lr, Tensor) else float(lr)
            if lr != self._written[gi]:  # a scheduler or the user wrote it
                if not lr >= 0 or math.isinf(lr):
                    raise ValueError(f"Invalid lr = {lr} written to param group {gi}")
                hv = self._hg_vars[gi]["lr"]
                with torch.no_grad():
                    hv.value[0].fill_(lr)
                    if hv.transform.name is not None:
                        hv.raw[0].copy_(hv.transform.inv(hv.value[0]))
                hv.mark()
                self._written[gi] = lr

    def _hg_refresh(self):
        for hv in self._hg_learned_vars():
            hv.refresh()

    # the gradient checks of the engine (a step with a non-finite gradient is skipped)
    _hg_grads_finite = HyperOptimizer._hg_grads_finite
    _hg_check_grad = HyperOptimizer._hg_check_grad
    _hg_agree = HyperOptimizer._hg_agree

    def _hg_hypergrad(self):
        owners, acc = [], {}
        self._hg_covered = covered = set()
        for hv in self._hg_learned_vars():
            hv.grad = [None]
            hv.raw[0].grad = None
        for gi, g in enumerate(self.param_groups):
            lr_s = self._lr_used[gi]
            if lr_s is None:
                continue
            hv = self._hg_vars[gi]["lr"]
            total = None
            for p in g["params"]:
                prev = self._prev.get(p)
                if prev is None or p.grad is None:
                    continue
                covered.add(id(p))
                d = (p.grad * (p.detach() - prev)).sum(dtype=lr_s.dtype)
                total = d if total is None else total + d
            if total is None:
                continue
            gq = total / lr_s
            if g.get("maximize", False):
                gq = -gq
            key = (id(hv), 0)
            acc[key] = gq if key not in acc else acc[key] + gq
            owners.append((hv, 0, lr_s))
        self._hg_ok = HyperOptimizer._hg_store(self, owners, acc)

    def _hg_update(self):
        self._prev.clear()
        for gi, g in enumerate(self.param_groups):
            hv = self._hg_vars[gi]["lr"]
            lr = float(hv.value[0])
            g["lr"] = lr if not isinstance(g["lr"], Tensor) else g["lr"].fill_(lr)
            self._written[gi] = lr
            self._lr_used[gi] = hv.value[0].detach().clone()
            for p in g["params"]:
                if p.grad is not None:
                    self._prev[p] = p.detach().clone()
        self.optimizer.step()

    # ------------------------------------------------------------- checkpoints
    def state_dict(self):
        params = [p for g in self.param_groups for p in g["params"]]
        return {
            "optimizer": self.optimizer.state_dict(),
            "hypergrad": {
                "raw": [hv.raw[0].detach().clone() for hv in (v["lr"] for v in self._hg_vars)],
                "written": list(self._written),
                "lr_used": [None if x is None else x.clone() for x in self._lr_used],
                "prev": {i: self._prev[p].clone() for i, p in enumerate(params) if p in self._prev},
                "hyper_steps_skipped": self.hyper_steps_skipped,
                "steps_skipped": self.steps_skipped,
                "hyper": self._hg_hyper.state_dict(),
                "type": "WrappedOptimizer",
            },
        }

    def load_state_dict(self, state_dict):
        extra = state_dict.get("hypergrad")
        if extra is None or extra.get("type") != "WrappedOptimizer":
            raise ValueError("WrappedOptimizer.load_state_dict: not a state dict saved from hg.wrap(...)")
        self.optimizer.load_state_dict(state_dict["optimizer"])
        params = [p for g in self.param_groups for p in g["params"]]
        with torch.no_grad():
            for vars, raw in zip(self._hg_vars, extra["raw"]):
                hv = vars["lr"]
                hv.raw[0].copy_(raw)
                hv.refresh()
        self._written = list(extra["written"])
        self._lr_used = [None if x is None else x.to(hv.value[0].device) for x in extra["lr_used"]]
        self._prev = {params[i]: t.to(params[i].device) for i, t in extra["prev"].items()}
        self.hyper_steps_skipped = int(extra.get("hyper_steps_skipped", 0))
        self.steps_skipped = int(extra.get("steps_skipped", 0))
        self._hg_hyper.load_state_dict(extra["hyper"])
