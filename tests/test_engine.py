"""Engine behaviour: parameters stay the same objects, projection keeps hyperparameters in their
domain, scopes give the documented shapes and agree with each other, dtypes and devices follow
the parameters, nothing grows over many steps, bad input is refused with a clear message."""

import gc

import pytest
import torch

import hypergrad as hg
from parameterized import MADA
from helpers import MLP, assert_stacks_agree, batch, loss_at, train
from table import CASES


def test_parameters_stay_the_same_objects_and_storage():
    model = MLP(dtype=torch.float32)
    before = [(p, p.data_ptr()) for p in model.parameters()]
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-5)))
    train(model, opt, 5)
    after = list(model.parameters())
    assert all(a is b and a.data_ptr() == ptr for (b, ptr), a in zip(before, after))
    assert all(isinstance(p, torch.nn.Parameter) and p.is_leaf and p.requires_grad for p in after)
    assert opt.param_groups[0]["params"][0] is after[0]


def test_live_tensors_in_param_groups():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4))
    hp = opt.hyperparameters()
    assert set(hp) == {"lr", "beta1", "beta2", "eps", "weight_decay"}
    assert opt.param_groups[0]["lr"] is hp["lr"]
    assert opt.param_groups[0]["betas"][0] is hp["beta1"] and opt.param_groups[0]["betas"][1] is hp["beta2"]
    assert opt.learned == ("lr", "beta1", "beta2")
    train(model, opt, 3)
    assert opt.param_groups[0]["lr"] is hp["lr"] and float(hp["lr"]) != 1e-2
    assert set(opt.hyper.hyperparameters()) == {"lr", "momentum", "dampening", "weight_decay"}
    assert opt.hyper.hyperparameters("beta1") == opt.hyper.hyperparameters(0)
    assert [lvl.__class__.__name__ for lvl in opt.levels] == ["Adam", "SGD"]
    assert opt.hyper.below is opt


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_projection_keeps_hyperparameters_in_bounds(case):
    """A violent hyper level pushes every learnable hyperparameter against its bounds."""
    model = MLP()
    opt = case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=10.0), learn=case.learnable)
    for t in range(1, 16):
        train(model, opt, 1, start=t - 1)
        for name, hv in opt._hg_vars[0].items():
            v = float(hv.value[0])
            assert hv.lo <= v <= hv.hi, f"{case.name} {name} = {v} outside [{hv.lo}, {hv.hi}]"
            assert hv.spec.in_domain(v) or v in (hv.spec.lo, hv.spec.hi)


def test_projection_bounds_hold_in_double_for_float32_values():
    """float32(0.01) < 0.01 and float32(0.3) > 0.3: a value clamped to the float32 nearest a
    bound would leave the bounds the user gave; the projection rounds them inward."""
    model = MLP(dtype=torch.float32)
    opt = hg.Adam(model.parameters(), lr=1e-2, betas=(0.9, 0.2), bounds={"beta2": (0.01, 0.3)},
                  hyper=hg.SGD(lr=1e9), learn=("beta2",))
    hit = set()
    for t in range(1, 12):
        train(model, opt, 1, start=t - 1)
        v = float(opt.hyperparameters()["beta2"])
        assert 0.01 <= v <= 0.3, v
        hit.update(x for x in (0.01, 0.3) if abs(v - x) < 1e-7)  # within an ulp
    assert hit == {0.01, 0.3}  # both bounds were reached, and the clamp is what kept it inside


def test_log_and_logit_reparam_keep_values_inside():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1.0), reparam="auto")
    for t in range(1, 30):
        train(model, opt, 1, start=t - 1)
        hp = opt.hyperparameters()
        assert float(hp["lr"]) > 0 and 0 < float(hp["beta1"]) < 1 and 0 < float(hp["beta2"]) < 1
    assert float(hp["lr"]) != 1e-2


