"""One pass over memory for a ``one_pass=True`` step on the CPU: the hyper-gradient of the last
update and this step's update in the same loop, for the Adam family here and for MADA in
``parameterized/_onepass.py`` (which uses this module's prelude, loader and sweep).

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
``m, v, x`` of ``Adam.apply``. With ``a = m / d``, ``half = isb2 / (2 r)`` (``r = sqrt(v)``,
``d = r isb2 + eps``) the loop sums five products that hold no scalar factor,

    S0,  P = sum g_t g_s / d,  Q1 = sum g_t m r / d^2,  Q2 = sum g_t m g_s^2 / (d^2 r),  X = sum g_t x,

and ``S1 = (ib1 + k1) S0 - ib1 P``, ``S2 = isb2 ((ib2 + k2) Q1 - ib2 Q2) / 2``, ``S3 = X + sa S0``
follow (``adam``): 9 vector multiplications an element where the sums as written took 17, in a
loop where each operation added costs about a cycle (6 % of the kernel's time at 262,144 and at
10M parameters; in cache the loop is bound by its out-of-order window, ``docs/benchmarks.md``).
``Q1``'s terms are ``Q2``'s factor ``F = g_t m / (d^2 r)`` times ``v`` (``r^2``), so one
division ``q = 1 / (r d)`` gives ``1 / d = r q`` and ``F = (g_t m / d) q``.
The price: ``S2`` subtracts two sums where the closed form
subtracts per element, so where ``v`` and ``g_s^2`` nearly cancel everywhere its float32
rounding grows (a review measured 2.1e-6 relative against 7e-7, 200k elements with
``v = g_s^2``), still at the level of float32 sums. The sums end in fused multiply-adds (the
update's arithmetic is torch's, unfused: with hyper-lr 0 the step is torch's AdamW step). Float32
lanes sum blocks of 4096 elements; blocks add up in float64. The loop runs over whole vectors,
with the last, partial vector of a block apart (one body inlined twice), so that no test of the
vector's length is left in it. Built with inductor's C++ toolchain (the one ``compile=True``
uses) on first use.

Each one-pass kernel has a sums-only twin (``_variants``: the same loop without its update),
which the paper's order runs before its update (inductor's CPU reductions ran at a third of
memory speed on AVX2), and an update-only twin, which makes that update
(``AdamOnePass.update``, ``MadaOnePass.update``: inductor's update call checks every input's
size and stride). The module also holds the finiteness check of the gradients (``finite_all``,
which the one-pass kernels also run first under ``skip_nonfinite``) and the step counters'
increment (``advance_steps``).
"""

from __future__ import annotations

import array
import bisect
import operator
import re
import weakref

import torch

