// CPU kernels of the selective scan (Mamba), per (batch row b, channel d) with state size N:
//   x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,   y_t = C_t . x_t + D u_t,   out_t = y_t silu(z_t),
//   dt_t = softplus(delta_t + delta_bias) (or without softplus / bias).
//
// Decomposition. A task owns a block of at most kChannelsPerTask channels of one batch row that
// share one group of B/C; tasks run under at::parallel_for. Grouped B and C, stored (N, L), are
// first transposed into (L, N) rows so that a step's B_t and C_t are contiguous for every
// channel. Per channel the sequence is walked chunk by chunk; within a chunk the state lanes are
// walked one SIMD vector at a time (N padded to whole vectors with zeros, which stay zero) with
// the time steps inside, so a vector of state stays in a register across the chunk and the
// exp(dt A) of each (step, lane) is one vector exp. Sums over N (y_t, and the backward's sums)
// are kept per step as vectors and reduced horizontally after the last lane. The per-step
// scalars (softplus, the D term, the silu gate) are computed for a whole chunk, vectorised
// along L.
//
// Memory. The forward reads u, delta, z once, B and C twice (once to transpose them), and writes
// out once; with save it also writes the state at every chunk start (checkpoints (batch, dim,
// ceil(L / chunk), N)). The backward walks the chunks in reverse, one at::parallel_for per
// chunk: each task recomputes its chunk's states and exp(dt A) from the checkpoint into
// (chunk + 1) x N buffers and runs the reverse recurrence, carrying dL/dx across chunk
// boundaries in a (batch, dim, N) buffer, so its working memory does not grow with L.
// Gradients that sum over channels (grouped B/C) are summed per task over its block into
// per-block partials of the chunk, reduced over blocks once the chunk's tasks are done;
// gradients that sum over batch and L (A, fixed B/C, D, delta_bias) are summed per (batch,
// channel) and reduced over batch at the end. Every sum runs in a fixed order, so results do
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace rnnkernels::cpu {

using at::Tensor;

namespace {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Channels of one task: the block over which grouped B/C gradients are summed before the
// cross-task reduction (so its partials are 1 / kChannelsPerTask of a per-channel buffer).
constexpr int64_t kChannelsPerTask = 8;
// Partial sums a cross-task reduction adds before it is worth a parallel region.
constexpr int64_t kMinReduceWork = 1 << 16;
// softplus(v) = v above this, as in torch.nn.functional.softplus and mamba_ssm.
constexpr double kSoftplusThreshold = 20.0;

template <typename T>
int64_t padded(int64_t n) {
  const int64_t w = Vec<T>::size();
  return (n + w - 1) / w * w;
}

template <typename T>
T hsum(const Vec<T>& v) {
  return at::vec::vec_reduce_all<T>([](Vec<T>& a, Vec<T>& b) { return a + b; }, v);
}

template <typename T, typename S>
void load_row(T* dst, const S* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

template <typename S, typename T>
void store_row(S* dst, const T* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

template <typename T>
Vec<T> sigmoid(const Vec<T>& v) {
  return Vec<T>(T(1)) / (Vec<T>(T(1)) + v.neg().exp());
}

// Everything the kernels read: sizes, flags and raw pointers. S is the storage type of u, delta,
// z, grouped B/C and out; T (float, or double for double) that of A, fixed B/C, D, delta_bias,
// the states and every accumulation.
template <typename S, typename T>
struct Scan {
  int64_t batch, dim, L, N, Np, G, channels_per_group, blocks_per_group, chunk, nchunks;
  bool softplus;
  const S* u;
  const S* delta;
  const S* z;  // null without the gate
  const T* A;
  const T* B_fixed;  // (dim, N), null when grouped
  const T* C_fixed;
  const T* B_var;  // grouped, as rows (batch, G, L, Np), null when fixed
  const T* C_var;
  const T* D;           // null without the skip term
  const T* delta_bias;  // null without a bias
  const T* x0;          // (batch, dim, N), null for a zero initial state

  int64_t tasks() const { return batch * G * blocks_per_group; }
  int64_t row(int64_t b, int64_t d) const { return b * dim + d; }
  // The row of grouped B (or C) at step t0 of batch row b, group g.
  const T* rows(const T* M, int64_t b, int64_t g, int64_t t0) const {
    return M + ((b * G + g) * L + t0) * Np;
  }
};

// Which batch row, group and channel range task i owns.
struct Block {
  int64_t b, g, k, d0, d1;
};

template <typename S, typename T>
Block block_of(const Scan<S, T>& p, int64_t i) {
  Block blk;
  blk.b = i / (p.G * p.blocks_per_group);
  const int64_t rest = i % (p.G * p.blocks_per_group);
  blk.g = rest / p.blocks_per_group;
  blk.k = rest % p.blocks_per_group;
  blk.d0 = blk.g * p.channels_per_group + blk.k * kChannelsPerTask;
  blk.d1 = std::min(blk.d0 + kChannelsPerTask, (blk.g + 1) * p.channels_per_group);
  return blk;
}

// Per-chunk scalars of one channel, all of length `chunk`.
template <typename T>
struct StepScalars {
  std::vector<T> u, v, dt, du, y, gy, gu, gdt, aux;
  explicit StepScalars(int64_t chunk)
      : u(chunk), v(chunk), dt(chunk), du(chunk), y(chunk), gy(chunk), gu(chunk), gdt(chunk),
        aux(chunk) {}
};

// Loads u and delta of one channel's chunk and forms v = delta + bias, dt and du = dt * u.
template <typename S, typename T>
void discretise(const Scan<S, T>& p, int64_t d, int64_t off, int64_t len, StepScalars<T>& s) {
  using V = Vec<T>;
  load_row(s.u.data(), p.u + off, len);
  load_row(s.v.data(), p.delta + off, len);
  if (p.delta_bias != nullptr) {
    const V bias(p.delta_bias[d]);
    at::vec::map([&](V x) { return x + bias; }, s.v.data(), s.v.data(), len);
  }
  if (p.softplus) {
    const V threshold(static_cast<T>(kSoftplusThreshold));
    at::vec::map([&](V x) { return V::blendv(x.exp().log1p(), x, x > threshold); }, s.dt.data(),
                 s.v.data(), len);
  } else {
    std::copy(s.v.begin(), s.v.begin() + len, s.dt.begin());
  }
  at::vec::map2([](V a, V b) { return a * b; }, s.du.data(), s.dt.data(), s.u.data(), len);
}

// The recurrence over one chunk of one channel: x (Np) is the state before the chunk and after it.
// B and C rows advance by b_step / c_step per time step (0: fixed, Np: a transposed chunk).
// With kY, y_t = C_t . x_t goes to y. With kStore, exp(dt A) of every step goes to as (len x Np)
// and the state after step t to xs[(t + 1) * Np] (xs row 0 is the state before the chunk).
// yv (len x W) is scratch.
template <typename T, bool kY, bool kStore>
void forward_steps(int64_t len, int64_t Np, T* x, const T* A, const T* B, int64_t b_step,
                   const T* C, int64_t c_step, const T* dt, const T* du, T* y, T* yv,
                   T* as, T* xs) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  for (int64_t k = 0; k < Np; k += W) {
    V xk = V::loadu(x + k);
    const V Ak = V::loadu(A + k);
    for (int64_t t = 0; t < len; ++t) {
      const V a = (V(dt[t]) * Ak).exp_u20();
      xk = at::vec::fmadd(a, xk, V(du[t]) * V::loadu(B + t * b_step + k));
      if constexpr (kStore) {
        a.store(as + t * Np + k);
        xk.store(xs + (t + 1) * Np + k);
      }
      if constexpr (kY) {
        V yk = xk * V::loadu(C + t * c_step + k);
        if (k > 0) yk = yk + V::loadu(yv + t * W);
        yk.store(yv + t * W);
      }
    }
    xk.store(x + k);
  }
  if constexpr (kY) {
    for (int64_t t = 0; t < len; ++t) y[t] = hsum(V::loadu(yv + t * W));
  }
}

// The reverse recurrence over one chunk of one channel. h (Np) holds dL/dx after the chunk on
// entry and dL/dx before it on exit. gy: dL/dy per step. Sums over the chunk go to dA (Np),
// dB / dC: (len x Np) per-step rows when grouped (kBvar / kCvar, accumulated: the block's
// channels add to the same rows), a single Np row when fixed. The per-step sums over n
// s1 = sum h B and s2 = sum h A a x_prev come back in s1 / s2 (len each); sv (2 x len x W) is
// scratch.
template <typename T, bool kBvar, bool kCvar>
void backward_steps(int64_t len, int64_t Np, T* h, const T* A, const T* B, const T* C,
                    const T* xs, const T* as, const T* dt, const T* du, const T* gy, T* dA,
                    T* dB, T* dC, T* s1, T* s2, T* sv) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  T* s1v = sv;
  T* s2v = sv + len * W;
  for (int64_t k = 0; k < Np; k += W) {
    V hk = V::loadu(h + k);
    const V Ak = V::loadu(A + k);
    V dAk(T(0)), dBk(T(0)), dCk(T(0));
    for (int64_t t = len - 1; t >= 0; --t) {
      const V g(gy[t]);
      const V Bk = V::loadu(B + (kBvar ? t * Np : 0) + k);
      const V Ck = V::loadu(C + (kCvar ? t * Np : 0) + k);
      const V xk = V::loadu(xs + (t + 1) * Np + k);
      const V xp = V::loadu(xs + t * Np + k);
      const V a = V::loadu(as + t * Np + k);
      hk = at::vec::fmadd(g, Ck, hk);
      if constexpr (kCvar) {
        at::vec::fmadd(g, xk, V::loadu(dC + t * Np + k)).store(dC + t * Np + k);
      } else {
        dCk = at::vec::fmadd(g, xk, dCk);
      }
      if constexpr (kBvar) {
        at::vec::fmadd(hk, V(du[t]), V::loadu(dB + t * Np + k)).store(dB + t * Np + k);
      } else {
        dBk = at::vec::fmadd(hk, V(du[t]), dBk);
      }
      const V q = hk * a * xp;
      V p1 = hk * Bk;
      V p2 = q * Ak;
      if (k > 0) {
        p1 = p1 + V::loadu(s1v + t * W);
        p2 = p2 + V::loadu(s2v + t * W);
      }
      p1.store(s1v + t * W);
      p2.store(s2v + t * W);
      dAk = at::vec::fmadd(q, V(dt[t]), dAk);
      hk = a * hk;
    }
    hk.store(h + k);
    (V::loadu(dA + k) + dAk).store(dA + k);
    if constexpr (!kBvar) (V::loadu(dB + k) + dBk).store(dB + k);
    if constexpr (!kCvar) (V::loadu(dC + k) + dCk).store(dC + k);
  }
  for (int64_t t = 0; t < len; ++t) {
    s1[t] = hsum(V::loadu(s1v + t * W));
    s2[t] = hsum(V::loadu(s2v + t * W));
  }
}

// A channel's constants as padded rows: A, and B / C when fixed.
template <typename S, typename T>
void load_constants(const Scan<S, T>& p, int64_t d, T* A, T* B, T* C) {
  std::copy(p.A + d * p.N, p.A + (d + 1) * p.N, A);
  if (p.B_fixed != nullptr) std::copy(p.B_fixed + d * p.N, p.B_fixed + (d + 1) * p.N, B);
  if (p.C_fixed != nullptr) std::copy(p.C_fixed + d * p.N, p.C_fixed + (d + 1) * p.N, C);
}

// ------------------------------------------------------------------------------ forward

template <typename S, typename T>
void forward_task(const Scan<S, T>& p, const Block& blk, S* out, T* last, T* ckpt) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t Np = p.Np, nc = blk.d1 - blk.d0;
  std::vector<T> consts(3 * nc * Np, T(0)), state(nc * Np, T(0));
  std::vector<T> yv(p.chunk * W);
  StepScalars<T> s(p.chunk);
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t d = blk.d0 + j;
    load_constants(p, d, &consts[j * Np], &consts[(nc + j) * Np], &consts[(2 * nc + j) * Np]);
    if (p.x0 != nullptr) {
      std::copy(p.x0 + p.row(blk.b, d) * p.N, p.x0 + (p.row(blk.b, d) + 1) * p.N, &state[j * Np]);
    }
  }
  for (int64_t c = 0; c < p.nchunks; ++c) {
    const int64_t t0 = c * p.chunk, len = std::min(p.chunk, p.L - t0);
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t d = blk.d0 + j, r = p.row(blk.b, d), off = r * p.L + t0;
      T* x = &state[j * Np];
      if (ckpt != nullptr) std::copy(x, x + p.N, ckpt + (r * p.nchunks + c) * p.N);
      discretise(p, d, off, len, s);
      const T* B = p.B_var ? p.rows(p.B_var, blk.b, blk.g, t0) : &consts[(nc + j) * Np];
      const T* C = p.C_var ? p.rows(p.C_var, blk.b, blk.g, t0) : &consts[(2 * nc + j) * Np];
      forward_steps<T, true, false>(len, Np, x, &consts[j * Np], B, p.B_var ? Np : 0, C,
                                    p.C_var ? Np : 0, s.dt.data(), s.du.data(), s.y.data(),
                                    yv.data(), nullptr, nullptr);
      if (p.D != nullptr) {
        const V Dd(p.D[d]);
        at::vec::map2([&](V y, V u) { return at::vec::fmadd(Dd, u, y); }, s.y.data(),
                      s.y.data(), s.u.data(), len);
      }
      if (p.z != nullptr) {
        load_row(s.aux.data(), p.z + off, len);
        at::vec::map2([](V y, V z) { return y * z * sigmoid(z); }, s.y.data(), s.y.data(),
                      s.aux.data(), len);
      }
      store_row(out + off, s.y.data(), len);
    }
  }
  for (int64_t j = 0; j < nc; ++j) {
    std::copy(&state[j * Np], &state[j * Np] + p.N, last + p.row(blk.b, blk.d0 + j) * p.N);
  }
}

