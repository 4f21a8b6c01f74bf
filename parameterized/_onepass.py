"""MADA's one-pass kernel: with ``one_pass=True`` on float32 CPU tensors, the hyper-gradient of
the last update (``MADA.hyper_apply``) and this step's update (``MADA.apply``) in one loop, as
``hypergrad/_onepass.py`` does for the Adam family (whose prelude, loader and sweep it uses).
Its twins: the sums only (the paper's order's hyper-gradient pass) and the update only (the
paper's order's update, ``MadaOnePass.update``).

The kernel reads ``p, g`` and the state ``m, v, n, v_mean, m_lion, g_prev``, ``n_{s-1}`` and the
two sign bytes the closed form saved, and writes all of them back (17 float passes and 4 byte
passes, against a fused AdamW step's 7). Its ten sums and the scalars taken out of them are in
its C++ comments and ``MadaOnePass._kernel``; it makes only those the learned names use (``_need``:
a compile-time mask, one build per set of names).

Where the kernel's arithmetic differs from the eager path's: scalar divisions of the update (by
``t`` and the bias corrections) are multiplications by reciprocals, and what feeds no sign
decision is computed with fused multiply-adds (the running mean, ``v_hat``, the direction, the
parameter's update, the hyper-gradient's terms), so the parameters can differ from the eager
path's in the last bit. What a sign decision (Yogi's, Lion's) reads, now or at a later step
through the state (``g_hat``, ``g2``, ``v``, Lion's momentum and ``u``; ``m`` and ``n`` by
ATen's lerp), is computed as the eager path computes it, bit for bit.
"""

from __future__ import annotations

from hypergrad._onepass import _GROUP_ARGS, _PRELUDE, _applies, _load, _sweep, _variants