# what both kernels share: ATen's vector type, a horizontal sum, torch.sign and torch.lerp as
# ATen computes them, sign bytes, and a mask of the lanes of a vector that lie inside the tensor
_PRELUDE = r"""
#include <torch/csrc/inductor/cpp_prefix.h>
#include <algorithm>
#include <cmath>
#include <vector>
#include <omp.h>
using V = at::vec::Vectorized<float>;

static inline float vsum(const V& x) {
  return at::vec::vec_reduce_all<float>([](V& a, V& b) { return a + b; }, x);
}
static inline V vsign(const V& x, const V& zero, const V& one) {  // torch.sign: 0 at 0
  return (one & (x > zero)) - (one & (x < zero));  // (bitwise: a blend takes a multiply's pipe on Zen 3)
}
// torch.lerp's two branches (ATen's lerp_vec, for a scalar weight; wm1 = w - 1)
static inline V lerp(const V& a, const V& b, const V& w, const V& wm1, bool hi) {
  return hi ? at::vec::fmadd(wm1, b - a, b) : at::vec::fmadd(w, b - a, a);
}
// sign bytes (-1, 0, 1) to and from a float vector: one load or store of V::size() bytes. The
// generic at::vec conversion between int8 and float vectors of different lane counts ran at a
// third of memory speed on AVX2 (MADA's kernel lost 22 ms of 75 to it at 10M parameters)
static inline V load_i8(const int8_t* x, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  if (k == V::size())
    return V(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)x))));
#elif defined(CPU_CAPABILITY_AVX2)
  if (k == V::size())
    return V(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)x))));
#endif
  float t[V::size()] = {0};
  for (int64_t j = 0; j < k; ++j) t[j] = (float)x[j];
  return V::loadu(t);
}
static inline void store_i8(int8_t* x, const V& s, int64_t k) {
#if defined(CPU_CAPABILITY_AVX512)
  if (k == V::size()) {
    _mm_storeu_si128((__m128i*)x, _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(s)));
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (k == V::size()) {
    const __m256i w = _mm256_cvtps_epi32(s);
    const __m128i h = _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1));
    _mm_storel_epi64((__m128i*)x, _mm_packs_epi16(h, h));
    return;
  }
#endif
  float t[V::size()];
  s.store(t);
  for (int64_t j = 0; j < k; ++j) x[j] = (int8_t)t[j];
}
// a group's tensors as one range of blocks of B elements, so that one call and one parallel
// loop cover the group: tensor j holds k arrays, at addresses ptrs[j k .. j k + k), of lens[j]
// elements, and blocks first[j] .. first[j + 1] (one call per tensor cost 3-4 us of Python and
// a parallel region each; a model has tens to hundreds of tensors)
struct Blocks {
  static constexpr int64_t B = 4096;
  const uint64_t* ptrs;
  const int64_t* lens;
  int64_t nt, k;
  std::vector<int64_t> first;
  Blocks(uintptr_t p, uintptr_t l, int64_t nt_, int64_t k_)
      : ptrs(reinterpret_cast<const uint64_t*>(p)), lens(reinterpret_cast<const int64_t*>(l)), nt(nt_), k(k_),
        first(nt_ + 1, 0) {
    for (int64_t j = 0; j < nt; ++j) first[j + 1] = first[j] + (lens[j] + B - 1) / B;
  }
  int64_t count() const { return first[nt]; }
  int64_t threads(int64_t want) const { return std::max<int64_t>(1, std::min<int64_t>(want, count())); }
  int64_t tensor(int64_t b) const {  // the tensor of block b (empty tensors have no block)
    return std::upper_bound(first.begin(), first.end(), b) - first.begin() - 1;
  }
  template <typename T> T* at(int64_t j, int64_t a) const { return reinterpret_cast<T*>(ptrs[j * k + a]); }
};
// the first k lanes (the lanes of a last, partial vector past the end hold zeros, which make
// 0 * inf where eps = 0: the sums leave them out)
static inline V lanes(int64_t k) {
  float ones[V::size()];
  for (int64_t j = 0; j < V::size(); ++j) ones[j] = 1.f;
  return V::loadu(ones, k) > V(0.f);
}
// whether every element of array a of every tensor of G (float32, read as bits) is finite: the
// largest |x| as the bits say it (integer operations, unaffected by any floating-point flag):
// inf is 0x7f800000 and NaN above, every finite value below. One read; each thread reads its
// share of each tensor as eight streams at once, an eighth each: one stream is bound by the
// latency of its misses (10.8 GB/s on an EPYC core, 18.0 GB/s with four, 20.0 GB/s with eight)
static bool finite_all(const Blocks& G, int64_t a, int64_t nthreads) {
  using VI = at::vec::Vectorized<int32_t>;
  const VI absm(0x7fffffff);
  const int64_t L = VI::size();
  int64_t total = 0;
  for (int64_t j = 0; j < G.nt; ++j) total += G.lens[j];
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(nthreads, total / (4096 * L)));
  int32_t top = 0;
  #pragma omp parallel for num_threads(nt) reduction(max:top) schedule(static)
  for (int64_t t = 0; t < nt; ++t) {
    VI a0(0), a1(0), a2(0), a3(0);
    for (int64_t j = 0; j < G.nt; ++j) {
      const int32_t* x = G.at<const int32_t>(j, a);
      const int64_t n = G.lens[j], nv = n / L;              // whole vectors
      const int64_t v0 = nv * t / nt, v1 = nv * (t + 1) / nt;
      const int64_t q = (v1 - v0) / 8;                       // vectors per stream
      const int32_t* s0 = x + v0 * L;
      const int32_t* s1 = s0 + q * L;
      const int32_t* s2 = s1 + q * L;
      const int32_t* s3 = s2 + q * L;
      const int32_t* s4 = s3 + q * L;
      const int32_t* s5 = s4 + q * L;
      const int32_t* s6 = s5 + q * L;
      const int32_t* s7 = s6 + q * L;
      for (int64_t i = 0; i < q * L; i += L) {
        a0 = at::vec::maximum(a0, VI::loadu(s4 + i) & absm);
        a1 = at::vec::maximum(a1, VI::loadu(s5 + i) & absm);
        a2 = at::vec::maximum(a2, VI::loadu(s6 + i) & absm);
        a3 = at::vec::maximum(a3, VI::loadu(s7 + i) & absm);
        a0 = at::vec::maximum(a0, VI::loadu(s0 + i) & absm);
        a1 = at::vec::maximum(a1, VI::loadu(s1 + i) & absm);
        a2 = at::vec::maximum(a2, VI::loadu(s2 + i) & absm);
        a3 = at::vec::maximum(a3, VI::loadu(s3 + i) & absm);
      }
      for (int64_t i = (v0 + 8 * q) * L; i < v1 * L; i += L)  // the vectors left over
        a0 = at::vec::maximum(a0, VI::loadu(x + i) & absm);
      if (t == nt - 1 && nv * L < n)                         // the last, partial vector: its lanes
        a0 = at::vec::maximum(a0, VI::loadu(x + nv * L, n - nv * L) & absm);  // past the end load as 0
    }
    int32_t m[VI::size()];
    at::vec::maximum(at::vec::maximum(a0, a1), at::vec::maximum(a2, a3)).store(m);
    for (int64_t j = 0; j < L; ++j) top = std::max(top, m[j]);
  }
  return top < 0x7f800000;
}
"""

