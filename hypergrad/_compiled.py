"""Fused kernels for a param group: the rule's own pure functions, traced over the group's tensor
list and compiled by inductor into one loop each.

Two kernels per group and configuration, each one pass over memory:

- the update: ``rule.update`` (or ``rule.coefficients`` + ``rule.apply``) for every tensor, its
  results stored back into the parameter and the state in the same loop;
- the hyper-gradient: the rule's closed form (``hyper_terms``, or ``hyper_coefficients`` +
  ``hyper_apply``), or autograd's vector-Jacobian product through ``update`` at the inputs that
  ``restore`` rebuilds, reduced to one sum per learned hyperparameter (per group or per tensor).

The functions are traced once per configuration with ``make_fx`` on fake tensors (tracing runs
nothing) and the graph goes straight to inductor: the call is a plain function of a flat tensor
list, without dynamo's guards (our caller keys the kernels by configuration, and inductor's own
code asserts sizes and strides). Scalars that the rule computes once per group (bias
corrections, step sizes) are returned by the kernel, which makes inductor compute them once
before the loop instead of once per element. The eager path runs the same functions, so both
compute the same mathematics; tests compare them.
"""

from __future__ import annotations

import logging
import warnings

import torch

from .core import _compute

__all__ = ["GroupKernels", "usable", "mark_unusable"]

# Inductor's defaults store intermediates that are read often or are large expressions in
# buffers of their own, which for a closed form with several reductions means extra passes over
# memory; these keep each kernel one loop that recomputes instead.
_INDUCTOR = {"realize_reads_threshold": 1000, "realize_cpu_acc_reads_threshold": 1000,
             "realize_cpu_opcount_threshold": 10000}


_UNUSABLE: str | None = None


def usable() -> bool:
    """Whether ``compile="auto"`` compiles: inductor imports and no compilation has failed in
    this process."""
    global _UNUSABLE
    if _UNUSABLE is None:
        try:
            import torch._inductor  # noqa: F401
            from torch.fx.experimental.proxy_tensor import make_fx  # noqa: F401
        except Exception as e:  # pragma: no cover - depends on the installation
            mark_unusable(f"{type(e).__name__}: {e}")
        else:
            _UNUSABLE = ""
    return not _UNUSABLE


def mark_unusable(why: str) -> None:
    """After a failed compilation under ``compile="auto"``: run eagerly from now on, and say so once."""
    global _UNUSABLE
    if not _UNUSABLE:
        logging.getLogger("hypergrad").info("compile='auto': compilation failed (%s); running eagerly", why)
    _UNUSABLE = why


