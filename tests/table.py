"""The one table of optimizers that the shared tests run over.

Each entry names our optimizer, its reference implementation (a PyPI package or torch.optim,
used with the same arguments), the option sets that must reproduce the reference, and the
arguments that make it a gentle hyper level (for stacking tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

import hypergrad as hg
from parameterized import MADA


def _lion(params, **kw):
    import lion_pytorch
    return lion_pytorch.Lion(params, **kw)


def _adan(params, **kw):
    import pytorch_optimizer
    return pytorch_optimizer.Adan(params, **kw)


def _yogi(params, **kw):
    import pytorch_optimizer
    return pytorch_optimizer.Yogi(params, **kw)


def _adamw_for_mada(params, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, **_):
    """MADA's Adam corner (beta3=0, c=rho=gamma=1, its defaults) is torch's AdamW."""
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


@dataclass
class Case:
    name: str
    ours: type
    ref: Callable
    configs: list[dict]
    hyper_kw: dict = field(default_factory=dict)   # arguments as a hyper level in stack tests
    fd_kw: dict = field(default_factory=dict)      # arguments for finite-difference tests at level 1

    @property
    def learnable(self) -> list[str]:
        return [h.name for h in self.ours.hypers if h.learnable]


CASES = [
    Case("SGD", hg.SGD, torch.optim.SGD,
         [dict(lr=0.05), dict(lr=0.05, momentum=0.9), dict(lr=0.05, momentum=0.9, dampening=0.1),
          dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.05, momentum=0.5, weight_decay=0.01),
          dict(lr=0.01, maximize=True)],
         hyper_kw=dict(lr=1e-4, momentum=0.5), fd_kw=dict(lr=0.05, momentum=0.9, dampening=0.1,
                                                          weight_decay=0.01)),
    Case("Adagrad", hg.Adagrad, torch.optim.Adagrad,
         [dict(), dict(lr_decay=0.01), dict(weight_decay=0.01), dict(initial_accumulator_value=0.1),
          dict(maximize=True, eps=1e-6)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(lr_decay=0.01, weight_decay=0.01)),
    Case("Adadelta", hg.Adadelta, torch.optim.Adadelta,
         [dict(), dict(rho=0.95, eps=1e-5), dict(weight_decay=0.01), dict(maximize=True)],
         hyper_kw=dict(lr=0.1), fd_kw=dict(weight_decay=0.01)),
    Case("RMSprop", hg.RMSprop, torch.optim.RMSprop,
         [dict(), dict(centered=True), dict(momentum=0.9), dict(centered=True, momentum=0.9),
          dict(weight_decay=0.01, alpha=0.9), dict(maximize=True)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(centered=True, momentum=0.9, weight_decay=0.01)),
    Case("Adam", hg.Adam, torch.optim.Adam,
         [dict(), dict(amsgrad=True), dict(weight_decay=0.01), dict(weight_decay=0.01,
          decoupled_weight_decay=True), dict(betas=(0.8, 0.99), eps=1e-6, maximize=True)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(weight_decay=0.01)),
    Case("AdamW", hg.AdamW, torch.optim.AdamW,
         [dict(), dict(amsgrad=True), dict(weight_decay=0.1, betas=(0.85, 0.95))],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(amsgrad=True)),
    Case("NAdam", hg.NAdam, torch.optim.NAdam,
         [dict(), dict(weight_decay=0.01), dict(weight_decay=0.01, decoupled_weight_decay=True),
          dict(momentum_decay=0.01, maximize=True)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(weight_decay=0.01)),
    Case("Adan", hg.Adan, _adan,
         [dict(), dict(weight_decay=0.02), dict(weight_decay=0.02, weight_decouple=True),
          dict(betas=(0.9, 0.9, 0.999), eps=1e-6)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(weight_decay=0.02)),
    Case("Yogi", hg.Yogi, _yogi,
         [dict(), dict(weight_decay=0.01), dict(weight_decay=0.01, weight_decouple=False),
          dict(weight_decay=0.01, fixed_decay=True), dict(initial_accumulator=1e-3, maximize=True)],
         hyper_kw=dict(lr=1e-4), fd_kw=dict(weight_decay=0.01)),
    Case("Lion", hg.Lion, _lion,
         [dict(), dict(lr=1e-3, weight_decay=0.1), dict(lr=1e-3, weight_decay=1e-4,
          decoupled_weight_decay=True), dict(betas=(0.95, 0.98))],
         hyper_kw=dict(lr=1e-5), fd_kw=dict(lr=1e-3, weight_decay=0.1)),
    Case("Adafactor", hg.Adafactor, torch.optim.Adafactor,
         [dict(), dict(weight_decay=0.01), dict(d=1.5, beta2_decay=-0.5), dict(eps=(1e-20, 1e-3),
          maximize=True)],
         hyper_kw=dict(lr=1e-3), fd_kw=dict(lr=0.1, weight_decay=0.01, d=1.02, beta2_decay=-0.3)),
]

CASES.append(
    Case("MADA", MADA, _adamw_for_mada,
         [dict(), dict(lr=1e-2, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1)],
         hyper_kw=dict(lr=1e-4, beta3=0.1, c=0.5, rho=0.5, gamma=0.5),
         fd_kw=dict(lr=1e-2, beta1=0.85, beta3=0.1, c=0.5, rho=0.5, gamma=0.5, weight_decay=0.01)))

BY_NAME = {c.name: c for c in CASES}


def all_configs():
    return [(c, i) for c in CASES for i in range(len(c.configs))]


def build_stack(name: str, height: int, params, **kw):
    """The optimizer ``name`` of the table (its fd_kw configuration) at the bottom of a stack of
    ``height`` levels: an SGD level with momentum (so that it has state), and an SGD on top."""
    case = BY_NAME[name]
    hyper = None
    if height >= 3:
        hyper = hg.SGD(lr=1e-8)
    if height >= 2:
        hyper = hg.SGD(lr=1e-6, momentum=0.5, hyper=hyper)
    learn = case.learnable if height >= 2 else None
    return case.ours(params, **case.fd_kw, hyper=hyper, learn=learn, **kw)
