"""One pass over memory for a ``one_pass=True`` step of the Adam family on the CPU: the
hyper-gradient of the last update and this step's update in the same loop.

Why hand-written: inductor does not fuse a reduction with the in-place update of the buffers it
reads (tried: 1-D and row-blocked layouts, functional outputs, an artificial dependency), so the
compiled path makes two passes. This kernel reads ``p, g, m, v, g_prev`` and writes
``p, m, v, g_prev`` once: 9 array passes where a fused Adam step makes 7.

It computes, per tensor, with the scalars of the last update (``hyper_coefficients``: ``isb2``,
``eps``, ``ieps``, ``ib1``, ``k1``, ``ib2``, ``k2``, ``sa``) and of this one (``coefficients``),
the sums

    S0 = sum g_t a,   S1 = sum g_t inv_d ((m - g_s) ib1 + m k1),
    S2 = sum g_t a inv_d half ((v - g_s^2) ib2 + v k2),   S3 = sum g_t (x + sa a)

of ``Adam.hyper_apply`` with the scalar factors taken out of the sums (``docs/math.md``), then
``m, v, x`` of ``Adam.apply``. Float32 lanes sum blocks of 4096 elements; blocks add up in
float64. Built with inductor's C++ toolchain (the one ``compile=True`` uses) on first use.
"""

from __future__ import annotations

import torch

_SRC = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <cmath>
#include <omp.h>
using V = at::vec::Vectorized<float>;

static inline float vsum(const V& x) {
  return at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, x);
}

