// Selective scan, forward. Decomposition: selective_scan_common.cuh (one block per batch row and
// group of channels, the N states of a channel spread over `lanes` threads, in registers for the
// whole sequence, the sequence walked in tiles staged through shared memory).
//
// Memory: u, delta, z and variable B / C are read once (B / C once per block that spans their
// group), out is written once; the state never leaves registers except for the checkpoints (the
// state at the start of every chunk of chunk_size steps, for the backward) and the last state.
// Per step and state: one exp2 and three FMAs; per step and channel one shuffle sum over lanes.
#include "selective_scan_common.cuh"

namespace rnnkernels::cuda {
namespace {

template <typename S, int SPT>
__global__ void __launch_bounds__(kScanThreads)
    selective_scan_fwd_kernel(SelectiveScanFwdParams p, SelectiveScanPlan pl) {
  extern __shared__ float smem[];
  const SelectiveScanInputs& in = p.in;
  const ScanCoords co(in, pl);
  const int64_t row = int64_t(co.channels) * pl.ts;
  float* s_u = smem;
  float* s_dt = s_u + row;
  float* s_z = s_dt + row;
  float* s_out = s_z + row;
  float* s_B = smem + pl.off_b;
  float* s_C = smem + pl.off_c;
  const int N = in.n_state;
  const int gb = co.local_group(in, in.B), gc = co.local_group(in, in.C);
  const int64_t state_row = (co.b * in.dim + co.d) * N;  // (batch, dim, N) tensors

  float A2[SPT], Bf[SPT], Cf[SPT], x[SPT];
#pragma unroll
  for (int k = 0; k < SPT; ++k) {
    const bool own = co.owns(in, k);
    const int64_t dn = co.d * N + co.state(k);
    A2[k] = own ? in.A[dn] * kLog2e : 0.f;
    Bf[k] = own && !in.B.groups ? static_cast<const float*>(in.B.ptr)[dn] : 0.f;
    Cf[k] = own && !in.C.groups ? static_cast<const float*>(in.C.ptr)[dn] : 0.f;
    x[k] = own && in.initial_state ? in.initial_state[state_row + co.state(k)] : 0.f;
  }
  const float Dv = co.dvalid && in.D ? in.D[co.d] : 0.f;

  int64_t next_checkpoint = 0;
  for (int64_t t0 = 0; t0 < in.length; t0 += pl.tile) {
    const int tl = static_cast<int>(min(int64_t(pl.tile), in.length - t0));
    stage_channels<S>(in, pl, co, t0, tl, s_u, s_dt, nullptr, s_z, nullptr, nullptr);
    if (in.B.groups) stage_grouped<S>(in, pl, co, in.B, pl.b_span, t0, tl, s_B);
    if (in.C.groups) stage_grouped<S>(in, pl, co, in.C, pl.c_span, t0, tl, s_C);
    __syncthreads();

    const int at0 = co.cl * pl.ts;
    for (int tt = 0; tt < tl; ++tt) {
      const int64_t t = t0 + tt;
      if (p.checkpoints && t == next_checkpoint) {
        float* ck = p.checkpoints + ((co.b * in.dim + co.d) * in.n_chunks + t / in.chunk_size) * N;
#pragma unroll
        for (int k = 0; k < SPT; ++k) {
          if (co.owns(in, k)) ck[co.state(k)] = x[k];
        }
        next_checkpoint += in.chunk_size;
      }
      const float dt = s_dt[at0 + tt], uu = s_u[at0 + tt];
      float acc = 0.f;
#pragma unroll
      for (int k = 0; k < SPT; ++k) {
        const float bv = grouped_at(in.B, pl, s_B, gb, co.state(k), tt, Bf[k]);
        const float cv = grouped_at(in.C, pl, s_C, gc, co.state(k), tt, Cf[k]);
        x[k] = exp2f(dt * A2[k]) * x[k] + dt * bv * uu;
        acc += cv * x[k];
      }
      acc = group_sum(acc, co.lanes);
      if (co.lane == 0) {
        float y = acc + Dv * uu;
        if (in.z.ptr) y *= silu(s_z[at0 + tt]);
        s_out[at0 + tt] = y;
      }
    }
    __syncthreads();

    S* out = static_cast<S*>(p.out);
    for (int i = threadIdx.x; i < co.channels * pl.tile; i += blockDim.x) {
      const int c = i / pl.tile, tt = i % pl.tile;
      const int64_t dd = co.d0 + c;
      if (dd < in.dim && tt < tl) {
        out[(co.b * in.dim + dd) * in.length + t0 + tt] = from_float<S>(s_out[c * pl.ts + tt]);
      }
    }
    // The next tile's staging writes other arrays; s_out is rewritten only after its barrier.
  }
#pragma unroll
  for (int k = 0; k < SPT; ++k) {
    if (co.owns(in, k)) p.last_state[state_row + co.state(k)] = x[k];
  }
}

struct PickFwd {
  template <typename S>
  void (*operator()(S, int states) const)(SelectiveScanFwdParams, SelectiveScanPlan) {
    switch (states) {
      case 1:
        return selective_scan_fwd_kernel<S, 1>;
      case 2:
        return selective_scan_fwd_kernel<S, 2>;
      case 4:
        return selective_scan_fwd_kernel<S, 4>;
      case 8:
        return selective_scan_fwd_kernel<S, 8>;
    }
    return nullptr;
  }
};

}  // namespace

cudaError_t launch(const SelectiveScanFwdParams& p, cudaStream_t stream) {
  return launch_scan(p, false, stream, PickFwd{});
}

cudaError_t selective_scan_fits(const SelectiveScanInputs& in, bool backward, bool& fits) {
  int64_t limit = 0;
  const cudaError_t err = scan_smem_limit(limit);
  fits = err == cudaSuccess && plan_selective_scan(scan_shape(in, backward), limit).fits;
  return err;
}

}  // namespace rnnkernels::cuda
