// Inlined vector math of the CPU kernels, where at::vec's functions (Sleef calls) are too slow:
// a call forces every live vector register of the caller's loop to the stack around it.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace rnnkernels::cpu {

using at::vec::Vectorized;

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#define RNNKERNELS_FAST_VEC_MATH 1
#endif

namespace vec_math_detail {

// c0 + x (c1 + x (c2 + ...)) by Horner's rule, one fma a coefficient after the last.
template <typename V>
C10_ALWAYS_INLINE V horner(V, float c) {
  return V(c);
}
template <typename V, typename... Rest>
C10_ALWAYS_INLINE V horner(V x, float c, Rest... rest) {
  return at::vec::fmadd(horner(x, rest...), x, V(c));
}

// e^r for |r| <= ln2 / 2: the Taylor series to r^7 (truncation < 2e-9 relative).
template <typename V>
C10_ALWAYS_INLINE V exp_series(V r) {
  return horner(r, 1.f, 1.f, 0.5f, 1.f / 6.f, 1.f / 24.f, 1.f / 120.f, 1.f / 720.f,
                1.f / 5040.f);
}

// 2^f for |f| <= 1/2: 1 + f q(f), q of degree 4 fitted for the least maximal relative error
// (3 ulp evaluated in float).
template <typename V>
C10_ALWAYS_INLINE V exp2_poly(V f) {
  return horner(f, 1.f, 6.931470036506653e-01f, 2.4022242426872253e-01f,
                5.550733953714371e-02f, 9.671513922512531e-03f, 1.3264714507386088e-03f);
}

// 2^(g - 1/2) for g in [0, 1): exp2_poly's polynomial in f = g - 1/2, expanded in g (the
// coefficients exact in double, then rounded to float). Against float64 over Mamba's typical
// exponents (dt in [1e-3, 0.1], A in [-16, -1]), 2^(dt A log2(e)) through fast_exp2_product
// errs by at most 2.5 ulp (mean -0.27 ulp) against fast_exp2's 3.1 ulp (mean -0.31): the error
// of the shifted exponent w = dt A log2(e) + 1/2 is at most half an ulp of w, 2^-25 for |w| < 1.
template <typename V>
C10_ALWAYS_INLINE V exp2_shifted_poly(V g) {
  return horner(g, 7.071067041870265e-01f, 4.901338494019001e-01f, 1.698105965333525e-01f,
                3.948049031896517e-02f, 6.355335295666009e-03f, 1.3264714507386088e-03f);
}

#if defined(CPU_CAPABILITY_AVX2)
// 2^n for integral n in [-127, 128], built in the exponent field: 0 for n = -127 (the field's
// zero), inf for n = 128. AVX2 has no scalef, so the callers clamp n to that range themselves
// (at::vec::clamp: min(128, max(-127, n)), n second, so that NaN passes).
C10_ALWAYS_INLINE __m256 pow2_int(__m256 n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
}
#endif

}  // namespace vec_math_detail

// exp, inlined (the LSTM's pointwise pass takes five per unit vector). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, Taylor series of e^r to r^7 (truncation < 2e-9 relative), and
// 2^n applied last. About 1 ulp. x is clamped to [-104, 90] first, which keeps r small for
// infinite x; NaN propagates through the clamp: vmaxps / vminps return their second operand when
// either is NaN, so x goes second (the same values as a clamp with x first and a NaN blend after
// it, two operations fewer). On AVX-512 2^n by scalef, which also gives inf / 0 past the float
// range; on AVX2 by the exponent field (pow2_int), which gives 0 below x = -87.68 (e^x a
// denormal there, flushed) and inf above 88.37 (e^x is finite up to 88.72). Float on AVX-512 and
// AVX2 only; elsewhere at::vec's exp.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_exp(Vectorized<T> x) {
  using V = Vectorized<T>;
