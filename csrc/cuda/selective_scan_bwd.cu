// Selective scan, backward. Decomposition: selective_scan_common.cuh, the chunks of the sequence
// taken from last to first. For one chunk the block restarts from the checkpoint the forward saved
// at its start and recomputes the states: a forward pass over the chunk records the state at the
// start of every tile (shared memory, a segment of seg_tiles tiles at a time when a whole chunk's
// do not fit), then each tile, last first, is recomputed once more with every step's state kept
// in shared memory and walked backwards, the adjoint of the state carried in registers from tile
// to tile and chunk to chunk.
//
// Memory: the inputs are read once per recomputation (two or three times in all), the checkpoints
// once; du, ddelta, dz are written once; gradients of variable B / C are summed over the block's
// channels in shared memory and added to global memory once per block (fp32 atomics); dA, fixed
// dB / dC, dD and ddelta_bias stay in registers until the end, then one atomic add per block.
#include "selective_scan_common.cuh"

namespace rnnkernels::cuda {
namespace {

// Shared arrays of the backward (offsets from the plan; each channel row is pl.ts floats).
struct BwdSmem {
  float *u, *dt, *dsp, *z, *g, *du, *ddt, *dz, *B, *C, *dB, *dC, *x, *bnd;
  __device__ BwdSmem(float* s, const SelectiveScanPlan& pl, int channels) {
    const int64_t row = int64_t(channels) * pl.ts;
    u = s;
    dt = s + row;
    dsp = s + 2 * row;
    z = s + 3 * row;
    g = s + 4 * row;
    du = s + 5 * row;
    ddt = s + 6 * row;
    dz = s + 7 * row;
    B = s + pl.off_b;
    C = s + pl.off_c;
    dB = s + pl.off_db;
    dC = s + pl.off_dc;
    x = s + pl.off_x;
    bnd = s + pl.off_bnd;
  }
};

constexpr int kSlots = kScanThreads;  // stride between a thread's states in the state arrays

template <typename S, int SPT>
__global__ void __launch_bounds__(kScanThreads)
    selective_scan_bwd_kernel(SelectiveScanBwdParams p, SelectiveScanPlan pl) {
  extern __shared__ float smem[];
  const SelectiveScanInputs& in = p.in;
  const ScanCoords co(in, pl);
  const BwdSmem sh(smem, pl, co.channels);
  const int N = in.n_state, tid = threadIdx.x;
  const int gb = co.local_group(in, in.B), gc = co.local_group(in, in.C);
  const int64_t state_row = (co.b * in.dim + co.d) * N;
  const S* gout = static_cast<const S*>(p.grad_out);

  float A1[SPT], A2[SPT], Bf[SPT], Cf[SPT], x[SPT], carry[SPT], dA[SPT], dBf[SPT], dCf[SPT];
#pragma unroll
  for (int k = 0; k < SPT; ++k) {
    const bool own = co.owns(in, k);
    const int64_t dn = co.d * N + co.state(k);
    A1[k] = own ? in.A[dn] : 0.f;
    A2[k] = A1[k] * kLog2e;
    Bf[k] = own && !in.B.groups ? static_cast<const float*>(in.B.ptr)[dn] : 0.f;
    Cf[k] = own && !in.C.groups ? static_cast<const float*>(in.C.ptr)[dn] : 0.f;
    carry[k] = own && p.grad_last_state ? p.grad_last_state[state_row + co.state(k)] : 0.f;
    dA[k] = dBf[k] = dCf[k] = x[k] = 0.f;
  }
  const float Dv = co.dvalid && in.D ? in.D[co.d] : 0.f;
  float dD = 0.f, dbias = 0.f;

  // x <- the states after steps [0, tl) of the staged tile; with keep, the state before each step
  // goes to sh.x.
  auto advance = [&](int tl, bool keep) {
    const int at0 = co.cl * pl.ts;
    for (int tt = 0; tt < tl; ++tt) {
      const float dt = sh.dt[at0 + tt], uu = sh.u[at0 + tt];
#pragma unroll
      for (int k = 0; k < SPT; ++k) {
        if (keep) sh.x[(tt * SPT + k) * kSlots + tid] = x[k];
        const float bv = grouped_at(in.B, pl, sh.B, gb, co.state(k), tt, Bf[k]);
        x[k] = exp2f(dt * A2[k]) * x[k] + dt * bv * uu;
      }
    }
  };
  auto stage_inputs = [&](int64_t t0, int tl, bool for_grad) {
    stage_channels<S>(in, pl, co, t0, tl, sh.u, sh.dt, for_grad ? sh.dsp : nullptr,
                      for_grad ? sh.z : nullptr, for_grad ? gout : nullptr, sh.g);
    if (in.B.groups) stage_grouped<S>(in, pl, co, in.B, pl.b_span, t0, tl, sh.B);
    if (in.C.groups && for_grad) stage_grouped<S>(in, pl, co, in.C, pl.c_span, t0, tl, sh.C);
    if (for_grad) {
      for (int i = tid; i < pl.b_span * pl.np * pl.ts; i += blockDim.x) sh.dB[i] = 0.f;
      for (int i = tid; i < pl.c_span * pl.np * pl.ts; i += blockDim.x) sh.dC[i] = 0.f;
    }
    __syncthreads();
  };

  for (int64_t chunk = in.n_chunks - 1; chunk >= 0; --chunk) {
    const int64_t cs = chunk * in.chunk_size;
    const int64_t ce = min(in.length, cs + in.chunk_size);
    const int n_tiles = static_cast<int>(ceil_div(ce - cs, pl.tile));
    for (int end = n_tiles, begin; end > 0; end = begin) {
      begin = segment_begin(end, pl.seg_tiles);
      // Tile start states of the segment [begin, end), from the chunk's checkpoint.
#pragma unroll
      for (int k = 0; k < SPT; ++k) {
        x[k] = co.owns(in, k)
                   ? p.checkpoints[((co.b * in.dim + co.d) * in.n_chunks + chunk) * N + co.state(k)]
                   : 0.f;
      }
      for (int ti = 0; ti < end; ++ti) {
        if (ti >= begin) {
#pragma unroll
          for (int k = 0; k < SPT; ++k) sh.bnd[((ti - begin) * SPT + k) * kSlots + tid] = x[k];
        }
        if (ti == end - 1) break;
        const int64_t t0 = cs + int64_t(ti) * pl.tile;
        stage_inputs(t0, static_cast<int>(min(int64_t(pl.tile), ce - t0)), false);
        advance(static_cast<int>(min(int64_t(pl.tile), ce - t0)), false);
        __syncthreads();
      }

      for (int ti = end - 1; ti >= begin; --ti) {
        const int64_t t0 = cs + int64_t(ti) * pl.tile;
        const int tl = static_cast<int>(min(int64_t(pl.tile), ce - t0));
        stage_inputs(t0, tl, true);
#pragma unroll
        for (int k = 0; k < SPT; ++k) x[k] = sh.bnd[((ti - begin) * SPT + k) * kSlots + tid];
        advance(tl, true);

        const int at0 = co.cl * pl.ts;
        for (int tt = tl - 1; tt >= 0; --tt) {
          const int at = at0 + tt;
          const float dt = sh.dt[at], uu = sh.u[at];
          float xp[SPT], xt[SPT], a[SPT], bv[SPT], cv[SPT];
          float yacc = 0.f;
#pragma unroll
          for (int k = 0; k < SPT; ++k) {
            xp[k] = sh.x[(tt * SPT + k) * kSlots + tid];
            a[k] = exp2f(dt * A2[k]);
            bv[k] = grouped_at(in.B, pl, sh.B, gb, co.state(k), tt, Bf[k]);
            cv[k] = grouped_at(in.C, pl, sh.C, gc, co.state(k), tt, Cf[k]);
            xt[k] = a[k] * xp[k] + dt * bv[k] * uu;
            yacc += cv[k] * xt[k];
          }
          float dy = sh.g[at], dz = 0.f;
          if (in.z.ptr) {
            const float y = group_sum(yacc, co.lanes) + Dv * uu, zz = sh.z[at];
            dz = dy * y * silu_grad(zz);
            dy *= silu(zz);
          }
          float ddt = 0.f, du = 0.f;
#pragma unroll
          for (int k = 0; k < SPT; ++k) {
            float dB, dC;
            selective_state_backward(xp[k], xt[k], a[k], dt, uu, A1[k], bv[k], cv[k], dy, carry[k],
                                     ddt, du, dA[k], dB, dC);
            if (co.owns(in, k)) {
              if (in.B.groups) {
                atomicAdd(&sh.dB[(gb * pl.np + co.state(k)) * pl.ts + tt], dB);
              } else {
                dBf[k] += dB;
              }
              if (in.C.groups) {
                atomicAdd(&sh.dC[(gc * pl.np + co.state(k)) * pl.ts + tt], dC);
              } else {
                dCf[k] += dC;
              }
            }
          }
          ddt = group_sum(ddt, co.lanes);
          du = group_sum(du, co.lanes);
          if (co.lane == 0) {
            sh.du[at] = du + dy * Dv;
            dD += dy * uu;
            const float draw = ddt * sh.dsp[at];
            sh.ddt[at] = draw;
            dbias += draw;
            sh.dz[at] = dz;
          }
        }
        __syncthreads();

        S* du_out = static_cast<S*>(p.du);
        S* ddt_out = static_cast<S*>(p.ddelta);
        S* dz_out = static_cast<S*>(p.dz);
        for (int i = tid; i < co.channels * pl.tile; i += blockDim.x) {
          const int c = i / pl.tile, tt = i % pl.tile;
          const int64_t dd = co.d0 + c;
          if (dd >= in.dim || tt >= tl) continue;
          const int64_t o = (co.b * in.dim + dd) * in.length + t0 + tt;
          du_out[o] = from_float<S>(sh.du[c * pl.ts + tt]);
          ddt_out[o] = from_float<S>(sh.ddt[c * pl.ts + tt]);
          if (dz_out) dz_out[o] = from_float<S>(sh.dz[c * pl.ts + tt]);
        }
        auto flush = [&](const ScanGrouped& g, int span, const float* acc, float* dst) {
          const int64_t first = co.d0 / (in.dim / g.groups);
          for (int i = tid; i < span * pl.np * pl.tile; i += blockDim.x) {
            const int gl = i / (pl.np * pl.tile), rem = i % (pl.np * pl.tile);
            const int st = rem / pl.tile, tt = rem % pl.tile;
            const int64_t grp = first + gl;
            const float v = acc[(gl * pl.np + st) * pl.ts + tt];
            if (grp < g.groups && st < N && tt < tl && v != 0.f) {
              atomicAdd(dst + ((co.b * g.groups + grp) * N + st) * in.length + t0 + tt, v);
            }
          }
        };
        if (in.B.groups) flush(in.B, pl.b_span, sh.dB, p.dB);
        if (in.C.groups) flush(in.C, pl.c_span, sh.dC, p.dC);
        __syncthreads();
      }
    }
  }
#pragma unroll
  for (int k = 0; k < SPT; ++k) {
    if (!co.owns(in, k)) continue;
    const int64_t dn = co.d * N + co.state(k);
    p.dinitial_state[state_row + co.state(k)] = carry[k];
    atomicAdd(p.dA + dn, dA[k]);
    if (!in.B.groups) atomicAdd(p.dB + dn, dBf[k]);
    if (!in.C.groups) atomicAdd(p.dC + dn, dCf[k]);
  }
  if (co.lane == 0 && co.dvalid) {
    if (p.dD) atomicAdd(p.dD + co.d, dD);
    if (p.ddelta_bias) atomicAdd(p.ddelta_bias + co.d, dbias);
  }
}

struct PickBwd {
  template <typename S>
  void (*operator()(S, int states) const)(SelectiveScanBwdParams, SelectiveScanPlan) {
    switch (states) {
      case 1:
        return selective_scan_bwd_kernel<S, 1>;
      case 2:
        return selective_scan_bwd_kernel<S, 2>;
      case 4:
        return selective_scan_bwd_kernel<S, 4>;
      case 8:
        return selective_scan_bwd_kernel<S, 8>;
    }
    return nullptr;
  }
};

}  // namespace

cudaError_t launch(const SelectiveScanBwdParams& p, cudaStream_t stream) {
  return launch_scan(p, true, stream, PickBwd{});
}

}  // namespace rnnkernels::cuda