def test_scopes_shapes_and_consistency():
    """tensor and element scopes give per-tensor / per-element hyper-gradients that sum to the
    group-scope one (with a zero hyper lr all runs follow the same trajectory)."""
    def run(scope):
        model = MLP()
        opt = hg.Adam([{"params": [model.w1, model.b1]}, {"params": [model.w2, model.b2], "lr": 2e-3}],
                      lr=1e-3, hyper=hg.SGD(lr=0.0), scope=scope)
        train(model, opt, 4)
        return model, opt
    _, og = run("group")
    _, ot = run("tensor")
    _, oe = run("element")
    for gi in (0, 1):
        hg_group = og.hypergradients(gi)
        ht, he = ot.hypergradients(gi), oe.hypergradients(gi)
        params = oe.param_groups[gi]["params"]
        for name in ("lr", "beta1", "beta2"):
            assert hg_group[name].shape == ()
            assert [t.shape for t in ht[name]] == [torch.Size([])] * 2
            assert [t.shape for t in he[name]] == [p.shape for p in params]
            assert [t.shape for t in oe.hyperparameters(gi)[name]] == [p.shape for p in params]
            torch.testing.assert_close(sum(ht[name]), hg_group[name], rtol=1e-12, atol=1e-14)
            for a, b in zip(ht[name], he[name]):
                torch.testing.assert_close(b.sum(), a, rtol=1e-12, atol=1e-14)


def test_shared_scope_is_one_tensor_for_all_groups():
    model = MLP()
    groups = [{"params": [model.w1, model.b1]}, {"params": [model.w2, model.b2]}]
    opt = hg.Adam(groups, lr=1e-2, hyper=hg.SGD(lr=1e-4), scope={"lr": "shared"})
    assert opt.hyperparameters(0)["lr"] is opt.hyperparameters(1)["lr"]
    assert opt.hyperparameters(0)["beta1"] is not opt.hyperparameters(1)["beta1"]
    train(model, opt, 3)
    assert len(opt.hyper.param_groups[0]["params"]) == 1 + 2 + 2  # one lr, two beta1, two beta2
    # values that float32 cannot hold exactly are compared in float32
    hg.Adam([{"params": [model.w1]}, {"params": [model.w2], "lr": 1e-3}], lr=1e-3,
            hyper=hg.SGD(lr=1e-4), scope={"lr": "shared"})
    m32 = MLP(dtype=torch.float32)
    hg.Adam([{"params": [m32.w1]}, {"params": [m32.w2], "lr": 1e-3}], lr=1e-3, hyper=hg.SGD(lr=1e-4),
            scope={"lr": "shared"})
    with pytest.raises(ValueError, match="scope 'shared' for lr"):
        hg.Adam([{"params": [model.w1]}, {"params": [model.w2], "lr": 0.1}], lr=1e-2,
                hyper=hg.SGD(lr=1e-4), scope={"lr": "shared"})


@pytest.mark.parametrize("pdtype,hdtype", [(torch.float64, torch.float64), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float32), (torch.float16, torch.float32)])
def test_hyperparameter_and_state_dtype_follow_parameters_never_below_float32(pdtype, hdtype):
    model = MLP(dtype=pdtype)
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-6)))
    for lvl in opt.levels:
        for v in lvl.hyperparameters().values():
            assert v.dtype == hdtype and v.device == model.w1.device
    x, y = batch(1, dtype=pdtype)
    for _ in range(3):
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    assert all(p.dtype == pdtype for p in model.parameters())
    # half-precision parameters: the optimizer computes and keeps its state in float32
    assert all(v.dtype == hdtype for s in opt.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert float(opt.hyperparameters()["lr"]) != 1e-2


def test_no_graph_survives_and_memory_is_flat():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-3, hyper=hg.Adam(lr=1e-4, hyper=hg.SGD(lr=1e-6)))

    def live():
        gc.collect()
        ts = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
        return len(ts), sum(t.numel() * t.element_size() for t in ts)

    train(model, opt, 100)
    n0, b0 = live()
    train(model, opt, 1000, start=100)
    n1, b1 = live()
    assert (n1, b1) == (n0, b0)
    for lvl in opt.levels:
        for st in lvl.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    assert not v.requires_grad and v.grad_fn is None
        for v in lvl.hyperparameters().values():
            assert not v.requires_grad and v.grad_fn is None