_SRC = _PRELUDE + r"""
// c: 0 isb2, 1 eps (last), 2 ieps, 3-7 (unused here: _adam_hypergrads applies them),
//    8 w1, 9 b2, 10 w2, 11 ibc2_sqrt, 12 eps (now), 13 step_size, 14 decay, 15 sign of g
// flags: 1 decoupled weight decay, 2 lerp's high branch, 16 check the gradients first
// each tensor: p, g, m, v, g_s (Blocks)
extern "C" void kernel(uintptr_t ptrs, uintptr_t lens, int64_t ntensors, uintptr_t out_, uintptr_t c_,
                       int64_t flags, int64_t nthreads) {
  double* out = reinterpret_cast<double*>(out_);            // (Python buffers: see _sweep)
  const double* c = reinterpret_cast<const double*>(c_);
  const Blocks G(ptrs, lens, ntensors, 5);
  const int64_t B = Blocks::B, L = V::size(), nb = G.count();
  // flag 16: the gradients checked first (skip_nonfinite); a non-finite one: out[5] = 1, nothing written
  if ((flags & 16) && !finite_all(G, 1, nthreads)) { out[5] = 1; return; }
  double S0 = 0, S1 = 0, S2 = 0, S3 = 0, S4 = 0;
  #pragma omp parallel num_threads(G.threads(nthreads)) reduction(+:S0,S1,S2,S3,S4)
  {
  // the scalars as each thread's own locals: declared outside the parallel region, every use
  // went through a pointer to the shared copy (7-15 % of the kernel's time on AVX2)
  const bool dec = flags & 1;       // decoupled weight decay: p *= decay; S3 wanted
  const bool lerp_hi = flags & 2;   // torch.lerp's branch for weights >= 0.5
  const V isb2(c[0]), eps0(c[1]), ieps(c[2]);
  const V w1(c[8]), b2(c[9]), w2(c[10]), ibc2s(c[11]), eps1(c[12]), ss(c[13]), decay(c[14]);
  const V zero(0.f), one(1.f), sgx(c[15] < 0 ? -0.f : 0.f);  // g_t = -g (maximize): a flip of the sign bit
  const V w1m1 = w1 - one;
  #pragma omp for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t j = G.tensor(b), n = G.lens[j];
    float* p = G.at<float>(j, 0);
    const float* g = G.at<const float>(j, 1);
    float *m = G.at<float>(j, 2), *v = G.at<float>(j, 3), *gs = G.at<float>(j, 4);
    const int64_t lo = (b - G.first[j]) * B, hi = std::min(n, lo + B);
    V s0(0.f), s1(0.f), s2(0.f), s3(0.f), s4(0.f);
    // the loop's body, inlined twice: for whole vectors (k = L, so that the compiler drops every
    // test of k) and for the last, partial vector of a block
    auto body = [&](const int64_t i, const int64_t k) __attribute__((always_inline)) {
      const V gt = V::loadu(g + i, k) ^ sgx;
      const V mi = V::loadu(m + i, k), vi = V::loadu(v + i, k), gp = V::loadu(gs + i, k);
      const V pi = LOAD_P;
      // the hyper-gradient of the last update (Adam.hyper_apply), in five sums whose scalar
      // factors (ib1, k1, ib2, k2, sa) AdamOnePass applies afterwards (fewer multiplications),
      // each added by a fused multiply-add where it ends in a product (the update's arithmetic
      // is torch's, unfused). This step's square root and division are issued among the first
      // operations: with them after the sums, the operations that wait on the two square roots
      // and divisions filled the FP scheduler (llvm-mca -mcpu=znver3) and the loop ran 5-8 %
      // slower in cache (benchmarks/kernels.py). The marked parts: what the sums-only and
      // update-only twins drop
      // <sums>
      const V r = vi.sqrt();
      // </sums>
      // <update>
      const V v2 = vi * b2 + w2 * gt * gt;
      const V sv2 = v2.sqrt();
      // </update>
      // <sums>
      const V d = at::vec::fmadd(r, isb2, eps0);
      const V pos = r > zero;
      const V q = one / V::blendv(one, r * d, pos);
      // </sums>
      // <update>
      const V m2 = lerp(mi, gt, w1, w1m1, lerp_hi);
      const V u = m2 / (sv2 * ibc2s + eps1);
      // </update>
      // <sums>
      const V inv_d = V::blendv(ieps, r * q, pos);  // 1 / d
      V A = gt * inv_d;
      V t0 = A * mi;                                // g_t m / d
      // the sums: t0, A g_s (g_t g_s / d), F v (g_t m v / (d^2 r), the g_t m r / d^2 of the
      // closed form), F g_s^2 (g_t m g_s^2 / (d^2 r)), gx x (g_t x); F is 0 where v = 0. (F = t0 q
      // in one product where t0 / d and its products by r and 1 / r took three: 4-7 % in cache)
      V F = t0 * q & pos;
      V gq = gp, gg = gp * gp, gx = gt;
      if (k < L) {  // the lanes past the end: zeros, whose products can be 0 * inf where eps = 0
        const V in = lanes(k);
        t0 = V::blendv(zero, t0, in); A = V::blendv(zero, A, in); gq = V::blendv(zero, gq, in);
        F = V::blendv(zero, F, in); gg = V::blendv(zero, gg, in);
        gx = V::blendv(zero, gx, in);
      }
      s0 = s0 + t0;
      s1 = at::vec::fmadd(A, gq, s1);
      s2 = at::vec::fmadd(F, vi, s2);
      s3 = at::vec::fmadd(F, gg, s3);
      if (dec) s4 = at::vec::fmadd(gx, pi, s4);
      // </sums>
      // <update> this step's update (Adam.apply), with m2, v2 and m2 / den from above
      const V p1 = dec ? pi * decay : pi;
      (p1 - ss * u).store(p + i, k);
      m2.store(m + i, k);
      v2.store(v + i, k);
      gt.store(gs + i, k);
      // </update>
    };
    int64_t i = lo;
    for (; i + L <= hi; i += L) body(i, L);
    if (i < hi) body(i, hi - i);
    S0 += vsum(s0); S1 += vsum(s1); S2 += vsum(s2); S3 += vsum(s3); S4 += vsum(s4);
  }
  }
  out[0] += S0; out[1] += S1; out[2] += S2; out[3] += S3; out[4] += S4;
}
"""

