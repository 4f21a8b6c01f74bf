"""``one_pass=True``: the bottom level computes the hyper-gradient of its last update and makes
this step's update in one pass; the hyper-steps take effect one step later, and each level above
differentiates its update before last.

Checked: hyper-gradients against finite differences of f_t(x_{t-1}) in float64 at every level
(perturbing each level's value where the differentiated update used it); the hand-written
kernel against the eager path; with a zero hyper-lr, torch.optim; checkpoints bit for bit;
skipped non-finite steps; and the errors."""

import io
import warnings

import pytest
import torch

import hypergrad as hg
from parameterized import MADA
from fd import fd_grad, our_raw_grad, step_size
from helpers import MLP, assert_stacks_agree, train
from table import CASES

T = 7


def check(build, targets):
    model, opt = build()
    train(model, opt, T)
    for level, name in targets:
        ours = our_raw_grad(opt, level, name)
        hv = opt.levels[level]._hg_vars[0][name]
        h = step_size(name, float(hv.raw[0]), reparam=hv.transform.name is not None)
        fd, noise = fd_grad(build, T, level, name, h, lag=0 if level == 0 else 1)
        assert ours != 0
        assert ours == pytest.approx(fd, rel=1e-5, abs=max(noise, 1e-12)), \
            f"level {level} {name}: ours {ours} fd {fd} (noise {noise:.1e})"


@pytest.mark.parametrize("cls", [hg.Adam, hg.AdamW, hg.SGD, hg.RMSprop, MADA])
def test_level1_finite_differences(cls):
    kw = dict(lr=0.01, momentum=0.9) if cls is hg.SGD else \
        dict(lr=0.01, momentum=0.5) if cls is hg.RMSprop else \
        dict(lr=0.01, beta3=0.3, c=0.7, rho=0.6, gamma=0.8) if cls is MADA else dict(lr=0.01)

    def build():
        model = MLP()
        return model, cls(model.parameters(), **kw, hyper=hg.SGD(lr=1e-3), one_pass=True, compile=False)
    model, opt = build()
    check(build, [(0, n) for n in opt.learned])


@pytest.mark.parametrize("bottom", ["sgd", "adam"])
def test_stack_levels_2_and_3_finite_differences(bottom):
    """Levels 2 and 3 (Adam, SGD with momentum) differentiate their update before last."""
    def build():
        model = MLP()
        top = hg.SGD(lr=1e-4)
        l3 = hg.SGD(lr=1e-3, momentum=0.5, hyper=top)
        l2 = hg.Adam(lr=1e-3, hyper=l3)
        if bottom == "sgd":
            return model, hg.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01, hyper=l2,
                                 learn=["lr", "momentum", "weight_decay"], one_pass=True, compile=False)
        return model, hg.Adam(model.parameters(), lr=0.01, hyper=l2, one_pass=True, compile=False)
    model, opt = build()
    targets = [(0, n) for n in opt.learned] + [(1, n) for n in opt.hyper.learned] + \
        [(2, n) for n in opt.hyper.hyper.learned]
    check(build, targets)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_levels_above_closed_form_is_autograd(case):
    """Every optimizer as level 2 of a one-pass stack, learning every learnable name: its
    closed form, at the parameter and state its update before last left (the record keeps
    them), gives what autograd through recorded copies gives (backend="autograd"), to float64
    rounding: the hyper-gradients of every level and the trajectories."""
    runs = []
    for backend in ("auto", "autograd"):
        model = MLP()
        l2 = case.ours(**case.hyper_kw, learn=case.learnable, backend=backend, hyper=hg.SGD(lr=1e-6))
        opt = hg.Adam(model.parameters(), lr=0.01, hyper=l2, one_pass=True, compile=False)
        train(model, opt, T)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    l2 = o1.hyper
    closed = [gi for gi in range(len(l2.param_groups)) if l2._hg_kind(gi) == "closed"]
    if type(l2).hyper_terms is not None and l2.closed_form_ok(l2._hg_opts[0], l2._hg_vars[0]):
        assert closed, "the closed form was not used"
    assert_stacks_agree(m1, o1, m2, o2)



def test_paper_order_checkpoint_into_a_one_pass_stack():
    """A checkpoint of the paper's order loaded into a one-pass stack: the level above holds
    records of its last update, not of the one before, which its hyper-gradient needs. It
    computes none from them (the first two steps after loading), then goes on from its own."""
    def make(params, one_pass):
        return hg.Adam(params, lr=1e-2, hyper=hg.Adam(lr=1e-4, hyper=hg.SGD(lr=1e-6)), one_pass=one_pass,
                       compile=False)
    p1 = _model()
    o1 = make(p1, False)
    for t in range(5):
        _grads(p1, t)
        o1.step()
    o2 = make(p1, True)
    o2.load_state_dict(o1.state_dict())
    seen = []
    for t in range(5, 9):
        _grads(p1, t)
        o2.step()
        seen.append(o2.hyper.hypergradients()["lr"] is not None)
    assert seen == [False, False, True, True], seen
    assert all(torch.isfinite(x).all() for x in p1)

