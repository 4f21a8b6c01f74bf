"""The closed-form hyper-gradients agree with the generic path (autograd through the recorded
update) to float64 rounding: every optimizer, every option set, with hyper-steps, and in stacks
where every level uses one path or the other."""

import pytest
import torch

import hypergrad as hg
from helpers import MLP, train
from table import CASES, all_configs

STEPS = 12


def _learn(case):
    return case.learnable


def _run(case, cfg, backend, steps=STEPS):
    model = MLP()
    opt = case.ours(model.parameters(), **cfg, learn=_learn(case), backend=backend,
                    hyper=hg.SGD(lr=1e-6))
    hist = []
    for t in range(1, steps + 1):
        train(model, opt, 1, start=t - 1)
        hist.append({k: (v.clone() if v is not None else None) for k, v in opt.hypergradients().items()})
    return model, opt, hist


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-12, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case,i", all_configs(), ids=lambda v: v.name if hasattr(v, "name") else str(v))
def test_closed_form_matches_generic(case, i, float64_default):
    cfg = case.configs[i]
    m1, o1, h1 = _run(case, cfg, "autograd")
    m2, o2, h2 = _run(case, cfg, "auto")
    for t, (a, b) in enumerate(zip(h1, h2), start=1):
        for k in a:
            if a[k] is None:
                assert b[k] is None
                continue
            _close(b[k], a[k], f"{case.name} {cfg} step {t} {k}")
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        _close(b, a, f"{case.name} {cfg} {n}")


CLOSED = [c for c in CASES if c.ours.hyper_terms is not None]
LEAN = [c for c in CASES if c.ours.hyper_terms is not None or c.ours.restore is not None]


def test_closed_forms_exist_for_the_main_optimizers():
    assert {c.name for c in CLOSED} >= {"SGD", "Adam", "AdamW", "MADA", "Lion"}
    assert {c.name for c in LEAN} == {c.name for c in CASES}, "every optimizer has a lean path"


@pytest.mark.parametrize("case", LEAN, ids=lambda c: c.name)
def test_lean_path_is_used(case):
    model = MLP()
    opt = case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=1e-6), learn=case.learnable)
    train(model, opt, 3)
    kinds = {st["hg_record"]["kind"] for st in opt.state.values()}
    assert kinds == {"closed" if case.ours.hyper_terms is not None else "restore"}
    assert all("state" not in st["hg_record"] for st in opt.state.values())


def _saved_buffers(opt, params):
    """Bytes the optimizer keeps for its next hyper-gradient (hg_* entries and record copies),
    in parameter-sized buffers."""
    n = sum(p.numel() * p.element_size() for p in params)
    total = 0
    for p in params:
        st = opt.state[p]
        for k, v in st.items():
            if k.startswith("hg_") and torch.is_tensor(v):
                total += v.numel() * v.element_size()
        rec = st.get("hg_record", {})
        for k in ("p", "g"):
            if rec.get(k) is not None:
                total += rec[k].numel() * rec[k].element_size()
        for v in (rec.get("state") or {}).values():
            if torch.is_tensor(v) and v.dim():
                total += v.numel() * v.element_size()
    return total / n


# extra parameter-sized buffers of the lean path (an int8 sign is a quarter, in float32)
LEAN_BUFFERS = {"SGD": 2, "Adagrad": 1, "Adadelta": 1, "RMSprop": 1, "Adam": 1, "AdamW": 1, "NAdam": 1,
                "Adan": 1, "Yogi": 1.25, "Lion": 0.25, "Adafactor": 1, "MADA": 1.5}


@pytest.mark.parametrize("case", LEAN, ids=lambda c: c.name)
def test_lean_path_memory(case):
    """The documented extra memory of each lean path, against the reference's copies."""
    model = MLP(dtype=torch.float32, d_in=16, d_hidden=32)
    params = list(model.parameters())
    opt = case.ours(params, **case.fd_kw, hyper=hg.SGD(lr=1e-9), learn=case.learnable)
    x = torch.randn(8, 16)
    for _ in range(3):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    lean = _saved_buffers(opt, [p for p in params if p.dim() > 1])
    assert lean <= LEAN_BUFFERS[case.name] + 0.01, f"{case.name}: {lean:.2f} buffers"
    ref = case.ours(params, **case.fd_kw, hyper=hg.SGD(lr=1e-9), learn=case.learnable, backend="autograd")
    for _ in range(3):
        ref.zero_grad()
        model(x).square().mean().backward()
        ref.step()
    assert _saved_buffers(ref, [p for p in params if p.dim() > 1]) > lean


@pytest.mark.parametrize("case", CLOSED, ids=lambda c: c.name)
@pytest.mark.parametrize("scope", ["tensor", "element"])
def test_closed_form_scopes(case, scope, float64_default):
    def run(backend):
        model = MLP()
        opt = case.ours(model.parameters(), **case.fd_kw, scope=scope, backend=backend, hyper=hg.SGD(lr=1e-6))
        train(model, opt, 6)
        return opt
    a, b = run("autograd"), run("auto")
    for k, v in a.hypergradients().items():
        for x, y in zip(v, b.hypergradients()[k]):
            _close(y, x, f"{case.name} {scope} {k}")


@pytest.mark.parametrize("case", CLOSED, ids=lambda c: c.name)
def test_closed_form_in_a_stack(case, float64_default):
    """The optimizer at levels 1, 2 and 3 of a 4-level stack; all levels closed vs all generic."""
    # a Lion-style sign() of a hyper-gradient that is 0 in exact arithmetic (beta1's at step 2:
    # Adam's first step does not depend on beta1) is decided by rounding, and it enters MADA's
    # update and the hyper-gradient of its gamma: keep MADA's hyper levels off the sign branches
    kw = case.hyper_kw
    if case.name == "MADA":
        kw = {**kw, "gamma": 1.0, "c": 1.0, "learn": ["beta1", "beta2", "beta3", "c", "rho"]}

    def run(backend):
        model = MLP()
        top = hg.SGD(lr=1e-7, backend=backend)
        l3 = case.ours(**kw, hyper=top, backend=backend)
        l2 = case.ours(**kw, hyper=l3, backend=backend)
        opt = case.ours(model.parameters(), **case.fd_kw, hyper=l2, backend=backend)
        train(model, opt, 10)
        return model, opt
    m1, o1 = run("autograd")
    m2, o2 = run("auto")
    for k, (l1, l2) in enumerate(zip(o1.levels, o2.levels)):
        for n, v in l1.hyperparameters().items():
            _close(l2.hyperparameters()[n], v, f"{case.name} level {k + 1} {n}")
    for a, b in zip(m1.parameters(), m2.parameters()):
        _close(b, a, f"{case.name} params")
