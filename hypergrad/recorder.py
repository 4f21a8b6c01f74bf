"""Observability: a recorder that logs every level's hyperparameters and hyper-gradients after
each optimizer step, and a plot helper for their trajectories.

>>> rec = hg.Recorder(opt, "runs/exp1/hyper.jsonl")        # or .csv; tensorboard="runs/exp1/tb"
>>> for x, y in loader:
...     loss = loss_fn(model(x), y)
...     opt.zero_grad(); loss.backward()
...     rec.log(loss=loss)         # joins the row that the coming step writes
...     opt.step()                 # a step post-hook records the hyperparameters
>>> rec.write(val_loss=0.42)       # a row of its own, stamped with the current step
>>> rec.close()
>>> hg.plot_trajectories(rec.rows, "runs/exp1/hyper.png")

Row keys: ``step``; ``level{k}.{name}`` for the value of hyperparameter ``name`` at level ``k``
(1 = the optimizer of the model) and ``level{k}.{name}.hypergrad`` for its last hyper-gradient
d f_t / d q; ``steps_skipped`` and ``level{k}.hyper_steps_skipped``, the skip counters; plus what
``log`` adds. A level with several param groups tags the names of groups other than the first
(level 1: ``[g1]``, ``[g2]``, ...; a hyper level: the hyperparameter of the level below that the
group learns, ``level2.lr[beta1]``); ``groups="first"`` logs the first group only. A
hyperparameter with one value per tensor or per element is logged as ``.mean``, ``.min`` and
``.max``.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Iterable

import torch
from torch import Tensor


def _is_hyper(lvl) -> bool:
    return hasattr(lvl, "hypergradients") and hasattr(lvl, "levels")


def _torch_hypers(group: dict) -> dict:
    """A torch.optim group's numeric hyperparameters, named as hypergrad names them."""
    out = {}
    for k in ("lr", "momentum", "dampening", "alpha", "rho", "lr_decay", "eps", "weight_decay"):
        if k in group and isinstance(group[k], (int, float, Tensor)) and not isinstance(group[k], bool):
            out[k] = group[k]
    if "betas" in group:
        for i, b in enumerate(group["betas"], 1):
            out[f"beta{i}"] = b
    return out


def _default_enabled() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