_KERNELS: dict = {}


def _variants(src: str, p_when_sums: str = "V::loadu(p + i, k)") -> tuple[str, str, str]:
    """The one-pass kernel of ``src``, its sums-only twin and its update-only twin: the same loop
    without the parts between ``// <update>`` and ``// </update>`` (it writes nothing; the
    paper's order runs it before its update), or without those between ``// <sums>`` and
    ``// </sums>`` (the paper's order's update, after its hyper-step; it writes what the
    one-pass kernel writes and returns zero sums; where ``src`` marks no sums it is the one-pass
    kernel). ``LOAD_P`` in ``src`` is how each reads the parameter."""
    def drop(text, tag):
        out = re.sub(rf"// <{tag}>.*?// </{tag}>", "", text, flags=re.S)
        assert f"<{tag}>" not in out and f"</{tag}>" not in out
        return out

    def plain(text):
        for tag in ("update", "sums"):
            text = text.replace(f"// <{tag}>", "//").replace(f"// </{tag}>", "//")
        return text
    full = "V::loadu(p + i, k)"
    return (plain(src).replace("LOAD_P", full), plain(drop(src, "update")).replace("LOAD_P", p_when_sums),
            plain(drop(src, "sums")).replace("LOAD_P", full))


def _load(src: str, argtypes: list):
    """The kernel of ``src``, compiled on first use (inductor's C++ toolchain and disk cache)."""
    k = _KERNELS.get(src)
    if k is None:
        from torch._inductor.codecache import CppPythonBindingsCodeCache
        k = _KERNELS[src] = CppPythonBindingsCodeCache.load_pybinding(argtypes, src)
    return k


