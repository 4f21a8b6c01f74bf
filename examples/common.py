"""Shared by examples/cifar10.py and examples/gpt2.py: the --optimizer/--levels/--hyper-lr
flags and the stacks they build, plots of the hg.Recorder log, a summary table, and an optional
tqdm progress bar."""

from __future__ import annotations

import os

import torch

import hypergrad as hg
from parameterized import COEFFICIENTS, MADA, HyperAdam

OPTIMIZERS = ("sgdm", "adam", "adamw", "hyperadam", "mada", "hyper-sgdm", "hyper-adam")
SGD_LIKE = ("sgdm", "hyper-sgdm")

# Each hyperparameter moves on its own scale, so level 2 gives each its own rate, relative to
# --hyper-lr: beta2 sits close to 1 and is very sensitive, MADA's interpolation coefficients
# live in [0, 1] and need larger steps to move at all within a short run.
RELATIVE_HYPER_LR = {"lr": 1.0, "momentum": 1.0, "beta1": 1.0, "beta2": 0.1,
                     "beta3": 10.0, "c": 10.0, "rho": 10.0, "gamma": 10.0}
# Each level above 2 steps the learning rates of the level below with a rate this many times
# smaller than theirs (as examples/quickstart.py: 1e-4, then 1e-8).
LEVEL_RATIO = 1e-4


def add_optimizer_args(ap, default="mada"):
    g = ap.add_argument_group("optimizer")
    g.add_argument("--optimizer", default=default, choices=OPTIMIZERS,
                   help="sgdm/adam/adamw: torch.optim's, nothing learned; hyperadam: AdamW learning "
                        "beta1, beta2; mada: MADA learning its 6 coefficients; hyper-sgdm: SGD "
                        "learning lr and momentum; hyper-adam: Adam learning lr, beta1, beta2 "
                        f"(default {default})")
    g.add_argument("--levels", type=int, default=2,
                   help="stack height of the hyper optimizers (sgdm/adam/adamw ignore it): 1 learns "
                        "nothing, 2 adds one SGD level, each further level learns the learning rates "
                        f"of the one below with {LEVEL_RATIO:g} times theirs (default 2)")
    scaled = ", ".join(f"{k} x{v:g}" for k, v in RELATIVE_HYPER_LR.items() if v != 1)
    g.add_argument("--hyper-lr", type=float, default=1e-4,
                   help=f"lr of level 2 for lr, momentum, beta1; the others scale it: {scaled} (default 1e-4)")
    g.add_argument("--hyper-warmup", type=int, default=0, help="steps before the first hyper-step")
    g.add_argument("--hypergrad-clip", type=float, default=10.0,
                   help="clip each hyper-gradient to this norm before the level above uses it, on "
                        "every level, so one odd batch cannot throw a hyperparameter far (default 10; "
                        "0: no clipping)")
    g.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default: 0.05 for the SGD ones, the script's Adam lr else)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="coupled (L2) for sgdm/adam/hyper-*, decoupled for adamw/hyperadam/mada")
    g.add_argument("--beta1", type=float, default=0.9, help="beta1, or the momentum of the SGD ones")
    g.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="fused compiled kernels for our optimizers' steps: auto (default) compiles param "
                        "groups of 65536+ elements on first use (seconds, cached on disk), on/off force it")
    g.add_argument("--beta2", type=float, default=None,
                   help="beta2 (default: 0.999 for adam/adamw/hyper-adam, 0.95 for hyperadam/mada, "
                        "whose learned beta2 must stay in [0.501, 0.99])")


def default_lr(args, adam_lr=1e-3):
    if args.lr is not None:
        return args.lr
    return 0.05 if args.optimizer in SGD_LIKE else adam_lr


