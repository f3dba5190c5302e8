// CPU kernels of the selective scan (Mamba), per (batch row b, channel d) with state size N:
//   x_t = exp(dt_t A) x_{t-1} + dt_t B_t u_t,   y_t = C_t . x_t + D u_t,   out_t = y_t silu(z_t),
//   dt_t = softplus(delta_t + delta_bias) (or without softplus / bias).
//
// Decomposition. A task owns a block of W channels (W = the SIMD width: 16 floats with AVX-512) of
// one batch row inside one group of B/C, one channel per vector lane; the threads take tasks one at
// a time (lanes::for_each_task). The block's state is N vectors (lane j = channel j), so every
// operation of the recurrence, including the sums over N (y_t = C_t . x_t and the backward's sums),
// is a plain vector operation, with no horizontal reduction in the time loop; the exp(dt A) of each
// (step, state, channel) is one lane of a vector exp. Grouped B_t and C_t are shared by the block's
// channels: one broadcast scalar per (step, state), read in place from the (N, L) rows of their
// (batch, G, N, L) layout (a block's span reads one run of steps per state). Per span (kSpanSteps
// steps, whole chunks), the block's rows of u, delta, z (and grad_out) are transposed into
// (span, W) lanes and the results transposed back, W x W tiles at a time in registers, the
// rows' runs left to the hardware prefetchers (software prefetches of the next block's or span's
// rows into L2, which the 64- and 256-step chunks had before the spans, made the training step
// slower with spans, warm and with the caches evicted, in alternating processes, and again when
// spread over the backward's per-step loops). A block
// has fewer than W channels only at a group's end: the unused lanes compute on zeros and are
// never stored.
//
// Memory. The forward reads u, delta, z, B and C once and writes out once; with save it also writes
// the state at every chunk start (checkpoints (batch, dim, ceil(L / chunk) * N), stored as the
// block's lanes, see forward_task). The backward's tasks are supers (runs of consecutive blocks
// of one batch row and group, at least kMinSupers in all), handed out the same way; a super walks
// the spans in reverse, and for each span each of its blocks, chunk by chunk in reverse and
// kStates states at a time, recomputes the chunk's states from the checkpoint into a buffer in
// the core's L1 and runs the reverse recurrence on them (backward_states), carrying dL/dx across
// chunk boundaries in a per-block buffer, so the working memory does not grow with L. The span
// decouples the two: runs of each row for the transposes and the prefetcher, short chunks for
// the recomputation's buffers.
// Gradients that sum over channels (grouped B/C) are added per lane over the super's blocks and
// summed over the lanes into (L, N) partials per super (as many values as the gradient itself when
// there are at least kMinSupers (batch row, group) pairs, at most kMinSupers times as many),
// reduced over the group's supers in pieces of steps by whichever threads are free; gradients
// that sum over batch and L (A, fixed B/C, D, delta_bias) are kept per lane across chunks and
// reduced over batch by the thread that completes the last super of all (one parallel region for
// the whole backward). Every sum runs in a fixed order, so results do not depend on the number of
// threads or on which thread ran a task.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../given.h"
#include "lanes.h"
#include "vec_math.h"
#include "workspace_cache.h"

namespace rnnkernels::cpu {

using at::Tensor;

namespace {

using lanes::Buffer;
using lanes::gather_lanes;
using lanes::scatter_lanes;
using lanes::task_grain;
using lanes::Vec;

// Steps a task gathers, transforms and scatters at once, rounded down to a multiple of the
// chunk (the checkpoint interval), at least one chunk. 64 steps keep a span's lanes (4 KB a
// buffer) and the backward's grouped dB / dC terms in L1 and L2's nearer reach; 256 (1 KB runs
// of each float row, as the 256-step chunks had before the span was separate from the chunk)
// made the training step about 3% slower at the benchmark's shape (python -m bench, selective
// scan suite), the per-step passes then streaming 16 KB buffers through L2.
constexpr int64_t kSpanSteps = 64;
// Supers (the backward's tasks) the blocks of all (batch row, group) pairs are split into, at
// least, where there are as many blocks: enough to keep 8 threads busy, few enough that the
// lane sums of grouped dB / dC, done once per super and span, cost little.
constexpr int64_t kMinSupers = 8;

// Two vectors' lanes folded into one: lane 2k = b[k] + b[k + W/2], lane 2k + 1 = c[k] + c[k +
// W/2]. The backward stores the grouped dB and dC terms of a (step, state) this way, one store
// instead of two (the reverse pass was bound by its stores: in a standalone timing, 8.4 cycles
// per step and state vector with the two stores, 6.1 with the folded one), and folds two
// states' folded terms again, one store a pair of states: the chunk's terms then take half as
// much of L1 (the backward op and the training step ran faster so, in alternating processes
// against the build before).
template <typename T>
C10_ALWAYS_INLINE Vec<T> fold(Vec<T> b, Vec<T> c) {
  const auto [lo, hi] = at::vec::interleave2(b, c);
  return lo + hi;
}

// Vectors [i0, i0 + W) of v (zero past count) into r, then the rounds m = W/2, W/4, ...,
// kLast: round m folds vector i + m into vector i for i < m. After the round m = 1, lane i of
// r[0] is the sum of vector i0 + i.
template <int64_t kLast, typename T>
C10_ALWAYS_INLINE void folding_rounds(const T* v, int64_t count, int64_t i0, Vec<T>* r) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t i = 0; i < W; ++i) {
    r[i] = i0 + i < count ? Vec<T>::loadu(v + (i0 + i) * W) : Vec<T>(0);
  }
  for (int64_t m = W / 2; m >= kLast; m /= 2) {
    for (int64_t i = 0; i < m; ++i) r[i] = fold(r[i], r[i + m]);
  }
}

// out[i] = the sum of the W lanes of vector i of v, for i < count, W vectors at a time: all
// folding rounds (2 (W - 1) shuffles and W - 1 adds for W sums).
template <typename T>
void lane_sums(const T* v, int64_t count, T* out) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> r[W];
  for (int64_t i0 = 0; i0 < count; i0 += W) {
    folding_rounds<1>(v, count, i0, r);
    r[0].store(out + i0, std::min(W, count - i0));
  }
}

// Vectors a step of the grouped dB / dC terms takes when B and C are both grouped: one a pair
// of states (see paired_lane_sums).
constexpr int64_t state_pairs(int64_t N) { return (N + 1) / 2; }

// After folding_rounds<4> over the paired terms (see paired_lane_sums), lane (W / 4) c + j of
// r[i] holds the class-c sum of vector i + 4 j (i < 4, j < W / 4): the first n values of out_b
// and out_c (b_2k, b_2k+1 and c_2k, c_2k+1 of vector k at 2 k, 2 k + 1). AVX-512 float: two
// 128-bit lane shuffles gather r[0], r[1] and r[2], r[3]'s b (or c) halves, a permute each
// output vector; elsewhere value by value.
template <typename T>
C10_ALWAYS_INLINE void store_paired_sums(const Vec<T>* r, T* out_b, T* out_c, int64_t n) {
  constexpr int64_t W = Vec<T>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) {
    // output lane L of the vectors' first (second) half: vector v = L / 2 (8 + L / 2), class
    // L % 2 of the half, in register v % 4, lane 4 (L % 2) + v / 4; the shuffles put r[0] and
    // r[2]'s half at 0..7, r[1] and r[3]'s at 8..15 of the two operands.
    const __m512i lo =
        _mm512_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28, 1, 5, 9, 13, 17, 21, 25, 29);
    const __m512i hi =
        _mm512_setr_epi32(2, 6, 10, 14, 18, 22, 26, 30, 3, 7, 11, 15, 19, 23, 27, 31);
    const __m512 xb = _mm512_shuffle_f32x4(r[0], r[1], 0x44);
    const __m512 yb = _mm512_shuffle_f32x4(r[2], r[3], 0x44);
    const __m512 xc = _mm512_shuffle_f32x4(r[0], r[1], 0xEE);
    const __m512 yc = _mm512_shuffle_f32x4(r[2], r[3], 0xEE);
    const int64_t n0 = std::min<int64_t>(n, W), n1 = n - n0;
    Vec<T>(_mm512_permutex2var_ps(xb, lo, yb)).store(out_b, n0);
    Vec<T>(_mm512_permutex2var_ps(xc, lo, yc)).store(out_c, n0);
    if (n1 > 0) {
      Vec<T>(_mm512_permutex2var_ps(xb, hi, yb)).store(out_b + W, n1);
      Vec<T>(_mm512_permutex2var_ps(xc, hi, yc)).store(out_c + W, n1);
    }
    return;
  }
