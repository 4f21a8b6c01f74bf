"""The built-in differentiable optimizers.

Each class is a thin constructor (torch-compatible arguments and checks) over a pure update rule
``update(p, g, state, h, opts) -> (new_p, new_state)``. The rules follow their reference
implementations operation by operation (``torch.optim``'s single-tensor code,
``pytorch_optimizer`` for Adan and Yogi, ``lion_pytorch`` for Lion), with the hyperparameters as
tensors so that autograd can differentiate through them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._onepass import AdamOnePass as _AdamOnePass
from .core import Hyper, HyperOptimizer, _subnormal, f32

__all__ = ["SGD", "Adagrad", "Adadelta", "RMSprop", "Adam", "AdamW", "NAdam", "Adan", "Yogi",
           "Lion", "Adafactor", "OPTIMIZERS"]

INF = math.inf


def _lr(**kw):
    return Hyper("lr", "lr", auto_reparam="log", doc="learning rate", **kw)


def _beta(name, key, default_learn=True, hi_open=True):
    # learned betas stay in [0.01, 0.9999] by default: the closed forms divide by them
    return Hyper(name, key, lo=0.0, hi=1.0, hi_open=hi_open, bounds=(0.01, 0.9999),
                 auto_reparam="logit", default_learn=default_learn)


def _eps(key="eps"):
    return Hyper("eps", key, default_learn=False, auto_reparam="log", doc="numerical stability term")


def _wd(key="weight_decay"):
    return Hyper("weight_decay", key, default_learn=False, doc="weight decay")


def _on(v) -> bool:
    """A structural switch: on where the value is non-zero or learned (None)."""
    return v is None or v != 0


def _scalar_dtype():
    # as torch.optim: step counters are float32 unless the default dtype is float64
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _step0():
    return torch.zeros((), dtype=_scalar_dtype())


class _SafeSqrt(torch.autograd.Function):
    """sqrt whose derivative is 0 where its input is 0. A second moment is 0 only where the
    gradient and the old moment are 0, and there its derivative in every hyperparameter is 0
    too: the true product 0 * inf is 0, autograd's would be NaN."""

    @staticmethod
    def forward(x):
        return torch.sqrt(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return torch.where(y > 0, grad / (2 * y), torch.zeros_like(grad))


def _sqrt(x: Tensor) -> Tensor:
    return _SafeSqrt.apply(x) if torch.is_grad_enabled() and x.requires_grad else torch.sqrt(x)


def _lerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    if isinstance(w, Tensor) and w.dim() and w.dtype != a.dtype:
        return a + w * (b - a)
    return torch.lerp(a, b, w)


def _positive(vars: dict, *names, values: dict | None = None):
    """For ``closed_form_ok``: the hyperparameters a rule's closed form or restore divides by
    stay > 0 (learned: their lower projection bound; fixed: their value)."""
    for n in names:
        hv = vars[n]
        lo = hv.lo if hv.learned else min(float(v.min()) for v in hv.value)
        if not lo > 0:
            return _No(f"it divides by {n}, which can be 0 here (learned: raise its lower bound above 0)")
    return True


class _No:
    """A false answer with a reason."""

    def __init__(self, reason):
        self.reason = reason

    def __bool__(self):
        return False


def _save_g(o, new, g):
    if o.get("hg_save"):  # restore rebuilds the last update's inputs from it
        new["hg_g"] = g


def _unlerp(new, x, w):
    """The ``a`` of ``new = lerp(a, x, w)`` (``w < 1``)."""
    return (new - w * x) / (1 - w)


def _refuse(name: str, **flags) -> None:
    for k, v in flags.items():
        if v:
            raise ValueError(f"{name} does not support {k}={v!r}; hypergrad picks its own kernels")


class _HO(HyperOptimizer):
    """Shared bits: default ``learn`` may depend on the constructor's values."""

    _off_when_zero: tuple[str, ...] = ()

    def __init__(self, params, defaults, **hg):
        if hg.get("hyper") is not None and hg.get("learn") is None:
            learn = [h.name for h in self.hypers if h.default_learn and h.learnable
                     and not (h.name in self._off_when_zero and _get_default(defaults, h) == 0)]
            hg["learn"] = learn
        for h in self.hypers:
            v = _get_default(defaults, h)
            if isinstance(v, (int, float)) and not h.in_domain(float(v)):
                raise ValueError(f"Invalid {h.label} = {v:g}: must be in {h.domain_str()}")
        super().__init__(params, defaults, **hg)


def _get_default(defaults, h: Hyper):
    v = defaults[h.key] if isinstance(h.key, str) else defaults[h.key[0]][h.key[1]]
    return float(v) if isinstance(v, (int, float)) or (isinstance(v, Tensor) and v.numel() == 1) else v


# ------------------------------------------------------------------------------------ SGD


class SGD(_HO):
    r"""Stochastic gradient descent with momentum, dampening, Nesterov and weight decay,
    as ``torch.optim.SGD``:

    .. math::
        g \leftarrow g + \lambda p,\quad
        b \leftarrow \mu b + (1-\tau) g \;(b_1 = g),\quad
        g \leftarrow g + \mu b \text{ (Nesterov) or } b,\quad
        p \leftarrow p - \eta g

    Learnable: ``lr`` and ``momentum`` (default, where momentum is non-zero), ``dampening``,
    ``weight_decay``. Learning ``momentum`` from 0 keeps a momentum buffer (which equals
    torch's behaviour while momentum is 0).
    """

    hypers = (
        _lr(),
        Hyper("momentum", "momentum", bounds=(0.0, 0.9999), auto_reparam="logit"),
        Hyper("dampening", "dampening", lo=-INF, default_learn=False, bounds=(0.0, 1.0)),
        _wd(),
    )
    _off_when_zero = ("momentum",)

    def __init__(self, params=None, lr=1e-3, momentum=0, dampening=0, weight_decay=0,
                 nesterov=False, *, maximize=False, foreach=None, differentiable=False,
                 fused=None, **hg):
        _refuse("SGD", differentiable=differentiable, fused=fused)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, foreach=foreach), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], nesterov=group["nesterov"],
                    momentum=_on(v["momentum"]), wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        return {}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        if o["wd"]:
            g = g + h["weight_decay"] * p
        new = {}
        if o.get("hg_save"):  # for the closed form: the effective gradient, the old buffer
            new["hg_gprev"] = g
        if o["momentum"]:
            buf = s.get("momentum_buffer")
            if buf is not None and o.get("hg_save"):
                new["hg_bufprev"] = buf
            buf = g.clone() if buf is None else buf * h["momentum"] + (1 - h["dampening"]) * g
            new["momentum_buffer"] = buf
            g = g + h["momentum"] * buf if o["nesterov"] else buf
        return p - h["lr"] * g, new

    scalar_saves = ("hg_gprev",)  # update's hg_save state where scalar_update applies: g

    @staticmethod
    def scalar_update(p: float, g: float, h: dict, o: dict) -> float | None:
        """``update`` of a one-element float32 parameter without state, in floats: ``p - lr * g``
        with each operation rounded as float32 (``f32``); None with momentum or weight decay, or
        where a number is a float32 subnormal (which torch may flush to zero)."""
        if o["momentum"] or o["wd"]:
            return None
        lr = h["lr"]
        u = f32(lr * g)
        x = f32(p - u)
        return None if _subnormal(p, g, lr, u, x) else x

    @staticmethod
    def scalar_hyper_terms(gt: float, p: float, s: dict, h: dict, o: dict, names) -> dict | None:
        """``hyper_terms`` of a one-element float32 parameter, in floats (``f32``): lr's
        ``-g_t d_s`` with ``d_s`` the gradient saved; None with momentum or weight decay, for
        another name, or where a number is a float32 subnormal."""
        if o["momentum"] or o["wd"] or any(n != "lr" for n in names):
            return None
        ge = s["hg_gprev"]
        t = f32(-gt * ge)
        return None if _subnormal(gt, ge, t) else {"lr": t}

    @staticmethod
    def hyper_terms(gt, p, s, h, o, names):
        """d x_s / d q times g_t from the state after step s (x_s = x_{s-1} - lr d_s)."""
        lr, mu = h["lr"], h["momentum"]
        ge = s["hg_gprev"]
        first = "hg_bufprev" not in s
        if o["momentum"]:
            buf = s["momentum_buffer"]
            d = ge + mu * buf if o["nesterov"] else buf
        else:
            d = ge
        out = {"lr": -gt * d}
        if o["momentum"] and not first:
            bp = s["hg_bufprev"]
            if "momentum" in names:
                out["momentum"] = -lr * gt * (buf + mu * bp if o["nesterov"] else bp)
            if "dampening" in names:
                out["dampening"] = lr * gt * (mu * ge if o["nesterov"] else ge)
        elif o["momentum"] and o["nesterov"] and "momentum" in names:
            out["momentum"] = -lr * gt * buf
        if "weight_decay" in names:
            xprev = p + lr * d
            if o["momentum"]:
                dbuf = xprev if first else (1 - h["dampening"]) * xprev
                dd = xprev + mu * dbuf if o["nesterov"] else dbuf
            else:
                dd = xprev
            out["weight_decay"] = -lr * gt * dd
        return out