_MADA_SRC = _PRELUDE + r"""
// c: the last update's closed-form scalars (from MADA.hyper_coefficients; MadaOnePass.run)
//    0 b3, 1 1/(1 - b3), 2 1/b1 + k1, 3 (1 - b1)/b1 + 1, 4 c, 5 1 - c, 6 1 - b2, 7 iv0, 8 c (as 1 - wc),
//    9 1/bc1, 10 b3/bc3, 11 rho/bc2, 12 (1 - rho)/bc2, 13 eps, 14 1/eps, 15 mix, 16 k2,
//    17 (1 + b3 k3)/bc3, 18 b3/bc3
//    this update's scalars (MADA.coefficients)
//    24 b3, 25 w3, 26 c, 27 wc, 28 w1, 29 b2, 30 w2, 31 1/t, 32 t - 1, 33 rho, 34 wrho, 35 1/bc2,
//    36 1/bc3 (1: reference), 37 1/bc1, 38 eps, 39 lion b2, 40 lion w2, 41 lion b1, 42 lion w1,
//    43 decay, 44 lr, 45 gamma, 46 wgamma, 47 sign of g
// flags: 1 weight decay, 2 reference variant, 4 lerp of m high, 8 lerp of n high, 16 check the gradients first
// out: ten sums over the elements, added to (MadaOnePass.run turns them into the hyper-gradients)
// each tensor (Blocks): p, g, m, v, n, v_mean, m_lion, g_prev, n_{s-1}, Yogi's and Lion's sign bytes
extern "C" void kernel(uintptr_t ptrs, uintptr_t lens, int64_t ntensors, uintptr_t out_, uintptr_t c_,
                       int64_t flags, int64_t nthreads) {
  double* out = reinterpret_cast<double*>(out_);            // (Python buffers: see _sweep)
  const double* c = reinterpret_cast<const double*>(c_);
  const Blocks G(ptrs, lens, ntensors, 11);
  const int64_t B = Blocks::B, L = V::size(), nb = G.count();
  constexpr int NS = 10;
  constexpr unsigned NEED = @NEED@u;  // the sums to make (bit j: sum j; _need)
  // flag 16: the gradients checked first (skip_nonfinite); a non-finite one: out[NS] = 1, nothing written
  if ((flags & 16) && !finite_all(G, 1, nthreads)) { out[NS] = 1; return; }
  double S[NS] = {0};
  #pragma omp parallel num_threads(G.threads(nthreads)) reduction(+:S[:NS])
  {
  // the scalars as each thread's own locals (a shared copy costs a pointer load at every use)
  const bool dec = flags & 1, ref = flags & 2, mhi = flags & 4, nhi = flags & 8;
  const V zero(0.f), one(1.f);
  // the last update
  const V hb3(c[0]), iw3(c[1]), A1(c[2]), B1(c[3]), hc(c[4]), hwc(c[5]), hw2(c[6]), iv0(c[7]);
  const V hc1(c[8]), ibc1(c[9]), nb3(c[10]), vr(c[11]), vmr(c[12]), heps(c[13]), ieps(c[14]);
  const V mix(c[15]), k2(c[16]), K3(c[17]), J3(c[18]);
  // this update
  const V b3(c[24]), w3(c[25]), cc(c[26]), wc(c[27]), w1(c[28]), b2(c[29]), w2(c[30]), it(c[31]);
  const V tm1(c[32]), rho(c[33]), wrho(c[34]), ibc2n(c[35]), ibc3n(c[36]), ibc1n(c[37]), eps(c[38]);
  const V lb2(c[39]), wl2(c[40]), lb1(c[41]), wl1(c[42]), decay(c[43]), lr(c[44]), gam(c[45]);
  const V wgam(c[46]), sgx(c[47] < 0 ? -0.f : 0.f);  // g_t = -g (maximize): a flip of the sign bit
  const V w1m1 = w1 - one, w3m1 = w3 - one;
  using at::vec::fmadd; using at::vec::fmsub; using at::vec::fnmadd;
  #pragma omp for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t tj = G.tensor(b), len = G.lens[tj];
    float* p = G.at<float>(tj, 0);
    const float* g = G.at<const float>(tj, 1);
    float *m = G.at<float>(tj, 2), *v = G.at<float>(tj, 3), *n = G.at<float>(tj, 4), *vm = G.at<float>(tj, 5);
    float *lm = G.at<float>(tj, 6), *gs = G.at<float>(tj, 7), *n0 = G.at<float>(tj, 8);
    int8_t *ys = G.at<int8_t>(tj, 9), *ls = G.at<int8_t>(tj, 10);
    const int64_t lo = (b - G.first[tj]) * B, hi = std::min(len, lo + B);
    V s[NS];
    for (int j = 0; j < NS; ++j) s[j] = zero;
    // the loop's body, inlined twice: for whole vectors (k = L, so that the compiler drops every
    // test of k, 8-12 % of the loop's time) and for the last, partial vector of a block
    auto body = [&](const int64_t i, const int64_t k) __attribute__((always_inline)) {
      const V gt = V::loadu(g + i, k) ^ sgx;
      const V pi = LOAD_P, mi = V::loadu(m + i, k), vi = V::loadu(v + i, k);
      const V ni = V::loadu(n + i, k), vmi = V::loadu(vm + i, k), lmi = V::loadu(lm + i, k);
      const V gp = V::loadu(gs + i, k), nold = V::loadu(n0 + i, k);
      const V sig = load_i8(ys + i, k), lion0 = load_i8(ls + i, k);
      // <update> this step's update (MADA.apply), its square root issued ahead of the
      // hyper-gradient's, its division after it (3-11 % faster than with both after the sums or
      // both before them). What feeds a sign decision, now or at a later step through the state
      // (g_hat, g2, v, Lion's momentum and u; m and n by lerp), is computed as the eager path
      // computes it; the rest uses fused multiply-adds
      const V diff = gt - gp;
      const V gh = gt + b3 * diff;
      const V gh2 = gh * gh;
      const V ysign = vsign(gh2 - vi, zero, one);
      const V g2 = cc * gh2 + wc * (vi + gh2 * ysign);
      const V v2 = vi * b2 + w2 * g2;
      const V vm2 = fmadd(tm1, vmi, v2) * it;
      const V den = (fmadd(rho, v2, wrho * vm2) * ibc2n).sqrt() + eps;
      // </update>
      // <sums> the hyper-gradient of the last update: MADA.hyper_apply with its scalar factors
      // taken out of the sums. m_{s-1}, v_{s-1} and g_s - g_{s-1} rebuilt from the state; with
      // a = g_t / (sqrt(v_hat) + eps) and e = g_t adam / (sqrt(v_hat) (sqrt(v_hat) + eps)),
      // d adam / d v_hat = -adam / (2 sqrt(v_hat) (sqrt(v_hat) + eps)) is -e / 2 per g_t.
      // Sum j adds x[j] y[j] (one fused multiply-add), and only where NEED (the sums the
      // learned names use; a compile-time constant) has bit j: each sum held costs a register
      {
        const V hdiff = fnmadd(hb3, nold, ni) * iw3;
        const V hgh = fmadd(hb3, hdiff, gp);
        const V hgh2 = hgh * hgh;
        const V mixc = fmadd(hwc, sig, hc);
        const V gm = hgh2 * mixc;
        const V v0 = fnmadd(hw2, gm, vi) * iv0;
        const V vh = fmadd(vi, vr, vmi * vmr);
        const V r = vh.sqrt();
        const V pos = r > zero;
        const V q = one / V::blendv(one, r * (r + heps), pos);
        const V inv_d = V::blendv(ieps, r * q, pos);
        const V a = gt * inv_d;
        const V t0 = a * fmadd(mi, ibc1, ni * nb3);
        const V e = V::blendv(zero, t0 * q, pos);
        V x[NS] = {t0, gt, gt, fmsub(mi, A1, gp * B1), fmadd(fmsub(hc1, v0, gm), mix, vh * k2),
                   fmadd(ni, K3, (nold - hdiff) * J3), mixc * hgh * hdiff, fmsub(hgh2, one - sig, v0),
                   vi - vmi, t0};
        V y[NS] = {one, lion0, pi, a, e, a, e, e, e, inv_d};
        if (k < L) {  // the lanes past the end: zeros, whose products can be 0 * inf where eps = 0
          const V in = lanes(k);
          for (int j = 0; j < NS; ++j) {
            x[j] = V::blendv(zero, x[j], in);
            y[j] = V::blendv(zero, y[j], in);
          }
        }
        if (NEED & 1) s[0] = s[0] + x[0];
        for (int j = 1; j < NS; ++j)
          if ((NEED >> j) & 1) s[j] = fmadd(x[j], y[j], s[j]);
      }
      // </sums>
      // <update>
      const V m2 = lerp(mi, gt, w1, w1m1, mhi);
      const V n2 = lerp(ni, diff, w3, w3m1, nhi);
      const V adam = fmadd(m2, ibc1n, b3 * (n2 * ibc3n)) / den;
      const V lm2 = lmi * lb2 + wl2 * gt;
      const V u = (ref ? lm2 : lmi) * lb1 + wl1 * gt;
      const V lion = vsign(u, zero, one);
      const V p1 = dec ? pi * decay : pi;
      fnmadd(lr, fmadd(gam, adam, wgam * lion), p1).store(p + i, k);
      m2.store(m + i, k);
      v2.store(v + i, k);
      n2.store(n + i, k);
      vm2.store(vm + i, k);
      lm2.store(lm + i, k);
      gt.store(gs + i, k);
      ni.store(n0 + i, k);
      store_i8(ys + i, ysign, k);
      store_i8(ls + i, lion, k);
      // </update>
    };
    int64_t i = lo;
    for (; i + L <= hi; i += L) body(i, L);
    if (i < hi) body(i, hi - i);
    for (int j = 0; j < NS; ++j) S[j] += vsum(s[j]);
  }
  }
  for (int j = 0; j < NS; ++j) out[j] += S[j];
}
"""

