// CPU kernels of the generic gated recurrence (LSTM, GRU in both variants, tanh/ReLU RNN).
//
// Two decompositions of the sequential part, one cell code (forward_units / backward_units,
// vectorised over hidden units with at::vec, math from cells.h):
// - persistent (default for T > 1 without projection, reset-before GRU or cell option): one
//   thread team for the whole sequence in row groups; each thread of a group owns a slice of
//   hidden units and of W_hh, one split barrier per step within the group (see "persistent
//   path" below);
// - batched (everything else): per step one ATen GEMM on all threads, then the pointwise pass
//   split over batch rows.
// A decoding call (one step of a few rows without gradients) has its own op, cell_step, with the
// input projection fused in (see there); so has inference on a sequence of one row in float32,
// recurrence_infer, whose persistent team computes the input projection inside its steps
// (FusedInput). With lengths, a persistent row group of one thread
// multiplies only the rows within their length at each step (ActiveRows).
// Cell options (Problem: peephole, zoneout, recurrent dropout, layer normalisation) are fused
// into the batched path's pointwise pass; layer normalisation needs whole rows (its statistics
// span all gates, or all units of c), which the batched path's rows give. ws then also holds
// the raw h W_hh^T (G*H per row), and the backward keeps the gradient of it and its normalised
// value ((T, B, G*H) each) and, for the LSTM, the cell-normalisation terms ((T, B, 2H)) for the
// parameter-gradient reductions after the loop.
// Otherwise the input projection and the weight gradients are single GEMMs over all steps,
// outside the loop (the input projection in Python, the weight gradients at the end of the
// backward).
//
// Memory. hs (T+1, B, P) holds the recurrent state before every step in the accumulation type;
// slot t is the state before time t for the forward direction and slot t+1 for the reverse one,
// so the states that multiply the gradients of times 0..T-1 are one contiguous slice for the
// weight-gradient GEMM. ws (T, B, K*H) holds the per-step values of the cell (cells.h). Without
// save (no gradient needed) only two state slots are kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if __has_include(<unistd.h>)
#include <unistd.h>  // sysconf (the L2 size)
#endif

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "../recurrence_checks.h"
#include "../recurrence_weight_grads.h"
#include "lanes.h"
#include "panel_gemm.h"
#include "vec_math.h"
#include "workspace_cache.h"
#include "rnnkernels/cells.h"

namespace rnnkernels::cpu {

using at::Tensor;
using at::vec::Vectorized;
using lanes::load_as;
using lanes::store_as;

namespace {

// Work per task below which a step's pointwise pass stays on one thread.
constexpr int64_t kMinUnitsPerTask = 16384;
// Epsilon of the layer normalisations (torch.nn.functional.layer_norm's default).
constexpr double kLayerNormEps = 1e-5;

template <typename T>
struct VecMath {
  using V = Vectorized<T>;
  static V one() { return V(T(1)); }
  static V zero() { return V(T(0)); }
  static C10_ALWAYS_INLINE V sigmoid(V x) { return fast_sigmoid<T>(x); }
  // float: tanh from one exp, about 2.5x cheaper than Sleef's tanh (the LSTM's forward and
  // backward each take one per unit per step): (1 - e^-2|x|) / (1 + e^-2|x|), and below
  // |x| = 1/8, where that difference cancels, the odd Taylor series to x^9 (truncation < 1e-11
  // relative). Max error about 3e-7 relative; NaN and +-Inf behave as tanh.
  static C10_ALWAYS_INLINE V tanh_(V x) {
    if constexpr (std::is_same_v<T, float>) {
      const V ax = x.abs();
      const V e = fast_exp<T>(ax * V(-2.f));
      const V big = (V(1.f) - e) / (V(1.f) + e);
      const V x2 = x * x;
      V poly = at::vec::fmadd(x2, V(62.f / 2835.f), V(-17.f / 315.f));
      poly = at::vec::fmadd(x2, poly, V(2.f / 15.f));
      poly = at::vec::fmadd(x2, poly, V(-1.f / 3.f));
      poly = at::vec::fmadd(x2, poly, V(1.f));
      const V signed_big = V::blendv(big, big.neg(), x < V(0.f));
      return V::blendv(signed_big, x * poly, ax < V(0.125f));
    } else {
      return x.tanh();
    }
  }
  static V relu(V x) { return at::vec::maximum(x, V(T(0))); }
  static V relu_grad(V y) { return V::blendv(V(T(0)), V(T(1)), y > V(T(0))); }
};

template <typename T, typename S>
inline void store_scalar_row(S* dst, const T* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] = static_cast<S>(src[k]);
}

// Sizes and raw pointers of one recurrence; the per-row functions below read them.
template <typename S, typename T>
struct Problem {
  Cell cell;
  int64_t steps, batch, hidden, out;  // T, B, H, P
  int64_t gates;                      // G
  int64_t wsu;                        // workspace units K (ws row = K * H)
  bool reverse, save, projected;
  const int64_t* lengths;
  // Cell options (null / zero when off; any of them selects the batched path).
  const T* peep = nullptr;     // (3, H) peephole weights of the LSTM's i, f, o gates
  const T* zmask_h = nullptr;  // (T, B, P) zoneout draws of h (1: keep the previous value)
  const T* zmask_c = nullptr;  // (T, B, H) zoneout draws of the LSTM's c
  T zoneout_p = T(0);          // the zoneout weight of a state without draws (evaluation)
  bool dropout = false;        // recurrent dropout: W_hh sees h_{t-1} * mask (B, P)
  // Layer normalisation: gh = ln_hh * LN(h W_hh^T) + b_hh (b_hh after it), LSTM h = o *
  // tanh(ln_c * LN(c_t) + ln_bias_c); the raw h W_hh^T of a step is saved in ws from unit ln_at.
  const T* ln_hh = nullptr;      // (G*H)
  const T* ln_bias_hh = nullptr; // b_hh (G*H) or null
  const T* ln_c = nullptr;       // (H) LSTM
  const T* ln_bias_c = nullptr;  // (H) LSTM
  int64_t ln_at = 0;

  bool zoneout() const { return zmask_h != nullptr || zmask_c != nullptr || zoneout_p != T(0); }
  bool layer_norm() const { return ln_hh != nullptr; }
  bool has_options() const { return peep != nullptr || zoneout() || dropout || layer_norm(); }
  // Step t's zoneout draws, or null (then zoneout_p applies).
  const T* zoneout_h(int64_t t) const { return zmask_h ? zmask_h + t * batch * out : nullptr; }
  const T* zoneout_c(int64_t t) const { return zmask_c ? zmask_c + t * batch * hidden : nullptr; }
  int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  bool masked(int64_t t, int64_t b) const { return lengths != nullptr && t >= lengths[b]; }
  // State slots (see header comment).
  int64_t slot_in(int64_t s) const { return save ? (reverse ? steps - s : s) : (s & 1); }
  int64_t slot_out(int64_t s) const {
    return save ? (reverse ? steps - 1 - s : s + 1) : ((s + 1) & 1);
  }
};

template <typename F>
inline void parallel_rows(int64_t batch, int64_t units_per_row, const F& f) {
  const int64_t grain =
      std::max<int64_t>(1, kMinUnitsPerTask / std::max<int64_t>(1, units_per_row));
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// ------------------------------------------------------------ the batched path's step product

// Rows of a per-step product up to which step_product_nt runs its own kernel instead of ATen's.
constexpr int64_t kSmallRows = 4;
// Multiply-adds per thread below which the small product stays on one thread: a parallel region
// cost about 5 us on the 2-core machine measured, more than one core takes to stream a quarter
// MB of weights from its L2 (the fp32 GRU at hidden 256, batch 1: 22 us on one thread, 28 on
// two; the LSTM: 48 on one, 37 on two).
constexpr int64_t kMinProductWorkPerThread = 131072;

// out (M x N) = a (M x K) @ w^T [+ bias], w (N x K) with row stride ldw, a and out row-major.
//
// Why not ATen: at a small batch (decoding one token, a short sequence) the step is a matrix-
// vector product, and MKL's runs it on one thread at about 37 GB/s (a 1 MB fp32 LSTM W_hh: 28
// us). Here the rows of w are split over the threads in the same fixed ranges on every call, so
// that from one call to the next each core finds its rows in its own L2 (a decoding loop calls
// the layer once per token). Decomposition: a task owns a range of output columns (rows of w)
// and produces them for all M rows of a, kRows rows of w at a time with M x kRows vector
// accumulators over K, reduced horizontally once per dot product: four rows where the
// accumulators, the four rows' vectors and one of a fit the vector registers, else two (AVX2's
// 16 registers at M = 3 and 4; at M = 4 four rows spilled and decoding 4 rows ran slower in an
// in-process A/B on an AMD EPYC Zen 2). Memory traffic: w once, a from L1.
// a and w may be stored in another type than the accumulation type T (bfloat16 for float).
template <typename T, int MR, typename SA, typename SW>
void small_product_rows(int64_t n0, int64_t n1, int64_t N, int64_t K, const SA* a, const SW* w,
                        int64_t ldw, const SW* bias, T* out) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  constexpr int64_t kRows = MR * 4 + 4 + 1 <= lanes::kVectorRegisters ? 4 : 2;
  auto sum = [](const V& x, const V& y) { return x + y; };
  for (int64_t j0 = n0; j0 < n1; j0 += kRows) {
    const int64_t rows = std::min(kRows, n1 - j0);
    V acc[MR][kRows];
    for (int m = 0; m < MR; ++m) {
      for (int64_t r = 0; r < kRows; ++r) acc[m][r] = V(T(0));
    }
    for (int64_t k = 0; k < K; k += VS) {
      const int64_t n = std::min(VS, K - k);
      V wv[kRows];
      for (int64_t r = 0; r < kRows; ++r) {
        wv[r] = r < rows ? load_as<T>(w + (j0 + r) * ldw + k, n) : V(T(0));
      }
      for (int m = 0; m < MR; ++m) {
        const V av = load_as<T>(a + m * K + k, n);
        for (int64_t r = 0; r < kRows; ++r) acc[m][r] = at::vec::fmadd(av, wv[r], acc[m][r]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int64_t r = 0; r < rows; ++r) {
        const T b = bias != nullptr ? static_cast<T>(bias[j0 + r]) : T(0);
        out[m * N + j0 + r] = b + at::vec::vec_reduce_all<T>(sum, acc[m][r]);
      }
    }
  }
}

// small_product_rows for M <= kSmallRows rows of a, chosen at run time.
template <typename T, typename SA, typename SW>
void small_product_range(int64_t M, int64_t n0, int64_t n1, int64_t N, int64_t K, const SA* a,
                         const SW* w, int64_t ldw, const SW* bias, T* out) {
  switch (M) {
    case 1: small_product_rows<T, 1, SA, SW>(n0, n1, N, K, a, w, ldw, bias, out); break;
    case 2: small_product_rows<T, 2, SA, SW>(n0, n1, N, K, a, w, ldw, bias, out); break;
    case 3: small_product_rows<T, 3, SA, SW>(n0, n1, N, K, a, w, ldw, bias, out); break;
    default: small_product_rows<T, kSmallRows, SA, SW>(n0, n1, N, K, a, w, ldw, bias, out); break;
  }
}

template <typename T>
void small_product_nt(int64_t M, int64_t N, int64_t K, const T* a, const T* w, int64_t ldw,
                      const T* bias, T* out) {
  const int64_t threads = std::clamp<int64_t>(M * N * K / kMinProductWorkPerThread, 1,
                                              at::get_num_threads());
  const int64_t per = (N + threads - 1) / threads;
  at::parallel_for(0, threads, 1, [&](int64_t c0, int64_t c1) {
    small_product_range<T>(M, std::min(N, c0 * per), std::min(N, c1 * per), N, K, a, w, ldw,
                           bias, out);
  });
}

// out = a @ w^T [+ bias] for one step of the batched path (out, a row-major; w's rows of stride
// w.stride(0)): small_product_nt for at most kSmallRows rows, else one ATen GEMM.
template <typename T>
void step_product_nt(Tensor& out, const Tensor& a, const Tensor& w, const Tensor& bias) {
  const int64_t M = a.size(0);
  if (M <= kSmallRows && a.is_contiguous() && out.is_contiguous() && w.stride(1) == 1 &&
      (!bias.defined() || bias.is_contiguous())) {
    small_product_nt<T>(M, w.size(0), w.size(1), a.data_ptr<T>(), w.data_ptr<T>(), w.stride(0),
                        bias.defined() ? bias.data_ptr<T>() : nullptr, out.data_ptr<T>());
  } else if (bias.defined()) {
    at::addmm_out(out, bias, a, w.t());
  } else {
    at::mm_out(out, a, w.t());
  }
}

// ============================================================== forward

// Views of one step's buffers, row-major with the row strides of Problem (batch row b of a
// (B, X) buffer starts at b * X). gh / dgh rows are addressed by the caller (see *_units).
template <typename S, typename T>
struct FwdStep {
  const S* gx;     // (B, G*H)
  const T* hin;    // (B, P): state before the step
  T* hout;         // (B, P): state after the step (before projection: see hfull)
  const T* cin;    // (B, H) LSTM
  T* cout;         // (B, H) LSTM
  T* hfull;        // (B, H): the cell's h (== hout unless projected)
  T* ws;           // (B, K*H) or null
  S* y;            // (B, P) or null when y is written after a projection / phase 2
  T* v;            // (B, H): r * h_prev of the reset-before GRU
  const T* zh = nullptr;    // (B, P) zoneout draws of h, or null (Problem::zoneout_h)
  const T* zc = nullptr;    // (B, H) zoneout draws of c
  const T* hrec = nullptr;  // (B, P) the state W_hh multiplies, when not hin (recurrent dropout)
};

// The zoneout weights of n units at offset k of a step's draws, or the evaluation weight.
template <typename T>
inline Vectorized<T> zoneout_weight(const T* draws, T p, int64_t k, int64_t n) {
  return draws ? load_as<T>(draws + k, n) : Vectorized<T>(p);
}

// The LSTM's gates and c_t (h from c_t unnormalised) of units [j, j + n) of one row.
template <typename S, typename T>
inline void lstm_units(const Problem<S, T>& pb, const S* gxr, const T* g, int64_t gstride,
                       int64_t j, int64_t n, Vectorized<T> cp, Vectorized<T>& i,
                       Vectorized<T>& f, Vectorized<T>& gg, Vectorized<T>& o, Vectorized<T>& c,
                       Vectorized<T>& h) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  const int64_t H = pb.hidden;
  const V pi = load_as<T>(gxr + j, n) + load_as<T>(g, n);
  const V pf = load_as<T>(gxr + H + j, n) + load_as<T>(g + gstride, n);
  const V pg = load_as<T>(gxr + 2 * H + j, n) + load_as<T>(g + 2 * gstride, n);
  const V po = load_as<T>(gxr + 3 * H + j, n) + load_as<T>(g + 3 * gstride, n);
  if (pb.peep) {
    lstm_peephole_forward<V, M>(pi, pf, pg, po, cp, load_as<T>(pb.peep + j, n),
                                load_as<T>(pb.peep + H + j, n),
                                load_as<T>(pb.peep + 2 * H + j, n), i, f, gg, o, c, h);
  } else {
    lstm_forward<V, M>(pi, pf, pg, po, cp, i, f, gg, o, c, h);
  }
}

// The cell's forward pointwise work for units [u0, u1) of batch row b. gh points at this row's
// unit u0 of gate 0; gate g of unit j is gh[g * gstride + j - u0].
template <typename S, typename T>
void forward_units(const Problem<S, T>& pb, const FwdStep<S, T>& st, int64_t b, int64_t u0,
                   int64_t u1, const T* gh, int64_t gstride) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const S* gxr = st.gx + b * GH;
  const T* hprev = st.hin + b * P;
  T* wsr = st.ws ? st.ws + b * KH : nullptr;
  S* yr = st.y ? st.y + b * P : nullptr;
  const bool relu = pb.cell == Cell::RNN_RELU;
  const bool zoneout = pb.zoneout();
  for (int64_t j = u0; j < u1; j += VS) {
    const int64_t n = std::min(VS, u1 - j);
    const T* g = gh + (j - u0);
    switch (pb.cell) {
      case Cell::LSTM: {
        V i, f, gg, o, c, h;
        const V cp = load_as<T>(st.cin + b * H + j, n);
        lstm_units(pb, gxr, g, gstride, j, n, cp, i, f, gg, o, c, h);
        if (pb.projected && wsr) store_as(wsr + 5 * H + j, h, n);
        if (zoneout) {  // h of a projected LSTM is zoned out after the projection
          c = zoneout_forward(zoneout_weight(st.zc, pb.zoneout_p, b * H + j, n), cp, c);
          if (!pb.projected) {
            h = zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n),
                                load_as<T>(hprev + j, n), h);
          }
        }
        store_as(st.cout + b * H + j, c, n);
        store_as(st.hfull + b * H + j, h, n);
        if (wsr) {  // with zoneout, slot 4 holds the state c, from which the backward recomputes
          store_as(wsr + j, i, n);
          store_as(wsr + H + j, f, n);
          store_as(wsr + 2 * H + j, gg, n);
          store_as(wsr + 3 * H + j, o, n);
          store_as(wsr + 4 * H + j, c, n);
        }
        if (yr) store_as(yr + j, h, n);
        break;
      }
      case Cell::GRU: {
        V r, z, nn, h;
        const V hn = load_as<T>(g + 2 * gstride, n);
        const V hp = load_as<T>(hprev + j, n);
        gru_forward<V, M>(load_as<T>(gxr + j, n), load_as<T>(gxr + H + j, n),
                          load_as<T>(gxr + 2 * H + j, n), load_as<T>(g, n),
                          load_as<T>(g + gstride, n), hn, hp, r, z, nn, h);
        if (zoneout) h = zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n), hp, h);
        store_as(st.hout + b * H + j, h, n);
        if (wsr) {
          store_as(wsr + j, r, n);
          store_as(wsr + H + j, z, n);
          store_as(wsr + 2 * H + j, nn, n);
          store_as(wsr + 3 * H + j, hn, n);
        }
        if (yr) store_as(yr + j, h, n);
        break;
      }
      case Cell::GRU_RESET_BEFORE: {  // phase 1; phase 2 in forward_batched
        V r, z, v;
        const T* hrec = (st.hrec ? st.hrec : st.hin) + b * P;
        gru_rb_forward_gates<V, M>(load_as<T>(gxr + j, n), load_as<T>(gxr + H + j, n),
                                   load_as<T>(g, n), load_as<T>(g + gstride, n),
                                   load_as<T>(hrec + j, n), r, z, v);
        store_as(st.v + b * H + j, v, n);
        if (wsr) {
          store_as(wsr + j, r, n);
          store_as(wsr + H + j, z, n);
          store_as(wsr + 3 * H + j, v, n);
        }
        break;
      }
      case Cell::RNN_TANH:
      case Cell::RNN_RELU: {
        const V hc = rnn_forward<V, M>(load_as<T>(gxr + j, n) + load_as<T>(g, n), relu);
        const V h = zoneout ? zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n),
                                              load_as<T>(hprev + j, n), hc)
                            : hc;
        store_as(st.hout + b * H + j, h, n);
        if (wsr) store_as(wsr + j, hc, n);
        if (yr) store_as(yr + j, h, n);
        break;
      }
    }
  }
}