def _applies(params, grads, states, keys, byte_keys=(), memo=None) -> bool:
    """Whether a kernel can run on these tensors: ``p``, ``g`` and the state's ``keys`` float32
    and ``byte_keys`` int8, all CPU, dense, contiguous, of ``p``'s size, and no two of them
    overlapping in memory (the kernel writes them in place). Called every step.

    ``memo`` (a dict kept by the caller for the group): the parameters, state tensors and step
    counters found fit at the last call, by identity (weak references whose death clears the
    memo, so an id seen is the same object), every one's address and the parameters' size,
    contiguity and dtype (``.data`` can be replaced); where they are the same, only the gradients
    are checked (a model's gradients are new tensors at every backward), against the spans
    recorded. (Not seen: a state tensor given storage of another size or dtype at the address it
    had, which takes two ``.data`` replacements with the first storage freed in between.) The
    memo also keeps what ``_sweep`` and ``advance_steps`` reuse: the arrays' addresses (the
    gradients' slots left to fill) and lengths, the step counters' addresses.

    The check of the memo reads each object once through C-level maps (``operator.itemgetter``,
    ``map``): 19 us a step for 8 tensors where the loops over them took 24, the largest of the
    fixed costs of a one-level step (``benchmarks/kernels.py --levels``)."""
    f32, i8, strided = torch.float32, torch.int8, torch.strided
    allkeys = keys + tuple(byte_keys)
    static = memo.get("static") if memo is not None else None
    if static is not None:
        objs = list(params)
        try:
            for st in states:
                objs.extend(static[8](st))  # the state's keys and "step", as when the memo was made
        except KeyError:
            objs = None
        # (the same ids: the same objects, which the weak references keep alive; then their
        # addresses, and the parameters' size, layout and dtype)
        if objs is None or static[5][0] != allkeys or list(map(id, objs)) != static[0] \
                or list(map(_DATA_PTR, objs)) != static[1] \
                or list(map(_NUMEL, params)) != static[6].tolist() or not all(map(_CONTIGUOUS, params)) \
                or any(p.dtype is not f32 for p in params):
            static = None
    if static is None:  # check the parameters and the state in full
        spans = []
        for p, st in zip(params, states):
            n = p.numel()
            xs = tuple(st.get(k) for k in allkeys)
            for x, dtype, size in [(p, f32, 4)] + [(x, f32 if j < len(keys) else i8, 4 if j < len(keys) else 1)
                                                   for j, x in enumerate(xs)]:
                if x is None or x.dtype is not dtype or not x.is_cpu or x.layout is not strided \
                        or not x.is_contiguous() or x.numel() != n:
                    return False
                if n:
                    spans.append((x.data_ptr(), x.data_ptr() + size * n))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            return False
        # the memo reads the state's tensors and its "step" where every state has a tensor one,
        # the tensors alone where none has one (an optimizer's own state has it)
        steps = [isinstance(st.get("step"), torch.Tensor) for st in states]
        if memo is not None and (all(steps) or not any("step" in st for st in states)):
            getter = _getter(allkeys + ("step",) if all(steps) else allkeys)
            objs = list(params)
            for st in states:
                objs.extend(getter(st))
            clear = lambda _, memo=memo: memo.pop("static", None)  # noqa: E731
            ptrs = _addresses(params, None, states, allkeys)  # the gradients' slots 0
            # (ids, addresses, the weak references that keep the ids meaningful, span starts,
            #  ends, the addresses and their keys, the lengths, the step counters, the getter of
            #  the state's tensors)
            memo["static"] = static = ([id(x) for x in objs], [x.data_ptr() for x in objs],
                                       [weakref.ref(x, clear) for x in objs],
                                       [a for a, _ in spans], [b for _, b in spans], (allkeys, ptrs),
                                       array.array("q", [p.numel() for p in params]), _steps_of(states), getter)
        else:
            if memo is not None:
                memo.pop("static", None)
            static = (None, None, None, [a for a, _ in spans], [b for _, b in spans])
    starts, ends = static[3], static[4]
    for p, g in zip(params, grads):
        if g.dtype is not f32 or not g.is_cpu or g.layout is not strided or not g.is_contiguous():
            return False
    if list(map(_NUMEL, grads)) != list(map(_NUMEL, params)):
        return False
    for lo, n in zip(map(_DATA_PTR, grads), map(_NUMEL, grads)):
        # [lo, hi) against the sorted, disjoint spans: the one starting before hi, and its end
        if n:
            j = bisect.bisect_left(starts, lo + 4 * n) - 1
            if j >= 0 and ends[j] > lo:
                return False
    return True


