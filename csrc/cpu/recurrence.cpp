// CPU kernels of the generic gated recurrence (LSTM, GRU in both variants, tanh/ReLU RNN).
//
// Decomposition. The step's matmul (B x P) x (P x G*H) is one ATen GEMM (MKL / oneDNN, all
// threads); the cell's pointwise math is fused into one pass over the batch rows, split across
// threads (at::parallel_for), vectorised over the hidden units with at::vec. The weight gradients
// are single GEMMs over all steps after the backward loop. Small batches in inference take the
// persistent path of recurrence_persistent.cpp instead.
//
// Memory. hs (T+1, B, P) holds the recurrent state before every step in the accumulation type;
// slot t is the state before time t for the forward direction and slot t+1 for the reverse one,
// so the states that multiply the gradients of times 0..T-1 are one contiguous slice for the
// weight-gradient GEMM. ws (T, B, K*H) holds the per-step values of the cell (cells.h). Without
// save (no gradient needed) only two state slots are kept.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "rnnkernels/cells.h"

namespace rnnkernels::cpu {

using at::Tensor;
using at::vec::Vectorized;

namespace {

// Work per task below which a step's pointwise pass stays on one thread.
constexpr int64_t kMinUnitsPerTask = 16384;

template <typename T>
struct VecMath {
  using V = Vectorized<T>;
  static V one() { return V(T(1)); }
  static V zero() { return V(T(0)); }
  static V sigmoid(V x) { return V(T(1)) / (V(T(1)) + x.neg().exp()); }
  static V tanh_(V x) { return x.tanh(); }
  static V relu(V x) { return at::vec::maximum(x, V(T(0))); }
  static V relu_grad(V y) { return V::blendv(V(T(0)), V(T(1)), y > V(T(0))); }
};

template <typename T, typename S>
inline Vectorized<T> load(const S* p, int64_t n) {
  using V = Vectorized<T>;
  if constexpr (std::is_same_v<T, S>) {
    return n == V::size() ? V::loadu(p) : V::loadu(p, n);
  } else {
    T tmp[V::size()];
    for (int64_t k = 0; k < n; ++k) tmp[k] = static_cast<T>(p[k]);
    return V::loadu(tmp, n);
  }
}

template <typename T, typename S>
inline void store(S* p, Vectorized<T> v, int64_t n) {
  using V = Vectorized<T>;
  if constexpr (std::is_same_v<T, S>) {
    if (n == V::size()) {
      v.store(p);
    } else {
      v.store(p, n);
    }
  } else {
    T tmp[V::size()];
    v.store(tmp);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<S>(tmp[k]);
  }
}

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

  int64_t time(int64_t s) const { return reverse ? steps - 1 - s : s; }
  bool masked(int64_t t, int64_t b) const { return lengths != nullptr && t >= lengths[b]; }
  // State slots (see header comment).
  int64_t slot_in(int64_t s) const { return save ? (reverse ? steps - s : s) : (s & 1); }
  int64_t slot_out(int64_t s) const { return save ? (reverse ? steps - 1 - s : s + 1) : ((s + 1) & 1); }
};

template <typename F>
inline void parallel_rows(int64_t batch, int64_t units_per_row, const F& f) {
  const int64_t grain = std::max<int64_t>(1, kMinUnitsPerTask / std::max<int64_t>(1, units_per_row));
  at::parallel_for(0, batch, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) f(b);
  });
}

// ============================================================== forward