#endif
  T lanes_of[4][W];
  for (int i = 0; i < 4; ++i) r[i].store(lanes_of[i]);
  for (int64_t k = 0; 2 * k < n; ++k) {
    const int64_t i = k % 4, j = k / 4;
    for (int c = 0; c < 2; ++c) {
      out_b[2 * k + c] = lanes_of[i][W / 4 * c + j];
      out_c[2 * k + c] = lanes_of[i][W / 4 * (c + 2) + j];
    }
  }
}

// The grouped dB and dC terms of two states n = 2k, 2k + 1 at one step, stored by the backward
// as one vector: fold(fold(b_2k, c_2k), fold(b_2k+1, c_2k+1)), whose lanes 4i, 4i + 1, 4i + 2,
// 4i + 3 hold parts of the sums of b_2k, b_2k+1, c_2k and c_2k+1 (a state past N: zero terms).
// out_b / out_c (steps x N) = those sums for the steps x ceil(N / 2) vectors of v, W vectors at a
// time: the folding rounds down to m = 4 leave the class sums of vector i0 + i + 4j in lanes 4c
// + j of r[i], i < 4 (class c = 0, 1, 2, 3: b_2k, b_2k+1, c_2k, c_2k+1), gathered into the
// outputs by four shuffles and four permutes (odd N through a buffer of even rows).
template <typename T>
void paired_lane_sums(const T* v, int64_t steps, int64_t N, T* out_b, T* out_c) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t count = steps * state_pairs(N);
  if (N % 2 != 0) {
    Buffer<T> b(count * 2), c(count * 2);
    paired_lane_sums(v, steps, N + 1, b.data(), c.data());
    for (int64_t t = 0; t < steps; ++t) {
      std::copy(b.begin() + t * (N + 1), b.begin() + t * (N + 1) + N, out_b + t * N);
      std::copy(c.begin() + t * (N + 1), c.begin() + t * (N + 1) + N, out_c + t * N);
    }
    return;
  }
  Vec<T> r[W];
  for (int64_t i0 = 0; i0 < count; i0 += W) {
    folding_rounds<4>(v, count, i0, r);
    const int64_t n = 2 * std::min(W, count - i0);  // values of out_b / out_c from i0 on
    store_paired_sums(r, out_b + 2 * i0, out_c + 2 * i0, n);
  }
}

// Task i: batch row b, group g, block k of the group, channels [d0, d0 + nc).
struct Block {
  int64_t b, g, k, d0, nc;
};

// Everything the kernels read: sizes, flags and raw pointers. S is the storage type of u, delta,
// z and out; T (float, or double for double) that of A, B, C, D, delta_bias, the states and
// every accumulation.
template <typename S, typename T>
struct Scan {
  static constexpr int64_t W = Vec<T>::size();
  int64_t batch, dim, L, N, G, channels_per_group, blocks_per_group, chunk, nchunks;
  // Steps a task gathers, transforms and scatters at once (see kSpanSteps): a multiple of
  // chunk, or all of L.
  int64_t span, nspans;
  // The backward's tasks: supers_per_group runs of consecutive blocks per (batch row, group)
  // (see backward_super), a number that depends on the problem, not on the thread count.
  int64_t supers_per_group;
  bool softplus;
  // Whether out (forward) and grad_u, grad_delta, grad_z (backward) are stored non-temporally
  // (lanes::stream_output: 1 MB and more each).
  bool stream;
  const S* u;
  const S* delta;
  const S* z;  // null without the gate
  const T* A;
  const T* B_fixed;  // (dim, N), null when grouped
  const T* C_fixed;
  const T* B_grouped;  // grouped B (batch, G, N, L), null when fixed
  const T* C_grouped;
  const T* D;           // null without the skip term
  const T* delta_bias;  // null without a bias
  const T* x0;          // (batch, dim, N), null for a zero initial state

  int64_t tasks() const { return batch * G * blocks_per_group; }
  int64_t supers() const { return batch * G * supers_per_group; }
  // Blocks [first, last) of super s.
  std::pair<int64_t, int64_t> super_blocks(int64_t s) const {
    const int64_t bg = s / supers_per_group, j = s % supers_per_group;
    const int64_t per = (blocks_per_group + supers_per_group - 1) / supers_per_group;
    const int64_t k0 = std::min(blocks_per_group, j * per);
    return {bg * blocks_per_group + k0,
            bg * blocks_per_group + std::min(blocks_per_group, k0 + per)};
  }
  // Block blk's checkpoint at chunk ci in ckpt (batch, dim, nchunks * N): the N states as
  // blk.nc lanes each. A block's channels are consecutive rows, so their rows hold (nchunks, N,
  // nc) values, stored and loaded as lanes with no transpose (see forward_task).
  template <typename P>
  P* checkpoint(P* ckpt, const Block& blk, int64_t ci) const {
    return ckpt + ((blk.b * dim + blk.d0) * nchunks + ci * blk.nc) * N;
  }
  // Grouped B (or C) of batch row b, group g, from step t0 on: state n's value at step t0 + t
  // at [n * L + t].
  const T* at_step(const T* M, int64_t b, int64_t g, int64_t t0) const {
    return M + (b * G + g) * N * L + t0;
  }
};

template <typename S, typename T>
Block block_of(const Scan<S, T>& p, int64_t i) {
  Block blk;
  blk.b = i / (p.G * p.blocks_per_group);
  const int64_t rest = i % (p.G * p.blocks_per_group);
  blk.g = rest / p.blocks_per_group;
  blk.k = rest % p.blocks_per_group;
  const int64_t first = blk.k * Scan<S, T>::W;
  blk.d0 = blk.g * p.channels_per_group + first;
  blk.nc = std::min(Scan<S, T>::W, p.channels_per_group - first);
  return blk;
}

// Per-channel constants of a block as lanes: A, B and C when fixed (N x W each), D and
// delta_bias (W each), and A2's extremes over the states (W each, for exp_args_in_range); zero
// in lanes past the block's channels.
template <typename T>
struct Lanes {
  Buffer<T> A, A2, B, C, D, bias, A2_lo, A2_hi;  // A2 = A log2(e): exp(dt A) = 2^(dt A2)
  explicit Lanes(int64_t N)
      : A(N * Vec<T>::size()), A2(N * Vec<T>::size()), B(N * Vec<T>::size()),
        C(N * Vec<T>::size()), D(Vec<T>::size()), bias(Vec<T>::size()),
        A2_lo(Vec<T>::size()), A2_hi(Vec<T>::size()) {}

  template <typename S>
  void load(const Scan<S, T>& p, const Block& blk) {
    constexpr int64_t W = Vec<T>::size();
    auto lanes = [&](Buffer<T>& dst, const T* src, int64_t n_per) {
      std::fill(dst.begin(), dst.end(), T(0));
      if (src == nullptr) return;
      for (int64_t j = 0; j < blk.nc; ++j) {
        for (int64_t n = 0; n < n_per; ++n) dst[n * W + j] = src[(blk.d0 + j) * n_per + n];
      }
    };
    lanes(A, p.A, p.N);
    for (size_t i = 0; i < A.size(); ++i) A2[i] = A[i] * static_cast<T>(1.44269504088896340736);
    Vec<T> lo = Vec<T>::loadu(A2.data()), hi = lo;
    for (int64_t n = 1; n < p.N; ++n) {
      lo = at::vec::minimum(lo, Vec<T>::loadu(A2.data() + n * W));
      hi = at::vec::maximum(hi, Vec<T>::loadu(A2.data() + n * W));
    }
    lo.store(A2_lo.data());
    hi.store(A2_hi.data());
    lanes(B, p.B_fixed, p.N);
    lanes(C, p.C_fixed, p.N);
    lanes(D, p.D, 1);
    lanes(bias, p.delta_bias, 1);
  }
};

