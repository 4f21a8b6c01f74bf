"""Benchmarks: the cost of learning hyperparameters, as ratios against baselines run in the same
process (interleaved repeats, medians). Prints a table and writes JSON.

    python benchmarks/run.py                  # everything (about 10 minutes on 2 CPU cores)
    python benchmarks/run.py --quick          # smaller sizes, fewer repeats (a minute or two)
    python benchmarks/run.py --only step      # one section: step, stack, mada, gpt, peer, memory
    python benchmarks/run.py --device cuda    # the same measurements on a GPU
    python benchmarks/run.py --only step --sizes 1e7 --threads 1   # one size, one thread count

Sections
- step:   optimizer step (gradients preassigned) of 1-level hyper-Adam (lr, beta1, beta2 learned)
          against the fastest torch.optim.Adam (for-loop, foreach, fused) at 1M and 10M parameters,
          1 and 2 threads
- stack:  a 3-level stack (Adam, SGD, SGD) against the same baseline
- mada:   MADA learning its 6 coefficients against the fastest torch.optim.AdamW
- parts:  the compiled update and hyper-gradient kernels of hyper-Adam alone, and inductor's
          compiled dot product against torch.dot
- gpt:    whole training step (forward, backward, step) of examples/gpt2.py's small char model
- peer:   whole training step on the peer code's README MLP (784-128-128-10, batch 128), same
          Adam+SGD stack, against gradient-descent-the-ultimate-optimizer (if installed)
- memory: optimizer state bytes beyond torch.optim.Adam's, and the peak RSS of a fresh process
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples"))

import hypergrad as hg  # noqa: E402
from _harness import interleaved  # noqa: E402
from parameterized import MADA  # noqa: E402

RESULTS: list[dict] = []


def record(section, name, value, unit, **extra):
    row = dict(section=section, name=name, value=value, unit=unit, **extra)
    RESULTS.append(row)
    return row


def params(n, device, n_tensors=8, seed=0):
    """n parameters in n_tensors tensors, with gradients, as a model's would be."""
    g = torch.Generator().manual_seed(seed)
    per = n // n_tensors
    ps = []
    for _ in range(n_tensors):
        p = torch.nn.Parameter(torch.randn(per, generator=g).to(device))
        p.grad = (torch.randn(per, generator=g) * 1e-2).to(device)
        ps.append(p)
    return ps


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_steps(makers, n, device, repeats, inner):
    opts = {k: make(params(n, device)) for k, make in makers.items()}
    t0 = time.perf_counter()
    for o in opts.values():  # warm-up: compilation and the first steps (state, records)
        for _ in range(3):
            o.step()
    _sync(device)
    compile_s = time.perf_counter() - t0

    def stepper(o):
        def f():
            o.step()
            _sync(device)
        return f
    return interleaved({k: stepper(o) for k, o in opts.items()}, repeats=repeats, inner=inner), compile_s


def torch_baselines(cls, device, **kw):
    out = {"foreach=False": lambda p: cls(p, foreach=False, **kw),
           "foreach=True": lambda p: cls(p, foreach=True, **kw)}
    try:
        cls(params(16, device), fused=True, **kw)
        out["fused=True"] = lambda p: cls(p, fused=True, **kw)
    except (RuntimeError, ValueError):
        pass
    return out


def section_step(args, name, baseline_cls, ours, sizes, threads):
    for n in sizes:
        for th in threads:
            torch.set_num_threads(th)
            makers = {f"torch {k}": v for k, v in torch_baselines(baseline_cls, args.device, lr=1e-3).items()}
            makers.update(ours)
            t, compile_s = timed_steps(makers, n, args.device, args.repeats, args.inner)
            base_name = min((k for k in t if k.startswith("torch")), key=t.get)
            base = t[base_name]
            for k, v in t.items():
                record(name, k, v * 1e3, "ms/step", params=n, threads=th, ratio=v / base, baseline=base_name)
            print(f"\n[{name}] {n / 1e6:g}M parameters, {th} thread(s); baseline {base_name} "
                  f"{base * 1e3:.3f} ms (warm-up incl. compilation {compile_s:.1f} s)")
            for k, v in sorted(t.items(), key=lambda kv: kv[1]):
                print(f"  {k:<34} {v * 1e3:9.3f} ms   {v / base:6.2f}x")


