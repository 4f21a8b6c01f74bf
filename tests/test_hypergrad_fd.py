"""Hyper-gradients of every learnable hyperparameter of every optimizer agree with central
finite differences of f_t(x_{t-1}(q)) in float64: at level 1, and for levels 2 and 3 of a stack
in which the optimizer sits at levels 2 and 3."""

import pytest
import torch

import hypergrad as hg
from fd import fd_grad, our_raw_grad, step_size
from helpers import MLP, train
from table import CASES

T = 6


# the derivative of sign() is zero: Lion's betas get no hyper-gradient through the update
ZERO = {("Lion", "beta1"), ("Lion", "beta2"), ("MADA", "lion_beta1"), ("MADA", "lion_beta2")}


def check(build, targets, T=T, case=None):
    model, opt = build()
    train(model, opt, T)
    for level, name in targets:
        ours = our_raw_grad(opt, level, name)
        if case is not None and level == 0:
            assert (ours == 0) == ((case, name) in ZERO), f"{case} {name}: hyper-gradient {ours}"
        hv = opt.levels[level]._hg_vars[0][name]
        h = step_size(name, float(hv.raw[0]), reparam=hv.transform.name is not None)
        fd, noise = fd_grad(build, T, level, name, h)
        assert ours == pytest.approx(fd, rel=1e-5, abs=max(noise, 1e-12)), \
            f"level {level} {name}: ours {ours} fd {fd} (noise {noise:.1e})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_level1(case):
    def build():
        model = MLP()
        return model, case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=0.0), learn=case.learnable)
    check(build, [(0, n) for n in case.learnable], case=case.name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_stack_levels_2_and_3(case):
    """SGD with momentum at the bottom, the optimizer at levels 2 and 3, a zero-lr SGD on top."""
    def build():
        model = MLP()
        top = hg.SGD(lr=0.0)
        l3 = case.ours(**case.hyper_kw, hyper=top, learn=case.learnable)
        l2 = case.ours(**case.hyper_kw, hyper=l3, learn=case.learnable)
        return model, hg.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01,
                             hyper=l2, learn=["lr", "momentum", "weight_decay"])
    targets = [(0, "lr"), (0, "momentum"), (0, "weight_decay")]
    targets += [(k, n) for k in (1, 2) for n in case.learnable]
    check(build, targets)


@pytest.mark.parametrize("reparam", ["auto"])
def test_reparam_raw_space(reparam):
    """With log/logit reparameterizations the level above receives d f / d z for z = log lr,
    logit beta: check them, and the value-space gradient d f / d q = (d f / d z) / (d q / d z)."""
    def build():
        model = MLP()
        return model, hg.Adam(model.parameters(), lr=0.01, hyper=hg.Adam(lr=1e-3, hyper=hg.SGD(lr=0.0), reparam="auto"),
                              reparam=reparam)
    check(build, [(0, "lr"), (0, "beta1"), (0, "beta2"), (1, "lr"), (1, "beta1"), (1, "beta2")])
    model, opt = build()
    train(model, opt, T - 1)
    q = float(opt.hyperparameters()["lr"])  # the value used by step T-1, which step T differentiates
    train(model, opt, 1, start=T - 1)
    assert float(opt.hypergradients()["lr"]) * q == pytest.approx(our_raw_grad(opt, 0, "lr"), rel=1e-6)
