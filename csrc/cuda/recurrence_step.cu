// Batched path of the recurrence: the pointwise work of one step, fused, for every cell. The
// caller runs the step's matmuls as GEMMs between the phases (recurrence.h lists the order).
//
// Decomposition: one thread per (batch row, hidden unit) (per output unit for the projection
// phases); no cooperation between threads, so any grid covers it.
// Memory per step and row: reads gx (G*H), gh (G*H), the state; writes the state, y and, when
// saving, the workspace (K*H fp32). Everything is read or written once.
#include "recurrence.h"
#include "recurrence_cell.cuh"

namespace rnnkernels::cuda {
namespace {

constexpr int kStepThreads = 256;

// The thread's batch row b and unit (or output column) j of a step over width columns, the
// row's sizes, and whether the row is past its length at time t.
struct StepThread {
  int64_t b, j, B, H, P, GH, KH;
  bool masked;
  template <typename Params>
  __device__ StepThread(const Params& p, int64_t idx, int64_t width)
      : b(idx / width),
        j(idx % width),
        B(p.batch),
        H(p.hidden),
        P(p.out),
        GH(num_gates(p.cell) * p.hidden),
        KH(workspace_units(p.cell, p.projected) * p.hidden),
        masked(p.lengths != nullptr && p.t >= p.lengths[idx / width]) {}
};

template <typename S, typename M>
__global__ void __launch_bounds__(kStepThreads)
    step_fwd_kernel(RecurrenceStepFwdParams p, int64_t width) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * width) return;
  const StepThread th(p, idx, width);
  const int64_t b = th.b, j = th.j, B = th.B, H = th.H, P = th.P;
  const S* gx = static_cast<const S*>(p.gx) + (p.t * B + b) * th.GH;
  S* y = static_cast<S*>(p.y) + (p.t * B + b) * P;
  float* ws = p.ws ? p.ws + (p.t * B + b) * th.KH : nullptr;
  const float* gh = p.gh + b * p.gh_cols;

  if (p.phase == StepFwdPhase::Projection) {  // j < P
    if (th.masked) {
      p.hout[b * P + j] = p.hin[b * P + j];
      y[j] = from_float<S>(0.f);
    } else {
      y[j] = from_float<S>(p.hout[b * P + j]);
    }
    return;
  }
  const float hprev = p.projected ? 0.f : p.hin[b * P + j];  // P == H without projection
  if (p.phase == StepFwdPhase::ResetBeforeOut) {
    if (th.masked) {
      p.hout[b * P + j] = hprev;
      y[j] = from_float<S>(0.f);
      return;
    }
    const float z = M::sigmoid(to_float(gx[H + j]) + gh[H + j]);
    float n, h;
    gru_rb_forward_out<float, M>(to_float(gx[2 * H + j]), p.ghv[b * H + j], z, hprev, n, h);
    p.hout[b * P + j] = h;
    if (ws) ws[2 * H + j] = n;
    y[j] = from_float<S>(h);
    return;
  }

  const bool split = p.cell == Cell::GRU_RESET_BEFORE;
  if (th.masked) {
    if (!p.projected) p.hout[b * P + j] = hprev;
    if (ws) masked_workspace(p.cell, p.projected, H, j, p.c ? p.c[b * H + j] : 0.f, ws);
    if (split) p.vbuf[b * H + j] = 0.f;
    if (!p.projected && !split) y[j] = from_float<S>(0.f);
    return;
  }
  if (split) {  // phase 1 of the reset-before GRU: the gates and v = r * h_{t-1}
    float r, z, v;
    gru_rb_forward_gates<float, M>(to_float(gx[j]), to_float(gx[H + j]), gh[j], gh[H + j], hprev,
                                   r, z, v);
    p.vbuf[b * H + j] = v;
    if (ws) {
      ws[j] = r;
      ws[H + j] = z;
      ws[3 * H + j] = v;
    }
    return;
  }
  const float h = unit_forward<M>(
      p.cell, p.projected, H, j, [&](int g) { return to_float(gx[g * H + j]); },
      [&](int g) { return gh[g * H + j]; }, hprev, p.c ? p.c + b * H + j : nullptr, ws);
  if (p.projected) {
    p.hfull[b * H + j] = h;
  } else {
    p.hout[b * P + j] = h;
    y[j] = from_float<S>(h);
  }
}