// ------------------------------------------------------------ layer normalisation (batched path)

// Mean and 1 / sqrt(var + eps) of a row of n values.
template <typename T>
std::pair<T, T> row_mean_rstd(const T* x, int64_t n) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  auto sum = [](const V& a, const V& b) { return a + b; };
  V s(T(0));
  for (int64_t j = 0; j < n; j += VS) s = s + load_as<T>(x + j, std::min(VS, n - j));
  const T mean = at::vec::vec_reduce_all<T>(sum, s) / T(n);
  const V m(mean);
  V q(T(0));
  for (int64_t j = 0; j < n; j += VS) {
    const V d = load_as<T>(x + j, std::min(VS, n - j)) - m;
    q = q + d * d;
  }
  // the zero-filled lanes of a partial last vector each added mean^2
  const T pad = T((VS - n % VS) % VS);
  const T var = (at::vec::vec_reduce_all<T>(sum, q) - pad * mean * mean) / T(n);
  return {mean, T(1) / std::sqrt(var + T(kLayerNormEps))};
}

// A row of recurrent pre-activations gh (G*H, in place, from the GEMM without bias) becomes
// ln_hh * LN(gh) + b_hh; the raw row is kept in raw (the step's ws row) when saving.
template <typename S, typename T>
void layer_norm_gates(const Problem<S, T>& pb, T* gh, T* raw) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t GH = pb.gates * pb.hidden;
  const auto [mean, rstd] = row_mean_rstd(gh, GH);
  if (raw) std::copy(gh, gh + GH, raw);
  for (int64_t j = 0; j < GH; j += VS) {
    const int64_t n = std::min(VS, GH - j);
    V y = (load_as<T>(gh + j, n) - V(mean)) * V(rstd) * load_as<T>(pb.ln_hh + j, n);
    if (pb.ln_bias_hh) y = y + load_as<T>(pb.ln_bias_hh + j, n);
    store_as(gh + j, y, n);
  }
}

// Gradient of the raw pre-activations of one row from dy, the gradient of the normalised ones
// (G*H each); xhat receives the normalised row (for the gain's gradient).
template <typename S, typename T>
void layer_norm_gates_backward(const Problem<S, T>& pb, const T* raw, const T* dy, T* dx,
                               T* xhat) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t GH = pb.gates * pb.hidden;
  const auto [mean, rstd] = row_mean_rstd(raw, GH);
  auto sum = [](const V& a, const V& b) { return a + b; };
  V s1(T(0)), s2(T(0));
  for (int64_t j = 0; j < GH; j += VS) {
    const int64_t n = std::min(VS, GH - j);
    const V xh = (load_as<T>(raw + j, n) - V(mean)) * V(rstd);
    const V dxh = load_as<T>(dy + j, n) * load_as<T>(pb.ln_hh + j, n);  // zero past n
    store_as(xhat + j, xh, n);
    s1 = s1 + dxh;
    s2 = s2 + dxh * xh;
  }
  const V m1(at::vec::vec_reduce_all<T>(sum, s1) / T(GH));
  const V m2(at::vec::vec_reduce_all<T>(sum, s2) / T(GH));
  for (int64_t j = 0; j < GH; j += VS) {
    const int64_t n = std::min(VS, GH - j);
    store_as(dx + j,
             layer_norm_backward(load_as<T>(dy + j, n) * load_as<T>(pb.ln_hh + j, n),
                                 load_as<T>(xhat + j, n), V(rstd), m1, m2),
             n);
  }
}

// The layer-normalised LSTM's forward for one unmasked row (all H units): the gates and c_t in a
// first pass, the statistics of c_t, then h = o * tanh(ln_c * LN(c_t) + ln_bias_c). scratch:
// 2H values per row (c_t and o).
template <typename S, typename T>
void forward_lstm_ln_row(const Problem<S, T>& pb, const FwdStep<S, T>& st, int64_t b,
                         const T* gh, T* scratch) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const S* gxr = st.gx + b * GH;
  T* wsr = st.ws ? st.ws + b * KH : nullptr;
  S* yr = st.y ? st.y + b * P : nullptr;
  T* cn = scratch + b * 2 * H;
  T* on = cn + H;
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t n = std::min(VS, H - j);
    V i, f, gg, o, c, h;
    lstm_units(pb, gxr, gh + j, H, j, n, load_as<T>(st.cin + b * H + j, n), i, f, gg, o, c, h);
    store_as(cn + j, c, n);
    store_as(on + j, o, n);
    if (wsr) {
      store_as(wsr + j, i, n);
      store_as(wsr + H + j, f, n);
      store_as(wsr + 2 * H + j, gg, n);
      store_as(wsr + 3 * H + j, o, n);
    }
  }
  const auto [mean, rstd] = row_mean_rstd(cn, H);
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t n = std::min(VS, H - j);
    const V c = load_as<T>(cn + j, n);
    const V u =
        (c - V(mean)) * V(rstd) * load_as<T>(pb.ln_c + j, n) + load_as<T>(pb.ln_bias_c + j, n);
    V h = load_as<T>(on + j, n) * M::tanh_(u);
    V cs = c;
    if (pb.projected && wsr) store_as(wsr + 5 * H + j, h, n);
    if (pb.zoneout()) {
      cs = zoneout_forward(zoneout_weight(st.zc, pb.zoneout_p, b * H + j, n),
                           load_as<T>(st.cin + b * H + j, n), c);
      if (!pb.projected) {
        h = zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n),
                            load_as<T>(st.hin + b * P + j, n), h);
      }
    }
    store_as(st.cout + b * H + j, cs, n);
    store_as(st.hfull + b * H + j, h, n);
    if (wsr) store_as(wsr + 4 * H + j, cs, n);
    if (yr) store_as(yr + j, h, n);
  }
}

// A row past its length keeps its state and outputs zeros (units [u0, u1); the state columns
// are units unless projected, in which case the caller copies the projected state).
template <typename S, typename T>
void forward_masked_units(const Problem<S, T>& pb, const FwdStep<S, T>& st, int64_t b, int64_t u0,
                          int64_t u1) {
  const int64_t H = pb.hidden, P = pb.out, KH = pb.wsu * H;
  if (!pb.projected) std::copy(st.hin + b * P + u0, st.hin + b * P + u1, st.hout + b * P + u0);
  if (st.y && !pb.projected) std::fill(st.y + b * P + u0, st.y + b * P + u1, S(0));
  if (pb.cell == Cell::LSTM) {
    std::copy(st.cin + b * H + u0, st.cin + b * H + u1, st.cout + b * H + u0);
  }
  if (pb.cell == Cell::GRU_RESET_BEFORE) std::fill(st.v + b * H + u0, st.v + b * H + u1, T(0));
  if (st.ws) {
    T* wsr = st.ws + b * KH;
    for (int64_t k = 0; k < pb.wsu; ++k) std::fill(wsr + k * H + u0, wsr + k * H + u1, T(0));
    // the backward reads the carried cell state of a masked step as the next step's c_prev
    if (pb.cell == Cell::LSTM) {
      std::copy(st.cin + b * H + u0, st.cin + b * H + u1, wsr + 4 * H + u0);
    }
  }
}

