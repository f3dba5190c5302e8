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

// exp, inlined (the LSTM's pointwise pass takes five per unit vector). Cody-Waite reduction
// x = n ln2 + r, |r| <= ln2 / 2, Taylor series of e^r to r^7 (truncation < 2e-9 relative), and
// 2^n applied by scalef, which also gives inf / 0 past the float range. About 1 ulp. NaN
// propagates through the clamp: vmaxps / vminps return their second operand when either is
// NaN, so x goes second (the same values as a clamp with x first and a NaN blend after it, two
// operations fewer). Float on AVX-512 only; elsewhere at::vec's exp.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_exp(Vectorized<T> x) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 v = x;
    const __m512 xc = _mm512_min_ps(_mm512_set1_ps(90.f), _mm512_max_ps(_mm512_set1_ps(-104.f), v));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), xc);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 q = _mm512_set1_ps(1.f / 5040.f);
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 720.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 120.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 24.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f / 6.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(0.5f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
    q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(q, n);
  }
#endif
  return x.exp();
}

// 2^y for float on AVX-512 in 8 vector operations: f = y - round(y) in [-1/2, 1/2] by one
// vreduceps and n = y - f (exact), 2^f = 1 + f q(f) with q of degree 4 fitted for the least
// maximal relative error on |f| <= 1/2 (3 ulp evaluated in float), times 2^n by scalef. No
// clamping: vreduceps gives 0 for infinite or integral y, so -inf gives 0, +inf inf, y past the
// float range 0 or inf, NaN passes through; results equal those of the earlier form (clamp to
// [-150, 128], round, subtract: 10 operations) bit for bit. Reducing to f = y - floor(y) in
// [0, 1) instead, with scalef's own floor, saved one more operation but made exp(dt A) for the
// small negative dt A of a typical scan 2^(-1) p(f ~ 1), whose error near f = 1 shifted every
// such factor the same way (the A gradient's error against float64 grew from about 6e-7 to
// 3e-6 at the benchmark's shape). The selective scan's exp(dt A) is 2^(dt A log2(e)) with
// A log2(e) formed once per channel; at::vec's exp_u20 takes 19 operations (20 ulp). Elsewhere
// exp(y ln 2).
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_exp2(Vectorized<T> y) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const __m512 v = y;
    const __m512 f = _mm512_reduce_ps(v, _MM_FROUND_TO_NEAREST_INT);  // y - round(y)
    const __m512 n = _mm512_sub_ps(v, f);
    __m512 q = _mm512_set1_ps(1.3264714507386088e-03f);
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(9.671513922512531e-03f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(5.550733953714371e-02f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(2.4022242426872253e-01f));
    q = _mm512_fmadd_ps(q, f, _mm512_set1_ps(6.931470036506653e-01f));
    return _mm512_scalef_ps(_mm512_fmadd_ps(q, f, _mm512_set1_ps(1.f)), n);
  }
#endif
  return (y * Vectorized<T>(static_cast<T>(0.69314718055994530942))).exp();
}

// 1 / (1 + e^-x), e^-x as fast_exp2 of -x log2(e) (3 ulp; 9 operations against fast_exp's
// 14): 0 for x -> -inf, 1 for x -> inf, NaN for NaN.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_sigmoid(Vectorized<T> x) {
  using V = Vectorized<T>;
  return V(T(1)) / (V(T(1)) + fast_exp2<T>(x * V(static_cast<T>(-1.44269504088896340736))));
}

// softplus(v) = v above this, as in torch.nn.functional.softplus and mamba_ssm.
constexpr double kSoftplusThreshold = 20.0;

// softplus(v) = log(1 + e^v) = max(v, 0) + log1p(e^-|v|), log1p(e) for e in [0, 1] as
// 2 atanh(s) = s P(s^2), s = e / (2 + e) in [0, 1/3], P of degree 4 in s^2 fitted for the least
// maximal relative error on [0, 1/9] (4e-9; the odd series of atanh needs degree 6 for that):
// exact to a few ulp with no cancellation for v << 0 (where it is e^v), v itself for v >> 0 (as
// torch's threshold gives), NaN for NaN. e^-|v| is fast_exp2 of -|v| log2(e) (3 ulp, 8
// operations against fast_exp's 14). Float on AVX-512; elsewhere at::vec's log1p(exp(v)) with
// torch's threshold. With `derivative`, also softplus'(v) = sigmoid(v) there, from the same
// e^-|v| (1 / (1 + e) for v >= 0, e / (1 + e) below), and 1 above torch's threshold, as torch's
// softplus backward.
template <typename T>
C10_ALWAYS_INLINE Vectorized<T> fast_softplus(Vectorized<T> v,
                                               Vectorized<T>* derivative = nullptr) {
  using V = Vectorized<T>;
  const V threshold(static_cast<T>(kSoftplusThreshold));
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    const V minus_abs(_mm512_or_ps(v, _mm512_set1_ps(-0.f)));  // -|v|: the sign bit set
    const V e = fast_exp2<T>(minus_abs * V(1.44269504088896341f));
    if (derivative != nullptr) {
      const V sig = V::blendv(e, V(1.f), v >= V(0.f)) / (V(1.f) + e);
      *derivative = V::blendv(sig, V(1.f), v > threshold);
    }
    const V s = e / (V(2.f) + e);
    const V s2 = s * s;
    V q = at::vec::fmadd(s2, V(0.28178349480387166f), V(0.27960599514595547f));
    q = at::vec::fmadd(s2, q, V(0.4002491051884238f));
    q = at::vec::fmadd(s2, q, V(0.6666631467568231f));
    q = at::vec::fmadd(s2, q, V(2.000000007921489f));
    return at::vec::fmadd(s, q, V(_mm512_max_ps(_mm512_setzero_ps(), v)));
  }
#endif
  if (derivative != nullptr) *derivative = V::blendv(fast_sigmoid<T>(v), V(T(1)), v > threshold);
  return V::blendv(v.exp().log1p(), v, v > threshold);
}

}  // namespace rnnkernels::cpu
