"""Fused kernels for a param group: ``torch.compile`` of the rule's own functions over the
group's tensor list.

Two kernels per group and configuration, each one pass over memory:

- the update: ``rule.update`` for every tensor, its results copied back into the parameter and
  the state (inductor turns the copies into in-place stores of the same loop);
- the hyper-gradient: ``rule.hyper_terms`` for every tensor, reduced to one sum per tensor and
  hyperparameter.

Where a rule splits its update into scalar ``coefficients`` (bias corrections, step sizes) and
an element-wise ``apply`` (likewise ``hyper_coefficients``/``hyper_apply``), the scalars are
computed once per group: the kernel returns them, which makes inductor store them in buffers
before the loop instead of recomputing ``beta ** t`` for every element. The eager path runs the same functions, so the compiled
kernels compute the same mathematics; tests compare them. Compilation happens on first use
(seconds; inductor caches the code on disk) and again only when shapes, dtypes, options or the
set of learned names change.
"""

from __future__ import annotations

import types

import torch

__all__ = ["GroupKernels"]


# Inductor's defaults store intermediates that are read often or are large expressions in
# buffers of their own, which for a closed form with several reductions (MADA: six) means extra
# passes over memory; these keep each kernel one loop that recomputes instead.
_INDUCTOR = {"realize_reads_threshold": 1000, "realize_cpu_acc_reads_threshold": 1000,
             "realize_cpu_opcount_threshold": 10000, "max_fusion_size": 1024}


def _compile(fn):
    # dynamo keeps its cache of compiled graphs on the code object, and every kernel of every
    # group would share the code of ``run`` (and hit the recompile limit): give each its own
    fn = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__,
                            fn.__closure__)
    return torch.compile(fn, fullgraph=True, dynamic=False, options=_INDUCTOR)


class GroupKernels:
    """Compiled update and hyper-gradient kernels of one param group (a cache keyed by the
    configuration they were built for)."""

    def __init__(self, rule):
        self.rule = rule
        self._cache = {}
        self._alias = {}

    def _get(self, kind, cfg, make):
        fn = self._cache.get((kind, cfg))
        if fn is None:
            fn = self._cache[(kind, cfg)] = _compile(make())
        return fn

    def update(self, params, grads, states, keys, hvals, names, opts, scalar_step=None, step_in_state=False):
        """In place: ``params[i]`` and ``states[i][k]`` for ``k`` in ``keys`` take their new
        values. ``scalar_step``: the common step tensor of the group, where the rule has
        ``coefficients`` and every hyperparameter is one value for the group.

        An ``hg_*`` entry that the rule sets to an old state tensor (the value before the step,
        which its closed form needs) is double-buffered: the kernel writes the new state into
        the ``hg_*`` tensor, then the two entries swap, so the old values stay where they are."""
        rule = self.rule
        keys = tuple(keys)
        # the rule reads the step counter; the caller advances it after the kernel
        rkeys = keys + ("step",) if step_in_state else keys
        cfg = (keys, tuple(names), tuple(sorted(opts.items())), scalar_step is not None, step_in_state)
        alias = self._alias.get(cfg)
        if alias is None:  # which hg_* entries are old state tensors: ask the (pure) rule once
            s0 = {k: states[0][k] for k in rkeys}
            h0 = dict(zip(names, hvals[0]))
            g0 = -grads[0] if opts.get("maximize") else grads[0]
            if scalar_step is not None:
                _, new = rule.apply(params[0], g0, s0, rule.coefficients(h0, scalar_step + 1, opts), opts)
            else:
                _, new = rule.update(params[0], g0, s0, h0, opts)
            alias = self._alias[cfg] = {k: j for k in keys if k.startswith("hg_")
                                        for j in keys if j != k and new[k] is s0[j]}
        dest = {j: k for k, j in alias.items()}          # where each new value is written
        plan = [(k, rkeys.index(dest.get(k, k))) for k in keys if k not in alias]
        svals = [[s[k] for k in rkeys] for s in states]
        if scalar_step is not None:
            fn = self._get("apply", cfg, lambda: _make_apply(rule.coefficients, rule.apply, plan, rkeys, names, opts))
            fn(params, grads, svals, hvals[0], scalar_step)
        else:
            fn = self._get("update", cfg, lambda: _make_update(rule.update, plan, rkeys, names, opts))
            fn(params, grads, svals, hvals)
        for st in states:
            for k, j in alias.items():
                st[k], st[j] = st[j], st[k]

    def terms(self, gts, params, states, keys, hvals, names, learned, opts, dtypes, scalar_step=None,
              per_tensor=True):
        """Sum of g_t * d x / d q per learned name: per tensor (a list of lists of 0-dim tensors),
        or with ``per_tensor=False`` over the whole group (a list of 0-dim tensors)."""
        rule = self.rule
        cfg = (tuple(keys), tuple(names), tuple(learned), tuple(sorted(opts.items())), tuple(dtypes), per_tensor)
        svals = [[s[k] for k in keys] for s in states]
        if scalar_step is not None:
            fn = self._get("happly", cfg, lambda: _make_happly(rule.hyper_coefficients, rule.hyper_apply, keys,
                                                               names, learned, opts, dtypes, per_tensor))
            return fn(gts, params, svals, hvals[0], scalar_step)[0]
        fn = self._get("terms", cfg, lambda: _make_terms(rule.hyper_terms, keys, names, learned, opts, dtypes,
                                                         per_tensor))
        return fn(gts, params, svals, hvals)


