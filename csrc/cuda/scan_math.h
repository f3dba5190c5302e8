// Scalar math of the scans, host and device: the selective scan's per-state step and its
// gradient, the delta and gate nonlinearities, and the composition of affine maps that the
// linear scan's parallel prefix uses. The host ctest (csrc/tests/test_scan_math.cpp) checks the
// gradients against finite differences of a serial scan built from the same functions.
#pragma once

#include <cmath>

#include "rnnkernels/cells.h"

namespace rnnkernels::cuda {

// torch.nn.functional.softplus with beta = 1, threshold = 20.
constexpr float kSoftplusThreshold = 20.f;

template <typename T>
RK_HOST_DEVICE inline T softplus(T x) {
  using std::exp;
  using std::log1p;
  return x > T(kSoftplusThreshold) ? x : log1p(exp(x));
}

template <typename T>
RK_HOST_DEVICE inline T softplus_grad(T x) {
  using std::exp;
  return x > T(kSoftplusThreshold) ? T(1) : T(1) / (T(1) + exp(-x));
}

template <typename T>
RK_HOST_DEVICE inline T sigmoid(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(-x));
}

// Gate of the output: out = y * silu(z).
template <typename T>
RK_HOST_DEVICE inline T silu(T z) {
  return z * sigmoid(z);
}

template <typename T>
RK_HOST_DEVICE inline T silu_grad(T z) {
  const T s = sigmoid(z);
  return s * (T(1) + z * (T(1) - s));
}

// One state n of one channel at step t:
//   a = exp(delta * A),  x_t = a * x_{t-1} + delta * B * u,  y_t += C * x_t.
// Backward of that step, given x_{t-1}, x_t and dy = dL/dy_t. `carry` is dL/dx_t from the later
// steps on entry and dL/dx_{t-1} on exit; ddelta, du, dA accumulate; dB and dC are this step's.
template <typename T>
RK_HOST_DEVICE inline void selective_state_backward(T x_prev, T x, T a, T delta, T u, T A, T B,
                                                    T C, T dy, T& carry, T& ddelta, T& du, T& dA,
                                                    T& dB, T& dC) {
  carry += dy * C;
  dC = dy * x;
  const T da = carry * x_prev;
  ddelta += da * A * a + carry * B * u;
  dA += da * delta * a;
  du += carry * delta * B;
  dB = carry * delta * u;
  carry *= a;
}

// The affine map h -> a * h + b. compose(first, then) applies `first`, then `then`.
template <typename T>
struct Affine {
  T a, b;
};

template <typename T>
RK_HOST_DEVICE inline Affine<T> compose(Affine<T> first, Affine<T> then) {
  return {first.a * then.a, then.a * first.b + then.b};
}

}  // namespace rnnkernels::cuda