# ------------------------------------------------------------------------------------ Adagrad


class Adagrad(_HO):
    r"""Adagrad as ``torch.optim.Adagrad``:
    :math:`s \leftarrow s + g^2,\; p \leftarrow p - \frac{\eta}{1+(t-1)\delta}\, g/(\sqrt{s}+\epsilon)`.

    Learnable: ``lr`` (default), ``lr_decay``, ``eps``, ``weight_decay``."""

    hypers = (_lr(), Hyper("lr_decay", "lr_decay", default_learn=False), _wd(), _eps())

    def __init__(self, params=None, lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0,
                 eps=1e-10, foreach=None, *, maximize=False, differentiable=False, fused=None, **hg):
        _refuse("Adagrad", differentiable=differentiable, fused=fused)
        if not 0.0 <= initial_accumulator_value:
            raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      foreach=foreach, maximize=maximize), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], wd=_on(v["weight_decay"]),
                    init=float(group["initial_accumulator_value"]))

    @staticmethod
    def init_state(p, o):
        return {"step": _step0(), "sum": torch.full_like(p, o["init"])}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        step = s["step"] + 1
        if o["wd"]:
            g = g + h["weight_decay"] * p
        clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
        ssum = s["sum"] + g * g
        std = _sqrt(ssum) + h["eps"]
        new = {"step": step, "sum": ssum}
        _save_g(o, new, g)
        return p - clr * (g / std), new

    @staticmethod
    def restore(p, s, h, o):
        g = s["hg_g"]
        step = s["step"] - 1
        clr = h["lr"] / (1 + step * h["lr_decay"])
        p0 = p + clr * (g / (torch.sqrt(s["sum"]) + h["eps"]))
        if o["wd"]:
            g = g - h["weight_decay"] * p0
        return p0, g, {"step": step, "sum": s["sum"] - s["hg_g"] * s["hg_g"]}