_DATA_PTR, _NUMEL, _CONTIGUOUS = torch.Tensor.data_ptr, torch.Tensor.numel, torch.Tensor.is_contiguous


def _getter(keys: tuple):
    """A function of a state dict giving the tuple of its values at ``keys`` (KeyError where one
    is missing): ``operator.itemgetter``, which gives a bare value for one key."""
    if len(keys) > 1:
        return operator.itemgetter(*keys)
    return (lambda st, k=keys[0]: (st[k],)) if keys else (lambda st: ())


def _addresses(params, grads, states, keys) -> array.array:
    """The arrays' addresses in the kernels' order (``Blocks``): for each tensor ``p``, ``g`` (0
    where ``grads`` is None: the memo's template) and the state's ``keys``."""
    ptrs = array.array("Q")  # (addresses: unsigned)
    for j, (p, st) in enumerate(zip(params, states)):
        ptrs.append(p.data_ptr())
        ptrs.append(0 if grads is None else grads[j].data_ptr())
        ptrs.extend([st[k].data_ptr() for k in keys])
    return ptrs


def _steps_of(states):
    """The step counters' addresses, float32 ones and float64 ones (``advance_steps``), where
    every counter is a one-element CPU tensor of either dtype that needs no gradient; else None."""
    f32, f64 = array.array("Q"), array.array("Q")
    for st in states:
        s = st.get("step")
        if not isinstance(s, torch.Tensor) or not s.is_cpu or s.numel() != 1 or s.layout is not torch.strided \
                or s.requires_grad or s.dtype not in (torch.float32, torch.float64):
            return None
        (f32 if s.dtype is torch.float32 else f64).append(s.data_ptr())
    return f32, f64


def _sweep(kernel, params, grads, states, keys, consts: list, flags: int, nsums: int, memo=None,
           check: bool = False) -> list | None:
    """Run ``kernel`` over every tensor of a group, in one call (``Blocks``); return the group's
    sums (float64).

    The scalars and the sums travel in Python ``array`` buffers, passed by address (a float64
    tensor made from a list and read back cost 20-40 us a step). ``memo``: the group's memo,
    which ``_applies`` checked for these tensors in this step; the arrays' addresses and lengths
    come from it, and only the gradients' are read. ``check``: the kernel reads every gradient
    before it writes anything (its flag 16) and returns None, having written nothing, where one
    is not finite."""
    c = array.array("d", consts)
    out = array.array("d", bytes(8 * (nsums + 1)))  # zeros: the kernel adds its sums to it; then the flag
    static = memo.get("static") if memo is not None else None
    if static is not None and static[5][0] == tuple(keys):
        ptrs = array.array("Q", static[5][1])
        ptrs[1::2 + len(keys)] = array.array("Q", [g.data_ptr() for g in grads])
        lens = static[6]
    else:
        ptrs = _addresses(params, grads, states, keys)
        lens = array.array("q", [p.numel() for p in params])
    # (the tensors stay referenced by the caller for the call: the kernel holds addresses only)
    kernel(ptrs.buffer_info()[0], lens.buffer_info()[0], len(params), out.buffer_info()[0], c.buffer_info()[0],
           flags | (16 if check else 0), torch.get_num_threads())
    if out[nsums]:
        return None
    return out.tolist()[:nsums]