def hyper_adam(compile, backend="auto", **kw):
    return lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=compile, backend=backend, **kw)


def stack3(compile, **kw):
    return lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9, hyper=hg.SGD(lr=1e-12)), compile=compile, **kw)


def mada(compile, **kw):
    return lambda p: MADA(p, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=compile, **kw)


def section_parts(args):
    """Where a compiled hyper-Adam step spends its time: each kernel alone, against a fused
    torch Adam step; and a compiled dot product against torch.dot (inductor's CPU reductions)."""
    from hypergrad import _compiled
    n = 1_000_000 if args.quick else 10_000_000
    torch.set_num_threads(1)
    opt = hyper_adam(True)(params(n, args.device))
    fused = torch.optim.Adam(params(n, args.device), lr=1e-3, fused=True) if args.device == "cpu" else \
        torch.optim.Adam(params(n, args.device), lr=1e-3)
    for _ in range(4):
        opt.step()
        fused.step()
    names = opt.learned
    kind = opt._hg_kind(0)
    snaps = {id(hv): [v.detach().clone() for v in hv.value] for vars in opt._hg_vars for hv in vars.values()}

    def nograd(f):  # (as optimizer.step runs them: inductor traces the in-place update without autograd)
        def g():
            with torch.no_grad():
                return f()
        return g
    runs = {
        "torch Adam (fused) step": fused.step,
        "hyper-Adam step": opt.step,
        "update kernel (inductor)": nograd(lambda: opt._hg_update_compiled(0, kind, snaps)),
        "hyper-gradient kernel (inductor)": lambda: opt._hg_terms_compiled(0, opt._hg_kind(0), names,
                                                                           lambda *a: None),
    }
    if args.device == "cpu":  # the hand-written kernels that the step uses on float32 CPU tensors
        runs["update kernel (hand-written)"] = nograd(lambda: opt._hg_update_kernel(0, kind, snaps))
        runs["hyper-gradient kernel (hand-written)"] = lambda: opt._hg_sums_group(0, names, lambda *a: None)
    # the floor of the paper's order: the four arrays the hyper-gradient pass reads (g_t, m, v,
    # g_{t-1}), summed with no other arithmetic, in one compiled kernel
    st = [opt.state[p] for p in opt.param_groups[0]["params"]]
    four = [x for p, s in zip(opt.param_groups[0]["params"], st) for x in (p.grad, s["exp_avg"], s["exp_avg_sq"], s["hg_gprev"])]
    read4 = _compiled._build(lambda *xs: [sum((xs[i] + xs[i + 1] + xs[i + 2] + xs[i + 3]).sum()
                                              for i in range(0, len(xs), 4))], four)
    runs["read of the pass's 4 arrays (no arithmetic)"] = lambda: read4(*four)
    # the finiteness check of the gradients (one read of them): the hand-written kernel, where it
    # applies, against the per-tensor sums the engine uses elsewhere; each on its own copy of the
    # gradients, so that neither reads what the other left in cache
    g1 = [p.grad.clone() for p in opt.param_groups[0]["params"]]
    g2 = [g.clone() for g in g1]
    runs["check of the gradients (sums)"] = lambda: bool(torch.isfinite(torch.stack([g.sum() for g in g1])).all())
    if args.device == "cpu":
        from hypergrad import _onepass
        runs["check of the gradients (kernel)"] = lambda: _onepass.all_finite(g2)
    a, b = params(n, args.device)[:2]
    dot = _compiled._build(lambda x, y: [(x * y).sum()], [a, b])
    runs["compiled dot product"] = lambda: dot(a, b)
    runs["torch.dot"] = lambda: torch.dot(a, b)

    def synced(f):
        def g():
            f()
            _sync(args.device)
        return g
    t = interleaved({k: synced(f) for k, f in runs.items()}, repeats=args.repeats, inner=args.inner)
    base = t["torch Adam (fused) step"]
    print(f"\n[parts] {n / 1e6:g}M parameters in 8 tensors, 1 thread (dot products: {n / 8e6:g}M elements)")
    for k, v in t.items():
        record("parts", k, v * 1e3, "ms", params=n, threads=1, ratio=v / base)
        print(f"  {k:<34} {v * 1e3:9.3f} ms   {v / base:6.2f}x the fused Adam step")
    if args.device == "cpu":
        section_streams(n, args)


