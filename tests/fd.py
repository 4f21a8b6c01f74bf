"""Central finite differences of f_t(x_{t-1}(q)) for any hyperparameter of any level."""

from __future__ import annotations

import torch

from helpers import loss_at, train

EPS64 = 2.2e-16


def perturbed_loss(build, T, level, name, delta, group=0, index=0, lag=0):
    """Replay steps 1..T-1 of a fresh (model, opt), with the raw hyperparameter ``name`` of
    ``level`` shifted by ``delta`` just before it is used at step T-1 (``lag``: that many steps
    earlier, as the levels above a one_pass bottom level); return f_T(x_{T-1})."""
    model, opt = build()
    train(model, opt, T - 2 - lag)
    lvl = opt.levels[level]
    orig = lvl._hg_update

    def patched(*a, **k):
        hv = lvl._hg_vars[group][name]
        with torch.no_grad():
            if len(hv.raw) > 1:
                hv.raw[index].view(-1)[0] += delta
            else:
                hv.raw[0].view(-1)[index] += delta
        hv.refresh()
        orig(*a, **k)

    lvl._hg_update = patched
    train(model, opt, 1, start=T - 2 - lag)
    del lvl._hg_update
    train(model, opt, lag, start=T - 1 - lag)
    with torch.no_grad():
        return loss_at(model, T).item()


def step_size(name: str, q: float, reparam: bool = False) -> float:
    """A step small against the scale on which f bends in q."""
    if reparam:
        return 1e-4
    if name.startswith("beta") or name in ("momentum", "rho", "alpha", "dampening"):
        s = min(abs(q), abs(1 - q)) or 1e-2
    elif name == "eps":
        # eps matters on the scale of sqrt(v), which can be far below eps itself at a hyper
        # level (tiny hyper-gradients): stay within a few percent of eps
        return 0.03 * abs(q) if q else 1e-10
    else:
        s = abs(q) or 1e-2
    return 1e-4 * s


def fd_grad(build, T, level, name, h, group=0, index=0, lag=0):
    """Central difference with one Richardson extrapolation (error O(h^4)); returns the estimate
    and the size of its floating-point noise."""
    def d(hh):
        up = perturbed_loss(build, T, level, name, hh, group, index, lag)
        down = perturbed_loss(build, T, level, name, -hh, group, index, lag)
        return (up - down) / (2 * hh), max(abs(up), abs(down))
    d1, f = d(h)
    d2, _ = d(h / 2)
    return (4 * d2 - d1) / 3, 20 * EPS64 * f / h


def our_raw_grad(opt, level, name, group=0, index=0):
    hv = opt.levels[level]._hg_vars[group][name]
    g = hv.raw[index if len(hv.raw) > 1 else 0].grad
    assert g is not None, f"no hyper-gradient for level {level} {name}"
    return float(g.reshape(-1)[0 if len(hv.raw) > 1 else index])