# ------------------------------------------------------------------------------------ Adadelta


class Adadelta(_HO):
    r"""Adadelta as ``torch.optim.Adadelta``:
    :math:`v \leftarrow \rho v + (1-\rho) g^2,\; \Delta = \sqrt{u+\epsilon}/\sqrt{v+\epsilon}\, g,\;
    u \leftarrow \rho u + (1-\rho)\Delta^2,\; p \leftarrow p - \eta \Delta`.

    Learnable: ``lr``, ``rho`` (default), ``eps``, ``weight_decay``."""

    hypers = (_lr(), Hyper("rho", "rho", hi=1.0, bounds=(0.01, 0.9999), auto_reparam="logit"),
              _eps(), _wd())

    def __init__(self, params=None, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0, foreach=None, *,
                 capturable=False, maximize=False, differentiable=False, **hg):
        _refuse("Adadelta", capturable=capturable, differentiable=differentiable)
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      foreach=foreach, maximize=maximize), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        return {"step": _step0(), "square_avg": torch.zeros_like(p), "acc_delta": torch.zeros_like(p)}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        rho, eps = h["rho"], h["eps"]
        if o["wd"]:
            g = g + h["weight_decay"] * p
        sq = s["square_avg"] * rho + (1 - rho) * g * g
        std = _sqrt(sq + eps)
        delta = _sqrt(s["acc_delta"] + eps) / std * g
        acc = s["acc_delta"] * rho + (1 - rho) * delta * delta
        new = {"step": s["step"] + 1, "square_avg": sq, "acc_delta": acc}
        _save_g(o, new, g)
        return p - h["lr"] * delta, new

    def closed_form_ok(self, o, vars):
        return _positive(vars, "rho")

    @staticmethod
    def restore(p, s, h, o):
        rho, eps, g = h["rho"], h["eps"], s["hg_g"]
        sq, acc = s["square_avg"], s["acc_delta"]
        # delta^2 = (acc_old + eps) k with k = g^2 / (sq + eps), and acc = rho acc_old + (1 - rho) delta^2
        k = g * g / (sq + eps)
        delta2 = (acc + rho * eps) * k / (rho + (1 - rho) * k)
        delta = torch.sign(g) * torch.sqrt(delta2)
        p0 = p + h["lr"] * delta
        state = {"step": s["step"] - 1, "square_avg": (sq - (1 - rho) * g * g) / rho,
                 "acc_delta": (acc - (1 - rho) * delta2) / rho}
        if o["wd"]:
            g = g - h["weight_decay"] * p0
        return p0, g, state


# ------------------------------------------------------------------------------------ RMSprop


class RMSprop(_HO):
    r"""RMSprop as ``torch.optim.RMSprop`` (centered and momentum variants):
    :math:`v \leftarrow \alpha v + (1-\alpha) g^2,\; d = \sqrt{v - \bar g^2} + \epsilon,\;
    b \leftarrow \mu b + g/d,\; p \leftarrow p - \eta b`.

    Learnable: ``lr``, ``alpha``, ``momentum`` (default, where non-zero), ``eps``,
    ``weight_decay``."""

    hypers = (_lr(), Hyper("alpha", "alpha", bounds=(0.01, 0.9999), auto_reparam="logit"), _eps(), _wd(),
              Hyper("momentum", "momentum", bounds=(0.0, 0.9999), auto_reparam="logit"))
    _off_when_zero = ("momentum",)

    def __init__(self, params=None, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0,
                 centered=False, capturable=False, foreach=None, maximize=False,
                 differentiable=False, **hg):
        _refuse("RMSprop", capturable=capturable, differentiable=differentiable)
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered, foreach=foreach,
                                      maximize=maximize), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], centered=group["centered"],
                    momentum=_on(v["momentum"]), wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        s = {"step": _step0(), "square_avg": torch.zeros_like(p)}
        if o["momentum"]:
            s["momentum_buffer"] = torch.zeros_like(p)
        if o["centered"]:
            s["grad_avg"] = torch.zeros_like(p)
        return s

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        alpha = h["alpha"]
        if o["wd"]:
            g = g + h["weight_decay"] * p
        new = {"step": s["step"] + 1}
        sq = s["square_avg"] * alpha + (1 - alpha) * g * g
        new["square_avg"] = sq
        if o["centered"]:
            ga = _lerp(s["grad_avg"], g, 1 - alpha)
            new["grad_avg"] = ga
            avg = _sqrt(sq - ga * ga)
        else:
            avg = _sqrt(sq)
        avg = avg + h["eps"]
        if o["momentum"]:
            if o.get("hg_save"):  # restore takes the gradient from the buffers, not from a copy
                new["hg_buf"] = s["momentum_buffer"]
            buf = s["momentum_buffer"] * h["momentum"] + g / avg
            new["momentum_buffer"] = buf
            return p - h["lr"] * buf, new
        _save_g(o, new, g)
        return p - h["lr"] * (g / avg), new

    def closed_form_ok(self, o, vars):
        return _positive(vars, "alpha")

    @staticmethod
    def restore(p, s, h, o):
        alpha = h["alpha"]
        sq = s["square_avg"]
        if o["centered"]:
            ga = s["grad_avg"]
            avg = torch.sqrt(sq - ga * ga) + h["eps"]
        else:
            avg = torch.sqrt(sq) + h["eps"]
        state = {"step": s["step"] - 1}
        if o["momentum"]:
            buf0 = s["hg_buf"]
            g = (s["momentum_buffer"] - h["momentum"] * buf0) * avg
            state["momentum_buffer"] = buf0
            p0 = p + h["lr"] * s["momentum_buffer"]
        else:
            g = s["hg_g"]
            p0 = p + h["lr"] * (g / avg)
        state["square_avg"] = (sq - (1 - alpha) * g * g) / alpha
        if o["centered"]:
            state["grad_avg"] = (ga - (1 - alpha) * g) / alpha
        if o["wd"]:
            g = g - h["weight_decay"] * p0
        return p0, g, state