def build_optimizer(params, args, adam_lr=1e-3):
    """The optimizer (the bottom level of a stack for the hyper ones) that the flags ask for."""
    if args.levels < 1:
        raise SystemExit(f"error: --levels must be at least 1, got {args.levels}")
    name, lr, wd, b1 = args.optimizer, default_lr(args, adam_lr), args.weight_decay, args.beta1
    b2 = args.beta2 if args.beta2 is not None else (0.95 if name in ("hyperadam", "mada") else 0.999)
    # the baselines are torch's own implementations, at torch's speed
    if name == "sgdm":
        return torch.optim.SGD(params, lr=lr, momentum=b1, weight_decay=wd)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(b1, b2), weight_decay=wd)
    learn = {"hyperadam": ("beta1", "beta2"), "mada": COEFFICIENTS,
             "hyper-sgdm": ("lr", "momentum"), "hyper-adam": ("lr", "beta1", "beta2")}[name]
    kw = {"compile": {"auto": "auto", "on": True, "off": False}[getattr(args, "compile", "auto")]}
    if args.levels > 1:
        clip = args.hypergrad_clip or None
        kw.update(hyper=hyper_stack(learn, args.hyper_lr, args.levels, clip), learn=learn,
                  hyper_warmup=args.hyper_warmup, hypergrad_clip=clip)
        groups = params if isinstance(params, list) and params and isinstance(params[0], dict) else None
        if groups and len(groups) > 1:
            # param groups that differ only in weight decay learn one value together
            kw["scope"] = {n: "shared" for n in learn}
    if name == "hyperadam":
        return HyperAdam(params, lr=lr, betas=(b1, b2), weight_decay=wd, **kw)
    if name == "mada":
        return MADA(params, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, **kw)
    if name == "hyper-sgdm":
        return hg.SGD(params, lr=lr, momentum=b1, weight_decay=wd, **kw)
    return hg.Adam(params, lr=lr, betas=(b1, b2), weight_decay=wd, **kw)


def hyper_stack(learn, hyper_lr, levels, clip=None):
    """Levels 2..levels, built top-down (each takes the one above as its hyper=)."""
    top = None
    for k in range(levels, 2, -1):
        top = hg.SGD(lr=hyper_lr * LEVEL_RATIO ** (k - 2), hyper=top,
                     hypergrad_clip=clip if k < levels else None)
    per_name = {n: hyper_lr * RELATIVE_HYPER_LR.get(n, 1.0) for n in learn}
    return hg.SGD(lr=hyper_lr, per_name=per_name, hyper=top, hypergrad_clip=clip if top else None)


def learned_names(opt):
    """Keys of the recorder's rows (hg.Recorder) that some level learns (what the summary shows)."""
    out = []
    for k, lvl in enumerate(getattr(opt, "levels", [opt]), 1):
        if isinstance(lvl, hg.HyperOptimizer) and lvl.hyper is not None:
            out += [f"level{k}.{n}" for n in lvl.learned]
    return out


def progress(iterable, enabled=True, **kw):
    """A tqdm bar where tqdm is installed (and stderr is a terminal), the iterable itself else."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, disable=None if enabled else True, dynamic_ncols=True, **kw)


def say(msg):
    """print() that does not break a tqdm bar."""
    try:
        from tqdm.auto import tqdm
        tqdm.write(msg)
    except ImportError:
        print(msg)


def plot(rows, out, title, eval_keys=("val_loss",)):
    """loss.png (training loss, running mean, and the eval_keys) and hyperparameters.png (one
    panel per hyperparameter that changed, or the level-1 lr where none did) in out/."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plots)")
        return []
    train = [r for r in rows if "loss" in r]
    if not train:
        return []
    steps, loss, k = [r["step"] for r in train], [r["loss"] for r in train], 20
    smooth = [sum(loss[max(0, i - k):i + 1]) / len(loss[max(0, i - k):i + 1]) for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, loss, alpha=0.3, color="C0")
    ax.plot(steps, smooth, color="C0", label="train loss (running mean)")
    for i, key in enumerate(eval_keys, 1):
        ev = [r for r in rows if key in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r[key] for r in ev], "o-", color=f"C{i}", label=key)
    ax.set(title=title, xlabel="step", yscale="log")
    ax.legend()
    fig.tight_layout()
    paths = [os.path.join(out, "loss.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)

    path = os.path.join(out, "hyperparameters.png")  # the values that changed, every level
    hg.plot_trajectories(train, path, title=title)
    paths.append(path)
    return paths


def summary(rows, opt, extra):
    """A two-column table of the final numbers and the final learned hyperparameters."""
    train = [r for r in rows if "loss" in r]
    table = dict(extra)
    for n in learned_names(opt):
        if train and n in train[-1]:
            table[f"{n} (start -> end)"] = f"{train[0][n]:.4g} -> {train[-1][n]:.4g}"
    w = max(len(k) for k in table)
    return "\n".join(f"{k:<{w}}  {v:.4g}" if isinstance(v, float) else f"{k:<{w}}  {v}"
                     for k, v in table.items())