_STREAMS_SRC = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
using V = at::vec::Vectorized<float>;
// read arrays a[0..nr) element by element and write their sum, halved, into a[0..nw): a kernel
// with the memory traffic of an optimizer step that reads nr arrays and writes nw of them
extern "C" void kernel(const int64_t* a, int64_t nr, int64_t nw, int64_t n) {
  float** x = (float**)a;
  for (int64_t i = 0; i + V::size() <= n; i += V::size()) {
    V s(0.f);
    for (int64_t j = 0; j < nr; ++j) s = s + V::loadu(x[j] + i);
    for (int64_t j = 0; j < nw; ++j) (s * V(0.5f)).store(x[j] + i);
  }
}
"""


def section_streams(n, args):
    """Memory bandwidth against the number of arrays a loop streams at once (1 thread): what a
    kernel that reads and writes more arrays than Adam's 4 and 3 can expect per byte."""
    from hypergrad._onepass import _load
    k = _load(_STREAMS_SRC, ["const int64_t*", "int64_t", "int64_t", "int64_t"])
    arrays = [torch.randn(n) for _ in range(17)]
    ptrs = torch.tensor([a.data_ptr() for a in arrays], dtype=torch.int64)
    cfg = [(4, 3), (5, 4), (7, 6), (9, 8), (11, 10), (17, 16), (1, 0), (4, 0), (9, 0)]
    t = interleaved({c: (lambda c=c: k(ptrs, c[0], c[1], n)) for c in cfg}, repeats=args.repeats, inner=2)
    print(f"\n[parts] memory bandwidth by arrays streamed at once ({n / 1e6:g}M floats each, 1 thread)")
    for (nr, nw), v in t.items():
        gbs = (nr + nw) * 4 * n / v / 1e9
        record("streams", f"read {nr} write {nw}", gbs, "GB/s", params=n, threads=1, ms=v * 1e3)
        print(f"  read {nr:2d} arrays, write {nw:2d} of them   {v * 1e3:8.2f} ms   {gbs:5.1f} GB/s")


# ---------------------------------------------------------------------------------- whole steps


def section_gpt(args):
    import gpt2
    torch.set_num_threads(args.gpt_threads)
    import dataclasses
    batch, block = (4, 64) if args.quick else (8, 256)
    cfg = dataclasses.replace(gpt2.CONFIGS["shakespeare-char"], vocab_size=65, dropout=0.0, block_size=block)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65, (batch, block), generator=g).to(args.device)
    y = torch.randint(0, 65, (batch, block), generator=g).to(args.device)
    makers = {
        "torch Adam (fused)": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
        "torch Adam (foreach)": lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True),
        "hyper-Adam, eager": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=False),
        "hyper-Adam, compile=True": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=True),
        "hyper-Adam, one_pass=True": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9), one_pass=True),
    }
    runs = {}
    for k, make in makers.items():
        torch.manual_seed(0)
        model = gpt2.GPT(cfg).to(args.device)
        opt = make(model.parameters())

        def step(model=model, opt=opt):
            loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            _sync(args.device)
        for _ in range(2):
            step()
        runs[k] = step
    nparams = sum(p.numel() for p in model.parameters())
    t = interleaved(runs, repeats=args.repeats, inner=1 if not args.quick else 2, warmup=1)
    base = min(t["torch Adam (fused)"], t["torch Adam (foreach)"])
    print(f"\n[gpt] whole training step, char model {nparams / 1e6:.1f}M parameters, batch {batch}x{block}, "
          f"{args.gpt_threads} thread(s)")
    for k, v in t.items():
        record("gpt", k, v * 1e3, "ms/step", params=nparams, threads=args.gpt_threads, ratio=v / base)
        print(f"  {k:<34} {v * 1e3:9.1f} ms   {v / base:6.3f}x")


