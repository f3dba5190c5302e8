// Shared pieces of the selective-scan kernels (selective_scan_fwd.cu, selective_scan_bwd.cu):
// the thread coordinates of a block and the staging of one tile of the sequence into shared
// memory.
//
// Decomposition (both directions). A block owns one batch row and `channels` consecutive
// channels (launch_plan.h, ScanThreads); `lanes` threads share a channel, each holding `states`
// of its N states in registers for the whole sequence. The sequence is walked in tiles of `tile`
// steps: the block stages the tile's inputs into shared memory with coalesced loads (unit stride
// along L), every thread steps through the tile sequentially, the lanes of a channel sum their
// states' contributions with shuffles, and the tile's outputs leave with coalesced stores.
#pragma once

#include "device_utils.cuh"
#include "scan.h"
#include "scan_math.h"

namespace rnnkernels::cuda {

constexpr float kLog2e = 1.4426950408889634f;

struct ScanCoords {
  int lanes, channels, lane, cl;  // lane within the channel, channel within the block
  int64_t b, d0, d;               // batch row, first channel of the block, own channel
  bool dvalid;                    // d < dim (threads past the last channel compute zeros)

  __device__ ScanCoords(const SelectiveScanInputs& in, const SelectiveScanPlan& pl)
      : lanes(pl.th.lanes),
        channels(pl.th.channels),
        lane(static_cast<int>(threadIdx.x) % pl.th.lanes),
        cl(static_cast<int>(threadIdx.x) / pl.th.lanes),
        b(blockIdx.y),
        d0(int64_t(blockIdx.x) * pl.th.channels),
        d(d0 + cl),
        dvalid(d < in.dim) {}

  __device__ int state(int k) const { return lane + k * lanes; }
  __device__ bool owns(const SelectiveScanInputs& in, int k) const {
    return dvalid && state(k) < in.n_state;
  }
  // Group of B or C of the own channel, relative to the block's first group.
  __device__ int local_group(const SelectiveScanInputs& in, const ScanGrouped& g) const {
    if (g.groups == 0) return 0;
    const int64_t per = in.dim / g.groups;
    const int64_t dd = dvalid ? d : in.dim - 1;
    return static_cast<int>(dd / per - d0 / per);
  }
};

template <typename S>
__device__ __forceinline__ float seq_at(const ScanSeq& s, int64_t b, int64_t d, int64_t t) {
  return to_float(static_cast<const S*>(s.ptr)[b * s.batch_stride + d * s.dim_stride + t]);
}

// Per-channel rows of one tile, steps [t0, t0 + tl): u, the effective delta (bias and softplus
// applied) and, when the pointers are given, the softplus derivative, z and the output gradient.
// Entries past the tile or the last channel are zero.
template <typename S>
__device__ void stage_channels(const SelectiveScanInputs& in, const SelectiveScanPlan& pl,
                               const ScanCoords& co, int64_t t0, int tl, float* s_u, float* s_dt,
                               float* s_dsp, float* s_z, const S* gout, float* s_g) {
  const int n = co.channels * pl.tile;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int c = i / pl.tile, tt = i % pl.tile;
    const int64_t dd = co.d0 + c, t = t0 + tt;
    const bool ok = dd < in.dim && tt < tl;
    const int at = c * pl.ts + tt;
    float raw = 0.f;
    if (ok) raw = seq_at<S>(in.delta, co.b, dd, t) + (in.delta_bias ? in.delta_bias[dd] : 0.f);
    s_u[at] = ok ? seq_at<S>(in.u, co.b, dd, t) : 0.f;
    s_dt[at] = ok && in.delta_softplus ? softplus(raw) : raw;
    if (s_dsp) s_dsp[at] = ok && in.delta_softplus ? softplus_grad(raw) : 1.f;
    if (s_z && in.z.ptr) s_z[at] = ok ? seq_at<S>(in.z, co.b, dd, t) : 0.f;
    if (gout) s_g[at] = ok ? to_float(gout[(co.b * in.dim + dd) * in.length + t]) : 0.f;
  }
}

// Variable B or C of one tile for the groups the block spans: dst[(group * np + n) * ts + tt].
template <typename S>
__device__ void stage_grouped(const SelectiveScanInputs& in, const SelectiveScanPlan& pl,
                              const ScanCoords& co, const ScanGrouped& g, int span, int64_t t0,
                              int tl, float* dst) {
  const int64_t first = co.d0 / (in.dim / g.groups);
  const int n = span * pl.np * pl.tile;
  const S* src = static_cast<const S*>(g.ptr);
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const int gl = i / (pl.np * pl.tile), rem = i % (pl.np * pl.tile);
    const int st = rem / pl.tile, tt = rem % pl.tile;
    const int64_t grp = first + gl;
    const bool ok = grp < g.groups && st < in.n_state && tt < tl;
    const int64_t at =
        co.b * g.batch_stride + grp * g.group_stride + st * g.state_stride + t0 + tt;
    dst[(gl * pl.np + st) * pl.ts + tt] = ok ? to_float(src[at]) : 0.f;
  }
}

// B (or C) of state k at step tt of the staged tile: from shared memory when variable, else the
// thread's fixed value.
__device__ __forceinline__ float grouped_at(const ScanGrouped& g, const SelectiveScanPlan& pl,
                                            const float* staged, int local_group, int st, int tt,
                                            float fixed) {
  return g.groups ? staged[(local_group * pl.np + st) * pl.ts + tt] : fixed;
}

inline cudaError_t scan_smem_limit(int64_t& limit) {
  DeviceLimits lim;
  int major = 0;
  const cudaError_t err = device_limits(lim, major);
  limit = lim.smem_per_block;
  return err;
}

inline SelectiveScanShape scan_shape(const SelectiveScanInputs& in, bool backward) {
  return {in.dim, in.length, in.n_state, in.B.groups, in.C.groups, in.z.ptr != nullptr, backward,
          in.chunk_size};
}

// Launches kernel<S, states> for the plan, raising the shared-memory limit when needed.
template <typename P, typename Pick>
cudaError_t launch_scan(const P& p, bool backward, cudaStream_t stream, Pick pick) {
  int64_t limit = 0;
  cudaError_t err = scan_smem_limit(limit);
  if (err != cudaSuccess) return err;
  const SelectiveScanPlan pl = plan_selective_scan(scan_shape(p.in, backward), limit);
  if (!pl.fits) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(ceil_div(p.in.dim, pl.th.channels)),
                  static_cast<unsigned>(p.in.batch));
  return dispatch_dtype(p.in.dtype, [&](auto tag) {
    void (*fn)(P, SelectiveScanPlan) = pick(tag, pl.th.states);
    if (fn == nullptr) return cudaErrorInvalidConfiguration;
    cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(pl.smem_bytes));
    if (e != cudaSuccess) return e;
    fn<<<grid, kScanThreads, static_cast<size_t>(pl.smem_bytes), stream>>>(p, pl);
    return cudaGetLastError();
  });
}

}  // namespace rnnkernels::cuda
