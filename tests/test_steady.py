"""The steady one-pass step (``HyperOptimizer._hg_onepass_steady``): where the last step took the
one-pass kernel's route, the next one skips the general code's decisions. It must compute what
the general code computes, bit for bit (parameters, hyperparameters, hyper-gradients and their
raw-space gradients, states, records, counters), and hand back to it whenever something it took
for granted changes."""

from __future__ import annotations

import struct

import pytest
import torch

import hypergrad as hg
from hypergrad.core import _TRANSFORMS, F32_TINY, HyperOptimizer
from parameterized import MADA

from helpers import MLP, loss_at, same_bits


def _one_pass(ps, **kw):
    args = dict(lr=1e-2, hyper=hg.SGD(lr=1e-3), one_pass=True, compile=True)
    args.update(kw)
    return hg.Adam(ps, **args)


STACKS = {
    "adam": _one_pass,
    "adamw": lambda ps: hg.AdamW(ps, lr=1e-2, weight_decay=0.1, hyper=hg.SGD(lr=1e-3), one_pass=True, compile=True),
    "maximize": lambda ps: _one_pass(ps, maximize=True),
    "skip-off": lambda ps: _one_pass(ps, skip_nonfinite=False),
    "no-reparam": lambda ps: _one_pass(ps, reparam=None, bounds={"lr": (1e-5, 1.0), "beta1": (0.1, 0.99),
                                                                 "beta2": (0.5, 0.9999)}),
    "lr-only": lambda ps: _one_pass(ps, learn=("lr",)),
    "warmup": lambda ps: _one_pass(ps, hyper_warmup=3),
    "3-level": lambda ps: _one_pass(ps, hyper=hg.SGD(lr=1e-3, hyper=hg.SGD(lr=1e-5))),
    "mada": lambda ps: MADA(ps, lr=1e-2, hyper=hg.SGD(lr=1e-3), one_pass=True, compile=True),
    # the general route every step: a clip of the hyper-gradients, two param groups
    "clip": lambda ps: _one_pass(ps, hypergrad_clip=1e-3),
    "two-groups": lambda ps: _one_pass([{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3}]),
}
GENERAL_ONLY = {"clip", "two-groups"}


def _event(name, t, model, opt):
    """Something that happens between backward and step at step 6 (and 7)."""
    if t not in (6, 7) or name is None:
        return
    w1, b2 = model.w1, model.b2
    if name == "nan-gradient" and t == 6:
        w1.grad[0, 0] = float("nan")
    elif name == "missing-gradient" and t == 6:
        b2.grad = None
    elif name == "huge-gradients":  # finite, but the hyper-gradients overflow in float32
        for p in model.parameters():
            p.grad.fill_(1e37)
    elif name == "lr-assigned" and t == 6:
        opt.param_groups[0]["lr"] = 3e-3
    elif name == "eps-written" and t == 6:  # a value not learned, written in place
        opt.param_groups[0]["eps"].fill_(1e-4) if torch.is_tensor(opt.param_groups[0]["eps"]) else \
            opt.param_groups[0].__setitem__("eps", 1e-4)
    elif name == "eps-data-written" and t == 6:  # through .data: no version counter sees it
        opt.param_groups[0]["eps"].data.fill_(1e-4)
    elif name == "state-replaced" and t == 6:
        opt.state[w1]["exp_avg"] = opt.state[w1]["exp_avg"].clone()
    elif name == "step-written" and t == 6:  # a step counter written in place
        opt.state[w1]["step"] += 1
    elif name == "record-replaced" and t == 6:
        st = opt.state[w1]
        st["hg_record"] = dict(st["hg_record"])
    elif name == "snapshot-written" and t == 6:  # the record's copy of a value not learned
        opt.state[w1]["hg_record"]["h"]["eps"].fill_(0.5)
    elif name == "reloaded" and t == 6:
        opt.load_state_dict(opt.state_dict())
    elif name == "grads-kept" and t >= 6:  # zero_grad(set_to_none=False): the same gradient tensors
        pass


def _run(make, steps, fast, event=None, monkeypatch=None):
    model = MLP(dtype=torch.float32)
    opt = make(list(model.parameters()))
    taken = []
    orig = HyperOptimizer._hg_onepass_steady

    def steady(self, check):
        if not fast:
            return False
        done = orig(self, check)
        taken.append(done)
        return done
    with monkeypatch.context() as m:
        m.setattr(HyperOptimizer, "_hg_onepass_steady", steady)
        for t in range(1, steps + 1):
            opt.zero_grad(set_to_none=not (event == "grads-kept" and t > 6))
            loss_at(model, t).backward()
            _event(event, t, model, opt)
            opt.step()
    return model, opt, taken


def _compare(ma, oa, mb, ob, where):
    same_bits(list(ma.parameters()), list(mb.parameters()), (where, "model"))
    for la, lb in zip(oa.levels, ob.levels):
        for attr in ("steps_skipped", "hyper_steps_skipped", "_hg_t", "_hg_ok", "_hg_fused", "_hg_summed",
                     "_hg_grads_bad"):
            assert getattr(la, attr, None) == getattr(lb, attr, None), (where, attr)
        # the gradients the hyper-gradients covered (by position: the runs have their own tensors)
        pos = [{i for i, p in enumerate(q for g in lv.param_groups for q in g["params"])
                if id(p) in getattr(lv, "_hg_covered", ())} for lv in (la, lb)]
        assert pos[0] == pos[1], (where, "covered")
        for gi in range(len(la.param_groups)):
            same_bits(la.hyperparameters(gi), lb.hyperparameters(gi), (where, "values"))
            same_bits(la.hypergradients(gi), lb.hypergradients(gi), (where, "hypergradients"))
        # the raw tensors' gradients, which the level above steps with
        for va, vb in zip(la._hg_learned_vars(), lb._hg_learned_vars()):
            same_bits([r.grad for r in va.raw], [r.grad for r in vb.raw], (where, "raw grads", va.spec.name))
        same_bits(la.state_dict(), lb.state_dict(), (where, "state_dict"))
        pa = [p for g in la.param_groups for p in g["params"]]
        pb = [p for g in lb.param_groups for p in g["params"]]
        same_bits([la.state.get(p) for p in pa], [lb.state.get(p) for p in pb], (where, "state"))