def test_optimizers_constructed_and_dropped_do_not_leak():
    model = MLP()
    train(model, hg.Adam(model.parameters(), hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-5))), 2)
    for p in model.parameters():
        p.grad = None
    gc.collect()
    n0 = sum(isinstance(o, torch.Tensor) for o in gc.get_objects())
    for _ in range(100):
        opt = hg.Adam(model.parameters(), hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-5)))
        train(model, opt, 2)
        for p in model.parameters():
            p.grad = None
        del opt
    gc.collect()
    assert sum(isinstance(o, torch.Tensor) for o in gc.get_objects()) == n0


def test_zero_hyper_lr_leaves_level_below_exactly_unchanged_in_float32():
    m1, m2 = MLP(dtype=torch.float32), MLP(dtype=torch.float32)
    o1 = hg.Adam(m1.parameters(), lr=1e-2)
    o2 = hg.Adam(m2.parameters(), lr=1e-2, hyper=hg.Adam(lr=0.0, hyper=hg.SGD(lr=0.0)))
    train(m1, o1, 20)
    train(m2, o2, 20)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_per_name_hyper_learning_rates():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=0.1, per_name={"beta1": 5e-4, "beta2": {"lr": 5e-4}}))
    h = opt.hyper
    assert [g["hyper_of"] for g in h.param_groups] == ["beta1", "beta2", "lr"]
    assert float(h.hyperparameters("beta1")["lr"]) == pytest.approx(5e-4)
    assert float(h.hyperparameters("beta2")["lr"]) == pytest.approx(5e-4)
    assert float(h.hyperparameters("lr")["lr"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="per_name: 'rho'"):
        hg.Adam(model.parameters(), hyper=hg.SGD(lr=0.1, per_name={"rho": 1e-3}))


def test_maximize_hypergradient_sign():
    """With maximize=True the level above receives the gradient of -f, so it maximizes f too."""
    from fd import fd_grad, our_raw_grad, step_size

    def build():
        model = MLP()
        return model, hg.Adam(model.parameters(), lr=1e-2, maximize=True, hyper=hg.SGD(lr=0.0))
    model, opt = build()
    train(model, opt, 6)
    fd, noise = fd_grad(build, 6, 0, "lr", step_size("lr", 1e-2))
    assert our_raw_grad(opt, 0, "lr") == pytest.approx(-fd, rel=1e-5, abs=noise)


def test_add_param_group_extends_every_level():
    model = MLP()
    opt = hg.Adam([model.w1, model.b1], lr=1e-2, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-5)))
    opt.add_param_group({"params": [model.w2, model.b2], "lr": 5e-3})
    assert len(opt.param_groups) == 2 and len(opt.hyper.param_groups) == 2
    train(model, opt, 5)
    assert float(opt.hyperparameters(1)["lr"]) != 5e-3
    assert opt.hyper.hypergradients(1)["lr"] is not None


def test_external_writes_to_param_groups_are_taken_in():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-6))
    train(model, opt, 2)
    opt.param_groups[0]["lr"] = 0.5           # replaced by a float
    opt.param_groups[0]["betas"] = (0.8, 0.9)
    train(model, opt, 1, start=2)
    hp = opt.hyperparameters()
    assert opt.param_groups[0]["lr"] is hp["lr"] and abs(float(hp["lr"]) - 0.5) < 1e-3
    assert abs(float(hp["beta1"]) - 0.8) < 1e-3
    hp["lr"].fill_(0.25)                        # written in place (as torch LR schedulers do)
    train(model, opt, 1, start=3)
    assert abs(float(hp["lr"]) - 0.25) < 1e-3
    opt.param_groups[0]["lr"] = -1.0
    with pytest.raises(ValueError, match="Invalid lr"):
        train(model, opt, 1, start=4)