// Per-span lanes (span x W each) of one block: u, v = delta + bias (in the backward with
// softplus: softplus'(v)), dt, du = dt u, y, z and the gradients.
template <typename T>
struct StepLanes {
  Buffer<T> u, v, dt, du, y, z, g, gu, gdt;
  explicit StepLanes(int64_t span)
      : u(span * Vec<T>::size()), v(span * Vec<T>::size()), dt(span * Vec<T>::size()),
        du(span * Vec<T>::size()), y(span * Vec<T>::size()), z(span * Vec<T>::size()),
        g(span * Vec<T>::size()), gu(span * Vec<T>::size()), gdt(span * Vec<T>::size()) {}
};

// Loads u, delta (and z) of a block's span (len steps from t0) and forms dt and du; for the
// backward (kGrad) also d dt / d v in s.v when dt = softplus(v).
template <bool kGrad, typename S, typename T>
void discretise(const Scan<S, T>& p, const Block& blk, const Lanes<T>& c, int64_t t0,
                int64_t len, StepLanes<T>& s) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t off = (blk.b * p.dim + blk.d0) * p.L + t0;
  gather_lanes(s.u.data(), p.u + off, p.L, blk.nc, len);
  gather_lanes(s.v.data(), p.delta + off, p.L, blk.nc, len);
  if (p.z != nullptr) gather_lanes(s.z.data(), p.z + off, p.L, blk.nc, len);
  const V bias = V::loadu(c.bias.data());
  for (int64_t t = 0; t < len; ++t) {
    const V v = V::loadu(&s.v[t * W]) + bias;
    V dt = v;
    if (p.softplus && kGrad) {
      V derivative;
      dt = fast_softplus(v, &derivative);
      derivative.store(&s.v[t * W]);
    } else if (p.softplus) {
      dt = fast_softplus(v);
    }
    dt.store(&s.dt[t * W]);
    (dt * V::loadu(&s.u[t * W])).store(&s.du[t * W]);
  }
}

// The recurrence over len steps of a block (a span in the forward, a chunk in the backward's
// recomputation): x (N x W) is the state before them and after them; y_t = C_t . x_t goes to y
// (len x W). B and C are (N x W) lanes when fixed, else scalars
// shared by the lanes, state n's at step t at [n * ld + t] (grouped B / C in their own layout).
//
// States NB at a time, steps inside: the NB states and their A2 = A log2(e) stay in registers
// across the chunk, y_t is read and written once per NB states, and the NB independent exp /
// multiply-add chains keep the FMA pipes busy. A is passed as A2. With kY, C_t . x_t of the NB
// states is added to y, or stored there by the first states (n0 = 0). With kSave (the
// backward's recomputation) the states are also kept in xs ((len + 1) x NB x W: the NB states
// before each step, then after the last) and exp(dt A) in as (len x NB x W). kInRange: every
// dt_t A2 lies in [-126, 127] (exp_args_in_range), and the exp skips its clamp. With ck (the
// forward's checkpoints), the NB states before steps 0, every, 2 every, ... are also stored at
// ck + k * ck_ld (state n at n * W).
// Software-pipelined by one step: step t's update uses exp(dt_t A) formed during step t - 1 (an),
// while exp(dt_{t+1} A) is formed for the next (at the last step again exp(dt_t A), unused). An
// exp is a chain of a dozen dependent operations; formed in the step whose update it feeds, that
// update's operations waited behind it in the core's scheduler, whose entries bound how many
// steps overlap. The forward and backward ops ran a few percent faster so on the AMD EPYC Zen 2
// (alternating processes against the build before); two steps ahead spilled registers on AVX2.
template <typename T, bool kBvar, bool kCvar, bool kY, bool kSave, bool kInRange, int NB>
void scan_states(int64_t len, int64_t ld, int64_t n0, T* x, const T* A, const T* B, const T* C,
                 const T* dt, const T* du, T* y, T* xs, T* as, T* ck = nullptr,
                 int64_t every = 0, int64_t ck_ld = 0) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V xr[NB], Ar[NB], an[NB];
  RNNKERNELS_UNROLL
  for (int j = 0; j < NB; ++j) {
    xr[j] = V::loadu(x + (n0 + j) * W);
    Ar[j] = V::loadu(A + (n0 + j) * W);
    if constexpr (kSave) xr[j].store(xs + j * W);
  }
  if (len > 0) {
    const V dt0 = V::loadu(dt);
    RNNKERNELS_UNROLL
    for (int j = 0; j < NB; ++j) an[j] = fast_exp2_product<T, kInRange>(dt0, Ar[j]);
  }
  const int64_t run = ck != nullptr ? every : len;
  for (int64_t t1 = 0; t1 < len; t1 += run) {
    if (ck != nullptr) {
      RNNKERNELS_UNROLL
      for (int j = 0; j < NB; ++j) xr[j].store(ck + t1 / run * ck_ld + (n0 + j) * W);
    }
    for (int64_t t = t1; t < std::min(len, t1 + run); ++t) {
      const V dtn = V::loadu(dt + std::min(t + 1, len - 1) * W), duv = V::loadu(du + t * W);
      V yv = kY && n0 > 0 ? V::loadu(y + t * W) : V(T(0));
      RNNKERNELS_UNROLL
      for (int j = 0; j < NB; ++j) {
        const int64_t n = n0 + j;
        const V a = an[j];
        an[j] = fast_exp2_product<T, kInRange>(dtn, Ar[j]);
        if constexpr (kSave) a.store(as + (t * NB + j) * W);
        const V Bn = kBvar ? V(B[n * ld + t]) : V::loadu(B + n * W);
        xr[j] = at::vec::fmadd(a, xr[j], duv * Bn);
        if constexpr (kSave) xr[j].store(xs + ((t + 1) * NB + j) * W);
        if constexpr (kY) {
          yv = at::vec::fmadd(xr[j], kCvar ? V(C[n * ld + t]) : V::loadu(C + n * W), yv);
        }
      }
      if constexpr (kY) yv.store(y + t * W);
    }
  }
  RNNKERNELS_UNROLL
  for (int j = 0; j < NB; ++j) xr[j].store(x + (n0 + j) * W);
}

template <typename T, bool kBvar, bool kCvar, bool kInRange>
void forward_steps(int64_t len, int64_t N, int64_t ld, T* x, const T* A, const T* B, const T* C,
                   const T* dt, const T* du, T* y, T* ck, int64_t every) {
  // States a pass: 4 keep AVX-512's pipes busy; on AVX2 their states and A2 spilled from the
  // 16 registers, and 2 measured a few percent faster there (an in-process A/B of the forward).
  constexpr int kNB = lanes::kVectorRegisters >= 32 ? 4 : 2;
  const int64_t NW = N * Vec<T>::size();
  int64_t n0 = 0;
  for (; n0 + kNB <= N; n0 += kNB) {
    scan_states<T, kBvar, kCvar, true, false, kInRange, kNB>(len, ld, n0, x, A, B, C, dt, du, y,
                                                             nullptr, nullptr, ck, every, NW);
  }
  for (; n0 < N; ++n0) {
    scan_states<T, kBvar, kCvar, true, false, kInRange, 1>(len, ld, n0, x, A, B, C, dt, du, y,
                                                           nullptr, nullptr, ck, every, NW);
  }
}

// l * r added to its sum in buf, at vector index `step` (grouped B or C: a per-step term, stored
// there by a super's first block, kFirst) or `state` (fixed: a sum over L).
template <bool kGrouped, bool kFirst, typename T>
C10_ALWAYS_INLINE void add_term(T* buf, int64_t step, int64_t state, Vec<T> l, Vec<T> r) {
  T* at = buf + (kGrouped ? step : state) * Vec<T>::size();
  if constexpr (kGrouped && kFirst) {
    (l * r).store(at);
  } else {
    at::vec::fmadd(l, r, Vec<T>::loadu(at)).store(at);
  }
}