template <typename S, typename T>
struct BwdStep {
  const S* gy;     // (B, P) gradient of y_t, or null (projected: already folded into dh)
  const T* dh;     // (B, P) gradient of the state after the step (B, H: dhfull when projected)
  T* dc;           // (B, H) LSTM: in gradient of c_t, out gradient of c_{t-1}
  const T* ws;     // (B, K*H)
  const T* cprev;  // LSTM: row b at cprev + b * cprev_stride
  int64_t cprev_stride;
  const T* hprev;  // (B, P)
  T* dgh;          // (B, G*H) gradient of the recurrent pre-activations
  S* dgx;          // (B, G*H) gradient of gx, or null when it is dgh itself
  T* dhd;          // (B, P) the part of dh_{t-1} that does not pass through W_hh
  const T* zh;     // (B, P) zoneout draws of h, or null (Problem::zoneout_h)
  const T* zc;     // (B, H) zoneout draws of c
};

// The cell's backward pointwise work for units [u0, u1) of an unmasked batch row b (P == H
// unless projected; the direct term is then written by the caller).
template <typename S, typename T>
void backward_units(const Problem<S, T>& pb, const BwdStep<S, T>& st, int64_t b, int64_t u0,
                    int64_t u1) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const T* wsr = st.ws + b * KH;
  T* dghr = st.dgh + b * GH;
  S* dgxr = st.dgx ? st.dgx + b * GH : nullptr;
  const T* hprev = st.hprev + b * P;
  const T* dhr = st.dh + b * (pb.projected ? H : P);
  const S* gyr = st.gy ? st.gy + b * P : nullptr;
  T* dhdr = st.dhd + b * P;
  const bool relu = pb.cell == Cell::RNN_RELU;
  const bool zoneout = pb.zoneout();
  for (int64_t j = u0; j < u1; j += VS) {
    const int64_t n = std::min(VS, u1 - j);
    V dH = load_as<T>(dhr + j, n);
    if (gyr) dH = dH + load_as<T>(gyr + j, n);
    V dzo = M::zero();  // the part of dH that zoneout passes straight to h_{t-1}
    if (zoneout && !pb.projected) {  // projected: done on the projected state by the caller
      zoneout_backward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n), dH, dH, dzo);
    }
    switch (pb.cell) {
      case Cell::LSTM: {
        V di, df, dg, do_, dcp;
        const V i = load_as<T>(wsr + j, n), f = load_as<T>(wsr + H + j, n);
        const V gg = load_as<T>(wsr + 2 * H + j, n), o = load_as<T>(wsr + 3 * H + j, n);
        V c = load_as<T>(wsr + 4 * H + j, n);
        const V cp = load_as<T>(st.cprev + b * st.cprev_stride + j, n);
        V dcin = load_as<T>(st.dc + b * H + j, n);
        V dc_carry = M::zero();
        if (zoneout) {  // slot 4 holds the zoned-out state: the cell's own c_t is recomputed
          c = f * cp + i * gg;
          zoneout_backward(zoneout_weight(st.zc, pb.zoneout_p, b * H + j, n), dcin, dcin,
                           dc_carry);
        }
        if (pb.peep) {
          lstm_peephole_backward<V, M>(dH, dcin, i, f, gg, o, c, cp, load_as<T>(pb.peep + j, n),
                                       load_as<T>(pb.peep + H + j, n),
                                       load_as<T>(pb.peep + 2 * H + j, n), di, df, dg, do_, dcp);
        } else {
          lstm_backward<V, M>(dH, dcin, i, f, gg, o, c, cp, di, df, dg, do_, dcp);
        }
        store_as(dghr + j, di, n);
        store_as(dghr + H + j, df, n);
        store_as(dghr + 2 * H + j, dg, n);
        store_as(dghr + 3 * H + j, do_, n);
        store_as(st.dc + b * H + j, dcp + dc_carry, n);
        if (!pb.projected) store_as(dhdr + j, dzo, n);
        break;
      }
      case Cell::GRU: {
        V dxr, dxz, dxn, dhn, direct;
        gru_backward<V, M>(dH, load_as<T>(wsr + j, n), load_as<T>(wsr + H + j, n),
                           load_as<T>(wsr + 2 * H + j, n), load_as<T>(wsr + 3 * H + j, n),
                           load_as<T>(hprev + j, n), dxr, dxz, dxn, dhn, direct);
        store_as(dghr + j, dxr, n);
        store_as(dghr + H + j, dxz, n);
        store_as(dghr + 2 * H + j, dhn, n);
        store_as(dgxr + j, dxr, n);
        store_as(dgxr + H + j, dxz, n);
        store_as(dgxr + 2 * H + j, dxn, n);
        store_as(dhdr + j, direct + dzo, n);
        break;
      }
      case Cell::GRU_RESET_BEFORE: {  // phase A; phase B in backward_batched
        V dn, dz, direct;
        gru_rb_backward_out<V, M>(dH, load_as<T>(wsr + H + j, n), load_as<T>(wsr + 2 * H + j, n),
                                  load_as<T>(hprev + j, n), dn, dz, direct);
        store_as(dghr + H + j, dz, n);
        store_as(dghr + 2 * H + j, dn, n);
        store_as(dhdr + j, direct + dzo, n);
        break;
      }
      case Cell::RNN_TANH:
      case Cell::RNN_RELU: {
        store_as(dghr + j, rnn_backward<V, M>(dH, load_as<T>(wsr + j, n), relu), n);
        store_as(dhdr + j, dzo, n);
        break;
      }
    }
  }
}

// The layer-normalised LSTM's backward for one unmasked row (all H units): the statistics of c_t
// (recomputed from the gates), the row means of the normalisation's gradient, then the gates.
// scratch: 2H values per row; dln: the step's (B, 2H) gradient terms of ln_c (du * xhat) and
// ln_bias_c (du), summed over steps and rows by the caller.
template <typename S, typename T>
void backward_lstm_ln_row(const Problem<S, T>& pb, const BwdStep<S, T>& st, int64_t b,
                          T* scratch, T* dln) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const T* wsr = st.ws + b * KH;
  const T* cpr = st.cprev + b * st.cprev_stride;
  const T* dhr = st.dh + b * (pb.projected ? H : P);
  const S* gyr = st.gy ? st.gy + b * P : nullptr;
  T* dghr = st.dgh + b * GH;
  T* cn = scratch + b * 2 * H;
  T* dxh_row = cn + H;
  T* dlnr = dln + b * 2 * H;
  const bool zoneout = pb.zoneout();
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t n = std::min(VS, H - j);
    store_as(cn + j,
             load_as<T>(wsr + H + j, n) * load_as<T>(cpr + j, n) +
                 load_as<T>(wsr + j, n) * load_as<T>(wsr + 2 * H + j, n),
             n);
  }
  const auto [mean, rstd] = row_mean_rstd(cn, H);
  // dH of the cell's h (zoneout's direct share split off) and what the cell needs of it
  auto cell_dh = [&](int64_t j, int64_t n, V& dzo) {
    V dH = load_as<T>(dhr + j, n);
    if (gyr) dH = dH + load_as<T>(gyr + j, n);
    dzo = M::zero();
    if (zoneout && !pb.projected) {
      zoneout_backward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n), dH, dH, dzo);
    }
    return dH;
  };
  auto sum = [](const V& a, const V& b) { return a + b; };
  V s1(T(0)), s2(T(0));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t n = std::min(VS, H - j);
    V dzo;
    const V dH = cell_dh(j, n, dzo);
    const V xh = (load_as<T>(cn + j, n) - V(mean)) * V(rstd);
    const V gamma = load_as<T>(pb.ln_c + j, n);
    const V tu = M::tanh_(xh * gamma + load_as<T>(pb.ln_bias_c + j, n));
    const V du = dH * load_as<T>(wsr + 3 * H + j, n) * (M::one() - tu * tu);  // zero past n
    const V dxh = du * gamma;
    store_as(dxh_row + j, dxh, n);
    store_as(dlnr + j, du * xh, n);
    store_as(dlnr + H + j, du, n);
    s1 = s1 + dxh;
    s2 = s2 + dxh * xh;
  }
  const V m1(at::vec::vec_reduce_all<T>(sum, s1) / T(H));
  const V m2(at::vec::vec_reduce_all<T>(sum, s2) / T(H));
  for (int64_t j = 0; j < H; j += VS) {
    const int64_t n = std::min(VS, H - j);
    V dzo;
    const V dH = cell_dh(j, n, dzo);
    const V i = load_as<T>(wsr + j, n), f = load_as<T>(wsr + H + j, n);
    const V gg = load_as<T>(wsr + 2 * H + j, n), o = load_as<T>(wsr + 3 * H + j, n);
    const V cp = load_as<T>(cpr + j, n);
    const V xh = (load_as<T>(cn + j, n) - V(mean)) * V(rstd);
    const V tu = M::tanh_(xh * load_as<T>(pb.ln_c + j, n) + load_as<T>(pb.ln_bias_c + j, n));
    const V do_ = dH * tu * o * (M::one() - o);
    V dc = load_as<T>(st.dc + b * H + j, n);
    V dc_carry = M::zero();
    if (zoneout) {
      zoneout_backward(zoneout_weight(st.zc, pb.zoneout_p, b * H + j, n), dc, dc, dc_carry);
    }
    V dct = dc + layer_norm_backward(load_as<T>(dxh_row + j, n), xh, V(rstd), m1, m2);
    if (pb.peep) dct = dct + do_ * load_as<T>(pb.peep + 2 * H + j, n);
    V di, df, dg, dcp;
    lstm_gates_backward<V, M>(dct, i, f, gg, cp, di, df, dg, dcp);
    if (pb.peep) dcp = dcp + di * load_as<T>(pb.peep + j, n) + df * load_as<T>(pb.peep + H + j, n);
    store_as(dghr + j, di, n);
    store_as(dghr + H + j, df, n);
    store_as(dghr + 2 * H + j, dg, n);
    store_as(dghr + 3 * H + j, do_, n);
    store_as(st.dc + b * H + j, dcp + dc_carry, n);
    if (!pb.projected) store_as(st.dhd + b * P + j, dzo, n);
  }
}

// Masked row: no gradient reaches the step's inputs; dh and dc pass through unchanged.
template <typename S, typename T>
void backward_masked_units(const Problem<S, T>& pb, const BwdStep<S, T>& st, int64_t b,
                           int64_t u0, int64_t u1) {
  const int64_t H = pb.hidden, P = pb.out, GH = pb.gates * H;
  for (int64_t g = 0; g < pb.gates; ++g) {
    std::fill(st.dgh + b * GH + g * H + u0, st.dgh + b * GH + g * H + u1, T(0));
    if (st.dgx) std::fill(st.dgx + b * GH + g * H + u0, st.dgx + b * GH + g * H + u1, S(0));
  }
  if (!pb.projected) std::copy(st.dh + b * P + u0, st.dh + b * P + u1, st.dhd + b * P + u0);
}

// The buffers the backward's steps index, as raw pointers taken once per call rather than per
// step (a data_ptr checks dtype and storage: measurable at batch 1, where a step takes a few
// microseconds).
template <typename S, typename T>
struct BwdBuffers {
  T* dc;        // (B, H) LSTM, else null
  const T* c0;  // (B, H) LSTM, else null
  const T* ws;
  const T* hs;
  T* dgh;
  BwdBuffers(const Problem<S, T>& pb, Tensor& dc_t, const Tensor& c0_t, const Tensor& ws_t,
             const Tensor& hs_t, Tensor& dgh_t)
      : dc(pb.cell == Cell::LSTM ? dc_t.data_ptr<T>() : nullptr),
        c0(pb.cell == Cell::LSTM ? c0_t.data_ptr<T>() : nullptr),
        ws(ws_t.data_ptr<T>()), hs(hs_t.data_ptr<T>()), dgh(dgh_t.data_ptr<T>()) {}
};

template <typename S, typename T>
BwdStep<S, T> make_bwd_step(const Problem<S, T>& pb, const BwdBuffers<S, T>& buf, int64_t s,
                            const S* gy, const T* dh, S* dgx, T* dhd) {
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const int64_t t = pb.time(s);
  const int64_t t_prev = pb.reverse ? t + 1 : t - 1;  // time of the previous forward step
  const bool lstm = pb.cell == Cell::LSTM;
  const bool first = s == 0;
  return BwdStep<S, T>{
      (gy && !pb.projected) ? gy + t * B * P : nullptr,
      dh,
      buf.dc,
      buf.ws + t * B * KH,
      lstm ? (first ? buf.c0 : buf.ws + t_prev * B * KH + 4 * H) : nullptr,
      first ? H : KH,
      buf.hs + pb.slot_in(s) * B * P,
      buf.dgh + t * B * GH,
      dgx ? dgx + t * B * GH : nullptr,
      dhd,
      pb.zoneout_h(t),
      pb.zoneout_c(t)};
}

// ============================================================== batched path
// Per step: one ATen GEMM on all threads, then the pointwise pass split over batch rows. Takes
// every cell and the projection.