template <typename S, typename T>
void forward_impl(const Problem<S, T>& pb, const Tensor& gx, const Tensor& h0, const Tensor& c0,
                  const Tensor& w, const Tensor& bias, const Tensor& w_hr, Tensor& y, Tensor& hs,
                  Tensor& ws, Tensor& c_n) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, GH = pb.gates * H;
  const int64_t KH = pb.wsu * H;
  const Cell cell = pb.cell;
  const bool relu = cell == Cell::RNN_RELU;

  hs.select(0, pb.slot_in(0)).copy_(h0);
  Tensor cbuf, hfull, vbuf, ghv;
  if (cell == Cell::LSTM) {
    cbuf = at::empty({2, B, H}, hs.options());
    cbuf.select(0, 0).copy_(c0);
  }
  if (pb.projected) hfull = at::empty({B, H}, hs.options());
  const bool split = cell == Cell::GRU_RESET_BEFORE;
  Tensor w1 = split ? w.narrow(0, 0, 2 * H) : w;
  Tensor b1 = bias.defined() ? (split ? bias.narrow(0, 0, 2 * H) : bias) : bias;
  Tensor w2, b2;
  if (split) {
    vbuf = at::empty({B, H}, hs.options());
    ghv = at::empty({B, H}, hs.options());
    w2 = w.narrow(0, 2 * H, H);
    if (bias.defined()) b2 = bias.narrow(0, 2 * H, H);
  }
  Tensor gh = at::empty({B, w1.size(0)}, hs.options());

  const S* gx_p = gx.data_ptr<S>();
  S* y_p = y.data_ptr<S>();
  T* ws_p = pb.save ? ws.data_ptr<T>() : nullptr;

  for (int64_t s = 0; s < pb.steps; ++s) {
    const int64_t t = pb.time(s);
    Tensor hin = hs.select(0, pb.slot_in(s));
    Tensor hout = hs.select(0, pb.slot_out(s));
    if (b1.defined()) {
      at::addmm_out(gh, b1, hin, w1.t());
    } else {
      at::mm_out(gh, hin, w1.t());
    }
    const T* hin_p = hin.data_ptr<T>();
    T* hout_p = hout.data_ptr<T>();
    const T* gh_p = gh.data_ptr<T>();
    const int64_t ghs = gh.size(1);
    T* cin_p = cell == Cell::LSTM ? cbuf.select(0, s & 1).data_ptr<T>() : nullptr;
    T* cout_p = cell == Cell::LSTM ? cbuf.select(0, (s + 1) & 1).data_ptr<T>() : nullptr;
    T* hf_p = pb.projected ? hfull.data_ptr<T>() : hout_p;
    const bool y_in_pointwise = !pb.projected && !split;

    parallel_rows(B, GH, [&](int64_t b) {
      const S* gxr = gx_p + (t * B + b) * GH;
      const T* ghr = gh_p + b * ghs;
      const T* hprev = hin_p + b * P;
      T* wsr = ws_p ? ws_p + (t * B + b) * KH : nullptr;
      S* yr = y_p + (t * B + b) * P;
      if (pb.masked(t, b)) {
        if (!pb.projected) std::copy(hprev, hprev + P, hout_p + b * P);
        if (cell == Cell::LSTM) {
          std::copy(cin_p + b * H, cin_p + (b + 1) * H, cout_p + b * H);
          if (wsr) {
            std::fill(wsr, wsr + KH, T(0));
            std::copy(cin_p + b * H, cin_p + (b + 1) * H, wsr + 4 * H);
          }
        } else if (wsr) {
          std::fill(wsr, wsr + KH, T(0));
        }
        if (split) std::fill(vbuf.data_ptr<T>() + b * H, vbuf.data_ptr<T>() + (b + 1) * H, T(0));
        if (y_in_pointwise) std::fill(yr, yr + P, S(0));
        return;
      }
      for (int64_t j = 0; j < H; j += VS) {
        const int64_t n = std::min(VS, H - j);
        switch (cell) {
          case Cell::LSTM: {
            V i, f, g, o, c, h;
            lstm_forward<V, M>(load<T>(gxr + j, n) + load<T>(ghr + j, n),
                               load<T>(gxr + H + j, n) + load<T>(ghr + H + j, n),
                               load<T>(gxr + 2 * H + j, n) + load<T>(ghr + 2 * H + j, n),
                               load<T>(gxr + 3 * H + j, n) + load<T>(ghr + 3 * H + j, n),
                               load<T>(cin_p + b * H + j, n), i, f, g, o, c, h);
            store<T>(cout_p + b * H + j, c, n);
            store<T>(hf_p + b * H + j, h, n);
            if (wsr) {
              store<T>(wsr + j, i, n);
              store<T>(wsr + H + j, f, n);
              store<T>(wsr + 2 * H + j, g, n);
              store<T>(wsr + 3 * H + j, o, n);
              store<T>(wsr + 4 * H + j, c, n);
              if (pb.projected) store<T>(wsr + 5 * H + j, h, n);
            }
            if (y_in_pointwise) store<T>(yr + j, h, n);
            break;
          }
          case Cell::GRU: {
            V r, z, nn, h;
            const V hn = load<T>(ghr + 2 * H + j, n);
            gru_forward<V, M>(load<T>(gxr + j, n), load<T>(gxr + H + j, n),
                              load<T>(gxr + 2 * H + j, n), load<T>(ghr + j, n),
                              load<T>(ghr + H + j, n), hn, load<T>(hprev + j, n), r, z, nn, h);
            store<T>(hout_p + b * H + j, h, n);
            if (wsr) {
              store<T>(wsr + j, r, n);
              store<T>(wsr + H + j, z, n);
              store<T>(wsr + 2 * H + j, nn, n);
              store<T>(wsr + 3 * H + j, hn, n);
            }
            store<T>(yr + j, h, n);
            break;
          }
          case Cell::GRU_RESET_BEFORE: {
            V r, z, v;
            gru_rb_forward_gates<V, M>(load<T>(gxr + j, n), load<T>(gxr + H + j, n),
                                       load<T>(ghr + j, n), load<T>(ghr + H + j, n),
                                       load<T>(hprev + j, n), r, z, v);
            store<T>(vbuf.data_ptr<T>() + b * H + j, v, n);
            if (wsr) {
              store<T>(wsr + j, r, n);
              store<T>(wsr + H + j, z, n);
              store<T>(wsr + 3 * H + j, v, n);
            }
            break;
          }
          case Cell::RNN_TANH:
          case Cell::RNN_RELU: {
            const V h = rnn_forward<V, M>(load<T>(gxr + j, n) + load<T>(ghr + j, n), relu);
            store<T>(hout_p + b * H + j, h, n);
            if (wsr) store<T>(wsr + j, h, n);
            store<T>(yr + j, h, n);
            break;
          }
        }
      }
    });

    if (split) {
      // Phase 2 of the reset-before GRU: the n rows of W_hh multiply r * h_prev.
      if (b2.defined()) {
        at::addmm_out(ghv, b2, vbuf, w2.t());
      } else {
        at::mm_out(ghv, vbuf, w2.t());
      }
      const T* ghv_p = ghv.data_ptr<T>();
      parallel_rows(B, H, [&](int64_t b) {
        S* yr = y_p + (t * B + b) * P;
        const T* hprev = hin_p + b * P;
        if (pb.masked(t, b)) {
          std::copy(hprev, hprev + P, hout_p + b * P);
          std::fill(yr, yr + P, S(0));
          return;
        }
        const S* gxr = gx_p + (t * B + b) * GH;
        T* wsr = ws_p ? ws_p + (t * B + b) * KH : nullptr;
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = std::min(VS, H - j);
          const V hprev_v = load<T>(hprev + j, n);
          const V z = M::sigmoid(load<T>(gxr + H + j, n) + load<T>(gh_p + b * ghs + H + j, n));
          V nn, h;
          gru_rb_forward_out<V, M>(load<T>(gxr + 2 * H + j, n), load<T>(ghv_p + b * H + j, n), z,
                                   hprev_v, nn, h);
          store<T>(hout_p + b * H + j, h, n);
          if (wsr) store<T>(wsr + 2 * H + j, nn, n);
          store<T>(yr + j, h, n);
        }
      });
    }

    if (pb.projected) {
      at::mm_out(hout, hfull, w_hr.t());
      parallel_rows(B, P, [&](int64_t b) {
        S* yr = y_p + (t * B + b) * P;
        if (pb.masked(t, b)) {
          std::copy(hin_p + b * P, hin_p + (b + 1) * P, hout_p + b * P);
          std::fill(yr, yr + P, S(0));
        } else {
          store_scalar_row(yr, hout_p + b * P, P);
        }
      });
    }
  }
  if (cell == Cell::LSTM) c_n.copy_(cbuf.select(0, pb.steps & 1));
}

