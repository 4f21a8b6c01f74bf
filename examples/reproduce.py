"""Reproductions of the papers' claims at a CPU budget, with several seeds each.

Subcommands
  stacking     Chandra et al.: taller stacks of hyper-optimizers are less sensitive to the initial
               learning rate. Initial lr 1e-5 .. 1e-1 x stack height 1..4 (1 = nothing learned),
               SGD+momentum learning lr and momentum (hyper-sgdm) and Adam learning lr, beta1,
               beta2 (hyper-adam); the 5-layer CNN on a CIFAR-10 subset. Reports the spread of
               the final test accuracy / loss across the initial lrs for each height, and plots
               the learned lr schedules.
  mada-betas   MADA poster, Figure 3: final training loss over a grid of initial (beta1, beta2) on
               a small character-level Shakespeare GPT, AdamW vs HyperAdam vs MADA.
  cifar-table  MADA poster, Table 5 at a CPU budget: 5-layer CNN on CIFAR-10, SGD+momentum vs
               Adam vs HyperAdam vs MADA, test accuracy mean +- std over seeds.
  poor-init    MADA poster, "MADA-" and "Adam-" rows: AdamW, HyperAdam and MADA from good and from
               poor initial betas, validation loss of the Shakespeare GPT.
  all          the four above, one after the other.

Every training run is one call of examples/cifar10.py's or examples/gpt2.py's main() (in this
process: importing torch once instead of once per run saves minutes), writing its log.jsonl
under OUT/runs/<run>/. A run whose result.json exists with the same arguments is skipped, so an
interrupted reproduction continues where it stopped. Each subcommand writes OUT/results.csv
(every run's final numbers), OUT/summary.json and OUT/summary.md (the aggregated tables) and PNG
plots.

    python examples/reproduce.py stacking --quick --data-dir data/cifar10       # minutes
    python examples/reproduce.py mada-betas --data-dir ../shared/data           # the full run
    python examples/reproduce.py all --quick --cifar-dir data/cifar10 --text-dir ../shared/data
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import sys
import time

import numpy as np
import torch

import hypergrad as hg

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cifar10  # noqa: E402
import common  # noqa: E402
import gpt2  # noqa: E402
import quickstart  # noqa: E402

LN10 = math.log(10)  # the loss of a uniform guess over CIFAR-10's classes
LN65 = math.log(65)  # ... and over Tiny Shakespeare's 65 characters


# ------------------------------------------------------------------------------------ runs

def _no_plots(*args, **kwargs):
    return []


_loaded: dict = {}


@contextlib.contextmanager
def _patched_examples():
    """While a reproduction runs: the examples draw no per-run PNGs (two a run, a second each; we
    draw our own summary plots), and CIFAR-10's 180 MB of decoded images are read once per process
    instead of once per run. Restored afterwards (the examples' own tests import this module)."""
    saved = common.plot, cifar10.load_cifar10
    load = cifar10.load_cifar10

    def load_once(data_dir, cache_dir):
        if data_dir not in _loaded:
            _loaded[data_dir] = load(data_dir, cache_dir)
        return _loaded[data_dir]

    common.plot, cifar10.load_cifar10 = _no_plots, load_once
    try:
        yield
    finally:
        common.plot, cifar10.load_cifar10 = saved


class digits:
    """A third training script beside cifar10.py and gpt2.py, as small as the task: scikit-learn's
    8x8 digits (1500 train / 297 test, offline) and examples/quickstart.py's MLP 64-128-10, trained
    with the optimizer that examples/common.py's flags build, logging the rows cifar10.py logs."""

    data = None

    @staticmethod
    def main(argv):
        ap = argparse.ArgumentParser()
        ap.add_argument("--epochs", type=int, default=30)
        ap.add_argument("--batch-size", type=int, default=32)
        ap.add_argument("--seed", type=int, default=0)
        ap.add_argument("--out", required=True)
        common.add_optimizer_args(ap)
        args = ap.parse_args(argv)
        torch.manual_seed(args.seed)
        if digits.data is None:
            digits.data = quickstart.load_digits("cpu", torch.float32)
        (xtr, ytr), (xte, yte) = digits.data
        model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
        opt = common.build_optimizer(list(model.parameters()), args)
        gen = torch.Generator().manual_seed(args.seed)
        log = hg.Recorder(opt, os.path.join(args.out, "log.jsonl"), groups="first")
        for epoch in range(1, args.epochs + 1):
            perm = torch.randperm(len(ytr), generator=gen)
            for i in range(0, len(ytr), args.batch_size):
                idx = perm[i:i + args.batch_size]
                loss = torch.nn.functional.cross_entropy(model(xtr[idx]), ytr[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                log.log(epoch=epoch, loss=loss)
                opt.step()
            with torch.no_grad():
                out = model(xte)
                log.write(epoch=epoch, test_loss=torch.nn.functional.cross_entropy(out, yte).item(),
                          test_acc=(out.argmax(1) == yte).float().mean().item())
        log.close()
        return log.rows


def fmt(x):
    """A compact, file-name-safe number: 1e-05, 0.9, 600."""
    return f"{x:g}"


def run(out, name, script, argv, summarize, level_ratio=common.LEVEL_RATIO):
    """Train once (or read the result of an identical earlier run): returns the run's metrics.
    level_ratio: the examples' ratio between the step sizes of consecutive levels above 2."""
    d = os.path.join(out, "runs", name)
    path = os.path.join(d, "result.json")
    if os.path.exists(path):
        with open(path) as f:
            res = json.load(f)
        if res.get("argv") == argv and res.get("level_ratio") == level_ratio:
            return res
    os.makedirs(d, exist_ok=True)
    t0 = time.perf_counter()
    # the examples print per epoch / evaluation: keep that in the run's folder, not on screen
    common.LEVEL_RATIO = level_ratio  # read by common.hyper_stack when the run builds its stack
    with open(os.path.join(d, "stdout.txt"), "w") as f, contextlib.redirect_stdout(f):
        rows = script.main(argv + ["--out", d])
    res = {"run": name, **summarize(rows), "seconds": time.perf_counter() - t0, "argv": argv,
           "level_ratio": level_ratio}
    with open(path + ".tmp", "w") as f:
        json.dump(res, f, indent=1)
    os.replace(path + ".tmp", path)  # atomic: a killed run leaves no result.json behind
    print(f"  {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in res.items()
                                    if isinstance(v, float) and not k.startswith("level")), flush=True)
    return res


def read_log(out, name):
    with open(os.path.join(out, "runs", name, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def finite(x):
    return x is not None and math.isfinite(x)


def last_hypers(train_rows):
    return {k: v for k, v in train_rows[-1].items() if k.startswith("level1.")}


def cifar_metrics(rows):
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "test_acc" in r]
    last_epoch = [r["loss"] for r in train if r["epoch"] == train[-1]["epoch"]]
    return {"test_acc": evals[-1]["test_acc"], "test_loss": evals[-1]["test_loss"],
            "train_loss": float(np.mean(last_epoch)),  # mean over the last epoch: one batch is noisy
            "curve": [e["test_acc"] for e in evals], **last_hypers(train)}


def blew_up(r):
    """A run that ends worse than a uniform guess over the 10 classes (or NaN)."""
    return not (finite(r["train_loss"]) and r["train_loss"] < LN10)


def gpt_metrics(rows):
    train = [r for r in rows if "loss" in r]
    tail = [r["loss"] for r in train[-max(1, len(train) // 10):]]
    res = {"train_loss": float(np.mean(tail)),  # the mean of the last 10% of steps' losses
           "val_loss": [r for r in rows if "val_loss" in r][-1]["val_loss"], **last_hypers(train)}
    # worse than a uniform guess at the end (or NaN): the run blew up
    res["diverged"] = not (finite(res["train_loss"]) and res["train_loss"] < LN65)
    return res


def capped(x, cap=LN65):
    """A diverged run's loss (huge or NaN) counts as a uniform guess's in means and plots."""
    return min(x, cap) if finite(x) else cap


def cifar_argv(args, optimizer, seed, lr=None, levels=1, hyper_lr=None, betas=None):
    argv = ["--data-dir", args.data_dir, "--model", "cnn5", "--epochs", str(args.epochs),
            "--batch-size", str(args.batch_size), "--seed", str(seed), "--optimizer", optimizer,
            "--levels", str(levels), "--compile", args.compile]
    if args.subset:
        argv += ["--subset", str(args.subset)]
    if lr is not None:
        argv += ["--lr", fmt(lr)]
    if hyper_lr is not None:
        argv += ["--hyper-lr", fmt(hyper_lr)]
    if betas is not None:
        argv += ["--beta1", fmt(betas[0]), "--beta2", fmt(betas[1])]
    return argv


def gpt_argv(args, optimizer, seed, betas, hyper_lr):
    # decoupled weight decay 0.1 on the matrices, as nanoGPT and the MADA paper's GPT runs
    return ["--config", "tiny", "--data", "shakespeare-char", "--data-dir", args.data_dir,
            "--steps", str(args.steps), "--batch-size", str(args.batch_size),
            "--eval-every", str(args.steps), "--eval-iters", str(args.eval_iters), "--seed", str(seed),
            "--optimizer", optimizer, "--beta1", fmt(betas[0]), "--beta2", fmt(betas[1]),
            "--weight-decay", "0.1", "--hyper-lr", fmt(hyper_lr), "--compile", args.compile,
            "--lr", fmt(args.lr)]


# ------------------------------------------------------------------------------------ tables

def mean_std(values):
    """(mean, sample std) over seeds; std 0 for a single seed."""
    v = np.asarray(values, float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pm(values, digits=4):
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def write_results(out, results, summary, table_md):
    keys = []
    for r in results:
        keys += [k for k in r if k not in keys and k not in ("argv", "curve")]
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(table_md + "\n")
    print("\n" + table_md + f"\nwrote {out}/results.csv, results.json, summary.json, summary.md")


def markdown(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    pyplot().close(fig)
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------ stacking

def stacking(args):
    """Chandra et al.: grid initial lr x stack height x seed; the spread across the initial lrs."""
    results = []
    for opt in args.optimizers:
        for h in args.heights:
            for lr in args.lrs:
                for seed in args.seed_list:
                    name = f"{opt}_h{h}_lr{fmt(lr)}_s{seed}"
                    if args.task == "cifar10":
                        script, argv = cifar10, cifar_argv(args, opt, seed, lr=lr, levels=h, hyper_lr=args.hyper_lr)
                    else:
                        script, argv = digits, ["--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                                                "--seed", str(seed), "--optimizer", opt, "--levels", str(h),
                                                "--lr", fmt(lr), "--hyper-lr", fmt(args.hyper_lr),
                                                "--compile", args.compile]
                    results.append({"optimizer": opt, "height": h, "lr0": lr, "seed": seed,
                                    **run(args.out, name, script, argv, cifar_metrics, args.level_ratio)})

    # Per seed, the spread of the final numbers across the initial lrs; then mean +- std of that
    # spread over seeds. Test losses above ln(10), a uniform guess, or NaN count as ln(10).
    def loss(r):
        return min(r["test_loss"], LN10) if finite(r["test_loss"]) else LN10

    summary, rows = [], []
    for opt in args.optimizers:
        for h in args.heights:
            cell = {"optimizer": opt, "height": h}
            for metric, get in (("test_acc", lambda r: r["test_acc"]), ("test_loss", loss)):
                per_seed = [[get(r) for r in results if (r["optimizer"], r["height"], r["seed"]) == (opt, h, s)]
                            for s in args.seed_list]
                cell[f"{metric}_std"] = mean_std([np.std(v) for v in per_seed])
                cell[f"{metric}_range"] = mean_std([np.max(v) - np.min(v) for v in per_seed])
                cell[f"{metric}_mean"] = mean_std([np.mean(v) for v in per_seed])
                cell[f"{metric}_by_lr"] = {fmt(lr): mean_std([get(r) for r in results if (
                    r["optimizer"], r["height"], r["lr0"]) == (opt, h, lr)]) for lr in args.lrs}
            cell["diverged"] = sum(blew_up(r) for r in results if (r["optimizer"], r["height"]) == (opt, h))
            summary.append(cell)
            c = lambda k, d=3: f"{cell[k][0]:.{d}f} ± {cell[k][1]:.{d}f}"  # noqa: E731
            rows.append([opt, h, c("test_acc_mean"), c("test_acc_std"), c("test_acc_range"),
                         c("test_loss_std"), c("test_loss_range"), cell["diverged"]])
    by_lr = [[s["optimizer"], s["height"]] + [f"{s['test_acc_by_lr'][fmt(lr)][0]:.3f}" for lr in args.lrs]
             for s in summary]
    md = (markdown(["optimizer", "height", "mean acc over lrs", "acc std across lrs", "acc max-min",
                    "loss std across lrs", "loss max-min", "diverged runs"], rows)
          + "\n\nDiverged: final training loss above ln 10 (a uniform guess) or NaN; their test loss counts as ln 10."
          + "\n\nFinal test accuracy per initial lr (mean over seeds):\n\n"
          + markdown(["optimizer", "height"] + [f"lr0={fmt(lr)}" for lr in args.lrs], by_lr))
    write_results(args.out, results, summary, md)
    plot_stacking(args, summary)
    return summary


def plot_stacking(args, summary):
    plt = pyplot()
    n = len(args.optimizers)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 3.6), squeeze=False)
    for ax, opt in zip(axes[0], args.optimizers):
        for s in (s for s in summary if s["optimizer"] == opt):
            m = [s["test_acc_by_lr"][fmt(lr)] for lr in args.lrs]
            ax.errorbar(args.lrs, [a for a, _ in m], [b for _, b in m], marker="o", capsize=3,
                        label=f"height {s['height']}")
        ax.set(xscale="log", xlabel="initial learning rate", ylabel="final test accuracy", title=opt)
        ax.legend(fontsize=8)
    save(fig, args.out, "stacking_accuracy.png")

    # the learned lr schedule (seed 0) for a few initial lrs, one panel per optimizer and height
    heights = [h for h in args.heights if h > 1]
    if not heights:
        return
    fig, axes = plt.subplots(n, len(heights), figsize=(4 * len(heights), 3.2 * n), squeeze=False)
    for i, opt in enumerate(args.optimizers):
        for j, h in enumerate(heights):
            ax = axes[i][j]
            for k, lr in enumerate(args.lrs):
                rows = [r for r in read_log(args.out, f"{opt}_h{h}_lr{fmt(lr)}_s{args.seed_list[0]}") if "loss" in r]
                ax.plot([r["step"] for r in rows], [r["level1.lr"] for r in rows], color=f"C{k}",
                        label=f"lr0={fmt(lr)}")
            ax.set(yscale="log", xlabel="step", title=f"{opt}, height {h}: level-1 lr")
            ax.legend(fontsize=7)
    save(fig, args.out, "stacking_lr_schedules.png")


# ------------------------------------------------------------------------------------ MADA betas

def mada_betas(args):
    """Poster Figure 3: final training loss over the grid of initial (beta1, beta2)."""
    results = []
    for opt in args.optimizers:
        for b1 in args.beta1s:
            for b2 in args.beta2s:
                for seed in args.seed_list:
                    name = f"{opt}_b1{fmt(b1)}_b2{fmt(b2)}_s{seed}"
                    argv = gpt_argv(args, opt, seed, (b1, b2), args.hyper_lr)
                    results.append({"optimizer": opt, "beta1": b1, "beta2": b2, "seed": seed,
                                    **run(args.out, name, gpt2, argv, gpt_metrics)})
    # Diverged runs (see gpt_metrics) count as ln(65), a uniform guess, and are counted.
    summary, rows = [], []
    for opt in args.optimizers:
        cell = {"optimizer": opt, "grid": {}}
        for b1 in args.beta1s:
            for b2 in args.beta2s:
                rs = [r for r in results if (r["optimizer"], r["beta1"], r["beta2"]) == (opt, b1, b2)]
                cell["grid"][f"{fmt(b1)},{fmt(b2)}"] = {
                    "train_loss": mean_std([capped(r["train_loss"]) for r in rs]),
                    "val_loss": mean_std([capped(r["val_loss"]) for r in rs]),
                    "diverged": sum(r["diverged"] for r in rs),
                    "final_beta1": mean_std([r.get("level1.beta1", b1) for r in rs]),
                    "final_beta2": mean_std([r.get("level1.beta2", b2) for r in rs])}
        # per seed: the mean over the grid, its worst and best cells, worst - best
        per_seed = [[capped(r["train_loss"]) for r in results if r["optimizer"] == opt and r["seed"] == s]
                    for s in args.seed_list]
        stats = {"grid_mean": [np.mean(v) for v in per_seed], "grid_worst": [np.max(v) for v in per_seed],
                 "grid_best": [np.min(v) for v in per_seed], "grid_range": [np.ptp(v) for v in per_seed]}
        cell.update({k: mean_std(v) for k, v in stats.items()})
        cell["diverged"] = sum(r["diverged"] for r in results if r["optimizer"] == opt)
        summary.append(cell)
        rows.append([opt] + [pm(v) for v in stats.values()] + [cell["diverged"]])
    grid_rows = []
    for b1 in args.beta1s:
        for b2 in args.beta2s:
            cells = [s["grid"][f"{fmt(b1)},{fmt(b2)}"] for s in summary]
            grid_rows.append([fmt(b1), fmt(b2)]
                             + [f"{g['train_loss'][0]:.3f} ± {g['train_loss'][1]:.3f}" + "†" * (g["diverged"] > 0)
                                for g in cells]
                             + [f"{g['final_beta1'][0]:.3f}, {g['final_beta2'][0]:.3f}"
                                for s, g in zip(summary, cells) if s["optimizer"] != "adamw"])
    md = (markdown(["optimizer", "mean over grid", "worst cell", "best cell", "worst - best", "diverged runs"], rows)
          + "\n\nFinal training loss per initial (beta1, beta2), mean ± std over seeds († some seeds diverged "
            "and count as ln 65); learned (beta1, beta2) at the end:\n\n"
          + markdown(["beta1", "beta2"] + [s["optimizer"] for s in summary]
                     + [f"{s['optimizer']} final betas" for s in summary if s["optimizer"] != "adamw"], grid_rows))
    write_results(args.out, results, summary, md)

    plt = pyplot()
    grids = [np.array([[s["grid"][f"{fmt(b1)},{fmt(b2)}"]["train_loss"][0] for b2 in args.beta2s]
                       for b1 in args.beta1s]) for s in summary]
    # colours span the best cell .. best + 0.5 (a diverged cell would flatten everything else)
    lo = min(g.min() for g in grids)
    hi = min(max(g.max() for g in grids), lo + 0.5)
    fig, axes = plt.subplots(1, len(summary), figsize=(3.3 * len(summary) + 1, 3.4), squeeze=False,
                             constrained_layout=True)
    for k, (ax, s, g) in enumerate(zip(axes[0], summary, grids)):
        im = ax.imshow(g, origin="lower", vmin=lo, vmax=hi, cmap="viridis_r")
        for i in range(len(args.beta1s)):
            for j in range(len(args.beta2s)):
                ax.text(j, i, f"{g[i, j]:.3f}", ha="center", va="center", fontsize=8,
                        color="white" if g[i, j] > (lo + hi) / 2 else "black")
        ax.set(xticks=range(len(args.beta2s)), xticklabels=[fmt(b) for b in args.beta2s],
               yticks=range(len(args.beta1s)), yticklabels=[fmt(b) for b in args.beta1s],
               xlabel="initial beta2", ylabel="initial beta1" if k == 0 else None, title=s["optimizer"])
    fig.colorbar(im, ax=list(axes[0]), shrink=0.9, extend="max", label="final training loss")
    fig.savefig(os.path.join(args.out, "mada_betas.png"), dpi=80)
    plt.close(fig)
    print(f"wrote {args.out}/mada_betas.png")
    return summary


# ------------------------------------------------------------------------------------ CIFAR table

# The poster's Table 5 (5-layer CNN), from /work/shared/reference/peers.md
POSTER_CNN5 = {"sgdm": "65.97 ± 0.94", "adam": "65.84 ± 0.11", "hyperadam": "65.80 ± 0.21", "mada": "66.12 ± 0.14"}
TABLE_ROWS = {  # row -> (optimizer flag, initial betas or momentum, label)
    "sgdm": ("sgdm", None, "SGD + momentum 0.9, lr 0.05"),
    "adam": ("adam", (0.9, 0.95), "Adam (0.9, 0.95), lr 1e-3"),
    "adam-0.999": ("adam", (0.9, 0.999), "Adam (0.9, 0.999), lr 1e-3, torch's default betas"),
    "hyperadam": ("hyperadam", (0.9, 0.95), "HyperAdam from (0.9, 0.95), lr 1e-3"),
    "mada": ("mada", (0.9, 0.95), "MADA from Adam (0.9, 0.95), lr 1e-3"),
}


def cifar_table(args):
    results = []
    for row in args.rows:
        opt, betas, _ = TABLE_ROWS[row]
        for seed in args.seed_list:
            argv = cifar_argv(args, opt, seed, levels=2, hyper_lr=args.hyper_lr, betas=betas)
            results.append({"row": row, "seed": seed, **run(args.out, f"{row}_s{seed}", cifar10, argv, cifar_metrics)})
    summary, rows = [], []
    for row in args.rows:
        rs = [r for r in results if r["row"] == row]
        acc = [100 * r["test_acc"] for r in rs]
        learned = {k: mean_std([r[k] for r in rs]) for k in ("level1.beta1", "level1.beta2", "level1.beta3",
                                                              "level1.c", "level1.rho", "level1.gamma")
                   if row in ("hyperadam", "mada") and k in rs[0]}
        summary.append({"row": row, "test_acc": mean_std(acc), "train_loss": mean_std([r["train_loss"] for r in rs]),
                        "seconds": mean_std([r["seconds"] for r in rs]), "learned": learned})
        rows.append([TABLE_ROWS[row][2], pm(acc, 2), POSTER_CNN5.get(row, "-"),
                     pm([r["train_loss"] for r in rs], 3), f"{np.mean([r['seconds'] for r in rs]):.0f}",
                     ", ".join(f"{k[7:]} {m:.3f}" for k, (m, _) in learned.items()) or "-"])
    md = markdown(["optimizer", "test acc % (ours)", "test acc % (poster)", "final train loss", "s / run",
                   "learned coefficients at the end"], rows)
    write_results(args.out, results, summary, md)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for i, row in enumerate(args.rows):
        curves = np.array([r["curve"] for r in results if r["row"] == row]) * 100
        ep = np.arange(1, curves.shape[1] + 1)
        ax.errorbar(ep, curves.mean(0), curves.std(0, ddof=1) if len(curves) > 1 else None,
                    marker="o", capsize=3, label=row, color=f"C{i}")
    ax.set(xlabel="epoch", ylabel="test accuracy (%)", title="CIFAR-10, 5-layer CNN")
    ax.legend(fontsize=8)
    save(fig, args.out, "cifar_table.png")
    return summary


# ------------------------------------------------------------------------------------ poor init

def poor_init(args):
    """Poster's MADA- / Adam- rows: the same optimizers from good and from poor initial betas."""
    inits = {"good": tuple(args.good_betas)}
    inits.update({"poor" if i == 0 else f"poor{i + 1}": tuple(b) for i, b in enumerate(args.poor_betas)})
    results = []
    for opt in args.optimizers:
        for init, betas in inits.items():
            for seed in args.seed_list:
                argv = gpt_argv(args, opt, seed, betas, args.hyper_lr)
                results.append({"optimizer": opt, "init": init, "seed": seed,
                                **run(args.out, f"{opt}_{init}_s{seed}", gpt2, argv, gpt_metrics)})
    label = {"adamw": "AdamW", "hyperadam": "HyperAdam", "mada": "MADA"}
    summary, rows = [], []
    for init in inits:
        for opt in args.optimizers:
            rs = [r for r in results if (r["optimizer"], r["init"]) == (opt, init)]
            cell = {"optimizer": opt, "init": init, "betas": inits[init],
                    "val_loss": mean_std([capped(r["val_loss"]) for r in rs]),
                    "train_loss": mean_std([capped(r["train_loss"]) for r in rs]),
                    "diverged": sum(r["diverged"] for r in rs),
                    "final_beta1": mean_std([r.get("level1.beta1", inits[init][0]) for r in rs]),
                    "final_beta2": mean_std([r.get("level1.beta2", inits[init][1]) for r in rs])}
            summary.append(cell)
            rows.append([label.get(opt, opt) + ("⁻" if init.startswith("poor") else ""), f"{inits[init]}",
                         pm([capped(r["val_loss"]) for r in rs]), pm([capped(r["train_loss"]) for r in rs]),
                         f"{cell['final_beta1'][0]:.3f}, {cell['final_beta2'][0]:.3f}", cell["diverged"]])
    md = markdown(["optimizer", "initial (beta1, beta2)", "val loss", "final train loss",
                   "final (beta1, beta2)", "diverged runs (count as ln 65)"], rows)
    write_results(args.out, results, summary, md)

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, opt in enumerate(args.optimizers):
        for init, style in zip(inits, ("-", "--", ":", "-.")):
            logs = [[r for r in read_log(args.out, f"{opt}_{init}_s{s}") if "loss" in r] for s in args.seed_list]
            steps = [r["step"] for r in logs[0]]
            loss = np.mean([[capped(r["loss"]) for r in log] for log in logs], 0)
            k = max(1, len(loss) // 30)  # running mean over ~3% of the run
            smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
            axes[0].plot(steps[k - 1:], smooth, style, color=f"C{i}", label=f"{label.get(opt, opt)} {init}")
            if opt != "adamw":
                for ax, key in ((axes[1], "level1.beta1"), (axes[2], "level1.beta2")):
                    ax.plot(steps, np.mean([[r[key] for r in log] for log in logs], 0), style,
                            color=f"C{i}", label=f"{label.get(opt, opt)} {init}")
    axes[0].set(xlabel="step", ylabel="training loss (running mean, mean of seeds)", yscale="log")
    axes[1].set(xlabel="step", title="beta1 (mean of seeds)")
    axes[2].set(xlabel="step", title="beta2 (mean of seeds)")
    for ax in axes:
        ax.legend(fontsize=7)
    save(fig, args.out, "poor_init.png")
    return summary


# ------------------------------------------------------------------------------------ CLI

# Full budgets, and the --quick ones (minutes). Flags given on the command line override both.
FULL = {
    "stacking": dict(lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], heights=[1, 2, 3, 4], optimizers=["hyper-sgdm", "hyper-adam"]),
    "stacking digits": dict(epochs=30, batch_size=32),
    "stacking cifar10": dict(subset=10000, epochs=3, batch_size=128),
    "mada-betas": dict(steps=600, beta1s=[0.5, 0.7, 0.9, 0.99], beta2s=[0.6, 0.8, 0.95],
                       optimizers=["adamw", "hyperadam", "mada"]),
    "cifar-table": dict(subset=None, epochs=3, batch_size=128, rows=list(TABLE_ROWS)),
    "poor-init": dict(steps=1200, optimizers=["adamw", "hyperadam", "mada"]),
}
QUICK = {
    "stacking": dict(lrs=[1e-5, 1e-3, 1e-1], optimizers=["hyper-sgdm"], seeds=1),
    "stacking digits": dict(epochs=10),
    "stacking cifar10": dict(subset=2000, epochs=1),
    "mada-betas": dict(steps=150, beta1s=[0.5, 0.9], beta2s=[0.6, 0.95], seeds=1),
    "cifar-table": dict(subset=2000, epochs=1, rows=["sgdm", "adam", "hyperadam", "mada"], seeds=2),
    "poor-init": dict(steps=200, seeds=1),
}


def floats(s):
    return [float(x) for x in s.split(",")]


def ints(s):
    return [int(x) for x in s.split(",")]


def words(s):
    return s.split(",")


def add_common(p, data_help, data_default):
    p.add_argument("--quick", action="store_true", help="a small budget that runs in minutes")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3; --quick: fewer)")
    p.add_argument("--first-seed", type=int, default=0, help="the seeds are first-seed, first-seed + 1, ...")
    p.add_argument("--data-dir", default=data_default, help=f"{data_help} (default {data_default})")
    p.add_argument("--out", default=None, help="output directory (default runs/reproduce/<subcommand>)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--compile", default="off", choices=("auto", "on", "off"),
                   help="the examples' --compile; off (default): these models are small, and a run "
                        "should not spend its first seconds compiling")


def add_cifar(p):
    add_common(p, "CIFAR-10 in a format examples/cifar10.py accepts", "data/cifar10")
    p.add_argument("--subset", type=int, default=None, help="train on the first N training images")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)


def add_gpt(p):
    add_common(p, "directory holding tinyshakespeare.txt", "data")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-iters", type=int, default=20, help="batches in the final validation loss")
    p.add_argument("--lr", type=float, default=3e-3,
                   help="constant learning rate (default 3e-3: the best of 1e-3, 3e-3, 1e-2 for AdamW in a pilot)")
    p.add_argument("--optimizers", type=words, default=None)
    p.add_argument("--hyper-lr", type=float, default=1e-2,
                   help="level-2 lr for beta1; beta2 gets 0.1x, MADA's other coefficients 10x (examples/common.py)"
                        " (default 1e-2: the best of 1e-4, 1e-3, 1e-2 for MADA from (0.9, 0.95) in a pilot)")


def parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("stacking", help="Chandra et al.: stack height vs sensitivity to the initial lr")
    add_cifar(p)
    p.add_argument("--task", default="digits", choices=("digits", "cifar10"),
                   help="digits (default): MLP on scikit-learn's digits, 30 epochs of 47 steps, seconds per run; "
                        "cifar10: the 5-layer CNN on a CIFAR-10 subset (--data-dir), a minute or more per run")
    p.add_argument("--lrs", type=floats, default=None, help="initial lrs, comma-separated")
    p.add_argument("--heights", type=ints, default=None, help="stack heights, comma-separated")
    p.add_argument("--optimizers", type=words, default=None, help="hyper-sgdm,hyper-adam")
    p.add_argument("--hyper-lr", type=float, default=1e-4, help="level-2 lr (default 1e-4)")
    p.add_argument("--level-ratio", type=float, default=1e-2,
                   help="level k > 2 steps with hyper-lr * ratio^(k-2) (examples/common.py's LEVEL_RATIO, "
                        f"{common.LEVEL_RATIO:g} there); default 1e-2, the ratio that helped of 1, 1e-2, 1e-4 "
                        "(docs/results.md): with 1 the upper levels are unstable, with 1e-4 they barely move")
    p = sub.add_parser("mada-betas", help="MADA poster Figure 3: grid of initial (beta1, beta2)")
    add_gpt(p)
    p.add_argument("--beta1s", type=floats, default=None)
    p.add_argument("--beta2s", type=floats, default=None)
    p = sub.add_parser("cifar-table", help="MADA poster Table 5: 5-layer CNN on CIFAR-10")
    add_cifar(p)
    p.add_argument("--rows", type=words, default=None, help=f"some of {','.join(TABLE_ROWS)}")
    p.add_argument("--hyper-lr", type=float, default=1e-2,
                   help="level-2 lr of HyperAdam and MADA, scaled per coefficient as in examples/common.py "
                        "(default 1e-2, as for the GPT runs; 1e-4, 1e-3, 1e-2 were within noise in a pilot)")
    p = sub.add_parser("poor-init", help="MADA poster: MADA- and Adam- rows, poor initial betas")
    add_gpt(p)
    p.add_argument("--good-betas", type=floats, default=[0.9, 0.95], help="default 0.9,0.95")
    p.add_argument("--poor-betas", type=floats, nargs="+", default=[[0.9, 0.6], [0.99, 0.6]],
                   help="one or more poor initial (beta1, beta2): default 0.9,0.6 (beta2 far too small: AdamW "
                        "loses 0.3 nats in the pilot) and 0.99,0.6 (also beta1 > sqrt(beta2): AdamW blows up)")
    p = sub.add_parser("all", help="the four reproductions one after the other")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seeds", type=int, default=None)
    p.add_argument("--cifar-dir", default="data/cifar10")
    p.add_argument("--text-dir", default="data", help="directory holding tinyshakespeare.txt")
    p.add_argument("--out", default="runs/reproduce", help="parent of the four output directories")
    return ap


COMMANDS = {"stacking": stacking, "mada-betas": mada_betas, "cifar-table": cifar_table, "poor-init": poor_init}


def main(argv=None):
    args = parser().parse_args(argv)
    if args.cmd == "all":
        out = {}
        for cmd in COMMANDS:
            sub = [cmd, "--data-dir", args.cifar_dir if cmd in ("stacking", "cifar-table") else args.text_dir,
                   "--out", os.path.join(args.out, cmd)] + (["--quick"] if args.quick else [])
            out[cmd] = main(sub + (["--seeds", str(args.seeds)] if args.seeds else []))
        return out
    budget = {"seeds": 3, **FULL[args.cmd], **(QUICK[args.cmd] if args.quick else {})}
    if args.cmd == "stacking":
        task = f"stacking {args.task}"
        budget.update({**FULL[task], **(QUICK[task] if args.quick else {})})
    for k, v in budget.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.seed_list = list(range(args.first_seed, args.first_seed + args.seeds))
    args.out = args.out or os.path.join("runs", "reproduce", args.cmd)
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"{args.cmd}: {json.dumps({k: v for k, v in vars(args).items() if k != 'cmd'})}", flush=True)
    with _patched_examples():
        summary = COMMANDS[args.cmd](args)
    print(f"{args.cmd}: {time.perf_counter() - t0:.0f} s")
    return summary


if __name__ == "__main__":
    main()