// rdrop: (B, P) recurrent dropout mask (scaled), or undefined.
template <typename S, typename T>
void forward_batched(const Problem<S, T>& pb, const Tensor& gx, const Tensor& w, const Tensor& bias,
                     const Tensor& w_hr, const Tensor& rdrop, Tensor& y, Tensor& hs, Tensor& ws,
                     Tensor& cbuf) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const bool split = pb.cell == Cell::GRU_RESET_BEFORE;
  Tensor hfull = pb.projected ? at::empty({B, H}, hs.options()) : Tensor();
  Tensor w1 = split ? w.narrow(0, 0, 2 * H) : w;
  Tensor b1 = bias.defined() && split ? bias.narrow(0, 0, 2 * H) : bias;
  Tensor vbuf, ghv, w2, b2;
  if (split) {
    vbuf = at::empty({B, H}, hs.options());
    ghv = at::empty({B, H}, hs.options());
    w2 = w.narrow(0, 2 * H, H);
    if (bias.defined()) b2 = bias.narrow(0, 2 * H, H);
  }
  Tensor gh = at::empty({B, w1.size(0)}, hs.options());
  const int64_t ghs = gh.size(1);
  Tensor hdrop = pb.dropout ? at::empty({B, P}, hs.options()) : Tensor();
  const bool ln = pb.layer_norm(), ln_lstm = ln && pb.cell == Cell::LSTM;
  Tensor scratch = ln_lstm ? at::empty({B, 2 * H}, hs.options()) : Tensor();

  for (int64_t s = 0; s < pb.steps; ++s) {
    const int64_t t = pb.time(s);
    Tensor hin = hs.select(0, pb.slot_in(s));
    Tensor hout = hs.select(0, pb.slot_out(s));
    if (pb.dropout) at::mul_out(hdrop, hin, rdrop);
    const Tensor& hrec = pb.dropout ? hdrop : hin;
    // with layer normalisation b_hh comes after it
    step_product_nt<T>(gh, hrec, w1, ln ? Tensor() : b1);
    T* hout_p = hout.data_ptr<T>();
    FwdStep<S, T> st{
        gx.data_ptr<S>() + t * B * GH, hin.data_ptr<T>(), hout_p,
        pb.cell == Cell::LSTM ? cbuf.select(0, s & 1).data_ptr<T>() : nullptr,
        pb.cell == Cell::LSTM ? cbuf.select(0, (s + 1) & 1).data_ptr<T>() : nullptr,
        pb.projected ? hfull.data_ptr<T>() : hout_p,
        pb.save ? ws.data_ptr<T>() + t * B * KH : nullptr,
        (pb.projected || split) ? nullptr : y.data_ptr<S>() + t * B * P,
        split ? vbuf.data_ptr<T>() : nullptr};
    st.zh = pb.zoneout_h(t);
    st.zc = pb.zoneout_c(t);
    if (pb.dropout) st.hrec = hdrop.data_ptr<T>();
    T* gh_p = gh.data_ptr<T>();
    parallel_rows(B, GH, [&](int64_t b) {
      if (pb.masked(t, b)) {
        forward_masked_units(pb, st, b, 0, H);
        return;
      }
      if (ln) layer_norm_gates(pb, gh_p + b * ghs, st.ws ? st.ws + b * KH + pb.ln_at : nullptr);
      if (ln_lstm) {
        forward_lstm_ln_row(pb, st, b, gh_p + b * ghs, scratch.data_ptr<T>());
      } else {
        forward_units(pb, st, b, 0, H, gh_p + b * ghs, H);
      }
    });
    S* yt = y.data_ptr<S>() + t * B * P;
    if (split) {
      // Phase 2 of the reset-before GRU: the n rows of W_hh multiply r * h_prev.
      step_product_nt<T>(ghv, vbuf, w2, b2);
      const T* ghv_p = ghv.data_ptr<T>();
      parallel_rows(B, H, [&](int64_t b) {
        S* yr = yt + b * P;
        const T* hprev = st.hin + b * P;
        if (pb.masked(t, b)) {
          std::fill(yr, yr + P, S(0));
          return;
        }
        const S* gxr = st.gx + b * GH;
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = std::min(VS, H - j);
          const V z =
              M::sigmoid(load_as<T>(gxr + H + j, n) + load_as<T>(gh_p + b * ghs + H + j, n));
          V nn, h;
          const V hp = load_as<T>(hprev + j, n);
          gru_rb_forward_out<V, M>(load_as<T>(gxr + 2 * H + j, n),
                                   load_as<T>(ghv_p + b * H + j, n), z, hp, nn, h);
          if (pb.zoneout()) {
            h = zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n), hp, h);
          }
          store_as(hout_p + b * H + j, h, n);
          if (st.ws) store_as(st.ws + b * KH + 2 * H + j, nn, n);
          store_as(yr + j, h, n);
        }
      });
    }
    if (pb.projected) {
      step_product_nt<T>(hout, hfull, w_hr, Tensor());
      parallel_rows(B, P, [&](int64_t b) {
        S* yr = yt + b * P;
        T* hr = hout_p + b * P;
        if (pb.masked(t, b)) {
          std::copy(st.hin + b * P, st.hin + (b + 1) * P, hr);
          std::fill(yr, yr + P, S(0));
          return;
        }
        if (pb.zoneout()) {
          for (int64_t j = 0; j < P; j += VS) {
            const int64_t n = std::min(VS, P - j);
            store_as(hr + j,
                     zoneout_forward(zoneout_weight(st.zh, pb.zoneout_p, b * P + j, n),
                                     load_as<T>(st.hin + b * P + j, n), load_as<T>(hr + j, n)),
                     n);
          }
        }
        store_scalar_row(yr, hr, P);
      });
    }
  }
}

// Layer normalisation: dgraw (T, B, G*H) receives the gradients of the raw h W_hh^T, xhat
// (T, B, G*H) their normalised values, dln (T, B, 2H) the LSTM's cell-normalisation terms.
template <typename S, typename T>
void backward_batched(const Problem<S, T>& pb, const Tensor& grad_y, const Tensor& c0,
                      const Tensor& w, const Tensor& w_hr, const Tensor& rdrop, const Tensor& hs,
                      const Tensor& ws, Tensor& dh, Tensor& dc, Tensor& dgx, Tensor& dgh,
                      Tensor& dhp, Tensor& dgraw, Tensor& xhat, Tensor& dln) {
  using V = Vectorized<T>;
  constexpr int64_t VS = V::size();
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, GH = pb.gates * H, KH = pb.wsu * H;
  const bool split = pb.cell == Cell::GRU_RESET_BEFORE;
  Tensor dhd = at::empty({B, P}, dh.options());
  Tensor dhfull = pb.projected ? at::empty({B, H}, dh.options()) : Tensor();
  Tensor dv = split ? at::empty({B, H}, dh.options()) : Tensor();
  Tensor dhrec = pb.dropout ? at::empty({B, P}, dh.options()) : Tensor();
  const bool ln = pb.layer_norm(), ln_lstm = ln && pb.cell == Cell::LSTM;
  Tensor scratch = ln_lstm ? at::empty({B, 2 * H}, dh.options()) : Tensor();
  Tensor w_rec = split ? w.narrow(0, 0, 2 * H) : w;
  Tensor w_n = split ? w.narrow(0, 2 * H, H) : Tensor();
  const S* gy_p = grad_y.defined() ? grad_y.data_ptr<S>() : nullptr;
  T* dh_p = dh.data_ptr<T>();
  T* dhd_p = dhd.data_ptr<T>();
  const bool dgx_is_dgh = static_cast<void*>(dgx.data_ptr()) == static_cast<void*>(dgh.data_ptr());
  S* dgx_p = dgx_is_dgh ? nullptr : dgx.data_ptr<S>();
  const T* dh_rec = pb.projected ? dhfull.data_ptr<T>() : dh_p;  // the dh the cell's step takes
  const BwdBuffers<S, T> buf(pb, dc, c0, ws, hs, dgh);

  for (int64_t s = pb.steps - 1; s >= 0; --s) {
    const int64_t t = pb.time(s);
    if (pb.projected) {
      // rec: the gradient of the projection's output; dhd: the direct part of dh_{t-1} (all of
      // dh for a masked row, the zoned-out share otherwise)
      T* dhp_p = dhp.data_ptr<T>();
      const T* zh = pb.zoneout_h(t);
      parallel_rows(B, P, [&](int64_t b) {
        T* d = dh_p + b * P;
        T* rec = dhp_p + (t * B + b) * P;
        T* direct = dhd_p + b * P;
        if (pb.masked(t, b)) {
          std::fill(rec, rec + P, T(0));
          std::copy(d, d + P, direct);
          return;
        }
        if (gy_p) {
          const S* g = gy_p + (t * B + b) * P;
          for (int64_t k = 0; k < P; ++k) d[k] += static_cast<T>(g[k]);
        }
        if (!pb.zoneout()) {
          std::copy(d, d + P, rec);
          std::fill(direct, direct + P, T(0));
          return;
        }
        for (int64_t j = 0; j < P; j += VS) {
          const int64_t n = std::min(VS, P - j);
          V dnext, dprev;
          zoneout_backward(zoneout_weight(zh, pb.zoneout_p, b * P + j, n), load_as<T>(d + j, n),
                           dnext, dprev);
          store_as(rec + j, dnext, n);
          store_as(direct + j, dprev, n);
        }
      });
      at::mm_out(dhfull, dhp.select(0, t), w_hr);
    }
    const BwdStep<S, T> st = make_bwd_step(pb, buf, s, gy_p, dh_rec, dgx_p, dhd_p);
    parallel_rows(B, GH, [&](int64_t b) {
      if (pb.masked(t, b)) {
        backward_masked_units(pb, st, b, 0, H);
      } else if (ln_lstm) {
        backward_lstm_ln_row(pb, st, b, scratch.data_ptr<T>(),
                             dln.data_ptr<T>() + t * B * 2 * H);
      } else {
        backward_units(pb, st, b, 0, H);
      }
      if (ln) {
        layer_norm_gates_backward(pb, st.ws + b * KH + pb.ln_at, st.dgh + b * GH,
                                  dgraw.data_ptr<T>() + (t * B + b) * GH,
                                  xhat.data_ptr<T>() + (t * B + b) * GH);
      }
    });
    Tensor dgh_t = (ln ? dgraw : dgh).select(0, t);
    if (split) {
      at::mm_out(dv, dgh_t.narrow(1, 2 * H, H), w_n);
      const T* dv_p = dv.data_ptr<T>();
      parallel_rows(B, H, [&](int64_t b) {
        if (pb.masked(t, b)) return;
        const T* wsr = st.ws + b * KH;
        const T* hprev = st.hprev + b * P;
        const T* mask = pb.dropout ? rdrop.data_ptr<T>() + b * P : nullptr;
        T* dghr = st.dgh + b * GH;
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = std::min(VS, H - j);
          V dr;
          V direct = load_as<T>(dhd_p + b * P + j, n);
          // v = r * (h * mask): the mask scales both of v's factors' gradients alike
          V dvr = load_as<T>(dv_p + b * H + j, n);
          if (mask) dvr = dvr * load_as<T>(mask + j, n);
          gru_rb_backward_gates<V, VecMath<T>>(dvr, load_as<T>(wsr + j, n),
                                               load_as<T>(hprev + j, n), dr, direct);
          store_as(dghr + j, dr, n);
          store_as(dhd_p + b * P + j, direct, n);
        }
      });
    }
    if (!dgx_is_dgh && pb.cell != Cell::GRU) {
      parallel_rows(B, GH, [&](int64_t b) {
        store_scalar_row(dgx_p + (t * B + b) * GH, st.dgh + b * GH, GH);
      });
    }
    const Tensor dgh_rec = split ? dgh_t.narrow(1, 0, 2 * H) : dgh_t;
    if (pb.dropout) {
      at::mm_out(dhrec, dgh_rec, w_rec);
      at::addcmul_out(dh, dhd, dhrec, rdrop);
    } else {
      at::addmm_out(dh, dhd, dgh_rec, w_rec);
    }
  }
}

// ============================================================== persistent path
// One team of threads (the OpenMP team of at::parallel_for) lives for the whole sequence, the CPU
// twin of a persistent GPU kernel. The team is split into row groups (Share, row_groups below):
// independent recurrences over disjoint batch rows. Within a group thread k owns the hidden
// units [u0, u1): in the forward the G row blocks of W_hh that produce them, in the backward the
// columns of W_hh that they multiply; both stay in that core's L2 across steps (H = 256 fp32
// LSTM, batch 1: 512 KB per thread of two). Per step a thread computes its part of the matmul
// for its group's rows (a panel GEMM on its slice, packed once per call: panel_gemm.h) and the
// cell's pointwise work on its units. The only values a thread reads from others are the step's
// state (forward) or the step's dgh (backward) of its group: a thread announces its part of them
// when written (StepFlags) and waits for the others' only after multiplying its own part, so the
// cross-core transfer overlaps that part of the matmul. A thread is never more than one step
// ahead of another of its group, which is what lets the forward keep two state slots (groups
// touch disjoint rows of them). With one thread per group (a training batch on few cores)
// there is no barrier at all: each thread keeps the whole W_hh.

// Spins before a waiting thread yields, so that an oversubscribed machine still progresses.
constexpr int kSpinsBeforeYield = 1024;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(_M_X64)
  _mm_pause();
#endif
}

