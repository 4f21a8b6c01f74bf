"""Small deterministic problems shared by the tests."""

from __future__ import annotations

import math

import torch


class MLP(torch.nn.Module):
    """A smooth two-layer network: one matrix and one vector parameter per layer."""

    def __init__(self, d_in=5, d_hidden=7, d_out=3, dtype=torch.float64, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(d_hidden, d_in, generator=g, dtype=dtype) / d_in ** 0.5)
        self.b1 = torch.nn.Parameter(torch.randn(d_hidden, generator=g, dtype=dtype) * 0.1)
        self.w2 = torch.nn.Parameter(torch.randn(d_out, d_hidden, generator=g, dtype=dtype) / d_hidden ** 0.5)
        self.b2 = torch.nn.Parameter(torch.randn(d_out, generator=g, dtype=dtype) * 0.1)

    def forward(self, x):
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def batch(t, n=16, d_in=5, d_out=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(1000 + t)
    x = torch.randn(n, d_in, generator=g, dtype=dtype)
    y = torch.sin(x[:, :d_out] * 2.0) + 0.1 * torch.randn(n, d_out, generator=g, dtype=dtype)
    return x, y


def loss_at(model, t):
    x, y = batch(t, dtype=next(model.parameters()).dtype)
    return ((model(x) - y) ** 2).mean()


def train(model, opt, steps, start=0):
    """Steps start+1 .. start+steps; returns the list of losses."""
    losses = []
    for t in range(start + 1, start + steps + 1):
        opt.zero_grad()
        loss = loss_at(model, t)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def assert_stacks_agree(m1, o1, m2, o2, rtol=1e-10, grad_rtol=1e-8):
    """Two runs of a stack computed the same thing: the model parameters, every level's
    hyperparameters and hyper-gradients (float64 rounding by default)."""
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-14)
    for x, y in zip(o1.levels, o2.levels):
        for n, v in x.hyperparameters().items():
            torch.testing.assert_close(v, y.hyperparameters()[n], rtol=rtol, atol=1e-14, msg=n)
        for n, v in x.hypergradients().items():
            if v is not None:
                torch.testing.assert_close(v, y.hypergradients()[n], rtol=grad_rtol, atol=1e-14, msg=n)


def same_bits(a, b, where=""):
    """a and b equal, recursively: tensors bit for bit (dtype, shape, values; NaN where NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or bool((torch.isnan(a) == torch.isnan(b)).all() and
                                          (a[~torch.isnan(a)] == b[~torch.isnan(b)]).all()), where
        if a.is_floating_point():  # the sign of zero too (NaN's sign aside)
            keep = ~torch.isnan(a)
            assert torch.equal(torch.signbit(a[keep]), torch.signbit(b[keep])), (where, "sign of zero")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, set(a) ^ set(b))
        for k in a:
            same_bits(a[k], b[k], (where, k))
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same_bits(x, y, (where, i))
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, (where, a, b)
