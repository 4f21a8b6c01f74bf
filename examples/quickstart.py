"""Quickstart: Adam vs. Adam that tunes itself, on real data that needs no download.

Trains the same small MLP on scikit-learn's 8x8 handwritten digits (shipped inside its wheel)
with several optimizers side by side, from a deliberately poor initial learning rate, and prints
the final loss, test accuracy and learned hyperparameters. Writes a PNG of the loss and
hyperparameter trajectories and a JSONL log.

    python examples/quickstart.py            # about a minute on 2 CPU cores
    python examples/quickstart.py --help
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import hypergrad as hg
from parameterized import COEFFICIENTS, MADA


def optimizers(lr):
    """name -> factory(params). Each hyper level gets its own learning rate per hyperparameter
    name: betas move on a much finer scale than the learning rate."""
    betas = {"beta1": 1e-4, "beta2": 1e-5}
    out = {
        "Adam": lambda p: hg.Adam(p, lr=lr),
        # Adam whose lr, beta1 and beta2 are learned by SGD (2 levels)
        "hyper-Adam": lambda p: hg.Adam(p, lr=lr, hyper=hg.SGD(lr=1e-4, per_name=betas)),
        # 3 levels: the hyper-learning-rates are learned too
        "hyper-Adam x3": lambda p: hg.Adam(p, lr=lr, hyper=hg.SGD(lr=1e-4, per_name=betas,
                                                                  hyper=hg.SGD(lr=1e-8))),
        # torch's own Adam, its lr learned from the updates it applies
        "wrap(torch Adam)": lambda p: hg.wrap(torch.optim.Adam(p, lr=lr), hyper=hg.SGD(lr=1e-4)),
    }
    # MADA: learns which optimizer to be (its six coefficients) and, here, its lr as well
    out["MADA"] = lambda p: MADA(p, lr=lr, learn=COEFFICIENTS + ("lr",),
                                 hyper=hg.SGD(lr=1e-4, per_name={**betas, "beta3": 1e-3, "c": 1e-3,
                                                                 "rho": 1e-3, "gamma": 1e-3}))
    return out


def load_digits(device, dtype):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=dtype, device=device) / 16.0
    y = torch.tensor(d.target, device=device)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g).to(device)
    x, y = x[perm], y[perm]
    n = 1500
    return (x[:n], y[:n]), (x[n:], y[n:])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4, help="initial lr for every optimizer (poor on purpose)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", help="run only these optimizers")
    ap.add_argument("--out", default="runs/quickstart", help="directory for the log and the plot")
    args = ap.parse_args()

    dtype = torch.float32
    (xtr, ytr), (xte, yte) = load_digits(args.device, dtype)
    os.makedirs(args.out, exist_ok=True)
    results, curves = {}, {}
    for name, make in optimizers(args.lr).items():
        if args.only and name not in args.only:
            continue
        torch.manual_seed(args.seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        model.to(args.device, dtype)
        opt = make(model.parameters())
        # every level's hyperparameters and hyper-gradients after each step, streamed to JSONL
        rec = hg.Recorder(opt, os.path.join(args.out, f"{name.replace(' ', '_')}.jsonl"))
        t0 = time.perf_counter()
        gen = torch.Generator().manual_seed(args.seed)
        for epoch in range(args.epochs):
            perm = torch.randperm(len(ytr), generator=gen).to(args.device)
            for i in range(0, len(ytr), args.batch_size):
                idx = perm[i:i + args.batch_size]
                loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad()
                loss.backward()
                rec.log(loss=loss)  # joins the row the step writes
                opt.step()
        rec.close()
        with torch.no_grad():
            train_loss = F.cross_entropy(model(xtr), ytr).item()
            acc = (model(xte).argmax(1) == yte).float().mean().item()
        hp = {k: float(v) for k, v in opt.hyperparameters().items() if k in ("lr", "beta1", "beta2", "beta3",
                                                                             "c", "rho", "gamma")}
        results[name] = dict(train_loss=train_loss, test_acc=acc, seconds=time.perf_counter() - t0, **hp)
        curves[name] = rec.rows

    print(f"\ndigits, MLP 64-128-10, {args.epochs} epochs, initial lr {args.lr:g}\n")
    keys = ["lr", "beta1", "beta2", "beta3", "c", "rho", "gamma"]
    shown = [k for k in keys if any(k in r for r in results.values())]
    print(f"{'optimizer':<18}{'train loss':>11}{'test acc':>10}{'sec':>6}" + "".join(f"{k:>10}" for k in shown))
    for name, r in results.items():
        cells = "".join(f"{r[k]:>10.4g}" if k in r else f"{'':>10}" for k in shown)
        print(f"{name:<18}{r['train_loss']:>11.4f}{r['test_acc']:>10.3f}{r['seconds']:>6.1f}" + cells)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)

    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for i, (name, log) in enumerate(curves.items()):
        color = f"C{i}"
        steps = [r["step"] for r in log]
        k = 20
        loss = [sum(r["loss"] for r in log[max(0, i - k):i + 1]) / len(log[max(0, i - k):i + 1])
                for i in range(len(log))]
        axes[0].plot(steps, loss, label=name, color=color)
        axes[1].plot(steps, [r["level1.lr"] for r in log], label=name, color=color)
        if "level1.beta1" in log[0]:
            axes[2].plot(steps, [r["level1.beta1"] for r in log], label=name, color=color)
    axes[0].set(title="training loss (running mean)", xlabel="step", yscale="log")
    axes[1].set(title="learning rate", xlabel="step", yscale="log")
    axes[2].set(title="beta1", xlabel="step")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(args.out, "quickstart.png")
    fig.savefig(path, dpi=100)
    print(f"\nwrote {path} and per-step logs in {args.out}/")


if __name__ == "__main__":
    main()