// The backward of NB states of a block over one chunk, in two passes that keep everything they
// touch per step in the core's caches (L1, and L2 for long chunks) or in registers:
// - the recomputation of the NB states from the chunk's start x (N x W; left holding the
//   chunk's end) by scan_states with kSave, into xs and as (exp(dt A) stored and read back:
//   measured faster than forming it again in the reverse pass), with kY also y = C_t . x_t;
// - the reverse recurrence, with the NB states' dL/dx, dA and state in registers: h (N x W)
//   holds dL/dx after the chunk on entry and before it on exit; g: dL/dy per step (len x W).
//   Sums over the chunk are added to dA (N x W) and, when fixed, to dB / dC (N x W); when
//   grouped, each step's per-lane terms are added to dB / dC (len x N x W), or stored there
//   with kFirst (the first block of a super: no buffer to clear beforehand); when both are
//   grouped, a pair of states' four terms as one vector in dB (len x ceil(N / 2) x W, see
//   paired_lane_sums; with NB = 1 the pair's second state is zero). Grouped B / C are read as
//   in scan_states. Per step, sum_n h B and sum_n h A a x_prev of the states are added to s1 /
//   s2 (len x W), or stored there by the first states.
// A few states at a time (kStates) measured faster than the whole state at every step (the
// earlier design: its states and per-state sums, 66 KB per block and chunk, were read back from
// L2). With AVX-512's 32 registers four states a pass ran faster than two on an Intel Xeon
// (the backward op in alternating builds, at chunks 32 to 256); with AVX2's 16, two ran faster
// than four or eight (whose registers spill), and on an AMD EPYC Zen 2 faster than one state a
// reverse pass over the two recomputed ones and as fast as four recomputed states with two a
// reverse pass.
template <typename T, bool kBvar, bool kCvar, bool kY, bool kFirst, bool kInRange, int NB>
void backward_states(int64_t len, int64_t N, int64_t ld, int64_t n0, T* x, T* h, const T* A,
                     const T* A2, const T* B, const T* C, const T* dt, const T* du, const T* g,
                     T* y, T* xs, T* as, T* dA, T* dB, T* dC, T* s1, T* s2) {
  scan_states<T, kBvar, kCvar, kY, true, kInRange, NB>(len, ld, n0, x, A2, B, C, dt, du, y, xs,
                                                      as);
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  V hr[NB], dAr[NB], Ad[NB], xr[NB];
  RNNKERNELS_UNROLL
  for (int j = 0; j < NB; ++j) {
    const int64_t n = n0 + j;
    hr[j] = V::loadu(h + n * W);
    dAr[j] = V::loadu(dA + n * W);
    Ad[j] = V::loadu(A + n * W);  // in registers: the stores below may alias A for GCC
    xr[j] = V::loadu(xs + (len * NB + j) * W);
  }
  // The first states store the per-step sums s1 / s2, the others add to them: two loops.
  const int64_t pairs = state_pairs(N);
  auto reverse = [&](auto add_sums) {
    for (int64_t t = len - 1; t >= 0; --t) {
      V fp;  // the folded terms of the pair's first state
      const V gv = V::loadu(g + t * W), dtv = V::loadu(dt + t * W), duv = V::loadu(du + t * W);
      V s1v = add_sums ? V::loadu(s1 + t * W) : V(T(0));
      V s2v = add_sums ? V::loadu(s2 + t * W) : V(T(0));
      RNNKERNELS_UNROLL
      for (int j = 0; j < NB; ++j) {
        const int64_t n = n0 + j;
        const V Bn = kBvar ? V(B[n * ld + t]) : V::loadu(B + n * W);
        const V Cn = kCvar ? V(C[n * ld + t]) : V::loadu(C + n * W);
        const V xp = V::loadu(xs + (t * NB + j) * W), xt = xr[j];
        const V a = V::loadu(as + (t * NB + j) * W);
        const V hn = at::vec::fmadd(gv, Cn, hr[j]);
        if constexpr (kBvar && kCvar) {  // both grouped: two states a vector
          const V f = fold(hn * duv, gv * xt);
          if (j % 2 == 0 && j + 1 < NB) {
            fp = f;
          } else {
            const V ff = j % 2 == 0 ? fold(f, V(T(0))) : fold(fp, f);
            T* at = dB + (t * pairs + n / 2) * W;
            (kFirst ? ff : ff + V::loadu(at)).store(at);
          }
        } else {
          add_term<kCvar, kFirst>(dC, t * N + n, n, gv, xt);
          add_term<kBvar, kFirst>(dB, t * N + n, n, hn, duv);
        }
#if defined(CPU_CAPABILITY_AVX512)
        // Grouped B's scalar as the fma's broadcast memory operand: GCC otherwise loads it and
        // broadcasts it in a register for two states of four, a shuffle-port operation each in
        // a loop bound by the FMA and shuffle ports (the backward op a little faster so, in
        // alternating processes against the build before).
        if constexpr (kBvar && std::is_same_v<T, float>) {
          __m512 acc = s1v;
          asm("vfmadd231ps %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(__m512(hn)), "m"(B[n * ld + t]));
          s1v = acc;
        } else {
          s1v = at::vec::fmadd(hn, Bn, s1v);
        }
#else
        s1v = at::vec::fmadd(hn, Bn, s1v);
#endif
        hr[j] = a * hn;
        const V q = hr[j] * xp;
        s2v = at::vec::fmadd(q, Ad[j], s2v);
        dAr[j] = at::vec::fmadd(q, dtv, dAr[j]);
        xr[j] = xp;
      }
      s1v.store(s1 + t * W);
      s2v.store(s2 + t * W);
    }
  };
  if (n0 > 0) {
    reverse(std::true_type{});
  } else {
    reverse(std::false_type{});
  }
  RNNKERNELS_UNROLL
  for (int j = 0; j < NB; ++j) {
    hr[j].store(h + (n0 + j) * W);
    dAr[j].store(dA + (n0 + j) * W);
  }
}

// Whether fast_exp2_product<T> clamps its argument (AVX2, float): only there does scan_states'
// kInRange change the code, so only there is the range checked and the variant without the
// clamp built.
template <typename T>
constexpr bool kExpClamps =
#if defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<T, float>;
#else
    false;
#endif

// Whether every dt_t A2_n of a block's chunk (dt: len x W, A2 = A log2(e)) lies in [-126, 127],
// where exp(dt A) needs no clamp (scan_states' kInRange): per lane, the products of dt's extremes
// over the chunk and A2's over the states (a2_lo, a2_hi: W each, from Lanes) bound them. Mamba's
// steps (softplus, about 1e-3 to 1e-1) and A (-1 to -16, scaled) give products of a few units; a
// chunk with a larger one, an infinite step or a NaN (whose products compare false) takes the
// clamp. About len vector operations against the chunk's len x N exps. Without the clamp (2 of an
// AVX2 exp's 13 operations) the forward at batch 2, dim 256, L 512, N 16 took 1.09-1.11 ms on the
// AMD EPYC Zen 2, against 1.19-1.21 with it (the two builds timed in alternating processes), and
// the training step about 4% less.
template <typename T>
bool exp_args_in_range(const T* dt, int64_t len, const T* a2_lo, const T* a2_hi) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const V inf(std::numeric_limits<T>::infinity());
  V dmin = inf, dmax = -inf;
  for (int64_t t = 0; t < len; ++t) {
    const V d = V::loadu(dt + t * W);
    dmin = at::vec::minimum(dmin, d);
    dmax = at::vec::maximum(dmax, d);
  }
  const V amin = V::loadu(a2_lo), amax = V::loadu(a2_hi);
  const V p0 = dmin * amin, p1 = dmin * amax, p2 = dmax * amin, p3 = dmax * amax;
  const V lo = at::vec::minimum(at::vec::minimum(p0, p1), at::vec::minimum(p2, p3));
  const V hi = at::vec::maximum(at::vec::maximum(p0, p1), at::vec::maximum(p2, p3));
  // comparisons give all-ones lanes where true, zero where false (NaN included)
  return ((lo >= V(T(-126))) & (hi <= V(T(127)))).zero_mask() == 0;
}

