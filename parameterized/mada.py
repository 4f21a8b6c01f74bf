"""MADA: a parameterized optimizer whose coefficients choose between Adam, AMSGrad/AVGrad, Adan,
Yogi and Lion while it trains (Ozkara et al., "MADA: Meta-Adaptive Optimizers through
hyper-gradient Descent").

For a parameter with gradient ``g`` at step ``t`` (``g_prev`` the previous gradient)::

    g_hat   = g + beta3 (g - g_prev)                                 Adan's look-ahead
    g2      = c g_hat^2 + (1 - c) (v + g_hat^2 sign(g_hat^2 - v))    c = 1 Adam, c = 0 Yogi
    m       = beta1 m + (1 - beta1) g
    v       = beta2 v + (1 - beta2) g2
    n       = beta3 n + (1 - beta3) (g - g_prev)
    v_mean  = (v + (t - 1) v_mean) / t                               AVGrad: the mean of v
    v_hat   = (rho v + (1 - rho) v_mean) / (1 - beta2^t)
    adam    = (m / (1 - beta1^t) + beta3 n_hat) / (sqrt(v_hat) + eps)
    lion    = sign(u),  u from Lion's own momentum m_lion and betas
    x       = x (1 - lr wd) - lr (gamma adam + (1 - gamma) lion)

with ``n_hat = n / (1 - beta3^t)`` in the default ``variant="corners"`` and ``n_hat = n`` in
``variant="reference"``. See docs/mada.md for the two variants, the corners and the defaults.
"""

from __future__ import annotations

import dataclasses

import torch

from hypergrad.core import Hyper
from hypergrad.optimizers import AdamW, _HO, _lerp, _on, _sqrt, _step0

__all__ = ["MADA", "HyperAdam", "COEFFICIENTS", "VARIANTS"]

COEFFICIENTS = ("beta1", "beta2", "beta3", "c", "rho", "gamma")
VARIANTS = ("corners", "reference")

# the public reference code's Lion constants: interpolation 0.95, momentum 0.98
_REFERENCE_LION_BETAS = (0.95, 0.98)
_LION_BETAS = (0.9, 0.99)  # lion_pytorch.Lion's defaults


def _coef(name, key, lo_bound, hi_bound, hi=1.0, hi_open=False):
    return Hyper(name, key, lo=0.0, hi=hi, hi_open=hi_open, bounds=(lo_bound, hi_bound),
                 auto_reparam="logit")