// ------------------------------------------------------------------------------ backward

template <typename S, typename T>
struct Grads {
  const S* grad_out;
  const T* ckpt;
  T* carry;          // (batch, dim, Np): dL/dx at the current chunk boundary
  T* dA;             // (batch, dim, Np) per-row sums
  T* dB_fixed;       // (batch, dim, Np) per-row sums, null when grouped
  T* dC_fixed;
  T* dB_part;        // (batch, G, blocks_per_group, chunk, Np) per-block sums, null when fixed
  T* dC_part;
  T* dD;             // (batch, dim) per-row sums, left at zero without D
  T* dbias;          // (batch, dim) per-row sums, left at zero without delta_bias
  S* grad_u;
  S* grad_delta;
  S* grad_z;         // null without z
};

// Buffers of one thread's backward tasks over one chunk: the block's sums of grouped B / C
// gradients, the channel's constants, recomputed states and exp(dt A).
template <typename T>
struct BackwardWork {
  std::vector<T> dBt, dCt, consts, xs, as, x, sv, s1, s2;
  StepScalars<T> s;
  BackwardWork(int64_t chunk, int64_t Np, bool B_var, bool C_var)
      : dBt(B_var ? chunk * Np : 0), dCt(C_var ? chunk * Np : 0), consts(3 * Np, T(0)),
        xs((chunk + 1) * Np, T(0)), as(chunk * Np), x(Np), sv(2 * chunk * Vec<T>::size()),
        s1(chunk), s2(chunk), s(chunk) {}
};

