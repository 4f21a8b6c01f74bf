"""MADA: exact corners, the reference variant against an independent transcription, hyper-gradients
against finite differences, projection, clipping, warm-up, accumulation, scopes, checkpoints."""

import copy

import pytest
import torch

import hypergrad as hg
from fd import fd_grad, our_raw_grad, step_size
from helpers import MLP, batch, loss_at, train
from parameterized import COEFFICIENTS, MADA, HyperAdam

STEPS = 100


# ------------------------------------------------------------------------------------------ corners


class AVGrad(torch.optim.Optimizer):
    """An independent float64 AVGrad (Adam with v replaced by the running mean of v, bias-corrected
    as MADA's v_hat), written from the equations, for MADA's rho=0 corner."""

    def __init__(self, params, lr, betas, eps):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for g in self.param_groups:
            b1, b2 = g["betas"]
            for p in g["params"]:
                st = self.state[p]
                if not st:
                    st.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p), vbar=torch.zeros_like(p))
                st["t"] += 1
                t = st["t"]
                st["m"] = b1 * st["m"] + (1 - b1) * p.grad
                st["v"] = b2 * st["v"] + (1 - b2) * p.grad ** 2
                st["vbar"] = st["vbar"] + (st["v"] - st["vbar"]) / t
                vhat = st["vbar"] / (1 - b2 ** t)
                p -= g["lr"] * (st["m"] / (1 - b1 ** t)) / (vhat.sqrt() + g["eps"])


def _lion(p, **kw):
    import lion_pytorch
    return lion_pytorch.Lion(p, **kw)


def _yogi(p, **kw):
    import pytorch_optimizer
    return pytorch_optimizer.Yogi(p, **kw)


def _adan(p, **kw):
    import pytorch_optimizer
    return pytorch_optimizer.Adan(p, **kw)


CORNERS = {
    "Adam": (dict(lr=1e-2, beta1=0.9, beta2=0.999),
             lambda p: torch.optim.Adam(p, lr=1e-2, betas=(0.9, 0.999))),
    "AdamW": (dict(lr=1e-2, beta1=0.85, beta2=0.95, eps=1e-6, weight_decay=0.05),
              lambda p: torch.optim.AdamW(p, lr=1e-2, betas=(0.85, 0.95), eps=1e-6, weight_decay=0.05)),
    "Lion": (dict(lr=1e-3, gamma=0.0, lion_betas=(0.9, 0.99), weight_decay=0.1),
             lambda p: _lion(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)),
    # Yogi's moments start at initial_accumulator (1e-6 by default), MADA's at 0
    "Yogi": (dict(lr=1e-2, c=0.0, beta1=0.9, beta2=0.999, eps=1e-3),
             lambda p: _yogi(p, lr=1e-2, betas=(0.9, 0.999), initial_accumulator=0.0, eps=1e-3)),
    "AVGrad": (dict(lr=1e-2, rho=0.0, beta1=0.9, beta2=0.99),
               lambda p: AVGrad(p, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)),
    # MADA's (beta1, beta2, beta3) are Adan's (beta1, beta3, beta2)
    "Adan": (dict(lr=1e-2, beta1=0.98, beta2=0.99, beta3=0.92, weight_decay=0.02),
             lambda p: _adan(p, lr=1e-2, betas=(0.98, 0.92, 0.99), weight_decay=0.02, weight_decouple=True)),
}


@pytest.mark.parametrize("name", CORNERS)
@pytest.mark.parametrize("mode", ["plain", "zero_hyper_lr"])
def test_corner_is_exact(name, mode, float64_default):
    kw, ref = CORNERS[name]
    m_ref = MLP()
    train(m_ref, ref(m_ref.parameters()), STEPS)
    m = MLP()
    if mode == "plain":
        opt = MADA(m.parameters(), **kw)
    else:
        opt = MADA(m.parameters(), **kw, hyper=hg.SGD(lr=0.0), learn=list(COEFFICIENTS) + ["lr"],
                   bounds={"beta2": (0.5, 0.999)})
    train(m, opt, STEPS)
    for a, b in zip(m.parameters(), m_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------ reference variant


class ReferenceTranscription:
    """An independent float64 transcription of the public reference code's equations and of its
    training loop: the coefficients are leaves of an autograd graph that runs through the new
    parameter values (as Chandra et al.'s code does), so the next loss.backward() gives their
    hyper-gradients; SGD with per-name rates steps them after clipping and warm-up; a hard clip
    projects them. Nothing here is shared with hypergrad's engine."""

    RANGES = {"beta1": (0.01, 0.99), "beta2": (0.501, 0.99), "beta3": (0.0, 0.99),
              "rho": (0.0, 1.0), "c": (0.0, 1.0), "gamma": (0.0, 1.0)}

    def __init__(self, params, coeffs, lr, eps, wd, hyper_lr, clip, warmup):
        self.x = [p.detach().clone() for p in params]
        self.q = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in coeffs.items()}
        self.lr, self.eps, self.wd = lr, eps, wd
        self.hyper_lr, self.clip, self.warmup = hyper_lr, clip, warmup
        self.cache = [None] * len(self.x)
        self.t = 0

    def loss_and_step(self, model_fn, t_batch):
        # the loss at the current parameters (a graph back to the coefficients of the last step)
        xs = [x if x.requires_grad else x.detach().requires_grad_() for x in self.x]
        for x in xs:
            x.retain_grad()
        loss = model_fn(xs, t_batch)
        loss.backward()
        grads = [x.grad.detach() for x in xs]
        self.t += 1
        # hyper-step, then projection
        new_q = {}
        for k, q in self.q.items():
            v = q.detach()
            if self.t > self.warmup and q.grad is not None:
                h = q.grad
                h = h * min(1.0, self.clip / (h.abs().item() + 1e-30))
                v = v - self.hyper_lr[k] * h
            lo, hi = self.RANGES[k]
            new_q[k] = v.clamp(lo, hi).requires_grad_()
        self.q = new_q
        b1, b2, b3, c, rho, gamma = (self.q[k] for k in COEFFICIENTS)
        t = self.t
        new_x = []
        for i, (x, g) in enumerate(zip(self.x, grads)):
            if self.cache[i] is None:
                z = torch.zeros_like(g)
                self.cache[i] = dict(m=z, v=z + 1e-15, v_mean=z + 1e-15, n=g * g, g=z, m_lion=z)
            C = self.cache[i]
            g_hat = g + b3 * (g - C["g"])
            g_t2 = c * g_hat * g_hat + (1 - c) * (C["v"] + g_hat * g_hat * torch.sign(g_hat * g_hat - C["v"]))
            m = b1 * C["m"] + (1 - b1) * g
            v = b2 * C["v"] + (1 - b2) * g_t2
            n = b3 * C["n"] + (1 - b3) * (g - C["g"])
            m_lion = 0.98 * C["m_lion"] + 0.02 * g
            u = 0.95 * m_lion + 0.05 * g
            v_mean = (v + (t - 1) * C["v_mean"]) / t
            m_hat = m / (1 - b1 ** t)
            v_hat = (rho * v + (1 - rho) * v_mean.detach()) / (1 - b2 ** t)
            d = gamma * (m_hat + b3 * n) / (v_hat ** 0.5 + self.eps) + (1 - gamma) * torch.sign(u)
            new_x.append(x.detach() * (1 - self.lr * self.wd) - self.lr * d)
            self.cache[i] = dict(m=m.detach(), v=v.detach(), v_mean=v_mean.detach(), n=n.detach(), g=g,
                                 m_lion=m_lion)
        self.x = new_x
        return loss.item()


def _functional_loss(xs, t):
    w1, b1, w2, b2 = xs
    x, y = batch(t)
    return ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - y) ** 2).mean()


COEFFS = dict(beta1=0.85, beta2=0.95, beta3=0.1, c=0.6, rho=0.4, gamma=0.7)
HYPER_LR = dict(beta1=5e-3, beta2=5e-3, beta3=0.1, c=0.1, rho=0.1, gamma=0.1)


@pytest.mark.parametrize("clip,warmup", [(10.0, 0), (0.05, 5)])
def test_reference_variant_matches_transcription_with_hyper_steps(clip, warmup):
    steps = 50
    model = MLP()
    ref = ReferenceTranscription(model.parameters(), COEFFS, lr=1e-2, eps=1e-6, wd=0.1,
                                 hyper_lr=HYPER_LR, clip=clip, warmup=warmup)
    ref_losses = [ref.loss_and_step(_functional_loss, t) for t in range(1, steps + 1)]

    opt = MADA(model.parameters(), lr=1e-2, eps=1e-6, weight_decay=0.1, variant="reference", **COEFFS,
               hyper=hg.SGD(lr=0.1, per_name={"beta1": 5e-3, "beta2": 5e-3}), hypergrad_clip=clip,
               hyper_warmup=warmup)
    losses = train(model, opt, steps)
    assert losses == pytest.approx(ref_losses, rel=1e-9, abs=1e-12)
    for a, b in zip(model.parameters(), ref.x):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-9, atol=1e-12)
    hp = opt.hyperparameters()
    for k in COEFFICIENTS:
        assert float(hp[k]) == pytest.approx(float(ref.q[k]), rel=1e-9, abs=1e-12), k
        assert float(hp[k]) != COEFFS[k], f"{k} never moved: the comparison would be vacuous"


# ------------------------------------------------------------------------------ finite differences

INTERIOR = dict(lr=1e-2, beta1=0.85, beta2=0.95, beta3=0.1, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.01)


@pytest.mark.parametrize("variant,point", [
    ("corners", INTERIOR),
    # the reference code lets no hyper-gradient through the running mean v_mean: its
    # hyper-gradients are the true derivative where v_mean does not enter (rho = 1); with rho < 1
    # they are checked against the transcription above
    ("reference", {**INTERIOR, "rho": 1.0}),
])
def test_hypergradients_match_finite_differences(variant, point):
    names = list(COEFFICIENTS) + ["lr"]

    def build():
        model = MLP()
        return model, MADA(model.parameters(), **point, variant=variant, hyper=hg.SGD(lr=0.0), learn=names,
                           bounds={"rho": (0.0, 1.0)})
    T = 6
    model, opt = build()
    train(model, opt, T)
    for name in names:
        ours = our_raw_grad(opt, 0, name)
        fd, noise = fd_grad(build, T, 0, name, step_size(name, point.get(name, 0.0)))
        assert ours != 0.0
        assert ours == pytest.approx(fd, rel=1e-5, abs=max(noise, 1e-12)), f"{variant} {name}: {ours} vs {fd}"


def test_gamma_learns_while_lion_betas_get_no_hypergradient():
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.0),
               learn=["gamma", "lion_beta1", "lion_beta2"])
    train(model, opt, 5)
    h = opt.hypergradients()
    assert float(h["gamma"]) != 0.0 and float(h["lion_beta1"]) == 0.0 and float(h["lion_beta2"]) == 0.0


# ------------------------------------------------------------------- projection, clipping, warm-up


def test_projection_into_the_papers_ranges():
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=100.0))
    ranges = ReferenceTranscription.RANGES
    for t in range(1, 20):
        train(model, opt, 1, start=t - 1)
        for k, (lo, hi) in ranges.items():
            assert lo <= float(opt.hyperparameters()[k]) <= hi, k
    assert any(float(opt.hyperparameters()[k]) in ranges[k] for k in ranges), "no bound was ever reached"


def test_hypergradient_clipping():
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.0), hypergrad_clip=1e-3)
    train(model, opt, 4)
    clipped = 0
    for name in COEFFICIENTS:
        hv = opt._hg_vars[0][name]
        assert abs(float(hv.raw[0].grad)) <= 1e-3 * (1 + 1e-12)
        clipped += abs(float(hv.grad[0])) > 1e-3      # hypergradients() reports the unclipped value
    assert clipped > 0


def test_hyper_warmup():
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.1), hyper_warmup=4)
    for t in range(1, 5):
        train(model, opt, 1, start=t - 1)
        assert all(float(opt.hyperparameters()[k]) == INTERIOR[k] for k in COEFFICIENTS), t
    train(model, opt, 1, start=4)
    assert any(float(opt.hyperparameters()[k]) != INTERIOR[k] for k in COEFFICIENTS)


def test_one_hyper_step_per_step_under_gradient_accumulation():
    """Two half-batches accumulated, then one step(), equal one step on the whole batch."""
    def run(accumulate):
        model = MLP()
        opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.1))
        for t in range(1, 9):
            x, y = batch(t)
            opt.zero_grad()
            if accumulate:
                for xs, ys in ((x[:8], y[:8]), (x[8:], y[8:])):
                    (((model(xs) - ys) ** 2).mean() / 2).backward()
            else:
                ((model(x) - y) ** 2).mean().backward()
            opt.step()
        return model, opt
    m1, o1 = run(False)
    m2, o2 = run(True)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    for k in COEFFICIENTS:
        assert float(o1.hyperparameters()[k]) == pytest.approx(float(o2.hyperparameters()[k]), rel=1e-11)
    assert o2._hg_t == 8


# ------------------------------------------------------------------------- stacks, scopes, checkpoints


def test_mada_at_the_bottom_of_a_stack():
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR,
               hyper=hg.SGD(lr=0.1, per_name={"beta1": 5e-4, "beta2": 5e-4}, hyper=hg.Adam(lr=1e-3)))
    train(model, opt, 10)
    assert len(opt.levels) == 3
    assert float(opt.hyper.hyperparameters("beta1")["lr"]) != 5e-4
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("scope", ["tensor", "element"])
def test_mada_scopes(scope):
    def run(scope):
        model = MLP()
        opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.0), scope=scope)
        train(model, opt, 4)
        return model, opt
    _, og = run("group")
    model, os_ = run(scope)
    params = list(model.parameters())
    for k in COEFFICIENTS:
        vals = os_.hyperparameters()[k]
        shapes = [torch.Size([])] * len(params) if scope == "tensor" else [p.shape for p in params]
        assert [v.shape for v in vals] == shapes
        total = sum(g.sum() for g in os_.hypergradients()[k])
        torch.testing.assert_close(total, og.hypergradients()[k], rtol=1e-10, atol=1e-13)
    # and it learns per element
    model = MLP()
    opt = MADA(model.parameters(), **INTERIOR, hyper=hg.SGD(lr=0.1), scope=scope)
    train(model, opt, 5)
    assert len({float(v.flatten()[0]) for v in opt.hyperparameters()["gamma"]}) > 1


@pytest.mark.parametrize("variant", ["corners", "reference"])
def test_state_dict_mid_training_continues_bit_for_bit(variant, tmp_path):
    def make(model):
        return MADA(model.parameters(), **INTERIOR, variant=variant, hypergrad_clip=10.0, hyper_warmup=2,
                    hyper=hg.SGD(lr=0.1, per_name={"beta1": 5e-4, "beta2": 5e-4}, hyper=hg.SGD(lr=1e-4)))
    m1 = MLP()
    o1 = make(m1)
    train(m1, o1, 7)
    torch.save({"m": m1.state_dict(), "o": o1.state_dict()}, tmp_path / "c.pt")
    train(m1, o1, 7, start=7)
    m2 = MLP(seed=9)
    o2 = make(m2)
    ck = torch.load(tmp_path / "c.pt")
    m2.load_state_dict(ck["m"])
    o2.load_state_dict(ck["o"])
    train(m2, o2, 7, start=7)
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)
    for l1, l2 in zip(o1.levels, o2.levels):
        for k, v in l1.hyperparameters().items():
            assert torch.equal(v, l2.hyperparameters()[k]), k


def test_hyperadam_learns_only_the_betas():
    model = MLP()
    opt = HyperAdam(model.parameters(), lr=1e-2, hyper=hg.SGD(lr=1e-3))
    assert opt.learned == ("beta1", "beta2")
    train(model, opt, 10)
    hp = opt.hyperparameters()
    assert float(hp["lr"]) == 1e-2 and float(hp["beta2"]) != 0.95
    assert opt._hg_vars[0]["beta2"].lo == 0.501


@pytest.mark.parametrize("make,msg", [
    (lambda p: MADA(p, variant="paper"), "variant must be one of"),
    (lambda p: MADA(p, gamma=1.5), r"Invalid gamma = 1.5: must be in \[0, 1\]"),
    (lambda p: MADA(p, beta2=0.3, hyper=hg.SGD(lr=0.1)), r"outside the projection bounds \[0.501, 0.99\]"),
    (lambda p: MADA(p, lion_betas=(0.9,)), "lion_betas must be a pair"),
    (lambda p: MADA(p, hyper=hg.SGD(lr=0.1), hypergrad_clip=-1), "hypergrad_clip must be"),
    (lambda p: MADA(p, hyper=hg.SGD(lr=0.1), hyper_warmup=1.5), "hyper_warmup must be"),
])
def test_bad_mada_input(make, msg):
    with pytest.raises(ValueError, match=msg):
        make(list(MLP().parameters()))