template <typename S, typename M>
__global__ void __launch_bounds__(kStepThreads)
    step_bwd_kernel(RecurrenceStepBwdParams p, int64_t width) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * width) return;
  const StepThread th(p, idx, width);
  const int64_t b = th.b, j = th.j, B = th.B, H = th.H, P = th.P;
  const S* gy = p.grad_y ? static_cast<const S*>(p.grad_y) + (p.t * B + b) * P : nullptr;
  const bool dgx_apart = p.dgx != static_cast<void*>(p.dgh);
  float* dgh = p.dgh + (p.t * B + b) * th.GH;
  S* dgx = static_cast<S*>(p.dgx) + (p.t * B + b) * th.GH;
  const float* ws = p.ws + (p.t * B + b) * th.KH;
  auto put = [&](int g, float d_rec, float d_in) {
    dgh[g * H + j] = d_rec;
    if (dgx_apart) dgx[g * H + j] = from_float<S>(d_in);
  };

  if (p.phase == StepBwdPhase::Projection) {  // j < P
    float* rec = p.dhp + (p.t * B + b) * P;
    if (th.masked) {
      rec[j] = 0.f;
      return;
    }
    float d = p.dh[b * P + j];
    if (gy) d += to_float(gy[j]);
    p.dh[b * P + j] = d;
    rec[j] = d;
    return;
  }
  if (p.phase == StepBwdPhase::ResetBeforeGates) {  // j < H = P
    if (th.masked) return;
    float dr, direct = p.dhd[b * P + j];
    gru_rb_backward_gates<float, M>(p.dv[b * H + j], ws[j], p.hprev[b * P + j], dr, direct);
    put(0, dr, dr);
    p.dhd[b * P + j] = direct;
    return;
  }

  // Main: j < max(H, P); units j < H, direct-gradient columns j < P.
  if (th.masked) {
    if (j < H) {
      for (int g = 0; g < num_gates(p.cell); ++g) put(g, 0.f, 0.f);
    }
    if (j < P) p.dhd[b * P + j] = p.dh[b * P + j];
    return;
  }
  if (p.projected && j < P) p.dhd[b * P + j] = 0.f;  // the LSTM has no direct term
  if (j >= H) return;
  float dH = p.projected ? p.dhfull[b * H + j] : p.dh[b * P + j];
  if (gy && !p.projected) dH += to_float(gy[j]);
  const float hprev = p.projected ? 0.f : p.hprev[b * P + j];
  if (p.cell == Cell::GRU_RESET_BEFORE) {  // phase A; phase B (ResetBeforeGates) needs dv
    float dn, dz, direct;
    gru_rb_backward_out<float, M>(dH, ws[H + j], ws[2 * H + j], hprev, dn, dz, direct);
    put(1, dz, dz);
    put(2, dn, dn);
    p.dhd[b * P + j] = direct;
    return;
  }
  float c_prev = 0.f;
  if (p.cell == Cell::LSTM) {
    c_prev = p.first ? p.c0[b * H + j] : p.ws[(p.t_prev * B + b) * th.KH + 4 * H + j];
  }
  const float direct = unit_backward<M>(p.cell, H, j, dH, ws, c_prev, hprev,
                                        p.dc ? p.dc + b * H + j : nullptr, put);
  if (!p.projected) p.dhd[b * P + j] = direct;
}

unsigned grid_for(int64_t items) { return static_cast<unsigned>(ceil_div(items, kStepThreads)); }

}  // namespace

cudaError_t launch(const RecurrenceStepFwdParams& p, cudaStream_t stream) {
  const int64_t width = p.phase == StepFwdPhase::Projection ? p.out : p.hidden;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    step_fwd_kernel<S, CellMath<S>>
        <<<grid_for(p.batch * width), kStepThreads, 0, stream>>>(p, width);
    return cudaGetLastError();
  });
}

cudaError_t launch(const RecurrenceStepBwdParams& p, cudaStream_t stream) {
  int64_t width = p.hidden;
  if (p.phase == StepBwdPhase::Projection) width = p.out;
  if (p.phase == StepBwdPhase::Main && p.out > width) width = p.out;
  return dispatch_dtype(p.dtype, [&](auto tag) {
    using S = decltype(tag);
    step_bwd_kernel<S, CellMath<S>>
        <<<grid_for(p.batch * width), kStepThreads, 0, stream>>>(p, width);
    return cudaGetLastError();
  });
}

}  // namespace rnnkernels::cuda