// Split barrier: thread k arrives at step s when its part of the values the step publishes
// (its units of the state in the forward, its rows of dgh in the backward) is written, and
// waits for the others' arrival only when it needs their parts. In between it multiplies its
// own part by its slice of W_hh, so the time the other threads' values take to cross cores
// overlaps a part of the step's matmul.
class StepFlags {
 public:
  explicit StepFlags(int capacity) : done_(static_cast<size_t>(capacity)) {}
  void reset(int n) { n_ = n; }  // the threads the team actually has, at most the capacity
  void fail() { failed_.store(true, std::memory_order_release); }
  void arrive(int64_t k, int64_t s) { done_[k].v.store(s + 1, std::memory_order_release); }
  // Returns once every thread of [j0, j1) but k has arrived at step s (at once for s < 0).
  void wait_others(int64_t k, int64_t s, int64_t j0, int64_t j1) const {
    for (int64_t j = j0; j < std::min(j1, n_); ++j) {
      if (j == k) continue;
      for (int spins = 0; done_[j].v.load(std::memory_order_acquire) <= s; ++spins) {
        if (failed_.load(std::memory_order_acquire)) {
          throw std::runtime_error("rnnkernels: another thread of the recurrence failed");
        }
        if (spins < kSpinsBeforeYield) {
          cpu_relax();
        } else {
          std::this_thread::yield();
        }
      }
    }
  }

 private:
  struct alignas(64) Flag {
    std::atomic<int64_t> v{0};
  };
  std::vector<Flag> done_;
  int64_t n_ = 1;
  std::atomic<bool> failed_{false};
};

// Runs body(k, n, flags) on every thread of one parallel region, k in [0, n), with no more
// threads than the step's work keeps busy. The team size is what at::parallel_for actually gets
// (1 inside another parallel region), read from the chunk it hands to the first thread, so no
// thread waits for one that does not exist.
// Matmul work (multiply-adds) per step below which a thread is not worth a barrier per step.
constexpr int64_t kMinStepWorkPerThread = 32768;

template <typename F>
void run_team(int64_t step_work, const F& body) {
  const int64_t want = std::min<int64_t>(at::get_num_threads(),
                                         std::max<int64_t>(1, step_work / kMinStepWorkPerThread));
  std::atomic<int64_t> chunk{0};
  StepFlags flags(static_cast<int>(want));
  at::parallel_for(0, want, 1, [&](int64_t begin, int64_t end) {
    if (begin == 0) {
      flags.reset(static_cast<int>((want + (end - begin) - 1) / (end - begin)));
      chunk.store(end - begin, std::memory_order_release);
    }
    int64_t c;
    while ((c = chunk.load(std::memory_order_acquire)) == 0) cpu_relax();
    try {
      body(begin / c, (want + c - 1) / c, flags);
    } catch (...) {
      flags.fail();
      throw;
    }
  });
}

// Units [u0, u1) of thread k of n, in whole SIMD vectors where possible.
template <typename T>
std::pair<int64_t, int64_t> unit_range(int64_t H, int64_t k, int64_t n) {
  const int64_t vs = Vectorized<T>::size();
  const int64_t per = (((H + vs - 1) / vs + n - 1) / n) * vs;
  const int64_t u0 = std::min(H, k * per);
  return {u0, std::min(H, u0 + per)};
}

// Thread k's share of the problem: batch rows [b0, b1), hidden units [u0, u1), and the threads
// [j0, j1) that share its rows (its row group), the only ones it waits for. Row groups are
// independent recurrences: with one thread per group there is no barrier at all, at the price
// of every thread reading the whole W_hh (not a slice) at every step, from its L2 or from L3.
struct Share {
  int64_t b0, b1, u0, u1, j0, j1;
};

// Row groups need at least kMinRowsPerGroup rows each: with fewer, the per-step product is
// too short a panel GEMM to hide the stream of its weights, and the split by units (slices of
// W_hh that stay in each core's L2, one barrier per step) is faster. From that many rows on the
// groups are faster even where each thread's whole W_hh (or its group's slice) exceeds its L2
// and streams from L3 at every step: the rows' multiply-adds hide the stream, and no thread
// waits for another at any step. Measured on the AMD EPYC Zen 4 (2 threads, 1 MB of L2 each;
// training step and forward, T = 128, the fp32 LSTM, GRU and RNN, groups against units): at
// hidden 256, 1-9% faster at B = 8 (4 rows a group, the LSTM's 1 MB W_hh whole in each), 12,
// 16 and 24, 1-34% slower at B = 2 to 6 (1 to 3 rows a group); at hidden 512 (the LSTM's W_hh
// 4 MB) 5-16% faster at B = 8, up to 20% at 16, and mostly slower at B = 4 (2 rows a group).
// Each thread packs its own copy of its slice: kMaxStreamedSliceBytes bounds that memory.
constexpr int64_t kMinRowsPerGroup = 4;
constexpr int64_t kMaxStreamedSliceBytes = 4 * 1024 * 1024;

// Row groups for a team of n: the most (a divisor of n) that the limits above allow.
// RNNKERNELS_CPU_RECURRENCE=units / rows forces one group / as many as the batch allows.
template <typename S, typename T>
int64_t row_groups(const Problem<S, T>& pb, int64_t n) {
  const char* forced = std::getenv("RNNKERNELS_CPU_RECURRENCE");
  const std::string mode = forced != nullptr ? forced : "";
  if (mode == "units") return 1;
  const int64_t w_bytes = pb.gates * pb.hidden * pb.out * static_cast<int64_t>(sizeof(T));
  int64_t best = 1;
  for (int64_t r = 2; r <= std::min(n, pb.batch); ++r) {
    const int64_t rows = pb.batch / r;
    const int64_t slice = w_bytes / (n / r);
    if (n % r == 0 && (mode == "rows" || (rows >= kMinRowsPerGroup &&
                                          slice <= kMaxStreamedSliceBytes))) {
      best = r;
    }
  }
  return best;
}

template <typename S, typename T>
Share share_of(const Problem<S, T>& pb, int64_t k, int64_t n) {
  const int64_t groups = row_groups(pb, n), per = n / groups, g = k / per;
  const auto [u0, u1] = unit_range<T>(pb.hidden, k - g * per, per);
  const int64_t rows = pb.batch / groups, extra = pb.batch % groups;
  const int64_t b0 = g * rows + std::min(g, extra);
  return {b0, b0 + rows + (g < extra ? 1 : 0), u0, u1, g * per, (g + 1) * per};
}

// The rows of a thread's share that are within their length at a step, for a row group of one
// thread (a training batch: the thread owns all units of its rows, so no other thread's part of
// the product is pending): gather(t, src) copies those rows of src (row stride width) into a
// block and says whether any row is past its length, in which case the step's product runs on
// the block (count() rows) instead of on all the share's rows, and row r of its result belongs
// to the r-th such row. A padded batch (PackedSequence) then multiplies only its rows' valid
// steps, as cuDNN's packed layout does.
template <typename T>
class ActiveRows {
 public:
  template <typename S>
  ActiveRows(const Problem<S, T>& pb, int64_t b0, int64_t b1, int64_t group_threads,
             int64_t width)
      : lengths_(group_threads == 1 ? pb.lengths : nullptr), b0_(b0), b1_(b1), width_(width) {
    if (lengths_ != nullptr) {
      block_ = at::empty({std::max<int64_t>(b1 - b0, 1), width},
                         at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    }
  }

  bool gather(int64_t t, const T* src) {
    if (lengths_ == nullptr) return false;
    count_ = 0;
    for (int64_t b = b0_; b < b1_; ++b) count_ += t < lengths_[b] ? 1 : 0;
    if (count_ == b1_ - b0_) return false;
    T* dst = block_.data_ptr<T>();
    for (int64_t b = b0_, r = 0; b < b1_; ++b) {
      if (t < lengths_[b]) std::copy(src + b * width_, src + (b + 1) * width_, dst + r++ * width_);
    }
    return true;
  }
  int64_t count() const { return count_; }
  const T* data() const { return block_.data_ptr<T>(); }

 private:
  const int64_t* lengths_;
  int64_t b0_, b1_, width_, count_ = 0;
  Tensor block_;
};

// Batch-1 inference from x instead of gx (recurrence_infer): each thread computes the input
// projection of its units' rows of W_ih itself, into a ring of its own that holds gx of the
// steps it will run next (rows of G*H, of which it writes and reads its own units' columns only,
// so that the cell code reads it as it reads gx), in one of two ways (FusedProjection):
// - units: a block of RowProjection::kSteps steps ahead, interleaved with its recurrent products
//   (RowProjection; a ring of 2 * kSteps rows, the block being run and the next one), one unit
//   per 4 k of the product. Per block it reads its W_ih slice once, and per step its W_hh slice;
// - blocks: kProjectionSteps steps at a time as one panel GEMM at the first of them (a ring of
//   kProjectionSteps rows): the GEMM's register blocks keep the multiply-add units busy, and W_ih
//   passes through L2 once per block.
// Blocks where the thread's W_hh slice fits in 7/8 of its L2 (sysconf) and W_hh and W_ih together
// do not, and on AVX2 builds also where I > P (the projection then has more units than the product
// has slots, one per 4 k of W_hh's P rows, and the rest run on their own in smaller register blocks
// than the GEMM's); units elsewhere. On the AMD EPYC Zen 2 (512 KB of L2), fp32, T = 256, two
// threads, python -m bench.projection_effect (units against blocks in one process,
// bench/results/cpu-2026-12-05-projection.md): with I = 256 > H = 128 blocks ran the GRU and the
// RNN 1.11x as fast as units, the LSTM 0.97x; with I = H units ran 0.98-1.07x as fast as blocks at
// 128 and 512, the LSTM and the RNN at 256 1.02-1.03x, the GRU at 256 (blocks) 0.95x. On the AMD
// EPYC Zen 4 (1 MB of L2) the units ran mostly in the product's shadow (see RowProjection).
// RNNKERNELS_CPU_PROJECTION=units / blocks forces one (the tests run both).
// Not one ring shared by the team: there the threads' columns alternate every H / n units, and on
// a virtual machine whose two cores were far apart (a round trip of about 500 ns between them,
// against 120 on others) the cores' prefetchers pulling each other's neighbouring lines cost the
// fp32 GRU at hidden 256, T = 256, about a tenth of its time.
struct FusedInput {
  const float* x;     // (T, 1, I)
  const float* w_ih;  // (G*H, I)
  const float* b_ih;  // (G*H,) or null
  int64_t I;
};

#ifdef RNNKERNELS_FUSED_INPUT
constexpr int64_t kProjectionSteps = 32;

enum class FusedProjection { kUnits, kBlocks };

// How a thread whose slices of W_hh (P rows) and W_ih (I rows) take hh_bytes and ih_bytes
// computes its projection (see FusedInput).
FusedProjection fused_projection(int64_t hh_bytes, int64_t ih_bytes, int64_t P, int64_t I) {
  const char* forced = std::getenv("RNNKERNELS_CPU_PROJECTION");
  const std::string mode = forced != nullptr ? forced : "";
  if (mode == "units") return FusedProjection::kUnits;
  if (mode == "blocks") return FusedProjection::kBlocks;
  static const int64_t l2 = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    return static_cast<int64_t>(sysconf(_SC_LEVEL2_CACHE_SIZE));
#else
    return int64_t{0};
#endif
  }();
  const int64_t room = l2 / 8 * 7;
  if (hh_bytes <= room && hh_bytes + ih_bytes > room) return FusedProjection::kBlocks;
  if (lanes::kVectorRegisters < 32 && I > P) return FusedProjection::kBlocks;  // AVX2
  return FusedProjection::kUnits;
}
#endif