def _model(seed=0):
    # sizes that are not multiples of the vector width, and one of several 4096-element blocks
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(37, 301), (301,), (5,), (9000,)]]


def _grads(params, t):
    """The gradient of 0.5 |p - 1|^2 with some noise: a problem on which the lr stays moderate."""
    g = torch.Generator().manual_seed(100 + t)
    for p in params:
        p.grad = (p.detach() - 1) + torch.randn(p.shape, generator=g) * 0.05


_ALL_MADA = ["beta1", "beta2", "beta3", "c", "rho", "gamma", "lr", "eps", "weight_decay"]


# the sums kernel (paper order) shares the one-pass kernel's threading: one thread suffices
@pytest.mark.parametrize("one_pass,threads", [(True, 1), (True, 2), (False, 1)],
                         ids=["one-pass-1", "one-pass-2", "paper-order-1"])
@pytest.mark.parametrize("kw", [
    dict(cls=hg.Adam), dict(cls=hg.AdamW, weight_decay=0.1), dict(cls=hg.Adam, maximize=True),
    dict(cls=hg.Adam, betas=(0.3, 0.9)), dict(cls=hg.Adam, eps=0.0),
    dict(cls=MADA), dict(cls=MADA, beta3=0.5, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.1),
    dict(cls=MADA, variant="reference", beta3=0.3, c=0.7, rho=0.6, gamma=0.8),
    dict(cls=MADA, maximize=True, beta1=0.3, beta3=0.6),
    dict(cls=MADA, weight_decay=0.1, beta3=0.4, gamma=0.7, c=0.3, learn=_ALL_MADA),
    dict(cls=MADA, variant="reference", c=0.2, rho=0.3, learn=_ALL_MADA),
    # the kernel makes only the sums the learned names use (parameterized/_onepass.py, _need)
    dict(cls=MADA, beta3=0.5, c=0.5, rho=0.5, gamma=0.5, learn=["lr", "eps"]),
    dict(cls=MADA, beta3=0.5, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.1, learn=["lr", "beta3"]),
    dict(cls=MADA, beta3=0.5, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.1, learn=["weight_decay"])],
    ids=["adam", "adamw", "maximize", "lerp-high", "eps0", "mada", "mada-mixed-wd", "mada-reference",
         "mada-maximize-lerp-high", "mada-all-names", "mada-reference-all-names", "mada-lr-eps",
         "mada-wd-lr-beta3", "mada-wd-alone"])