# ------------------------------------------------------------------------------------ Adam family


class Adam(_HO):
    r"""Adam as ``torch.optim.Adam`` (AMSGrad, coupled or decoupled weight decay):

    .. math::
        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        p \leftarrow p - \frac{\eta}{1-\beta_1^t}\,
        \frac{m}{\sqrt{\hat v}/\sqrt{1-\beta_2^t} + \epsilon}

    with :math:`\hat v = \max(\hat v, v)` under AMSGrad and :math:`\hat v = v` otherwise.
    Learnable: ``lr``, ``beta1``, ``beta2`` (default), ``eps``, ``weight_decay``.
    """

    hypers = (_lr(), _beta("beta1", ("betas", 0)), _beta("beta2", ("betas", 1)), _eps(), _wd())
    _decoupled_default = False

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, foreach=None, maximize=False, capturable=False,
                 differentiable=False, fused=None, decoupled_weight_decay=False, **hg):
        _refuse(type(self).__name__, capturable=capturable, differentiable=differentiable, fused=fused)
        if len(tuple(betas)) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      amsgrad=amsgrad, maximize=maximize, foreach=foreach,
                                      decoupled_weight_decay=decoupled_weight_decay), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], amsgrad=group["amsgrad"],
                    decoupled=group["decoupled_weight_decay"], wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        s = {"step": _step0(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        if o["amsgrad"]:
            s["max_exp_avg_sq"] = torch.zeros_like(p)
        return s

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def coefficients(h, step, o):
        """The scalars of update number ``step`` (computed once per group, outside the loop)."""
        lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
        c = {"step": step, "w1": 1 - b1, "b2": b2, "w2": 1 - b2, "eps": h["eps"],
             "step_size": lr / (1 - b1 ** step), "ibc2_sqrt": (1 - b2 ** step) ** -0.5}
        if o["wd"]:
            c["wd"] = h["weight_decay"]
            if o["decoupled"]:
                c["decay"] = 1 - lr * h["weight_decay"]
        return c

    @staticmethod
    def apply(p, g, s, c, o):
        """The element-wise part of the update, given ``coefficients``."""
        if o["wd"]:
            if o["decoupled"]:
                p = p * c["decay"]
            else:
                g = g + c["wd"] * p
        m = _lerp(s["exp_avg"], g, c["w1"])
        v = s["exp_avg_sq"] * c["b2"] + c["w2"] * g * g
        new = {"step": c["step"], "exp_avg": m, "exp_avg_sq": v}
        if o.get("hg_save"):  # the closed form reconstructs m_{s-1}, v_{s-1} from it
            new["hg_gprev"] = g
        if o["amsgrad"]:
            v = torch.maximum(s["max_exp_avg_sq"], v)
            new["max_exp_avg_sq"] = v
        denom = _sqrt(v) * c["ibc2_sqrt"] + c["eps"]
        return p - c["step_size"] * (m / denom), new

    @staticmethod
    def update(p, g, s, h, o):
        return Adam.apply(p, g, s, Adam.coefficients(h, s["step"] + 1, o), o)

    def closed_form_ok(self, o, vars):
        # m_{s-1} = (m_s - (1 - beta1) g_s) / beta1, and so for v: learned betas must stay > 0
        return all(vars[n].lo > 0 for n in ("beta1", "beta2") if vars[n].learned)

    @staticmethod
    def hyper_coefficients(h, t, o):
        """The scalars of the closed form for the update number ``t``."""
        lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
        bc1 = 1 - b1 ** t
        bc2 = 1 - b2 ** t
        c = {"lr": lr, "ibc1": 1 / bc1, "isb2": bc2 ** -0.5, "sa": lr / bc1, "ib1": 1 / b1, "ib2": 1 / b2,
             "k1": t * b1 ** (t - 1) / bc1, "k2": t * b2 ** (t - 1) / bc2, "eps": h["eps"],
             "w1": 1 - b1, "w2": 1 - b2, "wd": h["weight_decay"], "ieps": 1 / h["eps"]}
        if o["wd"] and o["decoupled"]:
            c["idecay"] = 1 / (1 - lr * h["weight_decay"])
        return c

    @staticmethod
    def hyper_apply(gt, p, s, c, o, names):
        """g_t * d x_s / d q, element-wise, for x_s = x_{s-1} - lr/bc1 * m/(sqrt(v/bc2) + eps),
        from m_s, v_s and the effective gradient g_s of step s (docs/math.md derives them)."""
        m, v, gs = s["exp_avg"], s["exp_avg_sq"], s["hg_gprev"]
        vv = s["max_exp_avg_sq"] if o["amsgrad"] else v
        r = torch.sqrt(vv)
        d = r * c["isb2"] + c["eps"]
        pos = r > 0
        q = 1 / torch.where(pos, r * d, 1)   # one division for 1/d and 1/r (it is the costly op)
        inv_d = torch.where(pos, r * q, c["ieps"])   # where r = 0, d = eps
        a = m * inv_d                      # x_s = x_{s-1} - sa * a
        sa = c["sa"]
        dec = o["wd"] and o["decoupled"]
        out = {}
        xprev = None
        if "weight_decay" in names or (dec and "lr" in names):
            xprev = p + sa * a
            if dec:
                xprev = xprev * c["idecay"]
        if "lr" in names:
            dlr = -a * c["ibc1"]
            out["lr"] = gt * (dlr - c["wd"] * xprev if dec else dlr)
        if "beta1" in names:
            out["beta1"] = -sa * gt * inv_d * ((m - gs) * c["ib1"] + m * c["k1"])
        # d x_s / d sqrt(vv / bc2) = sa * a * inv_d; d sqrt(vv / bc2) = half * d(vv) (+ bias term)
        if "beta2" in names or "weight_decay" in names:
            half = torch.where(pos, 0.5 * c["isb2"] * d * q, 0)   # 0.5 isb2 / r
            ams = (v >= vv) if o["amsgrad"] else None   # vv moves with v only where v is the max
        if "beta2" in names:
            dv = (v - gs * gs) * c["ib2"]
            if ams is not None:
                dv = torch.where(ams, dv, 0)
            out["beta2"] = sa * gt * a * inv_d * half * (dv + vv * c["k2"])
        if "eps" in names:
            out["eps"] = sa * gt * a * inv_d
        if "weight_decay" in names:
            if dec:
                out["weight_decay"] = -c["lr"] * gt * xprev
            else:  # g_s = grad + wd x_{s-1}
                dv = c["w2"] * 2 * gs * xprev
                if ams is not None:
                    dv = torch.where(ams, dv, 0)
                out["weight_decay"] = -sa * gt * (c["w1"] * xprev * inv_d - a * inv_d * half * dv)
        return out

    @staticmethod
    def hyper_terms(gt, p, s, h, o, names):
        return Adam.hyper_apply(gt, p, s, Adam.hyper_coefficients(h, s["step"], o), o, names)

    one_pass_kernel = _AdamOnePass  # one_pass=True on the CPU: hyper-gradient and update in one loop


class AdamW(Adam):
    """AdamW as ``torch.optim.AdamW``: Adam with decoupled weight decay
    :math:`p \\leftarrow p (1 - \\eta \\lambda)` (default ``weight_decay=1e-2``)."""

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 amsgrad=False, *, maximize=False, foreach=None, capturable=False,
                 differentiable=False, fused=None, **hg):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused, decoupled_weight_decay=True, **hg)


