"""Stacks of SGD reproduce the hyperparameter trajectories of Chandra et al.'s reference code
(PyPI gradient-descent-the-ultimate-optimizer), which builds the autograd graph through the
parameters every step; we compute the same one-step hyper-gradients without it."""

import pytest
import torch

import hypergrad as hg
from helpers import MLP, batch

gdtuo = pytest.importorskip("gradient_descent_the_ultimate_optimizer.gdtuo")

STEPS = 60


def _to64(level, levels):
    """gdtuo keeps hyperparameters in float32 tensors; compare the mathematics in float64."""
    for alpha, mu in levels:
        level.parameters = {"alpha": torch.tensor(alpha, dtype=torch.float64),
                            "mu": torch.tensor(mu, dtype=torch.float64)}
        level = level.optimizer


def _gdtuo_run(levels):
    """levels: [(alpha, mu), ...] bottom first; returns per-step dicts of every level's values."""
    opt = gdtuo.NoOpOptimizer()
    for alpha, mu in reversed(levels):
        opt = gdtuo.SGD(alpha=alpha, mu=mu, optimizer=opt)
    _to64(opt, levels)
    model = MLP()
    mw = gdtuo.ModuleWrapper(model, optimizer=opt)
    mw.initialize()
    traj = []
    for t in range(1, STEPS + 1):
        x, y = batch(t)
        mw.begin()
        loss = ((mw.forward(x) - y) ** 2).mean()
        mw.zero_grad()
        loss.backward(create_graph=True)
        mw.step()
        row, lvl = [], opt
        for _ in levels[:-1]:
            row.append({k: float(v.detach()) for k, v in lvl.parameters.items()})
            lvl = lvl.optimizer
        traj.append(row)
    return traj, [p.detach() for p in mw.parameters.values()]


def _ours_run(levels):
    hyper = None
    for i, (alpha, mu) in enumerate(reversed(levels)):
        if i == len(levels) - 1:
            break
        hyper = hg.SGD(lr=alpha, momentum=mu, hyper=hyper) if hyper is not None else hg.SGD(lr=alpha, momentum=mu)
    model = MLP()
    alpha, mu = levels[0]
    # gdtuo's SGD learns alpha, and mu where it is non-zero (mu = 0 never enters its graph)
    opt = hg.SGD(model.parameters(), lr=alpha, momentum=mu, hyper=hyper)
    lv = opt.hyper
    while lv.hyper is not None:
        lv = lv.hyper
    traj = []
    for t in range(1, STEPS + 1):
        x, y = batch(t)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        row = []
        for level in opt.levels[:-1]:
            hp = level.hyperparameters()
            row.append({"alpha": float(hp["lr"]), "mu": float(hp["momentum"])})
        traj.append(row)
    return traj, [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("levels", [
    [(0.05, 0.9), (1e-3, 0.0)],
    [(0.05, 0.5), (1e-3, 0.0), (1e-4, 0.0)],
    [(0.02, 0.0), (1e-2, 0.0), (1e-3, 0.0), (1e-4, 0.0)],
], ids=["2-level", "3-level", "4-level"])
def test_sgd_stack_matches_gdtuo(levels):
    ref, ref_params = _gdtuo_run(levels)
    ours, params = _ours_run(levels)
    moved = False
    for t, (a, b) in enumerate(zip(ours, ref), start=1):
        for k, (la, lb) in enumerate(zip(a, b)):
            for name in ("alpha", "mu"):
                assert la[name] == pytest.approx(lb[name], rel=1e-6, abs=1e-12), \
                    f"step {t} level {k + 1} {name}: ours {la[name]} gdtuo {lb[name]}"
                moved |= la[name] != levels[k][0 if name == "alpha" else 1]
    assert moved, "the hyperparameters never moved: the comparison would be vacuous"
    for a, b in zip(params, ref_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)