// c: 0 isb2, 1 eps (last), 2 ieps, 3 ib1, 4 k1, 5 ib2, 6 k2, 7 sa,
//    8 w1, 9 b2, 10 w2, 11 ibc2_sqrt, 12 eps (now), 13 step_size, 14 decay, 15 sign of g
extern "C" void kernel(float* p, const float* g, float* m, float* v, float* gs, double* out,
                       const double* c, int64_t n, int64_t flags, int64_t nthreads) {
  const bool dec = flags & 1;       // decoupled weight decay: p *= decay; S3 wanted
  const bool lerp_hi = flags & 2;   // torch.lerp's branch for weights >= 0.5
  const V isb2(c[0]), eps0(c[1]), ieps(c[2]), ib1(c[3]), k1(c[4]), ib2(c[5]), k2(c[6]), sa(c[7]);
  const V w1(c[8]), b2(c[9]), w2(c[10]), ibc2s(c[11]), eps1(c[12]), ss(c[13]), decay(c[14]), sg(c[15]);
  const V om1(1.0f - (float)c[8]);
  const V zero(0.f), one(1.f), half_c(0.5f * (float)c[0]);
  const int64_t B = 4096, L = V::size();
  const int64_t nb = (n + B - 1) / B;
  double S0 = 0, S1 = 0, S2 = 0, S3 = 0;
  #pragma omp parallel for num_threads(nthreads) reduction(+:S0,S1,S2,S3) schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * B, hi = std::min(n, lo + B);
    V s0(0.f), s1(0.f), s2(0.f), s3(0.f);
    for (int64_t i = lo; i < hi; i += L) {
      const int64_t k = std::min(L, hi - i);
      const V gt = sg * V::loadu(g + i, k);
      const V mi = V::loadu(m + i, k), vi = V::loadu(v + i, k), gp = V::loadu(gs + i, k);
      const V pi = V::loadu(p + i, k);
      // the hyper-gradient of the last update (Adam.hyper_apply)
      const V r = vi.sqrt();
      const V d = r * isb2 + eps0;
      const V pos = r > zero;
      const V q = one / V::blendv(one, r * d, pos);
      const V inv_d = V::blendv(ieps, r * q, pos);
      const V a = mi * inv_d;
      const V half = V::blendv(zero, half_c * d * q, pos);
      const V ga = gt * a;
      s0 = s0 + ga;
      s1 = s1 + gt * inv_d * ((mi - gp) * ib1 + mi * k1);
      s2 = s2 + ga * inv_d * half * ((vi - gp * gp) * ib2 + vi * k2);
      if (dec) s3 = s3 + gt * (pi + sa * a);
      // this step's update (Adam.apply)
      const V m2 = lerp_hi ? gt - (gt - mi) * om1 : mi + w1 * (gt - mi);
      const V v2 = vi * b2 + w2 * gt * gt;
      const V den = v2.sqrt() * ibc2s + eps1;
      const V p1 = dec ? pi * decay : pi;
      (p1 - ss * (m2 / den)).store(p + i, k);
      m2.store(m + i, k);
      v2.store(v + i, k);
      gt.store(gs + i, k);
    }
    S0 += vsum(s0); S1 += vsum(s1); S2 += vsum(s2); S3 += vsum(s3);
  }
  out[0] = S0; out[1] = S1; out[2] = S2; out[3] = S3;
}
"""

_KERNEL = None


def _kernel():
    global _KERNEL
    if _KERNEL is None:
        from torch._inductor.codecache import CppPythonBindingsCodeCache
        _KERNEL = CppPythonBindingsCodeCache.load_pybinding(
            ["float*", "const float*", "float*", "float*", "float*", "double*", "const double*",
             "int64_t", "int64_t", "int64_t"], _SRC)
    return _KERNEL


def applies(params, grads, states) -> bool:
    """Whether the kernel can run on these tensors: CPU, float32, dense and contiguous, the
    state of the same layout."""
    for p, g, st in zip(params, grads, states):
        for x in (p, g, st["exp_avg"], st["exp_avg_sq"], st["hg_gprev"]):
            if x.device.type != "cpu" or x.dtype != torch.float32 or x.layout != torch.strided \
                    or not x.is_contiguous() or x.numel() != p.numel():
                return False
    return True


def adam(params, grads, states, hc: dict, c: dict, opts: dict) -> list:
    """Run the kernel over every tensor of a group; return the group's sums S0..S3 (float64)."""
    k = _kernel()
    dec = bool(opts["wd"] and opts["decoupled"])
    w1 = float(c["w1"])
    consts = torch.tensor([float(hc["isb2"]), float(hc["eps"]), float(hc["ieps"]), float(hc["ib1"]),
                           float(hc["k1"]), float(hc["ib2"]), float(hc["k2"]), float(hc["sa"]),
                           w1, float(c["b2"]), float(c["w2"]), float(c["ibc2_sqrt"]), float(c["eps"]),
                           float(c["step_size"]), float(c["decay"]) if dec else 1.0,
                           -1.0 if opts.get("maximize") else 1.0], dtype=torch.float64)
    flags = int(dec) | (2 if w1 >= 0.5 else 0)
    nt = torch.get_num_threads()
    total = torch.zeros(4, dtype=torch.float64)
    out = torch.empty(4, dtype=torch.float64)
    for p, g, st in zip(params, grads, states):
        k(p, g, st["exp_avg"], st["exp_avg_sq"], st["hg_gprev"], out, consts, p.numel(), flags, nt)
        total += out
    return total


class AdamOnePass:
    """The one-pass kernel of ``Adam``/``AdamW`` (``HyperOptimizer.one_pass_kernel``)."""

    NAMES = frozenset({"lr", "beta1", "beta2"})

    @staticmethod
    def covers(opts: dict, names) -> bool:
        # AMSGrad, coupled weight decay and the other learnable names keep the two-pass path
        return not opts["amsgrad"] and not (opts["wd"] and not opts["decoupled"]) and set(names) <= AdamOnePass.NAMES

    applies = staticmethod(applies)

    @staticmethod
    def run(params, grads, states, hc: dict, c: dict, opts: dict, names) -> dict:
        s = adam(params, grads, states, hc, c, opts)
        out = {}
        if "lr" in names:
            lr = -float(hc["ibc1"]) * s[0]
            if opts["wd"] and opts["decoupled"]:
                lr = lr - float(hc["wd"]) * float(hc["idecay"]) * s[3]
            out["lr"] = lr
        if "beta1" in names:
            out["beta1"] = -float(hc["sa"]) * s[1]
        if "beta2" in names:
            out["beta2"] = float(hc["sa"]) * s[2]
        return out