template <typename S, typename T, bool kBvar, bool kCvar>
void backward_task(const Scan<S, T>& p, const Grads<S, T>& gr, const Block& blk, int64_t c,
                   BackwardWork<T>& w) {
  using V = Vec<T>;
  const int64_t Np = p.Np, nc = blk.d1 - blk.d0;
  const int64_t t0 = c * p.chunk, len = std::min(p.chunk, p.L - t0);
  StepScalars<T>& s = w.s;
  std::fill(w.dBt.begin(), w.dBt.end(), T(0));
  std::fill(w.dCt.begin(), w.dCt.end(), T(0));
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t d = blk.d0 + j, r = p.row(blk.b, d), off = r * p.L + t0;
    T* A = w.consts.data();
    load_constants(p, d, A, A + Np, A + 2 * Np);
    const T* B = kBvar ? p.rows(p.B_var, blk.b, blk.g, t0) : A + Np;
    const T* C = kCvar ? p.rows(p.C_var, blk.b, blk.g, t0) : A + 2 * Np;
    std::copy(gr.ckpt + (r * p.nchunks + c) * p.N, gr.ckpt + (r * p.nchunks + c + 1) * p.N,
              w.xs.begin());
    std::copy(w.xs.begin(), w.xs.begin() + Np, w.x.begin());
    discretise(p, d, off, len, s);
    // y is needed only for the gate's gradient.
    auto recompute = p.z != nullptr ? forward_steps<T, true, true> : forward_steps<T, false, true>;
    recompute(len, Np, w.x.data(), A, B, kBvar ? Np : 0, C, kCvar ? Np : 0, s.dt.data(),
              s.du.data(), s.y.data(), w.sv.data(), w.as.data(), w.xs.data());

    // Through the gate and the skip term: gy = dL/dy, gu starts as the D term's part of dL/du.
    load_row(s.gy.data(), gr.grad_out + off, len);
    const T Dd = p.D != nullptr ? p.D[d] : T(0);
    if (p.z != nullptr) {
      const V Dv(Dd);
      load_row(s.aux.data(), p.z + off, len);
      // y + D u, the gate's input; then dL/dz into gdt (as scratch) and gy scaled by silu(z).
      at::vec::map2([&](V y, V u) { return at::vec::fmadd(Dv, u, y); }, s.y.data(), s.y.data(),
                    s.u.data(), len);
      at::vec::map3(
          [](V g, V y, V z) {
            const V sg = sigmoid(z);
            return g * y * sg * (V(T(1)) + z * (V(T(1)) - sg));
          },
          s.gdt.data(), s.gy.data(), s.y.data(), s.aux.data(), len);
      store_row(gr.grad_z + off, s.gdt.data(), len);
      at::vec::map2([](V g, V z) { return g * z * sigmoid(z); }, s.gy.data(), s.gy.data(),
                    s.aux.data(), len);
    }
    if (p.D != nullptr) {
      T acc = T(0);
      for (int64_t t = 0; t < len; ++t) acc += s.gy[t] * s.u[t];
      gr.dD[r] += acc;
    }

    T* dB = kBvar ? w.dBt.data() : gr.dB_fixed + r * Np;
    T* dC = kCvar ? w.dCt.data() : gr.dC_fixed + r * Np;
    backward_steps<T, kBvar, kCvar>(len, Np, gr.carry + r * Np, A, B, C, w.xs.data(),
                                    w.as.data(), s.dt.data(), s.du.data(), s.gy.data(),
                                    gr.dA + r * Np, dB, dC, w.s1.data(), w.s2.data(),
                                    w.sv.data());
    for (int64_t t = 0; t < len; ++t) {
      s.gu[t] = s.gy[t] * Dd + s.dt[t] * w.s1[t];
      s.gdt[t] = s.u[t] * w.s1[t] + w.s2[t];
    }
    if (p.softplus) {
      const V threshold(static_cast<T>(kSoftplusThreshold));
      at::vec::map2(
          [&](V g, V v) { return V::blendv(g * sigmoid(v), g, v > threshold); }, s.gdt.data(),
          s.gdt.data(), s.v.data(), len);
    }
    if (p.delta_bias != nullptr) {
      T acc = T(0);
      for (int64_t t = 0; t < len; ++t) acc += s.gdt[t];
      gr.dbias[r] += acc;
    }
    store_row(gr.grad_u + off, s.gu.data(), len);
    store_row(gr.grad_delta + off, s.gdt.data(), len);
  }
  const int64_t part = ((blk.b * p.G + blk.g) * p.blocks_per_group + blk.k) * p.chunk * Np;
  if constexpr (kBvar) std::copy(w.dBt.begin(), w.dBt.begin() + len * Np, gr.dB_part + part);
  if constexpr (kCvar) std::copy(w.dCt.begin(), w.dCt.begin() + len * Np, gr.dC_part + part);
}