class NAdam(_HO):
    r"""NAdam as ``torch.optim.NAdam``, with momentum schedule
    :math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})`.

    Learnable: ``lr``, ``beta1``, ``beta2`` (default), ``eps``, ``weight_decay``,
    ``momentum_decay``."""

    hypers = (_lr(), _beta("beta1", ("betas", 0)), _beta("beta2", ("betas", 1)), _eps(), _wd(),
              Hyper("momentum_decay", "momentum_decay", default_learn=False))

    def __init__(self, params=None, lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 momentum_decay=4e-3, decoupled_weight_decay=False, *, foreach=None, maximize=False,
                 capturable=False, differentiable=False, **hg):
        _refuse("NAdam", capturable=capturable, differentiable=differentiable)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize, foreach=foreach), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], decoupled=group["decoupled_weight_decay"],
                    wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        return {"step": _step0(), "mu_product": torch.ones((), dtype=_scalar_dtype()),
                "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        lr, b1, b2, psi = h["lr"], h["beta1"], h["beta2"], h["momentum_decay"]
        step = s["step"] + 1
        bc2 = 1 - b2 ** step
        if o["wd"]:
            if o["decoupled"]:
                p = p * (1 - lr * h["weight_decay"])
            else:
                g = g + h["weight_decay"] * p
        mu = b1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = s["mu_product"] * mu
        m = _lerp(s["exp_avg"], g, 1 - b1)
        v = s["exp_avg_sq"] * b2 + (1 - b2) * g * g
        denom = _sqrt(v / bc2) + h["eps"]
        mu_product_next = mu_product * mu_next
        p = p + (-lr * (1.0 - mu) / (1.0 - mu_product)) * (g / denom)
        p = p + (-lr * mu_next / (1.0 - mu_product_next)) * (m / denom)
        new = {"step": step, "mu_product": mu_product, "exp_avg": m, "exp_avg_sq": v}
        _save_g(o, new, g)
        return p, new

    def closed_form_ok(self, o, vars):
        return _positive(vars, "beta1", "beta2")

    @staticmethod
    def restore(p, s, h, o):
        lr, b1, b2, psi = h["lr"], h["beta1"], h["beta2"], h["momentum_decay"]
        g, m, v, step = s["hg_g"], s["exp_avg"], s["exp_avg_sq"], s["step"]
        mu = b1 * (1.0 - 0.5 * 0.96 ** (step * psi))
        mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((step + 1) * psi))
        mu_product = s["mu_product"]
        denom = torch.sqrt(v / (1 - b2 ** step)) + h["eps"]
        p0 = (p + (lr * (1.0 - mu) / (1.0 - mu_product)) * (g / denom)
              + (lr * mu_next / (1.0 - mu_product * mu_next)) * (m / denom))
        if o["wd"] and o["decoupled"]:
            p0 = p0 / (1 - lr * h["weight_decay"])
        state = {"step": step - 1, "mu_product": mu_product / mu, "exp_avg": (m - (1 - b1) * g) / b1,
                 "exp_avg_sq": (v - (1 - b2) * g * g) / b2}
        if o["wd"] and not o["decoupled"]:
            g = g - h["weight_decay"] * p0
        return p0, g, state


