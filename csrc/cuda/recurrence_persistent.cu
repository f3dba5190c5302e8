// Persistent path of the recurrence: one kernel runs all T steps; the grid stays resident (a
// cooperative launch, or one thread-block cluster on sm_90) and synchronises once per step.
//
// Decomposition. Block k owns the hidden units j in [k*U, (k+1)*U) (launch_plan.h). Forward: it
// keeps the G*U rows of W_hh of its units in shared memory; each step it stages h_{t-1} (B x H,
// read whole from global memory), multiplies (tensor-core WMMA for 16-bit storage with B >= 8,
// warp FMA otherwise; fp32 accumulation), applies the cell to its units and writes h_t[:, its
// units] back; then the barrier. Backward: it keeps the U columns of W_hh of its units; each step
// it computes the cell's gradients for its units (writing dgh_t[:, its rows]), waits at the
// barrier, stages dgh_t (B x G*H) and forms dh_{t-1}[:, its units] = dhd + dgh_t W[:, its units].
// The LSTM cell state, dh and dc stay with the block that owns the unit: no exchange.
//
// Memory per step: W_hh is read from shared memory once (its slice per block); the exchanged
// state (B x H fp32 forward, B x G*H backward) is read by every block from L2 (ld.global.cg:
// written by other multiprocessors during this kernel, so never from the incoherent L1); gx, y
// and the workspace are read or written once.
//
// Not yet run on a GPU: compiled for sm_80 / sm_90 only (GPU tests: tests/test_cuda_kernels.py).
#include <cooperative_groups.h>
#include <mma.h>

#include "recurrence.h"
#include "recurrence_cell.cuh"

namespace rnnkernels::cuda {
namespace {

namespace cg = cooperative_groups;

__device__ __forceinline__ void sync_all(bool cluster) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster) {
    cg::this_cluster().sync();  // barrier.cluster: release/acquire at cluster scope
    return;
  }
#endif
  cg::this_grid().sync();
}

// Staged operand: the storage type for the tensor cores, fp32 for the FMA path.
template <typename S, bool kMMA>
using StageT = std::conditional_t<kMMA, S, float>;

struct Smem {
  unsigned char* base;
  template <typename T>
  __device__ T* at(int64_t offset) const { return reinterpret_cast<T*>(base + offset); }
};

// Copies rows [bt0, bt0 + batch_tile) and columns [c0, c0 + clen) of src (rows x cols fp32,
// written by other blocks) into the staging buffer, zero outside src.
template <typename X>
__device__ void stage(const float* src, int64_t rows, int64_t cols, int64_t bt0, int c0, int clen,
                      const PersistentPlan& pl, X* sx) {
  const int n = pl.batch_tile * clen;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int bl = idx / clen, kc = idx % clen;
    const int64_t b = bt0 + bl, k = c0 + kc;
    const float v = (b < rows && k < cols) ? __ldcg(src + b * cols + k) : 0.f;
    if constexpr (std::is_same_v<X, float>) {
      sx[bl * pl.ldx + kc] = v;
    } else {
      sx[bl * pl.ldx + kc] = from_float<X>(v);
    }
  }
}