def test_kernel_agrees_with_eager(kw, threads, one_pass):
    """The hand-written kernels (float32, CPU) compute what the eager path computes: the
    parameters, the hyper-gradients of every name they cover, the hyperparameters after the
    hyper-steps; with ``one_pass=True`` the one-pass kernel, in the paper's order the sums-only
    kernel before the compiled update. (The MADA cases move every coefficient off its corner, so
    that no term vanishes; learning eps lets the projection put it at 0, where 1/eps is inf.)"""
    kw = dict(kw)
    cls = kw.pop("cls")
    (pe, oe, fe), (pf, of, ff) = _eager_and_kernel(
        lambda ps, compile: cls(ps, lr=1e-2, hyper=hg.SGD(lr=1e-9), one_pass=one_pass, compile=compile, **kw),
        one_pass, threads, 12, _grads)
    assert not any(fe) and all(ff[2:]), (fe, ff)  # the kernel ran from the third step on
    for n, v in oe.hyperparameters().items():
        assert float(of.hyperparameters()[n]) == pytest.approx(float(v), rel=1e-5), n
    for n in oe.learned:
        a, b = float(oe.hypergradients()[n]), float(of.hypergradients()[n])
        assert b == pytest.approx(a, rel=1e-4, abs=1e-9), n
        assert a != 0, n
    for a, b in zip(pe, pf):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _eager_and_kernel(make, one_pass, threads, steps, grads):
    """``make(params, compile)`` run with ``compile=False`` (the eager path) and ``compile=True``
    (the kernels) on ``grads(params, t)`` for ``steps`` steps at ``threads`` threads: for each,
    the parameters, the optimizer and, per step, whether a hand-written kernel made it."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for compile in (False, True):
            params = _model()
            opt = make(params, compile)
            used = []
            for t in range(steps):
                grads(params, t)
                opt.step()
                used.append(bool(opt._hg_fused if one_pass else opt._hg_summed))
            runs.append((params, opt, used))
        return runs
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("one_pass,threads", [(True, 1), (True, 2), (False, 1), (False, 2)],
                         ids=["one-pass-1", "one-pass-2", "paper-order-1", "paper-order-2"])
@pytest.mark.parametrize("kw", [dict(beta3=0.5, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.1),
                                dict(variant="reference", beta3=0.3, c=0.2, rho=0.6, gamma=0.8),
                                dict(maximize=True, beta1=0.3, beta3=0.6, c=0.3, gamma=0.4),
                                dict(c=0.0, gamma=0.5, beta3=0.7)],
                         ids=["corners-wd", "reference", "maximize-lerp-high", "yogi"])
def test_mada_kernels_keep_the_sign_decisions_of_the_eager_path(kw, one_pass, threads):
    """What a sign decision of MADA reads, at this step or a later one through the state
    (Yogi's and Lion's), the kernels compute as the eager path does, bit for bit; only the
    running mean and the parameters may differ in the last bit (reciprocals, fused
    multiply-adds). With hyper-lr 0 and gradients that do not depend on the parameters, both
    paths see the same inputs at every step, so their states must be equal."""
    def grads(params, t):
        g = torch.Generator().manual_seed(100 + t)
        for p in params:  # (large and small steps in turn: Yogi's sign changes)
            p.grad = torch.randn(p.shape, generator=g) * (1e-2 if t % 2 else 1.0)
    (pe, oe, _), (pk, ok, used) = _eager_and_kernel(
        lambda ps, compile: MADA(ps, lr=1e-2, hyper=hg.SGD(lr=0.0), one_pass=one_pass, compile=compile, **kw),
        one_pass, threads, 10, grads)
    assert all(used[2:]), used
    keys = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "lion_exp_avg", "previous_grad", "hg_n", "hg_ysign",
            "hg_sign", "step")
    for a, b in zip(pe, pk):
        for k in keys:
            assert torch.equal(oe.state[a][k], ok.state[b][k]), (k, tuple(a.shape))
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def _as_torch_adamw(make, steps, **kw):
    """Run ``make(params)`` and ``torch.optim.AdamW(lr=1e-2, **kw)`` on the same gradients for
    ``steps`` steps and assert that the parameters agree; return the parameters and optimizer."""
    params, ref = _model(), _model()
    opt, topt = make(params), torch.optim.AdamW(ref, lr=1e-2, **kw)
    for t in range(steps):
        _grads(params, t)
        _grads(ref, t)
        opt.step()
        topt.step()
    for a, b in zip(params, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    return params, opt

@pytest.mark.parametrize("compile", [False, True])
def test_zero_hyper_lr_is_torch_adam(compile):
    """With hyper-lr 0 the hyperparameters never move: the one-pass step is torch's AdamW step."""
    _as_torch_adamw(lambda ps: hg.AdamW(ps, lr=1e-2, weight_decay=0.1, hyper=hg.SGD(lr=0.0), one_pass=True,
                                        compile=compile), 10, weight_decay=0.1)


@pytest.mark.parametrize("rule", ["adam", "mada"])
@pytest.mark.parametrize("compile", [False, True])
def test_checkpoint_bit_for_bit(compile, rule):
    """A 3-level one-pass stack: 2N steps, or N steps + save + load into a fresh stack + N."""
    def make(params):
        top = hg.Adam(lr=1e-4, hyper=hg.SGD(lr=1e-6))
        if rule == "mada":
            return MADA(params, lr=1e-2, beta3=0.3, c=0.6, rho=0.7, gamma=0.8, hyper=top, one_pass=True,
                        compile=compile)
        return hg.Adam(params, lr=1e-2, hyper=top, one_pass=True, compile=compile)
    p1 = _model()
    o1 = make(p1)
    for t in range(10):
        _grads(p1, t)
        o1.step()
    assert bool(o1._hg_fused) == compile  # compiled: the hand-written kernel made the steps
    p2 = _model()
    o2 = make(p2)
    for t in range(5):
        _grads(p2, t)
        o2.step()
    buf = io.BytesIO()
    torch.save({"model": [p.detach().clone() for p in p2], "opt": o2.state_dict()}, buf)
    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    p3 = _model(seed=1)
    with torch.no_grad():
        for p, s in zip(p3, ck["model"]):
            p.copy_(s)
    o3 = make(p3)
    o3.load_state_dict(ck["opt"])
    for t in range(5, 10):
        _grads(p3, t)
        o3.step()
    for a, b in zip(p1, p3):
        assert torch.equal(a, b)
    for lvl1, lvl3 in zip(o1.levels, o3.levels):
        for n, v in lvl1.hyperparameters().items():
            assert torch.equal(v, lvl3.hyperparameters()[n]), n