// ============================================================== backward

template <typename S, typename T>
void backward_impl(const Problem<S, T>& pb, const Tensor& grad_y, const Tensor& c0, const Tensor& w,
                   const Tensor& w_hr, const Tensor& hs, const Tensor& ws, Tensor& dh, Tensor& dc,
                   Tensor& dgx, Tensor& dgh, Tensor& dhp) {
  using V = Vectorized<T>;
  using M = VecMath<T>;
  constexpr int64_t VS = V::size();
  const int64_t B = pb.batch, H = pb.hidden, P = pb.out, G = pb.gates, GH = G * H;
  const int64_t KH = pb.wsu * H;
  const Cell cell = pb.cell;
  const bool relu = cell == Cell::RNN_RELU;
  const bool split = cell == Cell::GRU_RESET_BEFORE;

  Tensor dhd = at::empty({B, P}, dh.options());
  Tensor dhfull = pb.projected ? at::empty({B, H}, dh.options()) : Tensor();
  Tensor dv = split ? at::empty({B, H}, dh.options()) : Tensor();
  Tensor w_rec = split ? w.narrow(0, 0, 2 * H) : w;
  Tensor w_n = split ? w.narrow(0, 2 * H, H) : Tensor();

  const S* gy_p = grad_y.defined() ? grad_y.data_ptr<S>() : nullptr;
  const T* ws_p = ws.data_ptr<T>();
  const T* hs_p = hs.data_ptr<T>();
  const T* c0_p = cell == Cell::LSTM ? c0.data_ptr<T>() : nullptr;
  T* dh_p = dh.data_ptr<T>();
  T* dc_p = cell == Cell::LSTM ? dc.data_ptr<T>() : nullptr;
  T* dhd_p = dhd.data_ptr<T>();
  T* dgh_p = dgh.data_ptr<T>();
  S* dgx_p = dgx.data_ptr<S>();
  const bool dgx_is_dgh = static_cast<void*>(dgx_p) == static_cast<void*>(dgh_p);

  for (int64_t s = pb.steps - 1; s >= 0; --s) {
    const int64_t t = pb.time(s);
    const T* hprev_base = hs_p + pb.slot_in(s) * B * P;
    const int64_t t_prev = pb.reverse ? t + 1 : t - 1;  // time of the previous forward step

    if (pb.projected) {
      T* dhp_p = dhp.data_ptr<T>();
      parallel_rows(B, P, [&](int64_t b) {
        T* d = dh_p + b * P;
        T* rec = dhp_p + (t * B + b) * P;
        if (pb.masked(t, b)) {
          std::fill(rec, rec + P, T(0));
          return;
        }
        if (gy_p) {
          const S* g = gy_p + (t * B + b) * P;
          for (int64_t k = 0; k < P; ++k) d[k] += static_cast<T>(g[k]);
        }
        std::copy(d, d + P, rec);
      });
      at::mm_out(dhfull, dh, w_hr);
    }
    const T* dhf_p = pb.projected ? dhfull.data_ptr<T>() : nullptr;

    parallel_rows(B, GH, [&](int64_t b) {
      const T* wsr = ws_p + (t * B + b) * KH;
      T* dghr = dgh_p + (t * B + b) * GH;
      S* dgxr = dgx_p + (t * B + b) * GH;
      const T* hprev = hprev_base + b * P;
      if (pb.masked(t, b)) {
        std::fill(dghr, dghr + GH, T(0));
        if (!dgx_is_dgh) std::fill(dgxr, dgxr + GH, S(0));
        std::copy(dh_p + b * P, dh_p + (b + 1) * P, dhd_p + b * P);
        return;
      }
      const S* gyr = (gy_p && !pb.projected) ? gy_p + (t * B + b) * P : nullptr;
      // The LSTM and the RNN reach h_prev only through W_hh: no direct term.
      if (cell == Cell::LSTM || cell == Cell::RNN_TANH || cell == Cell::RNN_RELU) {
        std::fill(dhd_p + b * P, dhd_p + (b + 1) * P, T(0));
      }
      for (int64_t j = 0; j < H; j += VS) {
        const int64_t n = std::min(VS, H - j);
        V dH = pb.projected ? load<T>(dhf_p + b * H + j, n) : load<T>(dh_p + b * P + j, n);
        if (gyr) dH = dH + load<T>(gyr + j, n);
        switch (cell) {
          case Cell::LSTM: {
            const T* cprev = s == 0 ? c0_p + b * H
                                    : ws_p + (t_prev * B + b) * KH + 4 * H;
            V di, df, dg, do_, dcp;
            lstm_backward<V, M>(dH, load<T>(dc_p + b * H + j, n), load<T>(wsr + j, n),
                                load<T>(wsr + H + j, n), load<T>(wsr + 2 * H + j, n),
                                load<T>(wsr + 3 * H + j, n), load<T>(wsr + 4 * H + j, n),
                                load<T>(cprev + j, n), di, df, dg, do_, dcp);
            store<T>(dghr + j, di, n);
            store<T>(dghr + H + j, df, n);
            store<T>(dghr + 2 * H + j, dg, n);
            store<T>(dghr + 3 * H + j, do_, n);
            store<T>(dc_p + b * H + j, dcp, n);
            break;
          }
          case Cell::GRU: {
            V dxr, dxz, dxn, dhn, direct;
            gru_backward<V, M>(dH, load<T>(wsr + j, n), load<T>(wsr + H + j, n),
                               load<T>(wsr + 2 * H + j, n), load<T>(wsr + 3 * H + j, n),
                               load<T>(hprev + j, n), dxr, dxz, dxn, dhn, direct);
            store<T>(dghr + j, dxr, n);
            store<T>(dghr + H + j, dxz, n);
            store<T>(dghr + 2 * H + j, dhn, n);
            store<T>(dgxr + j, dxr, n);
            store<T>(dgxr + H + j, dxz, n);
            store<T>(dgxr + 2 * H + j, dxn, n);
            store<T>(dhd_p + b * P + j, direct, n);
            break;
          }
          case Cell::GRU_RESET_BEFORE: {
            V dn, dz, direct;
            gru_rb_backward_out<V, M>(dH, load<T>(wsr + H + j, n), load<T>(wsr + 2 * H + j, n),
                                      load<T>(hprev + j, n), dn, dz, direct);
            store<T>(dghr + H + j, dz, n);
            store<T>(dghr + 2 * H + j, dn, n);
            store<T>(dhd_p + b * P + j, direct, n);
            break;
          }
          case Cell::RNN_TANH:
          case Cell::RNN_RELU: {
            store<T>(dghr + j, rnn_backward<V, M>(dH, load<T>(wsr + j, n), relu), n);
            break;
          }
        }
      }
    });

    Tensor dgh_t = dgh.select(0, t);
    if (split) {
      at::mm_out(dv, dgh_t.narrow(1, 2 * H, H), w_n);
      const T* dv_p = dv.data_ptr<T>();
      parallel_rows(B, H, [&](int64_t b) {
        if (pb.masked(t, b)) return;
        const T* wsr = ws_p + (t * B + b) * KH;
        const T* hprev = hprev_base + b * P;
        T* dghr = dgh_p + (t * B + b) * GH;
        for (int64_t j = 0; j < H; j += VS) {
          const int64_t n = std::min(VS, H - j);
          V dr;
          V direct = load<T>(dhd_p + b * P + j, n);
          gru_rb_backward_gates<V, M>(load<T>(dv_p + b * H + j, n), load<T>(wsr + j, n),
                                      load<T>(hprev + j, n), dr, direct);
          store<T>(dghr + j, dr, n);
          store<T>(dhd_p + b * P + j, direct, n);
        }
      });
    }
    if (!dgx_is_dgh && cell != Cell::GRU) {
      parallel_rows(B, GH, [&](int64_t b) {
        store_scalar_row(dgx_p + (t * B + b) * GH, dgh_p + (t * B + b) * GH, GH);
      });
    }
    at::addmm_out(dh, dhd, split ? dgh_t.narrow(1, 0, 2 * H) : dgh_t, w_rec);
  }
}

