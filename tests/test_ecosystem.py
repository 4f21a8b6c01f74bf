"""The contract with the PyTorch ecosystem: checkpoints across processes, hooks and closures,
LR schedulers, AMP, clipping, torch.compile, non-finite values, leaks."""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

import hypergrad as hg
from helpers import MLP, batch, loss_at, train
from parameterized import MADA
from table import BY_NAME, CASES, build_stack

HERE = os.path.dirname(os.path.abspath(__file__))
N = 4  # steps before and after the checkpoint


def _snapshot(model, opt):
    """Parameters and every level's hyperparameters, as float64 lists (exact for float64)."""
    out = {"params": [p.detach().double().flatten().tolist() for p in model.parameters()]}
    for k, lvl in enumerate(opt.levels):
        for gi in range(len(lvl.param_groups)):
            for n, v in lvl.hyperparameters(gi).items():
                vs = v if isinstance(v, list) else [v]
                out[f"L{k}.g{gi}.{n}"] = [x.detach().double().flatten().tolist() for x in vs]
    return out


RUNS = [(c.name, h, {}) for c in CASES for h in (1, 2, 3)] + [
    ("Adam", 2, {"compile": True}),
    ("MADA", 3, {"variant": "reference"}),
    ("Adam", 2, {"scope": "tensor", "reparam": "auto"}),
]

_CHILD = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from helpers import MLP, train
from table import build_stack
from test_ecosystem import RUNS, N, _snapshot
out = {}
for i, (name, height, kw) in enumerate(RUNS):
    model = MLP(seed=7)   # other initial values: everything comes from the checkpoint
    opt = build_stack(name, height, model.parameters(), **kw)
    ck = torch.load(f"{sys.argv[2]}/{i}.pt", weights_only=False)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    train(model, opt, N, start=N)
    out[i] = _snapshot(model, opt)
