// Linear scan h_t = a_t * h_{t-1} + b_t over (batch, channels, L), forward and backward.
//
// Decomposition: one warp per (batch, channel) row; the row is walked in tiles of 32 x
// kLinearItems steps. In a tile each lane folds its kLinearItems consecutive steps into one affine
// map, a warp-wide parallel prefix of these maps (five shuffles) gives every lane its start
// state from the state carried in from the previous tile, and the lanes then replay their steps.
// The backward runs the same scan from the end on r_t = a_t * (dh_t + r_{t+1}), the gradient
// that step t passes to h_{t-1}.
//
// Memory: a and b (a, h and grad_h backward) are read once, h (da, db) written once; fp32 state.
#include "device_utils.cuh"
#include "scan.h"
#include "scan_math.h"

namespace rnnkernels::cuda {
namespace {

constexpr int kLinearThreads = kLinearWarps * 32;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ Affine<float> shfl_up(Affine<float> m, int off) {
  return {__shfl_up_sync(kFull, m.a, off), __shfl_up_sync(kFull, m.b, off)};
}

__device__ __forceinline__ Affine<float> shfl_down(Affine<float> m, int off) {
  return {__shfl_down_sync(kFull, m.a, off), __shfl_down_sync(kFull, m.b, off)};
}

template <typename S>
__device__ __forceinline__ const S* seq_row(const ScanSeq& s, int64_t row, int64_t channels) {
  return static_cast<const S*>(s.ptr) + (row / channels) * s.batch_stride +
         (row % channels) * s.dim_stride;
}

template <typename S>
__global__ void __launch_bounds__(kLinearThreads) linear_scan_fwd_kernel(LinearScanFwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kLinearWarps + threadIdx.x / 32;
  if (row >= p.batch * p.channels) return;  // the whole warp
  const S* a = seq_row<S>(p.a, row, p.channels);
  const S* b = seq_row<S>(p.b, row, p.channels);
  S* h = static_cast<S*>(p.h) + row * p.length;
  float carry = p.initial_state ? p.initial_state[row] : 0.f;
  for (int64_t t0 = 0; t0 < p.length; t0 += kLinearTile) {
    const int64_t base = t0 + int64_t(lane) * kLinearItems;
    float av[kLinearItems], bv[kLinearItems];
    Affine<float> m{1.f, 0.f};
#pragma unroll
    for (int i = 0; i < kLinearItems; ++i) {
      const bool ok = base + i < p.length;
      av[i] = ok ? to_float(a[base + i]) : 1.f;
      bv[i] = ok ? to_float(b[base + i]) : 0.f;
      m = compose(m, Affine<float>{av[i], bv[i]});
    }
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const Affine<float> lower = shfl_up(m, off);
      if (lane >= off) m = compose(lower, m);
    }
    Affine<float> before = shfl_up(m, 1);
    if (lane == 0) before = {1.f, 0.f};
    float hv = before.a * carry + before.b;
#pragma unroll
    for (int i = 0; i < kLinearItems; ++i) {
      hv = av[i] * hv + bv[i];
      if (base + i < p.length) h[base + i] = from_float<S>(hv);
    }
    carry = __shfl_sync(kFull, hv, 31);
  }
}

template <typename S>
__global__ void __launch_bounds__(kLinearThreads) linear_scan_bwd_kernel(LinearScanBwdParams p) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * kLinearWarps + threadIdx.x / 32;
  if (row >= p.batch * p.channels) return;
  const S* a = seq_row<S>(p.a, row, p.channels);
  const S* h = seq_row<S>(p.h, row, p.channels);
  const S* gh = seq_row<S>(p.grad_h, row, p.channels);
  S* da = static_cast<S*>(p.da) + row * p.length;
  S* db = static_cast<S*>(p.db) + row * p.length;
  const float h0 = p.initial_state ? p.initial_state[row] : 0.f;
  float carry = 0.f;  // r at the start of the tile to the right
  for (int64_t t0 = ceil_div(p.length, kLinearTile) * kLinearTile - kLinearTile; t0 >= 0;
       t0 -= kLinearTile) {
    const int64_t base = t0 + int64_t(lane) * kLinearItems;
    float av[kLinearItems], gv[kLinearItems];
    Affine<float> m{1.f, 0.f};  // this lane's steps, last first: r_in -> r at its first step
#pragma unroll
    for (int i = kLinearItems - 1; i >= 0; --i) {
      const bool ok = base + i < p.length;
      av[i] = ok ? to_float(a[base + i]) : 1.f;
      gv[i] = ok ? to_float(gh[base + i]) : 0.f;
      m = compose(m, Affine<float>{av[i], av[i] * gv[i]});
    }
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const Affine<float> later = shfl_down(m, off);
      if (lane + off < 32) m = compose(later, m);
    }
    Affine<float> after = shfl_down(m, 1);
    if (lane == 31) after = {1.f, 0.f};
    float r = after.a * carry + after.b;
#pragma unroll
    for (int i = kLinearItems - 1; i >= 0; --i) {
      const int64_t t = base + i;
      const float g = gv[i] + r;
      if (t < p.length) {
        const float hprev = t == 0 ? h0 : to_float(h[t - 1]);
        db[t] = from_float<S>(g);
        da[t] = from_float<S>(g * hprev);
      }
      r = av[i] * g;
    }
    carry = __shfl_sync(kFull, r, 0);
  }
  if (lane == 0 && p.dinitial_state) p.dinitial_state[row] = carry;
}

unsigned grid_for(int64_t rows) { return static_cast<unsigned>(ceil_div(rows, kLinearWarps)); }

}  // namespace

cudaError_t launch(const LinearScanFwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    linear_scan_fwd_kernel<S><<<grid_for(p.batch * p.channels), kLinearThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

cudaError_t launch(const LinearScanBwdParams& p, cudaStream_t stream) {
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    linear_scan_bwd_kernel<S><<<grid_for(p.batch * p.channels), kLinearThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace rnnkernels::cuda
