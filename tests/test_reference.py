"""Every optimizer, every option set: with no hyper level, and with a hyper level whose
learning rate is 0, 100 steps reproduce the reference implementation in float64."""

import pytest
import torch

import hypergrad as hg
from helpers import MLP, train
from table import all_configs

STEPS = 100


def _run(make, steps=STEPS):
    model = MLP()
    opt = make(model.parameters())
    losses = train(model, opt, steps)
    return model, losses


@pytest.mark.parametrize("case,i", all_configs(), ids=lambda v: v.name if hasattr(v, "name") else str(v))
@pytest.mark.parametrize("mode", ["plain", "zero_hyper_lr"])
def test_matches_reference(case, i, mode, float64_default):
    cfg = case.configs[i]
    ref_model, ref_losses = _run(lambda p: case.ref(p, **cfg))
    if mode == "plain":
        make = lambda p: case.ours(p, **cfg)
    else:  # learn every learnable hyperparameter, but with a zero hyper learning rate
        make = lambda p: case.ours(p, **cfg, hyper=hg.SGD(lr=0.0), learn=case.learnable)
    model, losses = _run(make)
    for (n, a), b in zip(model.named_parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{case.name} {cfg} {n}: {m}")
    assert losses == pytest.approx(ref_losses, rel=1e-10, abs=1e-12)
