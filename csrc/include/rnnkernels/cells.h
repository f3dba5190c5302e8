// Cell math of the generic gated recurrence, shared by the CPU kernels (vectorised), the CUDA
// kernels (one unit per thread) and the host ctest.
//
// Every function works on one hidden unit, or on a SIMD vector of units: it is templated on the
// value type V and a math policy M that supplies sigmoid / tanh / relu for that type. ScalarMath
// below is the policy for plain float / double (host and device); the CPU kernels bring a policy
// for at::vec::Vectorized.
//
// Conventions (time-major, per step t, per batch row):
//   gx   = x_t W_ih^T + b_ih             (G*H, computed for all steps by one GEMM outside)
//   gh   = h_{t-1} W_hh^T + b_hh         (G*H, the step's matmul)
// Gate order follows torch.nn: LSTM (i, f, g, o), GRU (r, z, n).
// The GRU keeps torch's update convention h = (1 - z) * n + z * h_{t-1} in both variants; the
// seed document writes z for torch's (1 - z), which is the same model with z's weights negated.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define RK_HOST_DEVICE __host__ __device__
#else
#define RK_HOST_DEVICE
#endif

namespace rnnkernels {

// The cells of the generic recurrence. The integer values are part of the op schemas.
enum class Cell : int {
  LSTM = 0,              // G = 4
  GRU = 1,               // G = 3, reset after the recurrent matmul (torch, cuDNN)
  GRU_RESET_BEFORE = 2,  // G = 3, reset before it: n = tanh(W_in x + W_hn (r * h) + b) (Cho 2014)
  RNN_TANH = 3,          // G = 1
  RNN_RELU = 4,          // G = 1
};

RK_HOST_DEVICE constexpr int num_gates(Cell cell) {
  return cell == Cell::LSTM ? 4 : (cell == Cell::GRU || cell == Cell::GRU_RESET_BEFORE) ? 3 : 1;
}

// Per-unit values the forward saves for the backward, in units of H per batch row.
// LSTM: i, f, g, o (activated), c_t [, h_full_t when projected]
// GRU: r, z, n, W_hn h + b_hn.   GRU_RESET_BEFORE: r, z, n, r * h_{t-1}.   RNN: h_t.
// With layer normalisation (LSTM, GRU) then the G units of h W_hh^T before it.
RK_HOST_DEVICE constexpr int workspace_units(Cell cell, bool projected, bool layer_norm = false) {
  return (cell == Cell::LSTM ? (projected ? 6 : 5)
          : (cell == Cell::RNN_TANH || cell == Cell::RNN_RELU) ? 1 : 4) +
         (layer_norm ? num_gates(cell) : 0);
}

template <typename T>
struct ScalarMath {
  static RK_HOST_DEVICE T one() { return T(1); }
  static RK_HOST_DEVICE T zero() { return T(0); }
  static RK_HOST_DEVICE T sigmoid(T x) {
    using std::exp;
    return T(1) / (T(1) + exp(-x));
  }
  static RK_HOST_DEVICE T tanh_(T x) {
    using std::tanh;
    return tanh(x);
  }
  static RK_HOST_DEVICE T relu(T x) { return x > T(0) ? x : T(0); }
  // derivative of relu expressed through its output
  static RK_HOST_DEVICE T relu_grad(T y) { return y > T(0) ? T(1) : T(0); }
};

// ---------------------------------------------------------------- LSTM
template <typename V, typename M>
RK_HOST_DEVICE inline void lstm_forward(V pi, V pf, V pg, V po, V c_prev, V& i, V& f, V& g, V& o,
                                        V& c, V& h) {
  i = M::sigmoid(pi);
  f = M::sigmoid(pf);
  g = M::tanh_(pg);
  o = M::sigmoid(po);
  c = f * c_prev + i * g;
  h = o * M::tanh_(c);
}

// dh: gradient w.r.t. h_t (before projection); dc: gradient w.r.t. c_t from step t+1.
// Returns pre-activation gradients and dc_prev.
template <typename V, typename M>
RK_HOST_DEVICE inline void lstm_backward(V dh, V dc, V i, V f, V g, V o, V c, V c_prev, V& di,
                                         V& df, V& dg, V& do_, V& dc_prev) {
  const V one = M::one();
  const V tc = M::tanh_(c);
  const V dct = dc + dh * o * (one - tc * tc);
  do_ = dh * tc * o * (one - o);
  di = dct * g * i * (one - i);
  df = dct * c_prev * f * (one - f);
  dg = dct * i * (one - g * g);
  dc_prev = dct * f;
}

// Peephole LSTM (Gers and Schmidhuber 2000): the input and forget gates see c_{t-1} and the
// output gate sees c_t, each through a diagonal weight (wi, wf, wo for this unit).
template <typename V, typename M>
RK_HOST_DEVICE inline void lstm_peephole_forward(V pi, V pf, V pg, V po, V c_prev, V wi, V wf,
                                                 V wo, V& i, V& f, V& g, V& o, V& c, V& h) {
  i = M::sigmoid(pi + wi * c_prev);
  f = M::sigmoid(pf + wf * c_prev);
  g = M::tanh_(pg);
  c = f * c_prev + i * g;
  o = M::sigmoid(po + wo * c);
  h = o * M::tanh_(c);
}

// As lstm_backward; c is the cell's c_t (before zoneout). The peephole weight gradients are
// di * c_prev, df * c_prev and do_ * c, summed by the caller.
template <typename V, typename M>
RK_HOST_DEVICE inline void lstm_peephole_backward(V dh, V dc, V i, V f, V g, V o, V c, V c_prev,
                                                  V wi, V wf, V wo, V& di, V& df, V& dg, V& do_,
                                                  V& dc_prev) {
  const V one = M::one();
  const V tc = M::tanh_(c);
  do_ = dh * tc * o * (one - o);
  const V dct = dc + dh * o * (one - tc * tc) + do_ * wo;
  di = dct * g * i * (one - i);
  df = dct * c_prev * f * (one - f);
  dg = dct * i * (one - g * g);
  dc_prev = dct * f + di * wi + df * wf;
}

// The gate gradients of an LSTM from the total gradient dct of c_t (the layer-normalised cell
// reaches c_t from h through the normalisation, so its caller forms dct).
template <typename V, typename M>
RK_HOST_DEVICE inline void lstm_gates_backward(V dct, V i, V f, V g, V c_prev, V& di, V& df,
                                               V& dg, V& dc_prev) {
  const V one = M::one();
  di = dct * g * i * (one - i);
  df = dct * c_prev * f * (one - f);
  dg = dct * i * (one - g * g);
  dc_prev = dct * f;
}

// ---------------------------------------------------------------- layer normalisation
// Layer normalisation (Ba et al. 2016) of a row x: xhat = (x - mean) * rstd, y = gamma * xhat +
// beta. The gradient of one element from dxhat = gamma * dy and the row means m1 = mean(dxhat),
// m2 = mean(dxhat * xhat) (the caller reduces over the row).
template <typename V>
RK_HOST_DEVICE inline V layer_norm_backward(V dxhat, V xhat, V rstd, V m1, V m2) {
  return rstd * (dxhat - m1 - xhat * m2);
}

// ---------------------------------------------------------------- GRU (reset after)
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_forward(V xr, V xz, V xn, V hr, V hz, V hn, V h_prev, V& r, V& z,
                                       V& n, V& h) {
  r = M::sigmoid(xr + hr);
  z = M::sigmoid(xz + hz);
  n = M::tanh_(xn + r * hn);
  h = n + z * (h_prev - n);
}

// Gradients of the pre-activations: dx* w.r.t. gx, dh* w.r.t. gh (they differ for n), and the
// direct part of dh_prev (the rest comes through W_hh).
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_backward(V dh, V r, V z, V n, V hn, V h_prev, V& dxr, V& dxz,
                                        V& dxn, V& dhn, V& dh_prev_direct) {
  const V one = M::one();
  const V dn = dh * (one - z) * (one - n * n);
  dxn = dn;
  dhn = dn * r;
  dxr = dn * hn * r * (one - r);
  dxz = dh * (h_prev - n) * z * (one - z);
  dh_prev_direct = dh * z;
}

// ---------------------------------------------------------------- GRU (reset before, Cho 2014)
// Phase 1 (after the r/z rows of the matmul): the gates and the reset state v = r * h_prev that
// the n rows of W_hh multiply.
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_rb_forward_gates(V xr, V xz, V hr, V hz, V h_prev, V& r, V& z,
                                                V& v) {
  r = M::sigmoid(xr + hr);
  z = M::sigmoid(xz + hz);
  v = r * h_prev;
}

// Phase 2 (after hv = v W_hn^T + b_hn).
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_rb_forward_out(V xn, V hv, V z, V h_prev, V& n, V& h) {
  n = M::tanh_(xn + hv);
  h = n + z * (h_prev - n);
}

// Backward phase A: before dv = dn W_hn is known.
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_rb_backward_out(V dh, V z, V n, V h_prev, V& dn, V& dz,
                                               V& dh_prev_direct) {
  const V one = M::one();
  dn = dh * (one - z) * (one - n * n);
  dz = dh * (h_prev - n) * z * (one - z);
  dh_prev_direct = dh * z;
}

// Backward phase B: with dv, the gradient w.r.t. v = r * h_prev.
template <typename V, typename M>
RK_HOST_DEVICE inline void gru_rb_backward_gates(V dv, V r, V h_prev, V& dr, V& dh_prev_direct) {
  dr = dv * h_prev * r * (M::one() - r);
  dh_prev_direct = dh_prev_direct + dv * r;
}

// ---------------------------------------------------------------- zoneout (any cell)
// Zoneout (Krueger et al. 2016) of a state unit: it keeps its previous value with weight d, a
// 0/1 draw per step and unit in training and the zoneout probability at evaluation.
template <typename V>
RK_HOST_DEVICE inline V zoneout_forward(V d, V prev, V next) {
  return next + d * (prev - next);
}

// dout: gradient of the zoned-out state; dnext goes to the cell's new value, dprev straight to
// the previous state.
template <typename V>
RK_HOST_DEVICE inline void zoneout_backward(V d, V dout, V& dnext, V& dprev) {
  dprev = d * dout;
  dnext = dout - dprev;
}

// ---------------------------------------------------------------- Elman RNN
template <typename V, typename M>
RK_HOST_DEVICE inline V rnn_forward(V pre, bool relu) {
  return relu ? M::relu(pre) : M::tanh_(pre);
}

template <typename V, typename M>
RK_HOST_DEVICE inline V rnn_backward(V dh, V h, bool relu) {
  return relu ? dh * M::relu_grad(h) : dh * (M::one() - h * h);
}

}  // namespace rnnkernels