@pytest.mark.parametrize("name", list(STACKS))
def test_steady_steps_are_the_general_steps(name, monkeypatch):
    ma, oa, taken = _run(STACKS[name], 12, True, monkeypatch=monkeypatch)
    mb, ob, _ = _run(STACKS[name], 12, False, monkeypatch=monkeypatch)
    if name in GENERAL_ONLY:
        assert taken and not any(taken), taken
    else:  # every step after the first hyper-gradients (and the warm-up) but one
        assert sum(taken) >= (6 if name == "warmup" else 9), taken
    _compare(ma, oa, mb, ob, name)


EVENTS = ["nan-gradient", "missing-gradient", "huge-gradients", "lr-assigned", "eps-written", "eps-data-written",
          "state-replaced",
          "step-written", "record-replaced", "snapshot-written", "reloaded", "grads-kept"]


@pytest.mark.parametrize("stack", ["adam", "skip-off", "mada", "3-level"])
@pytest.mark.parametrize("event", EVENTS)
def test_steady_steps_hand_back_when_something_changes(stack, event, monkeypatch):
    ma, oa, taken = _run(STACKS[stack], 11, True, event, monkeypatch)
    mb, ob, _ = _run(STACKS[stack], 11, False, event, monkeypatch)
    _compare(ma, oa, mb, ob, (stack, event))
    if event != "missing-gradient":
        # the steady route resumes afterwards (a step of the general code makes its plan); a
        # tensor left without a gradient has taken a step fewer: the general code from then on
        assert all(taken[-3:]), taken
    if event == "nan-gradient":
        assert oa.steps_skipped == (0 if stack == "skip-off" else 1)
    if event == "huge-gradients":
        assert oa.hyper_steps_skipped > 0 or oa.steps_skipped > 0
    if event in ("missing-gradient", "reloaded", "record-replaced", "lr-assigned"):
        assert not all(taken[3:]), taken  # the general code took over for a step


def _f32_samples(n, seed, lo, hi):
    g = torch.Generator().manual_seed(seed)
    mant = torch.rand(n, generator=g, dtype=torch.float64) + 1.0
    exp = torch.randint(lo, hi, (n,), generator=g).to(torch.float64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(torch.float64)
    return (sign * mant * torch.exp2(exp)).to(torch.float32)


@pytest.mark.parametrize("flush", [False, True], ids=["denormals", "flush_denormal"])
@pytest.mark.parametrize("transform", ["log", "logit"])
def test_raw_grad_float_is_the_tensor_product(transform, flush):
    tr = _TRANSFORMS[transform]
    g = _f32_samples(3000, 1, -150, 128)
    q = _f32_samples(3000, 2, -150, 1).abs() if transform == "logit" else _f32_samples(3000, 2, -150, 128).abs()
    q[:6] = torch.tensor([1e-45, F32_TINY, 0.5, 1 - 2 ** -24, 0.9999, 1e-30])
    g[:6] = torch.tensor([1.0, -3.0, 1e38, 2.5, -1e-38, 7.0])
    prev = torch.is_flush_denormal_enabled() if hasattr(torch, "is_flush_denormal_enabled") else False
    torch.set_flush_denormal(flush)
    try:
        want = [(gi * tr.dq_dz(qi)) for gi, qi in zip(g.unbind(), q.unbind())]
    finally:
        torch.set_flush_denormal(prev)
    taken = 0
    for gi, qi, w in zip(g.tolist(), q.tolist(), want):
        x = tr.raw_grad_float(gi, qi)
        if x is None:  # a subnormal on the way: the tensor path computes it
            continue
        taken += 1
        assert struct.pack("f", x) == struct.pack("f", w.item()) or (x != x and w.item() != w.item()), \
            (gi, qi, x, w.item())
    assert taken > 2000


def test_identity_transform_raw_grad_is_the_gradient():
    assert _TRANSFORMS[None].raw_grad_float(2.5, 0.3) == 2.5


@pytest.mark.parametrize("one_pass", [False, True])
def test_steps_under_inference_mode_are_the_steps(one_pass):
    """A step under torch.inference_mode (its copies are inference tensors, which keep no
    version counter) computes what a step under no_grad computes."""
    runs = []
    for inference in (False, True):
        model = MLP(dtype=torch.float32)
        opt = _one_pass(list(model.parameters()), one_pass=one_pass)
        for t in range(1, 9):
            opt.zero_grad()
            loss_at(model, t).backward()
            if inference:
                with torch.inference_mode():
                    opt.step()
            else:
                opt.step()
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    same_bits(list(ma.parameters()), list(mb.parameters()), "model")
    for la, lb in zip(oa.levels, ob.levels):
        same_bits(la.hyperparameters(), lb.hyperparameters(), "values")
        same_bits(la.hypergradients(), lb.hypergradients(), "hypergradients")