class Adan(_HO):
    r"""Adan (Xie et al.) as ``pytorch_optimizer.Adan`` (same arguments and defaults):

    .. math::
        d = g - g_{prev}\,(d_1 = 0),\; m \leftarrow \beta_1 m + (1-\beta_1) g,\;
        n \leftarrow \beta_2 n + (1-\beta_2) d,\; v \leftarrow \beta_3 v + (1-\beta_3)(g + \beta_2 d)^2,

    .. math::
        p \leftarrow p - \eta\Big(\frac{m}{1-\beta_1^t} + \frac{\beta_2 n}{1-\beta_2^t}\Big)
        \Big/ \Big(\frac{\sqrt v}{\sqrt{1-\beta_3^t}} + \epsilon\Big)

    then ``p / (1 + lr * weight_decay)`` (or ``p * (1 - lr * weight_decay)`` before the update with
    ``weight_decouple=True``). Note the naming: Adan's ``beta2`` weights the gradient difference and
    ``beta3`` the second moment (MADA calls these beta3 and beta2). Learnable: ``lr`` and the three
    betas (default), ``eps``, ``weight_decay``. Global gradient clipping (``max_grad_norm``) is
    left to ``torch.nn.utils.clip_grad_norm_``.
    """

    hypers = (_lr(), _beta("beta1", ("betas", 0)), _beta("beta2", ("betas", 1)),
              _beta("beta3", ("betas", 2), hi_open=False), _eps(), _wd())

    def __init__(self, params=None, lr=1e-3, betas=(0.98, 0.92, 0.99), weight_decay=0.0,
                 weight_decouple=False, max_grad_norm=0.0, foreach=None, eps=1e-8, maximize=False,
                 **hg):
        if max_grad_norm:
            raise ValueError("Adan: max_grad_norm is not supported; clip with "
                             "torch.nn.utils.clip_grad_norm_ before step()")
        if len(tuple(betas)) != 3:
            raise ValueError(f"Adan: betas must be (beta1, beta2, beta3), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, eps=eps, maximize=maximize,
                                      foreach=foreach), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], decouple=group["weight_decouple"],
                    wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        return {"step": _step0(), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p),
                "exp_avg_diff": torch.zeros_like(p)}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        lr, b1, b2, b3, eps = h["lr"], h["beta1"], h["beta2"], h["beta3"], h["eps"]
        step = s["step"] + 1
        prev = s.get("previous_grad")
        diff = torch.zeros_like(g) if prev is None else g - prev
        m = _lerp(s["exp_avg"], g, 1 - b1)
        n = _lerp(s["exp_avg_diff"], diff, 1 - b2)
        ghat = diff * b2 + g
        v = s["exp_avg_sq"] * b3 + (1 - b3) * ghat * ghat
        denom = _sqrt(v) / (1 - b3 ** step).sqrt() + eps
        if o["wd"] and o["decouple"]:
            p = p * (1 - lr * h["weight_decay"])
        p = p - lr / (1 - b1 ** step) * (m / denom)
        p = p - lr * b2 / (1 - b2 ** step) * (n / denom)
        if o["wd"] and not o["decouple"]:
            p = p / (1 + lr * h["weight_decay"])
        new = {"step": step, "exp_avg": m, "exp_avg_sq": v, "exp_avg_diff": n, "previous_grad": g.clone()}
        if o.get("hg_save") and prev is not None:  # restore needs the gradient before
            new["hg_gprev"] = prev
        return p, new

    def closed_form_ok(self, o, vars):
        return _positive(vars, "beta1", "beta2", "beta3")

    @staticmethod
    def restore(p, s, h, o):
        lr, b1, b2, b3, eps = h["lr"], h["beta1"], h["beta2"], h["beta3"], h["eps"]
        g, step = s["previous_grad"], s["step"]
        prev = s.get("hg_gprev")
        diff = torch.zeros_like(g) if prev is None else g - prev
        m, v, n = s["exp_avg"], s["exp_avg_sq"], s["exp_avg_diff"]
        denom = torch.sqrt(v) / (1 - b3 ** step).sqrt() + eps
        p0 = p * (1 + lr * h["weight_decay"]) if o["wd"] and not o["decouple"] else p
        p0 = p0 + lr / (1 - b1 ** step) * (m / denom) + lr * b2 / (1 - b2 ** step) * (n / denom)
        if o["wd"] and o["decouple"]:
            p0 = p0 / (1 - lr * h["weight_decay"])
        ghat = diff * b2 + g
        state = {"step": step - 1, "exp_avg": _unlerp(m, g, 1 - b1), "exp_avg_diff": _unlerp(n, diff, 1 - b2),
                 "exp_avg_sq": (v - (1 - b3) * ghat * ghat) / b3}
        if prev is not None:
            state["previous_grad"] = prev
        return p0, g, state