def section_peer(args):
    torch.set_num_threads(1)
    # A pool of batches with random labels, cycled: on one fixed batch a run that learns faster
    # (a learned lr grows) drives its gradients into subnormal floats, which slow every CPU op
    # several-fold, and the figures would compare numerical regimes instead of implementations.
    g = torch.Generator().manual_seed(0)
    pool = [(torch.randn(128, 784, generator=g).to(args.device),
             torch.randint(0, 10, (128,), generator=g).to(args.device)) for _ in range(64)]
    counter = iter(range(10 ** 9))

    def batch():
        return pool[next(counter) % len(pool)]

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(784, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128),
                                   torch.nn.ReLU(), torch.nn.Linear(128, 10)).to(args.device)
    loss_fn = torch.nn.functional.cross_entropy
    runs = {}
    for k, make in {"torch Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
                    "ours Adam+SGD, eager": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-5), compile=False),
                    "ours Adam+SGD, compile=True": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-5),
                                                                     compile=True)}.items():
        model = mlp()
        opt = make(model.parameters())

        def step(model=model, opt=opt):
            x, y = batch()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            _sync(args.device)
        for _ in range(3):
            step()
        runs[k] = step
    try:
        from gradient_descent_the_ultimate_optimizer import gdtuo
        model = mlp()
        mw = gdtuo.ModuleWrapper(model, optimizer=gdtuo.Adam(optimizer=gdtuo.SGD(1e-5)))
        mw.initialize()

        def peer_step():
            x, y = batch()
            mw.begin()
            loss = loss_fn(mw.forward(x), y)
            mw.zero_grad()
            loss.backward(create_graph=True)
            mw.step()
            _sync(args.device)
        for _ in range(3):
            peer_step()
        runs["peer (gdtuo) Adam+SGD"] = peer_step
    except ImportError:
        print("  (gradient-descent-the-ultimate-optimizer not installed: no peer figure)")
    # (a few seconds of steps in all: more rounds than the other sections, whose medians move less)
    t = interleaved(runs, repeats=max(args.repeats, 21), inner=20, warmup=5)
    base = t["torch Adam"]
    print("\n[peer] whole training step, MLP 784-128-128-10, batch 128, 1 thread")
    for k, v in t.items():
        extra = {}
        if "peer (gdtuo) Adam+SGD" in t and k.startswith("ours"):
            extra["speedup_vs_peer"] = t["peer (gdtuo) Adam+SGD"] / v
        record("peer", k, v * 1e3, "ms/step", ratio=v / base, **extra)
        s = f"   {extra['speedup_vs_peer']:.2f}x faster than the peer" if extra else ""
        print(f"  {k:<34} {v * 1e3:9.3f} ms   {v / base:6.2f}x torch Adam{s}")


# ---------------------------------------------------------------------------------- memory