def _build(fn, args):
    """Compile ``fn(*args) -> list[Tensor]`` (which may write into its arguments) for arguments of
    exactly these shapes, strides, dtypes and devices."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # fake inputs with a shape environment (static shapes): tracing runs nothing, and
        # inductor can key its on-disk cache of compiled graphs on them
        mode = FakeTensorMode(shape_env=ShapeEnv())
        fake = [mode.from_tensor(a, static_shapes=True) for a in args]
        with mode:
            gm = make_fx(fn, tracing_mode="real")(*fake)
        return torch._inductor.compile(gm, fake, options=_INDUCTOR)


def _layout(args) -> tuple:
    return tuple([(tuple(x.shape), x.stride()) for x in args])


def _tensors(c: dict, inputs) -> list:
    """The tensors among the scalars ``c`` that the kernel computes (not its inputs)."""
    ids = {id(x) for x in inputs}
    out, seen = [], set()
    for v in c.values():
        if isinstance(v, torch.Tensor) and id(v) not in ids and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out


class GroupKernels:
    """The compiled kernels of one param group, cached by the configuration they were built for."""

    def __init__(self, rule):
        self.rule = rule
        self._cache: dict = {}

    def _run(self, key, make, args):
        """Run the kernel of configuration ``key`` on ``args``, compiled on first use for their
        layout. A compiled kernel reads its inputs' memory as the dtypes and devices it was
        built for without checking them (a float64 tensor given to a float32 kernel is read as
        float32; a tensor of another device crashes the process), so these are part of the key.
        Sizes and strides it asserts itself before it touches any tensor: where they no longer
        match (a transposed or channels-last gradient after contiguous ones, a state loaded
        with other strides), the kernel of the new layout is looked up or compiled, and becomes
        the one tried first."""
        key = key + (tuple([(x.dtype, x.device) for x in args]),)
        fn = self._cache.get(key)
        if fn is None:
            fn = self._cache[key] = self._cache[key, _layout(args)] = _build(make(), args)
        try:
            return fn(*args)
        except AssertionError:  # inductor's assert_size_stride: another layout
            lay = _layout(args)
            fn = self._cache.get((key, lay))
            if fn is None:
                fn = self._cache[key, lay] = _build(make(), args)
            self._cache[key] = fn
            return fn(*args)

    # ------------------------------------------------------------------ update
    def update(self, params, grads, states, keys, hvals, names, opts, split=False):
        """In place: ``params[i]`` and ``states[i][k]`` (``k`` in ``keys``) take their new values.

        ``hvals[i]``: the hyperparameter values of tensor ``i`` (in the order of ``names``).
        ``split``: every tensor of the group has taken the same number of steps and every
        hyperparameter is one value for the group (``hvals`` has one row): the rule's
        ``coefficients`` are computed once, from the first tensor's step, and ``apply`` runs for
        every tensor. A ``step`` entry not in ``keys`` is read but not written (the caller
        advances it: a CPU counter beside accelerator tensors).

        An ``hg_*`` entry that the rule sets to an old state tensor (the value before the step,
        which its hyper-gradient needs) is double-buffered: the kernel writes the new state into
        the ``hg_*`` tensor, then the two entries swap, so the old values stay where they are."""
        rule = self.rule
        n = len(params)
        cfg = ("update", keys, names, tuple(sorted(opts.items())), split, n)
        alias = self._cache.get(cfg + ("alias",))
        if alias is None:  # which hg_* entries are old state tensors: ask the (pure) rule once
            alias = self._cache[cfg + ("alias",)] = self._aliases(params[0], grads[0], states[0], keys,
                                                                   hvals[0], names, opts, split)
        dest = {j: k for k, j in alias.items()}        # where each new value is written
        plan = [(k, keys.index(dest.get(k, k))) for k in keys if k not in alias]
        rkeys = keys + (("step",) if "step" in states[0] and "step" not in keys else ())
        args = _flatten(params, grads, states, rkeys, hvals)
        neg = bool(opts.get("maximize"))
        istep = rkeys.index("step") if split else None

        def make():
            def run(*a):
                ps, gs, svals, rows, _ = _unflatten(a, n, len(rkeys), len(hvals), len(names))
                out = []
                if split:
                    c = rule.coefficients(dict(zip(names, rows[0])), svals[0][istep] + 1, opts)
                    out = _tensors(c, a)
                for i in range(n):
                    g = _compute(-gs[i] if neg else gs[i])
                    s = dict(zip(rkeys, svals[i]))
                    if split:
                        new_p, new = rule.apply(_compute(ps[i]), g, s, c, opts)
                    else:
                        new_p, new = rule.update(_compute(ps[i]), g, s, dict(zip(names, rows[i if len(rows) > 1 else 0])),
                                                 opts)
                    ps[i].copy_(new_p)
                    for k, j in plan:
                        svals[i][j].copy_(new[k])
                return out
            return run
        self._run(cfg, make, args)
        for st in states:
            for k, j in alias.items():
                st[k], st[j] = st[j], st[k]

    def _aliases(self, p, g, s, keys, hrow, names, opts, split):
        rule = self.rule
        s0 = {k: s[k] for k in s if k != "hg_record"}
        h0 = dict(zip(names, hrow))
        g0 = _compute(-g if opts.get("maximize") else g)
        p = _compute(p)
        if split:
            _, new = rule.apply(p, g0, s0, rule.coefficients(h0, s0["step"] + 1, opts), opts)
        else:
            _, new = rule.update(p, g0, s0, h0, opts)
        return {k: j for k in keys if k.startswith("hg_") for j in keys if j != k and new[k] is s0[j]}

    # ------------------------------------------------------------------ hyper-gradient
    def terms(self, kind, gts, params, states, keys, hvals, names, learned, opts, dtypes, step=None,
              per_tensor=False):
        """Sums of g_t * d x_s / d q for each name in ``learned``: one row for the group, or one
        row per tensor with ``per_tensor`` (a list of rows of 0-dim tensors).

        ``kind``: ``"closed"`` (the rule's closed form; with ``step``, its scalars computed once
        through ``hyper_coefficients``) or ``"restore"`` (autograd through ``update`` at the
        inputs ``restore`` rebuilds)."""
        rule = self.rule
        n = len(params)
        split = step is not None
        cfg = ("terms", kind, keys, names, learned, tuple(sorted(opts.items())), dtypes, split, per_tensor,
               len(hvals), n)
        args = _flatten(gts, params, states, keys, hvals)
        if split:
            args.append(step)
        neg = bool(opts.get("maximize"))
        nl = len(learned)

        def make():
            def run(*a):
                gs, ps, svals, rows, off = _unflatten(a, n, len(keys), len(hvals), len(names))
                svals = [dict(zip(keys, v)) for v in svals]
                rows = [dict(zip(names, r)) for r in rows]
                gts_ = [_compute(-x if neg else x) for x in gs]
                ps = [_compute(x) for x in ps]
                if kind == "closed":
                    out, extra = _closed(rule, gts_, ps, svals, rows, learned, opts, dtypes,
                                         a[off] if split else None)
                    extra = _tensors(dict(enumerate(extra)), a)
                else:
                    out, extra = _restored(rule, gts_, ps, svals, rows, learned, opts, dtypes)
                if not per_tensor:
                    out = [sum(col[1:], col[0]) for col in zip(*out)]
                    return list(out) + extra
                return [x for row in out for x in row] + extra
            return run
        res = self._run(cfg, make, args)
        if not per_tensor:
            return list(res[:nl])
        return [list(res[i * nl:(i + 1) * nl]) for i in range(n)]


def _flatten(first, second, states, keys, hvals):
    """The flat argument list of a kernel: two lists of n tensors, each tensor's state entries
    ``keys``, then the rows of hyperparameter values."""
    args = list(first) + list(second)
    for s in states:
        args.extend(s[k] for k in keys)
    for row in hvals:
        args.extend(row)
    return args


def _unflatten(a, n, nkeys, nrows, nnames):
    """Inverse of ``_flatten`` inside a kernel: (first, second, per-tensor state tuples,
    hyperparameter rows, the offset of what follows)."""
    off = 2 * n
    svals = [a[off + i * nkeys:off + (i + 1) * nkeys] for i in range(n)]
    off += n * nkeys
    rows = [a[off + r * nnames:off + (r + 1) * nnames] for r in range(nrows)]
    return a[:n], a[n:2 * n], svals, rows, off + nrows * nnames


def _sums(t, learned, dtypes, like):
    from .core import reduce_terms
    return reduce_terms(t, learned, dtypes, [False] * len(learned), like)


def _closed(rule, gts, ps, svals, rows, learned, opts, dtypes, step):
    out = []
    if step is not None:
        c = rule.hyper_coefficients(rows[0], step, opts)
        for gt, p, s in zip(gts, ps, svals):
            out.append(_sums(rule.hyper_apply(gt, p, s, c, opts, learned), learned, dtypes, p))
        return out, list(c.values())
    for i, (gt, p, s) in enumerate(zip(gts, ps, svals)):
        h = rows[i if len(rows) > 1 else 0]
        out.append(_sums(rule.hyper_terms(gt, p, s, h, opts, learned), learned, dtypes, p))
    return out, []


def _restored(rule, gts, ps, svals, rows, learned, opts, dtypes):
    """Autograd through the update at the rebuilt inputs: one leaf per learned value (shared by
    the group, or one per tensor), so the leaves' gradients are the sums."""
    with torch.enable_grad():
        leaves = []
        for row in rows:
            leaves.append({k: row[k].detach().requires_grad_(True) for k in learned})
        outs = []
        for i, (p, s) in enumerate(zip(ps, svals)):
            r = i if len(rows) > 1 else 0
            h = rows[r]
            p0, g0, s0 = rule.restore(p, s, h, opts)
            new_p, _ = rule.update(p0, g0, s0, {**h, **leaves[r]}, opts)
            outs.append(new_p)
        flat = [lf[k] for lf in leaves for k in learned]
        grads = torch.autograd.grad(outs, flat, list(gts), allow_unused=True)
    grads = [torch.zeros_like(x) if gr is None else gr for gr, x in zip(grads, flat)]
    grads = [gr.to(dt) for gr, dt in zip(grads, dtypes * len(leaves))]
    nl = len(learned)
    if len(leaves) == 1:  # shared by the group: the sums are over all tensors already
        return [grads[:nl]] + [[torch.zeros_like(x) for x in grads[:nl]] for _ in ps[1:]], []
    return [grads[i * nl:(i + 1) * nl] for i in range(len(leaves))], []