json.dump(out, open(f"{sys.argv[2]}/child.json", "w"))
"""


def test_checkpoint_in_a_fresh_process_continues_bit_for_bit(tmp_path):
    """Train 2N steps; or N steps, save to disk, load in a fresh process, N more steps: the same
    parameters and hyperparameters, bit for bit, for every optimizer and stacks of 1-3 levels."""
    expected = {}
    for i, (name, height, kw) in enumerate(RUNS):
        model = MLP()
        opt = build_stack(name, height, model.parameters(), **kw)
        train(model, opt, N)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / f"{i}.pt")
        train(model, opt, N, start=N)
        expected[i] = _snapshot(model, opt)
    subprocess.run([sys.executable, "-c", _CHILD, HERE, str(tmp_path)], check=True, cwd=HERE)
    got = json.load(open(tmp_path / "child.json"))
    for i, (name, height, kw) in enumerate(RUNS):
        assert got[str(i)] == expected[i], f"{name}, {height} levels, {kw}"


MISMATCHES = [
    (lambda m: hg.Adam(m.parameters(), hyper=hg.SGD(lr=1e-3), learn=["lr"]), "learns \\['lr', 'beta1', 'beta2'\\]"),
    (lambda m: hg.Adam(m.parameters(), hyper=hg.SGD(lr=1e-3), scope="tensor"), "a different scope"),
    (lambda m: hg.SGD(m.parameters(), lr=0.1, hyper=hg.SGD(lr=1e-3)), "saved from Adam"),
    (lambda m: hg.Adam(m.parameters()), "the saved stack has hyper level"),
    (lambda m: hg.Adam(list(m.parameters())[:2], hyper=hg.SGD(lr=1e-3)), "has 4 parameters, optimizer has 2"),
    (lambda m: hg.Adam([{"params": [m.w1, m.b1]}, {"params": [m.w2, m.b2]}], hyper=hg.SGD(lr=1e-3)),
     "1 param groups, optimizer has 2"),
    (lambda m: hg.Adam(MLP(d_in=7).parameters(), hyper=hg.SGD(lr=1e-3)), "saved state 'exp_avg' has shape"),
]


@pytest.mark.parametrize("make,msg", MISMATCHES, ids=[m for _, m in MISMATCHES])
def test_mismatched_state_dict_says_what_differs(make, msg):
    model = MLP()
    opt = hg.Adam(model.parameters(), hyper=hg.SGD(lr=1e-3))
    train(model, opt, 2)
    sd = opt.state_dict()
    with pytest.raises(ValueError, match=msg):
        make(MLP()).load_state_dict(sd)


def test_loading_a_torch_optim_state_dict_is_refused():
    model = MLP()
    ref = torch.optim.Adam(model.parameters())
    train(model, ref, 2)
    with pytest.raises(ValueError, match="not a hypergrad state dict"):
        hg.Adam(model.parameters()).load_state_dict(ref.state_dict())


# ------------------------------------------------------------------------- torch contract

def test_step_with_closure_returns_the_loss_and_steps_as_without():
    def run(with_closure):
        model = MLP()
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
        losses = []
        for t in range(1, 5):
            def closure():
                opt.zero_grad()
                loss = loss_at(model, t)
                loss.backward()
                return loss
            if with_closure:
                losses.append(opt.step(closure).item())
            else:
                losses.append(closure().item())
                opt.step()
        return losses, [p.detach().clone() for p in model.parameters()]
    (l1, p1), (l2, p2) = run(True), run(False)
    assert l1 == l2 and all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_step_and_state_dict_hooks_are_called():
    model = MLP()
    opt = hg.Adam(model.parameters(), hyper=hg.SGD(lr=1e-4))
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(("sd", "hypergrad" in sd or "state" in sd)))
    train(model, opt, 2)
    opt.state_dict()
    assert calls == [("pre", True), ("post", True)] * 2 + [("sd", True)]


def test_step_hooks_global_hooks_new_args_and_a_subclass_step_run_once():
    """hypergrad's step runs torch's step hooks itself (it enters torch's record_function only
    where a profiler records): the optimizer's and the global ones, in torch's order, a pre-hook's
    new arguments, and once for a subclass whose own step torch wraps."""
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    class Mine(hg.Adam):
        def step(self, closure=None):
            calls.append("mine")
            return super().step(closure)
    for cls in (hg.Adam, Mine):
        model = MLP()
        opt = cls(model.parameters(), hyper=hg.SGD(lr=1e-4))
        calls = []
        seen = []

        def closure():
            seen.append("closure")
            return loss_at(model, 1)
        handles = [register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global pre")),
                   opt.register_step_pre_hook(lambda o, a, k: calls.append("pre") or ((a[0], closure), k)),
                   opt.register_step_post_hook(lambda o, a, k: calls.append(("post", len(a)))),
                   register_optimizer_step_post_hook(lambda o, a, k: calls.append("global post"))]
        try:
            opt.zero_grad()
            loss_at(model, 1).backward()
            out = opt.step()  # the pre-hook hands step a closure
        finally:
            for h in handles:
                h.remove()
        assert seen == ["closure"] and torch.is_tensor(out)  # step returns the closure's loss
        want = ["global pre", "pre"] + (["mine"] if cls is Mine else []) + [("post", 2), "global post"]
        assert calls == want, (cls, calls)
        assert (type(opt).step is hg.Adam.step) == (cls is hg.Adam) and getattr(type(opt).step, "hooked", False)
    bad = hg.Adam(MLP().parameters(), hyper=hg.SGD(lr=1e-4))
    bad.register_step_pre_hook(lambda o, a, k: "no")
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        bad.step()


def test_a_hook_that_removes_itself_as_in_torch():
    """The hooks are iterated as torch iterates them (live): a pre-hook that removes itself
    during the step does what it does to a torch optimizer."""
    outcomes = []
    for make in (lambda ps: torch.optim.SGD(ps, lr=1e-3), lambda ps: hg.SGD(ps, lr=1e-3, hyper=hg.SGD(lr=1e-6))):
        model = MLP()
        opt = make(model.parameters())
        calls = []
        handle = None

        def once(o, a, k):
            calls.append("once")
            handle.remove()
        handle = opt.register_step_pre_hook(once)
        opt.register_step_pre_hook(lambda o, a, k: calls.append("second"))
        loss_at(model, 1).backward()
        try:
            opt.step()
            outcomes.append(("ok", calls))
        except RuntimeError as e:
            outcomes.append((str(e), calls))
    assert outcomes[0] == outcomes[1], outcomes


def test_the_step_is_named_in_a_profile():
    model = MLP()
    opt = hg.Adam(model.parameters(), hyper=hg.SGD(lr=1e-4))
    train(model, opt, 1)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(model, opt, 1, start=1)
    names = {e.name for e in prof.events()}
    assert "Optimizer.step#Adam.step" in names, sorted(names)[:20]


def test_clip_grad_norm_before_step():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
    for t in range(1, 6):
        opt.zero_grad()
        loss_at(model, t).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.hypergradients()["lr"] is not None


def test_torch_compile_of_the_model_and_of_the_training_step():
    """The step is opaque to dynamo (it runs its own kernels): a compiled training function
    computes what the eager one computes."""
    def run(compiled):
        model = MLP(dtype=torch.float32)
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))

        def step(x, y):
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            opt.step()
            return loss
        fn = torch.compile(step) if compiled else step
        for t in range(1, 6):
            fn(*batch(t, dtype=torch.float32))
        return model, opt
    (m1, o1), (m2, o2) = run(False), run(True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for n, v in o1.hyperparameters().items():
        torch.testing.assert_close(o2.hyperparameters()[n], v, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------- non-finite values

def _all_state(opt):
    out = []
    for lvl in opt.levels:
        for st in lvl.state.values():
            for k, v in st.items():
                if torch.is_tensor(v):
                    out.append(v.detach().clone())
        for gi in range(len(lvl.param_groups)):
            for v in lvl.hyperparameters(gi).values():
                out.extend(x.detach().clone() for x in (v if isinstance(v, list) else [v]))
    return out


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("height", [1, 2])
def test_non_finite_gradients_skip_the_whole_step(case, height):
    """Steps with a NaN or an infinite gradient (the first step, where no hyper-gradient covers
    the gradients, and later ones) change nothing, and training then goes on as if they had not
    happened."""
    def run(bad_steps):
        model = MLP()
        opt = build_stack(case.name, height, model.parameters())
        t = 0
        for k in range(8 + len(bad_steps)):
            opt.zero_grad()
            if k in bad_steps:
                loss_at(model, 100 + k).backward()
                model.w1.grad[0, 1] = float("nan") if k % 2 else float("inf")
                before = _all_state(opt)
                ps = [p.detach().clone() for p in model.parameters()]
                opt.step()
                assert all(torch.equal(a, b) for a, b in zip(ps, model.parameters()))
                assert all(torch.equal(a, b) for a, b in zip(before, _all_state(opt)))
                continue
            t += 1
            loss_at(model, t).backward()
            opt.step()
        return model, opt
    (m1, o1), (m2, o2) = run(()), run((0, 4, 5))
    assert o2.steps_skipped == 3 and o1.steps_skipped == 0
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for x, y in zip(_all_state(o1), _all_state(o2)):
        assert torch.equal(x, y)


def test_skip_nonfinite_false_lets_values_through_as_torch():
    model = MLP()
    opt = hg.Adam(model.parameters(), skip_nonfinite=False)
    loss_at(model, 1).backward()
    model.w1.grad[0, 0] = float("nan")
    opt.step()
    assert torch.isnan(model.w1).any() and opt.steps_skipped == 0


def test_a_hyper_step_that_would_overflow_is_not_taken():
    model = MLP(dtype=torch.float32)
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=3e38))
    train(model, opt, 6)
    hv = opt._hg_vars[0]
    assert opt.hyper.steps_skipped > 0
    for n, v in opt.hyperparameters().items():
        assert torch.isfinite(v) and hv[n].lo <= float(v) <= hv[n].hi, n
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ------------------------------------------------------------------------- leaks

def test_ten_thousand_steps_of_a_three_level_stack_keep_memory_flat():
    model = MLP(d_in=3, d_hidden=4, d_out=2, dtype=torch.float32)
    opt = hg.Adam(model.parameters(), lr=1e-3, hyper=hg.Adam(lr=1e-5, hyper=hg.SGD(lr=1e-8)))
    x, y = torch.randn(8, 3), torch.randn(8, 2)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            ((model(x) - y) ** 2).mean().backward()
            opt.step()

    def tensors():
        gc.collect()
        return sum(torch.is_tensor(o) for o in gc.get_objects())

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    steps(200)
    n0, r0 = tensors(), rss()
    steps(10_000)
    assert tensors() == n0
    assert rss() - r0 < 8 * 2**20, "resident memory grew by more than 8 MiB over 10,000 steps"


# ------------------------------------------------------------------------- LR schedulers

from torch.optim import lr_scheduler as L  # noqa: E402

CHAINABLE = {  # compute the new lr from the current one: they scale the learned lr
    "StepLR": (lambda o: L.StepLR(o, step_size=2, gamma=0.5), lambda t: 0.5 if t % 2 == 0 else 1.0),
    "ExponentialLR": (lambda o: L.ExponentialLR(o, gamma=0.9), lambda t: 0.9),
    "MultiplicativeLR": (lambda o: L.MultiplicativeLR(o, lambda t: 0.95), lambda t: 0.95),
    "CosineAnnealingLR": (lambda o: L.CosineAnnealingLR(o, T_max=10), None),
    "LinearLR": (lambda o: L.LinearLR(o, start_factor=0.25, total_iters=4), None),
    "ReduceLROnPlateau": (lambda o: L.ReduceLROnPlateau(o, patience=0, factor=0.5), None),
}
ABSOLUTE = {  # compute the lr from their initial values: scale_schedule makes them scale it
    "LambdaLR warm-up": lambda o: L.LambdaLR(o, lambda t: min(1.0, (t + 1) / 4)),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=0.05, total_steps=40, cycle_momentum=False),
    "CyclicLR": lambda o: L.CyclicLR(o, 0.001, 0.01, step_size_up=3, cycle_momentum=False),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3),
}
MIXED = {  # chainable parts that restart from their initial values: scale_schedule works for any
    "SequentialLR warm-up + cosine": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, 0.1, total_iters=3), L.CosineAnnealingLR(o, 10)], milestones=[3]),
    "StepLR (chainable)": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
}


def _sched_step(s):
    s.step(1.0) if isinstance(s, L.ReduceLROnPlateau) or getattr(s, "scheduler", None).__class__ is \
        L.ReduceLROnPlateau else s.step()


@pytest.mark.parametrize("name", list(CHAINABLE))
def test_chainable_schedulers_scale_the_learned_lr(name):
    make, factor = CHAINABLE[name]
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    sched = make(opt)
    lr = opt.hyperparameters()["lr"]
    for t in range(1, 9):
        train(model, opt, 1, start=t - 1)
        learned = float(lr)             # after this step's hyper-step
        _sched_step(sched)
        assert opt.param_groups[0]["lr"] is lr, "the learned tensor stays in the param group"
        if factor is not None:
            assert float(lr) == pytest.approx(learned * factor(t), rel=1e-12)
    assert opt.hypergradients()["lr"] is not None and opt.steps_skipped == 0


@pytest.mark.parametrize("name", list(ABSOLUTE) + list(MIXED))
def test_scale_schedule_scales_the_learned_lr(name):
    make = {**ABSOLUTE, **MIXED}[name]

    def run(hyper_lr, scaled):
        model = MLP()
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=hyper_lr))
        sched = hg.scale_schedule(make(opt)) if scaled else make(opt)
        lrs, ratios = [], []
        for t in range(1, 13):
            train(model, opt, 1, start=t - 1)
            before = float(opt.param_groups[0]["lr"]) / sched._shadow[0] if scaled else None
            sched.step()
            lrs.append(float(opt.param_groups[0]["lr"]))
            if scaled and sched._shadow[0] > 0:   # the multiplier survives the scheduler's step
                ratios.append((before, lrs[-1] / sched._shadow[0]))
        return lrs, ratios
    plain, _ = run(0.0, False)
    scaled0, _ = run(0.0, True)
    assert scaled0 == pytest.approx(plain, rel=1e-12), "without learning: exactly the schedule"
    learned, ratios = run(1e-3, True)
    if name in ABSOLUTE:
        unscaled, _ = run(1e-3, False)
        assert unscaled == pytest.approx(plain, rel=1e-12), "an absolute schedule alone overwrites the learned lr"
    assert learned != pytest.approx(plain, rel=1e-6), "with scale_schedule, learning changes the lr"
    for a, b in ratios:
        assert b == pytest.approx(a, rel=1e-12)


def test_scale_schedule_state_dict_round_trip():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    sched = hg.scale_schedule(L.LambdaLR(opt, lambda t: 0.5 ** t))
    for t in range(1, 4):
        train(model, opt, 1, start=t - 1)
        sched.step()
    sd = sched.state_dict()
    model2 = MLP()
    opt2 = hg.Adam(model2.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    sched2 = hg.scale_schedule(L.LambdaLR(opt2, lambda t: 0.5 ** t))
    sched2.load_state_dict(sd)
    assert sched2._mult == sched._mult and sched2._shadow == sched._shadow
    assert sched2.last_epoch == sched.last_epoch


def test_a_schedule_on_a_hyperparameter_that_is_not_learned():
    """The MADA reference setting: a cosine schedule on lr while the coefficients are learned."""
    model = MLP()
    opt = MADA(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    sched = L.CosineAnnealingLR(opt, T_max=8)
    expected = [1e-2 * (1 + torch.cos(torch.tensor(torch.pi * t / 8)).item()) / 2 for t in range(1, 9)]
    for t in range(1, 9):
        train(model, opt, 1, start=t - 1)
        sched.step()
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(expected[t - 1], rel=1e-6)
    assert float(opt.hyperparameters()["beta1"]) != 0.9


# ------------------------------------------------------------------------- AMP

def test_grad_scaler_skipped_step_changes_nothing():
    model = MLP(dtype=torch.float32)
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-6)))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    for t in range(1, 8):
        opt.zero_grad()
        scaler.scale(loss_at(model, t)).backward()
        if t == 5:
            model.w2.grad[0, 0] = float("inf")
            before = _all_state(opt)
            ps = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if t == 5:
            assert all(torch.equal(a, b) for a, b in zip(ps, model.parameters()))
            assert all(torch.equal(a, b) for a, b in zip(before, _all_state(opt)))
            assert scaler.get_scale() == 2.0 ** 7
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert opt.steps_skipped == 0, "the scaler skipped it: the optimizer never saw the step"


def test_grad_scaler_steps_equal_unscaled_steps():
    """With a power-of-two scale, unscaling is exact: the same run as without a scaler."""
    def run(scaled):
        model = MLP(dtype=torch.float32)
        opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled)
        for t in range(1, 6):
            opt.zero_grad()
            scaler.scale(loss_at(model, t)).backward()
            scaler.step(opt)
            scaler.update()
        return model, opt
    (m1, o1), (m2, o2) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(o1.hyperparameters().values(), o2.hyperparameters().values()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["Adam", "SGD", "MADA", "Lion"])
def test_half_precision_parameters_with_float32_hyperparameters(dtype, name):
    model = MLP(dtype=dtype)
    opt = build_stack(name, 2, model.parameters())
    for t in range(1, 6):
        opt.zero_grad()
        x, y = batch(t, dtype=dtype)
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert all(p.dtype == dtype and torch.isfinite(p).all() for p in model.parameters())
    for n, v in opt.hyperparameters().items():
        assert v.dtype == torch.float32 and torch.isfinite(v), n
    assert opt.hypergradients()[opt.learned[0]] is not None


def test_autocast_forward_with_float32_parameters():
    model = MLP(dtype=torch.float32)
    opt = hg.AdamW(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
    for t in range(1, 5):
        opt.zero_grad()
        x, y = batch(t, dtype=torch.float32)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        ((out.float() - y) ** 2).mean().backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(opt.hypergradients()["lr"])


def test_skip_counters_survive_a_checkpoint():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
    for t in range(1, 4):
        opt.zero_grad()
        loss_at(model, t).backward()
        if t == 2:
            model.w1.grad[0, 0] = float("nan")
        opt.step()
    assert opt.steps_skipped == 1
    fresh = hg.Adam(MLP().parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
    fresh.load_state_dict(opt.state_dict())
    assert (fresh.steps_skipped, fresh.hyper_steps_skipped) == (opt.steps_skipped, opt.hyper_steps_skipped)
