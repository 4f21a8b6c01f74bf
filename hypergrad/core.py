"""The engine: differentiable optimizers whose hyperparameters are tensors, learned online.

One optimizer is one *level*. A level updates its parameters in place with an update rule
``update(p, g, state, h, opts) -> (new_p, new_state)``, a pure function of the parameter, its
gradient, its state and the hyperparameter values ``h``. A level constructed with ``hyper=``
learns its hyperparameters: the level above treats them as its parameters, and their gradient,
the *hyper-gradient*, is the one-step quantity

    d f_t(x_{t-1}) / d q  =  < g_t ,  d x_{t-1} / d q >

where ``x_{t-1}`` is the parameter value produced by the previous update (computed with
``q``), and ``g_t`` the gradient at that value. Everything the previous update read (old
parameter, gradient, state) is treated as a constant (one-step scheme, as in Chandra et al.).

Step ``t`` of a stack of levels ``1..N``:

1. bottom-up, each level ``k < N`` computes the hyper-gradients of its learned
   hyperparameters from its parameters' gradients and what it recorded at step ``t-1``;
   level 1's parameters' gradients are the model's, level ``k+1``'s are level ``k``'s
   hyper-gradients;
2. top-down, each level ``k+1`` updates level ``k``'s hyperparameters with them, and level
   ``k`` projects them into their bounds;
3. level 1 updates the model parameters in place with the new hyperparameters.

Two ways compute the hyper-gradient of step 1. The *generic* path (this module) records the
inputs of each update and, at the next step, differentiates the update rule with autograd
(a vector-Jacobian product with ``g_t``): it works for any rule and is the reference. A rule may
add a *fast* path with closed forms (see :mod:`hypergrad.fast`), tested to agree with it.
"""

from __future__ import annotations

import math
import struct
import weakref
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor

from . import _onepass

__all__ = [
    "Hyper",
    "HyperOptimizer",
    "SCOPES",
    "REPARAMS",
    "hyper_dtype",
    "AUTO_COMPILE_NUMEL",
    "compute_dtype",
]

SCOPES = ("group", "shared", "tensor", "element")
# compile="auto" compiles the param groups of at least this many elements
AUTO_COMPILE_NUMEL = 1 << 16
REPARAMS = (None, "log", "logit")

# Keys of the per-parameter state that belong to the engine, not to the rule.
_RECORD = "hg_record"
# the record before it, which the levels above a ``one_pass`` bottom level differentiate
_PREV = "hg_record_prev"
_UNSET = object()


