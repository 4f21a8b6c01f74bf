"""The hyper levels' scalars stepped in Python floats (``scalar_update``, ``_hg_update_scalars``):
the same float32 numbers as the tensor operations of the eager path, bit for bit."""

from __future__ import annotations

import copy
import math
import struct

import pytest
import torch

import hypergrad as hg
from hypergrad.core import F32_TINY, HyperOptimizer, f32
from parameterized import MADA

from helpers import MLP, loss_at, same_bits, same_bits as _same


def _f32_samples(n, seed):
    """float32 numbers over the whole exponent range, both signs, with zeros, subnormals and
    the largest finite values."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    exp = torch.randint(-150, 128, (n,), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    x = (sign * mant * torch.exp2(exp)).to(torch.float32)
    x[:8] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1.0, F32_TINY])
    return x


@pytest.mark.parametrize("op", ["mul", "sub", "add", "div"])
def test_f32_rounds_as_torch_float32_operations(op):
    a, b = _f32_samples(4000, 1), _f32_samples(4000, 2)
    # every sum and difference of close numbers too (cancellation), and products near the edges
    b[::3] = a[::3] * 1.0001
    # and pairs whose result overflows or is subnormal
    edges = {"mul": [(1e20, 1e20), (1e-20, 1e-21)], "div": [(1e30, 1e-10), (1e-30, 1e10)],
             "add": [(3.4e38, 3.4e38), (1.5 * F32_TINY, -F32_TINY)],
             "sub": [(3.4e38, -3.4e38), (1.5 * F32_TINY, F32_TINY)]}[op]
    for i, (x, y) in enumerate(edges):
        a[10 + i], b[10 + i] = x, y
    want = getattr(torch, op)(a, b)
    fn = {"mul": lambda x, y: x * y, "sub": lambda x, y: x - y, "add": lambda x, y: x + y,
          "div": lambda x, y: x / y if y else math.copysign(math.inf, x) * math.copysign(1.0, y) if x else math.nan}[op]
    got = torch.tensor([f32(fn(x, y)) for x, y in zip(a.tolist(), b.tolist())], dtype=torch.float32)
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    assert bool(same.all()), (a[~same][:3], b[~same][:3], got[~same][:3], want[~same][:3])
    # the sign of zero too
    z = want == 0
    assert torch.equal(torch.signbit(got[z]), torch.signbit(want[z]))
    # and the values reach the overflow and the subnormal range (the test covers both)
    assert bool(torch.isinf(want).any()) and bool(((want != 0) & (want.abs() < F32_TINY)).any())


def _bits(x: float) -> bytes:
    return struct.pack("f", x)


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
def test_sgd_scalar_update_is_its_tensor_update(flush):
    p, g, lr = _f32_samples(3000, 3), _f32_samples(3000, 4), _f32_samples(3000, 5).abs()
    lr[::2] = lr[::2] * 0 + 1e-3  # learning rates as used, and wild ones
    o = {"momentum": False, "wd": False, "nesterov": False, "maximize": False}
    taken = 0
    if flush and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for x, y, z in zip(p.tolist(), g.tolist(), lr.tolist()):
            xt, yt, zt = (torch.tensor(v, dtype=torch.float32) for v in (x, y, z))
            want, _ = hg.SGD.update(xt, yt, {}, {"lr": zt}, o)
            got = hg.SGD.scalar_update(xt.item(), yt.item(), {"lr": zt.item()}, o)
            if got is None:  # only where a number is a float32 subnormal
                u = float(zt * yt)
                assert any(0 < abs(v) < F32_TINY for v in (x, y, z, u, float(want)))
                continue
            taken += 1
            if math.isnan(got):
                assert math.isnan(float(want)), (x, y, z)
            else:  # every bit, the sign of zero too
                assert _bits(got) == _bits(float(want)), (x, y, z)
    finally:
        torch.set_flush_denormal(False)
    assert taken > 2000  # (the wide samples make some products underflow)
    for opt in ({"momentum": True}, {"wd": True}):
        assert hg.SGD.scalar_update(1.0, 1.0, {"lr": 0.1}, {**o, **opt}) is None


def _stacks():
    """(name, make(params)) of stacks whose top level (or two) learns nothing: float32 models."""
    return [
        ("adam-sgd", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3))),
        ("adam-sgd-one-pass", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3), one_pass=True)),
        ("adam-sgd-maximize-top", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-4, maximize=True))),
        # clipped by the projection at almost every step
        ("adam-sgd-clipped", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e3), reparam=None,
                                                 bounds={"lr": (1e-4, 2e-2), "beta1": (0.5, 0.95)})),
        ("sgd-sgd-sgd", lambda ps: hg.SGD(ps, lr=1e-2, momentum=0.9, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-6)))),
        ("adam-sgd-sgd-one-pass", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3, hyper=hg.SGD(lr=1e-5)),
                                                      one_pass=True)),
        ("mada-sgd", lambda ps: MADA(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3))),
        # the middle level's steps clipped by the bounds below it (its records' masks), in both orders
        ("adam-sgd-sgd-clipped", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e3, hyper=hg.SGD(lr=1e-6)),
                                                     reparam=None, bounds={"lr": (1e-4, 2e-2), "beta1": (0.5, 0.95)})),
        ("adam-sgd-sgd-clipped-one-pass", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e3, hyper=hg.SGD(lr=1e-6)),
                                                              reparam=None, bounds={"lr": (1e-4, 2e-2)}, one_pass=True)),
        ("adam-sgd-maximize-sgd", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-4, maximize=True,
                                                                               hyper=hg.SGD(lr=1e-6)))),
        ("sgd-momentum-top", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3, momentum=0.5))),
        # a middle level that learns with momentum (a state the float path does not make): eager
        ("sgd-momentum-middle", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3, momentum=0.5,
                                                                             hyper=hg.SGD(lr=1e-6)))),
        # a middle level whose steps overflow: not taken, counted, its records dropped
        ("adam-sgd-sgd-overflow", lambda ps: hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e38, hyper=hg.SGD(lr=1e-6)),
                                                      reparam=None, bounds={"lr": (0.0, 1.0)}, one_pass=True)),
    ]


def _run(make, steps, fast: bool, monkeypatch):
    model = MLP(dtype=torch.float32)
    opt = make(list(model.parameters()))
    with monkeypatch.context() as m:
        calls, kinds = [], []
        orig = HyperOptimizer._hg_update_scalars

        def counted(self, gi, kind=None, snaps=None):
            done = orig(self, gi, kind, snaps)
            calls.append(done)
            kinds.append((kind, done))
            return done
        m.setattr(HyperOptimizer, "_hg_update_scalars", counted)
        terms = HyperOptimizer._hg_hypergrad_scalars

        def counted_terms(self):
            done = terms(self)
            _run.terms.append(done)
            return done
        _run.terms = []
        m.setattr(HyperOptimizer, "_hg_hypergrad_scalars", counted_terms)
        if not fast:
            m.setattr(hg.SGD, "scalar_update", None)
            m.setattr(hg.SGD, "scalar_hyper_terms", None)
        for t in range(1, steps + 1):
            opt.zero_grad()
            loss_at(model, t).backward()
            opt.step()
    _run.kinds = kinds
    if not fast:  # the eager run is eager: the float path never took a group
        assert not any(calls) and not any(_run.terms), (calls, _run.terms)
    return model, opt, calls


@pytest.mark.parametrize("name,make", _stacks(), ids=[n for n, _ in _stacks()])
def test_scalar_levels_step_as_the_eager_path(name, make, monkeypatch):
    ma, oa, calls = _run(make, 12, True, monkeypatch)
    kinds, terms = _run.kinds, _run.terms
    mb, ob, _ = _run(make, 12, False, monkeypatch)
    if name == "sgd-momentum-top":  # a state: the eager path
        assert calls and not any(calls)
    elif name == "sgd-momentum-middle":  # the middle level keeps a momentum buffer: eager; the top: floats
        assert not any(done for kind, done in kinds if kind == "closed") and any(calls)
    else:
        assert sum(calls) >= 9, calls  # (a few steps before the first hyper-gradients reach the top)
    if name == "adam-sgd-sgd-overflow":
        assert oa.levels[1].steps_skipped == ob.levels[1].steps_skipped > 0
    elif "sgd-sgd" in name or name == "adam-sgd-maximize-sgd":  # the middle SGD level learns its lr: records
        assert sum(done for kind, done in kinds if kind == "closed") >= 8, kinds
    if "sgd-sgd" in name or name == "adam-sgd-maximize-sgd":  # and its hyper-gradients in floats
        assert sum(terms) >= 8, terms
    elif name == "sgd-momentum-middle":  # (its closed form reads the momentum buffer; before its
        assert not any(terms[4:]), terms  # first records, from step 3, there is nothing to compute)
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    for la, lb in zip(oa.levels, ob.levels):
        for gi in range(len(la.param_groups)):
            for (n, va), vb in zip(la.hyperparameters(gi).items(), lb.hyperparameters(gi).values()):
                assert torch.equal(va, vb), (name, n)
        assert la.steps_skipped == lb.steps_skipped
        # the whole state_dict, and the state itself with the records of the last updates (and
        # of the ones before) that the next hyper-gradients read
        _same(la.state_dict(), lb.state_dict(), name)
        pa, pb = [p for g in la.param_groups for p in g["params"]], [p for g in lb.param_groups for p in g["params"]]
        _same([la.state.get(p) for p in pa], [lb.state.get(p) for p in pb], (name, "state"))
    if name == "adam-sgd-clipped":  # the projection did clip
        lr = oa.hyperparameters()["lr"]
        assert float(lr) in (oa.levels[1]._hg_proj[oa._hg_vars[0]["lr"].raw[0]])


def test_overflowing_scalar_step_is_not_taken_as_in_the_eager_path(monkeypatch):
    def make(ps):
        return hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e30), reparam=None, bounds={"lr": (0.0, 1.0)})
    ma, oa, calls = _run(make, 4, True, monkeypatch)
    mb, ob, _ = _run(make, 4, False, monkeypatch)
    assert any(calls)
    assert oa.levels[1].steps_skipped == ob.levels[1].steps_skipped > 0
    for a, b in zip(ma.parameters(), mb.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(oa.hyperparameters()["lr"], ob.hyperparameters()["lr"])


def test_scalar_levels_keep_a_checkpoint_round_trip(monkeypatch):
    make = dict(_stacks())["adam-sgd-one-pass"]
    model = MLP(dtype=torch.float32)
    opt = make(list(model.parameters()))
    for t in range(1, 5):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
    saved_m, saved_o = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    model2 = MLP(dtype=torch.float32)
    opt2 = make(list(model2.parameters()))
    model2.load_state_dict(saved_m)
    opt2.load_state_dict(saved_o)
    for m, o in ((model, opt), (model2, opt2)):
        for t in range(5, 9):
            o.zero_grad()
            loss_at(m, t).backward()
            o.step()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)


def test_a_subclass_with_its_own_rule_does_not_take_sgds_float_update(monkeypatch):
    class Halved(hg.SGD):  # another rule: the float update of SGD would not follow it
        @staticmethod
        def update(p, g, s, h, o):
            return p - 0.5 * h["lr"] * g, {}
    from hypergrad.core import _scalar_update_of
    assert _scalar_update_of(hg.SGD) is not None and _scalar_update_of(Halved) is None

    class Named(hg.SGD):  # the same rule
        pass
    assert _scalar_update_of(Named) is not None
    ps = [torch.nn.Parameter(torch.tensor(1.5)), torch.nn.Parameter(torch.tensor(-2.0))]
    opt = Halved(ps, lr=0.25)
    for p in ps:
        p.grad = torch.tensor(1.0)
    opt.step()
    assert [float(p.detach()) for p in ps] == [1.5 - 0.125, -2.0 - 0.125]


@pytest.mark.parametrize("lr", [0.1, 1e38], ids=["finite", "overflow"])
def test_one_element_parameters_of_a_plain_sgd_step_as_the_eager_path(lr, monkeypatch):
    """A bottom level that learns nothing, on one-element parameters (no projection bounds:
    an overflow is written, as the eager path writes it); a parameter without a gradient sends
    the group to the eager path, with nothing written by the float path."""
    def run(fast, with_none):
        ps = [torch.nn.Parameter(torch.tensor(x)) for x in (1.5, -2.0, 3.0)]
        opt = hg.SGD(ps, lr=lr)
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(hg.SGD, "scalar_update", None)
            taken = []
            orig = HyperOptimizer._hg_update_scalars
            m.setattr(HyperOptimizer, "_hg_update_scalars",
                      lambda self, gi, *a: taken.append(orig(self, gi, *a)) or taken[-1])
            for t in range(3):
                for j, p in enumerate(ps):
                    p.grad = None if (with_none and j == 1 and t == 1) else torch.tensor(1e1 * (j + 1) - t, dtype=torch.float32)
                opt.step()
        return ps, opt, taken
    for with_none in (False, True):
        a, oa, taken = run(True, with_none)
        b, ob, _ = run(False, with_none)
        assert taken == ([True, False, True] if with_none else [True, True, True])
        for x, y in zip(a, b):
            assert _bits(float(x.detach())) == _bits(float(y.detach()))
        assert oa.state_dict()["state"].keys() == ob.state_dict()["state"].keys()
    if lr > 1:
        assert any(math.isinf(float(x.detach())) for x in a)


def test_a_bottom_level_of_one_element_parameters_that_learns_steps_as_the_eager_path(monkeypatch):
    """kind "closed" on a bottom level (not a hyper level): 0-dim model parameters, SGD learning
    its lr, in both orders; also a subclass whose init_state differs keeps the eager path."""
    def run(fast, one_pass):
        ps = [torch.nn.Parameter(torch.tensor(x)) for x in (1.5, -2.0, 0.25)]
        opt = hg.SGD(ps, lr=0.1, hyper=hg.SGD(lr=1e-2), one_pass=one_pass)
        taken = []
        with monkeypatch.context() as m:
            orig = HyperOptimizer._hg_update_scalars
            m.setattr(HyperOptimizer, "_hg_update_scalars",
                      lambda self, gi, *a: taken.append((a[0] if a else None, orig(self, gi, *a))) or taken[-1][1])
            if not fast:
                m.setattr(hg.SGD, "scalar_update", None)
            for t in range(6):
                for j, p in enumerate(ps):
                    p.grad = (2.0 * (p.detach() - 0.3 * j) + 0.01 * t).clone()
                opt.step()
        return ps, opt, taken
    for one_pass in (False, True):
        a, oa, taken = run(True, one_pass)
        b, ob, tb = run(False, one_pass)
        assert not any(done for _, done in tb)
        if not one_pass:  # (one_pass=True: the bottom level's update is its own, not this path)
            assert sum(done for kind, done in taken if kind == "closed") >= 4, taken
        for x, y in zip(a, b):
            assert _bits(float(x.detach())) == _bits(float(y.detach()))
        for la, lb in zip(oa.levels, ob.levels):
            pa = [p for g in la.param_groups for p in g["params"]]
            pb = [p for g in lb.param_groups for p in g["params"]]
            _same([la.state.get(p) for p in pa], [lb.state.get(p) for p in pb], one_pass)
            _same(la.state_dict(), lb.state_dict(), one_pass)

    class Stateful(hg.SGD):
        @staticmethod
        def init_state(p, o):
            return {"seen": torch.zeros_like(p)}
    from hypergrad.core import _scalar_update_of
    assert _scalar_update_of(Stateful) is None

    class Later(hg.SGD):
        pass
    assert _scalar_update_of(Later) is not None
    Later.update = staticmethod(lambda p, g, s, h, o: (p - h["lr"] * g, {}))  # a rule of its own, later
    assert _scalar_update_of(Later) is None


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("maximize", [False, True])
def test_middle_level_float_hypergradients_are_the_tensor_ones(maximize, flush, monkeypatch):
    """A middle level's hyper-gradients from ``_hg_hypergrad_scalars`` and from the general loop,
    on the same records with random gradients and saved gradients over the float32 range (all
    zero: the sign of the sum's zero; huge: an overflow, dropped and counted): bit for bit."""
    model = MLP(dtype=torch.float32)
    opt = hg.Adam(list(model.parameters()), lr=1e-2, one_pass=True,
                  hyper=hg.SGD(lr=1e-3, maximize=maximize, hyper=hg.SGD(lr=1e-6)))
    for t in range(1, 6):
        opt.zero_grad()
        loss_at(model, t).backward()
        opt.step()
    mid = opt.levels[1]
    ps = mid.param_groups[0]["params"]
    saved = [mid.state[p]["hg_record_prev"]["state"]["hg_gprev"] for p in ps]
    gen = torch.Generator().manual_seed(3)
    hv = mid._hg_vars[0]["lr"]

    def outcome(before):
        return ([x.clone() if x is not None else None for x in hv.grad],
                [r.grad.clone() if r.grad is not None else None for r in hv.raw], mid.hyper_steps_skipped - before,
                mid._hg_ok)
    zeros = huge = declined = 0
    for trial in range(300):
        kind = trial % 6
        for j, (p, s) in enumerate(zip(ps, saved)):
            if kind == 0:  # all zero
                p.grad = torch.zeros_like(p)
            elif kind == 2:  # normal terms whose sum is subnormal (which flush_denormal flushes)
                p.grad = torch.full_like(p, [1.25 * 2.0 ** -125, -2.0 ** -125, 0.0][j])
                s.fill_(1.0)
            elif kind == 1:  # an overflow of the products or of their sum
                p.grad = torch.full_like(p, 3e38 * (1 if torch.rand(1, generator=gen) < 0.5 else -1))
                s.fill_(2.0)
            else:
                e = torch.randint(-60, 60, (1,), generator=gen).item()
                p.grad = (torch.randn(p.shape, generator=gen) * 2.0 ** e).to(torch.float32)
                s.fill_(float(torch.randn(1, generator=gen)) * 2.0 ** torch.randint(-60, 60, (1,), generator=gen).item())
        before = mid.hyper_steps_skipped
        torch.set_flush_denormal(flush)
        try:
            took = mid._hg_hypergrad_scalars()
        finally:
            torch.set_flush_denormal(False)
        if not took:  # a subnormal on the way: the general loop computes it
            assert kind == 2, trial
            declined += 1
            continue
        fast = outcome(before)
        before = mid.hyper_steps_skipped
        with monkeypatch.context() as m:
            m.setattr(hg.SGD, "scalar_hyper_terms", None)
            torch.set_flush_denormal(flush)
            try:
                assert not mid._hg_hypergrad_scalars()
                mid._hg_hypergrad()
            finally:
                torch.set_flush_denormal(False)
        same_bits(fast, outcome(before), trial)
        zeros += kind == 0
        huge += not fast[3]
    # each happened; under flush_denormal the float32 rounding (struct's conversion) flushes a
    # subnormal sum to zero as torch does, so nothing is declined there
    assert zeros and huge and declined == (0 if flush else 50)


@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "1-element"])
@pytest.mark.parametrize("scope", ["element", "tensor", "group"])
@pytest.mark.parametrize("height", [2, 3])
def test_a_level_of_scalars_of_any_scope_steps_as_the_eager_path(height, scope, shape, monkeypatch):
    """An SGD level of one-element parameters learning its lr per element, per tensor or per
    group (the bottom level, or the middle one of three): the float hyper-gradients (where they
    apply) are the general loop's, shapes included."""
    def run(fast):
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(shape, generator=g)) for _ in range(3)]
        top = hg.SGD(lr=1e-6)
        if height == 2:
            opt = hg.SGD(ps, lr=1e-2, scope={"lr": scope}, hyper=top)
        else:
            opt = hg.Adam(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3, scope={"lr": scope}, hyper=top))
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(hg.SGD, "scalar_hyper_terms", None)
                m.setattr(hg.SGD, "scalar_update", None)
            for t in range(1, 9):
                opt.zero_grad()
                sum(((p - 0.1 * t) ** 2).sum() for p in ps).backward()
                opt.step()
        return ps, opt
    (pa, oa), (pb, ob) = run(True), run(False)
    same_bits(list(pa), list(pb), "model")
    for la, lb in zip(oa.levels, ob.levels):
        same_bits(la.hyperparameters(), lb.hyperparameters(), (scope, "values"))
        same_bits(la.hypergradients(), lb.hypergradients(), (scope, "hypergradients"))
        same_bits(la.state_dict(), lb.state_dict(), (scope, "state_dict"))