_STEPS_SRC = r"""
#include <cstdint>
// step counters += 1, as torch._foreach_add_(steps, 1) (float32 and float64 one-element tensors)
extern "C" void kernel(uintptr_t f32, int64_t n32, uintptr_t f64, int64_t n64) {
  const uint64_t* a = reinterpret_cast<const uint64_t*>(f32);
  const uint64_t* b = reinterpret_cast<const uint64_t*>(f64);
  for (int64_t j = 0; j < n32; ++j) *reinterpret_cast<float*>(a[j]) += 1.0f;
  for (int64_t j = 0; j < n64; ++j) *reinterpret_cast<double*>(b[j]) += 1.0;
}
"""


def advance_steps(states, memo=None) -> None:
    """Add 1 to every ``state["step"]`` of a group: through the addresses ``_applies`` kept in
    ``memo`` where it checked this group in this step (one call of a few nanoseconds per counter;
    ``torch._foreach_add_`` loops over the tensors on the CPU, 2-4 us each), else with
    ``torch._foreach_add_``."""
    static = memo.get("static") if memo is not None else None
    steps = static[7] if static is not None else None
    kernel = None
    if steps is not None:
        try:  # (called after the update has been written: a failure here must not fail the step)
            kernel = _load(_STEPS_SRC, ["uintptr_t", "int64_t", "uintptr_t", "int64_t"])
        except Exception:
            kernel = None
    if kernel is None:
        torch._foreach_add_([st["step"] for st in states], 1)
        return
    a, b = steps
    kernel(a.buffer_info()[0], len(a), b.buffer_info()[0], len(b))


_SRC, _SUMS_SRC, _UPDATE_SRC = _variants(_SRC, "(dec ? V::loadu(p + i, k) : zero)")  # sums: no S3, no read of p
_ADAM_KEYS = ("exp_avg", "exp_avg_sq", "hg_gprev")
_GROUP_ARGS = ["uintptr_t", "uintptr_t", "int64_t", "uintptr_t", "uintptr_t", "int64_t", "int64_t"]
_ADAM_ARGS = _GROUP_ARGS


def _adam_consts(hc: dict | None, c: dict | None, opts: dict) -> tuple[list, int]:
    """The kernel's scalars (its C++ comment) and flags: the last update's ``hc`` (None: the
    update-only kernel), this one's ``c`` (None: the sums-only kernel)."""
    dec = bool(opts["wd"] and opts["decoupled"])
    last = [hc["isb2"], hc["eps"], hc["ieps"], hc["ib1"], hc["k1"], hc["ib2"], hc["k2"], hc["sa"]] \
        if hc is not None else [0.0] * 8
    now = [c["w1"], c["b2"], c["w2"], c["ibc2_sqrt"], c["eps"], c["step_size"], c["decay"] if dec else 1.0] \
        if c is not None else [0.0] * 7
    flags = int(dec) | (2 if c is not None and c["w1"] >= 0.5 else 0)
    return last + now + [-1.0 if opts.get("maximize") else 1.0], flags


def adam(params, grads, states, hc: dict, c: dict | None, opts: dict, memo=None, check=False) -> list | None:
    """Run the kernel over every tensor of a group (the scalars ``hc``, ``c`` as floats); return
    the group's sums S0..S3. ``c`` None: the sums-only kernel (no update). ``check``: the
    gradients first; None, and nothing written, where one is not finite (``_sweep``)."""
    consts, flags = _adam_consts(hc, c, opts)
    src = _SRC if c is not None else _SUMS_SRC
    sums = _sweep(_load(src, _ADAM_ARGS), params, grads, states, _ADAM_KEYS, consts, flags, 5, memo, check)
    if sums is None:
        return None
    s0, p, q1, q2, x = sums
    # the kernel's five sums to S0..S3 (module docstring)
    return [s0, (hc["ib1"] + hc["k1"]) * s0 - hc["ib1"] * p,
            0.5 * hc["isb2"] * ((hc["ib2"] + hc["k2"]) * q1 - hc["ib2"] * q2), x + hc["sa"] * s0]