def _make_apply(coefficients, apply, plan, keys, names, opts):
    def run(params, grads, svals, hv, step):
        c = coefficients(dict(zip(names, hv)), step + 1, opts)
        for p, g, sv in zip(params, grads, svals):
            new_p, new = apply(p, -g if opts.get("maximize") else g, dict(zip(keys, sv)), c, opts)
            p.copy_(new_p)
            for k, i in plan:
                sv[i].copy_(new[k])
        return c  # returned, so computed once (see the module docstring)
    return run


def _make_update(update, plan, keys, names, opts):
    def run(params, grads, svals, hvals):
        for p, g, sv, hv in zip(params, grads, svals, hvals):
            new_p, new = update(p, -g if opts.get("maximize") else g, dict(zip(keys, sv)),
                                dict(zip(names, hv)), opts)
            p.copy_(new_p)
            for k, i in plan:
                sv[i].copy_(new[k])
    return run


def _sums(t, learned, dtypes, like):
    return [t[n].sum(dtype=dt) if n in t else torch.zeros((), dtype=dt, device=like.device)
            for n, dt in zip(learned, dtypes)]


def _reduce(rows, per_tensor):
    if per_tensor:
        return rows
    return [sum(col[1:], col[0]) for col in zip(*rows)]


def _make_happly(hyper_coefficients, hyper_apply, keys, names, learned, opts, dtypes, per_tensor):
    def run(gts, params, svals, hv, step):
        c = hyper_coefficients(dict(zip(names, hv)), step, opts)
        out = []
        for gt, p, sv in zip(gts, params, svals):
            gt = -gt if opts.get("maximize") else gt
            out.append(_sums(hyper_apply(gt, p, dict(zip(keys, sv)), c, opts, learned), learned, dtypes, p))
        return _reduce(out, per_tensor), c
    return run


def _make_terms(hyper_terms, keys, names, learned, opts, dtypes, per_tensor):
    def run(gts, params, svals, hvals):
        out = []
        for gt, p, sv, hv in zip(gts, params, svals, hvals):
            gt = -gt if opts.get("maximize") else gt
            t = hyper_terms(gt, p, dict(zip(keys, sv)), dict(zip(names, hv)), opts, learned)
            out.append(_sums(t, learned, dtypes, p))
        return _reduce(out, per_tensor)
    return run