template <typename S, typename T>
void forward_persistent(const Problem<S, T>& pb, const Tensor& gx, const Tensor& w,
                        const Tensor& bias, Tensor& y, Tensor& hs, Tensor& ws, Tensor& cbuf,
                        const FusedInput* fused = nullptr) {
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, G = pb.gates, GH = G * H, KH = pb.wsu * H;
  const T* w_p = w.data_ptr<T>();
  const T* bias_p = bias.defined() ? bias.data_ptr<T>() : nullptr;
  TORCH_INTERNAL_ASSERT(fused == nullptr || (B == 1 && !pb.save && pb.lengths == nullptr));
#ifdef RNNKERNELS_FUSED_INPUT
  constexpr bool kFusable = std::is_same_v<S, float> && std::is_same_v<T, float>;
  constexpr int kSteps = RowProjection::kSteps;
#else
  TORCH_INTERNAL_ASSERT(fused == nullptr);
#endif
  // The step's buffers, as raw pointers taken once (see BwdBuffers)
  const S* gx_p = fused == nullptr ? gx.data_ptr<S>() : nullptr;
  T* hs_p = hs.data_ptr<T>();
  T* c_p = pb.cell == Cell::LSTM ? cbuf.data_ptr<T>() : nullptr;
  T* ws_p = pb.save ? ws.data_ptr<T>() : nullptr;
  S* y_p = y.data_ptr<S>();
  run_team(B * GH * P, [&](int64_t k, int64_t n, StepFlags& flags) {
    const auto [b0, b1, u0, u1, j0, j1] = share_of(pb, k, n);
    const int64_t nk = u1 - u0;
    // Row b of this thread's matmul result: gh[b * G * nk + g * nk + unit]; the thread's G row
    // blocks of W_hh (and of b_hh) are packed once, so that a step is one panel GEMM.
    const int64_t ldg = G * std::max<int64_t>(nk, 1);
    Tensor gh = at::empty({B, ldg}, hs.options());
    T* gh_p = gh.data_ptr<T>();
    std::vector<typename PackedPanels<T>::Columns> runs;
    for (int64_t g = 0; g < G && nk > 0; ++g) {
      runs.push_back({g * nk, nk, w_p + (g * H + u0) * P, 1, P,
                      bias_p != nullptr ? bias_p + g * H + u0 : nullptr});
    }
    typename PackedPanels<T>::Ranges own, others;  // the state's units: this thread's, the rest
    own.add(u0, u1);
    others.add(0, u0);
    others.add(u1, P);
    // The thread's slice, packed once; product(h, ks, accumulate) adds the state's units ks
    // times it to gh. bfloat16 weights on a CPU with bfloat16 dot products: the slice packed in
    // bfloat16 and the state rounded to it for the product (as torch's bfloat16 matmuls round
    // their inputs).
    std::optional<PackedPanels<T>> w_own;
#ifdef RNNKERNELS_BF16_DOT
    std::optional<PackedPanelsBF16> w16;
    if constexpr (std::is_same_v<S, c10::BFloat16>) {
      if (bf16_dot_available()) {
        w16.emplace(P, nk > 0 ? G * nk : 0, b1 - b0, runs, std::vector{own, others});
      }
    }
    if (!w16) w_own.emplace(P, nk > 0 ? G * nk : 0, runs, std::vector{own, others});
#else
    w_own.emplace(P, nk > 0 ? G * nk : 0, runs, std::vector{own, others});
#endif
    // m rows of states a (row stride P) times the slice, into gh's rows from b0 on.
    auto multiply = [&](int64_t m, const T* a, const typename PackedPanels<T>::Ranges& ks,
                        bool accumulate) {
#ifdef RNNKERNELS_BF16_DOT
      if constexpr (std::is_same_v<T, float>) {
        if (w16) {
          w16->multiply(m, a, P, gh_p + b0 * ldg, ldg, ks, accumulate);
          return;
        }
      }
#endif
      w_own->multiply(m, a, P, gh_p + b0 * ldg, ldg, ks, accumulate);
    };
    auto product = [&](const T* h, const typename PackedPanels<T>::Ranges& ks, bool accumulate) {
      multiply(b1 - b0, h + b0 * P, ks, accumulate);
    };
    ActiveRows<T> active(pb, b0, b1, j1 - j0, P);
    // Without save (inference: two state slots) the thread's own units of the state also go to
    // slots of its own (own_state), from which its own part of the next step's product reads
    // them. In the shared slots, the lines of those units were read by the group's other threads
    // one step and are rewritten by this one the step after: every rewrite first takes them back
    // from the other cores, so the stores wait in the store buffer for a cross-core round trip,
    // and the product's loads of the same units waited behind them. Batch-1 inference at hidden
    // 256, T = 256, two threads of the AMD EPYC Zen 2 (python -m bench.roofline, three runs
    // each, alternating with a build without the copy; medians): GRU 2.49 -> 2.32 ms, RNN 1.08
    // -> 0.97 ms, LSTM 3.34 -> 3.30 ms.
    const bool own_copy = !pb.save && j1 - j0 > 1 && nk > 0;
    Tensor own_state = own_copy ? at::empty({2, B, P}, hs.options()) : Tensor();
    T* own_p = own_copy ? own_state.data_ptr<T>() : nullptr;
    auto keep_own = [&](const T* h, int64_t slot) {  // rows b0..b1, units u0..u1 of h to a slot
      for (int64_t b = b0; b < b1; ++b) {
        std::copy(h + b * P + u0, h + b * P + u1, own_p + (slot * B + b) * P + u0);
      }
    };
    if (own_copy) keep_own(hs_p + pb.slot_in(0) * B * P, pb.slot_in(0));
#ifdef RNNKERNELS_FUSED_INPUT
    // Fused input: the thread's rows of W_ih (those of its units in every gate), packed once.
    std::optional<RowProjection> xp;  // units
    std::vector<PackedPanels<float>> xp_gates;  // blocks: the slice's rows of each gate
    Tensor ring;  // this thread's (see FusedInput)
    float* ring_p = nullptr;
    if constexpr (kFusable) {
      if (fused != nullptr && nk > 0) {
        // Gate g's rows of the slice: columns [g * nk, (g + 1) * nk) of the projection.
        std::vector<PackedPanels<float>::Columns> runs_ih;
        for (int64_t g = 0; g < G; ++g) {
          runs_ih.push_back({g * nk, nk, fused->w_ih + (g * H + u0) * fused->I, 1, fused->I,
                             fused->b_ih != nullptr ? fused->b_ih + g * H + u0 : nullptr});
        }
        if (fused_projection(G * nk * P * 4, G * nk * fused->I * 4, P, fused->I) ==
            FusedProjection::kBlocks) {
          for (PackedPanels<float>::Columns r : runs_ih) {
            r.n0 = 0;  // each gate its own product, into its own columns of the ring
            xp_gates.emplace_back(fused->I, nk, std::vector{r});
          }
          ring = at::empty({kProjectionSteps, GH}, hs.options());
        } else {
          std::vector<int64_t> dest;
          for (int64_t g = 0; g < G; ++g) {
            for (int64_t j = 0; j < nk; ++j) dest.push_back(g * H + u0 + j);
          }
          xp.emplace(fused->I, G * nk, runs_ih, std::move(dest));
          ring = at::empty({2 * kSteps, GH}, hs.options());
        }
        ring_p = ring.data_ptr<float>();
      }
    }
    // Begins the projection of block blk (steps [blk * kSteps, ...)) into its ring slot.
    auto begin_block = [&](int64_t blk) {
      const int count = static_cast<int>(std::min<int64_t>(kSteps, pb.steps - blk * kSteps));
      xp->begin_block(fused->x + pb.time(blk * kSteps) * fused->I,
                      pb.reverse ? -fused->I : fused->I, count,
                      ring_p + (blk & 1) * kSteps * GH, GH);
    };
    if (xp) {
      begin_block(0);
      xp->run(xp->units_left());
    }
#endif
    for (int64_t s = 0; s < pb.steps; ++s) {
      const int64_t t = pb.time(s);
      const S* gx_t = gx_p + t * B * GH;
#ifdef RNNKERNELS_FUSED_INPUT
      // The projection's units this step: its share of the next block's (none in the last).
      int64_t due = 0;
      if constexpr (kFusable) {
        if (!xp_gates.empty()) {  // blocks: the projection of steps [s, s + kProjectionSteps)
          const int64_t r = s % kProjectionSteps;
          if (r == 0) {
            KRanges all;
            all.add(0, fused->I);
            for (int64_t g = 0; g < G; ++g) {
              xp_gates[g].multiply(std::min(kProjectionSteps, pb.steps - s),
                                   fused->x + t * fused->I, pb.reverse ? -fused->I : fused->I,
                                   ring_p + g * H + u0, GH, all, false);
            }
          }
          gx_t = ring_p + r * GH;
        }
        if (xp) {
          const int64_t blk = s / kSteps, r = s % kSteps;
          if (r == 0 && (blk + 1) * kSteps < pb.steps) begin_block(blk + 1);
          if ((blk + 1) * kSteps < pb.steps) {
            due = xp->units_left() - xp->units_per_block() * (kSteps - 1 - r) / kSteps;
          }
          gx_t = ring_p + (blk & 1) * kSteps * GH + r * GH;
        }
      }
#endif
      const FwdStep<S, T> st{gx_t, hs_p + pb.slot_in(s) * B * P,
                             hs_p + pb.slot_out(s) * B * P,
                             c_p != nullptr ? c_p + (s & 1) * B * H : nullptr,
                             c_p != nullptr ? c_p + ((s + 1) & 1) * B * H : nullptr,
                             hs_p + pb.slot_out(s) * B * P,
                             ws_p != nullptr ? ws_p + t * B * KH : nullptr, y_p + t * B * P,
                             nullptr};
      const T* h_own = own_copy ? own_p + pb.slot_in(s) * B * P : st.hin;  // own units
      if (nk > 0) {
        // With rows past their length (a row group of one thread), the product runs on the
        // states of the rows within their length only, gathered into one block (ActiveRows).
        const bool compact = active.gather(t, st.hin);
        if (compact) {
          if (active.count() > 0) multiply(active.count(), active.data(), own, false);
        } else {
          // State units [u0, u1) are this thread's own (written by it in the step before):
          // their part of the product first, then the others' once they have arrived.
          // (Software prefetch of the state or of the next step's gx rows measured slower.)
          bool done = false;
#ifdef RNNKERNELS_FUSED_INPUT
          if constexpr (kFusable) {
            if (xp) {  // the own part takes its share of the step's units, the others' the rest
              due -= xp->multiply_row(*w_own, h_own, gh_p, own, false, due * nk / P);
              flags.wait_others(k, s - 1, j0, j1);
              if (others.count > 0) {
                due -= xp->multiply_row(*w_own, st.hin, gh_p, others, true, due);
              }
              xp->run(due);
              done = true;
            }
          }
#endif
          if (!done) {
            product(h_own, own, false);
            flags.wait_others(k, s - 1, j0, j1);
            if (others.count > 0) product(st.hin, others, true);
          }
        }
        for (int64_t b = b0, r = b0; b < b1; ++b) {
          if (pb.masked(t, b)) {
            forward_masked_units(pb, st, b, u0, u1);
          } else {
            forward_units(pb, st, b, u0, u1, gh_p + (compact ? r++ : b) * ldg, nk);
          }
        }
      } else {
        flags.wait_others(k, s - 1, j0, j1);
      }
      flags.arrive(k, s);
      if (own_copy) keep_own(st.hout, pb.slot_out(s));
    }
  });
}

// Also returns db_hh, the sum of dgh over steps and rows, which each thread adds up for its
// units and rows as it writes them (a sum over the whole (T, B, G*H) dgh after the loop, a pass
// over memory, took about 3% of an LSTM training step at B = 32, T = 128, H = 256).
template <typename S, typename T>
Tensor backward_persistent(const Problem<S, T>& pb, const Tensor& grad_y, const Tensor& c0,
                           const Tensor& w, const Tensor& hs, const Tensor& ws, Tensor& dh,
                           Tensor& dc, Tensor& dgx, Tensor& dgh) {
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, GH = pb.gates * H;
  // Row k: thread k's sums over its rows for its units (zero elsewhere), added up at the end
  Tensor db_parts = at::zeros({at::get_num_threads(), GH}, dh.options());
  T* db_parts_p = db_parts.data_ptr<T>();
  const S* gy_p = grad_y.defined() ? grad_y.data_ptr<S>() : nullptr;
  const bool dgx_is_dgh = static_cast<void*>(dgx.data_ptr()) == static_cast<void*>(dgh.data_ptr());
  Tensor dhd = at::empty({B, P}, dh.options());
  T* dh_p = dh.data_ptr<T>();
  T* dhd_p = dhd.data_ptr<T>();
  const T* w_p = w.data_ptr<T>();
  S* dgx_p = dgx_is_dgh ? nullptr : dgx.data_ptr<S>();
  const BwdBuffers<S, T> buf(pb, dc, c0, ws, hs, dgh);
  run_team(B * GH * P, [&](int64_t k, int64_t n, StepFlags& flags) {
    const auto [b0, b1, u0, u1, j0, j1] = share_of(pb, k, n);
    const int64_t nk = u1 - u0;
    Tensor part = at::empty({B, std::max<int64_t>(nk, 1)}, dh.options());
    T* part_p = part.data_ptr<T>();
    typename PackedPanels<T>::Ranges own, others;  // rows of dgh: this thread's units', the rest
    for (int64_t g = 0; g < pb.gates; ++g) {
      own.add(g * H + u0, g * H + u1);
      others.add(g * H, g * H + u0);
      others.add(g * H + u1, (g + 1) * H);
    }
    // The thread's columns of W_hh, packed once: dgh_t @ W_hh[:, own units] is one panel GEMM.
    const PackedPanels<T> w_own(GH, nk, {{0, nk, w_p + u0, P, 1, nullptr}},
                                std::vector{own, others});
    T* db_p = db_parts_p + k * GH;
    ActiveRows<T> active(pb, b0, b1, j1 - j0, GH);
    for (int64_t i = 0; i < pb.steps; ++i) {
      const int64_t s = pb.steps - 1 - i;
      const int64_t t = pb.time(s);
      const BwdStep<S, T> st = make_bwd_step(pb, buf, s, gy_p, dh_p, dgx_p, dhd_p);
      for (int64_t b = b0; b < b1; ++b) {
        if (pb.masked(t, b)) {
          backward_masked_units(pb, st, b, u0, u1);
        } else {
          backward_units(pb, st, b, u0, u1);
        }
        for (int64_t g = 0; g < pb.gates; ++g) {
          T* acc = db_p + g * H + u0;
          at::vec::map2([](Vectorized<T> a, Vectorized<T> d) { return a + d; }, acc, acc,
                        st.dgh + b * GH + g * H + u0, nk);
        }
        if (!dgx_is_dgh && pb.cell != Cell::GRU) {
          for (int64_t g = 0; g < pb.gates; ++g) {
            store_scalar_row(st.dgx + b * GH + g * H + u0, st.dgh + b * GH + g * H + u0, nk);
          }
        }
      }
      flags.arrive(k, i);
      if (nk == 0) continue;
      // dh_{t-1}[:, own units] = direct part + dgh_t @ W_hh[:, own units], over the own rows of
      // dgh_t first, then the others' once they have arrived. With rows past their length (a
      // row group of one thread: no others' part), over the dgh rows within their length only,
      // gathered into one block (ActiveRows); the rows past it have dgh = 0, so dh_{t-1} = their
      // direct part.
      const bool compact = active.gather(t, st.dgh);
      if (compact) {
        if (active.count() > 0) {
          w_own.multiply(active.count(), active.data(), GH, part_p + b0 * nk, nk, own, false);
        }
      } else {
        w_own.multiply(b1 - b0, st.dgh + b0 * GH, GH, part_p + b0 * nk, nk, own, false);
        flags.wait_others(k, i, j0, j1);
        if (others.count > 0) {
          w_own.multiply(b1 - b0, st.dgh + b0 * GH, GH, part_p + b0 * nk, nk, others, true);
        }
      }
      for (int64_t b = b0, r = b0; b < b1; ++b) {
        const T* add = !compact ? part_p + b * nk
                                : (pb.masked(t, b) ? nullptr : part_p + r++ * nk);
        for (int64_t u = 0; u < nk; ++u) {
          dh_p[b * P + u0 + u] = dhd_p[b * P + u0 + u] + (add != nullptr ? add[u] : T(0));
        }
      }
    }
  });
  return db_parts.sum(0);
}