// grad (batch, G, N, L) over one chunk = sum over the blocks of a group of the per-block partials
// (len x Np each), added block after block, then written transposed.
template <typename S, typename T>
void reduce_grouped(const Scan<S, T>& p, const T* part, S* grad, int64_t t0, int64_t len) {
  using V = Vec<T>;
  const int64_t block = p.chunk * p.Np;
  // A few microseconds of adds per group: threads only when there is enough of them.
  const int64_t grain = std::max<int64_t>(1, kMinReduceWork / (p.blocks_per_group * block));
  at::parallel_for(0, p.batch * p.G, grain, [&](int64_t i0, int64_t i1) {
    std::vector<T> acc(len * p.Np);
    for (int64_t i = i0; i < i1; ++i) {
      const T* src = part + i * p.blocks_per_group * block;
      std::copy(src, src + len * p.Np, acc.begin());
      for (int64_t k = 1; k < p.blocks_per_group; ++k) {
        at::vec::map2([](V a, V b) { return a + b; }, acc.data(), acc.data(), src + k * block,
                      len * p.Np);
      }
      for (int64_t n = 0; n < p.N; ++n) {
        S* dst = grad + (i * p.N + n) * p.L + t0;
        for (int64_t t = 0; t < len; ++t) dst[t] = static_cast<S>(acc[t * p.Np + n]);
      }
    }
  });
}