class Recorder:
    """Records the hyperparameters (and hyper-gradients) of every level of ``optimizer`` after
    each of its steps, through a step post-hook.

    Args:
        optimizer: a hypergrad optimizer (the bottom level of a stack: every level above is
            recorded too), an ``hg.wrap`` optimizer, or any torch.optim optimizer (its group
            values: lr, betas, momentum, ...; useful for baselines).
        path: ``*.jsonl`` (one JSON object per line, flushed as written: a crashed run keeps its
            log) or ``*.csv`` (one column per key; a key that first appears later rewrites the
            file with the wider header). None: rows are kept in memory only.
        every: record every ``every``-th step (values logged with ``log`` in between are
            dropped with the unrecorded steps' rows).
        hypergradients: also record the last hyper-gradient of every learned hyperparameter.
        groups: ``"all"`` (default) or ``"first"``: which param groups of each level.
        tensorboard: a ``torch.utils.tensorboard.SummaryWriter``, or a log directory to create
            one in; every numeric key is written with ``add_scalar`` at the row's step. Needs the
            ``tensorboard`` package.
        keep: keep the rows in ``self.rows`` (for plots); False keeps none in memory (a CSV file
            then cannot widen its header: keys that appear later are refused).
        enabled: False records nothing. Default: True except on ranks other than 0 of an
            initialized torch.distributed job (hyperparameters are the same on every rank).

    One host synchronization per recorded step: the values of a level are gathered into one
    tensor per device before they are read.
    """

    def __init__(self, optimizer, path: str | os.PathLike | None = None, *, every: int = 1,
                 hypergradients: bool = True, groups: str = "all", tensorboard=None, keep: bool = True,
                 enabled: bool | None = None):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"Recorder: every must be a positive integer, got {every!r}")
        if groups not in ("all", "first"):
            raise ValueError(f"Recorder: groups must be 'all' or 'first', got {groups!r}")
        path = None if path is None else os.fspath(path)
        if path is not None and not path.endswith((".jsonl", ".csv")):
            raise ValueError(f"Recorder: path must end in .jsonl or .csv, got {path!r}")
        if path is not None and path.endswith(".csv") and not keep:
            raise ValueError("Recorder: a .csv log needs keep=True (a key that appears later rewrites the file)")
        if not hasattr(optimizer, "register_step_post_hook"):
            raise TypeError(f"Recorder: {type(optimizer).__name__} has no register_step_post_hook; "
                            f"expected a torch.optim.Optimizer or a hypergrad optimizer")
        self.optimizer = optimizer
        self.path = path
        self.every = every
        self.with_hypergradients = hypergradients
        self.groups = groups
        self.keep = keep
        self.enabled = _default_enabled() if enabled is None else bool(enabled)
        self.rows: list[dict] = []
        self.step = 0
        self._pending: dict = {}
        self._file = None
        self._csv_keys: list[str] | None = None
        self._writer = None
        self._own_writer = False
        if self.enabled and tensorboard is not None:
            if isinstance(tensorboard, (str, os.PathLike)):
                try:
                    from torch.utils.tensorboard import SummaryWriter
                except ImportError as e:
                    raise ImportError("Recorder(tensorboard=...) needs the tensorboard package "
                                      "(pip install tensorboard)") from e
                self._writer = SummaryWriter(os.fspath(tensorboard))
                self._own_writer = True
            elif hasattr(tensorboard, "add_scalar"):
                self._writer = tensorboard
            else:
                raise TypeError(f"Recorder: tensorboard must be a SummaryWriter or a directory, got "
                                f"{type(tensorboard).__name__}")
        if self.enabled and path is not None:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._file = open(path, "w", newline="")
        self._handle = optimizer.register_step_post_hook(self._on_step)

    # ------------------------------------------------------------------ user side
    def log(self, **scalars) -> None:
        """Add scalars (numbers or one-element tensors, read at the step: no extra host sync)
        to the row that the next step writes."""
        if self.enabled:
            self._pending.update(scalars)

    def write(self, **scalars) -> dict | None:
        """Write a row of its own now (evaluation metrics, say), stamped with the current step."""
        if not self.enabled:
            return None
        row = {"step": self.step, **_to_floats(scalars)}
        self._emit(row)
        return row

    def snapshot(self) -> dict:
        """The row the recorder would write now (hyperparameters, hyper-gradients, skip counts),
        without writing it."""
        return {"step": self.step, **_to_floats(self._values())}

    def close(self) -> None:
        """Remove the hook and close the file (and a SummaryWriter the recorder created)."""
        self._handle.remove()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.flush()
            if self._own_writer:
                self._writer.close()
            self._writer = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ the hook
    def _on_step(self, optimizer, args, kwargs) -> None:
        self.step += 1
        if not self.enabled:
            return
        pending, self._pending = self._pending, {}
        if self.step % self.every:
            return
        self._emit({"step": self.step, **_to_floats({**pending, **self._values()})})

    def _values(self) -> dict:
        opt = self.optimizer
        out: dict = {}
        levels = opt.levels if _is_hyper(opt) else [opt]
        for k, lvl in enumerate(levels, 1):
            groups = range(len(lvl.param_groups)) if self.groups == "all" else range(min(1, len(lvl.param_groups)))
            for gi in groups:
                group = lvl.param_groups[gi]
                if k > 1 and "hyper_of" in group:
                    tag = f"[{group['hyper_of']}]" if len(lvl.param_groups) > 1 else ""
                else:
                    tag = f"[g{gi}]" if gi else ""
                if not _is_hyper(lvl):
                    for n, v in _torch_hypers(group).items():
                        out[f"level{k}.{n}{tag}"] = v
                    continue
                values = lvl.hyperparameters(gi)
                grads = lvl.hypergradients(gi) if self.with_hypergradients and lvl.hyper is not None else {}
                for n, v in values.items():
                    _put(out, f"level{k}.{n}{tag}", v)
                    g = grads.get(n)
                    if isinstance(g, (list, tuple)):  # before the first hyper-gradient: None
                        g = [x for x in g if x is not None] or None
                    if g is not None:
                        _put(out, f"level{k}.{n}{tag}.hypergrad", g)
            if _is_hyper(lvl):
                if k == 1:
                    out["steps_skipped"] = lvl.steps_skipped
                if lvl.hyper is not None:
                    out[f"level{k}.hyper_steps_skipped"] = lvl.hyper_steps_skipped
        return out

    def _emit(self, row: dict) -> None:
        if self.keep:
            self.rows.append(row)
        if self._file is not None:
            if self.path.endswith(".jsonl"):
                self._file.write(json.dumps(row) + "\n")
            else:
                self._write_csv(row)
            self._file.flush()
        if self._writer is not None:
            for key, v in row.items():
                if key != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._writer.add_scalar(key, v, row["step"])

    def _write_csv(self, row: dict) -> None:
        new = [k for k in row if self._csv_keys is None or k not in self._csv_keys]
        if new:  # a wider header: write the file again (rare: once per new key)
            self._csv_keys = (self._csv_keys or []) + new
            self._file.seek(0)
            self._file.truncate()
            w = csv.DictWriter(self._file, self._csv_keys)
            w.writeheader()
            w.writerows(self.rows if self.keep else [row])
        else:
            csv.DictWriter(self._file, self._csv_keys).writerow(row)