def test_state_dict_round_trip_continues_bit_for_bit(tmp_path):
    def make(model):
        return hg.Adam(model.parameters(), lr=1e-2, reparam={"lr": "log"},
                       hyper=hg.Adam(lr=1e-3, hyper=hg.SGD(lr=1e-5)))
    m1 = MLP()
    o1 = make(m1)
    train(m1, o1, 10)
    torch.save({"model": m1.state_dict(), "opt": o1.state_dict()}, tmp_path / "ckpt.pt")
    train(m1, o1, 10, start=10)

    m2 = MLP(seed=5)
    o2 = make(m2)
    ck = torch.load(tmp_path / "ckpt.pt")
    m2.load_state_dict(ck["model"])
    o2.load_state_dict(ck["opt"])
    train(m2, o2, 10, start=10)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for l1, l2 in zip(o1.levels, o2.levels):
        for (n, a), b in zip(l1.hyperparameters().items(), l2.hyperparameters().values()):
            assert torch.equal(a, b), n


BAD = [
    (lambda p: hg.Adam(p, lr=-1.0), "Invalid lr = -1"),
    (lambda p: hg.Adam(p, betas=(1.0, 0.999)), r"Invalid beta1 \(betas\[0\]\) = 1: must be in \[0, 1\)"),
    (lambda p: hg.Adam(p, betas=(0.9, -0.1)), r"Invalid beta2"),
    (lambda p: hg.Adam(p, eps=-1e-8), "Invalid eps"),
    (lambda p: hg.AdamW(p, weight_decay=-0.1), "Invalid weight_decay"),
    (lambda p: hg.SGD(p, lr=0.1, nesterov=True), "Nesterov momentum requires"),
    (lambda p: hg.SGD(p, lr=0.1, hyper=hg.SGD(lr=-1e-3)), "Invalid lr = -0.001"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), learn=["lr", "gamma"]), "unknown hyperparameter 'gamma'"),
    (lambda p: hg.Adam(p, learn=["lr"]), "needs a hyper level"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), learn=[]), "learn is empty"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(p, lr=1e-3)), "construct the hyper level without params"),
    (lambda p: hg.Adam(p, hyper=torch.optim.SGD(p, lr=1e-3)), "hyper must be a hypergrad optimizer"),
    (lambda p: hg.Adam(p, lr=0.0, hyper=hg.SGD(lr=1e-3), reparam={"lr": "log"}), "cannot be learned in log space"),
    (lambda p: hg.Adam(p, betas=(0.9, 0.99999), hyper=hg.SGD(lr=1e-3)), "outside the projection bounds"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), bounds={"beta1": (0.5, 0.2)}), "lower bound 0.5 is above"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), bounds={"beta1": (0.0, 1.5)}), "outside its domain"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), scope="layer"), "scope of 'lr' must be one of"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), reparam={"lr": "exp"}), "reparam of 'lr' must be one of"),
    (lambda p: hg.Adam(p, foo=1), "unexpected keyword"),
    (lambda p: hg.Adan(p, max_grad_norm=1.0), "max_grad_norm is not supported"),
    (lambda p: hg.Adafactor(p, d=0.5), r"Invalid d = 0.5: must be in \[1, inf\]"),
    (lambda p: hg.Adam(p, fused=True), "does not support fused=True"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3, hyper=hg.SGD(lr=-1.0))), "Invalid lr = -1"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3, per_name={"gamma": 1e-3})),
     "per_name: 'gamma' is not a hyperparameter learned by the level below"),
    (lambda p: hg.Adam([p[0], p[1], p[0]]), "parameters 0 and 2 are the same tensor"),
    (lambda p: hg.Adam([{"params": p[:2]}, {"params": p[1:]}]), "more than one parameter group"),
    (lambda p: hg.Adam([p[0], torch.nn.Parameter(torch.zeros(3, device="meta"))], hyper=hg.SGD(lr=1e-3)),
     "parameters on several devices"),
    (lambda p: hg.Adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]), "complex parameters"),
    (lambda p: hg.Adam(p, betas=(0.9,)), "betas must be a pair"),
    (lambda p: hg.Adan(p, betas=(0.9, 0.9)), r"betas must be \(beta1, beta2, beta3\)"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), hyper_warmup=-1), "hyper_warmup must be a non-negative integer"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), hypergrad_clip=-1.0), "hypergrad_clip must be a positive"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), backend="fast"), "backend must be one of"),
    (lambda p: hg.Adam(p, compile="yes"), "compile must be True, False or 'auto'"),
    (lambda p: hg.Adam(p, hyper=hg.SGD(lr=1e-3), shard_group=True), "torch.distributed is not initialized"),
    (lambda p: hg.Adam(p).hyperparameters(7), "param group 7 out of range"),
    (lambda p: hg.wrap(torch.optim.LBFGS(p), hyper=hg.SGD(lr=1e-3)), "cannot learn the lr of torch.optim.LBFGS"),
    (lambda p: hg.wrap(torch.optim.Adam(p), hyper=hg.SGD(p, lr=1e-3)), "already in use|without params"),
    (lambda p: MADA(p, beta2=0.3, hyper=hg.SGD(lr=1e-3)), r"outside the projection bounds \[0.501, 0.99\]"),
]