// out (rows x cols, or (rows,) when cols is 0) = sum over batch of per-row sums (batch x rows x
// ld), batch row after batch row.
template <typename T>
Tensor sum_over_batch(const Tensor& per_row, int64_t batch, int64_t rows, int64_t ld,
                      int64_t cols) {
  const std::vector<int64_t> shape =
      cols == 0 ? std::vector<int64_t>{rows} : std::vector<int64_t>{rows, cols};
  Tensor out = at::zeros(shape, per_row.options());
  cols = std::max<int64_t>(cols, 1);
  const T* src = per_row.data_ptr<T>();
  T* dst = out.data_ptr<T>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t n = 0; n < cols; ++n) dst[i * cols + n] += src[(b * rows + i) * ld + n];
    }
  }
  return out;
}

// ------------------------------------------------------------------------------ bindings

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

at::ScalarType acc_type(at::ScalarType st) {
  return st == at::kDouble ? at::kDouble : at::kFloat;
}

Tensor contiguous_as(const Tensor& t, at::ScalarType st, const char* name) {
  TORCH_CHECK(t.scalar_type() == st, "rnnkernels: selective_scan: ", name, " must have dtype ",
              st, ", got ", t.scalar_type());
  return t.contiguous();
}

// The inputs, checked and made contiguous, and the sizes that follow from them.
struct Inputs {
  Tensor u, delta, A, B, C, D, z, delta_bias, x0;
  bool B_var, C_var;
  int64_t batch, dim, L, N, G;
};