class Yogi(_HO):
    r"""Yogi (Zaheer et al.) as ``pytorch_optimizer.Yogi`` (same arguments and defaults; both
    moments start at ``initial_accumulator``):
    :math:`v \leftarrow v - (1-\beta_2)\,\mathrm{sign}(v - g^2)\, g^2`, otherwise as Adam.

    Learnable: ``lr``, ``beta1``, ``beta2`` (default), ``eps``, ``weight_decay``."""

    hypers = (_lr(), _beta("beta1", ("betas", 0)), _beta("beta2", ("betas", 1)), _eps(), _wd())

    def __init__(self, params=None, lr=1e-2, betas=(0.9, 0.999), initial_accumulator=1e-6,
                 weight_decay=0.0, weight_decouple=True, fixed_decay=False, eps=1e-3,
                 maximize=False, foreach=None, **hg):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), initial_accumulator=initial_accumulator,
                                      weight_decay=weight_decay, weight_decouple=weight_decouple,
                                      fixed_decay=fixed_decay, eps=eps, maximize=maximize,
                                      foreach=foreach), **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], decouple=group["weight_decouple"],
                    fixed=group["fixed_decay"], init=float(group["initial_accumulator"]),
                    wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        return {"step": _step0(), "exp_avg": torch.full_like(p, o["init"]),
                "exp_avg_sq": torch.full_like(p, o["init"])}

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
        step = s["step"] + 1
        if o["wd"]:
            if o["decouple"]:
                p = p * (1.0 - h["weight_decay"] * (1.0 if o["fixed"] else lr))
            else:
                g = g + h["weight_decay"] * p
        g2 = g * g
        m = _lerp(s["exp_avg"], g, 1 - b1)
        sign = torch.sign(s["exp_avg_sq"] - g2)
        v = s["exp_avg_sq"] - (1 - b2) * sign * g2
        denom = _sqrt(v) / (1 - b2 ** step).sqrt() + h["eps"]
        new = {"step": step, "exp_avg": m, "exp_avg_sq": v}
        if o.get("hg_save"):  # the sign cannot be told from v alone
            new["hg_g"], new["hg_sign"] = g, sign.to(torch.int8)
        return p - lr / (1 - b1 ** step) * (m / denom), new

    def closed_form_ok(self, o, vars):
        return _positive(vars, "beta1")

    @staticmethod
    def restore(p, s, h, o):
        lr, b1, b2 = h["lr"], h["beta1"], h["beta2"]
        g, m, v, step = s["hg_g"], s["exp_avg"], s["exp_avg_sq"], s["step"]
        denom = torch.sqrt(v) / (1 - b2 ** step).sqrt() + h["eps"]
        p0 = p + lr / (1 - b1 ** step) * (m / denom)
        wd = h["weight_decay"]
        if o["wd"] and o["decouple"]:
            p0 = p0 / (1.0 - wd * (1.0 if o["fixed"] else lr))
        state = {"step": step - 1, "exp_avg": _unlerp(m, g, 1 - b1),
                 "exp_avg_sq": v + (1 - b2) * s["hg_sign"].to(g.dtype) * g * g}
        if o["wd"] and not o["decouple"]:
            g = g - wd * p0
        return p0, g, state


class Lion(_HO):
    r"""Lion (Chen et al.) as ``lion_pytorch.Lion`` (same arguments and defaults):
    :math:`p \leftarrow p(1-\eta\lambda) - \eta\,\mathrm{sign}(\beta_1 m + (1-\beta_1) g),\;
    m \leftarrow \beta_2 m + (1-\beta_2) g`.

    Learnable: ``lr`` (default), ``weight_decay``. The betas may be listed in ``learn`` but their
    hyper-gradient is zero: the derivative of sign() is zero almost everywhere."""

    hypers = (_lr(), _beta("beta1", ("betas", 0), default_learn=False, hi_open=False),
              _beta("beta2", ("betas", 1), default_learn=False, hi_open=False), _wd())
    zero_hypergrad_names = ("beta1", "beta2")

    def __init__(self, params=None, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, use_triton=False,
                 decoupled_weight_decay=False, **hg):
        _refuse("Lion", use_triton=use_triton)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay), **hg)

    def add_param_group(self, param_group):
        # lion_pytorch divides decoupled weight decay by the constructor's lr
        param_group.setdefault("init_lr", float(param_group.get("lr", self._hg_defaults["lr"])))
        super().add_param_group(param_group)

    def options(self, group, v):
        return dict(maximize=False, decoupled=group["decoupled_weight_decay"],
                    init_lr=float(group["init_lr"]))

    @staticmethod
    def init_state(p, o):
        return {"exp_avg": torch.zeros_like(p)}

    @staticmethod
    def update(p, g, s, h, o):
        lr, b1, b2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        if o["decoupled"]:
            wd = wd / o["init_lr"]
        p = p * (1.0 - lr * wd)
        u = torch.sign(s["exp_avg"] * b1 + (1.0 - b1) * g)
        new = {"exp_avg": s["exp_avg"] * b2 + (1.0 - b2) * g}
        if o.get("hg_save"):  # the closed form needs only the direction: one byte per element
            new["hg_sign"] = u.to(torch.int8)
        return p - lr * u, new

    @staticmethod
    def hyper_terms(gt, p, s, h, o, names):
        """x_s = x_{s-1} (1 - lr wd) - lr sign(u): d/d lr = -(wd x_{s-1} + sign(u)),
        d/d wd = -lr x_{s-1} (wd divided by the initial lr where decoupled); the betas act only
        inside sign(), whose derivative is 0."""
        lr = h["lr"]
        wd = h["weight_decay"] / o["init_lr"] if o["decoupled"] else h["weight_decay"]
        u = s["hg_sign"].to(gt.dtype)
        xprev = (p + lr * u) / (1.0 - lr * wd)
        out = {}
        if "lr" in names:
            out["lr"] = -gt * (wd * xprev + u)
        if "weight_decay" in names:
            out["weight_decay"] = -gt * (lr / o["init_lr"] if o["decoupled"] else lr) * xprev
        return out