@pytest.mark.parametrize("cls", [hg.Adam, MADA])
def test_nonfinite_gradient_skips_the_step(cls):
    params = _model()
    opt = cls(params, lr=1e-2, hyper=hg.SGD(lr=1e-4), one_pass=True, compile=True)
    for t in range(4):
        _grads(params, t)
        opt.step()
    assert opt._hg_fused  # the kernel made the last step
    before = [p.detach().clone() for p in params]
    hyper = {n: v.clone() for n, v in opt.hyperparameters().items()}
    state = {k: v.clone() for k, v in opt.state[params[3]].items() if isinstance(v, torch.Tensor)}
    _grads(params, 4)
    params[3].grad[17] = float("nan")
    opt.step()
    assert opt.steps_skipped == 1
    for a, b in zip(before, params):
        assert torch.equal(a, b)
    for n, v in opt.hyperparameters().items():
        assert torch.equal(v, hyper[n]), n
    for k, v in state.items():
        assert torch.equal(opt.state[params[3]][k], v), k
    _grads(params, 5)
    opt.step()
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("one_pass", [False, True])
def test_large_finite_gradients_are_not_skipped(one_pass):
    """The finiteness check sums the gradients: a sum that overflows from finite values must not
    skip the step (the check then looks at the min and max)."""
    params = [torch.nn.Parameter(torch.zeros(70000)), torch.nn.Parameter(torch.zeros(0))]
    opt = hg.Adam(params, lr=1e-3, hyper=hg.SGD(lr=0.0), one_pass=one_pass) if one_pass else \
        hg.Adam(params, lr=1e-3)
    params[0].grad = torch.full((70000,), 3e38)
    params[1].grad = torch.zeros(0)
    assert torch.isinf(params[0].grad.sum())
    opt.step()
    assert opt.steps_skipped == 0
    assert float(opt.state[params[0]]["step"]) == 1  # the step was taken
    params[0].grad[5] = float("inf")
    opt.step()
    assert opt.steps_skipped == 1


def test_errors():
    p = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="bottom level"):
        hg.Adam(p, hyper=hg.SGD(lr=1e-3, one_pass=True))
    with pytest.raises(ValueError, match="needs a hyper level"):
        hg.Adam(p, one_pass=True)
    with pytest.raises(ValueError, match="True or False"):
        hg.Adam(p, hyper=hg.SGD(lr=1e-3), one_pass="yes")
    # a level above differentiates its update before last: no restore from the state now
    opt = hg.Adam(p, hyper=hg.Adam(lr=1e-3, backend="restore", hyper=hg.SGD(lr=0.0)), one_pass=True)
    p[0].grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="one_pass"):
        opt.step()