// G[ks][b][row] (+)= sum over the chunk of X[b][k] W[row][c0 + k], tensor cores, tile TM x TN x 16.
// Warp w owns the output tiles (m, n, ks) = w, w + warps, ...: the same ones for every chunk, so
// its partial sums need no barrier between chunks.
template <typename S, int TM>
__device__ void mma_chunk(const PersistentPlan& pl, const S* sw, const S* sx, float* sg, int c0,
                          int clen, bool first) {
  using namespace nvcuda;
  constexpr int TN = 256 / TM;
  const int warp = threadIdx.x / 32;
  const int mt = pl.rows_pad / TM, nt = pl.batch_tile / TN;
  const int ksteps = clen / 16;
  const int per = static_cast<int>(ceil_div(ksteps, pl.ksplit));
  for (int item = warp; item < mt * nt * pl.ksplit; item += kPersistentWarps) {
    const int mi = item % mt, rest = item / mt, ni = rest % nt, ks = rest / nt;
    float* g = sg + (int64_t(ks) * pl.batch_tile + ni * TN) * pl.ldg + mi * TM;
    wmma::fragment<wmma::accumulator, TM, TN, 16, float> acc;
    if (first) {
      wmma::fill_fragment(acc, 0.f);
    } else {
      wmma::load_matrix_sync(acc, g, pl.ldg, wmma::mem_col_major);
    }
    const int kb = ks * per, ke = min(ksteps, kb + per);
    for (int kk = kb; kk < ke; ++kk) {
      wmma::fragment<wmma::matrix_a, TM, TN, 16, S, wmma::row_major> a;
      wmma::fragment<wmma::matrix_b, TM, TN, 16, S, wmma::col_major> x;
      wmma::load_matrix_sync(a, sw + int64_t(mi * TM) * pl.ldw + c0 + kk * 16, pl.ldw);
      wmma::load_matrix_sync(x, sx + int64_t(ni * TN) * pl.ldx + kk * 16, pl.ldx);
      wmma::mma_sync(acc, a, x, acc);
    }
    wmma::store_matrix_sync(g, acc, pl.ldg, wmma::mem_col_major);
  }
}

// The same product on the FMA units: a warp owns kFmaRows rows x kFmaBatch batch rows, its lanes
// split the chunk's columns, a warp sum closes each output.
template <typename S>
__device__ void fma_chunk(const PersistentPlan& pl, const S* sw, const float* sx, float* sg, int c0,
                          int clen, bool first) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int rg = pl.rows_pad / kFmaRows, bg = pl.batch_tile / kFmaBatch;
  for (int item = warp; item < rg * bg; item += kPersistentWarps) {
    const int r0 = (item % rg) * kFmaRows, b0 = (item / rg) * kFmaBatch;
    float acc[kFmaRows][kFmaBatch] = {};
    for (int k = lane; k < clen; k += 32) {
      float w[kFmaRows];
#pragma unroll
      for (int r = 0; r < kFmaRows; ++r) w[r] = to_float(sw[int64_t(r0 + r) * pl.ldw + c0 + k]);
#pragma unroll
      for (int bb = 0; bb < kFmaBatch; ++bb) {
        const float xv = sx[int64_t(b0 + bb) * pl.ldx + k];
#pragma unroll
        for (int r = 0; r < kFmaRows; ++r) acc[r][bb] += w[r] * xv;
      }
    }
#pragma unroll
    for (int r = 0; r < kFmaRows; ++r) {
#pragma unroll
      for (int bb = 0; bb < kFmaBatch; ++bb) {
        const float v = group_sum(acc[r][bb], 32);
        if (lane == 0) {
          float* g = sg + int64_t(b0 + bb) * pl.ldg + r0 + r;
          *g = first ? v : *g + v;
        }
      }
    }
  }
}

// X (staged rows bt0..) times the resident slice, over all chunks of the reduction, into G.
template <typename S, bool kMMA, int TM>
__device__ void block_matmul(const PersistentPlan& pl, const Smem& sm, const float* src,
                             int64_t rows, int64_t cols, int64_t bt0) {
  using X = StageT<S, kMMA>;
  const S* sw = sm.at<S>(0);
  X* sx = sm.at<X>(pl.off_x);
  float* sg = sm.at<float>(pl.off_g);
  for (int c0 = 0; c0 < pl.k_pad; c0 += pl.k_chunk) {
    const int clen = min(pl.k_chunk, pl.k_pad - c0);
    if (c0 > 0) __syncthreads();  // the previous chunk is consumed
    stage(src, rows, cols, bt0, c0, clen, pl, sx);
    __syncthreads();
    if constexpr (kMMA) {
      mma_chunk<S, TM>(pl, sw, sx, sg, c0, clen, c0 == 0);
    } else {
      fma_chunk<S>(pl, sw, sx, sg, c0, clen, c0 == 0);
    }
  }
  __syncthreads();
}

// Sum of the ksplit partial products of (staged batch row bl, resident row r).
__device__ __forceinline__ float product(const PersistentPlan& pl, const float* sg, int bl, int r) {
  float v = 0.f;
  for (int ks = 0; ks < pl.ksplit; ++ks) v += sg[(int64_t(ks) * pl.batch_tile + bl) * pl.ldg + r];
  return v;
}