_HALF = (torch.float16, torch.bfloat16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype an optimizer computes and keeps its state in for parameters of ``dtype``: theirs,
    never below float32 (half-precision second moments underflow, and eps=1e-8 rounds to 0)."""
    return torch.float32 if dtype in _HALF else dtype


def _compute(x: Tensor) -> Tensor:
    return x.float() if x.dtype in _HALF else x


_F32 = struct.Struct("f")
# the smallest normal float32: below it (and above 0) torch may flush to zero (torch.set_flush_denormal)
F32_TINY = 2.0 ** -126


def _owner(cls, name: str):
    """The class of ``cls``'s MRO that defines ``name``."""
    return next((k for k in cls.__mro__ if name in k.__dict__), None)


_SCALAR_RULES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_RULE_PARTS = ("update", "options", "init_state")
# what a float closed form stands for: the rule's update and its closed form (a class whose
# hyper_apply and hyper_coefficients are its own would use them instead of hyper_terms)
_TERMS_PARTS = _RULE_PARTS + ("closed_form_ok", "hyper_terms", "hyper_apply", "hyper_coefficients")


def _scalar_rule_of(cls, name: str, parts: tuple):
    """``cls.<name>`` (a rule in floats) where ``cls`` uses the ``parts`` (class attributes) of
    the class that defines it (a subclass that overrides one of them has its own rule, which
    its parent's floats would not follow), else None."""
    fn = getattr(cls, name, None)
    if fn is None:
        return None
    # (the answer for these functions: class attributes can change)
    key = (fn, *(getattr(cls, n, None) for n in parts))  # (functions compare by identity)
    seen = _SCALAR_RULES.get(cls)
    if seen is None or name not in seen or seen[name][0] != key:
        owner = _owner(cls, name)
        seen = _SCALAR_RULES.setdefault(cls, {})
        seen[name] = (key, all(getattr(owner, n, None) is getattr(cls, n, None) for n in parts))
    return fn if seen[name][1] else None


def _scalar_update_of(cls):
    """``cls.scalar_update`` where the class that defines it also defines the ``update``,
    ``options`` and ``init_state`` that ``cls`` uses, else None."""
    return _scalar_rule_of(cls, "scalar_update", _RULE_PARTS)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32 (ties to even), as a Python float; +-inf where it
    overflows. A float32 operation of torch on CPU rounds its exact result once; for ``+ - * /``
    and ``sqrt`` of float32 operands, the same operation in Python's double precision rounded
    again with ``f32`` gives the same number (53 >= 2 * 24 + 2 bits: the double rounding is
    innocuous), so a rule can write a one-element float32 update in floats (``scalar_update``)."""
    try:
        return _F32.unpack(_F32.pack(x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _subnormal(*xs: float) -> bool:
    """Whether one of the float32 numbers ``xs`` is subnormal (nonzero, below ``F32_TINY``)."""
    return any(0.0 < abs(x) < F32_TINY for x in xs)


def _raw_grad(transform: "_Transform", gq: Tensor, snap: Tensor, r: Tensor) -> Tensor:
    """The raw tensor ``r``'s gradient from the value-space hyper-gradient ``gq``: ``gq dq/dz`` at
    ``snap`` (the value the update used), in ``r``'s dtype; in floats where all are 0-dim
    float32 CPU tensors (``raw_grad_float``: the same number, one tensor made where the
    product took three operations)."""
    if not transform.name:
        return gq if gq.dtype == r.dtype else gq.to(r.dtype)
    f32t = torch.float32
    if gq.dtype is f32t and snap.dtype is f32t and r.dtype is f32t and gq.is_cpu and snap.is_cpu and \
            not gq.dim() and not snap.dim() and not r.dim():
        x = transform.raw_grad_float(gq.item(), snap.item())
        if x is not None:
            return torch.scalar_tensor(x, dtype=f32t, device=r.device)
    raw = gq * transform.dq_dz(snap.to(gq.dtype))
    return raw if raw.dtype == r.dtype else raw.to(r.dtype)


def _shares(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors share memory (a view, or the same tensor)."""
    return a is b or (a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr())


# --------------------------------------------------------------------------------------------
# Hyperparameter specifications
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hyper:
    """Specification of one hyperparameter of an update rule.

    ``key`` says where torch users find it in a param group: ``"lr"`` or ``("betas", 0)``.
    The *domain* ``[lo, hi]`` (ends open where ``lo_open``/``hi_open``) is what a constructor
    accepts. ``bounds`` are the default projection bounds of a *learned* value (``None`` ends
    fall back to the domain; an open end of the domain must be given a closed bound here).
    """

    name: str
    key: str | tuple[str, int]
    lo: float = 0.0
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    learnable: bool = True
    default_learn: bool = True
    bounds: tuple[float | None, float | None] = (None, None)
    auto_reparam: str | None = None
    doc: str = ""

    @property
    def label(self) -> str:
        if isinstance(self.key, str):
            return self.name if self.key == self.name else f"{self.name} ({self.key})"
        return f"{self.name} ({self.key[0]}[{self.key[1]}])"

    def domain_str(self) -> str:
        lo = "-inf" if self.lo == -math.inf else _fmt(self.lo)
        hi = "inf" if self.hi == math.inf else _fmt(self.hi)
        return f"{'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"

    def in_domain(self, v: float) -> bool:
        if math.isnan(v):
            return False
        ok_lo = v > self.lo if self.lo_open else v >= self.lo
        ok_hi = v < self.hi if self.hi_open else v <= self.hi
        return ok_lo and ok_hi

    def default_bounds(self) -> tuple[float, float]:
        lo, hi = self.bounds
        lo = self.lo if lo is None else lo
        hi = self.hi if hi is None else hi
        return float(lo), float(hi)


def _fmt(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------------------------
# Reparameterizations: the level above optimizes raw z, the rule uses q = T(z)
# --------------------------------------------------------------------------------------------


class _Transform:
    name: str | None = None

    def fwd(self, z: Tensor) -> Tensor:  # q = T(z)
        return z

    _op = None  # fwd as one torch function taking out= (None: the identity)

    def fwd_into(self, z: Tensor, out: Tensor) -> None:
        """out <- T(z) in place: one operation where it can (the same numbers as copy_(fwd(z)))."""
        if self._op is not None and z.dtype == out.dtype and z.shape == out.shape:
            self._op(z, out=out)
        else:
            out.copy_(self.fwd(z))

    def inv(self, q: Tensor) -> Tensor:  # z = T^-1(q)
        return q

    def inv_float(self, q: float) -> float:
        return q

    def dq_dz(self, q: Tensor) -> Tensor | float:
        return 1.0

    def raw_grad_float(self, g: float, q: float) -> float | None:
        """``g * dq_dz(q)`` for float32 numbers ``g`` and ``q`` as float32 tensors compute it, in
        Python floats (``f32``); None where a number is a float32 subnormal (which torch may
        flush to zero, ``torch.set_flush_denormal``)."""
        return g


class _Log(_Transform):
    name = "log"

    _op = staticmethod(torch.exp)

    def fwd(self, z):
        return torch.exp(z)

    def inv(self, q):
        return torch.log(q)

    def inv_float(self, q):
        return math.log(q) if q > 0 else -math.inf

    def dq_dz(self, q):
        return q

    def raw_grad_float(self, g, q):
        x = f32(g * q)
        return None if _subnormal(g, q, x) else x


class _Logit(_Transform):
    name = "logit"

    _op = staticmethod(torch.sigmoid)

    def fwd(self, z):
        return torch.sigmoid(z)

    def inv(self, q):
        return torch.logit(q)

    def inv_float(self, q):
        if q <= 0:
            return -math.inf
        if q >= 1:
            return math.inf
        return math.log(q) - math.log1p(-q)

    def dq_dz(self, q):
        return q * (1 - q)

    def raw_grad_float(self, g, q):
        w = f32(1 - q)
        d = f32(q * w)
        x = f32(g * d)
        return None if _subnormal(g, q, w, d, x) else x


_TRANSFORMS = {None: _Transform(), "log": _Log(), "logit": _Logit()}


def hyper_dtype(dtypes: Iterable[torch.dtype]) -> torch.dtype:
    """The dtype of hyperparameters for parameters of these dtypes: theirs, never below float32."""
    out = torch.float32
    for d in dtypes:
        if d.is_complex:
            raise TypeError("complex parameters are not supported by hypergrad optimizers")
        if d.is_floating_point and torch.finfo(d).bits > torch.finfo(out).bits:
            out = d
    return out


class HyperVar:
    """The live tensors of one hyperparameter of one scope (a group, all groups, ...).

    ``value[i]`` is what the rule reads (and what torch users find in the param group);
    ``raw[i]`` is what the level above optimizes (the same tensors without a reparameterization).
    There is one tensor for the ``group``/``shared`` scopes and one per parameter for
    ``tensor``/``element``.
    """

    __slots__ = ("spec", "scope", "learned", "transform", "lo", "hi", "lo_raw", "hi_raw",
                 "value", "raw", "versions", "grad", "__weakref__")

    def __init__(self, spec: Hyper, scope: str, learned: bool, transform: _Transform,
                 bounds: tuple[float, float], values: list[Tensor]):
        self.spec = spec
        self.scope = scope
        self.learned = learned
        self.transform = transform
        self.lo, self.hi = bounds
        self.lo_raw = transform.inv_float(self.lo)
        self.hi_raw = transform.inv_float(self.hi)
        self.value = values
        self.raw = values if transform.name is None else [transform.inv(v) for v in values]
        self.grad: list[Tensor | None] = [None] * len(values)
        self.mark()

    def entry(self):
        """What the param group holds: one tensor, or a list of them (tensor/element scope)."""
        return self.value[0] if self.scope in ("group", "shared") else list(self.value)

    def mark(self):
        self.versions = [v._version for v in self.value]

    def changed_outside(self, entry) -> bool:
        if self.scope in ("group", "shared"):  # (one tensor)
            v = self.value[0]
            return entry is not v or v._version != self.versions[0]
        else:
            if not isinstance(entry, (list, tuple)) or len(entry) != len(self.value) or any(
                a is not b for a, b in zip(entry, self.value)
            ):
                return True
        return any(v._version != n for v, n in zip(self.value, self.versions))

    def refresh(self):
        """Recompute the values from the raw tensors after the level above stepped."""
        if self.transform.name is not None:
            for v, r in zip(self.value, self.raw):
                self.transform.fwd_into(r, v)
        self.mark()


def _step_hooks(step):
    """``step`` with what ``torch.optim.Optimizer`` wraps every step in (``profile_hook_step``):
    the step pre- and post-hooks, global and the optimizer's, and a ``record_function`` named
    ``Optimizer.step#<class>.step``, here entered only where a profiler records (where none
    does, entering it cost 40-55 us a step: the function's own 9 us, and the caches it leaves
    cold for the step inside it, ``docs/benchmarks.md``). Marked ``hooked``, so that torch does
    not wrap it again; a subclass that defines its own ``step`` gets torch's wrapper, and this
    one then only calls ``step`` (the hooks have run). Where torch keeps its hooks elsewhere
    (another torch version), torch's wrapper is left to do it all."""
    from torch.optim import optimizer as _o
    pre, post = getattr(_o, "_global_optimizer_pre_hooks", None), getattr(_o, "_global_optimizer_post_hooks", None)
    enabled = getattr(getattr(torch._C, "_autograd", None), "_profiler_enabled", None)
    if pre is None or post is None or enabled is None:
        return step

    def hooked(self, *args, **kwargs):
        if type(self).step is not wrapper:  # (a subclass's step, in torch's wrapper)
            return step(self, *args, **kwargs)
        args = (self,) + args
        for hook in chain(pre.values(), self._optimizer_step_pre_hooks.values()):  # (live, as torch)
            result = hook(self, args, kwargs)
            if result is not None:
                if isinstance(result, tuple) and len(result) == 2:
                    args, kwargs = result
                else:
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got "
                                       f"{result}.")
        out = step(*args, **kwargs)
        self._optimizer_step_code()
        for hook in chain(self._optimizer_step_post_hooks.values(), post.values()):
            hook(self, args, kwargs)
        return out

    def wrapper(self, *args, **kwargs):
        if enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return hooked(self, *args, **kwargs)
        return hooked(self, *args, **kwargs)
    wrapper.__name__, wrapper.__qualname__, wrapper.__doc__ = step.__name__, step.__qualname__, step.__doc__
    wrapper.__wrapped__ = step
    wrapper.hooked = True
    return wrapper


def _opaque_to_dynamo(fn):
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


# --------------------------------------------------------------------------------------------
# The base class
# --------------------------------------------------------------------------------------------

_HG_KWARGS = ("hyper", "learn", "scope", "bounds", "reparam", "per_name", "hyper_warmup",
              "hypergrad_clip", "backend", "compile", "shard_group", "skip_nonfinite", "one_pass")
BACKENDS = ("auto", "closed", "restore", "autograd")


class HyperOptimizer(torch.optim.Optimizer):
    """Base class of the differentiable optimizers: a ``torch.optim.Optimizer`` whose
    hyperparameters are tensors that a level above can learn.

    Subclasses declare ``hypers`` (a tuple of :class:`Hyper`), and implement ``init_state``,
    ``update`` and ``options``. They pass the torch-style defaults and the hyper-learning
    keyword arguments to this constructor.

    Hyper-learning keyword arguments (every optimizer takes them):

    hyper
        The level above, an optimizer constructed *without* params (``hg.SGD(lr=1e-5)``),
        itself possibly with a ``hyper``. ``None``: nothing is learned.
    learn
        Names of the hyperparameters to learn. Default with a ``hyper``: every hyperparameter
        whose ``default_learn`` is set (``lr`` and the betas/momenta; ``eps``, ``weight_decay``
        and a few others are opt-in).
    scope
        ``"group"`` (default: one value per param group), ``"shared"`` (one value for all
        groups), ``"tensor"`` (one per parameter tensor) or ``"element"`` (one per parameter
        element), or a dict from name to scope.
    bounds
        Dict from name to ``(lo, hi)``: the projection applied after every hyper-step
        (``None`` ends keep the default).
    reparam
        Dict from name to ``"log"`` or ``"logit"``, or ``"auto"``: the level above then steps
        ``log q`` (multiplicative updates, ``q`` stays > 0) or ``logit q`` (``q`` stays in
        (0, 1)) instead of ``q``.
    per_name
        Only for a hyper level: per-name overrides of this level's own hyperparameters for the
        hyperparameters of the level below, ``{"beta1": 5e-4}`` (a number sets ``lr``) or
        ``{"beta1": {"lr": 5e-4, "momentum": 0.9}}``. Names without an entry share one group.
    hyper_warmup
        No hyper-steps for this level's hyperparameters during the first ``hyper_warmup``
        steps (default 0).
    hypergrad_clip
        Clip the hyper-gradient of each learned hyperparameter (per param group, or per tensor
        of its scope) to this norm before the level above uses it (default: no clipping).
    backend
        How hyper-gradients are computed. ``"auto"`` (default): the rule's closed form where it
        has one for the configuration, else ``"restore"`` where the rule has one, else
        ``"autograd"``. ``"closed"``: the hand-derived closed form (or an error).
        ``"restore"``: autograd through the update at its inputs, which the rule rebuilds from
        its state and about one saved parameter-sized buffer (or an error). ``"autograd"``:
        autograd through recorded copies of the update's inputs (the reference the others are
        tested against; the most memory).
    compile
        ``True``: fuse each param group's update, and its hyper-gradient, into one compiled
        kernel each (inductor, as ``torch.compile``: a C++ compiler on CPU, triton on CUDA),
        built on first use: a few seconds, plus about 0.3 s per parameter tensor, cached on disk
        across runs. Same mathematics as the eager path. ``"auto"`` (default): compile the
        param groups of at least ``AUTO_COMPILE_NUMEL`` elements where compilation works, and
        run the others eagerly. ``False``: never compile.
    skip_nonfinite
        ``True`` (default): a step in which a gradient of the bottom level is NaN or infinite
        is skipped whole (parameters, states, hyperparameters and step counts stay), as a
        ``GradScaler`` skips it, and counted in ``steps_skipped``. The check is free where the
        hyper-gradients cover the gradients (their sums are then non-finite), else one
        reduction over the gradients. ``False``: as torch.optim, the values go through.
    one_pass
        Only on the bottom level. ``True``: step ``t`` updates the parameters with the
        hyperparameters it has and computes, in the same pass over memory, the hyper-gradient of
        the last update; the hyper-steps it drives take effect at step ``t + 1`` (the levels above
        differentiate their update before last). A hand-written kernel makes it one loop for
        Adam/AdamW and MADA on float32 CPU tensors; elsewhere the same order runs in two passes.
        ``False`` (default): the paper's order (hyper-steps first, then the update).
    shard_group
        The process group (or ``True``: the default one) over which the parameters of this
        level are sharded, as under ``ZeroRedundancyOptimizer``: the hyper-gradients of the
        group and shared scopes (partial sums on each shard) are all-reduced over it, and every
        rank takes the same skip decision. Not needed under DDP, whose gradients are averaged
        already.
    """

    hypers: ClassVar[tuple[Hyper, ...]] = ()
    # names whose hyper-gradient is identically 0 (they act only through sign(), say)
    zero_hypergrad_names: ClassVar[tuple[str, ...]] = ()
    # for one_pass=True: an object with covers(opts, names), applies(params, grads, states, memo)
    # and run(params, grads, states, hyper_coefficients, coefficients, opts, names, memo=None,
    # check=False) -> {name: float} | None that, given the rule's scalars as floats, makes the
    # update in place and returns the hyper-gradients, in one pass over memory; with check, None
    # and nothing written where a gradient is not finite (hypergrad/_onepass.py,
    # docs/adding-an-optimizer.md)
    one_pass_kernel: ClassVar[Any] = None
    # optional: scalar_update(p, g, h, opts) -> float | None, the rule's update of a one-element
    # float32 parameter without state, in Python floats that round as float32 (``f32``): the same
    # number as ``update``'s, or None where it cannot say (an option it does not cover, an
    # operand or a result below ``F32_TINY``). A hyper level that learns nothing steps its
    # scalars with it (``_hg_update_scalars``): a handful of float operations in place of the
    # tensor operations and bookkeeping of the eager path, 5-10 us a scalar
    scalar_update: ClassVar[Any] = None
    # with scalar_update, optional: the names of the state entries that ``update`` under
    # ``opts["hg_save"]`` sets to the gradient it used (and nothing else) wherever
    # scalar_update gives a number; a level that learns steps its scalars by the float path too
    scalar_saves: ClassVar[tuple[str, ...] | None] = None

    # ---------------------------------------------------------------- rule interface
    def options(self, group: dict, values: dict[str, float]) -> dict:
        """Structural options of a group's update (python values), from the group and the
        current hyperparameter values (as floats; learned ones as ``None``)."""
        return {"maximize": bool(group.get("maximize", False))}

    @staticmethod
    def init_state(p: Tensor, opts: dict) -> dict[str, Tensor]:
        raise NotImplementedError

    @staticmethod
    def update(p: Tensor, g: Tensor, state: dict, h: dict, opts: dict):
        """Pure update rule: returns ``(new_p, new_state)``; must not modify its inputs."""
        raise NotImplementedError

    # Closed form (optional): ``hyper_terms(gt, p, state, h, opts, names)`` returns, for each
    # name, the element-wise product of the new gradient ``gt`` with d x_s / d q, computed from
    # the state after step s (which ``update`` extends with ``hg_*`` entries when
    # ``opts["hg_save"]`` is set) and the values ``h`` used at step s.
    hyper_terms = None

    # Restore (optional): ``restore(p, state, h, opts) -> (p_prev, g, state_prev)`` rebuilds the
    # inputs of the update of step s (the parameter before it, the gradient it used, the state
    # before it, without ``hg_*`` entries) from the parameter and the state after it (with the
    # ``hg_*`` entries ``update`` saved under ``opts["hg_save"]``) and the values ``h`` used at
    # step s. The engine then differentiates ``update`` at those inputs with autograd.
    restore = None

    def closed_form_ok(self, opts: dict, vars: dict) -> bool:
        """Whether the closed form and ``restore`` cover a group with these options and
        hyperparameters (they may divide by a hyperparameter that can reach 0)."""
        return True

    @staticmethod
    def uses_param(opts: dict) -> bool:
        """Whether ``update`` reads ``p`` in a way that depends on a hyperparameter (the
        generic path then records a copy of ``p``)."""
        return True

    # ---------------------------------------------------------------- construction
    def __init__(self, params, defaults: dict, **hg):
        unknown = set(hg) - set(_HG_KWARGS)
        if unknown:
            raise TypeError(f"{type(self).__name__}() got unexpected keyword argument(s) "
                            f"{sorted(unknown)}")
        hyper = hg.get("hyper")
        if hyper is not None:
            if not isinstance(hyper, HyperOptimizer):
                raise TypeError(f"hyper must be a hypergrad optimizer constructed without params "
                                f"(e.g. hg.SGD(lr=1e-5)), got {type(hyper).__name__}")
            if hyper._hg_bound or getattr(hyper, "param_groups", None):
                raise ValueError("hyper level was given params or is already in use by another "
                                 "optimizer: construct the hyper level without params, once per stack")
        names = {h.name: h for h in self.hypers}
        learn = hg.get("learn")
        if learn is None:
            learn = [h.name for h in self.hypers if h.default_learn and h.learnable] if hyper else []
        else:
            if isinstance(learn, str):
                learn = [learn]
            learn = list(learn)
            for n in learn:
                if n not in names:
                    raise ValueError(f"learn: unknown hyperparameter {n!r} for {type(self).__name__}; "
                                     f"known: {sorted(names)}")
                if not names[n].learnable:
                    raise ValueError(f"learn: {n!r} of {type(self).__name__} cannot be learned")
            if learn and hyper is None:
                raise ValueError(f"learn={learn} needs a hyper level to learn with: pass hyper=")
            if hyper is not None and not learn:
                raise ValueError("hyper was given but learn is empty: nothing for the hyper level to learn")
        self._hg_learn = tuple(learn)

        scope = hg.get("scope") or {}
        if isinstance(scope, str):
            scope = {n: scope for n in names}
        for n, s in scope.items():
            if n not in names:
                raise ValueError(f"scope: unknown hyperparameter {n!r}; known: {sorted(names)}")
            if s not in SCOPES:
                raise ValueError(f"scope of {n!r} must be one of {SCOPES}, got {s!r}")
        self._hg_scope = dict(scope)

        bounds = hg.get("bounds") or {}
        for n, b in bounds.items():
            if n not in names:
                raise ValueError(f"bounds: unknown hyperparameter {n!r}; known: {sorted(names)}")
            lo, hi = b
            dlo, dhi = names[n].default_bounds()
            lo = dlo if lo is None else float(lo)
            hi = dhi if hi is None else float(hi)
            if not lo <= hi:
                raise ValueError(f"bounds of {n!r}: lower bound {lo} is above upper bound {hi}")
            spec = names[n]
            for x in (lo, hi):
                if math.isfinite(x) and not (spec.in_domain(x) or x in (spec.lo, spec.hi)):
                    raise ValueError(f"bounds of {n!r}: {x} is outside its domain {spec.domain_str()}")
        self._hg_bounds_arg = dict(bounds)

        reparam = hg.get("reparam") or {}
        if reparam == "auto":
            reparam = {h.name: h.auto_reparam for h in self.hypers if h.auto_reparam}
        elif isinstance(reparam, str):
            raise ValueError("reparam must be a dict {name: 'log'|'logit'} or 'auto'")
        for n, r in reparam.items():
            if n not in names:
                raise ValueError(f"reparam: unknown hyperparameter {n!r}; known: {sorted(names)}")
            if r not in REPARAMS:
                raise ValueError(f"reparam of {n!r} must be one of {REPARAMS}, got {r!r}")
        self._hg_reparam = dict(reparam)

        per_name = hg.get("per_name") or {}
        norm = {}
        for n, v in per_name.items():
            norm[n] = dict(v) if isinstance(v, dict) else {"lr": v}
        self._hg_per_name = norm

        warmup = hg.get("hyper_warmup") or 0
        if int(warmup) != warmup or warmup < 0:
            raise ValueError(f"hyper_warmup must be a non-negative integer, got {warmup!r}")
        self._hg_warmup = int(warmup)
        clip = hg.get("hypergrad_clip")
        if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"hypergrad_clip must be a positive number or None, got {clip!r}")
        self._hg_clip = None if clip is None else float(clip)
        self._hg_t = 0
        self._hg_step_id = 0  # counts every step() (_hg_t also goes back where a step is skipped)
        backend = hg.get("backend") or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._hg_backend = backend
        compile = hg.get("compile", "auto")
        if compile not in (True, False, "auto"):
            raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
        self._hg_compile = compile
        self._hg_numel: dict[int, int] = {}
        self._hg_kernels: dict[int, Any] = {}
        self._hg_kinds: dict[int, str | None] = {}
        self._hg_stable: dict[int, tuple] = {}
        self._hg_aligned: dict[int, bool] = {}

        self._hg_hyper: HyperOptimizer | None = hyper
        self._hg_defaults = defaults
        self._hg_vars: list[dict[str, HyperVar]] = []
        self._hg_opts: list[dict] = []
        self._hg_shared: dict[str, HyperVar] = {}
        self._hg_proj: dict[Tensor, tuple[float, float]] = {}
        self._hg_onepass_memo: dict[int, dict] = {}  # per group: what the one-pass kernel's check reuses
        self._hg_below_ref = None
        self._hg_bound = False
        self._hg_ready = False
        self.hyper_steps_skipped = 0
        self.steps_skipped = 0
        self._hg_ok = True
        shard = hg.get("shard_group")
        if shard is not None:
            import torch.distributed as dist
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError("shard_group was given but torch.distributed is not initialized "
                                   "(call torch.distributed.init_process_group first)")
        self._hg_shard_group = shard
        self._hg_skip_nonfinite = bool(hg.get("skip_nonfinite", True))
        one_pass = hg.get("one_pass", False)
        if one_pass not in (True, False):
            raise ValueError(f"one_pass must be True or False, got {one_pass!r}")
        if one_pass and params is None:
            raise ValueError("one_pass is an option of the bottom level of a stack (the optimizer of the "
                             "model parameters), not of a hyper level")
        if one_pass and hyper is None:
            raise ValueError("one_pass=True needs a hyper level: it changes when hyper-steps take effect")
        self._hg_one_pass = bool(one_pass)
        self._hg_fused: set[int] = set()
        self._hg_grads_bad = False  # set by _hg_hypergrad(check=True): a non-finite gradient, step skipped
        # a level above a one_pass bottom level differentiates its update before last
        self._hg_lag = False
        if one_pass:
            h = hyper
            while h is not None:
                h._hg_lag = True
                h = h._hg_hyper
        if params is not None:
            self._hg_setup(params)
        # an unbound level keeps param_groups undefined until it is bound

    def _hg_setup(self, params):
        super().__init__(params, self._hg_defaults)
        self._hg_bound = True
        if self._hg_hyper is not None:
            self._hg_hyper._hg_bind(self)
        self._hg_ready = True

    # ------------------------------------------------------------- hyperparameter tensors
    def add_param_group(self, param_group: dict) -> None:
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        seen = {}
        for i, p in enumerate(params):
            if id(p) in seen:  # torch only warns; it would be stepped twice with one state
                raise ValueError(f"param group {len(getattr(self, 'param_groups', []))}: parameters {seen[id(p)]} "
                                 f"and {i} are the same tensor (duplicate parameters)")
            seen[id(p)] = i
        param_group = dict(param_group, params=params)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._hg_make_vars(group)
        except Exception:
            self.param_groups.pop()
            raise
        if self._hg_ready and self._hg_hyper is not None:
            self._hg_hyper._hg_attach(self, [self._hg_vars[-1]])

    def _hg_make_vars(self, group: dict) -> None:
        gi = len(self._hg_vars)
        params = group["params"]
        where = f" (param group {gi})" if gi else ""
        pdtypes = [p.dtype for p in params]
        hdtype = hyper_dtype(pdtypes)
        devices = {p.device for p in params}
        vars: dict[str, HyperVar] = {}
        floats: dict[str, float | None] = {}
        for spec in self.hypers:
            v = _get(group, spec.key)
            scope = self._hg_scope.get(spec.name, "group")
            learned = spec.name in self._hg_learn
            vals = _as_floats(v, spec, where)
            for x in vals:
                if not spec.in_domain(x):
                    raise ValueError(f"Invalid {spec.label} = {_fmt(x)}{where}: must be in "
                                     f"{spec.domain_str()}")
            transform = _TRANSFORMS[self._hg_reparam.get(spec.name)]
            lo, hi = spec.default_bounds()
            if spec.name in self._hg_bounds_arg:
                blo, bhi = self._hg_bounds_arg[spec.name]
                lo = lo if blo is None else float(blo)
                hi = hi if bhi is None else float(bhi)
            if learned:
                if transform.name == "log" and lo < 0:
                    lo = 0.0
                if transform.name == "logit":
                    lo, hi = max(lo, 0.0), min(hi, 1.0)
                for x in vals:
                    if not lo <= x <= hi:
                        raise ValueError(
                            f"{spec.label} = {_fmt(x)}{where} is outside the projection bounds "
                            f"[{_fmt(lo)}, {_fmt(hi)}] of a learned {spec.name}: pass "
                            f"bounds={{'{spec.name}': (lo, hi)}} or do not learn it")
                    if transform.name == "log" and x <= 0:
                        raise ValueError(f"{spec.label} = {_fmt(x)}{where} cannot be learned in log "
                                         f"space (reparam='log' needs a value > 0)")
                    if transform.name == "logit" and not 0 < x < 1:
                        raise ValueError(f"{spec.label} = {_fmt(x)}{where} cannot be learned in logit "
                                         f"space (reparam='logit' needs a value in (0, 1))")
            floats[spec.name] = vals[0] if len(vals) == 1 and not learned else None
            if scope == "shared" and spec.name in self._hg_shared:
                hv = self._hg_shared[spec.name]
                cur = [float(t) for t in hv.value]
                # compare in the shared tensor's dtype: 1e-3 is not a float32 number
                if any(float(torch.tensor(x, dtype=hv.value[0].dtype)) != cur[0] for x in vals):
                    raise ValueError(f"scope 'shared' for {spec.name}: param group {gi} sets "
                                     f"{_fmt(vals[0])} but the shared value is {_fmt(cur[0])}")
                if any(d != hv.value[0].device for d in devices):
                    raise ValueError(f"scope 'shared' for {spec.name}: parameters on several devices "
                                     f"({sorted(map(str, devices | {hv.value[0].device}))}) in one scope")
            else:
                if scope in ("group", "shared"):
                    if len(devices) > 1:
                        raise ValueError(f"scope {scope!r} for {spec.name}{where}: parameters on several "
                                         f"devices ({sorted(map(str, devices))}) in one scope; use "
                                         f"scope='tensor' or one param group per device")
                    dev = next(iter(devices)) if devices else torch.device("cpu")
                    if len(vals) != 1:
                        raise ValueError(f"{spec.label}{where}: a {scope}-scoped hyperparameter takes "
                                         f"one value, got {len(vals)}")
                    values = [torch.tensor(vals[0], dtype=hdtype, device=dev)]
                elif scope == "tensor":
                    if len(vals) not in (1, len(params)):
                        raise ValueError(f"{spec.label}{where}: scope 'tensor' takes one value or one "
                                         f"per parameter ({len(params)}), got {len(vals)}")
                    vals_p = vals * len(params) if len(vals) == 1 else vals
                    values = [torch.tensor(x, dtype=hyper_dtype([p.dtype]), device=p.device)
                              for x, p in zip(vals_p, params)]
                else:  # element
                    if isinstance(v, (list, tuple)) and len(v) == len(params) and all(
                            isinstance(t, Tensor) and t.shape == p.shape for t, p in zip(v, params)):
                        values = [t.detach().to(device=p.device, dtype=hyper_dtype([p.dtype])).clone()
                                  for t, p in zip(v, params)]
                    else:
                        if len(vals) != 1:
                            raise ValueError(f"{spec.label}{where}: scope 'element' takes one value or "
                                             f"one tensor per parameter")
                        values = [torch.full_like(p, vals[0], dtype=hyper_dtype([p.dtype]))
                                  for p in params]
                hv = HyperVar(spec, scope, learned, transform, (lo, hi), values)
                if scope == "shared":
                    self._hg_shared[spec.name] = hv
            _set(group, spec.key, hv.entry())
            vars[spec.name] = hv
        self._hg_vars.append(vars)
        self._hg_opts.append(self.options(group, floats))
        self._hg_kinds.pop(len(self._hg_vars) - 1, None)

    def _hg_floats(self, gi: int) -> dict[str, float | None]:
        out = {}
        for name, hv in self._hg_vars[gi].items():
            out[name] = None if hv.learned or len(hv.value) != 1 or hv.value[0].dim() else float(hv.value[0])
        return out

    def _hg_sync(self) -> None:
        """Take in writes to the param groups made outside the optimizer (user code, LR
        schedulers, load_state_dict): their values replace the hyperparameter values."""
        for gi, group in enumerate(self.param_groups):
            changed = False
            for name, hv in self._hg_vars[gi].items():
                entry = _get(group, hv.spec.key)
                if not hv.changed_outside(entry):
                    continue
                self._hg_assign(hv, entry, gi)
                _set(group, hv.spec.key, hv.entry())
                changed = True
            if changed:
                self._hg_opts[gi] = self.options(group, self._hg_floats(gi))
                self._hg_kinds.pop(gi, None)

    def _hg_assign(self, hv: HyperVar, entry, gi: int) -> None:
        where = f" (param group {gi})" if gi else ""
        spec = hv.spec
        if isinstance(entry, (list, tuple)) and len(hv.value) > 1 or (
                isinstance(entry, (list, tuple)) and hv.scope in ("tensor", "element")):
            entries = list(entry)
            if len(entries) != len(hv.value):
                raise ValueError(f"{spec.label}{where}: expected {len(hv.value)} values, got {len(entries)}")
        else:
            entries = [entry] * len(hv.value)
        with torch.no_grad():
            for i, (dst, src) in enumerate(zip(hv.value, entries)):
                if src is dst:
                    x = dst
                else:
                    x = torch.as_tensor(src.detach() if isinstance(src, Tensor) else src,
                                        dtype=dst.dtype, device=dst.device)
                bad = ~_in_domain_t(x, spec)
                if bool(bad.any()):
                    raise ValueError(f"Invalid {spec.label}{where} written to the param group: "
                                     f"{_fmt(float(x[bad].flatten()[0]) if x.dim() else float(x))} is "
                                     f"outside {spec.domain_str()}")
                if src is not dst:
                    dst.copy_(x.expand_as(dst))
                if hv.transform.name is not None:
                    hv.raw[i].copy_(hv.transform.inv(dst))
        hv.mark()

    # ------------------------------------------------------------- stacking
    @property
    def hyper(self) -> "HyperOptimizer | None":
        """The level above (it learns this level's hyperparameters), or None."""
        return self._hg_hyper

    @property
    def below(self) -> "HyperOptimizer | None":
        """The level below (whose hyperparameters this level learns), or None for level 1."""
        return None if self._hg_below_ref is None else self._hg_below_ref()

    @property
    def levels(self) -> list["HyperOptimizer"]:
        """This level and all levels above it, bottom first."""
        out = [self]
        while out[-1]._hg_hyper is not None:
            out.append(out[-1]._hg_hyper)
        return out

    def _hg_learned_vars(self, vars_list=None):
        seen, out = set(), []
        for vars in (self._hg_vars if vars_list is None else vars_list):
            for hv in vars.values():
                if hv.learned and id(hv) not in seen:
                    seen.add(id(hv))
                    out.append(hv)
        return out

    def _hg_bind(self, below: "HyperOptimizer") -> None:
        """Bind this (unbound) level to the hyperparameters that ``below`` learns."""
        self._hg_below_ref = weakref.ref(below)
        learned_names = set(below._hg_learn)
        for n in self._hg_per_name:
            if n not in learned_names:
                raise ValueError(f"per_name: {n!r} is not a hyperparameter learned by the level below "
                                 f"({type(below).__name__} learns {sorted(learned_names)})")
        self._hg_setup(self._hg_groups_for(below, below._hg_vars))

    def _hg_groups_for(self, below, vars_list) -> list[dict]:
        by_name: dict[str, list[Tensor]] = {}
        for hv in below._hg_learned_vars(vars_list):
            for r in hv.raw:
                if any(r is x for x in self._hg_proj):
                    continue
                hi = hv.hi_raw
                if hv.transform.name == "log":  # exp(z) must stay finite in the value's dtype
                    hi = min(hi, math.log(torch.finfo(r.dtype).max) - 1.0)
                self._hg_proj[r] = _inward(hv.lo_raw, hi, r.dtype)
                by_name.setdefault(hv.spec.name, []).append(r)
        groups, rest, rest_names = [], [], []
        for name, raws in by_name.items():
            if name in self._hg_per_name:
                groups.append({"params": raws, "hyper_of": name, **self._hg_per_name[name]})
            else:
                rest.extend(raws)
                rest_names.append(name)
        if rest:
            groups.append({"params": rest, "hyper_of": "+".join(rest_names)})
        return groups

    def _hg_attach(self, below, vars_list) -> None:
        for g in self._hg_groups_for(below, vars_list):
            self.add_param_group(g)

    # ------------------------------------------------------------- public views
    def _hg_group_index(self, group) -> int:
        if isinstance(group, int):
            if not -len(self.param_groups) <= group < len(self.param_groups):
                raise IndexError(f"param group {group} out of range ({len(self.param_groups)} groups)")
            return group % len(self.param_groups)
        for i, g in enumerate(self.param_groups):
            if group in g.get("hyper_of", "").split("+"):
                return i
        raise KeyError(f"no param group learns {group!r}")

    def hyperparameters(self, group: int | str = 0) -> dict[str, Tensor | list[Tensor]]:
        """The live hyperparameter tensors of a param group, by name.

        ``group`` is the group index, or, on a hyper level, the name of a hyperparameter of the
        level below whose group to show. Scopes ``tensor`` and ``element`` give a list of
        tensors (one per parameter of the group).
        """
        self._hg_check_bound()
        gi = self._hg_group_index(group)
        return {n: hv.entry() for n, hv in self._hg_vars[gi].items()}

    def hypergradients(self, group: int | str = 0) -> dict[str, Tensor | list[Tensor] | None]:
        """The last hyper-gradients d f_t / d q of the learned hyperparameters of a group
        (``None`` before the first one)."""
        self._hg_check_bound()
        gi = self._hg_group_index(group)
        out = {}
        for n, hv in self._hg_vars[gi].items():
            if hv.learned:
                out[n] = hv.grad[0] if hv.scope in ("group", "shared") else list(hv.grad)
        return out

    @property
    def learned(self) -> tuple[str, ...]:
        """Names of the hyperparameters this level learns."""
        return self._hg_learn

    def _hg_check_bound(self):
        if not self._hg_bound:
            raise RuntimeError(f"this {type(self).__name__} level is not bound to parameters yet: pass "
                               f"it as hyper= to an optimizer constructed with params")

    # ------------------------------------------------------------- stepping
    @_step_hooks
    @_opaque_to_dynamo
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one step: hyper-gradients bottom-up, hyper-steps top-down, then the
        parameter update with the new hyperparameters. ``closure`` re-evaluates the loss.

        Under ``torch.compile`` the step is opaque (a graph break): it runs its own fused
        kernels (``compile=``), and its bookkeeping would only make dynamo recompile."""
        self._hg_check_bound()
        if self.below is not None:
            raise RuntimeError("step() is driven by the bottom level of the stack; call step() on the "
                               "optimizer of the model parameters")
        return drive(self, closure)

    def _hg_refresh(self):
        for hv in self._hg_learned_vars():
            hv.refresh()

    def _hg_grad(self, p: Tensor, opts: dict) -> Tensor:
        g = _compute(self._hg_check_grad(p.grad))
        return -g if opts.get("maximize") else g

    def _hg_check_grad(self, g: Tensor) -> Tensor:
        if g.is_sparse:
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients (torch.optim.SparseAdam "
                               f"does; or make the embedding dense: sparse=False)")
        if g.is_complex():
            raise RuntimeError(f"{type(self).__name__} does not support complex gradients")
        return g

    def _hg_kind(self, gi: int) -> str | None:
        """How the hyper-gradient of param group ``gi`` is computed (cached per group):
        ``"closed"`` (the rule's closed form), ``"restore"`` (autograd through the update at the
        inputs the rule rebuilds from its state), ``"autograd"`` (autograd through recorded
        copies of the inputs: the reference), or None where nothing is learned."""
        kind = self._hg_kinds.get(gi, _UNSET)
        if kind is _UNSET:
            kind = self._hg_kinds[gi] = self._hg_pick_kind(gi)
        return kind

    def _hg_pick_kind(self, gi: int) -> str | None:
        if not self._hg_learn:
            return None
        backend = self._hg_backend
        if backend == "autograd":
            return "autograd"
        cls = type(self)
        ok = self.closed_form_ok(self._hg_opts[gi], self._hg_vars[gi])
        closed = cls.hyper_terms is not None and bool(ok)
        if self._hg_lag:
            # its update before last: the closed form at the state that update left (its record
            # keeps it: references to the state tensors, which the eager update replaces rather
            # than overwrites), else autograd through recorded copies; a restore from the state
            # now would rebuild the last update, not that one
            if backend == "restore" or (backend == "closed" and not closed):
                why = "it differentiates its update before last, from its record" if backend == "restore" else (
                    getattr(ok, "reason", None) or f"{cls.__name__} has no closed form")
                raise RuntimeError(f"{cls.__name__}: backend={backend!r} is not available on a level above a "
                                   f"one_pass=True bottom level ({why}): backend='closed', 'autograd' or 'auto'")
            return "closed" if closed else "autograd"
        # the projection of a hyper level's parameters (clipping) cannot be undone: those
        # scalars keep recorded copies
        projected = any(p in self._hg_proj for p in self.param_groups[gi]["params"])
        restore = cls.restore is not None and bool(ok) and not projected
        if backend in ("closed", "restore") and not (closed if backend == "closed" else restore or closed):
            why = getattr(ok, "reason", None) or (
                f"{cls.__name__} has no closed form" if backend == "closed" and cls.hyper_terms is None else
                f"{cls.__name__} has no restore" if cls.restore is None and not closed else
                "this configuration is not covered")
            raise RuntimeError(f"{cls.__name__}: backend={backend!r} is not available for param group {gi} ({why})")
        if backend == "restore" and restore:
            return "restore"
        return "closed" if closed else "restore" if restore else "autograd"

    def _hg_update(self, skip: set[int] = frozenset()) -> None:
        """Update this level's parameters in place, recording what the next hyper-gradient needs
        (the param groups in ``skip`` were updated already, by a one-pass kernel)."""
        if len(skip) == len(self.param_groups):  # every group updated already
            return
        snaps = None
        if self._hg_learn:  # the hyperparameter values this step uses
            snaps = {}
            for vars in self._hg_vars:
                for hv in vars.values():
                    if id(hv) not in snaps:
                        snaps[id(hv)] = [v.detach().clone() for v in hv.value]
        for gi in range(len(self.param_groups)):
            if gi in skip:
                continue
            kind = self._hg_kind(gi) if snaps is not None else None
            if kind in (None, "closed") and self._hg_update_scalars(gi, kind, snaps):
                continue
            # (a level above a one_pass bottom level keeps lagged records: the eager update)
            if kind == "closed" and not self._hg_lag and self._hg_compiles(gi) and \
                    self._hg_try(self._hg_update_kernel, gi, kind, snaps):
                continue
            if kind != "autograd" and not self._hg_lag and self._hg_compiles(gi) and \
                    self._hg_try(self._hg_update_compiled, gi, kind, snaps):
                continue
            self._hg_update_eager(gi, kind, snaps)

    def _hg_update_scalars(self, gi: int, kind: str | None = None, snaps=None) -> bool:
        """The update of group ``gi`` in Python floats (the rule's ``scalar_update``) where the
        group holds scalars (a hyper level's, or any level's): one-element float32 CPU parameters
        with gradients, every hyperparameter one float32 CPU value, and no state (``kind`` None: this level
        learns nothing), or (``kind`` "closed", not compiled: a level that learns, whose rule
        names in ``scalar_saves`` the state it keeps, the gradient it used) only that state and
        the records, which this makes as ``_hg_update_eager`` makes them (``snaps``: the values
        this step uses). The same numbers as ``_hg_update_eager`` (tested bit for bit, records
        included); False, with nothing written, where it does not apply."""
        fn = _scalar_update_of(type(self))
        if fn is None:
            return False
        saves = ()
        if kind is not None:
            saves = type(self).scalar_saves
            if kind != "closed" or saves is None or snaps is None or self._hg_compiles(gi):
                return False
        f32t = torch.float32
        params = self.param_groups[gi]["params"]
        for p in params:  # (first: a level of large tensors leaves here at its first parameter)
            g = p.grad
            if g is None or p.dtype is not f32t or g.dtype is not f32t or not p.is_cpu or not g.is_cpu \
                    or p.numel() != 1 or g.numel() != 1 or g.layout is not torch.strided:
                return False
            st = self.state.get(p)
            # no state the rule reads (kind None: none at all; else only records and hg_* entries)
            if st and (kind is None or any(k != _RECORD and not k.startswith("hg_") for k in st)):
                return False
        vars = self._hg_vars[gi]
        h = {}
        for n, hv in vars.items():
            if len(hv.value) != 1:
                return False
            v = hv.value[0]
            if v.dtype is not f32t or not v.is_cpu or v.numel() != 1:
                return False
            h[n] = v.item()
        opts = self._hg_opts[gi]
        neg = bool(opts.get("maximize"))
        new = []
        for p in params:
            g = p.grad
            gf = -g.item() if neg else g.item()
            x = fn(p.item(), gf, h, opts)
            if x is None:
                return False
            new.append((x, gf))
        proj = self._hg_proj
        for p, (x, gf) in zip(params, new):
            st = self.state[p]  # (as the eager path: an empty state, which state_dict lists)
            b = proj.get(p)
            mask = None
            if b is not None:
                # as _hg_update_eager: a non-finite step (or saved gradient) is not taken
                if not (math.isfinite(x) and (not saves or math.isfinite(gf))):
                    self._hg_record(st, None)
                    self.steps_skipped += 1
                    continue
                if not b[0] <= x <= b[1]:
                    if kind == "closed":  # clipped: the derivative is 0
                        mask = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
                    x = min(max(x, b[0]), b[1])
            if kind is not None:
                rec = {"kind": kind, "h": {n: snaps[id(hv)][0] for n, hv in vars.items()}, "mask": mask}
                if self._hg_lag:
                    self._hg_record(st, rec)
                else:
                    st[_RECORD] = rec
                for k in saves:  # the gradient the update used, a tensor of its own
                    st[k] = torch.neg(p.grad) if neg else p.grad.clone()
            p.fill_(x)
            if kind is not None and self._hg_lag:
                rec["p"] = p.detach().clone()  # x_s, which the next update overwrites
                rec["state"] = {k: v for k, v in st.items() if k != _RECORD and k != _PREV}
        return True

    def _hg_update_eager(self, gi: int, kind: str | None, snaps) -> None:
        group, vars, opts = self.param_groups[gi], self._hg_vars[gi], self._hg_opts[gi]
        o = dict(opts, hg_save=True) if kind in ("closed", "restore") else opts
        keysets = set()
        compiles = self._hg_compiles(gi)
        # the scalars of the rule (bias corrections, step sizes) once for the group where it can
        coef = self._hg_group_scalars(gi, "coefficients", 1)
        for i, p in enumerate(group["params"]):
            st = self.state[p]
            if p.grad is None:
                self._hg_record(st, None)
                self._hg_aligned[gi] = False
                continue
            g = self._hg_grad(p, opts)
            pc = _compute(p)  # a float32 copy of a half-precision parameter
            old = {k: v for k, v in st.items() if k != _RECORD and not k.startswith("hg_")}
            if not old:
                old = self.init_state(pc, opts)
                st.update(old)
            if coef is not None:
                new_p, new_state = self.apply(pc, g, old, coef, o)
            else:
                h = {n: hv.value[0 if len(hv.value) == 1 else i] for n, hv in vars.items()}
                new_p, new_state = self.update(pc, g, old, h, o)
            b = self._hg_proj.get(p)
            mask = None
            if b is not None:
                # a hyper level's scalar is read once as a number: its checks and its clamp then
                # compare floats (three tensor operations cost more than the rest of its step)
                x = new_p.item() if new_p.numel() == 1 and new_p.is_cpu else None
                if not ((math.isfinite(x) if x is not None else bool(torch.isfinite(new_p).all()))
                        and _all_finite(new_state)):
                    # a hyper-step that would make a hyperparameter or its state non-finite (an
                    # overflow) is not taken: the value stays, and its record is dropped
                    self._hg_record(st, None)
                    self.steps_skipped += 1
                    continue
                if x is not None:
                    if not b[0] <= x <= b[1]:
                        if kind == "closed":  # clipped: the derivative is 0
                            mask = torch.zeros_like(new_p, dtype=torch.bool)
                        new_p = new_p.clamp(b[0], b[1])
                else:
                    if kind == "closed":  # where the projection clips, the derivative is 0
                        mask = (new_p >= b[0]) & (new_p <= b[1])
                    new_p = new_p.clamp(b[0], b[1])
            if kind is not None:
                hs = {n: snaps[id(hv)][0 if len(hv.value) == 1 else i] for n, hv in vars.items()}
                if kind == "autograd":
                    self._hg_record(st, {
                        "kind": kind,
                        # the old value only matters where the rule reads it or a projection clips
                        "p": (pc.clone() if pc is p else pc) if b is not None or self.uses_param(opts) else None,
                        "g": g.clone(),
                        "state": old,
                        "h": hs,
                    })
                elif self._hg_lag:  # closed: the parameter and the state this update leaves (below)
                    lagged = {"kind": kind, "h": hs, "mask": mask}
                    self._hg_record(st, lagged)
                else:  # the rule's update saved what its closed form / restore needs (hg_* state)
                    st[_RECORD] = {"kind": kind, "h": hs, "mask": mask}
            for k, v in new_state.items():
                if k.startswith("hg_"):
                    # saved for the next step: never a tensor that the caller or this step overwrites
                    if _shares(v, p) or (p.grad is not None and _shares(v, p.grad)):
                        v = v.clone()
                    st[k] = v
                else:
                    ov = old.get(k)
                    if ov is not None and v.dtype != ov.dtype:
                        v = v.to(ov.dtype)
                    elif coef is not None and k == "step":  # each tensor owns its counter
                        v = v.clone()
                    st[k] = v
            p.copy_(new_p)
            if kind == "closed" and self._hg_lag:
                lagged["p"] = p.detach().clone()  # x_s, which the next update overwrites
                lagged["state"] = {k: v for k, v in st.items() if k != _RECORD and k != _PREV}
            if compiles:
                keysets.add((frozenset(old), frozenset(new_state)) if b is None else None)
        # the state is stable (same keys before and after, for every tensor): it can be compiled
        if compiles:
            ks = next(iter(keysets)) if len(keysets) == 1 else None
            stable = ks is not None and ks[0] == {k for k in ks[1] if not k.startswith("hg_")}
            self._hg_stable[gi] = tuple(sorted(k for k in ks[1] if k != "step")) if stable else None

    def _hg_record(self, st: dict, rec: dict | None) -> None:
        """Set (or drop, with None) the record of the update just made; on a level above a
        ``one_pass`` bottom level, keep the one before it, which its hyper-gradient needs."""
        if self._hg_lag:
            prev = st.get(_RECORD)
            if prev is None:
                st.pop(_PREV, None)
            else:
                st[_PREV] = prev
        if rec is None:
            st.pop(_RECORD, None)
        else:
            st[_RECORD] = rec

    def _hg_compiles(self, gi: int) -> bool:
        """Whether param group ``gi`` runs compiled kernels (``compile=``)."""
        c = self._hg_compile
        if c != "auto":
            return c
        n = self._hg_numel.get(gi)
        if n is None:
            n = self._hg_numel[gi] = sum(p.numel() for p in self.param_groups[gi]["params"])
        if n < AUTO_COMPILE_NUMEL:
            return False
        from . import _compiled
        return _compiled.usable()

    def _hg_steady_keys(self, gi: int):
        """The state keys of group ``gi`` when every tensor holds the same keys and the rule's
        update (dry run on meta tensors) returns exactly them: the compiled kernels can run on
        it. Else None (the eager path runs first and finds out)."""
        params = [p for p in self.param_groups[gi]["params"] if p not in self._hg_proj]
        if not params or len(params) != len(self.param_groups[gi]["params"]):
            return None
        keys = None
        for p in params:
            st = self.state.get(p)
            if not st:
                return None
            k = frozenset(x for x in st if x not in (_RECORD, _PREV))
            if keys is not None and k != keys:
                return None
            keys = k
        kind = self._hg_kind(gi) if self._hg_learn else None
        opts = self._hg_opts[gi]
        o = dict(opts, hg_save=True) if kind in ("closed", "restore") else opts
        p = params[0]

        def meta(x):
            return torch.empty_like(x, device="meta") if isinstance(x, Tensor) and x.dim() else x
        st = self.state[p]
        old = {k: meta(v) for k, v in st.items() if k != _RECORD and not k.startswith("hg_")}
        h = {n: meta(hv.value[0]) for n, hv in self._hg_vars[gi].items()}
        pm = torch.empty_like(p, device="meta", dtype=compute_dtype(p.dtype))
        try:
            _, new = self.update(pm, torch.empty_like(pm), old, h, o)
        except Exception:  # an operation without a meta kernel: leave it to the eager path
            return None
        if set(new) != set(keys) or {k for k in new if not k.startswith("hg_")} != set(old):
            return None
        return tuple(sorted(k for k in keys if k != "step"))

    def _hg_try(self, fn, *args) -> bool:
        """Run a compiled path; if compilation fails (no C++ compiler, an unsupported op, an
        unexpected input layout), continue on the eager path, which computes the same: with a
        warning under ``compile=True``, a log line under ``"auto"`` (which then stops trying in
        this process)."""
        try:
            return fn(*args)
        except Exception as e:  # compiled code checks its inputs before it touches any tensor
            if isinstance(e, (KeyboardInterrupt, MemoryError)):
                raise
            what = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            if self._hg_compile == "auto":
                from . import _compiled
                _compiled.mark_unusable(what)
            else:
                import warnings
                warnings.warn(f"{type(self).__name__}: compile=True failed ({what}); continuing without "
                              f"compilation", RuntimeWarning)
            self._hg_compile = False
            return False

    def _hg_kernels_of(self, gi):
        kern = self._hg_kernels.get(gi)
        if kern is None:
            from ._compiled import GroupKernels
            kern = self._hg_kernels[gi] = GroupKernels(type(self))
        return kern

    def _hg_update_kernel(self, gi, kind, snaps) -> bool:
        """The update of group ``gi`` (the paper's order, closed form) by the rule's hand-written
        kernel (``one_pass_kernel.update``: the one-pass loop without its sums); False where it
        does not apply (``_hg_kernel_group``; tensors whose steps are not aligned)."""
        fn = getattr(type(self), "one_pass_kernel", None)
        if getattr(fn, "update", None) is None:
            return False
        vars = self._hg_vars[gi]
        got = self._hg_kernel_group(gi, tuple(n for n, hv in vars.items() if hv.learned), fn, recorded=False)
        if got is None:
            return False
        params, grads, states = got
        step = self._hg_common_step(gi, states)
        if step is None:
            return False
        hf, c = self._hg_now_scalars(gi, step)
        memo = self._hg_onepass_memo.get(gi)  # (what fn.applies checked in this step)
        fn.update(params, grads, states, c, self._hg_opts[gi], memo=memo)
        _onepass.advance_steps(states, memo)
        rec = {"kind": kind, "h": {n: snaps[id(hv)][0] for n, hv in vars.items()}, "mask": None, "hf": hf}
        for st in states:
            st[_RECORD] = rec
        return True

    def _hg_update_compiled(self, gi, kind, snaps) -> bool:
        """The update of group ``gi`` as one compiled kernel; False where it does not apply
        (missing gradients, projected parameters, state not yet in its steady form)."""
        keys = self._hg_stable.get(gi)
        params = self.param_groups[gi]["params"]
        if not keys or not params:
            return False
        states, grads = [], []
        for p in params:
            g = p.grad
            if g is None or g.is_sparse or g.is_complex() or p in self._hg_proj:
                return False
            st = self.state[p]
            if len(st) - (_RECORD in st) - (_PREV in st) - ("step" in st) != len(keys):
                return False
            states.append(st)
            grads.append(g)
        vars, opts = self._hg_vars[gi], self._hg_opts[gi]
        o = dict(opts, hg_save=True) if kind in ("closed", "restore") else opts
        names = tuple(vars)
        single = all(len(hv.value) == 1 for hv in vars.values())
        if single:
            hvals = [[hv.value[0] for hv in vars.values()]]
        else:
            hvals = [[hv.value[0 if len(hv.value) == 1 else i] for hv in vars.values()] for i in range(len(params))]
        split = single and self._hg_common_step(gi, states) is not None
        counted = "step" in states[0]
        # step counters advance in the kernel where they live on its device, else after it
        inside = counted and states[0]["step"].device == params[0].device
        self._hg_kernels_of(gi).update(params, grads, states, keys + ("step",) if inside else keys, hvals,
                                       names, o, split)
        if counted and not inside:
            torch._foreach_add_([st["step"] for st in states], 1)
        if snaps is not None:
            if single:  # one record serves the group
                rec = {"kind": kind, "h": {n: snaps[id(hv)][0] for n, hv in vars.items()}, "mask": None}
                for st in states:
                    st[_RECORD] = rec
            else:
                for i, st in enumerate(states):
                    st[_RECORD] = {"kind": kind, "h": {n: snaps[id(hv)][0 if len(hv.value) == 1 else i]
                                                       for n, hv in vars.items()}, "mask": None}
        return True

    def _hg_hypergrad(self, fuse: bool = False, check: bool = False) -> None:
        """Compute d f_t / d q for every learned hyperparameter and store it, in raw space, as
        ``.grad`` of the raw tensors: from the rule's closed form, or by autograd through the
        update at the inputs its ``restore`` rebuilds or that were recorded (see ``_hg_kind``).

        ``fuse`` (a ``one_pass`` bottom level): where a one-pass kernel applies, it makes this
        step's update too, and the group goes into ``_hg_fused``. ``check`` (with ``fuse``, one
        param group, ``_hg_checks_inside``): the gradients are checked before anything is
        computed or written, by the group's one-pass kernel where it runs, else here; where one
        is not finite, ``_hg_grads_bad`` is set and nothing changes (the caller skips the step)."""
        if fuse and self._hg_onepass_steady(check):
            return
        self._hg_plan = None
        self._hg_grads_bad = False
        self._hg_fused = set()
        self._hg_summed = set()  # the groups whose hyper-gradient a hand-written sums kernel made
        learned = self._hg_learned_vars()
        kept = [(hv, hv.grad) for hv in learned]

        def skipped():  # a non-finite gradient (check): everything as it was; the caller skips the step
            self._hg_grads_bad = True
            for hv, grad in kept:
                hv.grad = grad
        for hv in learned:
            hv.grad = [None] * len(hv.value)
            for r in hv.raw:
                r.grad = None
        # the gradients the hyper-gradients cover: a non-finite element makes their sums
        # non-finite (every closed form and vector-Jacobian product multiplies g_t element-wise)
        covered: set[int] = set()
        self._hg_covered = covered
        if not learned or self._hg_t <= self._hg_warmup:
            if check and not self._hg_grads_finite():
                skipped()
                return
            self._hg_ok = True
            if self._hg_shard_group is not None:  # every rank takes the same decision
                self._hg_ok = self._hg_agree(self._hg_grads_finite())
                self._hg_covered = {id(p) for g in self.param_groups for p in g["params"]}
            return
        if not fuse and self._hg_hypergrad_scalars():
            return
        owners: list = []
        acc: dict[tuple[int, int], Tensor] = {}

        def add(hv, idx, snap, val):
            key = (id(hv), idx)
            if key in acc:
                acc[key] = acc[key] + val
            else:
                acc[key] = val
                owners.append((hv, idx, snap))

        outs, gouts, leaves, leaf_owners = [], [], [], []
        leafmap: dict[int, Tensor] = {}
        for gi, group in enumerate(self.param_groups):
            vars, opts = self._hg_vars[gi], self._hg_opts[gi]
            names = tuple(n for n, hv in vars.items() if hv.learned)
            kind = self._hg_kind(gi)
            covers = not set(names) <= set(self.zero_hypergrad_names)
            if fuse and kind == "closed" and self._hg_compiles(gi) and \
                    self._hg_try(self._hg_onepass_group, gi, names, add, check):
                if self._hg_grads_bad:  # the kernel found a non-finite gradient and wrote nothing
                    skipped()
                    return
                self._hg_fused.add(gi)
                covered.update(id(p) for p in group["params"])
                check = False
                continue
            if check:  # the kernel did not run: its check, before anything else
                check = False
                if not self._hg_grads_finite():  # (covered is empty: the first and only group)
                    skipped()
                    return
            if kind != "autograd" and self._hg_compiles(gi) and not self._hg_lag:
                # a hand-written sums kernel of the closed form, else inductor's kernel
                done = kind == "closed" and self._hg_try(self._hg_sums_group, gi, names, add)
                if done:
                    self._hg_summed.add(gi)
                else:  # (a failed kernel turns compilation off: check again)
                    done = self._hg_compiles(gi) and self._hg_try(self._hg_terms_compiled, gi, kind, names, add)
                if done:
                    if covers:
                        covered.update(id(p) for p in group["params"])
                    continue
            # (a level above a one_pass bottom level: each tensor's record of its update before last)
            hcoef = self._hg_group_scalars(gi, "hyper_coefficients", 0) if kind == "closed" and not self._hg_lag \
                else None
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                rec = st.get(_PREV if self._hg_lag else _RECORD) if st else None
                if rec is None or p.grad is None:
                    continue
                if self._hg_lag and rec["kind"] != "autograd" and "state" not in rec:
                    # a record of the paper's order (a checkpoint saved with one_pass=False): it
                    # describes the last update, not the one before; no hyper-gradient this step
                    continue
                if covers:
                    covered.add(id(p))
                gt = self._hg_grad(p, opts)
                if rec["kind"] == "closed":
                    if "state" in rec:  # the update before last, at what it left (_hg_update_eager)
                        pc, sr = _compute(rec["p"]), rec["state"]
                    else:
                        pc, sr = _compute(p), st
                    if hcoef is not None:
                        terms = self.hyper_apply(gt, pc, sr, hcoef, opts, names)
                    else:
                        terms = self.hyper_terms(gt, pc, sr, rec["h"], opts, names)
                    vals = reduce_terms(terms, names, [vars[n].value[0].dtype for n in names],
                                        [vars[n].scope == "element" for n in names], p, rec["mask"])
                    for n, val in zip(names, vals):
                        hv = vars[n]
                        add(hv, 0 if len(hv.value) == 1 else i, rec["h"][n], val)
                    continue
                with torch.enable_grad():  # autograd through the update of the last step
                    h = {}
                    for n, snap in rec["h"].items():
                        hv = vars[n]
                        if hv.learned:
                            leaf = leafmap.get(id(snap))
                            if leaf is None:
                                leaf = snap.detach().requires_grad_(True)
                                leafmap[id(snap)] = leaf
                                leaves.append(leaf)
                                leaf_owners.append((hv, 0 if len(hv.value) == 1 else i, snap))
                            h[n] = leaf
                        else:
                            h[n] = snap
                    if rec["kind"] == "restore":
                        p0, g0, s0 = self.restore(_compute(p), st, rec["h"], opts)
                    else:
                        p0, g0, s0 = (_compute(p) if rec["p"] is None else rec["p"]), rec["g"], rec["state"]
                    new_p, _ = self.update(p0, g0, s0, h, opts)
                    b = self._hg_proj.get(p)
                    if b is not None:
                        new_p = new_p.clamp(b[0], b[1])
                if new_p.requires_grad:
                    outs.append(new_p)
                    gouts.append(gt.to(new_p.dtype))
        if leaves:
            grads = torch.autograd.grad(outs, leaves, gouts, allow_unused=True) if outs else [None] * len(leaves)
            for (hv, idx, snap), gr in zip(leaf_owners, grads):
                add(hv, idx, snap, torch.zeros_like(snap) if gr is None else gr)
        self._hg_ok = self._hg_store(owners, acc)
        if self._hg_fused == {0} and len(self.param_groups) == 1 and self._hg_shard_group is None and \
                self._hg_clip is None:
            # the route of a steady one-pass step: what _hg_onepass_steady takes for granted
            rec = self.state[self.param_groups[0]["params"][0]][_RECORD]
            self._hg_plan = [self._hg_vars[0], self._hg_opts[0], type(self).one_pass_kernel,
                             self._hg_onepass_memo[0], rec, learned,
                             tuple(n for n, hv in self._hg_vars[0].items() if hv.learned)]

    def _hg_grads_finite(self) -> bool:
        """Whether the gradients of this (bottom) level that no hyper-gradient covered are finite
        (one reduction and host sync, where there are any)."""
        covered = getattr(self, "_hg_covered", set())
        grads = [self._hg_check_grad(p.grad) for g in self.param_groups for p in g["params"]
                 if p.grad is not None and id(p) not in covered]
        if not grads:
            return True
        compiles = getattr(self, "_hg_compiles", None)  # (a wrapped torch optimizer has no compile option)
        if compiles is not None and any(compiles(gi) for gi in range(len(self.param_groups))):
            # float32 CPU tensors: a hand-written read of the bits (built by the toolchain that
            # compile=True uses; where that fails, the sums below)
            fast, rest = [], []
            for g in grads:
                (fast if _onepass.finite_kernel_applies(g) else rest).append(g)
            verdict = fast and self._hg_try(lambda: [_onepass.all_finite(fast)])  # [bool], or False
            if verdict:
                if not verdict[0]:
                    return False
                grads = rest
                if not grads:
                    return True
        # a sum is a read at memory speed (torch's CPU inf-norm and isfinite run 6-13x slower);
        # NaN and inf propagate into it. A finite sum proves the gradients finite; a non-finite one
        # may be an overflow of finite values, which the min and max tell apart.
        if _finite([g.sum() for g in grads]):
            return True
        return _finite([x for g in grads if g.numel() for x in torch.aminmax(g)])

    def _hg_checks_inside(self) -> bool:
        """Whether a ``one_pass`` step can leave the check of the gradients (``skip_nonfinite``) to
        ``_hg_hypergrad(check=True)``, which leaves it to the group's one-pass kernel where it runs:
        one param group (a kernel that found a non-finite gradient in a later group could not
        undo an earlier group's update) and not sharded (the ranks agree on the check before
        anything is written)."""
        return self._hg_shard_group is None and len(self.param_groups) == 1

    def _hg_agree(self, ok: bool, values: list | None = None):
        """On a level whose parameters are sharded over ``shard_group``: sum ``values`` (the
        partial hyper-gradient sums of this rank's shard, in place) over the group, and agree on
        ``ok`` (every rank skips a step together). Elsewhere: ``ok``."""
        group = self._hg_shard_group
        if group is None:
            return ok
        import torch.distributed as dist
        vals = values or []
        dev = vals[0].device if vals else self._hg_shard_device()
        flat = torch.stack([v.reshape(()).to(torch.float64) for v in vals] +
                           [torch.tensor(0.0 if ok else 1.0, dtype=torch.float64, device=dev)])
        dist.all_reduce(flat, group=None if group is True else group)
        for v, x in zip(vals, flat[:-1]):
            v.copy_(x)
        return bool(flat[-1] == 0)

    def _hg_shard_device(self):
        for g in self.param_groups:
            for p in g["params"]:
                return p.device
        import torch.distributed as dist
        return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def _hg_group_scalars(self, gi, attr, ahead):
        """The rule's scalars ``attr`` (``coefficients`` for the update, with the values now;
        ``hyper_coefficients`` for the closed form, with the values recorded at the last step),
        computed once for group ``gi`` where every tensor has a state with the same step count
        and the same single values; else None (each tensor then computes its own)."""
        if getattr(type(self), attr, None) is None or any(len(hv.value) != 1 for hv in self._hg_vars[gi].values()):
            return None
        params = self.param_groups[gi]["params"]
        states = []
        for p in params:
            st = self.state.get(p)
            if not st or p.grad is None or "step" not in st:
                return None
            states.append(st)
        if not states:
            return None
        step = self._hg_common_step(gi, states, attr)
        if step is None:
            return None
        if attr == "coefficients":
            h = {n: hv.value[0] for n, hv in self._hg_vars[gi].items()}
        else:
            recs = [st.get(_RECORD) for st in states]
            h = recs[0]["h"] if recs[0] is not None else None
            if h is None or any(r is None or r["kind"] != "closed" or (r["h"] is not h and any(
                    r["h"][n] is not x for n, x in h.items())) for r in recs):
                return None
        return getattr(self, attr)(h, step + ahead, self._hg_opts[gi])

    def _hg_float_scalars(self, gi, attr, h, hf, step, ahead):
        """The rule's scalars ``attr`` as Python floats (double precision, no tensor operations: a
        hand-written kernel takes its scalars as numbers), from the values ``h`` (tensors) given
        also as floats ``hf``, at step count ``step + ahead``; with tensors where a float
        division by zero stops that (a tensor gives inf)."""
        fn, opts = getattr(self, attr), self._hg_opts[gi]
        try:
            out = fn(hf, float(step) + ahead, opts)
        except (ZeroDivisionError, OverflowError):  # where a tensor gives inf
            out = fn(h, step + ahead, opts)
        return {k: float(x) for k, x in out.items()}

    def _hg_common_step(self, gi, states, attr="coefficients"):
        """The group's step tensor where the rule computes its scalars once per group (it has
        ``attr``, every hyperparameter of the group is a single value, and every tensor of the
        group has taken the same number of steps), else None."""
        if getattr(type(self), attr, None) is None or "step" not in states[0]:
            return None
        if not self._hg_aligned.get(gi):
            first = states[0]["step"]
            if not all(torch.equal(st["step"], first) for st in states[1:]):
                return None
            self._hg_aligned[gi] = True
        return states[0]["step"]

    def _hg_terms_compiled(self, gi, kind, names, add) -> bool:
        """The hyper-gradient of group ``gi`` as one compiled kernel; False where it does not
        apply (element scope, missing gradients or records, projected parameters)."""
        keys = self._hg_stable.get(gi)
        vars = self._hg_vars[gi]
        params = self.param_groups[gi]["params"]
        if not keys or not names or not params or any(vars[n].scope == "element" for n in names):
            return False
        states, gts = [], []
        for p in params:
            st = self.state.get(p)
            rec = st.get(_RECORD) if st else None
            if rec is None or p.grad is None or rec["kind"] != kind or rec["mask"] is not None:
                return False
            if len(st) - 1 - ("step" in st) != len(keys) or p.grad.is_sparse:
                return False
            states.append(st)
            gts.append(p.grad)
        all_names = tuple(vars)
        single = all(len(hv.value) == 1 for hv in vars.values())
        if single:
            hvals = [[states[0][_RECORD]["h"][n] for n in all_names]]
        else:
            hvals = [[st[_RECORD]["h"][n] for n in all_names] for st in states]
        dtypes = tuple(vars[n].value[0].dtype for n in names)
        step = self._hg_common_step(gi, states, "hyper_coefficients") if kind == "closed" and single else None
        tkeys = keys if step is not None or "step" not in states[0] else keys + ("step",)
        per_tensor = any(len(vars[n].value) > 1 for n in names)
        sums = self._hg_kernels_of(gi).terms(kind, gts, params, states, tkeys, hvals, all_names, names,
                                             self._hg_opts[gi], dtypes, step, per_tensor)
        if not per_tensor:  # one value per name for the whole group
            sums = [sums]
        for i, row in enumerate(sums):
            for n, val in zip(names, row):
                hv = vars[n]
                idx = 0 if len(hv.value) == 1 else i
                add(hv, idx, states[i][_RECORD]["h"][n], val)
        return True

    def _hg_kernel_group(self, gi, names, fn, recorded: bool):
        """The parameters, gradients and states of group ``gi`` where a hand-written kernel of the
        rule (``one_pass_kernel``) can take them, else None: names it does not cover, per-tensor
        values, projected parameters, missing gradients, tensors that are not float32 CPU tensors
        (``fn.applies``, which fills the group's memo for the kernel). ``recorded``: every tensor
        also has a closed-form record of its last update without a projection mask (the
        hyper-gradient kernels read it)."""
        opts = self._hg_opts[gi]
        if fn is None or not fn.covers(opts, names):
            return None
        vars = self._hg_vars[gi]
        params = self.param_groups[gi]["params"]
        if not self._hg_stable.get(gi) or not params or any(len(hv.value) != 1 for hv in vars.values()):
            return None
        states = list(map(self.state.get, params))
        grads = [p.grad for p in params]
        if any(not st for st in states) or any(g is None for g in grads) or \
                (self._hg_proj and any(p in self._hg_proj for p in params)):
            return None
        if recorded:
            for st in states:
                rec = st.get(_RECORD)
                if rec is None or rec["kind"] != "closed" or rec["mask"] is not None:
                    return None
        memo = self._hg_onepass_memo.setdefault(gi, {})
        # the paper's order asks twice in a step (its sums kernel, its update kernel), and nothing
        # touches the group in between: the second time, where the same gradients passed the
        # kernel's check in this step, the check is not made again (ids only: the memo keeps no
        # reference to a gradient)
        seen = (self._hg_step_id, tuple(map(id, grads)))
        if memo.get("passed") == seen:
            return params, grads, states
        memo.pop("passed", None)
        if not fn.applies(params, grads, states, memo):
            return None
        memo["passed"] = seen
        return params, grads, states

    def _hg_kernel_inputs(self, gi, names, fn):
        """What a hand-written kernel of the rule needs for the hyper-gradient of group ``gi``'s
        last update: the parameters, gradients, states (``_hg_kernel_group``), the shared record of
        the last update, its step count and the last update's scalars (floats); None where it
        does not apply (also: tensors whose steps are not aligned)."""
        got = self._hg_kernel_group(gi, names, fn, recorded=True)
        if got is None:
            return None
        params, grads, states = got
        # one record serves the group where its tensors have taken the same steps
        rec = states[0][_RECORD]
        h = rec["h"]
        step = self._hg_common_step(gi, states, "hyper_coefficients")
        if step is None or any(st[_RECORD] is not rec and any(st[_RECORD]["h"][n] is not x for n, x in h.items())
                               for st in states):
            return None
        hc = self._hg_float_scalars(gi, "hyper_coefficients", h, rec.get("hf") or {n: float(x) for n, x in h.items()},
                                    step, 0)
        return params, grads, states, h, step, hc

    def _hg_now_scalars(self, gi, step):
        """This update's values as floats and the rule's scalars from them (``coefficients`` at
        step ``step + 1``), for a hand-written kernel."""
        vars = self._hg_vars[gi]
        hf = {n: float(hv.value[0]) for n, hv in vars.items()}
        return hf, self._hg_float_scalars(gi, "coefficients", {n: hv.value[0] for n, hv in vars.items()}, hf, step, 1)

    def _hg_add_kernel_sums(self, gi, h, sums, add) -> None:
        vars = self._hg_vars[gi]
        for n, val in sums.items():
            v = vars[n].value[0]
            add(vars[n], 0, h[n], torch.scalar_tensor(val, dtype=v.dtype, device=v.device))

    def _hg_sums_group(self, gi, names, add) -> bool:
        """Group ``gi``'s hyper-gradient of the last update from the rule's hand-written sums
        kernel (``one_pass_kernel.hyper_sums``: one read of ``g_t`` and the state, nothing
        written), for the paper's order; False where it does not apply."""
        fn = getattr(type(self), "one_pass_kernel", None)
        if getattr(fn, "hyper_sums", None) is None:
            return False
        got = self._hg_kernel_inputs(gi, names, fn)
        if got is None:
            return False
        params, grads, states, h, _, hc = got
        self._hg_add_kernel_sums(gi, h, fn.hyper_sums(params, grads, states, hc, self._hg_opts[gi], names,
                                                      memo=self._hg_onepass_memo.get(gi)), add)
        return True

    def _hg_onepass_group(self, gi, names, add, check: bool = False) -> bool:
        """Group ``gi``'s hyper-gradient and this step's update in one pass (the rule's
        ``one_pass_kernel``); False where it does not apply (``_hg_kernel_inputs``). ``check``:
        the kernel reads the gradients first; where one is not finite it writes nothing, and
        ``_hg_grads_bad`` is set."""
        fn = getattr(type(self), "one_pass_kernel", None)
        got = self._hg_kernel_inputs(gi, names, fn)
        if got is None:
            return False
        params, grads, states, h, step, hc = got
        vars = self._hg_vars[gi]
        hf, c = self._hg_now_scalars(gi, step)  # the scalars of this update (the values now), as floats
        memo = self._hg_onepass_memo.get(gi)  # (what fn.applies checked in this step: _hg_kernel_inputs)
        sums = fn.run(params, grads, states, hc, c, self._hg_opts[gi], names, memo=memo, check=check)
        if sums is None:
            self._hg_grads_bad = True
            return True
        self._hg_add_kernel_sums(gi, h, sums, add)
        _onepass.advance_steps(states, memo)
        rec = {"kind": "closed", "h": {n: hv.value[0].detach().clone() for n, hv in vars.items()}, "mask": None,
               "hf": hf}  # the values as floats, for the next step's scalars
        for st in states:
            st[_RECORD] = rec
        return True

    def _hg_hypergrad_scalars(self) -> bool:
        """``_hg_hypergrad`` (after its warm-up) in Python floats where the level holds scalars
        (a hyper level's): every group of the closed form, whose rule has ``scalar_hyper_terms``
        (``_scalar_rule_of``), one-element float32 CPU parameters, gradients, records and saved
        state; no shards, no clip. The same numbers as the general loop and ``_hg_store`` (tested
        bit for bit): each term rounded as float32, the sum over a one-element tensor (``+ 0.0``:
        torch's sum starts from +0), the terms of a value added in the parameters' order, the
        raw-space gradients (``raw_grad_float``). False, with nothing written, where it does not
        apply (a float32 subnormal on the way included)."""
        fn = _scalar_rule_of(type(self), "scalar_hyper_terms", _TERMS_PARTS)
        if fn is None or self._hg_shard_group is not None or getattr(self, "_hg_clip", None) is not None:
            return False
        f32t, lag = torch.float32, self._hg_lag
        key = _PREV if lag else _RECORD
        zero = set(self.zero_hypergrad_names)

        def one(x):  # a one-element float32 CPU tensor's number, else None
            if isinstance(x, Tensor) and x.dtype is f32t and x.is_cpu and x.numel() == 1 and \
                    x.layout is torch.strided:
                return x.item()
            return None
        acc: dict = {}  # (id(hv), idx) -> [hv, idx, snap, sum], in the order of the first term
        hnum: dict = {}
        covered: set[int] = set()
        for gi, group in enumerate(self.param_groups):
            vars, opts = self._hg_vars[gi], self._hg_opts[gi]
            names = tuple(n for n, hv in vars.items() if hv.learned)
            if not names:
                continue
            # (a compiled group's sums are inductor's; element values keep the parameter's shape)
            if self._hg_kind(gi) != "closed" or (not lag and self._hg_compiles(gi)) or \
                    any(vars[n].value[0].dtype is not f32t or vars[n].scope == "element" for n in names):
                return False
            covers = not set(names) <= zero
            neg = bool(opts.get("maximize"))
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                rec = st.get(key) if st else None
                if rec is None or p.grad is None:
                    continue
                if lag and rec["kind"] != "autograd" and "state" not in rec:
                    continue  # (as the general loop: a record of the paper's order)
                if rec["kind"] != "closed":
                    return False
                g = one(p.grad)
                pc, sr = (rec["p"], rec["state"]) if "state" in rec else (p, st)
                xp = one(pc)
                if g is None or xp is None:
                    return False
                h = {}
                for n, v in rec["h"].items():  # (the records of a step share their copies)
                    x = hnum.get(id(v))
                    if x is None:
                        x = hnum[id(v)] = one(v)
                        if x is None:
                            return False
                    h[n] = x
                sf = {}
                for k, v in sr.items():
                    if k.startswith("hg_") and k not in (_RECORD, _PREV):
                        sf[k] = one(v)
                        if sf[k] is None:
                            return False
                terms = fn(-g if neg else g, xp, sf, h, opts, names)
                if terms is None:
                    return False
                m = rec["mask"]
                if m is not None and not (m.dtype is torch.bool and m.numel() == 1):
                    return False
                kept = m is None or bool(m.item())
                for n in names:
                    t = terms.get(n)
                    # torch.where(mask, t, 0), then the sum over one element (from +0)
                    val = (t if t is not None and kept else 0.0) + 0.0
                    hv = vars[n]
                    idx = 0 if len(hv.value) == 1 else i
                    a = acc.get((id(hv), idx))
                    if a is None:
                        acc[(id(hv), idx)] = [hv, idx, rec["h"][n], val]
                    else:
                        a[3] = f32(a[3] + val)
                        if _subnormal(a[3]):
                            return False
                if covers:
                    covered.add(id(p))
        self._hg_covered = covered
        self._hg_ok = self._hg_store(
            [(hv, idx, snap) for hv, idx, snap, _ in acc.values()],
            {(id(hv), idx): torch.scalar_tensor(val, dtype=f32t, device=hv.value[idx].device)
             for hv, idx, _, val in acc.values()})
        return True

    def _hg_onepass_steady(self, check: bool) -> bool:
        """``_hg_hypergrad(fuse=True, check=check)`` where the last step took the route of a steady
        one-pass step (one param group, its one-pass kernel, no shards, no clip: ``_hg_plan``)
        and nothing it depends on has changed since: the same numbers, records and counters as
        that route (tested bit for bit), without the decisions the general code makes again at
        every step (a fixed cost that a fused torch step does not have). The tensors are checked
        as there (``_hg_kernel_group``, ``_hg_kernel_inputs``). False, with nothing written,
        where the plan does not hold: the general code runs (and makes the plan anew)."""
        plan = getattr(self, "_hg_plan", None)
        if plan is None:
            return False
        vars, opts, fn, memo, rec, learned, names = plan
        if len(self.param_groups) != 1 or self._hg_vars[0] is not vars or self._hg_opts[0] is not opts or \
                self._hg_kinds.get(0) != "closed" or self._hg_t <= self._hg_warmup or \
                self._hg_shard_group is not None or self._hg_clip is not None or self._hg_proj or \
                not self._hg_stable.get(0) or type(self).one_pass_kernel is not fn or \
                self._hg_onepass_memo.get(0) is not memo or not self._hg_compiles(0) or \
                rec["kind"] != "closed" or rec["mask"] is not None:
            return False
        params = self.param_groups[0]["params"]
        if not params:
            return False
        states = list(map(self.state.get, params))
        grads = [p.grad for p in params]
        if any(st is None or st.get(_RECORD) is not rec for st in states) or any(g is None for g in grads):
            return False
        # (anything that raises, nothing written yet: the general code runs it under _hg_try,
        # which falls back and says so)
        h = rec["h"]
        try:
            memo.pop("passed", None)
            if not fn.applies(params, grads, states, memo):
                return False
            step = self._hg_common_step(0, states, "hyper_coefficients")
            if step is None:
                return False
            memo["passed"] = (self._hg_step_id, tuple(map(id, grads)))
            hc = self._hg_float_scalars(0, "hyper_coefficients", h,
                                        rec.get("hf") or {n: float(x) for n, x in h.items()}, step, 0)
            hf, c = self._hg_now_scalars(0, step)
            # (from here on as _hg_hypergrad: its kernel's route, then _hg_store)
            self._hg_fused = set()
            self._hg_summed = set()
            self._hg_covered = set()
            self._hg_grads_bad = False
            sums = fn.run(params, grads, states, hc, c, opts, names, memo=memo, check=check)
        except MemoryError:
            raise
        except Exception:
            return False
        for hv in learned:
            for r in hv.raw:
                r.grad = None
        if sums is None:  # a non-finite gradient, nothing written: the caller skips the step
            self._hg_grads_bad = True
            return True
        _onepass.advance_steps(states, memo)
        # the values this update used (the step runs under no_grad: a copy needs no detach)
        new = {"kind": "closed", "h": {n: hv.value[0].clone() for n, hv in vars.items()}, "mask": None, "hf": hf}
        for st in states:
            st[_RECORD] = new
        plan[4] = new
        for hv in learned:
            hv.grad = [None]
        owners, acc = [], {}
        for n, val in sums.items():  # (as _hg_add_kernel_sums)
            hv = vars[n]
            v = hv.value[0]
            owners.append((hv, 0, h[n]))
            acc[(id(hv), 0)] = torch.scalar_tensor(val, dtype=v.dtype, device=v.device)
        self._hg_ok = self._hg_store(owners, acc)
        self._hg_fused = {0}
        self._hg_covered = {id(p) for p in params}
        return True

    def _hg_store(self, owners, acc) -> bool:
        """Store value-space hyper-gradients; give the raw tensors their raw-space gradients;
        drop all of them for this step if any is non-finite. Returns whether the hyper-gradients
        and the gradients they do not cover were finite (agreed over ``shard_group``)."""
        done = set()
        finite = True
        clip = getattr(self, "_hg_clip", None)
        if getattr(self, "_hg_shard_group", None) is not None:
            # partial sums of this rank's shard: every rank holds every group and shared value
            # (zeros where its shard has no tensor of the group); per-tensor and per-element
            # values belong to the rank that holds the tensor
            vals = []
            for vars in self._hg_vars:
                for hv in vars.values():
                    if hv.learned and hv.scope in ("group", "shared"):
                        key = (id(hv), 0)
                        if key not in acc:
                            acc[key] = torch.zeros_like(hv.value[0])
                            owners.append((hv, 0, hv.value[0].detach().clone()))
                        if all(v is not acc[key] for v in vals):
                            vals.append(acc[key])
            ok = self._hg_agree(self._hg_grads_finite(), vals)
            if not ok:
                for k in acc:
                    acc[k] = acc[k] * float("nan")
            self._hg_covered = {id(p) for g in self.param_groups for p in g["params"]}
        for hv, idx, snap in owners:
            key = (id(hv), idx)
            if key in done:
                continue
            done.add(key)
            gq = acc[key]
            hv.grad[idx] = gq
            if clip is not None:  # the level above receives a clipped hyper-gradient
                gq = gq * torch.clamp(clip / (torch.linalg.vector_norm(gq) + 1e-30), max=1.0)
            r = hv.raw[idx]
            r.grad = _raw_grad(hv.transform, gq, snap, r)
        if acc:  # one check (and one host sync) per level: NaN/inf anywhere makes the sum non-finite
            vals = list(acc.values())
            if all(v.dim() == 0 and v.is_cpu for v in vals):
                finite = all(math.isfinite(v.item()) for v in vals)
            else:
                total = vals[0].sum() if len(vals) == 1 else torch.stack([v.sum() for v in vals]).sum()
                finite = bool(torch.isfinite(total))
        if not finite:
            self.hyper_steps_skipped += 1
            for hv, idx, _ in owners:
                hv.raw[idx].grad = None
        return finite

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        """torch's state dict, plus the raw (reparameterized) hyperparameter tensors, the
        records the next hyper-gradient needs, and the state of every level above."""
        self._hg_check_bound()
        sd = super().state_dict()
        state = {}
        records, prev = {}, {}
        for k, v in sd["state"].items():
            v = dict(v)
            rec = v.pop(_RECORD, None)
            if rec is not None:
                records[k] = rec
            rec = v.pop(_PREV, None)
            if rec is not None:
                prev[k] = rec
            state[k] = v
        sd["state"] = state
        sd["hypergrad"] = {
            "records": records,
            "records_prev": prev,
            "raw": [{n: [r.detach().clone() for r in hv.raw] for n, hv in vars.items()}
                    for vars in self._hg_vars],
            "hyper_steps_skipped": self.hyper_steps_skipped,
            "steps_skipped": self.steps_skipped,
            "t": self._hg_t,
            "hyper": None if self._hg_hyper is None else self._hg_hyper.state_dict(),
            "type": type(self).__name__,
            "learn": list(self._hg_learn),
        }
        return sd

    @staticmethod
    def _hg_place(param: Tensor, value: Tensor) -> Tensor:
        """Where ``load_state_dict`` puts a saved state tensor: state in the compute dtype (float32
        for half-precision parameters) on the parameter's device; scalars (``step``, NAdam's
        ``mu_product``) in their own dtype, where they were (the CPU, as torch.optim keeps them)."""
        if value.dim() == 0:
            return value if value.device.type == "cpu" else value.to(device=param.device)
        if not value.is_floating_point():
            return value.to(device=param.device)
        return value.to(dtype=compute_dtype(param.dtype), device=param.device)

    def _hg_check_loadable(self, sd: dict, extra: dict) -> None:
        """Say what differs between a saved optimizer and this one, before anything is loaded."""
        name = type(self).__name__
        learn = extra.get("learn")
        if learn is not None and list(learn) != list(self._hg_learn):
            raise ValueError(f"{name}.load_state_dict: the saved optimizer learns {list(learn)}, this one "
                             f"learns {list(self._hg_learn)}")
        for gi, (raws, vars) in enumerate(zip(extra["raw"], self._hg_vars)):
            if set(raws) != set(vars):
                raise ValueError(f"{name}.load_state_dict: param group {gi} saved hyperparameters "
                                 f"{sorted(raws)}, this optimizer has {sorted(vars)}")
            for n, saved in raws.items():
                hv = vars[n]
                shapes = [tuple(t.shape) for t in saved]
                mine = [tuple(t.shape) for t in hv.raw]
                if shapes != mine:
                    raise ValueError(f"{name}.load_state_dict: param group {gi}, {n}: saved {len(shapes)} value(s) "
                                     f"of shape(s) {shapes[:3]}{'...' if len(shapes) > 3 else ''}, this optimizer has "
                                     f"{len(mine)} of {mine[:3]}{'...' if len(mine) > 3 else ''} (a different scope?)")
        params = [p for g in self.param_groups for p in g["params"]]
        ids = [pid for sg in sd["param_groups"] for pid in sg["params"]]
        for i, (pid, p) in enumerate(zip(ids, params)):
            saved = sd["state"].get(pid)
            if not saved:
                continue
            gi = next(k for k, g in enumerate(self.param_groups) if any(q is p for q in g["params"]))
            expected = self.init_state(torch.empty_like(p, device="meta", dtype=compute_dtype(p.dtype)),
                                       self._hg_opts[gi])
            for k, v in saved.items():
                e = expected.get(k)
                if isinstance(v, Tensor) and isinstance(e, Tensor) and v.shape != e.shape:
                    raise ValueError(f"{name}.load_state_dict: parameter {i} (shape {tuple(p.shape)}): saved state "
                                     f"{k!r} has shape {tuple(v.shape)}, expected {tuple(e.shape)}: was it saved "
                                     f"for another model?")

    def load_state_dict(self, state_dict: dict) -> None:
        self._hg_check_bound()
        sd = dict(state_dict)
        extra = sd.pop("hypergrad", None)
        if extra is None:
            raise ValueError(f"{type(self).__name__}.load_state_dict: not a hypergrad state dict "
                             f"(no 'hypergrad' entry); was it saved from another optimizer?")
        if extra.get("type") != type(self).__name__:
            raise ValueError(f"{type(self).__name__}.load_state_dict: state dict was saved from "
                             f"{extra.get('type')}")
        if (extra["hyper"] is None) != (self._hg_hyper is None):
            raise ValueError(f"{type(self).__name__}.load_state_dict: the saved stack has "
                             f"{'no ' if extra['hyper'] is None else ''}hyper level, this one "
                             f"{'has' if self._hg_hyper is not None else 'has none'}")
        saved_groups = sd["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"loaded state dict has {len(saved_groups)} param groups, optimizer has "
                             f"{len(self.param_groups)}")
        for gi, (g, sg) in enumerate(zip(self.param_groups, saved_groups)):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError(f"param group {gi}: loaded state dict has {len(sg['params'])} "
                                 f"parameters, optimizer has {len(g['params'])}")
        self._hg_check_loadable(sd, extra)
        # torch would cast every floating-point state entry but "step" to the parameter's dtype
        # (lossy for the float32 state of half-precision parameters): place the state here
        super().load_state_dict(dict(sd, state={}))
        params = [p for g in self.param_groups for p in g["params"]]
        id2p = dict(zip([pid for sg in saved_groups for pid in sg["params"]], params))
        for pid, st in sd["state"].items():
            p = id2p[pid]
            self.state[p] = {k: self._hg_place(p, v) if isinstance(v, Tensor) else v for k, v in st.items()}
        for key, recs in ((_RECORD, extra["records"]), (_PREV, extra.get("records_prev", {}))):
            for pid, rec in recs.items():
                p = id2p[pid]
                self.state[p][key] = _to_device(rec, p.device)
        for gi, group in enumerate(self.param_groups):
            for name, hv in self._hg_vars[gi].items():
                self._hg_assign(hv, _get(group, hv.spec.key), gi)
                raws = extra["raw"][gi].get(name)
                if raws is not None and hv.transform.name is not None:
                    with torch.no_grad():
                        for r, s in zip(hv.raw, raws):
                            r.copy_(s)
                _set(group, hv.spec.key, hv.entry())
            self._hg_opts[gi] = self.options(group, self._hg_floats(gi))
        self._hg_kinds.clear()
        self._hg_stable.clear()
        self._hg_aligned.clear()
        for gi in range(len(self.param_groups)):  # a loaded state in its steady form compiles at once
            self._hg_stable[gi] = self._hg_steady_keys(gi)
        self.hyper_steps_skipped = int(extra.get("hyper_steps_skipped", 0))
        self.steps_skipped = int(extra.get("steps_skipped", 0))
        self._hg_t = int(extra.get("t", 0))
        if self._hg_hyper is not None:
            self._hg_hyper.load_state_dict(extra["hyper"])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def reduce_terms(terms: dict, names, dtypes, element, like: Tensor, mask: Tensor | None = None) -> list:
    """One value per name from a closed form's ``terms`` (``g_t * d x / d q`` element-wise):
    its sum over the tensor, or the element-wise values where ``element``; 0 for a name the
    closed form leaves out (a zero derivative)."""
    out = []
    for n, dt, el in zip(names, dtypes, element):
        t = terms.get(n)
        if t is None:
            out.append(torch.zeros(like.shape if el else (), dtype=dt, device=like.device))
            continue
        if mask is not None:  # where the projection clipped, the derivative is 0
            t = torch.where(mask, t, 0)
        out.append(t.to(dt) if el else t.sum(dtype=dt))
    return out


def drive(bottom, closure=None):
    """One step of the stack whose bottom level is ``bottom`` (see the module docstring)."""
    loss = None
    if closure is not None:
        with torch.enable_grad():
            loss = closure()
    levels = bottom.levels
    for lvl in levels:
        lvl._hg_t += 1
        lvl._hg_step_id = getattr(lvl, "_hg_step_id", 0) + 1  # (an optimizer pickled before it existed)
        lvl._hg_sync()
    if getattr(bottom, "_hg_one_pass", False):  # (a wrapped torch optimizer has no such option)
        return _drive_one_pass(bottom, levels, loss)
    for lvl in levels[:-1]:
        lvl._hg_hypergrad()
    ok = True
    if bottom._hg_skip_nonfinite:
        if len(levels) > 1 and bottom._hg_ok:
            # finite hyper-gradients: the gradients they cover are finite (agreed over shards)
            ok = bottom._hg_grads_finite()
        else:
            # one level, or non-finite hyper-gradients (their step is already dropped and
            # counted): from a non-finite gradient, or an overflow of finite ones; only the
            # first skips the step, so check every gradient
            bottom._hg_covered = set()
            ok = bottom._hg_agree(bottom._hg_grads_finite())
    if not ok:
        _skip(bottom, levels)
        return loss
    for k in range(len(levels) - 1, 0, -1):
        levels[k]._hg_update()
        levels[k - 1]._hg_refresh()
    bottom._hg_update()
    return loss


def _skip(bottom, levels) -> None:
    """A non-finite gradient: the whole step is skipped, as a GradScaler skips it (nothing
    changes: parameters, states, hyperparameters, step counts); counted."""
    for lvl in levels:
        lvl._hg_t -= 1
        for hv in lvl._hg_learned_vars():
            for r in hv.raw:
                r.grad = None
    bottom.steps_skipped += 1


def _drive_one_pass(bottom, levels, loss):
    """Step ``t`` of a stack whose bottom level has ``one_pass=True``: the bottom level computes
    the hyper-gradient of its last update and makes this step's update with the hyperparameters
    it has (one pass over memory where a one-pass kernel applies); then the levels above compute
    theirs and step top-down, and the new hyperparameters take effect at step ``t + 1``.

    The hyper-gradient of step ``t`` differentiates the update of step ``t - 1``, made with the
    hyperparameters that the hyper-step of step ``t - 2`` produced: each level above
    differentiates its update before last (``_PREV`` records; docs/math.md)."""
    check = bottom._hg_skip_nonfinite
    if check and not bottom._hg_checks_inside():
        # the update is in the same pass as the hyper-gradient that would reveal a non-finite
        # gradient: check the gradients first (one reduction over them)
        bottom._hg_covered = set()
        if not bottom._hg_agree(bottom._hg_grads_finite()):
            _skip(bottom, levels)
            return loss
        check = False
    # (check: the one group's one-pass kernel reads the gradients before it writes anything, or,
    # where it does not run, _hg_hypergrad checks them before anything else)
    bottom._hg_hypergrad(fuse=True, check=check)
    if bottom._hg_grads_bad:
        _skip(bottom, levels)
        return loss
    bottom._hg_update(skip=bottom._hg_fused)
    for lvl in levels[1:-1]:
        lvl._hg_hypergrad()
    for k in range(len(levels) - 1, 0, -1):
        levels[k]._hg_update()
        levels[k - 1]._hg_refresh()
    return loss


def _finite(xs: list) -> bool:
    """Whether every 0-dim tensor of ``xs`` is finite (one host sync per device)."""
    if len({x.device for x in xs}) == 1:
        return bool(torch.isfinite(torch.stack(xs)).all())
    return all(bool(torch.isfinite(x)) for x in xs)


def _all_finite(state: dict) -> bool:
    """Whether every floating-point tensor of ``state`` is finite."""
    ts = [v for v in state.values() if isinstance(v, Tensor) and v.is_floating_point()]
    # a hyper level's scalars: a read of the number costs less than a tensor reduction
    return all(math.isfinite(t.item()) if t.numel() == 1 and t.is_cpu else bool(torch.isfinite(t).all())
               for t in ts)


def _inward(lo: float, hi: float, dtype: torch.dtype) -> tuple[float, float]:
    """The bounds ``[lo, hi]`` as numbers of ``dtype`` that lie inside them (float32(0.01) is
    below 0.01: a value clamped to it would leave the bounds the user gave)."""
    out = []
    for x, toward in ((lo, math.inf), (hi, -math.inf)):
        if math.isfinite(x):
            t = torch.tensor(x, dtype=dtype)
            if (float(t) < x) if toward > 0 else (float(t) > x):
                t = torch.nextafter(t, torch.tensor(toward, dtype=dtype))
            x = float(t)
        out.append(x)
    return out[0], out[1]


def _get(group: dict, key):
    if isinstance(key, str):
        return group[key]
    return group[key[0]][key[1]]


def _set(group: dict, key, value) -> None:
    if isinstance(key, str):
        group[key] = value
    else:
        t = list(group[key[0]])
        t[key[1]] = value
        group[key[0]] = tuple(t)


def _as_floats(v, spec: Hyper, where: str) -> list[float]:
    if isinstance(v, Tensor):
        if v.numel() == 1:
            return [float(v.detach().reshape(()))]
        return [float(x) for x in v.detach().flatten().tolist()]
    if isinstance(v, (list, tuple)):
        out = []
        for x in v:
            out.extend(_as_floats(x, spec, where))
        return out
    try:
        return [float(v)]
    except (TypeError, ValueError):
        raise TypeError(f"{spec.label}{where} must be a number or a tensor, got {type(v).__name__}") from None


def _in_domain_t(x: Tensor, spec: Hyper) -> Tensor:
    lo = x > spec.lo if spec.lo_open else x >= spec.lo
    hi = x < spec.hi if spec.hi_open else x <= spec.hi
    return lo & hi


def _to_device(obj, device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj
