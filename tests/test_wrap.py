"""hg.wrap learns the lr of existing optimizer instances from the update they applied."""

import copy

import pytest
import torch

import hypergrad as hg
from helpers import MLP, train


@pytest.mark.parametrize("ref,ours,kw", [
    (torch.optim.Adam, hg.Adam, dict(lr=1e-2, weight_decay=0.01)),
    (torch.optim.SGD, hg.SGD, dict(lr=0.05, momentum=0.9)),
    (torch.optim.RMSprop, hg.RMSprop, dict(lr=1e-3, centered=True)),
    (torch.optim.Adagrad, hg.Adagrad, dict(lr=1e-2, lr_decay=0.01)),
])
def test_wrapped_lr_trajectory_matches_ours(ref, ours, kw, float64_default):
    """Wrapping torch.optim.X and learning its lr gives the trajectory of hg.X learning lr only."""
    m1, m2 = MLP(), MLP()
    o1 = hg.wrap(ref(m1.parameters(), **kw), hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-6)))
    o2 = ours(m2.parameters(), **kw, hyper=hg.SGD(lr=1e-4, hyper=hg.SGD(lr=1e-6)), learn=["lr"])
    train(m1, o1, 30)
    train(m2, o2, 30)
    assert float(o1.hyperparameters()["lr"]) != kw["lr"]
    for l1, l2 in zip(o1.levels, o2.levels):
        assert float(l1.hyperparameters()["lr"]) == pytest.approx(float(l2.hyperparameters()["lr"]), rel=1e-9)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_wrap_third_party_lion(float64_default):
    lion_pytorch = pytest.importorskip("lion_pytorch")
    m1, m2 = MLP(), MLP()
    o1 = hg.wrap(lion_pytorch.Lion(m1.parameters(), lr=1e-3, weight_decay=0.1), hyper=hg.SGD(lr=1e-6))
    o2 = hg.Lion(m2.parameters(), lr=1e-3, weight_decay=0.1, hyper=hg.SGD(lr=1e-6))
    train(m1, o1, 20)
    train(m2, o2, 20)
    assert float(o1.hyperparameters()["lr"]) == pytest.approx(float(o2.hyperparameters()["lr"]), rel=1e-9)


def test_wrap_face_and_state_dict():
    def make(model):
        return hg.wrap(torch.optim.AdamW(model.parameters(), lr=1e-2), hyper=hg.Adam(lr=1e-3))
    model = MLP()
    opt = make(model)
    assert opt.param_groups is opt.optimizer.param_groups
    train(model, opt, 5)
    lr = float(opt.hyperparameters()["lr"])
    assert opt.optimizer.param_groups[0]["lr"] == lr and lr != 1e-2
    saved = copy.deepcopy((model.state_dict(), opt.state_dict()))  # as torch.save would
    train(model, opt, 5, start=5)
    model_b = MLP(seed=3)
    opt_b = make(model_b)
    model_b.load_state_dict(saved[0])
    opt_b.load_state_dict(saved[1])
    train(model_b, opt_b, 5, start=5)
    for a, b in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt.hyperparameters()["lr"], opt_b.hyperparameters()["lr"])


def test_scheduler_write_is_taken_in():
    model = MLP()
    opt = hg.wrap(torch.optim.SGD(model.parameters(), lr=0.1), hyper=hg.SGD(lr=1e-7))
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=2, gamma=0.1)
    for t in range(1, 5):
        train(model, opt, 1, start=t - 1)
        sched.step()
    assert float(opt.hyperparameters()["lr"]) == pytest.approx(0.001, rel=1e-2)


@pytest.mark.parametrize("make,msg", [
    (lambda p: torch.optim.LBFGS(p), "line search"),
    (lambda p: torch.optim.Rprop(p), "step sizes"),
    (lambda p: torch.optim.ASGD(p), "not proportional"),
    (lambda p: torch.optim.Adafactor(p), "relative step"),
    (lambda p: hg.Adam(p), "already a hypergrad optimizer"),
])
def test_wrap_refuses_non_proportional(make, msg):
    model = MLP()
    with pytest.raises((ValueError, TypeError), match=msg):
        hg.wrap(make(model.parameters()), hyper=hg.SGD(lr=1e-3))


def test_wrap_unknown_optimizer_needs_assumption():
    class MySGD(torch.optim.SGD):
        pass
    model = MLP()
    with pytest.raises(ValueError, match="assume_proportional=True"):
        hg.wrap(MySGD(model.parameters(), lr=0.1), hyper=hg.SGD(lr=1e-3))
    opt = hg.wrap(MySGD(model.parameters(), lr=0.1), hyper=hg.SGD(lr=1e-3), assume_proportional=True)
    train(model, opt, 3)
    assert float(opt.hyperparameters()["lr"]) != 0.1
