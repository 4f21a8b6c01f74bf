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
from hypergrad.optimizers import AdamW, _HO, _lerp, _on, _positive, _sqrt, _step0

from ._onepass import MadaOnePass

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

    zero_hypergrad_names = ("lion_beta1", "lion_beta2")

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
    def coefficients(h, t, o):
        """The scalars of update number ``t`` (computed once per group, outside the loop)."""
        b1, b2, b3 = h["beta1"], h["beta2"], h["beta3"]
        c = {"t": t, "tm1": t - 1, "w1": 1 - b1, "b2": b2, "w2": 1 - b2, "b3": b3, "w3": 1 - b3,
             "c": h["c"], "wc": 1 - h["c"], "rho": h["rho"], "wrho": 1 - h["rho"], "gamma": h["gamma"],
             "wgamma": 1 - h["gamma"], "lb1": h["lion_beta1"], "wl1": 1 - h["lion_beta1"],
             "lb2": h["lion_beta2"], "wl2": 1 - h["lion_beta2"], "bc1": 1 - b1 ** t, "bc2": 1 - b2 ** t,
             "lr": h["lr"], "eps": h["eps"], "it": 1 / t}
        # reciprocals for the closed form's element loop (a division per element costs like a sqrt)
        c["ibc1"], c["ibc2"], c["ieps"] = 1 / c["bc1"], 1 / c["bc2"], 1 / c["eps"]
        if not o["reference"]:
            c["bc3"] = 1 - b3 ** t
            c["ibc3"] = 1 / c["bc3"]
        if o["wd"]:
            c["decay"] = 1 - h["lr"] * h["weight_decay"]
        return c

    @staticmethod
    def apply(p, g, s, c, o):
        """The element-wise part of the update, given ``coefficients``."""
        ref = o["reference"]
        g_prev = s["previous_grad"] if "previous_grad" in s else g
        diff = g - g_prev
        g_hat = g + c["b3"] * diff
        g_hat2 = g_hat * g_hat
        v_prev = s["exp_avg_sq"]
        ysign = torch.sign(g_hat2 - v_prev)
        g2 = c["c"] * g_hat2 + c["wc"] * (v_prev + g_hat2 * ysign)
        m = _lerp(s["exp_avg"], g, c["w1"])
        v = v_prev * c["b2"] + c["w2"] * g2
        n = _lerp(s["exp_avg_diff"] if "exp_avg_diff" in s else g * g, diff, c["w3"])
        v_mean = (v + c["tm1"] * s["v_mean"]) / c["t"]
        # the reference code lets no hyper-gradient through the running mean (rho still gets one)
        # divisions as the reference code writes them (a reciprocal would change the rounding, and
        # sign() decisions near 0 with it)
        v_hat = (c["rho"] * v + c["wrho"] * (v_mean.detach() if ref else v_mean)) / c["bc2"]
        n_hat = n if ref else n / c["bc3"]
        adam = (m / c["bc1"] + c["b3"] * n_hat) / (_sqrt(v_hat) + c["eps"])
        m_lion_prev = s["lion_exp_avg"]
        m_lion = m_lion_prev * c["lb2"] + c["wl2"] * g
        # Lion interpolates with the momentum before its update; the reference code with the new one
        u = (m_lion if ref else m_lion_prev) * c["lb1"] + c["wl1"] * g
        if o["wd"]:
            p = p * c["decay"]
        lion = torch.sign(u)
        new_p = p - c["lr"] * (c["gamma"] * adam + c["wgamma"] * lion)
        new = {"step": c["t"], "exp_avg": m, "exp_avg_sq": v, "exp_avg_diff": n, "v_mean": v_mean,
               "lion_exp_avg": m_lion, "previous_grad": g.clone()}
        if o.get("hg_save"):
            # what the closed form cannot rebuild from the new state: the old n (beta3 may be 0)
            # and the two sign decisions (Yogi's and Lion's), one byte each
            new.update(hg_n=s["exp_avg_diff"] if "exp_avg_diff" in s else g * g,
                       hg_ysign=ysign.to(torch.int8), hg_sign=lion.to(torch.int8))
        return new_p, new

    def closed_form_ok(self, o, vars):
        # the closed form rebuilds m_{s-1} and v_{s-1} dividing by beta1 and (about) beta2
        return _positive(vars, "beta1", "beta2")

    @staticmethod
    def update(p, g, s, h, o):
        return MADA.apply(p, g, s, MADA.coefficients(h, s["step"] + 1, o), o)

    @staticmethod
    def hyper_coefficients(h, t, o):
        """The scalars of the closed form for the update number ``t``."""
        c = MADA.coefficients(h, t, o)
        b1, b2, b3 = h["beta1"], h["beta2"], h["beta3"]
        c.update(k1=t * b1 ** (t - 1) / c["bc1"], k2=t * b2 ** (t - 1) / c["bc2"], wd=h["weight_decay"],
                 ib1=1 / b1, iw3=1 / (1 - b3), iv0=1 / (1 - c["w2"] * h["c"]))
        if not o["reference"]:
            c["k3"] = t * b3 ** (t - 1) / c["bc3"]
        return c

    @staticmethod
    def hyper_apply(gt, p, s, c, o, names):
        """g_t * d x_s / d q, element-wise, from the state after step s and what that step saved
        (n_{s-1} and two signs); m_{s-1}, v_{s-1} and g_s - g_{s-1} are rebuilt from the
        moments' updates. docs/mada.md has the equations."""
        lr, b3, rho, gamma, t = c["lr"], c["b3"], c["rho"], c["gamma"], c["t"]
        ref = o["reference"]
        m, v, n, vm, g = s["exp_avg"], s["exp_avg_sq"], s["exp_avg_diff"], s["v_mean"], s["previous_grad"]
        n0 = s["hg_n"]
        lion = s["hg_sign"].to(gt.dtype)
        sig = s["hg_ysign"].to(gt.dtype)
        diff = (n - b3 * n0) * c["iw3"]                      # n = b3 n_{s-1} + (1 - b3) diff
        m0 = (m - c["w1"] * g) * c["ib1"]                    # m = b1 m_{s-1} + (1 - b1) g
        g_hat = g + b3 * diff
        g_hat2 = g_hat * g_hat
        # v = b2 v_{s-1} + (1 - b2) (c g_hat^2 + (1 - c) (v_{s-1} + sig g_hat^2))
        v0 = (v - c["w2"] * g_hat2 * (c["c"] + c["wc"] * sig)) * c["iv0"]
        g2 = c["c"] * g_hat2 + c["wc"] * (v0 + g_hat2 * sig)
        m_hat = m * c["ibc1"]
        n_hat = n if ref else n * c["ibc3"]
        v_hat = (rho * v + c["wrho"] * vm) * c["ibc2"]
        r = torch.sqrt(v_hat)
        pos = r > 0
        dd = r + c["eps"]
        q = 1 / torch.where(pos, r * dd, 1)   # one division for 1/(r + eps) and 1/r
        inv_d = torch.where(pos, r * q, c["ieps"])   # where r = 0, r + eps = eps
        adam = (m_hat + b3 * n_hat) * inv_d
        direction = gamma * adam + c["wgamma"] * lion
        ga = -lr * gamma * gt                                   # g_t * d x_s / d adam
        da_dvh = torch.where(pos, -0.5 * adam * inv_d * dd * q, 0)   # d adam / d v_hat

        def via_v(dv):  # d adam from a change of v (and of the running mean, in the corners variant)
            if ref:
                return da_dvh * (rho * c["ibc2"]) * dv
            return da_dvh * ((rho + c["wrho"] * c["it"]) * c["ibc2"]) * dv

        out = {}
        if "lr" in names or "weight_decay" in names:
            xprev = p + lr * direction
            if o["wd"]:
                xprev = xprev / c["decay"]
        if "lr" in names:
            out["lr"] = -gt * (direction + c["wd"] * xprev if o["wd"] else direction)
        if "weight_decay" in names:
            out["weight_decay"] = -lr * gt * xprev
        if "gamma" in names:
            out["gamma"] = -lr * gt * (adam - lion)
        if "beta1" in names:
            out["beta1"] = ga * ((m0 - g) * c["ibc1"] + m_hat * c["k1"]) * inv_d
        if "beta2" in names:
            dv = v0 - g2
            mix = rho if ref else rho + c["wrho"] * c["it"]   # v_mean moves by dv / t
            out["beta2"] = ga * da_dvh * (mix * c["ibc2"] * dv + v_hat * c["k2"])
        if "beta3" in names:
            dn = n0 - diff
            dn_hat = dn if ref else dn * c["ibc3"] + n_hat * c["k3"]
            dv = c["w2"] * (c["c"] + c["wc"] * sig) * 2 * g_hat * diff
            out["beta3"] = ga * ((n_hat + b3 * dn_hat) * inv_d + via_v(dv))
        if "c" in names:
            out["c"] = ga * via_v(c["w2"] * (g_hat2 - v0 - g_hat2 * sig))
        if "rho" in names:
            out["rho"] = ga * da_dvh * (v - vm) * c["ibc2"]
        if "eps" in names:
            out["eps"] = ga * (-adam * inv_d)
        return out

    @staticmethod
    def hyper_terms(gt, p, s, h, o, names):
        return MADA.hyper_apply(gt, p, s, MADA.hyper_coefficients(h, s["step"], o), o, names)

    one_pass_kernel = MadaOnePass  # one_pass=True on the CPU: hyper-gradient and update in one loop


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