// f(std::true_type) where kExpClamps<T> and the chunk's exp arguments are in range, else
// f(std::false_type) (the variant without the clamp is built only where it differs).
template <typename T, typename F>
void with_exp_range(const T* dt, int64_t len, const Lanes<T>& c, const F& f) {
  if constexpr (kExpClamps<T>) {
    if (exp_args_in_range(dt, len, c.A2_lo.data(), c.A2_hi.data())) {
      f(std::true_type{});
      return;
    }
  }
  f(std::false_type{});
}

// ------------------------------------------------------------------------------ forward

// Buffers of one thread's forward tasks, allocated once per parallel region (a task needs
// about 16, and 64-byte aligned allocation is slower than malloc's usual path).
template <typename T>
struct ForwardWork {
  Lanes<T> c;
  StepLanes<T> s;
  Buffer<T> x, ck;  // ck: the state at each chunk start of a span (chunks x N x W)
  ForwardWork(int64_t span, int64_t chunk, int64_t N)
      : c(N), s(span), x(N * Vec<T>::size()),
        ck((span + chunk - 1) / chunk * N * Vec<T>::size()) {}
};

// The state x (N x W lanes, lane j = channel j) into the (channel, N) rows at dst, for channels
// j < nc: by tile transposes when N fills whole tiles' rows (N >= W), else value by value (a
// tile transpose of a few states costs more).
template <typename T>
void store_state(T* dst, const T* x, int64_t N, int64_t nc) {
  constexpr int64_t W = Vec<T>::size();
  if (N >= W) {
    scatter_lanes(dst, N, x, nc, N);
    return;
  }
  for (int64_t j = 0; j < nc; ++j) {
    for (int64_t n = 0; n < N; ++n) dst[j * N + n] = x[n * W + j];
  }
}

// The inverse: nc channels' (channel, N) rows at src into x (N x W lanes), lanes past nc zero.
template <typename T>
void load_state(T* x, const T* src, int64_t N, int64_t nc) {
  gather_lanes(x, src, N, nc, N);
}

template <typename S, typename T, bool kBvar, bool kCvar>
void forward_task(const Scan<S, T>& p, const Block& blk, S* out, T* last, T* ckpt,
                  ForwardWork<T>& w) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t N = p.N;
  Lanes<T>& c = w.c;
  c.load(p, blk);
  StepLanes<T>& s = w.s;
  Buffer<T>& x = w.x;
  const int64_t row = blk.b * p.dim + blk.d0;
  if (p.x0 != nullptr) {
    load_state(x.data(), p.x0 + row * N, N, blk.nc);
  } else {
    std::fill(x.begin(), x.end(), T(0));
  }
  // The checkpoints (Scan::checkpoint): a whole block's stored straight from the scan's
  // registers, a partial one's through w.ck.
  const bool whole = blk.nc == W;
  for (int64_t si = 0; si < p.nspans; ++si) {
    const int64_t s0 = si * p.span, slen = std::min(p.span, p.L - s0);
    discretise<false>(p, blk, c, s0, slen, s);
    const T* B = kBvar ? p.at_step(p.B_grouped, blk.b, blk.g, s0) : c.B.data();
    const T* C = kCvar ? p.at_step(p.C_grouped, blk.b, blk.g, s0) : c.C.data();
    const int64_t c0 = s0 / p.chunk;  // the span's first chunk
    T* ck = ckpt == nullptr ? nullptr : whole ? p.checkpoint(ckpt, blk, c0) : w.ck.data();
    with_exp_range(s.dt.data(), slen, c, [&](auto in_range) {
      forward_steps<T, kBvar, kCvar, decltype(in_range)::value>(
          slen, N, p.L, x.data(), c.A2.data(), B, C, s.dt.data(), s.du.data(), s.y.data(), ck,
          p.chunk);
    });
    if (ckpt != nullptr && !whole) {
      T* dst = p.checkpoint(ckpt, blk, c0);
      const int64_t values = (slen + p.chunk - 1) / p.chunk * N;
      for (int64_t k = 0; k < values; ++k) {
        V::loadu(w.ck.data() + k * W).store(dst + k * blk.nc, blk.nc);
      }
    }
    const V Dv = V::loadu(c.D.data());
    for (int64_t t = 0; t < slen; ++t) {
      V y = at::vec::fmadd(Dv, V::loadu(&s.u[t * W]), V::loadu(&s.y[t * W]));
      if (p.z != nullptr) {
        const V z = V::loadu(&s.z[t * W]);
        y = y * z * fast_sigmoid<T>(z);
      }
      y.store(&s.y[t * W]);
    }
    scatter_lanes(out + row * p.L + s0, p.L, s.y.data(), blk.nc, slen, p.stream);
  }
  store_state(last + row * N, x.data(), N, blk.nc);
  if (p.stream) lanes::stream_fence();
}

// ------------------------------------------------------------------------------ backward

// Per-task buffers that live across chunks (each task i owns slice i): dL/dx at the current
// chunk boundary and the sums over L, all as lanes.
template <typename T>
struct Carried {
  T* h;      // (tasks, N, W)
  T* dA;     // (tasks, N, W)
  T* dB;     // (tasks, N, W), fixed B only
  T* dC;     // (tasks, N, W), fixed C only
  T* dD;     // (tasks, W)
  T* dbias;  // (tasks, W)
};

template <typename S, typename T>
struct Grads {
  const S* grad_out;
  const T* ckpt;
  Carried<T> carried;
  T* dB_part;  // (supers, L, N): the super's sums over its channels, grouped B only
  T* dC_part;
  S* grad_u;
  S* grad_delta;
  S* grad_z;  // null without z
};

// States backward_states takes at once (see there).
constexpr int kStates = lanes::kVectorRegisters >= 32 ? 4 : 2;

// Buffers of one thread's backward tasks over one span (xs and as: over one chunk; dB holds the
// paired dB / dC terms when B and C are both grouped, and dC is then empty), and the constants
// of a super's blocks (c, loaded once per super, not once per block and span).
template <typename T>
struct BackwardWork {
  std::vector<Lanes<T>> c;
  StepLanes<T> s;
  Buffer<T> x, xs, as, s1, s2, dB, dC;
  BackwardWork(int64_t span, int64_t chunk, int64_t N, int64_t blocks_per_super, bool B_var,
               bool C_var)
      : c(blocks_per_super, Lanes<T>(N)), s(span), x(N * Vec<T>::size()),
        xs((chunk + 1) * kStates * Vec<T>::size()),
        as(chunk * kStates * Vec<T>::size()),
        s1(span * Vec<T>::size()), s2(span * Vec<T>::size()),
        dB(B_var ? span * (C_var ? state_pairs(N) : N) * Vec<T>::size() : 0),
        dC(C_var && !B_var ? span * N * Vec<T>::size() : 0) {}
};