Inputs prepare(const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
               const Tensor& C, const std::optional<Tensor>& D, const std::optional<Tensor>& z,
               const std::optional<Tensor>& delta_bias, const std::optional<Tensor>& x0,
               int64_t chunk_size) {
  TORCH_CHECK(u.dim() == 3 && A.dim() == 2, "rnnkernels: selective_scan: u must be 3-d and A 2-d");
  TORCH_CHECK(chunk_size > 0, "rnnkernels: selective_scan: chunk_size must be positive");
  const auto st = u.scalar_type(), at_ = acc_type(st);
  Inputs in;
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.L = u.size(2);
  in.N = A.size(1);
  in.B_var = B.dim() == 4;
  in.C_var = C.dim() == 4;
  in.G = in.B_var ? B.size(1) : (in.C_var ? C.size(1) : 1);
  TORCH_CHECK(in.G > 0 && in.dim % in.G == 0, "rnnkernels: selective_scan: bad group count");
  in.u = u.contiguous();
  in.delta = contiguous_as(delta, st, "delta");
  TORCH_CHECK(delta.sizes() == u.sizes(), "rnnkernels: selective_scan: delta must match u");
  in.A = contiguous_as(A, at_, "A");
  TORCH_CHECK(A.size(0) == in.dim, "rnnkernels: selective_scan: A must be (dim, N)");
  in.B = contiguous_as(B, in.B_var ? st : at_, "B");
  in.C = contiguous_as(C, in.C_var ? st : at_, "C");
  const auto grouped = std::vector<int64_t>{in.batch, in.G, in.N, in.L};
  const auto fixed = std::vector<int64_t>{in.dim, in.N};
  TORCH_CHECK(B.sizes() == at::IntArrayRef(in.B_var ? grouped : fixed),
              "rnnkernels: selective_scan: B must be (dim, N) or (batch, G, N, L)");
  TORCH_CHECK(C.sizes() == at::IntArrayRef(in.C_var ? grouped : fixed),
              "rnnkernels: selective_scan: C must be (dim, N) or (batch, G, N, L)");
  if (given(D)) {
    in.D = contiguous_as(*D, at_, "D");
    TORCH_CHECK(in.D.numel() == in.dim, "rnnkernels: selective_scan: D must be (dim,)");
  }
  if (given(z)) {
    in.z = contiguous_as(*z, st, "z");
    TORCH_CHECK(z->sizes() == u.sizes(), "rnnkernels: selective_scan: z must match u");
  }
  if (given(delta_bias)) {
    in.delta_bias = contiguous_as(*delta_bias, at_, "delta_bias");
    TORCH_CHECK(in.delta_bias.numel() == in.dim,
                "rnnkernels: selective_scan: delta_bias must be (dim,)");
  }
  if (given(x0)) {
    in.x0 = contiguous_as(*x0, at_, "initial_state");
    TORCH_CHECK(x0->sizes() == at::IntArrayRef({in.batch, in.dim, in.N}),
                "rnnkernels: selective_scan: initial_state must be (batch, dim, N)");
  }
  return in;
}

// Grouped B or C (batch, G, N, L) as rows (batch, G, L, Np) in the accumulation type, zero-padded
// to whole vectors.
Tensor rows_of(const Tensor& M, int64_t Np, at::ScalarType acc) {
  Tensor rows = at::zeros({M.size(0), M.size(1), M.size(3), Np}, M.options().dtype(acc));
  rows.narrow(3, 0, M.size(2)).copy_(M.transpose(2, 3));
  return rows;
}