@pytest.mark.parametrize("make,msg", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_refused_clearly(make, msg):
    model = MLP()
    with pytest.raises((ValueError, TypeError, RuntimeError, IndexError), match=msg):
        make(list(model.parameters()))


def test_the_bad_input_table_is_long():
    assert len(BAD) >= 30


def test_hyper_level_used_twice_is_refused():
    model = MLP()
    h = hg.SGD(lr=1e-3)
    hg.Adam([model.w1], hyper=h)
    with pytest.raises(ValueError, match="already in use"):
        hg.Adam([model.w2], hyper=h)


def test_unbound_level_and_step_on_hyper_level():
    h = hg.SGD(lr=1e-3)
    with pytest.raises(RuntimeError, match="not bound"):
        h.hyperparameters()
    model = MLP()
    opt = hg.Adam(model.parameters(), hyper=h)
    with pytest.raises(RuntimeError, match="bottom level"):
        opt.hyper.step()


def test_sparse_gradients_are_refused():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = hg.Adam(emb.parameters(), hyper=hg.SGD(lr=1e-3))
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_non_finite_hypergradient_skips_the_hyper_step():
    model = MLP()
    opt = hg.Adam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    train(model, opt, 3)
    before = {k: v.clone() for k, v in opt.hyperparameters().items()}
    opt.zero_grad()
    loss_at(model, 4).backward()
    model.w1.grad[0, 0] = float("nan")
    opt.step()
    assert opt.hyper_steps_skipped == 1
    for k, v in opt.hyperparameters().items():
        assert torch.equal(v, before[k]), k


def test_overflowing_hypergradient_of_finite_gradients_skips_only_the_hyper_step():
    """Finite float32 gradients whose dot product overflows: the hyper-step is dropped (and
    counted), the parameter step is taken with the hyperparameters unchanged."""
    p = torch.nn.Parameter(torch.zeros(4))
    opt = hg.SGD([p], lr=1e-30, hyper=hg.SGD(lr=1e-30))
    for t, scale in enumerate([1.0, 1e20, 1e20], start=1):  # <g_3, g_2> = 4e40 > float32 max
        p.grad = torch.full((4,), scale)
        before, lr = p.detach().clone(), opt.hyperparameters()["lr"].clone()
        opt.step()
    assert opt.hyper_steps_skipped == 1 and opt.steps_skipped == 0
    assert torch.equal(opt.hyperparameters()["lr"], lr)
    assert torch.isfinite(p).all() and not torch.equal(p, before)
    torch.testing.assert_close(p.detach(), before - lr * 1e20)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_dead_features_give_finite_hypergradients(case):
    """Entries whose gradient is always 0 (an input that is always 0, as the border pixels of
    digits) keep second moments at exactly 0: the hyper-gradients must stay finite there."""
    model = MLP()
    opt = case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=0.0), learn=case.learnable)
    for t in range(1, 6):
        x, y = batch(t)
        x[:, 0] = 0.0
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
        if t > 1:
            for name, g in opt.hypergradients().items():
                assert torch.isfinite(g), f"{case.name} {name}: {g}"
    assert opt.hyper_steps_skipped == 0


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradients_zeroed_in_place_give_the_same_run(case):
    """``zero_grad(set_to_none=False)`` zeroes and refills the same gradient tensors: what an
    optimizer keeps for its next hyper-gradient must not be one of them."""
    def run(set_to_none):
        model = MLP()
        opt = case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=1e-5), learn=case.learnable)
        for t in range(1, 7):
            opt.zero_grad(set_to_none=set_to_none)
            loss_at(model, t).backward()
            opt.step()
        return model, opt
    (m1, o1), (m2, o2) = run(True), run(False)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b), case.name
    for n, v in o1.hyperparameters().items():
        assert torch.equal(v, o2.hyperparameters()[n]), f"{case.name} {n}"