// first: the super's first block, whose grouped dB / dC terms are stored into w, not added.
template <typename S, typename T, bool kBvar, bool kCvar>
void backward_task(const Scan<S, T>& p, const Grads<S, T>& gr, int64_t i, int64_t si, bool first,
                   const Lanes<T>& c, BackwardWork<T>& w) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const Block blk = block_of(p, i);
  const int64_t N = p.N, NW = N * W;
  const int64_t s0 = si * p.span, len = std::min(p.span, p.L - s0);
  const int64_t row = blk.b * p.dim + blk.d0, off = row * p.L + s0;
  StepLanes<T>& s = w.s;
  discretise<true>(p, blk, c, s0, len, s);

  // Through the gate and the skip term: g becomes dL/dy; gdt (as scratch) the factor of
  // dL/dz that multiplies y + D u, which the recomputation gives.
  gather_lanes(s.g.data(), gr.grad_out + off, p.L, blk.nc, len);
  const V Dv = V::loadu(c.D.data());
  V dD = V::loadu(gr.carried.dD + i * W);
  for (int64_t t = 0; t < len; ++t) {
    V g = V::loadu(&s.g[t * W]);
    if (p.z != nullptr) {
      const V z = V::loadu(&s.z[t * W]), sg = fast_sigmoid<T>(z);
      (g * sg * (V(T(1)) + z * (V(T(1)) - sg))).store(&s.gdt[t * W]);
      g = g * z * sg;
      g.store(&s.g[t * W]);
    }
    dD = at::vec::fmadd(g, V::loadu(&s.u[t * W]), dD);
  }
  dD.store(gr.carried.dD + i * W);

  // Per chunk of the span, last first: the state at its start from its checkpoint (see
  // forward_task; lanes past the block zero), then the states' recomputation and reverse pass
  // over its n steps (at t0 of the span's lanes), whose buffers stay in L1. Grouped: per-lane
  // terms of the span, added to the super's (backward_super); fixed: sums over L.
  auto run_states = [&](int64_t t0, int64_t n, auto keep_y, auto store_first, auto in_range) {
    constexpr bool kY = decltype(keep_y)::value, kFirst = decltype(store_first)::value;
    constexpr bool kInRange = decltype(in_range)::value;
    const T* B = kBvar ? p.at_step(p.B_grouped, blk.b, blk.g, s0 + t0) : c.B.data();
    const T* C = kCvar ? p.at_step(p.C_grouped, blk.b, blk.g, s0 + t0) : c.C.data();
    T* dB = kBvar ? w.dB.data() + t0 * (kCvar ? state_pairs(N) : N) * W : gr.carried.dB + i * NW;
    T* dC = kCvar ? w.dC.data() + t0 * NW : gr.carried.dC + i * NW;
    const int64_t at = t0 * W;
    auto pass = [&](int64_t n0, auto states) {
      backward_states<T, kBvar, kCvar, kY, kFirst, kInRange, decltype(states)::value>(
          n, N, p.L, n0, w.x.data(), gr.carried.h + i * NW, c.A.data(), c.A2.data(), B, C,
          s.dt.data() + at, s.du.data() + at, s.g.data() + at, s.y.data() + at, w.xs.data(),
          w.as.data(), gr.carried.dA + i * NW, dB, dC, w.s1.data() + at, w.s2.data() + at);
    };
    int64_t n0 = 0;
    for (; n0 + kStates <= N; n0 += kStates) pass(n0, std::integral_constant<int, kStates>{});
    for (; n0 + 2 <= N; n0 += 2) pass(n0, std::integral_constant<int, 2>{});
    if (n0 < N) pass(n0, std::integral_constant<int, 1>{});
  };
  // The store mode only where grouped terms exist (fixed B and C are always added up).
  auto states = [&](auto keep_y) {
    for (int64_t t0 = (len - 1) / p.chunk * p.chunk; t0 >= 0; t0 -= p.chunk) {
      const int64_t n = std::min(p.chunk, len - t0);
      const T* ck = p.checkpoint(gr.ckpt, blk, (s0 + t0) / p.chunk);
      for (int64_t k = 0; k < N; ++k) V::loadu(ck + k * blk.nc, blk.nc).store(w.x.data() + k * W);
      with_exp_range(s.dt.data() + t0 * W, n, c, [&](auto in_range) {
        if constexpr (kBvar || kCvar) {
          if (first) {
            run_states(t0, n, keep_y, std::true_type{}, in_range);
            return;
          }
        }
        run_states(t0, n, keep_y, std::false_type{}, in_range);
      });
    }
  };
  if (p.z != nullptr) {
    states(std::true_type{});
    for (int64_t t = 0; t < len; ++t) {
      const V pre = at::vec::fmadd(Dv, V::loadu(&s.u[t * W]), V::loadu(&s.y[t * W]));
      (V::loadu(&s.gdt[t * W]) * pre).store(&s.gdt[t * W]);
    }
    scatter_lanes(gr.grad_z + off, p.L, s.gdt.data(), blk.nc, len, p.stream);
  } else {
    states(std::false_type{});
  }

  V dbias = V::loadu(gr.carried.dbias + i * W);
  for (int64_t t = 0; t < len; ++t) {
    const V s1 = V::loadu(&w.s1[t * W]), dt = V::loadu(&s.dt[t * W]);
    at::vec::fmadd(V::loadu(&s.g[t * W]), Dv, dt * s1).store(&s.gu[t * W]);
    V gdt = at::vec::fmadd(V::loadu(&s.u[t * W]), s1, V::loadu(&w.s2[t * W]));
    if (p.softplus) gdt = gdt * V::loadu(&s.v[t * W]);  // softplus'(v), from discretise
    dbias = dbias + gdt;
    gdt.store(&s.gdt[t * W]);
  }
  dbias.store(gr.carried.dbias + i * W);
  scatter_lanes(gr.grad_u + off, p.L, s.gu.data(), blk.nc, len, p.stream);
  scatter_lanes(gr.grad_delta + off, p.L, s.gdt.data(), blk.nc, len, p.stream);
}

// The backward of super s: the spans in reverse, per span its blocks one after another, their
// per-lane terms of grouped dB / dC stored (first block) or added (the others) in w, then summed
// over the lanes once (a 16 x 16 transpose-and-add per 16 values, as costly as a block's own
// step work when done per block) into the super's (L, N) partials. Measured against this in
// paired runs and dropped: the lanes summed per step into the partials (slower); the reverse
// passes of up to 4 blocks of a super run together, their dB / dC terms added in registers and
// stored once (no faster); one channel at a time with the N states in the lanes, every buffer in
// L1 but three horizontal sums per channel and step (slower); chunks of 32 or 48 steps (slower;
// measured with the earlier all-states reverse pass).
template <typename S, typename T, bool kBvar, bool kCvar>
void backward_super(const Scan<S, T>& p, const Grads<S, T>& gr, int64_t s, BackwardWork<T>& w) {
  const auto [first, last] = p.super_blocks(s);
  if (first == last) {  // a super past its group's blocks (blocks do not divide evenly)
    const int64_t n = p.L * p.N;
    if constexpr (kBvar) std::fill(gr.dB_part + s * n, gr.dB_part + (s + 1) * n, T(0));
    if constexpr (kCvar) std::fill(gr.dC_part + s * n, gr.dC_part + (s + 1) * n, T(0));
    return;
  }
  for (int64_t i = first; i < last; ++i) w.c[i - first].load(p, block_of(p, i));
  for (int64_t si = p.nspans - 1; si >= 0; --si) {
    const int64_t s0 = si * p.span, len = std::min(p.span, p.L - s0);
    for (int64_t i = first; i < last; ++i) {
      backward_task<S, T, kBvar, kCvar>(p, gr, i, si, i == first, w.c[i - first], w);
    }
    const int64_t at = (s * p.L + s0) * p.N;
    if constexpr (kBvar && kCvar) {
      paired_lane_sums(w.dB.data(), len, p.N, gr.dB_part + at, gr.dC_part + at);
    } else if constexpr (kBvar) {
      lane_sums(w.dB.data(), len * p.N, gr.dB_part + at);
    } else if constexpr (kCvar) {
      lane_sums(w.dC.data(), len * p.N, gr.dC_part + at);
    }
  }
  if (p.stream) lanes::stream_fence();
}

// Steps [t0, t1) of grad (batch, G, N, L) of (batch row, group) pair i: the sums (L, N) of its
// supers added super after super, then written transposed. The backward splits each pair's
// steps into a few such pieces, reduced by whichever threads are free (see
// selective_scan_bwd_cpu), so that no thread reduces a whole pair while the others wait.
template <typename S, typename T>
void reduce_steps(const Scan<S, T>& p, const T* part, S* grad, int64_t i, int64_t t0,
                  int64_t t1) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t block = p.L * p.N, rows = t1 - t0, n = rows * p.N;
  Buffer<T> acc(n);
  const T* src = part + i * p.supers_per_group * block + t0 * p.N;
  std::copy(src, src + n, acc.begin());
  for (int64_t k = 1; k < p.supers_per_group; ++k) {
    at::vec::map2([](V a, V b) { return a + b; }, acc.data(), acc.data(), src + k * block, n);
  }
  S* dst = grad + i * p.N * p.L + t0;
  if constexpr (std::is_same_v<S, T>) {
    for (int64_t r0 = 0; r0 < rows; r0 += W) {
      lanes::gather_lanes(dst + r0, acc.data() + r0 * p.N, p.N, std::min(W, rows - r0), p.N,
                          p.L);
    }
  } else {
    for (int64_t m = 0; m < p.N; ++m) {
      for (int64_t t = 0; t < rows; ++t) dst[m * p.L + t] = static_cast<S>(acc[t * p.N + m]);
    }
  }
}