#if defined(RNNKERNELS_FAST_VEC_MATH)
  if constexpr (std::is_same_v<T, float>) {
    const V xc = at::vec::clamp(x, V(-104.f), V(90.f));  // min(90, max(-104, x)): x second
    const V n = (xc * V(1.44269504088896341f)).round();
    V r = at::vec::fmadd(n, V(-0.693145751953125f), xc);
    r = at::vec::fmadd(n, V(-1.428606765330187e-06f), r);
#if defined(CPU_CAPABILITY_AVX512)
    return _mm512_scalef_ps(vec_math_detail::exp_series(r), n);
#else
    return vec_math_detail::exp_series(r) *
           V(vec_math_detail::pow2_int(at::vec::clamp(n, V(-127.f), V(128.f))));
#endif
  }
#endif
  return x.exp();
}

// 2^y for float on AVX-512 in 8 vector operations: f = y - round(y) in [-1/2, 1/2] by one
// vreduceps and n = y - f (exact), 2^f by exp2_poly, times 2^n by scalef. No clamping: vreduceps
// gives 0 for infinite or integral y, so -inf gives 0, +inf inf, y past the float range 0 or
// inf, NaN passes through; results equal those of the earlier form (clamp to [-150, 128], round,
// subtract: 10 operations) bit for bit. Reducing to f = y - floor(y) in [0, 1) instead, with
// scalef's own floor, saved one more operation but made exp(dt A) for the small negative dt A of
// a typical scan 2^(-1) p(f ~ 1), whose error near f = 1 shifted every such factor the same way
// (the A gradient's error against float64 grew from about 6e-7 to 3e-6 at the benchmark's
// shape). On AVX2 (no vreduceps, no scalef) in 13: y clamped to [-127, 128] (NaN passes, as in
// fast_exp), rounded, 2^n by the exponent field: 0 from y < -126.5 on (the denormals below
// 2^-126.5 flushed) and inf from y >= 127.5. at::vec's exp_u20 takes 19 operations (20 ulp).
// Elsewhere exp(y ln 2). Where the argument is a product, fast_exp2_product takes one operation
// fewer.
// kInRange: the caller guarantees y in [-126, 127] or NaN (every lane), where the AVX2 clamp
// changes nothing; AVX2 then skips it (11 operations; the selective scan checks its exp
// arguments' range per block and chunk, see exp_args_in_range there).
template <typename T, bool kInRange = false>
C10_ALWAYS_INLINE Vectorized<T> fast_exp2(Vectorized<T> y) {
  using V = Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 v = y;
    const __m512 f = _mm512_reduce_ps(v, _MM_FROUND_TO_NEAREST_INT);  // y - round(y)
    const __m512 n = _mm512_sub_ps(v, f);
    return _mm512_scalef_ps(vec_math_detail::exp2_poly(V(f)), n);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const V v = kInRange ? y : at::vec::clamp(y, V(-127.f), V(128.f));
    const V n = v.round();
    return vec_math_detail::exp2_poly(v - n) * V(vec_math_detail::pow2_int(n));
  }
#endif
  return (y * V(static_cast<T>(0.69314718055994530942))).exp();
}