def state_bytes(opt) -> int:
    """Bytes of the distinct tensor storages an optimizer holds in its state (all levels,
    records included), parameters and gradients excluded."""
    seen, total = set(), 0

    def visit(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            key = (x.untyped_storage().data_ptr(), x.device)
            if key not in seen:
                seen.add(key)
                total += x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                visit(v)
    levels = opt.levels if hasattr(opt, "levels") else [opt]
    for lvl in levels:
        visit(dict(lvl.state))
    return total


_RSS_CHILD = r"""
import gc, os, sys, torch, hypergrad as hg
import torch._inductor  # the compiler's own memory is not the optimizer's
torch.set_num_threads(1)
def status(key):  # kB -> bytes, from /proc/self/status (Linux)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
kind, n = sys.argv[1], int(sys.argv[2])
ps = [torch.nn.Parameter(torch.randn(n // 8)) for _ in range(8)]
for p in ps: p.grad = torch.randn(n // 8) * 1e-2
gc.collect()
with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current size
    f.write("5")
before = status("VmRSS:")
if kind == "torch":
    opt = torch.optim.Adam(ps, lr=1e-3, foreach=False)
elif kind == "hyper":
    opt = hg.Adam(ps, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=True)
elif kind == "eager":
    opt = hg.Adam(ps, lr=1e-3, hyper=hg.SGD(lr=1e-9), compile=False)
elif kind == "generic":
    opt = hg.Adam(ps, lr=1e-3, hyper=hg.SGD(lr=1e-9), backend="autograd", compile=False)
elif kind == "one_pass":
    opt = hg.Adam(ps, lr=1e-3, hyper=hg.SGD(lr=1e-9), one_pass=True)
for _ in range(5):
    opt.step()
gc.collect()
print(status("VmRSS:") - before, status("VmHWM:") - before)
"""


def section_memory(args):
    n = 1_000_000 if args.quick else 10_000_000
    pbytes = n * 4
    rows = {}
    for k, make in {"torch Adam": lambda p: torch.optim.Adam(p, lr=1e-3),
                    "hyper-Adam (closed form)": hyper_adam(False),
                    "hyper-Adam (generic path)": hyper_adam(False, "autograd"),
                    "hyper-Adam, scope='tensor'": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9),
                                                                    scope="tensor", compile=False),
                    "hyper-Adam, scope='shared'": lambda p: hg.Adam(p, lr=1e-3, hyper=hg.SGD(lr=1e-9),
                                                                    scope="shared", compile=False),
                    "hyper-Adam, 3 levels": stack3(False),
                    "hyper-Adam, one_pass=True": hyper_adam(True, one_pass=True),
                    "hyper-Adam, one_pass=True, 3 levels": stack3(True, one_pass=True),
                    "MADA (6 coefficients)": mada(False)}.items():
        ps = params(n, args.device)
        opt = make(ps)
        for _ in range(3):
            opt.step()
        rows[k] = state_bytes(opt)
    base = rows["torch Adam"]
    print(f"\n[memory] optimizer state, {n / 1e6:g}M float32 parameters (one parameter-sized buffer = "
          f"{pbytes / 2**20:.1f} MiB)")
    for k, b in rows.items():
        extra = (b - base) / pbytes
        record("memory", k, b / 2**20, "MiB state", params=n, extra_param_buffers=extra)
        print(f"  {k:<34} {b / 2**20:9.1f} MiB   extra beyond torch Adam: {extra:5.2f} parameter-sized buffers")
    if args.device == "cpu":
        print("  resident memory of a fresh process over 5 steps (/proc/self/status; large blocks returned to the OS "
              "when freed,\n  MALLOC_MMAP_THRESHOLD_=65536), per parameter: the growth at 2n minus the growth at n "
              "parameters, so that\n  fixed costs (loaded compiled code) drop out. 'stays': what the optimizer keeps; "
              "'peak': plus the step's temporaries.\n  hyper = compiled kernels, eager = compile=False")
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")

        def child(kind, size):
            out = subprocess.run([sys.executable, "-c", _RSS_CHILD, kind, str(size)], capture_output=True, text=True,
                                 env=env)
            if out.returncode:
                raise RuntimeError(out.stderr.strip()[-300:])
            return [int(x) for x in out.stdout.split()]
        child("hyper", n)  # fills inductor's on-disk cache: the measured runs load their kernels
        child("hyper", 2 * n)
        per = {}
        for kind in ("torch", "hyper", "one_pass", "eager", "generic"):
            try:
                a, b = child(kind, n), child(kind, 2 * n)
            except RuntimeError as e:
                print(f"    {kind}: failed: {e}")
                continue
            per[kind] = stay, peak = [(y - x) / pbytes for x, y in zip(a, b)]  # parameter-sized buffers
            base = per.get("torch", (0.0, 0.0))
            record("memory", f"RSS per parameter {kind}", stay, "parameter-sized buffers", peak=peak,
                   extra_param_buffers=stay - base[0], extra_peak_param_buffers=peak - base[1])
            print(f"    {kind:<8} stays {stay:5.2f}, peak {peak:5.2f} parameter-sized buffers; beyond torch Adam's: "
                  f"{stay - base[0]:5.2f} / {peak - base[1]:5.2f}")


