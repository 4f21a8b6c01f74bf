"""compile=True: the fused kernels compute what the eager path computes (the same rule functions),
with and without hyper levels; other paths (first steps, missing gradients, scopes) fall back to
eager correctly. Compilation takes seconds per configuration: a few cases run by default, the
whole table under -m slow."""

import warnings

import pytest
import torch

import hypergrad as hg
from helpers import MLP, batch, train
from parameterized import MADA
from table import CASES

DEFAULT = [
    ("Adam", dict(lr=1e-2, weight_decay=0.01, decoupled_weight_decay=True)),
    ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)),
    ("MADA", dict(lr=1e-2, beta3=0.1, c=0.5, rho=0.5, gamma=0.5)),
]
BY = {c.name: c for c in CASES}


def _pair(case, cfg, hyper, steps=8, **kw):
    out = []
    for compile in (False, True):
        model = MLP()
        h = hg.SGD(lr=1e-5) if hyper else None
        opt = case.ours(model.parameters(), **cfg, hyper=h, compile=compile, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a compile failure falls back: not here
            train(model, opt, steps)
        assert opt._hg_compile == compile
        out.append((model, opt))
    return out


def _check(pair, what, rtol=1e-10):
    (m1, o1), (m2, o2) = pair
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=rtol, atol=1e-12, msg=lambda m: f"{what}: {m}")
    for l1, l2 in zip(o1.levels, o2.levels):
        for k, v in l1.hyperparameters().items():
            torch.testing.assert_close(l2.hyperparameters()[k], v, rtol=rtol, atol=1e-12,
                                       msg=lambda m: f"{what} {k}: {m}")


@pytest.mark.parametrize("name,cfg", DEFAULT, ids=[n for n, _ in DEFAULT])
def test_compiled_matches_eager(name, cfg, float64_default):
    pair = _pair(BY[name], cfg, hyper=True)
    assert pair[1][1]._hg_kernels, "the compiled kernels were not used"
    _check(pair, name)


def test_compiled_falls_back_where_gradients_are_missing(float64_default):
    """A parameter without a gradient in some steps takes the eager path then, and the kernels
    again once every tensor steps together (step counters checked equal before reuse)."""
    res = []
    for compile in (False, True):
        model = MLP()
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-5), compile=compile)
        for t in range(1, 9):
            x, y = batch(t)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if t in (3, 4):
                model.b2.grad = None
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                opt.step()
        assert opt._hg_compile == compile
        res.append((model, opt))
    _check(res, "missing grads")


def _strided(p):
    """p's gradient with the same values in another layout (a transposed copy's strides)."""
    return p.grad.t().contiguous().t() if p.grad.dim() == 2 else p.grad


@pytest.mark.parametrize("one_pass", [False, True])
def test_compiled_follows_a_change_of_layout(one_pass, float64_default):
    """Gradients whose strides change between steps (as after a transpose in the model), then
    a model and state that change dtype (``p.data = p.data.float()`` and a ``load_state_dict``,
    which casts the state to the parameters' dtype): the compiled kernels are keyed
    by dtype and device and recompiled for a new layout, so the compiled run stays compiled and
    computes what the eager run does. (A kernel compiled for the first layout used to raise at the
    transposed gradient, and compile=True then stayed off for the run; one given float32 tensors
    read their memory as float64.)"""
    res = []
    for compile in (False, True):
        model = MLP()
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-5), one_pass=one_pass, compile=compile)
        for t in range(1, 13):
            if t == 9:  # the model in float32 from here, its optimizer's state cast by loading it
                sd = opt.state_dict()
                for p in model.parameters():
                    p.data = p.data.float()
                opt.load_state_dict(sd)
            x, y = batch(t, dtype=next(model.parameters()).dtype)
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            if t in (4, 5, 7, 10):
                for p in model.parameters():
                    p.grad = _strided(p)
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)  # a failed kernel would warn
                opt.step()
        assert opt._hg_compile == compile
        res.append((model, opt))
    (m1, o1), (m2, o2) = res
    layouts = {k[-1] for gk in o2._hg_kernels.values() for k in gk._cache if isinstance(k[0], tuple)}
    assert len(layouts) >= 2, "no kernel was compiled for the second layout"
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for k, v in o1.hyperparameters().items():
        torch.testing.assert_close(o2.hyperparameters()[k], v, rtol=1e-5, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_compiled_matches_eager_every_optimizer(case, float64_default):
    for cfg in case.configs:
        _check(_pair(case, cfg, hyper=True, learn=case.learnable), f"{case.name} {cfg}", rtol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["corners", "reference"])
def test_compiled_mada_variants_float32(variant):
    pair = []
    for compile in (False, True):
        model = MLP(dtype=torch.float32)
        opt = MADA(model.parameters(), lr=1e-2, beta3=0.1, c=0.5, rho=0.5, gamma=0.5, variant=variant,
                   hyper=hg.SGD(lr=1e-4), compile=compile)
        train(model, opt, 10)
        pair.append((model, opt))
    _check(pair, variant, rtol=1e-4)