class MADA(_HO):
    r"""MADA, the meta-adaptive optimizer: Adam, AVGrad, Adan, Yogi and Lion in one update,
    interpolated by learnable coefficients (module docstring, docs/mada.md).

    Arguments: ``lr``, the six coefficients ``beta1, beta2, beta3, c, rho, gamma``, ``eps``,
    ``weight_decay`` (decoupled, as AdamW), ``lion_betas`` (Lion's interpolation and momentum
    betas; default (0.9, 0.99), or the reference code's fixed (0.95, 0.98) with
    ``variant="reference"``), ``variant`` (``"corners"`` or ``"reference"``), ``maximize``, and
    the hyper-learning arguments of every hypergrad optimizer (``hyper``, ``learn``, ``scope``,
    ``bounds``, ``reparam``, ``per_name``, ``hyper_warmup``, ``hypergrad_clip``).

    Learned by default (with a ``hyper``): the six coefficients; ``lr``, ``eps``,
    ``weight_decay`` are opt-in (``learn=[..., "lr"]``), as are Lion's betas, whose
    hyper-gradient is zero (the derivative of sign() is zero; ``gamma`` still gets one).
    Projection bounds default to the paper's: beta1 [0.01, 0.99], beta2 [0.501, 0.99],
    beta3 [0, 0.99], c, rho, gamma [0, 1].

    Corners (no hyper-steps): ``beta3=0, c=1, rho=1, gamma=1`` is Adam/AdamW; ``gamma=0`` is
    Lion; ``c=0`` Yogi (with zero initial accumulators); ``rho=0`` AVGrad; ``beta3>0`` with
    ``c=rho=gamma=1`` Adan (``pytorch_optimizer.Adan(betas=(beta1, beta3, beta2),
    weight_decouple=True)``). The corners are exact in ``variant="corners"`` only.
    """

    hypers = (
        Hyper("lr", "lr", default_learn=False, auto_reparam="log", doc="learning rate"),
        _coef("beta1", "beta1", 0.01, 0.99, hi_open=True),
        _coef("beta2", "beta2", 0.501, 0.99, hi_open=True),
        _coef("beta3", "beta3", 0.0, 0.99, hi_open=True),
        _coef("c", "c", 0.0, 1.0),
        _coef("rho", "rho", 0.0, 1.0),
        _coef("gamma", "gamma", 0.0, 1.0),
        Hyper("eps", "eps", default_learn=False, auto_reparam="log"),
        Hyper("weight_decay", "weight_decay", default_learn=False),
        dataclasses.replace(_coef("lion_beta1", ("lion_betas", 0), 0.0, 0.9999), default_learn=False),
        dataclasses.replace(_coef("lion_beta2", ("lion_betas", 1), 0.0, 0.9999), default_learn=False),
    )

    def __init__(self, params=None, lr=1e-3, beta1=0.9, beta2=0.95, beta3=0.0, c=1.0, rho=1.0,
                 gamma=1.0, eps=1e-8, weight_decay=0.0, lion_betas=None, *, variant="corners",
                 maximize=False, **hg):
        if variant not in VARIANTS:
            raise ValueError(f"MADA: variant must be one of {VARIANTS}, got {variant!r}")
        if lion_betas is None:
            lion_betas = _REFERENCE_LION_BETAS if variant == "reference" else _LION_BETAS
        lion_betas = tuple(lion_betas)
        if len(lion_betas) != 2:
            raise ValueError(f"MADA: lion_betas must be a pair, got {lion_betas!r}")
        super().__init__(params, dict(lr=lr, beta1=beta1, beta2=beta2, beta3=beta3, c=c, rho=rho,
                                      gamma=gamma, eps=eps, weight_decay=weight_decay,
                                      lion_betas=lion_betas, variant=variant, maximize=maximize), **hg)

    def options(self, group, v):
        if group["variant"] not in VARIANTS:
            raise ValueError(f"MADA: variant must be one of {VARIANTS}, got {group['variant']!r}")
        return dict(maximize=group["maximize"], reference=group["variant"] == "reference",
                    wd=_on(v["weight_decay"]))

    @staticmethod
    def init_state(p, o):
        z = torch.zeros_like
        s = {"step": _step0(), "exp_avg": z(p), "lion_exp_avg": z(p)}
        if o["reference"]:
            # the reference code's first sight: v and v_mean at 1e-15, previous gradient 0,
            # and n = g * g (set at the first update, where g is known)
            s["exp_avg_sq"] = torch.full_like(p, 1e-15)
            s["v_mean"] = torch.full_like(p, 1e-15)
            s["previous_grad"] = z(p)
        else:
            # Adam's zeros; the previous gradient starts equal to the first gradient (Adan)
            s["exp_avg_sq"] = z(p)
            s["v_mean"] = z(p)
            s["exp_avg_diff"] = z(p)
        return s

    @staticmethod
    def uses_param(o):
        return o["wd"]

    @staticmethod
    def update(p, g, s, h, o):
        lr, b1, b2, b3 = h["lr"], h["beta1"], h["beta2"], h["beta3"]
        c, rho, gamma = h["c"], h["rho"], h["gamma"]
        lb1, lb2 = h["lion_beta1"], h["lion_beta2"]
        ref = o["reference"]
        t = s["step"] + 1
        g_prev = s["previous_grad"] if "previous_grad" in s else g
        diff = g - g_prev
        g_hat = g + b3 * diff
        g_hat2 = g_hat * g_hat
        v_prev = s["exp_avg_sq"]
        g2 = c * g_hat2 + (1 - c) * (v_prev + g_hat2 * torch.sign(g_hat2 - v_prev))
        m = _lerp(s["exp_avg"], g, 1 - b1)
        v = v_prev * b2 + (1 - b2) * g2
        n = _lerp(s["exp_avg_diff"] if "exp_avg_diff" in s else g * g, diff, 1 - b3)
        v_mean = (v + (t - 1) * s["v_mean"]) / t
        # the reference code lets no hyper-gradient through the running mean (rho still gets one)
        v_hat = (rho * v + (1 - rho) * (v_mean.detach() if ref else v_mean)) / (1 - b2 ** t)
        n_hat = n if ref else n / (1 - b3 ** t)
        adam = (m / (1 - b1 ** t) + b3 * n_hat) / (_sqrt(v_hat) + h["eps"])
        m_lion_prev = s["lion_exp_avg"]
        m_lion = m_lion_prev * lb2 + (1 - lb2) * g
        # Lion interpolates with the momentum before its update; the reference code with the new one
        u = (m_lion if ref else m_lion_prev) * lb1 + (1 - lb1) * g
        if o["wd"]:
            p = p * (1 - lr * h["weight_decay"])
        lion = torch.sign(u)
        new_p = p - lr * (gamma * adam + (1 - gamma) * lion)
        new = {"step": t, "exp_avg": m, "exp_avg_sq": v, "exp_avg_diff": n, "v_mean": v_mean,
               "lion_exp_avg": m_lion, "previous_grad": g.clone()}
        if o.get("hg_save"):  # the closed form needs the inputs the state no longer shows
            new.update(hg_g2=g_prev, hg_m=s["exp_avg"], hg_v=v_prev,
                       hg_n=s["exp_avg_diff"] if "exp_avg_diff" in s else g * g, hg_sign=lion.to(torch.int8))
        return new_p, new

    @staticmethod
    def hyper_terms(gt, p, s, h, o, names):
        """g_t * d x_s / d q, from the state after step s and the saved inputs of that step
        (g_{s-1}, m_{s-1}, v_{s-1}, n_{s-1}, sign(u_s)); docs/mada.md lists the equations."""
        lr, b1, b2, b3 = h["lr"], h["beta1"], h["beta2"], h["beta3"]
        c, rho, gamma, eps, wd = h["c"], h["rho"], h["gamma"], h["eps"], h["weight_decay"]
        ref = o["reference"]
        t = s["step"]
        g, diff = s["previous_grad"], s["previous_grad"] - s["hg_g2"]
        m0, v0, n0 = s["hg_m"], s["hg_v"], s["hg_n"]
        m, v, n, vm = s["exp_avg"], s["exp_avg_sq"], s["exp_avg_diff"], s["v_mean"]
        lion = s["hg_sign"].to(gt.dtype)
        g_hat = g + b3 * diff
        g_hat2 = g_hat * g_hat
        sig = torch.sign(g_hat2 - v0)
        g2 = c * g_hat2 + (1 - c) * (v0 + g_hat2 * sig)
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        m_hat = m / bc1
        if ref:
            n_hat = n
        else:
            bc3 = 1 - b3 ** t
            n_hat = n / bc3
        v_hat = (rho * v + (1 - rho) * vm) / bc2
        r = torch.sqrt(v_hat)
        inv_d = 1 / (r + eps)
        adam = (m_hat + b3 * n_hat) * inv_d
        direction = gamma * adam + (1 - gamma) * lion
        ga = -lr * gamma * gt                                   # g_t * d x_s / d adam
        da_dvh = -adam * inv_d * torch.where(r > 0, 0.5 / torch.where(r > 0, r, 1), 0)

        def via_v(dv):  # d adam from a change of v (and of the running mean, in the corners variant)
            dvm = 0 if ref else dv / t
            return da_dvh * (rho * dv + (1 - rho) * dvm) / bc2

        out = {}
        if "lr" in names or "weight_decay" in names:
            xprev = p + lr * direction
            if o["wd"]:
                xprev = xprev / (1 - lr * wd)
        if "lr" in names:
            out["lr"] = -gt * (direction + wd * xprev if o["wd"] else direction)
        if "weight_decay" in names:
            out["weight_decay"] = -lr * gt * xprev
        if "gamma" in names:
            out["gamma"] = -lr * gt * (adam - lion)
        if "beta1" in names:
            dm_hat = (m0 - g) / bc1 + m_hat * (t * b1 ** (t - 1) / bc1)
            out["beta1"] = ga * dm_hat * inv_d
        if "beta2" in names:
            dv = v0 - g2
            dvm = 0 if ref else dv / t
            dvh = (rho * dv + (1 - rho) * dvm) / bc2 + v_hat * (t * b2 ** (t - 1) / bc2)
            out["beta2"] = ga * da_dvh * dvh
        if "beta3" in names:
            dn = n0 - diff
            dn_hat = dn if ref else dn / bc3 + n_hat * (t * b3 ** (t - 1) / bc3)
            dv = (1 - b2) * (c + (1 - c) * sig) * 2 * g_hat * diff
            out["beta3"] = ga * ((n_hat + b3 * dn_hat) * inv_d + via_v(dv))
        if "c" in names:
            out["c"] = ga * via_v((1 - b2) * (g_hat2 - v0 - g_hat2 * sig))
        if "rho" in names:
            out["rho"] = ga * da_dvh * (v - vm) / bc2
        if "eps" in names:
            out["eps"] = ga * (-adam * inv_d)
        return out


def _mada_bounds(spec):
    if spec.name == "beta1":
        return dataclasses.replace(spec, bounds=(0.01, 0.99))
    if spec.name == "beta2":
        return dataclasses.replace(spec, bounds=(0.501, 0.99))
    if spec.name == "lr":
        return dataclasses.replace(spec, default_learn=False)
    return spec


class HyperAdam(AdamW):
    """HyperAdam, MADA's baseline: AdamW whose beta1 and beta2 (only) are learned, projected
    into MADA's ranges (beta1 [0.01, 0.99], beta2 [0.501, 0.99]). Defaults as MADA's:
    ``betas=(0.9, 0.95)``, ``weight_decay=0``."""

    hypers = tuple(_mada_bounds(h) for h in AdamW.hypers)

    def __init__(self, params=None, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0,
                 amsgrad=False, *, maximize=False, **hg):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         amsgrad=amsgrad, maximize=maximize, **hg)