template <typename S, bool kMMA, int TM>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_fwd_kernel(PersistentFwdParams p, PersistentPlan pl) {
  using M = CellMath<S>;
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  const Smem sm{smem};
  const int G = num_gates(p.cell), U = pl.units;
  const int64_t B = p.batch, H = p.hidden, GH = G * H, KH = workspace_units(p.cell, false) * H;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const S* w = static_cast<const S*>(p.w);
  const S* bias = static_cast<const S*>(p.bias);
  const S* gx_all = static_cast<const S*>(p.gx);
  S* y_all = static_cast<S*>(p.y);

  // Resident rows g*H + j of W_hh, row-major over k; zero padding.
  S* sw = sm.at<S>(0);
  for (int64_t idx = threadIdx.x; idx < int64_t(pl.rows_pad) * pl.k_pad; idx += blockDim.x) {
    const int lr = static_cast<int>(idx / pl.k_pad), k = static_cast<int>(idx % pl.k_pad);
    const int g = lr / U, u = lr % U;
    const int64_t j = j0 + u;
    const bool valid = lr < pl.rows && j < H && k < H;
    sw[int64_t(lr) * pl.ldw + k] = valid ? w[(g * H + j) * H + k] : from_float<S>(0.f);
  }
  __syncthreads();

  const float* sg = sm.at<float>(pl.off_g);
  for (int64_t s = 0; s < p.order.steps; ++s) {
    const int64_t t = p.order.time(s);
    const float* hin = p.hs + p.order.slot_in(s) * B * H;
    float* hout = p.hs + p.order.slot_out(s) * B * H;
    for (int64_t bt0 = 0; bt0 < B; bt0 += pl.batch_tile) {
      block_matmul<S, kMMA, TM>(pl, sm, hin, B, H, bt0);
      for (int idx = threadIdx.x; idx < pl.batch_tile * U; idx += blockDim.x) {
        const int bl = idx / U, u = idx % U;
        const int64_t b = bt0 + bl, j = j0 + u;
        if (b >= B || j >= H) continue;
        const S* gx = gx_all + (t * B + b) * GH;
        S* y = y_all + (t * B + b) * H;
        float* ws = p.ws ? p.ws + (t * B + b) * KH : nullptr;
        const float hprev = __ldcg(hin + b * H + j);
        if (p.lengths != nullptr && t >= p.lengths[b]) {
          hout[b * H + j] = hprev;
          y[j] = from_float<S>(0.f);
          if (ws) masked_workspace(p.cell, false, H, j, p.c ? p.c[b * H + j] : 0.f, ws);
          continue;
        }
        const float h = unit_forward<M>(
            p.cell, false, H, j, [&](int g) { return to_float(gx[g * H + j]); },
            [&](int g) {
              return product(pl, sg, bl, g * U + u) + (bias ? to_float(bias[g * H + j]) : 0.f);
            },
            hprev, p.c ? p.c + b * H + j : nullptr, ws);
        hout[b * H + j] = h;
        y[j] = from_float<S>(h);
      }
      __syncthreads();  // G and the staging buffer are reused by the next batch tile
    }
    sync_all(pl.cluster);
  }
}