// 2^(a b), for float on AVX-512 in 8 vector operations with the product: fast_exp2 of a b takes
// 9 (the product, the reduction y - round(y), n = y - f, the polynomial, scalef). Here the
// product carries the polynomial's centre, w = a b + 1/2 in one fma, and scalef's own floor of w
// replaces n: with g = w - floor(w) in [0, 1) (one vreduceps), 2^(a b) = 2^(g - 1/2) 2^floor(w),
// 2^(g - 1/2) by exp2_shifted_poly, the same polynomial as fast_exp2's about the same point
// (see there for its accuracy), so no result is taken at the ends of the fitted interval where
// the earlier floor form erred. As fast_exp2, no clamping: infinite w gives g = 0 and scalef
// inf or 0, NaN passes through. On AVX2, in as many operations as fast_exp2 of a b (14, or 12
// with kInRange: a b in [-126, 127]): w clamped to [-126.5, 128.5], floored, 2^floor(w) by the
// exponent field (0 for a b < -126.5, inf from 127.5 on, as fast_exp2). Elsewhere fast_exp2.
template <typename T, bool kInRange = false>
C10_ALWAYS_INLINE Vectorized<T> fast_exp2_product(Vectorized<T> a, Vectorized<T> b) {
  using V = Vectorized<T>;
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 w = at::vec::fmadd(a, b, V(0.5f));
    const __m512 g = _mm512_reduce_ps(w, _MM_FROUND_TO_NEG_INF);  // w - floor(w)
    return _mm512_scalef_ps(vec_math_detail::exp2_shifted_poly(V(g)), w);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) {
    const V w = at::vec::fmadd(a, b, V(0.5f));
    const V v = kInRange ? w : at::vec::clamp(w, V(-126.5f), V(128.5f));
    const V n = v.floor();
    return vec_math_detail::exp2_shifted_poly(v - n) * V(vec_math_detail::pow2_int(n));
  }
#endif
  return fast_exp2<T, kInRange>(a * b);
}

// 1 / (1 + e^-x), e^-x as fast_exp2_product of x and -log2(e) (3 ulp; 8 operations against
// fast_exp's 14): 0 for x -> -inf, 1 for x -> inf, NaN for NaN.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_sigmoid(Vectorized<T> x) {
  using V = Vectorized<T>;
  return V(T(1)) /
         (V(T(1)) + fast_exp2_product<T>(x, V(static_cast<T>(-1.44269504088896340736))));
}

// softplus(v) = v above this, as in torch.nn.functional.softplus and mamba_ssm.
constexpr double kSoftplusThreshold = 20.0;

// softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|), log1p(e) for e in [0, 1] as
// 2 atanh(s) = s P(s^2), s = e / (2 + e) in [0, 1/3], P of degree 4 in s^2 fitted for the least
// maximal relative error on [0, 1/9] (4e-9; the odd series of atanh needs degree 6 for that):
// exact to a few ulp with no cancellation for v << 0 (where it is e^v), v itself for v >> 0 (as
// torch's threshold gives), NaN for NaN. e^-|v| is fast_exp2_product of -|v| and log2(e) (3
// ulp, 8 operations with the product against fast_exp's 14 on AVX-512). Float on AVX-512 and
// AVX2; elsewhere at::vec's log1p(exp(v)) with torch's threshold. With `derivative`, also
// softplus'(v) = sigmoid(v) there, from the same e^-|v| (1 / (1 + e) for v >= 0, e / (1 + e)
// below), and 1 above torch's threshold, as torch's softplus backward.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_softplus(Vectorized<T> v,
                                               Vectorized<T>* derivative = nullptr) {
  using V = Vectorized<T>;
  const V threshold(static_cast<T>(kSoftplusThreshold));
#if defined(RNNKERNELS_FAST_VEC_MATH)
  if constexpr (std::is_same_v<T, float>) {
    const V minus_abs = v | V(-0.f);  // -|v|: the sign bit set
    const V e = fast_exp2_product<T>(minus_abs, V(1.44269504088896341f));
    if (derivative != nullptr) {
      const V sig = V::blendv(e, V(1.f), v >= V(0.f)) / (V(1.f) + e);
      *derivative = V::blendv(sig, V(1.f), v > threshold);
    }
    const V s = e / (V(2.f) + e);
    const V s2 = s * s;
    const V q = vec_math_detail::horner(s2, 2.000000007921489f, 0.6666631467568231f,
                                        0.4002491051884238f, 0.27960599514595547f,
                                        0.28178349480387166f);
    return at::vec::fmadd(s, q, at::vec::clamp_min(v, V(0.f)));  // max(0, v), NaN passes
  }
#endif
  if (derivative != nullptr) *derivative = V::blendv(fast_sigmoid<T>(v), V(T(1)), v > threshold);
  return V::blendv(v.exp().log1p(), v, v > threshold);
}

}  // namespace rnnkernels::cpu