@pytest.mark.parametrize("threads", [1, 2])
def test_finiteness_kernel(threads):
    """The hand-written check of the gradients (float32 CPU, compiled levels) against
    torch.isfinite: NaN, inf and -inf anywhere (first element, across block and vector
    boundaries, the last lane of a partial vector), and finite extremes that are not flagged."""
    from hypergrad import _onepass
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        # 131085: two threads' shares (of at least 4096 vectors each), eight streams in each
        # (their boundaries near sixteenths), vectors left over after the streams and a partial
        # last vector
        sizes = [0, 1, 15, 16, 17, 63, 16384, 16385, 40000, 131085]
        assert _onepass.all_finite([torch.randn(n, generator=g) for n in sizes])
        extremes = torch.tensor([3.4028235e38, -3.4028235e38, 1e-45, -1e-45, 0.0, -0.0, 1.1754944e-38])
        assert _onepass.all_finite([extremes])
        for bad in (float("nan"), float("inf"), -float("inf")):
            for n in sizes[1:]:
                edges = {0, n - 1, min(n - 1, 16383), min(n - 1, 16384)} | {
                    max(0, min(n - 1, n * k // 16 + d)) for k in range(1, 16) for d in (-1, 0, 1)}
                for i in sorted(edges):
                    xs = [torch.randn(n, generator=g) for n in (17, n, 5)]
                    xs[1][i] = bad
                    assert not _onepass.all_finite(xs), (bad, n, i)
                    assert not bool(torch.isfinite(xs[1]).all())
    finally:
        torch.set_num_threads(old)


def test_finiteness_check_uses_the_kernel_where_compiled():
    """A compiled level checks float32 CPU gradients with the kernel and the rest with sums; both
    skip a step with a NaN in either kind."""
    from hypergrad import _onepass
    calls = []
    orig = _onepass.all_finite

    def spy(xs):
        calls.append(len(xs))
        return orig(xs)
    _onepass.all_finite = spy
    try:
        a = torch.nn.Parameter(torch.zeros(100))
        b = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
        opt = hg.Adam([a, b], lr=1e-3, compile=True)
        for bad in (None, a, b):
            a.grad, b.grad = torch.ones(100), torch.ones(50, dtype=torch.float64)
            if bad is not None:
                bad.grad[7] = float("nan")
            before = opt.steps_skipped
            opt.step()
            assert opt.steps_skipped == before + (bad is not None)
        assert calls == [1, 1, 1]  # the float32 tensor went to the kernel each time
        calls.clear()
        hg.Adam([a], lr=1e-3, compile=False).step()
        assert calls == []  # an eager level builds no kernel
    finally:
        _onepass.all_finite = orig


@pytest.mark.parametrize("cls", [hg.Adam, MADA], ids=["adam", "mada"])
def test_paper_order_checks_its_group_once_a_step(cls, monkeypatch):
    """In the paper's order the sums kernel and the update kernel both take the group; the
    kernel's check of the tensors runs once a step (the second asks with the same gradients in
    the same step), and again at every step."""
    kernel = cls.one_pass_kernel
    seen = {"applies": 0, "update": 0}
    applies, update = kernel.applies, kernel.update

    def count(key, fn):
        return staticmethod(lambda *a, **k: seen.__setitem__(key, seen[key] + 1) or fn(*a, **k))
    monkeypatch.setattr(kernel, "applies", count("applies", applies))
    monkeypatch.setattr(kernel, "update", count("update", update))
    params = _model()
    opt = cls(params, lr=1e-2, hyper=hg.SGD(lr=1e-4), compile=True)
    for t in range(3):
        _grads(params, t)
        opt.step()
    seen.update(applies=0, update=0)
    for t in range(3, 9):
        _grads(params, t)
        opt.step()
        assert opt._hg_summed == {0}
    assert seen == {"applies": 6, "update": 6}, seen


def test_kernel_check_follows_tensors_that_change():
    """The kernel's check of its tensors reuses what it found for the parameters and the state
    while they are the same objects on the same storage, and checks the gradients every step: a
    gradient, state tensor or parameter storage that stops fitting (non-contiguous, aliasing
    the state) sends the step to the two-pass path, and a new fitting one is used."""
    def strided(x):
        return x.t().contiguous().t()
    cases = [  # (change before the step, whether the kernel makes it)
        (lambda w, st: setattr(w, "grad", strided(w.grad)), False),
        (lambda w, st: setattr(w, "grad", st["hg_gprev"]), False),        # aliases the state
        (lambda w, st: None, True),
        (lambda w, st: st.__setitem__("exp_avg", strided(st["exp_avg"])), False),
        (lambda w, st: st.__setitem__("exp_avg", st["exp_avg"].clone()), True),
        (lambda w, st: setattr(w, "data", strided(w.data)), False),
        (lambda w, st: setattr(w, "data", w.data.clone()), True)]
    for change, fused in cases:
        params = _model()
        opt = hg.Adam(params, lr=1e-2, hyper=hg.SGD(lr=1e-4), one_pass=True, compile=True)
        for t in range(4):
            _grads(params, t)
            opt.step()
        assert opt._hg_fused == {0}
        w = params[0]  # (37, 301)
        _grads(params, 4)
        change(w, opt.state[w])
        m, p = opt.state[w]["exp_avg"], w.detach().clone()
        m0 = m.clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a strided tensor: the compiled two-pass path gives up
            opt.step()
        assert opt._hg_fused == ({0} if fused else set())
        assert all(torch.isfinite(x).all() for x in params)
        if fused:  # the tensors now in place are the ones the kernel wrote
            assert opt.state[w]["exp_avg"] is m and not torch.equal(m, m0) and not torch.equal(w, p)


def test_kernel_check_sees_a_parameter_replaced_in_place_of_its_storage():
    """``p.data`` replaced by a view that starts at the same address (a transpose, a prefix):
    the check's memo compares the parameters' address, size and contiguity, so it does not
    take the new tensor for the one it found fit; a state tensor that dies clears the memo."""
    from hypergrad._onepass import AdamOnePass
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(37, 301, generator=g), torch.randn(301, generator=g)]
    states = [{k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq", "hg_gprev")} for p in params]
    grads = [torch.randn_like(p) for p in params]
    memo = {}
    assert AdamOnePass.applies(params, grads, states, memo) and "static" in memo
    assert AdamOnePass.applies(params, grads, states, memo)          # from the memo
    w = params[0]
    w.data = w.data.t()                                               # same address, not contiguous
    assert not AdamOnePass.applies(params, grads, states, memo)
    w.data = w.data.t().reshape(-1)[:5000]                            # same address, fewer elements
    grads[0] = torch.randn(5000, generator=g)
    assert not AdamOnePass.applies(params, grads, states, memo)
    params[0] = torch.randn(37, 301, generator=g)
    grads[0] = torch.randn(37, 301, generator=g)
    assert AdamOnePass.applies(params, grads, states, memo)
    states[1]["exp_avg"] = torch.zeros(301)                           # the old one dies
    assert "static" not in memo
    assert AdamOnePass.applies(params, grads, states, memo)


def test_kernel_check_memo_sees_state_tensors_given_other_storage():
    """With step counters in the states (the memo then reads them too): a state tensor given
    other storage (``.data``), or a state dict that lost a key, is not taken for what the memo
    found fit."""
    from hypergrad._onepass import AdamOnePass
    g = torch.Generator().manual_seed(1)
    params = [torch.randn(300, generator=g), torch.randn(7, 11, generator=g)]
    states = [{**{k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq", "hg_gprev")},
               "step": torch.tensor(3.0)} for p in params]
    grads = [torch.randn_like(p) for p in params]
    memo = {}
    assert AdamOnePass.applies(params, grads, states, memo) and "static" in memo
    assert AdamOnePass.applies(params, grads, states, memo)          # from the memo
    v = states[1]["exp_avg_sq"]
    v.data = torch.zeros(5)                                           # same object, too small
    assert not AdamOnePass.applies(params, grads, states, memo)
    v.data = torch.zeros(7, 11)
    assert AdamOnePass.applies(params, grads, states, memo)
    v.data = states[1]["exp_avg"].data                                # the same memory as another
    assert not AdamOnePass.applies(params, grads, states, memo)
    v.data = torch.zeros(7, 11)
    assert AdamOnePass.applies(params, grads, states, memo)
    del states[0]["hg_gprev"]
    assert not AdamOnePass.applies(params, grads, states, memo)
    states[0]["hg_gprev"] = torch.zeros(300)
    assert AdamOnePass.applies(params, grads, states, memo)
    grads[1] = states[1]["exp_avg"].view(7, 11)                        # a gradient over a state tensor
    assert not AdamOnePass.applies(params, grads, states, memo)
    grads[1] = torch.randn(7, 11, generator=g)
    # the memo of one set of keys does not answer for another: those tensors are checked
    from hypergrad._onepass import _applies
    states[1]["extra"] = torch.zeros(3)
    assert AdamOnePass.applies(params, grads, states, memo)
    assert not _applies(params, grads, states, ("exp_avg", "extra"), (), memo)
    assert _applies(params, grads, states, (), (), memo)                # no keys: p and g alone
    assert memo["static"][5][0] == ()


def test_kernel_step_counters():
    """The one-pass step advances the step counters through the addresses the kernels' check
    kept (float32 and float64 counters, mixed in a group), as ``torch._foreach_add_`` would; a
    counter replaced, or given other storage under the same tensor object (``.data``), is seen
    by the next check and counted where it now lives."""
    params = _model()
    opt = hg.Adam(params, lr=1e-2, hyper=hg.SGD(lr=1e-9), one_pass=True, compile=True)
    states = lambda: [opt.state[p] for p in params]  # noqa: E731
    for t in range(1, 5):
        _grads(params, t)
        opt.step()
        assert [float(st["step"]) for st in states()] == [t] * len(params)
    assert opt._hg_fused  # the kernel made steps 3 and 4
    st0, st1 = states()[0], states()[1]
    old = st0["step"]
    old.data = torch.tensor(10.0)                      # same object, other storage
    for st in states()[1:]:
        st["step"].fill_(10.0)
    for t in range(11, 13):
        _grads(params, t)
        opt.step()
        assert opt._hg_fused and st0["step"] is old
        assert [float(st["step"]) for st in states()] == [t] * len(params)
    st1["step"] = torch.tensor(12.0, dtype=torch.float64)  # another object, another dtype
    for t in range(13, 15):
        _grads(params, t)
        opt.step()
        assert opt._hg_fused and st1["step"].dtype == torch.float64
        assert [float(st["step"]) for st in states()] == [t] * len(params)


def test_advance_steps_without_a_fit_memo_is_foreach():
    """Counters the kernel cannot write (a tensor that needs a gradient, an integer one) keep
    ``torch._foreach_add_``: the check keeps no addresses for them."""
    from hypergrad._onepass import AdamOnePass, advance_steps
    params = [torch.randn(300), torch.randn(70)]
    grads = [torch.randn_like(p) for p in params]
    for bad in (torch.tensor(3, dtype=torch.int64), torch.tensor(3.0).requires_grad_()):
        states = [{k: torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq", "hg_gprev")} for p in params]
        states[0]["step"], states[1]["step"] = torch.tensor(3.0), bad
        memo = {}
        assert AdamOnePass.applies(params, grads, states, memo)
        assert memo["static"][7] is None
        with torch.no_grad():
            advance_steps(states, memo)
        assert float(states[0]["step"]) == 4 and float(states[1]["step"].detach()) == 4
    states[1]["step"] = torch.tensor(7.0)
    assert AdamOnePass.applies(params, grads, states, memo) and memo["static"][7] is not None
    advance_steps(states, memo)
    assert float(states[0]["step"]) == 5 and float(states[1]["step"]) == 8


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("cls", [hg.Adam, MADA])
def test_kernel_checks_the_gradients_before_it_writes(cls, threads):
    """With one param group the one-pass kernel reads every gradient before it writes anything
    (``skip_nonfinite=True``): a NaN, inf or -inf anywhere skips the whole step, and the run then
    goes on bit for bit as one that never saw that step, with no separate check of the gradients."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        def make():
            params = _model()
            return params, cls(params, lr=1e-2, hyper=hg.SGD(lr=1e-4), one_pass=True, compile=True)
        (pa, oa), (pb, ob) = make(), make()
        checks = []
        orig = type(oa)._hg_grads_finite
        type(oa)._hg_grads_finite = lambda self: checks.append(self) or orig(self)
        try:
            t = 0
            for where in [None, None, None, (3, 0, "nan"), None, (0, 37 * 301 - 1, "inf"), (1, 150, "-inf"),
                          (2, 4, "nan"), None, None]:
                _grads(pa, t)
                checks.clear()
                if where is not None:
                    i, j, bad = where
                    pa[i].grad.view(-1)[j] = float(bad)
                    skipped, grads = oa.steps_skipped, dict(oa.hypergradients())
                    oa.step()
                    assert oa.steps_skipped == skipped + 1
                    assert all(torch.equal(v, grads[n]) for n, v in oa.hypergradients().items())
                    assert not checks and not oa._hg_fused
                    continue
                _grads(pb, t)
                oa.step()
                ob.step()
                t += 1
                if t >= 3:
                    assert 0 in oa._hg_fused and not checks  # the kernel checked, nothing else did
            assert oa.steps_skipped == 4 and ob.steps_skipped == 0
            assert all(torch.equal(a, b) for a, b in zip(pa, pb))
            for x, y in zip(oa.levels, ob.levels):
                for n, v in x.hyperparameters().items():
                    assert torch.equal(v, y.hyperparameters()[n]), n
            for a, b in zip(pa, pb):
                sa, sb = oa.state[a], ob.state[b]
                assert all(torch.equal(sa[k], sb[k]) for k in sb if isinstance(sb[k], torch.Tensor)), sorted(sb)
        finally:
            type(oa)._hg_grads_finite = orig
    finally:
        torch.set_num_threads(old)


def test_two_groups_or_no_kernel_check_before_the_step():
    """Where the kernel cannot check for the whole step (two param groups: a later group's NaN
    would come after an earlier group's update) or does not run (a float64 tensor in the group),
    the gradients are checked before anything is written, and a NaN skips the step."""
    for make in (lambda ps: [{"params": ps[:2]}, {"params": ps[2:]}], lambda ps: ps):
        params = _model()
        if make(params) is params:
            params[2] = torch.nn.Parameter(params[2].detach().double())
        opt = hg.Adam(make(params), lr=1e-2, hyper=hg.SGD(lr=1e-4), one_pass=True, compile=True)
        for t in range(4):
            _grads(params, t)
            opt.step()
        before = [p.detach().clone() for p in params]
        steps = [float(opt.state[p]["step"]) for p in params]
        _grads(params, 4)
        params[-1].grad[3] = float("nan")
        opt.step()
        assert opt.steps_skipped == 1
        assert all(torch.equal(a, b) for a, b in zip(before, params))
        assert [float(opt.state[p]["step"]) for p in params] == steps


def _adam_update(kw):
    return hg.AdamW, dict(kw), dict(kw), 0.0


def _mada_update(kw):  # MADA at Adam's corner (its defaults), beta2 as the reference's
    return MADA, dict(kw, beta1=0.9, beta2=0.95), dict(kw, betas=(0.9, 0.95)), 1e-4


@pytest.mark.parametrize("case", [
    (_adam_update, dict()), (_adam_update, dict(weight_decay=0.1)), (_adam_update, dict(maximize=True)),
    (_adam_update, dict(betas=(0.3, 0.9))),
    (_mada_update, dict(weight_decay=0.0)), (_mada_update, dict(weight_decay=0.1)),
    (_mada_update, dict(weight_decay=0.0, maximize=True))],
    ids=["adam", "adamw", "maximize", "lerp-high", "mada-adam", "mada-adamw", "mada-maximize"])
def test_paper_order_update_kernel_is_torch_adamw(case, monkeypatch):
    """In the paper's order a float32 CPU group is updated by the one-pass kernel without its
    sums (``AdamOnePass.update``, ``MadaOnePass.update``); with hyper-lr 0 that step is torch's
    AdamW step (MADA at Adam's corner), and the hyper-gradients it leaves to the next step agree
    with the eager path's. (MADA's gamma hyper-gradient is a difference of two float32 sums that
    cancel to 1e-1: an absolute tolerance.)"""
    rule, kw = case
    cls, kw, torch_kw, tol = rule(kw)
    kernel = cls.one_pass_kernel
    calls = []
    orig = kernel.update
    monkeypatch.setattr(kernel, "update", staticmethod(lambda *a, **k: calls.append(1) or orig(*a, **k)))
    runs = []
    for compile in (False, True):
        _, opt = _as_torch_adamw(lambda ps: cls(ps, lr=1e-2, hyper=hg.SGD(lr=0.0), compile=compile, **kw),
                                 8, **torch_kw)
        runs.append(opt)
    assert len(calls) >= 5  # compile=True: the kernel made the steps from the third on
    for n in runs[0].learned:
        assert float(runs[1].hypergradients()[n]) == pytest.approx(float(runs[0].hypergradients()[n]),
                                                                  rel=1e-4, abs=tol or None), n


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "paper-order"])
def test_kernels_follow_a_state_tensor_given_other_storage(one_pass):
    """A state tensor that keeps its object but gets other storage (``.data =``, ``set_``,
    ``share_memory_``) is written where its storage now is: the kernels' memo compares every
    tensor's address, and the run is bit for bit the run without the swap."""
    runs = []
    for swap in (False, True):
        params = _model()
        opt = hg.Adam(params, lr=1e-2, hyper=hg.SGD(lr=1e-4), one_pass=one_pass, compile=True)
        for t in range(6):
            _grads(params, t)
            if swap and t == 4:
                st = opt.state[params[3]]
                for k in ("exp_avg", "exp_avg_sq", "hg_gprev"):
                    old = st[k].data
                    st[k].data = old.clone()  # the same values elsewhere; the old storage kept alive
                    frozen, kept = old.clone(), old
                    assert st[k].data_ptr() != kept.data_ptr()
            opt.step()
            assert (opt._hg_fused if one_pass else opt._hg_summed) or t < 2
        if swap:
            assert torch.equal(kept, frozen)  # nothing written to the storage the tensor left
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert all(torch.equal(a, b) for a, b in zip(pa, pb))
    for a, b in zip(pa, pb):
        sa, sb = oa.state[a], ob.state[b]
        assert all(torch.equal(sa[k], sb[k]) for k in ("exp_avg", "exp_avg_sq", "hg_gprev", "step"))


def test_a_failing_step_counter_kernel_does_not_update_twice(monkeypatch):
    """The step counters advance after the update is written: where their kernel cannot be
    built, ``torch._foreach_add_`` advances them and the step is not made again by another path
    (with hyper-lr 0 the run stays torch's AdamW)."""
    from hypergrad import _onepass
    orig = _onepass._load

    def load(src, argtypes):
        if src is _onepass._STEPS_SRC:
            raise RuntimeError("no compiler for the counters")
        return orig(src, argtypes)
    monkeypatch.setattr(_onepass, "_load", load)
    for one_pass in (True, False):
        params, opt = _as_torch_adamw(lambda ps: hg.AdamW(ps, lr=1e-2, hyper=hg.SGD(lr=0.0), one_pass=one_pass,
                                                          compile=True), 6)
        assert opt._hg_compile is True  # no fallback turned compilation off
        assert [float(opt.state[p]["step"]) for p in params] == [6.0] * len(params)