// ============================================================== op entry points

Tensor acc(const Tensor& t, at::ScalarType acc_type) {
  return t.defined() ? t.to(acc_type).contiguous() : t;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_fwd_cpu(
    const Tensor& gx_in, const Tensor& h0, const std::optional<Tensor>& c0_opt, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh_opt, const std::optional<Tensor>& w_hr_opt,
    const std::optional<Tensor>& lengths_opt, int64_t cell_id, bool reverse, bool save) {
  const Cell cell = static_cast<Cell>(cell_id);
  TORCH_CHECK(cell_id >= 0 && cell_id <= 4, "rnnkernels: unknown cell ", cell_id);
  const Tensor gx = gx_in.contiguous();
  const int64_t T_ = gx.size(0), B = gx.size(1), P = h0.size(1);
  const int64_t G = num_gates(cell), H = gx.size(2) / G;
  const bool projected = w_hr_opt.has_value() && w_hr_opt->defined();
  const auto acc_type = gx.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = gx.options().dtype(acc_type);

  Tensor lengths = lengths_opt.has_value() ? lengths_opt->contiguous() : Tensor();
  Tensor y = at::empty({T_, B, P}, gx.options());
  Tensor hs = at::empty({save ? T_ + 1 : 2, B, P}, acc_opts);
  const int64_t K = workspace_units(cell, projected);
  Tensor ws = save ? at::empty({T_, B, K * H}, acc_opts) : at::empty({0}, acc_opts);
  Tensor c_n = cell == Cell::LSTM ? at::empty({B, H}, gx.options()) : at::empty({0}, gx.options());
  int64_t last_slot = 0;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, gx.scalar_type(), "recurrence_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    Problem<S, T> pb{cell, T_, B, H, P, G, K, reverse, save, projected,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    forward_impl<S, T>(pb, gx, acc(h0, acc_type), c0_opt ? acc(*c0_opt, acc_type) : Tensor(),
                       acc(w_hh, acc_type), b_hh_opt ? acc(*b_hh_opt, acc_type) : Tensor(),
                       projected ? acc(*w_hr_opt, acc_type) : Tensor(), y, hs, ws, c_n);
    last_slot = pb.slot_out(T_ - 1);
  });

  Tensor h_n = hs.select(0, last_slot).to(gx.scalar_type(), false, true);
  if (!save) hs = at::empty({0}, acc_opts);
  return {y, h_n, c_n, hs, ws};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_bwd_cpu(
    const std::optional<Tensor>& grad_y_opt, const std::optional<Tensor>& grad_hn_opt,
    const std::optional<Tensor>& grad_cn_opt, const std::optional<Tensor>& c0_opt,
    const Tensor& w_hh, const std::optional<Tensor>& w_hr_opt,
    const std::optional<Tensor>& lengths_opt, const Tensor& hs_in, const Tensor& ws_in,
    int64_t cell_id, bool reverse) {
  TORCH_CHECK(cell_id >= 0 && cell_id <= 4, "rnnkernels: unknown cell ", cell_id);
  const Cell cell = static_cast<Cell>(cell_id);
  const Tensor hs = hs_in.contiguous(), ws = ws_in.contiguous();
  const int64_t T_ = ws.size(0), B = ws.size(1), P = hs.size(2);
  const int64_t G = num_gates(cell), GH = w_hh.size(0), H = GH / G;
  const bool projected = w_hr_opt.has_value() && w_hr_opt->defined();
  const auto acc_type = hs.scalar_type();
  const auto st = w_hh.scalar_type();
  const auto acc_opts = hs.options();
  auto given = [](const std::optional<Tensor>& t) { return t.has_value() && t->defined(); };

  Tensor lengths = given(lengths_opt) ? lengths_opt->contiguous() : Tensor();
  Tensor grad_y = given(grad_y_opt) ? grad_y_opt->contiguous() : Tensor();
  Tensor dh = given(grad_hn_opt) ? grad_hn_opt->to(acc_type).clone(at::MemoryFormat::Contiguous)
                                 : at::zeros({B, P}, acc_opts);
  Tensor dc;
  if (cell == Cell::LSTM) {
    dc = given(grad_cn_opt) ? grad_cn_opt->to(acc_type).clone(at::MemoryFormat::Contiguous)
                            : at::zeros({B, H}, acc_opts);
  }
  Tensor dgx = at::empty({T_, B, GH}, ws.options().dtype(st));
  Tensor dgh = (st == acc_type && cell != Cell::GRU) ? dgx : at::empty({T_, B, GH}, acc_opts);
  Tensor dhp = projected ? at::empty({T_, B, P}, acc_opts) : Tensor();
  const Tensor w = acc(w_hh, acc_type);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "recurrence_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const int64_t K = workspace_units(cell, projected);
    Problem<S, T> pb{cell, T_, B, H, P, G, K, reverse, true, projected,
                     lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr};
    backward_impl<S, T>(pb, grad_y, cell == Cell::LSTM ? acc(*c0_opt, acc_type) : Tensor(), w,
                        projected ? acc(*w_hr_opt, acc_type) : Tensor(), hs, ws, dh, dc, dgx, dgh,
                        dhp);
  });

  // Weight gradients: one GEMM each over all steps and rows.
  const Tensor hp = hs.narrow(0, reverse ? 1 : 0, T_).reshape({T_ * B, P});
  const Tensor dgh2 = dgh.view({T_ * B, GH});
  Tensor dw = at::empty({GH, P}, acc_opts);
  if (cell == Cell::GRU_RESET_BEFORE) {
    const Tensor v = ws.narrow(2, 3 * H, H).reshape({T_ * B, H});
    Tensor dw_rz = dw.narrow(0, 0, 2 * H), dw_n = dw.narrow(0, 2 * H, H);
    at::mm_out(dw_rz, dgh2.narrow(1, 0, 2 * H).t(), hp);
    at::mm_out(dw_n, dgh2.narrow(1, 2 * H, H).t(), v);
  } else {
    at::mm_out(dw, dgh2.t(), hp);
  }
  Tensor db = dgh2.sum(0);
  Tensor dw_hr = at::empty({0}, w_hh.options());
  if (projected) {
    const Tensor hfull = ws.narrow(2, 5 * H, H).reshape({T_ * B, H});
    dw_hr = at::mm(dhp.view({T_ * B, P}).t(), hfull).to(st);
  }
  Tensor dc0 = cell == Cell::LSTM ? dc.to(st) : at::empty({0}, w_hh.options());
  return {dgx, dh.to(st), dc0, dw.to(st), db.to(st), dw_hr};
}

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("recurrence_fwd", &recurrence_fwd_cpu);
  m.impl("recurrence_bwd", &recurrence_bwd_cpu);
}

}  // namespace rnnkernels::cpu