def _put(out: dict, key: str, v) -> None:
    """A single value as is; several (per-tensor and per-element scopes) as mean, min and max."""
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            v = v[0]
        else:
            flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in v])
            out[f"{key}.mean"], out[f"{key}.min"], out[f"{key}.max"] = flat.mean(), flat.min(), flat.max()
            return
    if isinstance(v, Tensor) and v.numel() != 1:
        flat = v.detach().reshape(-1).to(torch.float64)
        out[f"{key}.mean"], out[f"{key}.min"], out[f"{key}.max"] = flat.mean(), flat.min(), flat.max()
        return
    out[key] = v


def _to_floats(values: dict) -> dict:
    """Numbers and one-element tensors to Python floats (ints stay ints), with one device-to-host
    copy per device for all the tensors; anything else (strings) as is."""
    tensors: dict[torch.device, list[tuple[str, Tensor]]] = {}
    out = {}
    for k, v in values.items():
        if isinstance(v, Tensor):
            if v.numel() != 1:
                raise ValueError(f"Recorder: {k!r} has {v.numel()} elements; log scalars")
            tensors.setdefault(v.device, []).append((k, v.detach().reshape(()).to(torch.float64)))
            out[k] = None  # keeps the key order
        elif isinstance(v, bool) or v is None or isinstance(v, str):
            out[k] = v
        elif isinstance(v, int):
            out[k] = v
        else:
            out[k] = float(v)
    for items in tensors.values():
        for (k, _), x in zip(items, torch.stack([t for _, t in items]).tolist()):
            out[k] = x
    return out


def read_log(path: str | os.PathLike) -> list[dict]:
    """The rows of a Recorder's .jsonl or .csv file (CSV cells as numbers where they parse,
    empty cells left out)."""
    path = os.fspath(path)
    with open(path, newline="") as f:
        if path.endswith(".jsonl"):
            return [json.loads(line) for line in f if line.strip()]
        rows = []
        for r in csv.DictReader(f):
            row = {}
            for k, v in r.items():
                if v in ("", None):
                    continue
                try:
                    row[k] = int(v) if v.lstrip("-").isdigit() else float(v)
                except ValueError:
                    row[k] = v
            rows.append(row)
        return rows


def plot_trajectories(rows: Iterable[dict] | str | os.PathLike, path: str | os.PathLike | None = None, *,
                      keys: Iterable[str] | None = None, hypergradients: bool = False, title: str | None = None,
                      log_scale: Iterable[str] = ("lr", "eps")):
    """One panel per hyperparameter trajectory (matplotlib).

    Args:
        rows: a Recorder's ``rows``, or the path of its log file.
        path: where to save the figure (PNG, PDF, ... by suffix); None: only return it.
        keys: the keys to plot; default: every ``level*`` value that changed during the run (the
            level-1 lr where none did), with their hyper-gradients if ``hypergradients``.
        log_scale: hyperparameter names drawn on a log axis (when all their values are > 0).
    Returns the matplotlib Figure.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plot_trajectories needs matplotlib (pip install matplotlib)") from e
    if isinstance(rows, (str, os.PathLike)):
        rows = read_log(rows)
    rows = [r for r in rows if any(k.startswith("level") for k in r)]
    if not rows:
        raise ValueError("plot_trajectories: no rows with hyperparameters (keys 'level1.lr', ...)")
    if keys is None:
        cands = [k for k in rows[0] if k.startswith("level") and not k.endswith("_skipped")
                 and (hypergradients or ".hypergrad" not in k)]
        for r in rows[1:]:
            cands += [k for k in r if k.startswith("level") and not k.endswith("_skipped") and k not in cands
                      and (hypergradients or ".hypergrad" not in k)]
        keys = [k for k in cands if ".hypergrad" in k or len({r.get(k) for r in rows if k in r}) > 1]
        if not keys:
            keys = [k for k in cands if k.startswith("level1.lr")][:1] or cands[:1]
    keys = list(keys)
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.5 * cols, 3 * nrows), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r and r[k] is not None]
        if not pts:
            raise ValueError(f"plot_trajectories: no row has {k!r}")
        ax.plot([s for s, _ in pts], [v for _, v in pts])
        name = k.split(".", 1)[1].split("[")[0].split(".")[0]
        if name in tuple(log_scale) and ".hypergrad" not in k and all(v > 0 for _, v in pts):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set(title=k, xlabel="step")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=100)
        plt.close(fig)
    return fig