template <typename S, typename T>
Scan<S, T> make_scan(const Inputs& in, const Tensor& B_rows, const Tensor& C_rows, bool softplus,
                     int64_t chunk_size) {
  auto ptr = [](const Tensor& t, bool use) { return use && t.defined() ? t.data_ptr() : nullptr; };
  Scan<S, T> p;
  p.batch = in.batch;
  p.dim = in.dim;
  p.L = in.L;
  p.N = in.N;
  p.Np = padded<T>(in.N);
  p.G = in.G;
  p.channels_per_group = in.dim / in.G;
  p.blocks_per_group = (p.channels_per_group + kChannelsPerTask - 1) / kChannelsPerTask;
  p.chunk = std::min(chunk_size, std::max<int64_t>(in.L, 1));
  p.nchunks = (in.L + chunk_size - 1) / chunk_size;
  p.softplus = softplus;
  p.u = static_cast<const S*>(ptr(in.u, true));
  p.delta = static_cast<const S*>(ptr(in.delta, true));
  p.z = static_cast<const S*>(ptr(in.z, true));
  p.A = static_cast<const T*>(ptr(in.A, true));
  p.B_fixed = static_cast<const T*>(ptr(in.B, !in.B_var));
  p.C_fixed = static_cast<const T*>(ptr(in.C, !in.C_var));
  p.B_var = static_cast<const T*>(ptr(B_rows, in.B_var));
  p.C_var = static_cast<const T*>(ptr(C_rows, in.C_var));
  p.D = static_cast<const T*>(ptr(in.D, true));
  p.delta_bias = static_cast<const T*>(ptr(in.delta_bias, true));
  p.x0 = static_cast<const T*>(ptr(in.x0, true));
  return p;
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cpu(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const std::optional<Tensor>& D, const std::optional<Tensor>& z,
    const std::optional<Tensor>& delta_bias, bool delta_softplus,
    const std::optional<Tensor>& initial_state, int64_t chunk_size, bool save) {
  const Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size);
  const auto acc_opts = u.options().dtype(acc_type(u.scalar_type()));
  const int64_t nchunks = (in.L + chunk_size - 1) / chunk_size;
  Tensor out = at::empty({in.batch, in.dim, in.L}, u.options());
  Tensor last = at::empty({in.batch, in.dim, in.N}, acc_opts);
  Tensor ckpt = save ? at::empty({in.batch, in.dim, nchunks, in.N}, acc_opts)
                     : at::empty({0}, acc_opts);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, u.scalar_type(), "selective_scan_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const int64_t Np = padded<T>(in.N);
    const Tensor B_rows = in.B_var ? rows_of(in.B, Np, acc_type(u.scalar_type())) : Tensor();
    const Tensor C_rows = in.C_var ? rows_of(in.C, Np, acc_type(u.scalar_type())) : Tensor();
    const Scan<S, T> p = make_scan<S, T>(in, B_rows, C_rows, delta_softplus, chunk_size);
    S* out_p = out.data_ptr<S>();
    T* last_p = last.data_ptr<T>();
    T* ckpt_p = save ? ckpt.data_ptr<T>() : nullptr;
    at::parallel_for(0, p.tasks(), 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) forward_task(p, block_of(p, i), out_p, last_p, ckpt_p);
    });
  });
  return {out, last, ckpt};
}