class Adafactor(_HO):
    r"""Adafactor as ``torch.optim.Adafactor``: factored second moments for matrices, relative
    step size :math:`\alpha_t = \max(\epsilon_2, \mathrm{RMS}(p))\min(\eta, 1/\sqrt t)`, update
    clipping at ``d``.

    Learnable: ``lr`` (default; it has a gradient while ``lr < 1/sqrt(t)``), ``beta2_decay``,
    ``d`` (a gradient where the clipping is active), ``weight_decay``."""

    hypers = (_lr(), Hyper("beta2_decay", "beta2_decay", lo=-INF, hi=0.0, default_learn=False),
              Hyper("d", "d", lo=1.0, default_learn=False), _wd())

    def __init__(self, params=None, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, *, foreach=None, maximize=False, **hg):
        eps = tuple(eps)
        if eps[0] is not None and not 0.0 <= eps[0]:
            raise ValueError(f"epsilon1 should be >= 0 but is: {eps[0]}")
        if not 0.0 <= eps[1]:
            raise ValueError(f"epsilon2 should be >= 0 but is: {eps[1]}")
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, foreach=foreach, maximize=maximize),
                         **hg)

    def options(self, group, v):
        return dict(maximize=group["maximize"], eps1=group["eps"][0], eps2=float(group["eps"][1]),
                    wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        s = {"step": _step0()}
        if p.dim() > 1:
            s["row_var"] = p.new_zeros(p.shape[:-1] + (1,))
            s["col_var"] = p.new_zeros(p.shape[:-2] + (1,) + p.shape[-1:])
        else:
            s["variance"] = torch.zeros_like(p)
        return s

    @staticmethod
    def update(p, g, s, h, o):
        lr = h["lr"]
        eps1 = o["eps1"] if o["eps1"] is not None else torch.finfo(p.dtype).eps
        step = s["step"] + 1
        w = step ** h["beta2_decay"]
        rho = torch.minimum(lr, 1 / step ** 0.5)
        rms = p.norm(2) / p.numel() ** 0.5
        alpha = torch.clamp(rms, min=o["eps2"]) * rho
        if o["wd"]:
            p = p * (1 - lr * h["weight_decay"])
        new = {"step": step}
        if g.dim() > 1:
            row_mean = g.norm(dim=-1, keepdim=True).square() / g.size(-1)
            row_var = _lerp(s["row_var"], row_mean, w)
            col_mean = g.norm(dim=-2, keepdim=True).square() / g.size(-2)
            col_var = _lerp(s["col_var"], col_mean, w)
            new["row_var"], new["col_var"] = row_var, col_var
            var = (row_var @ col_var) / row_var.mean(dim=-2, keepdim=True).clamp(min=eps1)
        else:
            var = _lerp(s["variance"], g * g, w)
            new["variance"] = var
        upd = var.clamp(min=eps1 * eps1).rsqrt() * g
        denom = torch.clamp(upd.norm(2) / (upd.numel() ** 0.5 * h["d"]), min=1.0)
        if o.get("hg_save"):  # the gradient, and the RMS of the parameter before the step
            new["hg_g"], new["hg_rms"] = g, rms
        return p - alpha / denom * upd, new

    @staticmethod
    def restore(p, s, h, o):
        lr, g, step = h["lr"], s["hg_g"], s["step"]
        eps1 = o["eps1"] if o["eps1"] is not None else torch.finfo(p.dtype).eps
        w = step ** h["beta2_decay"]
        first = step == 1  # a lerp with weight 1: the old values did not matter (they were zeros)

        def old(new, x):
            return torch.where(first, 0.0, _unlerp(new, x, w))
        state = {"step": step - 1}
        if g.dim() > 1:
            row_var, col_var = s["row_var"], s["col_var"]
            var = (row_var @ col_var) / row_var.mean(dim=-2, keepdim=True).clamp(min=eps1)
            state["row_var"] = old(row_var, g.norm(dim=-1, keepdim=True).square() / g.size(-1))
            state["col_var"] = old(col_var, g.norm(dim=-2, keepdim=True).square() / g.size(-2))
        else:
            var = s["variance"]
            state["variance"] = old(var, g * g)
        upd = var.clamp(min=eps1 * eps1).rsqrt() * g
        denom = torch.clamp(upd.norm(2) / (upd.numel() ** 0.5 * h["d"]), min=1.0)
        alpha = torch.clamp(s["hg_rms"], min=o["eps2"]) * torch.minimum(lr, 1 / step ** 0.5)
        p0 = p + alpha / denom * upd
        if o["wd"]:
            p0 = p0 / (1 - lr * h["weight_decay"])
        return p0, g, state


OPTIMIZERS = {c.__name__: c for c in (SGD, Adagrad, Adadelta, RMSprop, Adam, AdamW, NAdam, Adan, Yogi,
                                      Lion, Adafactor)}
