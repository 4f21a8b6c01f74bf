"""Time variants of a hand-written kernel against the shipped one, on the arguments of a real step.

    python benchmarks/variants.py mada my_variants.py            # 262,144 elements, 1 thread
    python benchmarks/variants.py adam my_variants.py --size 1e7 --threads 2

``my_variants.py`` defines ``VARIANTS = {name: C++ source}``: whole kernel sources with the
shipped kernel's signature (start from ``hypergrad._onepass._SRC`` or
``parameterized._onepass._source(parameterized._onepass._MADA_SRC, mask)`` and edit them). Each
variant runs once from the same state as the shipped kernel; the script prints which arrays it
left different (and by how much: the largest relative difference for floats, the count for sign
bytes) and how its sums differ, then the time of every kernel, round-robin in one process (the
minimum over rounds of ns per element, as ``benchmarks/kernels.py``). This is how the kernel
changes recorded in ``docs/benchmarks.md`` were measured while they were made.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as R  # noqa: E402
from kernels import best, captured  # noqa: E402

import hypergrad._onepass as A  # noqa: E402
import parameterized._onepass as M  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernel", choices=["adam", "mada"])
    ap.add_argument("variants", help="a Python file that defines VARIANTS = {name: source}")
    ap.add_argument("--size", type=float, default=262144)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    n = int(a.size)
    adam = a.kernel == "adam"
    make = (R.hyper_adam if adam else R.mada)(True, one_pass=True, skip_nonfinite=False)
    _, kernel, rest = captured(make, n, A if adam else M)
    params, grads, states, keys, consts, flags, nsums, memo, check = rest
    names = ["p", "g", *keys]
    tensors = [t for p, g, st in zip(params, grads, states) for t in (p, g, *[st[k] for k in keys])]
    start = [t.clone() for t in tensors]

    def restore():
        with torch.no_grad():
            for t, s in zip(tensors, start):
                t.copy_(s)
    spec = importlib.util.spec_from_file_location("variants", a.variants)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = A._ADAM_ARGS if adam else M._MADA_ARGS
    kernels = {"shipped": kernel, **{k: A._load(src, args) for k, src in mod.VARIANTS.items()}}
    ref = None
    for name, k in kernels.items():
        restore()
        sums = A._sweep(k, *rest)
        out = [t.clone() for t in tensors]
        if ref is None:
            ref = (sums, out)
            continue
        diff = {}
        for j, (x, y) in enumerate(zip(out, ref[1])):
            if not torch.equal(x, y):
                key = names[j % len(names)]
                d = ((x - y).abs() / y.abs().clamp_min(1e-30)).max().item() if x.is_floating_point() \
                    else int((x != y).sum())
                diff[key] = max(diff.get(key, 0), d)
        rel = ["%.1e" % (abs(x - y) / abs(y)) if y else ("0" if x == y else "new")
               for x, y in zip(sums[:nsums], ref[0][:nsums])]
        print(f"{name}: arrays that differ {diff or 'none'}; sums' relative differences {rel}")
    restore()
    t = best({name: (lambda k=k: A._sweep(k, *rest)) for name, k in kernels.items()}, a.rounds,
             max(2, int(2e7 // n)))
    print(f"\n{n:,} elements, {a.threads} thread(s): ns per element (minimum of {a.rounds} rounds)")
    for k, v in t.items():
        print(f"  {k:<32} {v / n * 1e9:7.3f}")


if __name__ == "__main__":
    main()