@pytest.mark.parametrize("case", [c for c in CASES if c.name in ("Adam", "MADA", "NAdam")], ids=lambda c: c.name)
def test_each_parameter_owns_its_step_counter(case):
    model = MLP()
    opt = case.ours(model.parameters(), **case.fd_kw, hyper=hg.SGD(lr=1e-5))
    train(model, opt, 4)
    steps = [st["step"] for p, st in opt.state.items() if p in set(model.parameters())]
    assert len({id(s) for s in steps}) == len(steps) == 4
    assert all(float(s) == 4 for s in steps)


@pytest.mark.parametrize("one_pass", [False, True])
def test_clipped_hyperparameters_closed_form_is_autograd(one_pass):
    """A hyper level that pushes the hyperparameters below it against their bounds: where the
    projection clipped a value, its derivative is 0 for the level above. The closed form (a
    hyper level's single numbers are compared as numbers) gives what autograd through the
    clamp gives, at every level."""
    runs = []
    for backend in ("auto", "autograd"):
        model = MLP()
        top = hg.SGD(lr=1e-3)
        mid = hg.SGD(lr=3.0, momentum=0.5, weight_decay=0.01, learn=["lr", "momentum", "weight_decay"],
                     backend=backend, hyper=top)
        opt = hg.Adam(model.parameters(), lr=1e-2, bounds={"beta1": (0.5, 0.9), "beta2": (0.9, 0.999)},
                      hyper=mid, one_pass=one_pass, compile=False)
        clipped = 0
        for t in range(1, 13):
            train(model, opt, 1, start=t - 1)
            hp = opt.hyperparameters()
            clipped += float(hp["beta1"]) in (0.5, 0.9) or float(hp["beta2"]) in (0.9, 0.999)
        runs.append((model, opt, clipped))
    (m1, o1, c1), (m2, o2, c2) = runs
    assert c1 >= 3 and c1 == c2, (c1, c2)  # the bounds were hit, in both runs alike
    assert o1.hyper._hg_kind(0) == "closed" and o2.hyper._hg_kind(0) == "autograd"
    assert_stacks_agree(m1, o1, m2, o2)