template <typename S, typename T, bool kBvar, bool kCvar>
void backward_chunks(const Scan<S, T>& p, const Grads<S, T>& gr, S* grad_B, S* grad_C) {
  for (int64_t c = p.nchunks - 1; c >= 0; --c) {
    at::parallel_for(0, p.tasks(), 1, [&](int64_t i0, int64_t i1) {
      BackwardWork<T> w(p.chunk, p.Np, kBvar, kCvar);
      for (int64_t i = i0; i < i1; ++i) {
        backward_task<S, T, kBvar, kCvar>(p, gr, block_of(p, i), c, w);
      }
    });
    const int64_t t0 = c * p.chunk, len = std::min(p.chunk, p.L - t0);
    if constexpr (kBvar) reduce_grouped(p, gr.dB_part, grad_B, t0, len);
    if constexpr (kCvar) reduce_grouped(p, gr.dC_part, grad_C, t0, len);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
selective_scan_bwd_cpu(const Tensor& grad_out, const std::optional<Tensor>& grad_last_state,
                       const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                       const Tensor& C, const std::optional<Tensor>& D,
                       const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                       bool delta_softplus, const std::optional<Tensor>& initial_state,
                       const Tensor& checkpoints, int64_t chunk_size) {
  const Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size);
  const auto st = u.scalar_type(), at_ = acc_type(st);
  const auto acc_opts = u.options().dtype(at_);
  const int64_t nchunks = (in.L + chunk_size - 1) / chunk_size;
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef({in.batch, in.dim, nchunks, in.N}) &&
                  checkpoints.scalar_type() == at_,
              "rnnkernels: selective_scan_bwd: checkpoints must be (batch, dim, ceil(L / "
              "chunk_size), N) in the state dtype; call selective_scan_fwd with save=True");
  TORCH_CHECK(grad_out.sizes() == u.sizes(),
              "rnnkernels: selective_scan_bwd: grad_out must match u");
  const Tensor gout = contiguous_as(grad_out, st, "grad_out");
  const Tensor ckpt = checkpoints.contiguous();

  Tensor grad_u = at::empty_like(in.u), grad_delta = at::empty_like(in.u);
  Tensor grad_z = in.z.defined() ? at::empty_like(in.u) : at::empty({0}, u.options());
  Tensor grad_B = in.B_var ? at::empty_like(in.B) : Tensor();
  Tensor grad_C = in.C_var ? at::empty_like(in.C) : Tensor();
  Tensor grad_D, grad_bias, grad_A, grad_x0;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "selective_scan_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const int64_t Np = padded<T>(in.N);
    const Tensor B_rows = in.B_var ? rows_of(in.B, Np, at_) : Tensor();
    const Tensor C_rows = in.C_var ? rows_of(in.C, Np, at_) : Tensor();
    const Scan<S, T> p = make_scan<S, T>(in, B_rows, C_rows, delta_softplus, chunk_size);
    const int64_t rows = p.batch * p.dim;
    Tensor carry = at::zeros({rows, p.Np}, acc_opts);
    if (given(grad_last_state)) {
      carry.narrow(1, 0, p.N).copy_(grad_last_state->reshape({rows, p.N}));
    }
    Tensor dA = at::zeros({rows, p.Np}, acc_opts);
    Tensor dB_fixed = in.B_var ? Tensor() : at::zeros({rows, p.Np}, acc_opts);
    Tensor dC_fixed = in.C_var ? Tensor() : at::zeros({rows, p.Np}, acc_opts);
    const int64_t part = p.batch * p.G * p.blocks_per_group * p.chunk * p.Np;
    Tensor dB_part = in.B_var ? at::empty({part}, acc_opts) : Tensor();
    Tensor dC_part = in.C_var ? at::empty({part}, acc_opts) : Tensor();
    Tensor dD = at::zeros({rows}, acc_opts), dbias = at::zeros({rows}, acc_opts);
    auto ptr = [](Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    Grads<S, T> gr{gout.data_ptr<S>(),
                   ckpt.data_ptr<T>(),
                   carry.data_ptr<T>(),
                   dA.data_ptr<T>(),
                   ptr(dB_fixed),
                   ptr(dC_fixed),
                   ptr(dB_part),
                   ptr(dC_part),
                   dD.data_ptr<T>(),
                   dbias.data_ptr<T>(),
                   grad_u.data_ptr<S>(),
                   grad_delta.data_ptr<S>(),
                   in.z.defined() ? grad_z.data_ptr<S>() : nullptr};
    S* gB = in.B_var ? grad_B.data_ptr<S>() : nullptr;
    S* gC = in.C_var ? grad_C.data_ptr<S>() : nullptr;
    if (in.B_var && in.C_var) {
      backward_chunks<S, T, true, true>(p, gr, gB, gC);
    } else if (in.B_var) {
      backward_chunks<S, T, true, false>(p, gr, gB, gC);
    } else if (in.C_var) {
      backward_chunks<S, T, false, true>(p, gr, gB, gC);
    } else {
      backward_chunks<S, T, false, false>(p, gr, gB, gC);
    }
    grad_A = sum_over_batch<T>(dA, p.batch, p.dim, p.Np, p.N);
    if (!in.B_var) grad_B = sum_over_batch<T>(dB_fixed, p.batch, p.dim, p.Np, p.N);
    if (!in.C_var) grad_C = sum_over_batch<T>(dC_fixed, p.batch, p.dim, p.Np, p.N);
    grad_D = in.D.defined() ? sum_over_batch<T>(dD, p.batch, p.dim, 1, 0)
                            : at::empty({0}, u.options());
    grad_bias = in.delta_bias.defined() ? sum_over_batch<T>(dbias, p.batch, p.dim, 1, 0)
                                        : at::empty({0}, u.options());
    grad_x0 = in.x0.defined() ? carry.narrow(1, 0, p.N).reshape({p.batch, p.dim, p.N}).clone()
                              : at::empty({0}, u.options());
  });
  return {grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace rnnkernels::cpu