# the templates of the one-pass kernel, its sums-only twin and its update-only twin (_variants),
# whose @NEED@ _source fills in
_MADA_SRC, _MADA_SUMS_SRC, _MADA_UPDATE_SRC = _variants(_MADA_SRC, "((NEED >> 2) & 1 ? V::loadu(p + i, k) : zero)")
# the sums each hyper-gradient uses (MadaOnePass._kernel: 0 g adam, 1 g lion, 2 g x, 3 beta1's,
# 4 beta2's, 5 and 6 beta3's, 7 c's, 8 rho's, 9 eps's); lr uses g x only with weight decay
_SUMS_OF = {"lr": (0, 1), "weight_decay": (0, 1, 2), "gamma": (0, 1), "beta1": (3,), "beta2": (4,),
            "beta3": (5, 6), "c": (7,), "rho": (8,), "eps": (9,)}


def _need(names, dec: bool) -> int:
    """The mask of the sums that the hyper-gradients of ``names`` use."""
    bits = {j for n in names for j in _SUMS_OF[n]} | ({2} if dec and "lr" in names else set())
    return sum(1 << j for j in bits)


def _source(template: str, need: int) -> str:
    """A kernel's source, making only the sums of mask ``need``: each sum held costs a register
    in the loop, where AVX2 has 16 (the default six coefficients use 8 of the 10)."""
    return template.replace("@NEED@", str(need))


_MADA_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_diff", "v_mean", "lion_exp_avg", "previous_grad", "hg_n")
_MADA_BYTES = ("hg_ysign", "hg_sign")
_MADA_ARGS = _GROUP_ARGS