template <typename S, typename T>
bool use_persistent(const Problem<S, T>& pb) {
#if AT_PARALLEL_OPENMP && defined(_OPENMP)
  if (pb.projected || pb.cell == Cell::GRU_RESET_BEFORE || pb.has_options()) return false;
  // Keeping W_hh slices in each core's L2 pays only across steps; one step is one GEMM.
  if (pb.steps == 1) return false;
  const char* forced = std::getenv("RNNKERNELS_CPU_RECURRENCE");  // tests exercise both paths
  if (forced != nullptr && std::string(forced) == "batched") return false;
  return true;
#else
  return false;  // the persistent team needs OpenMP's guarantee that its threads run together
#endif
}

// ============================================================== op entry points

Tensor acc(const Tensor& t, at::ScalarType acc_type) {
  return t.defined() ? t.to(acc_type).contiguous() : t;
}

// Gradient of the (3, H) peephole weights: sums over steps and rows of di * c_{t-1},
// df * c_{t-1} and do * c_t, from the gate gradients dgh (T, B, 4H) and the cell states in ws
// (slot 4 holds the state c_t, and for a masked step the carried c, which is the next step's
// c_{t-1}; with zoneout the state is the zoned-out c and the cell's own c_t is recomputed).
Tensor peephole_grad(const Tensor& dgh, const Tensor& ws, const Tensor& c0, int64_t H,
                     bool reverse, bool zoneout) {
  const int64_t T = ws.size(0);
  const Tensor state = ws.narrow(2, 4 * H, H);
  const Tensor first = c0.unsqueeze(0);
  const Tensor cprev = reverse ? at::cat({state.narrow(0, 1, T - 1), first})
                               : at::cat({first, state.narrow(0, 0, T - 1)});
  const Tensor c =
      zoneout ? ws.narrow(2, H, H) * cprev + ws.narrow(2, 0, H) * ws.narrow(2, 2 * H, H) : state;
  const auto sum = [](const Tensor& t) { return t.sum(at::IntArrayRef{0, 1}); };
  return at::stack({sum(dgh.narrow(2, 0, H) * cprev), sum(dgh.narrow(2, H, H) * cprev),
                    sum(dgh.narrow(2, 3 * H, H) * c)});
}

// Sets the cell options of pb from the op arguments; the tensors in keep must outlive pb.
template <typename S, typename T>
void set_options(Problem<S, T>& pb, std::vector<Tensor>& keep, at::ScalarType acc_type,
                 const std::optional<Tensor>& w_peep, const std::optional<Tensor>& zoneout_mask,
                 const std::optional<Tensor>& zoneout_mask_c, double zoneout,
                 const Tensor& rdrop, const std::optional<Tensor>& ln_weight_hh,
                 const std::optional<Tensor>& ln_weight_c,
                 const std::optional<Tensor>& ln_bias_c, const Tensor& bias) {
  auto ptr = [&](const std::optional<Tensor>& t) -> const T* {
    if (!given(t)) return nullptr;
    keep.push_back(acc(*t, acc_type));
    return keep.back().data_ptr<T>();
  };
  pb.peep = ptr(w_peep);
  pb.zmask_h = ptr(zoneout_mask);
  pb.zmask_c = ptr(zoneout_mask_c);
  pb.zoneout_p = static_cast<T>(zoneout);
  pb.dropout = rdrop.defined();
  pb.ln_hh = ptr(ln_weight_hh);
  pb.ln_c = ptr(ln_weight_c);
  pb.ln_bias_c = ptr(ln_bias_c);
  pb.ln_bias_hh = bias.defined() ? bias.data_ptr<T>() : nullptr;
  pb.ln_at = workspace_units(pb.cell, pb.projected) * pb.hidden;
  TORCH_CHECK(!pb.layer_norm() || pb.cell == Cell::LSTM || pb.cell == Cell::GRU,
              "rnnkernels: layer normalisation is implemented for the LSTM and the GRU (reset "
              "after) only");
  TORCH_CHECK(pb.cell != Cell::LSTM || pb.layer_norm() == (pb.ln_c && pb.ln_bias_c),
              "rnnkernels: the layer-normalised LSTM takes ln_weight_hh, ln_weight_c and "
              "ln_bias_c together");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_fwd_cpu(
    const Tensor& gx_in, const Tensor& h0, const std::optional<Tensor>& c0_opt, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh_opt, const std::optional<Tensor>& w_hr_opt,
    const std::optional<Tensor>& lengths_opt, int64_t cell_id, bool reverse, bool save,
    const std::optional<Tensor>& w_peep, const std::optional<Tensor>& zoneout_mask,
    const std::optional<Tensor>& zoneout_mask_c, double zoneout,
    const std::optional<Tensor>& recurrent_dropout_mask,
    const std::optional<Tensor>& ln_weight_hh, const std::optional<Tensor>& ln_weight_c,
    const std::optional<Tensor>& ln_bias_c) {
  checks::check_recurrence_fwd(gx_in, h0, c0_opt, w_hh, b_hh_opt, w_hr_opt, lengths_opt, cell_id,
                               {w_peep, zoneout_mask, zoneout_mask_c, recurrent_dropout_mask,
                                ln_weight_hh, ln_weight_c, ln_bias_c});
  const Cell cell = static_cast<Cell>(cell_id);
  const Tensor gx = gx_in.contiguous();
  const int64_t T_ = gx.size(0), B = gx.size(1), P = h0.size(1);
  const int64_t G = num_gates(cell), H = gx.size(2) / G;
  const bool projected = w_hr_opt.has_value() && w_hr_opt->defined();
  const auto acc_type = gx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = gx.options().dtype(acc_type);

  Tensor lengths = lengths_opt.has_value() ? lengths_opt->contiguous() : Tensor();
  Tensor y = cached_empty({T_, B, P}, gx.options());
  Tensor hs = cached_empty({save ? T_ + 1 : 2, B, P}, acc_opts);
  const int64_t K = workspace_units(cell, projected, given(ln_weight_hh));
  Tensor ws = save ? cached_empty({T_, B, K * H}, acc_opts) : at::empty({0}, acc_opts);
  Tensor c_n = cell == Cell::LSTM ? at::empty({B, H}, gx.options()) : at::empty({0}, gx.options());
  const Tensor rdrop = given(recurrent_dropout_mask) ? acc(*recurrent_dropout_mask, acc_type)
                                                     : Tensor();
  int64_t last_slot = 0;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gx.scalar_type(), "recurrence_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    Problem<S, T> pb{cell, T_, B, H, P, G, K, reverse, save, projected,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    const Tensor w = acc(w_hh, acc_type);
    const Tensor bias = b_hh_opt ? acc(*b_hh_opt, acc_type) : Tensor();
    std::vector<Tensor> keep;
    set_options(pb, keep, acc_type, w_peep, zoneout_mask, zoneout_mask_c, zoneout, rdrop,
                ln_weight_hh, ln_weight_c, ln_bias_c, bias);
    hs.select(0, pb.slot_in(0)).copy_(h0);
    Tensor cbuf;
    if (cell == Cell::LSTM) {
      cbuf = at::empty({2, B, H}, acc_opts);
      cbuf.select(0, 0).copy_(*c0_opt);
    }
    if (use_persistent(pb)) {
      forward_persistent<S, T>(pb, gx, w, bias, y, hs, ws, cbuf);
    } else {
      forward_batched<S, T>(pb, gx, w, bias, projected ? acc(*w_hr_opt, acc_type) : Tensor(),
                            rdrop, y, hs, ws, cbuf);
    }
    if (cell == Cell::LSTM) c_n.copy_(cbuf.select(0, T_ & 1));
    last_slot = pb.slot_out(T_ - 1);
  });

  Tensor h_n = hs.select(0, last_slot).to(gx.scalar_type(), false, true);
  if (!save) hs = at::empty({0}, acc_opts);
  return {y, h_n, c_n, hs, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
recurrence_bwd_cpu(
    const std::optional<Tensor>& grad_y_opt, const std::optional<Tensor>& grad_hn_opt,
    const std::optional<Tensor>& grad_cn_opt, const std::optional<Tensor>& c0_opt,
    const Tensor& w_hh, const std::optional<Tensor>& w_hr_opt,
    const std::optional<Tensor>& lengths_opt, const Tensor& hs_in, const Tensor& ws_in,
    int64_t cell_id, bool reverse, const std::optional<Tensor>& w_peep,
    const std::optional<Tensor>& zoneout_mask, const std::optional<Tensor>& zoneout_mask_c,
    double zoneout, const std::optional<Tensor>& recurrent_dropout_mask,
    const std::optional<Tensor>& ln_weight_hh, const std::optional<Tensor>& ln_weight_c,
    const std::optional<Tensor>& ln_bias_c) {
  checks::check_recurrence_bwd(grad_y_opt, grad_hn_opt, grad_cn_opt, c0_opt, w_hh, w_hr_opt,
                               lengths_opt, hs_in, ws_in, cell_id,
                               {w_peep, zoneout_mask, zoneout_mask_c, recurrent_dropout_mask,
                                ln_weight_hh, ln_weight_c, ln_bias_c});
  const Cell cell = static_cast<Cell>(cell_id);
  const Tensor hs = hs_in.contiguous(), ws = ws_in.contiguous();
  const int64_t T_ = ws.size(0), B = ws.size(1), P = hs.size(2);
  const int64_t G = num_gates(cell), GH = w_hh.size(0), H = GH / G;
  const bool projected = w_hr_opt.has_value() && w_hr_opt->defined();
  const auto acc_type = hs.scalar_type();
  const auto st = w_hh.scalar_type();
  const auto acc_opts = hs.options();

  Tensor lengths = given(lengths_opt) ? lengths_opt->contiguous() : Tensor();
  Tensor grad_y = given(grad_y_opt) ? grad_y_opt->contiguous() : Tensor();
  Tensor dh = given(grad_hn_opt) ? grad_hn_opt->to(acc_type).clone(at::MemoryFormat::Contiguous)
                                 : at::zeros({B, P}, acc_opts);
  Tensor dc;
  if (cell == Cell::LSTM) {
    dc = given(grad_cn_opt) ? grad_cn_opt->to(acc_type).clone(at::MemoryFormat::Contiguous)
                            : at::zeros({B, H}, acc_opts);
  }
  Tensor dgx = cached_empty({T_, B, GH}, ws.options().dtype(st));
  Tensor dgh = (st == acc_type && cell != Cell::GRU) ? dgx : cached_empty({T_, B, GH}, acc_opts);
  Tensor dhp = projected ? cached_empty({T_, B, P}, acc_opts) : Tensor();
  const Tensor w = acc(w_hh, acc_type);
  const Tensor rdrop = given(recurrent_dropout_mask) ? acc(*recurrent_dropout_mask, acc_type)
                                                     : Tensor();
  const bool ln = given(ln_weight_hh);
  Tensor dgraw = ln ? cached_empty({T_, B, GH}, acc_opts) : Tensor();
  Tensor xhat = ln ? cached_empty({T_, B, GH}, acc_opts) : Tensor();
  Tensor dln = ln && cell == Cell::LSTM ? cached_empty({T_, B, 2 * H}, acc_opts).zero_() : Tensor();
  Tensor db_summed;  // db_hh when summed before the weight gradients (persistent path, or LN)

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "recurrence_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const int64_t K = workspace_units(cell, projected, ln);
    Problem<S, T> pb{cell, T_, B, H, P, G, K, reverse, true, projected,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    const Tensor c0 = cell == Cell::LSTM ? acc(*c0_opt, acc_type) : Tensor();
    std::vector<Tensor> keep;
    set_options(pb, keep, acc_type, w_peep, zoneout_mask, zoneout_mask_c, zoneout, rdrop,
                ln_weight_hh, ln_weight_c, ln_bias_c, Tensor());
    if (use_persistent(pb)) {
      db_summed = backward_persistent<S, T>(pb, grad_y, c0, w, hs, ws, dh, dc, dgx, dgh);
    } else {
      backward_batched<S, T>(pb, grad_y, c0, w, projected ? acc(*w_hr_opt, acc_type) : Tensor(),
                             rdrop, hs, ws, dh, dc, dgx, dgh, dhp, dgraw, xhat, dln);
    }
  });

  // W_hh multiplied the dropped-out states; with layer normalisation it produced the raw
  // pre-activations, and b_hh was added to the normalised ones (db_hh sums dgh, not dgraw)
  if (ln) db_summed = dgh.sum(at::IntArrayRef{0, 1});
  auto [dw, db, dw_hr] = recurrence_weight_grads(cell, rdrop.defined() ? hs * rdrop : hs, ws,
                                                 ln ? dgraw : dgh, projected ? dhp : Tensor(), H,
                                                 reverse, st, db_summed);
  const auto sum_tb = [&](const Tensor& t) { return t.sum(at::IntArrayRef{0, 1}).to(st); };
  // absent options' gradients: distinct empty tensors (outputs of an op must not alias)
  const auto none = [&] { return at::empty({0}, w_hh.options()); };
  Tensor dln_hh = none(), dln_c = none(), dln_bias_c = none();
  if (ln) {
    dln_hh = sum_tb(dgh * xhat);
    if (cell == Cell::LSTM) {
      dln_c = sum_tb(dln.narrow(2, 0, H));
      dln_bias_c = sum_tb(dln.narrow(2, H, H));
    }
  }
  Tensor dc0 = cell == Cell::LSTM ? dc.to(st) : at::empty({0}, w_hh.options());
  const bool zoned = given(zoneout_mask) || given(zoneout_mask_c) || zoneout != 0;
  Tensor dpeep = given(w_peep)
                     ? peephole_grad(dgh, ws, acc(*c0_opt, acc_type), H, reverse, zoned).to(st)
                     : at::empty({0}, w_hh.options());
  return {dgx, dh.to(st), dc0, dw, db, dw_hr, dpeep, dln_hh, dln_c, dln_bias_c};
}