def _adam_hypergrads(s: list, hc: dict, opts: dict, names) -> dict:
    """The hyper-gradients of ``names`` from the sums S0..S3 (``Adam.hyper_apply``'s factors)."""
    out = {}
    if "lr" in names:
        lr = -hc["ibc1"] * s[0]
        if opts["wd"] and opts["decoupled"]:
            lr = lr - hc["wd"] * hc["idecay"] * s[3]
        out["lr"] = lr
    if "beta1" in names:
        out["beta1"] = -hc["sa"] * s[1]
    if "beta2" in names:
        out["beta2"] = hc["sa"] * s[2]
    return out


class AdamOnePass:
    """The one-pass kernel of ``Adam``/``AdamW`` (``HyperOptimizer.one_pass_kernel``)."""

    NAMES = frozenset({"lr", "beta1", "beta2"})

    @staticmethod
    def covers(opts: dict, names) -> bool:
        # AMSGrad, coupled weight decay and the other learnable names keep the two-pass path
        return not opts["amsgrad"] and not (opts["wd"] and not opts["decoupled"]) and set(names) <= AdamOnePass.NAMES

    @staticmethod
    def applies(params, grads, states, memo=None) -> bool:
        return _applies(params, grads, states, _ADAM_KEYS, (), memo)

    @staticmethod
    def run(params, grads, states, hc: dict, c: dict, opts: dict, names, memo=None, check=False) -> dict | None:
        """Update the group in place; return the hyper-gradients of ``names`` (floats). ``check``:
        None, and nothing written, where a gradient is not finite."""
        s = adam(params, grads, states, hc, c, opts, memo, check)
        return None if s is None else _adam_hypergrads(s, hc, opts, names)

    @staticmethod
    def hyper_sums(params, grads, states, hc: dict, opts: dict, names, memo=None) -> dict:
        """The hyper-gradients of ``names`` of the last update, reading the group only (the
        paper's order: its update follows, in the update kernel)."""
        return _adam_hypergrads(adam(params, grads, states, hc, None, opts, memo), hc, opts, names)

    @staticmethod
    def update(params, grads, states, c: dict, opts: dict, memo=None) -> None:
        """This step's update in place (the scalars ``c`` as floats) and the gradient saved for
        the next hyper-gradient: the one-pass kernel without its sums (the paper's order, after
        the hyper-step)."""
        consts, flags = _adam_consts(None, c, opts)
        _sweep(_load(_UPDATE_SRC, _ADAM_ARGS), params, grads, states, _ADAM_KEYS, consts, flags, 5, memo)


# --- the finiteness check of the gradients ---------------------------------------------------

_FINITE_SRC = _PRELUDE + r"""
// every tensor j of ptrs/lens (Blocks' layout, one array each)
extern "C" void kernel(uintptr_t ptrs, uintptr_t lens, int64_t ntensors, uintptr_t bad_, int64_t nthreads) {
  int64_t* bad = reinterpret_cast<int64_t*>(bad_);
  const Blocks G(ptrs, lens, ntensors, 1);
  *bad |= !finite_all(G, 0, nthreads);
}
"""


def finite_kernel_applies(x) -> bool:
    """Whether ``all_finite`` reads ``x`` with the kernel: a dense, contiguous float32 CPU tensor."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.layout == torch.strided and x.is_contiguous()


def all_finite(xs: list) -> bool:
    """Whether every element of the tensors ``xs`` (``finite_kernel_applies``) is finite: one read
    of each, faster than the per-tensor sums the engine uses elsewhere (rows "check of the
    gradients" of ``benchmarks/run.py --only parts``)."""
    k = _load(_FINITE_SRC, ["uintptr_t", "uintptr_t", "int64_t", "uintptr_t", "int64_t"])
    bad = array.array("q", [0])
    ptrs = array.array("Q", [x.data_ptr() for x in xs])
    lens = array.array("q", [x.numel() for x in xs])
    k(ptrs.buffer_info()[0], lens.buffer_info()[0], len(xs), bad.buffer_info()[0], torch.get_num_threads())
    return not bad[0]