class MadaOnePass:
    """The one-pass kernel of ``MADA`` (``HyperOptimizer.one_pass_kernel``): reads ``p, g`` and the
    state ``m, v, n, v_mean, m_lion, g_prev`` with what the closed form saved (``n_{s-1}``, Yogi's
    and Lion's signs), writes them back, and returns the closed form's sums (float64)."""

    NAMES = frozenset({"lr", "beta1", "beta2", "beta3", "c", "rho", "gamma", "eps", "weight_decay"})

    @staticmethod
    def covers(opts: dict, names) -> bool:
        return set(names) <= MadaOnePass.NAMES

    @staticmethod
    def applies(params, grads, states, memo=None) -> bool:
        return _applies(params, grads, states, _MADA_KEYS, _MADA_BYTES, memo)

    @staticmethod
    def run(params, grads, states, hc: dict, c: dict, opts: dict, names, memo=None, check=False) -> dict | None:
        """Update the group in place; return the hyper-gradients of ``names`` (floats). ``check``:
        None, and nothing written, where a gradient is not finite."""
        return MadaOnePass._kernel(params, grads, states, hc, c, opts, names, memo, check)

    @staticmethod
    def hyper_sums(params, grads, states, hc: dict, opts: dict, names, memo=None) -> dict:
        """The hyper-gradients of ``names`` of the last update, reading the group only (the
        paper's order: its update follows, in the update kernel)."""
        return MadaOnePass._kernel(params, grads, states, hc, None, opts, names, memo)

    @staticmethod
    def update(params, grads, states, c: dict, opts: dict, memo=None) -> None:
        """This step's update in place (the scalars ``c`` as floats), with what the closed form
        saves for the next hyper-gradient: the one-pass kernel without its sums (the paper's
        order, after the hyper-step)."""
        MadaOnePass._kernel(params, grads, states, None, c, opts, (), memo)

    @staticmethod
    def _kernel(params, grads, states, hc: dict | None, c: dict | None, opts: dict, names, memo=None,
                check=False) -> dict | None:
        f = hc  # the last update's scalars (None: the update only); c: this one's (floats), None for the sums only
        ref, dec = bool(opts["reference"]), bool(opts["wd"])
        if f is None:
            consts = [0.0] * 24
        else:
            ibc3, k3 = (1.0, 0.0) if ref else (f["ibc3"], f["k3"])
            # the weight of v in v_hat (running mean included), over the bias correction
            mix = (f["rho"] if ref else f["rho"] + f["wrho"] * f["it"]) * f["ibc2"]
            consts = [f["b3"], f["iw3"], f["ib1"] + f["k1"], f["w1"] * f["ib1"] + 1.0, f["c"], f["wc"], f["w2"],
                      f["iv0"], 1.0 - f["wc"], f["ibc1"], f["b3"] * ibc3, f["rho"] * f["ibc2"],
                      f["wrho"] * f["ibc2"], f["eps"], f["ieps"], mix, f["k2"], ibc3 * (1.0 + f["b3"] * k3),
                      f["b3"] * ibc3] + [0.0] * 5
        if c is not None:
            e = c
            consts += [e["b3"], e["w3"], e["c"], e["wc"], e["w1"], e["b2"], e["w2"], e["it"], e["tm1"], e["rho"],
                       e["wrho"], e["ibc2"], 1.0 if ref else e["ibc3"], e["ibc1"], e["eps"], e["lb2"], e["wl2"],
                       e["lb1"], e["wl1"], e["decay"] if dec else 1.0, e["lr"], e["gamma"], e["wgamma"]]
            flags = int(dec) | (2 if ref else 0) | (4 if e["w1"] >= 0.5 else 0) | (8 if e["w3"] >= 0.5 else 0)
        else:
            consts += [0.0] * 23
            flags = int(dec) | (2 if ref else 0)
        consts.append(-1.0 if opts.get("maximize") else 1.0)
        src = _source(_MADA_SUMS_SRC if c is None else _MADA_SRC if f is not None else _MADA_UPDATE_SRC,
                      _need(names, dec))
        s = _sweep(_load(src, _MADA_ARGS), params, grads, states,
                   _MADA_KEYS + _MADA_BYTES, consts, flags, 10, memo, check)
        if s is None or f is None:
            return None
        # the sums: 0 g adam, 1 g lion, 2 g x, 3 beta1's, 4 beta2's, 5 and 6 beta3's two terms, 7 c's,
        # 8 rho's, 9 eps's (kernel comments); with lr gamma g_t d adam / d v_hat = -e / 2
        lr, gam, wv = f["lr"], f["gamma"], mix * f["w2"]
        direction = gam * s[0] + f["wgamma"] * s[1]
        idecay = 1.0 / f["decay"] if dec else 1.0
        xprev = idecay * (s[2] + lr * direction)  # the sum of g_t x_{s-1}
        res = {"lr": -(direction + f["wd"] * xprev) if dec else -direction,
               "weight_decay": -lr * xprev, "gamma": -lr * (s[0] - s[1]),
               "beta1": -lr * gam * f["ibc1"] * s[3], "beta2": 0.5 * lr * gam * s[4],
               "beta3": -lr * gam * s[5] + lr * gam * wv * s[6], "c": 0.5 * lr * gam * wv * s[7],
               "rho": 0.5 * lr * gam * f["ibc2"] * s[8], "eps": lr * gam * s[9]}
        return {n: res[n] for n in names}