# ---------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M parameters only, fewer repeats")
    ap.add_argument("--only", nargs="*", choices=["step", "stack", "mada", "parts", "gpt", "peer", "memory"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--inner", type=int, default=None)
    ap.add_argument("--sizes", type=float, nargs="*", default=None,
                    help="parameter counts of the step sections (default 1e6 1e7; --quick: 1e6)")
    ap.add_argument("--threads", type=int, nargs="*", default=None, help="thread counts (default 1 2)")
    ap.add_argument("--gpt-threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/<device>.json)")
    args = ap.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.inner = args.inner or (3 if args.quick else 5)
    sizes = [int(x) for x in args.sizes] if args.sizes else [1_000_000] if args.quick else [1_000_000, 10_000_000]
    threads = args.threads or ([1] if args.quick else [1, 2])
    only = set(args.only or ["step", "stack", "mada", "parts", "gpt", "peer", "memory"])
    t0 = time.perf_counter()
    if "step" in only:
        section_step(args, "step", torch.optim.Adam,
                     {"hyper-Adam, eager": hyper_adam(False), "hyper-Adam, compile=True": hyper_adam(True),
                      "hyper-Adam, one_pass=True": hyper_adam(True, one_pass=True),
                      "hyper-Adam, one_pass, skip_nonfinite=False": hyper_adam(True, one_pass=True,
                                                                               skip_nonfinite=False),
                      "hg.Adam (nothing learned), compile=True": lambda p: hg.Adam(p, lr=1e-3, compile=True)},
                     sizes, threads)
    if "stack" in only:
        section_step(args, "stack", torch.optim.Adam, {"3-level stack, compile=True": stack3(True),
                                                        "3-level stack, one_pass=True": stack3(True, one_pass=True)},
                     sizes, threads)
    if "mada" in only:
        section_step(args, "mada", torch.optim.AdamW,
                     {"MADA (6 coefficients), compile=True": mada(True),
                      "MADA (6 coefficients), one_pass=True": mada(True, one_pass=True),
                      "MADA (6), one_pass, skip_nonfinite=False": mada(True, one_pass=True, skip_nonfinite=False),
                      "MADA (nothing learned), compile=True": lambda p: MADA(p, lr=1e-3, compile=True)},
                     sizes, threads)
    if "parts" in only:
        section_parts(args)
    if "gpt" in only:
        section_gpt(args)
    if "peer" in only:
        section_peer(args)
    if "memory" in only:
        section_memory(args)
    meta = dict(device=args.device, torch=torch.__version__, python=platform.python_version(),
                machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                quick=args.quick, seconds=time.perf_counter() - t0)
    if args.device.startswith("cuda"):
        meta["gpu"] = torch.cuda.get_device_name()
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"{args.device.split(':')[0]}{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, results=RESULTS), f, indent=1)
    print(f"\nwrote {out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