// out (dim, cols) (or (dim,) when cols is 0) = sum over batch of per-lane sums (tasks, cols, W):
// per block of a batch row, its lanes added batch row after batch row, then transposed into
// the block's rows of out.
template <typename S, typename T>
void sum_over_batch(const Scan<S, T>& p, const T* src, int64_t cols, T* dst) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  const int64_t n_cols = std::max<int64_t>(cols, 1), size = n_cols * W;
  const int64_t per_row = p.G * p.blocks_per_group;  // the tasks of one batch row
  Buffer<T> acc(size);
  for (int64_t i = 0; i < per_row; ++i) {
    std::copy(src + i * size, src + (i + 1) * size, acc.begin());
    for (int64_t b = 1; b < p.batch; ++b) {
      at::vec::map2([](V a, V c) { return a + c; }, acc.data(), acc.data(),
                    src + (b * per_row + i) * size, size);
    }
    const Block blk = block_of(p, i);
    for (int64_t n0 = 0; n0 < n_cols; n0 += W) {
      gather_lanes(dst + blk.d0 * n_cols + n0, acc.data() + n0 * W, W,
                   std::min(W, n_cols - n0), blk.nc, n_cols);
    }
  }
}

// ------------------------------------------------------------------------------ bindings

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
  // Variable B / C: (batch, G, N, L), or (batch, N, L) for one group.
  in.B_var = B.dim() >= 3;
  in.C_var = C.dim() >= 3;
  auto groups = [](const Tensor& M) { return M.dim() == 4 ? M.size(1) : 1; };
  in.G = in.B_var ? groups(B) : (in.C_var ? groups(C) : 1);
  TORCH_CHECK(in.G > 0 && in.dim % in.G == 0, "rnnkernels: selective_scan: bad group count");
  in.u = u.contiguous();
  in.delta = contiguous_as(delta, st, "delta");
  TORCH_CHECK(delta.sizes() == u.sizes(), "rnnkernels: selective_scan: delta must match u");
  in.A = contiguous_as(A, at_, "A");
  TORCH_CHECK(A.size(0) == in.dim, "rnnkernels: selective_scan: A must be (dim, N)");
  in.B = contiguous_as(B, in.B_var ? st : at_, "B");
  in.C = contiguous_as(C, in.C_var ? st : at_, "C");
  auto expected = [&](const Tensor& M) {
    if (M.dim() == 4) return std::vector<int64_t>{in.batch, in.G, in.N, in.L};
    if (M.dim() == 3 && in.G == 1) return std::vector<int64_t>{in.batch, in.N, in.L};
    return std::vector<int64_t>{in.dim, in.N};
  };
  TORCH_CHECK(B.sizes() == at::IntArrayRef(expected(B)),
              "rnnkernels: selective_scan: B must be (dim, N), (batch, N, L) or (batch, G, N, L)");
  TORCH_CHECK(C.sizes() == at::IntArrayRef(expected(C)),
              "rnnkernels: selective_scan: C must be (dim, N), (batch, N, L) or (batch, G, N, L)");
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

// Grouped B or C (batch, G, N, L) in the accumulation type (no copy for float input).
Tensor grouped_acc(const Tensor& M, at::ScalarType acc) {
  return M.to(acc).contiguous();
}

template <typename S, typename T>
Scan<S, T> make_scan(const Inputs& in, const Tensor& B_grouped, const Tensor& C_grouped,
                     bool softplus, int64_t chunk_size) {
  auto ptr = [](const Tensor& t, bool use) { return use && t.defined() ? t.data_ptr() : nullptr; };
  Scan<S, T> p;
  p.batch = in.batch;
  p.dim = in.dim;
  p.L = in.L;
  p.N = in.N;
  p.G = in.G;
  p.channels_per_group = in.dim / in.G;
  p.blocks_per_group = (p.channels_per_group + Scan<S, T>::W - 1) / Scan<S, T>::W;
  p.supers_per_group = std::clamp<int64_t>((kMinSupers + p.batch * p.G - 1) / (p.batch * p.G), 1,
                                           p.blocks_per_group);
  p.chunk = std::min(chunk_size, std::max<int64_t>(in.L, 1));
  p.nchunks = (in.L + chunk_size - 1) / chunk_size;
  p.span = std::min(std::max<int64_t>(1, kSpanSteps / p.chunk) * p.chunk,
                    std::max<int64_t>(in.L, 1));
  p.nspans = (in.L + p.span - 1) / p.span;
  p.softplus = softplus;
  p.stream = lanes::stream_output(in.batch * in.dim * in.L * static_cast<int64_t>(sizeof(S)));
  p.u = static_cast<const S*>(ptr(in.u, true));
  p.delta = static_cast<const S*>(ptr(in.delta, true));
  p.z = static_cast<const S*>(ptr(in.z, true));
  p.A = static_cast<const T*>(ptr(in.A, true));
  p.B_fixed = static_cast<const T*>(ptr(in.B, !in.B_var));
  p.C_fixed = static_cast<const T*>(ptr(in.C, !in.C_var));
  p.B_grouped = static_cast<const T*>(ptr(B_grouped, in.B_var));
  p.C_grouped = static_cast<const T*>(ptr(C_grouped, in.C_var));
  p.D = static_cast<const T*>(ptr(in.D, true));
  p.delta_bias = static_cast<const T*>(ptr(in.delta_bias, true));
  p.x0 = static_cast<const T*>(ptr(in.x0, true));
  return p;
}