// The operands of the ops that run a layer call without gradients from its input (cell_step,
// recurrence_infer), checked and made contiguous: x with x_dims dimensions, (..., B, I), none
// empty, B at most max_rows (0: no bound); h0 (B, H); c0 (B, H) for the LSTM; w_ih (G*H, I);
// w_hh (G*H, H); b_ih, b_hh (G*H,) or undefined; one dtype among float32, float64 and
// bfloat16; any cell but the reset-before GRU. x_shape names x's shape in the messages.
struct InferenceOperands {
  Cell cell;
  at::ScalarType st;
  int64_t B, I, G, H;
  Tensor x, h0, c0, w_ih, w_hh, b_ih, b_hh;
};

InferenceOperands inference_operands(const char* op, int64_t x_dims, int64_t max_rows,
                                     const std::string& x_shape, const Tensor& x,
                                     const Tensor& h0, const std::optional<Tensor>& c0,
                                     const Tensor& w_ih, const Tensor& w_hh,
                                     const std::optional<Tensor>& b_ih,
                                     const std::optional<Tensor>& b_hh, int64_t cell_id) {
  const Cell cell = static_cast<Cell>(cell_id);
  TORCH_CHECK(cell_id >= 0 && cell_id <= 4 && cell != Cell::GRU_RESET_BEFORE, "rnnkernels: ", op,
              " takes the LSTM, the GRU (reset after) and the RNN, got cell ", cell_id);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, "rnnkernels: ", op,
              " takes float32, float64 or bfloat16, got ", st);
  TORCH_CHECK(x.dim() == x_dims && w_ih.dim() == 2 && w_hh.dim() == 2 && h0.dim() == 2,
              "rnnkernels: ", op, ": x ", x_shape, ", h0 (B, H), w_ih and w_hh matrices");
  const int64_t B = x.size(-2), I = x.size(-1), G = num_gates(cell);
  const int64_t GH = w_ih.size(0), H = GH / G;
  bool nonempty = true;
  for (int64_t d = 0; d + 1 < x_dims; ++d) nonempty = nonempty && x.size(d) >= 1;
  auto bias_ok = [&](const std::optional<Tensor>& b) { return !given(b) || b->numel() == GH; };
  TORCH_CHECK(nonempty && (max_rows == 0 || B <= max_rows) && GH == G * H &&
                  w_ih.sizes() == at::IntArrayRef({GH, I}) &&
                  w_hh.sizes() == at::IntArrayRef({GH, H}) &&
                  h0.sizes() == at::IntArrayRef({B, H}) && bias_ok(b_ih) && bias_ok(b_hh) &&
                  (cell != Cell::LSTM || (given(c0) && c0->sizes() == h0.sizes())),
              "rnnkernels: ", op, ": x ", x_shape, ", h0 (B, H), c0 (B, H) for the LSTM, w_ih "
              "(G*H, I), w_hh (G*H, H), b_ih and b_hh (G*H,)");
  auto same = [&](const Tensor& t) {
    TORCH_CHECK(t.scalar_type() == st, "rnnkernels: ", op, ": every tensor must have dtype ", st);
    return t.contiguous();
  };
  return {cell, st, B, I, G, H, same(x), same(h0),
          cell == Cell::LSTM ? same(*c0) : Tensor(), same(w_ih), same(w_hh),
          given(b_ih) ? same(*b_ih) : Tensor(), given(b_hh) ? same(*b_hh) : Tensor()};
}

// One step (T = 1) of a small batch without gradients: a decoding loop's call, fused into one
// parallel region. Thread k of n owns the hidden units [u0, u1) (unit_range) and forms, for its
// units' rows of every gate, x W_ih^T + b_ih and h W_hh^T + b_hh (small_product_range), then the
// cell's pointwise step on its units (forward_units). The split is the same on every call, so a
// thread finds its rows of both matrices in its core's L2 from one token to the next (the fp32
// GRU at hidden 256: 384 KB of each per thread of two), and no thread waits for another; the
// separate projection (MKL's one-thread matrix-vector product, which streams all of W_ih
// through one core) and recurrence op took two dispatches and two passes from L3. bfloat16
// inputs: the products read x and the weights as stored (widened in registers) and accumulate
// in float; the state, the pre-activations and the cell's math are float (as in the
// recurrence), the outputs rounded to bfloat16 at the end.
std::tuple<Tensor, Tensor, Tensor> cell_step_cpu(const Tensor& x_in, const Tensor& h0_in,
                                                 const std::optional<Tensor>& c0_opt,
                                                 const Tensor& w_ih_in, const Tensor& w_hh_in,
                                                 const std::optional<Tensor>& b_ih_opt,
                                                 const std::optional<Tensor>& b_hh_opt,
                                                 int64_t cell_id) {
  const InferenceOperands in =
      inference_operands("cell_step", 3, kSmallRows,
                         "(1, B <= " + std::to_string(kSmallRows) + ", I)", x_in, h0_in, c0_opt,
                         w_ih_in, w_hh_in, b_ih_opt, b_hh_opt, cell_id);
  TORCH_CHECK(x_in.size(0) == 1, "rnnkernels: cell_step runs one step: x (1, B, I), got ",
              x_in.sizes());
  const Cell cell = in.cell;
  const auto st = in.st;
  const int64_t B = in.B, I = in.I, G = in.G, H = in.H, GH = G * H;
  const Tensor &x = in.x, &h0 = in.h0, &c0 = in.c0, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const Tensor &b_ih = in.b_ih, &b_hh = in.b_hh;
  // Pre-activations, state and outputs in the accumulation type (the same tensors as the
  // inputs / outputs for float and double: no copies there).
  const auto acc_type = st == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = x.options().dtype(acc_type);
  const Tensor h_in = h0.to(acc_type), c_in = c0.defined() ? c0.to(acc_type) : Tensor();
  Tensor gx = at::empty({B, GH}, acc_opts), gh = at::empty({B, GH}, acc_opts);
  Tensor y = at::empty({1, B, H}, acc_opts), h_n = at::empty({B, H}, acc_opts);
  Tensor c_n = cell == Cell::LSTM ? at::empty({B, H}, acc_opts) : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "cell_step_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const Problem<T, T> pb{cell, 1, B, H, H, G, workspace_units(cell, false), false, false, false,
                           nullptr};
    const FwdStep<T, T> step{gx.data_ptr<T>(), h_in.data_ptr<T>(), h_n.data_ptr<T>(),
                             c_in.defined() ? c_in.data_ptr<T>() : nullptr,
                             c_in.defined() ? c_n.data_ptr<T>() : nullptr, h_n.data_ptr<T>(),
                             nullptr, y.data_ptr<T>(), nullptr};
    const S* bi = b_ih.defined() ? b_ih.data_ptr<S>() : nullptr;
    const S* bh = b_hh.defined() ? b_hh.data_ptr<S>() : nullptr;
    T* gh_p = gh.data_ptr<T>();
    const int64_t threads = std::clamp<int64_t>(B * GH * (I + H) / kMinProductWorkPerThread, 1,
                                                at::get_num_threads());
    at::parallel_for(0, threads, 1, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        const auto [u0, u1] = unit_range<T>(H, k, threads);
        for (int64_t g = 0; g < G && u1 > u0; ++g) {
          small_product_range<T>(B, g * H + u0, g * H + u1, GH, I, x.data_ptr<S>(),
                                 w_ih.data_ptr<S>(), I, bi, gx.data_ptr<T>());
          small_product_range<T>(B, g * H + u0, g * H + u1, GH, H, h_in.data_ptr<T>(),
                                 w_hh.data_ptr<S>(), H, bh, gh_p);
        }
        for (int64_t b = 0; b < B && u1 > u0; ++b) {
          forward_units(pb, step, b, u0, u1, gh_p + b * GH + u0, H);
        }
      }
    });
  });
  return {y.to(st), h_n.to(st), c_n.to(st)};
}

// A layer's forward without gradients from its input x (T, B, I): y (T, B, H), h_n and c_n as
// recurrence_fwd's. At batch 1 in float32 with at least RowProjection::kMinSteps steps
// (inference on a sequence), the persistent path computes the input projection itself,
// inside its team (FusedInput): a separate projection GEMM over all steps cost a third of the
// forward (the fp32 LSTM at hidden 256, T = 256, 2 threads) and keeps half of the multiply-add
// units idle while the recurrent products stream W_hh from L2. Elsewhere: the projection as one
// GEMM, then recurrence_fwd.
std::tuple<Tensor, Tensor, Tensor> recurrence_infer_cpu(const Tensor& x_in, const Tensor& h0_in,
                                                        const std::optional<Tensor>& c0_opt,
                                                        const Tensor& w_ih_in,
                                                        const Tensor& w_hh_in,
                                                        const std::optional<Tensor>& b_ih_opt,
                                                        const std::optional<Tensor>& b_hh_opt,
                                                        int64_t cell_id, bool reverse) {
  const InferenceOperands in =
      inference_operands("recurrence_infer", 3, 0, "(T >= 1, B >= 1, I)", x_in, h0_in, c0_opt,
                         w_ih_in, w_hh_in, b_ih_opt, b_hh_opt, cell_id);
  const Cell cell = in.cell;
  const Tensor &x = in.x, &h0 = in.h0, &c0 = in.c0, &w_ih = in.w_ih, &w_hh = in.w_hh;
  const Tensor &b_ih = in.b_ih, &b_hh = in.b_hh;
#ifdef RNNKERNELS_FUSED_INPUT
  const auto st = in.st;
  const int64_t T_ = x.size(0), B = in.B, I = in.I, G = in.G, H = in.H;
  const Problem<float, float> pb{cell, T_, B, H, H, G, workspace_units(cell, false), reverse,
                                 false, false, nullptr};
  // From kMinSteps steps (a vector's width) on: a sequence of one partial block has its whole
  // projection run before the first step, which measured slower than the GEMM up to about 8
  // steps.
  if (st == at::kFloat && B == 1 && T_ >= RowProjection::kMinSteps && use_persistent(pb)) {
    Tensor y = at::empty({T_, 1, H}, x.options());
    Tensor hs = at::empty({2, 1, H}, x.options());
    hs.select(0, pb.slot_in(0)).copy_(h0);
    Tensor cbuf, ws = at::empty({0}, x.options());
    if (cell == Cell::LSTM) {
      cbuf = at::empty({2, 1, H}, x.options());
      cbuf.select(0, 0).copy_(c0);
    }
    const FusedInput fused{x.data_ptr<float>(), w_ih.data_ptr<float>(),
                           b_ih.defined() ? b_ih.data_ptr<float>() : nullptr, I};
    forward_persistent<float, float>(pb, Tensor(), w_hh, b_hh, y, hs, ws, cbuf, &fused);
    Tensor c_n = cell == Cell::LSTM ? cbuf.select(0, T_ & 1).clone() : at::empty({0}, x.options());
    return {y, hs.select(0, pb.slot_out(T_ - 1)).clone(), c_n};
  }
#endif
  const Tensor gx = at::linear(x, w_ih, b_ih);
  auto [y, h_n, c_n, hs, ws] = recurrence_fwd_cpu(
      gx, h0, cell == Cell::LSTM ? std::optional<Tensor>(c0) : std::nullopt, w_hh,
      b_hh.defined() ? std::optional<Tensor>(b_hh) : std::nullopt, std::nullopt, std::nullopt,
      cell_id, reverse, false, std::nullopt, std::nullopt, std::nullopt, 0.0, std::nullopt,
      std::nullopt, std::nullopt, std::nullopt);
  return {y, h_n, c_n};
}

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("recurrence_fwd", &recurrence_fwd_cpu);
  m.impl("recurrence_infer", &recurrence_infer_cpu);
  m.impl("cell_step", &cell_step_cpu);
  m.impl("recurrence_bwd", &recurrence_bwd_cpu);
}

}  // namespace rnnkernels::cpu