template <typename S, bool kMMA, int TM>
__global__ void __launch_bounds__(kPersistentThreads, 1)
    persistent_bwd_kernel(PersistentBwdParams p, PersistentPlan pl) {
  using M = CellMath<S>;
  extern __shared__ __align__(kSmemAlign) unsigned char smem[];
  const Smem sm{smem};
  const int G = num_gates(p.cell), U = pl.units;
  const int64_t B = p.batch, H = p.hidden, GH = G * H, KH = workspace_units(p.cell, false) * H;
  const int64_t j0 = int64_t(blockIdx.x) * U;
  const S* w = static_cast<const S*>(p.w);
  const S* gy_all = static_cast<const S*>(p.grad_y);
  S* dgx_all = static_cast<S*>(p.dgx);
  const bool dgx_apart = p.dgx != static_cast<void*>(p.dgh);

  // Resident columns j of W_hh as rows: sw[u][r] = W[r][j0 + u]. The loop runs along u so that
  // the global reads are contiguous.
  S* sw = sm.at<S>(0);
  for (int64_t idx = threadIdx.x; idx < int64_t(pl.rows_pad) * pl.k_pad; idx += blockDim.x) {
    const int u = static_cast<int>(idx % pl.rows_pad), r = static_cast<int>(idx / pl.rows_pad);
    const int64_t j = j0 + u;
    const bool valid = u < U && j < H && r < GH;
    sw[int64_t(u) * pl.ldw + r] = valid ? w[r * H + j] : from_float<S>(0.f);
  }
  __syncthreads();

  const float* sg = sm.at<float>(pl.off_g);
  for (int64_t s = p.order.steps - 1; s >= 0; --s) {
    const int64_t t = p.order.time(s);
    const float* hprev = p.hs + p.order.slot_in(s) * B * H;
    float* dgh_t = p.dgh + t * B * GH;
    for (int64_t idx = threadIdx.x; idx < B * U; idx += blockDim.x) {
      const int64_t b = idx / U, j = j0 + idx % U;
      if (j >= H) continue;
      float* dgh = dgh_t + b * GH;
      S* dgx = dgx_all + (t * B + b) * GH;
      auto put = [&](int g, float d_rec, float d_in) {
        dgh[g * H + j] = d_rec;
        if (dgx_apart) dgx[g * H + j] = from_float<S>(d_in);
      };
      if (p.lengths != nullptr && t >= p.lengths[b]) {
        for (int g = 0; g < G; ++g) put(g, 0.f, 0.f);
        p.dhd[b * H + j] = p.dh[b * H + j];
        continue;
      }
      const float* ws = p.ws + (t * B + b) * KH;
      float dH = p.dh[b * H + j];
      if (gy_all) dH += to_float(gy_all[(t * B + b) * H + j]);
      float c_prev = 0.f;
      if (p.cell == Cell::LSTM) {
        c_prev = s == 0 ? p.c0[b * H + j] : p.ws[(p.order.time_before(s) * B + b) * KH + 4 * H + j];
      }
      const float direct = unit_backward<M>(p.cell, H, j, dH, ws, c_prev, hprev[b * H + j],
                                            p.dc ? p.dc + b * H + j : nullptr, put);
      p.dhd[b * H + j] = direct;
    }
    sync_all(pl.cluster);  // dgh_t is complete
    for (int64_t bt0 = 0; bt0 < B; bt0 += pl.batch_tile) {
      block_matmul<S, kMMA, TM>(pl, sm, dgh_t, B, GH, bt0);
      for (int idx = threadIdx.x; idx < pl.batch_tile * U; idx += blockDim.x) {
        const int bl = idx / U, u = idx % U;
        const int64_t b = bt0 + bl, j = j0 + u;
        if (b < B && j < H) p.dh[b * H + j] = p.dhd[b * H + j] + product(pl, sg, bl, u);
      }
      __syncthreads();
    }
  }
}

template <typename P>
using KernelFn = void (*)(P, PersistentPlan);

template <typename P, typename S, bool kMMA, int TM>
KernelFn<P> instance() {
  if constexpr (std::is_same_v<P, PersistentFwdParams>) {
    return persistent_fwd_kernel<S, kMMA, TM>;
  } else {
    return persistent_bwd_kernel<S, kMMA, TM>;
  }
}

// The instance for the plan's path: WMMA of the plan's tile height for 16-bit storage, else FMA.
template <typename P, typename S>
KernelFn<P> instance_for(const PersistentPlan& pl, bool mma) {
  if constexpr (!std::is_same_v<S, float>) {
    if (mma) {
      if (pl.tile_m == 8) return instance<P, S, true, 8>();
      if (pl.tile_m == 16) return instance<P, S, true, 16>();
      return instance<P, S, true, 32>();
    }
  }
  return instance<P, S, false, 0>();
}

