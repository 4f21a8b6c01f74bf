"""The hand-written CPU kernels alone, in nanoseconds per element, and the fixed cost of a step.

    python benchmarks/kernels.py                 # kernels at 262,144 (in cache) and 10M elements
    python benchmarks/kernels.py --fixed         # whole steps at 8,192 parameters (the fixed cost)
    python benchmarks/kernels.py --fixed --cold  # the same with the caches emptied before each step
    python benchmarks/kernels.py --levels        # a 3-level step's fixed cost, level by level
    python benchmarks/kernels.py --sizes 1e6 --threads 2

Two questions that benchmarks/run.py's ratios leave open: whether a kernel is bound by memory
(its time per element grows when its arrays leave the caches) or by its arithmetic (the same
time in cache as from memory), and what a step costs besides its loops. Each figure is the
minimum over rounds of a batch of calls (the quantity is a lower bound of work done; on a
shared machine the minimum moves least), measured round-robin in one process. To compare two
commits, run this file from each checkout in turn (``PYTHONPATH=<checkout> python
<checkout>/benchmarks/kernels.py --fixed``) and alternate a few times.

The kernels are called with the arguments the optimizer passes them (taken from a real step of
hyper-Adam and MADA, ``one_pass=True``, one tensor): the one-pass kernel, its sums-only twin
(the paper's order), its update-only twin (the one-pass source without its sums: the compiler
drops the hyper-gradient's arithmetic with them), against torch's fused Adam/AdamW step on the same
number of elements.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402  (the same optimizers and parameters as the main benchmark)

import hypergrad._onepass as adam_kernels  # noqa: E402
import parameterized._onepass as mada_kernels  # noqa: E402


def best(fns: dict, rounds: int, calls: int, before=None) -> dict:
    """The minimum over ``rounds`` of the mean time of ``calls`` calls, round-robin.
    ``before``: called before each call, outside its time."""
    out = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            if before is None:
                t = time.perf_counter()
                for _ in range(calls):
                    f()
                total = time.perf_counter() - t
            else:
                total = 0.0
                for _ in range(calls):
                    before()
                    t = time.perf_counter()
                    f()
                    total += time.perf_counter() - t
            out[k] = min(out[k], total / calls)
    return out


def captured(make, n, module):
    """A step's kernel call (``_sweep``'s arguments) of the optimizer ``make`` on n elements."""
    seen = {}
    orig = module._sweep

    def spy(*a):
        seen["a"] = a
        return orig(*a)
    module._sweep = spy
    try:
        opt = make(R.params(n, "cpu", n_tensors=1))
        for _ in range(4):
            opt.step()
    finally:
        module._sweep = orig
    kernel, *rest = seen["a"]
    return opt, kernel, rest


def kernels(sizes, rounds):
    mod = {"Adam": adam_kernels, "MADA": mada_kernels}
    made = {"Adam": R.hyper_adam(True, one_pass=True, skip_nonfinite=False),
            "MADA": R.mada(True, one_pass=True, skip_nonfinite=False)}
    # the sums-only and update-only twins (the one-pass source without its update, or without
    # its sums: the compiler then drops the hyper-gradient's arithmetic too); MADA's make the
    # sums of the names learned
    twins = {"Adam": lambda opt: (adam_kernels._SUMS_SRC, adam_kernels._UPDATE_SRC),
             "MADA": lambda opt: (mada_kernels._source(mada_kernels._MADA_SUMS_SRC,
                                                       mada_kernels._need(opt.learned, False)),
                                  mada_kernels._source(mada_kernels._MADA_UPDATE_SRC, 0))}
    args = {"Adam": adam_kernels._ADAM_ARGS, "MADA": mada_kernels._MADA_ARGS}
    for n in sizes:
        fns = {}
        keep = []
        for name in ("Adam", "MADA"):
            opt, kernel, rest = captured(made[name], n, mod[name])
            sums, update = (adam_kernels._load(src, args[name]) for src in twins[name](opt))
            keep.append(opt)
            fns[f"{name} one-pass kernel"] = lambda k=kernel, r=rest: adam_kernels._sweep(k, *r)
            fns[f"{name} sums-only kernel"] = lambda k=sums, r=rest: adam_kernels._sweep(k, *r)
            fns[f"{name} update only"] = lambda k=update, r=rest: adam_kernels._sweep(k, *r)
        for cls in (torch.optim.Adam, torch.optim.AdamW):
            base = cls(R.params(n, "cpu", n_tensors=1), lr=1e-3, fused=True)
            base.step()
            keep.append(base)
            fns[f"torch {cls.__name__} fused step"] = base.step
        t = best(fns, rounds, max(2, int(2e7 // n)))
        print(f"\n{n:,} elements, {torch.get_num_threads()} thread(s): ns per element (minimum of {rounds} rounds)")
        for k, v in t.items():
            print(f"  {k:<28} {v / n * 1e9:7.3f}")


def fixed(n, rounds, cold=False):
    """Whole steps of each optimizer on n parameters in 8 tensors. ``cold``: before each step
    (outside its time) a write of 64 MiB empties the caches, as a model's backward pass leaves
    them for the optimizer's step in training; the step's Python and its library code then
    run from memory too (a fixed cost that the warm figures do not show)."""
    makers = {"1-level one-pass, skip_nonfinite=False": R.hyper_adam(True, one_pass=True, skip_nonfinite=False),
              "1-level one-pass": R.hyper_adam(True, one_pass=True),
              "1-level paper order": R.hyper_adam(True),
              "3-level one-pass": R.stack3(True, one_pass=True),
              "3-level paper order": R.stack3(True),
              "MADA one-pass": R.mada(True, one_pass=True),
              "torch Adam fused": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)}
    opts = {k: m(R.params(n, "cpu")) for k, m in makers.items()}
    for o in opts.values():
        for _ in range(30):
            o.step()
    before, calls = None, 100
    if cold:
        buf = torch.zeros(16 << 20)  # 64 MiB: twice the L3 cache of the machine of docs/benchmarks.md
        before, calls = (lambda: buf.add_(1.0)), 20
    t = best({k: o.step for k, o in opts.items()}, rounds, calls, before)
    print(f"\nwhole steps, {n:,} parameters in 8 tensors, {torch.get_num_threads()} thread(s)"
          f"{', caches emptied before each step' if cold else ''}: ms (minimum of {rounds} rounds of {calls})")
    for k, v in t.items():
        print(f"  {k:<40} {v * 1e3:7.3f}")


def levels(n, rounds):
    """Where a 3-level one-pass step's fixed cost goes: each level's hyper-gradient and update
    called alone (they read and write only their own tensors), against the whole step; and
    the bottom level's check of its tensors for the kernel (``applies``, with its memo)."""
    opt = R.stack3(True, one_pass=True)(R.params(n, "cpu"))
    for _ in range(30):
        opt.step()
    bottom, mid, top = opt.levels
    fn = type(bottom).one_pass_kernel
    names = tuple(n for n, hv in bottom._hg_vars[0].items() if hv.learned)
    params, grads, states = bottom._hg_kernel_group(0, names, fn, True)
    memo = bottom._hg_onepass_memo[0]
    fns = {"whole step": opt.step,
           "level 1: check of its 8 tensors (applies)": lambda: fn.applies(params, grads, states, memo),
           "level 2: hyper-gradient": mid._hg_hypergrad,
           "level 2: update (3 scalars, records)": mid._hg_update, "level 3: update (1 scalar)": top._hg_update,
           "syncs of the three levels": lambda: (bottom._hg_sync(), mid._hg_sync(), top._hg_sync()),
           "refreshes of levels 1 and 2": lambda: (bottom._hg_refresh(), mid._hg_refresh())}
    t = best(fns, rounds, 200)
    print(f"\n3-level one-pass stack, {n:,} parameters in 8 tensors, {torch.get_num_threads()} thread(s): us "
          f"(minimum of {rounds} rounds of 200)")
    for k, v in t.items():
        print(f"  {k:<40} {v * 1e6:7.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fixed", action="store_true", help="whole steps at --sizes (default 8192)")
    ap.add_argument("--cold", action="store_true", help="with --fixed: the caches emptied before each step")
    ap.add_argument("--levels", action="store_true", help="a 3-level step's fixed cost by level (8192)")
    ap.add_argument("--sizes", nargs="*", type=float)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.levels:
        levels(int((a.sizes or [8192])[0]), max(a.rounds, 15))
    elif a.fixed:
        for n in a.sizes or [8192]:
            fixed(int(n), max(a.rounds, 15), a.cold)
    else:
        kernels([int(n) for n in (a.sizes or [262144, 1e7])], a.rounds)


if __name__ == "__main__":
    main()