// Calls f(b_var, c_var) with std::true_type / std::false_type for grouped / fixed B and C, so
// that the kernels are instantiated per form.
template <typename F>
void with_forms(bool B_var, bool C_var, const F& f) {
  if (B_var && C_var) {
    f(std::true_type{}, std::true_type{});
  } else if (B_var) {
    f(std::true_type{}, std::false_type{});
  } else if (C_var) {
    f(std::false_type{}, std::true_type{});
  } else {
    f(std::false_type{}, std::false_type{});
  }
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cpu(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const std::optional<Tensor>& D, const std::optional<Tensor>& z,
    const std::optional<Tensor>& delta_bias, bool delta_softplus,
    const std::optional<Tensor>& initial_state, int64_t chunk_size, bool save) {
  const Inputs in = prepare(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size);
  const auto at_ = acc_type(u.scalar_type());
  const auto acc_opts = u.options().dtype(at_);
  const int64_t nchunks = (in.L + chunk_size - 1) / chunk_size;
  Tensor out = cached_empty({in.batch, in.dim, in.L}, u.options());
  Tensor last = at::empty({in.batch, in.dim, in.N}, acc_opts);
  Tensor ckpt = save ? cached_empty({in.batch, in.dim, nchunks * in.N}, acc_opts)
                     : at::empty({0}, acc_opts);
  const Tensor B_grouped = in.B_var ? grouped_acc(in.B, at_) : Tensor();
  const Tensor C_grouped = in.C_var ? grouped_acc(in.C, at_) : Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, u.scalar_type(), "selective_scan_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const Scan<S, T> p = make_scan<S, T>(in, B_grouped, C_grouped, delta_softplus, chunk_size);
    S* out_p = out.data_ptr<S>();
    T* last_p = last.data_ptr<T>();
    T* ckpt_p = save ? ckpt.data_ptr<T>() : nullptr;
    with_forms(in.B_var, in.C_var, [&](auto b_var, auto c_var) {
      const int64_t grain = task_grain(p.L * p.N * Vec<T>::size());
      lanes::for_each_task(
          p.tasks(), grain, [&] { return ForwardWork<T>(p.span, p.chunk, p.N); },
          [&](ForwardWork<T>& w, int64_t i) {
            forward_task<S, T, decltype(b_var)::value, decltype(c_var)::value>(
                p, block_of(p, i), out_p, last_p, ckpt_p, w);
          });
    });
  });
  return {out, last, ckpt};
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
  TORCH_CHECK(checkpoints.sizes() == at::IntArrayRef({in.batch, in.dim, nchunks * in.N}) &&
                  checkpoints.scalar_type() == at_,
              "rnnkernels: selective_scan_bwd: checkpoints must be (batch, dim, ceil(L / "
              "chunk_size) * N) in the state dtype; call selective_scan_fwd with save=True");
  TORCH_CHECK(grad_out.sizes() == u.sizes(),
              "rnnkernels: selective_scan_bwd: grad_out must match u");
  TORCH_CHECK(!given(grad_last_state) ||
                  grad_last_state->sizes() == at::IntArrayRef({in.batch, in.dim, in.N}),
              "rnnkernels: selective_scan_bwd: grad_last_state must be (batch, dim, N) = (",
              in.batch, ", ", in.dim, ", ", in.N, ")");
  const Tensor gout = contiguous_as(grad_out, st, "grad_out");
  const Tensor ckpt = checkpoints.contiguous();
  const Tensor B_grouped = in.B_var ? grouped_acc(in.B, at_) : Tensor();
  const Tensor C_grouped = in.C_var ? grouped_acc(in.C, at_) : Tensor();

  Tensor grad_u = cached_empty(in.u.sizes(), in.u.options());
  Tensor grad_delta = cached_empty(in.u.sizes(), in.u.options());
  Tensor grad_z = in.z.defined() ? cached_empty(in.u.sizes(), in.u.options())
                                 : at::empty({0}, u.options());
  Tensor grad_B = in.B_var ? at::empty_like(in.B) : Tensor();
  Tensor grad_C = in.C_var ? at::empty_like(in.C) : Tensor();
  Tensor grad_D, grad_bias, grad_A, grad_x0;

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, st, "selective_scan_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    constexpr int64_t W = Vec<T>::size();
    const Scan<S, T> p = make_scan<S, T>(in, B_grouped, C_grouped, delta_softplus, chunk_size);
    const int64_t tasks = p.tasks(), NW = p.N * W;
    // The backward's own scratch as lane buffers (kept by the thread for its next call, see
    // lanes::FreedBuffers), not tensors: each at::zeros cost microseconds a call.
    Buffer<T> h(tasks * NW, T(0));
    if (given(grad_last_state)) {
      const Tensor gl = grad_last_state->to(at_).contiguous();
      const T* src = gl.data_ptr<T>();
      for (int64_t i = 0; i < tasks; ++i) {
        const Block blk = block_of(p, i);
        load_state(h.data() + i * NW, src + (blk.b * p.dim + blk.d0) * p.N, p.N, blk.nc);
      }
    }
    Buffer<T> dA(tasks * NW, T(0));
    Buffer<T> dB_fixed(in.B_var ? 0 : tasks * NW, T(0));
    Buffer<T> dC_fixed(in.C_var ? 0 : tasks * NW, T(0));
    Buffer<T> dB_part(in.B_var ? p.supers() * p.L * p.N : 0);
    Buffer<T> dC_part(in.C_var ? p.supers() * p.L * p.N : 0);
    Buffer<T> dD(tasks * W, T(0)), dbias(tasks * W, T(0));
    auto ptr = [](Buffer<T>& b) { return b.empty() ? nullptr : b.data(); };
    const Grads<S, T> gr{
        gout.data_ptr<S>(), ckpt.data_ptr<T>(),
        Carried<T>{h.data(), dA.data(), ptr(dB_fixed), ptr(dC_fixed), dD.data(), dbias.data()},
        ptr(dB_part), ptr(dC_part), grad_u.data_ptr<S>(), grad_delta.data_ptr<S>(),
        in.z.defined() ? grad_z.data_ptr<S>() : nullptr};
    S* gB = in.B_var ? grad_B.data_ptr<S>() : nullptr;
    S* gC = in.C_var ? grad_C.data_ptr<S>() : nullptr;
    const auto absent = u.options();
    grad_A = at::empty({p.dim, p.N}, acc_opts);
    if (!in.B_var) grad_B = at::empty({p.dim, p.N}, acc_opts);
    if (!in.C_var) grad_C = at::empty({p.dim, p.N}, acc_opts);
    grad_D = in.D.defined() ? at::empty({p.dim}, acc_opts) : at::empty({0}, absent);
    grad_bias = in.delta_bias.defined() ? at::empty({p.dim}, acc_opts) : at::empty({0}, absent);
    grad_x0 = in.x0.defined() ? at::empty({p.batch, p.dim, p.N}, acc_opts)
                              : at::empty({0}, absent);
    // The gradients summed over batch rows, and the initial state's, once every super is done.
    auto finish = [&] {
      sum_over_batch(p, dA.data(), p.N, grad_A.data_ptr<T>());
      if (!in.B_var) sum_over_batch(p, dB_fixed.data(), p.N, grad_B.data_ptr<T>());
      if (!in.C_var) sum_over_batch(p, dC_fixed.data(), p.N, grad_C.data_ptr<T>());
      if (in.D.defined()) sum_over_batch(p, dD.data(), 0, grad_D.data_ptr<T>());
      if (in.delta_bias.defined()) {
        sum_over_batch(p, dbias.data(), 0, grad_bias.data_ptr<T>());
      }
      if (in.x0.defined()) {
        const T* src = h.data();
        T* dst = grad_x0.data_ptr<T>();
        for (int64_t i = 0; i < tasks; ++i) {
          const Block blk = block_of(p, i);
          store_state(dst + (blk.b * p.dim + blk.d0) * p.N, src + i * NW, p.N, blk.nc);
        }
      }
    };
    // One parallel region for the whole backward: its tasks are the supers, then the pieces of
    // the grouped dB / dC reductions (kPieces runs of steps per (batch row, group) pair and
    // gradient), which a thread takes once every super is handed out and waits for the pair's
    // supers to complete; the thread that completes the last super of all runs finish.
    // Separate regions for the reductions (as before the pieces) each cost a wake-up of the
    // other threads, more than their work at the benchmark's size; a whole pair reduced by the
    // thread that completed its last super (as before the pieces) left the other threads idle
    // at the region's end. The counters' acquire-release order makes the supers' sums visible
    // to the threads that add them.
    const int64_t pairs = p.batch * p.G, supers = p.supers();
    std::vector<std::atomic<int64_t>> pair_done(pairs);
    for (auto& done : pair_done) done.store(0, std::memory_order_relaxed);
    std::atomic<int64_t> supers_done{0};
    constexpr int64_t kPieces = 4;
    const int64_t tiles = (p.L + W - 1) / W, pieces = std::min(kPieces, tiles);
    with_forms(in.B_var, in.C_var, [&](auto b_var, auto c_var) {
      constexpr bool kBvar = decltype(b_var)::value, kCvar = decltype(c_var)::value;
      const int64_t blocks_per_super = (p.blocks_per_group + p.supers_per_group - 1) /
                                       p.supers_per_group;
      const int64_t grads = int64_t{kBvar} + int64_t{kCvar};
      lanes::for_each_task(
          supers + pairs * grads * pieces,
          task_grain(blocks_per_super * p.L * p.N * Vec<T>::size()),
          [&] {
            return BackwardWork<T>(p.span, p.chunk, p.N, blocks_per_super, kBvar, kCvar);
          },
          [&](BackwardWork<T>& w, int64_t task) {
            if (task >= supers) {  // a piece: pair, gradient (B first), steps
              const int64_t k = task - supers, pair = k / (grads * pieces);
              const bool of_B = kBvar && (k / pieces) % grads == 0;
              const int64_t j = k % pieces;
              while (pair_done[pair].load(std::memory_order_acquire) < p.supers_per_group) {
                lanes::spin_pause();
              }
              const int64_t t0 = tiles * j / pieces * W;
              const int64_t t1 = std::min(p.L, tiles * (j + 1) / pieces * W);
              reduce_steps(p, of_B ? gr.dB_part : gr.dC_part, of_B ? gB : gC, pair, t0, t1);
              return;
            }
            backward_super<S, T, kBvar, kCvar>(p, gr, task, w);
            if constexpr (kBvar || kCvar) {
              pair_done[task / p.supers_per_group].fetch_add(1, std::memory_order_acq_rel);
            }
            if (supers_done.fetch_add(1, std::memory_order_acq_rel) + 1 == supers) finish();
          },
          supers);  // the threads the supers keep busy, as before the pieces
    });
  });
  return {grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_x0};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("selective_scan_fwd", &selective_scan_fwd_cpu);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cpu);
}

}  // namespace rnnkernels::cpu