template <typename P>
KernelFn<P> kernel_for(const P& p, const PersistentPlan& pl, bool mma) {
  KernelFn<P> fn = nullptr;
  dispatch_dtype(p.dtype, [&](auto tag) {
    fn = instance_for<P, decltype(tag)>(pl, mma);
    return cudaSuccess;
  });
  return fn;
}

bool tensor_cores(DType dtype, int64_t batch) {
  constexpr int64_t kMinMmaBatch = 8;  // below it the FMA path wastes less of the operand
  return dtype != DType::F32 && batch >= kMinMmaBatch;
}

cudaLaunchConfig_t config(const PersistentPlan& pl, cudaStream_t stream,
                          cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(pl.blocks);
  cfg.blockDim = dim3(kPersistentThreads);
  cfg.dynamicSmemBytes = static_cast<size_t>(pl.smem_bytes);
  cfg.stream = stream;
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = pl.blocks;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  return cfg;
}

template <typename P>
cudaError_t plan_for(const P& p, bool backward, PersistentPlan& plan) {
  plan = PersistentPlan{};
  const bool single_matmul = p.cell == Cell::LSTM || p.cell == Cell::GRU ||
                             p.cell == Cell::RNN_TANH || p.cell == Cell::RNN_RELU;
  if (!single_matmul) return cudaSuccess;
  DeviceLimits lim;
  int major = 0, dev = 0, coop = 0;
  cudaError_t err = device_limits(lim, major);
  if (err == cudaSuccess) err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, dev);
  if (err != cudaSuccess) return err;
  const bool mma = tensor_cores(p.dtype, p.batch);
  const PersistentProblem pb{num_gates(p.cell), p.hidden, p.batch, backward,
                             dtype_bytes(p.dtype), mma};
  for (int attempt = 0; attempt < 2; ++attempt) {
    plan = plan_persistent(pb, lim);
    if (!plan.fits) return cudaSuccess;
    KernelFn<P> fn = kernel_for(p, plan, mma);
    err = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
    if (plan.cluster) {
      cudaLaunchAttribute attr[1];
      const cudaLaunchConfig_t cfg = config(plan, nullptr, attr);
      int clusters = 0;
      err = cudaOccupancyMaxActiveClusters(&clusters, fn, &cfg);
      if (err != cudaSuccess) return err;
      if (clusters >= 1) return cudaSuccess;
      lim.max_cluster = 0;  // the cluster cannot be placed: plan for the cooperative grid
      continue;
    }
    int per_sm = 0;
    err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, kPersistentThreads,
                                                        static_cast<size_t>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
    plan.fits = coop != 0 && int64_t(per_sm) * lim.sms >= plan.blocks;
    return cudaSuccess;
  }
  return cudaSuccess;
}

template <typename P>
cudaError_t launch_persistent(const P& p, const PersistentPlan& plan, cudaStream_t stream) {
  if (!plan.fits) return cudaErrorInvalidConfiguration;
  KernelFn<P> fn = kernel_for(p, plan, tensor_cores(p.dtype, p.batch));
  if (plan.cluster) {
    cudaLaunchAttribute attr[1];
    const cudaLaunchConfig_t cfg = config(plan, stream, attr);
    return cudaLaunchKernelEx(&cfg, fn, p, plan);
  }
  P params = p;
  PersistentPlan pl = plan;
  void* args[] = {&params, &pl};
  return cudaLaunchCooperativeKernel(reinterpret_cast<void*>(fn), dim3(plan.blocks),
                                     dim3(kPersistentThreads), args,
                                     static_cast<size_t>(plan.smem_bytes), stream);
}

}  // namespace

cudaError_t persistent_plan(const PersistentFwdParams& p, PersistentPlan& plan) {
  return plan_for(p, false, plan);
}

cudaError_t persistent_plan(const PersistentBwdParams& p, PersistentPlan& plan) {
  return plan_for(p, true, plan);
}

cudaError_t launch(const PersistentFwdParams& p, const PersistentPlan& plan, cudaStream_t stream) {
  return launch_persistent(p, plan, stream);
}

cudaError_t launch(const PersistentBwdParams& p, const PersistentPlan& plan, cudaStream_t stream) {
  return launch_persistent(p, plan, stream);
}

}  // namespace rnnkernels::cuda
