"""Small deterministic problems shared by the tests."""

from __future__ import annotations

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
