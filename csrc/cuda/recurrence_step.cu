// Batched path of the recurrence: the pointwise work of one step, fused, for every cell. The
// caller runs the step's matmuls as GEMMs between the phases (recurrence.h lists the order).
//
// Decomposition: one thread per (batch row, hidden unit) (per output unit for the projection
// phases); no cooperation between threads, so any grid covers it.
// Memory per step and row: reads gx (G*H), gh (G*H), the state; writes the state, y and, when
// saving, the workspace (K*H fp32). Everything is read or written once.
#include "device_utils.cuh"
#include "recurrence.h"

namespace rnnkernels::cuda {
namespace {

constexpr int kStepThreads = 256;

template <typename S, typename M>
__global__ void __launch_bounds__(kStepThreads)
    step_fwd_kernel(RecurrenceStepFwdParams p, int64_t width) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * width) return;
  const int64_t b = idx / width, j = idx % width;
  const int64_t B = p.batch, H = p.hidden, P = p.out;
  const int64_t GH = num_gates(p.cell) * H, KH = workspace_units(p.cell, p.projected) * H;
  const bool masked = p.lengths != nullptr && p.t >= p.lengths[b];
  const S* gx = static_cast<const S*>(p.gx) + (p.t * B + b) * GH;
  S* y = static_cast<S*>(p.y) + (p.t * B + b) * P;
  float* ws = p.ws ? p.ws + (p.t * B + b) * KH : nullptr;
  const float* gh = p.gh + b * p.gh_cols;

  if (p.phase == StepFwdPhase::Projection) {  // j < P
    if (masked) {
      p.hout[b * P + j] = p.hin[b * P + j];
      y[j] = from_float<S>(0.f);
    } else {
      y[j] = from_float<S>(p.hout[b * P + j]);
    }
    return;
  }
  const float hprev = p.projected ? 0.f : p.hin[b * P + j];  // P == H without projection
  if (p.phase == StepFwdPhase::ResetBeforeOut) {
    if (masked) {
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
  if (masked) {
    if (!p.projected) p.hout[b * P + j] = hprev;
    if (ws) {
      const int k_units = workspace_units(p.cell, p.projected);
      for (int k = 0; k < k_units; ++k) ws[k * H + j] = 0.f;
      if (p.cell == Cell::LSTM) ws[4 * H + j] = p.c[b * H + j];  // c_{t-1} carries over
    }
    if (split) p.vbuf[b * H + j] = 0.f;
    if (!p.projected && !split) y[j] = from_float<S>(0.f);
    return;
  }
  switch (p.cell) {
    case Cell::LSTM: {
      float i, f, g, o, c, h;
      lstm_forward<float, M>(to_float(gx[j]) + gh[j], to_float(gx[H + j]) + gh[H + j],
                             to_float(gx[2 * H + j]) + gh[2 * H + j],
                             to_float(gx[3 * H + j]) + gh[3 * H + j], p.c[b * H + j], i, f, g, o,
                             c, h);
      p.c[b * H + j] = c;
      if (p.projected) {
        p.hfull[b * H + j] = h;
      } else {
        p.hout[b * P + j] = h;
        y[j] = from_float<S>(h);
      }
      if (ws) {
        ws[j] = i;
        ws[H + j] = f;
        ws[2 * H + j] = g;
        ws[3 * H + j] = o;
        ws[4 * H + j] = c;
        if (p.projected) ws[5 * H + j] = h;
      }
      break;
    }
    case Cell::GRU: {
      float r, z, n, h;
      const float hn = gh[2 * H + j];
      gru_forward<float, M>(to_float(gx[j]), to_float(gx[H + j]), to_float(gx[2 * H + j]), gh[j],
                            gh[H + j], hn, hprev, r, z, n, h);
      p.hout[b * P + j] = h;
      y[j] = from_float<S>(h);
      if (ws) {
        ws[j] = r;
        ws[H + j] = z;
        ws[2 * H + j] = n;
        ws[3 * H + j] = hn;
      }
      break;
    }
    case Cell::GRU_RESET_BEFORE: {
      float r, z, v;
      gru_rb_forward_gates<float, M>(to_float(gx[j]), to_float(gx[H + j]), gh[j], gh[H + j], hprev,
                                     r, z, v);
      p.vbuf[b * H + j] = v;
      if (ws) {
        ws[j] = r;
        ws[H + j] = z;
        ws[3 * H + j] = v;
      }
      break;
    }
    case Cell::RNN_TANH:
    case Cell::RNN_RELU: {
      const float h = rnn_forward<float, M>(to_float(gx[j]) + gh[j], p.cell == Cell::RNN_RELU);
      p.hout[b * P + j] = h;
      y[j] = from_float<S>(h);
      if (ws) ws[j] = h;
      break;
    }
  }
}

template <typename S, typename M>
__global__ void __launch_bounds__(kStepThreads)
    step_bwd_kernel(RecurrenceStepBwdParams p, int64_t width) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= p.batch * width) return;
  const int64_t b = idx / width, j = idx % width;
  const int64_t B = p.batch, H = p.hidden, P = p.out;
  const int64_t GH = num_gates(p.cell) * H, KH = workspace_units(p.cell, p.projected) * H;
  const bool masked = p.lengths != nullptr && p.t >= p.lengths[b];
  const S* gy = p.grad_y ? static_cast<const S*>(p.grad_y) + (p.t * B + b) * P : nullptr;
  const bool dgx_apart = p.dgx != static_cast<void*>(p.dgh);
  float* dgh = p.dgh + (p.t * B + b) * GH;
  S* dgx = static_cast<S*>(p.dgx) + (p.t * B + b) * GH;
  const float* ws = p.ws + (p.t * B + b) * KH;
  auto put = [&](int64_t col, float v) {
    dgh[col] = v;
    if (dgx_apart) dgx[col] = from_float<S>(v);
  };

  if (p.phase == StepBwdPhase::Projection) {  // j < P
    float* rec = p.dhp + (p.t * B + b) * P;
    if (masked) {
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
    if (masked) return;
    float dr, direct = p.dhd[b * P + j];
    gru_rb_backward_gates<float, M>(p.dv[b * H + j], ws[j], p.hprev[b * P + j], dr, direct);
    put(j, dr);
    p.dhd[b * P + j] = direct;
    return;
  }

  // Main: j < max(H, P); units j < H, direct-gradient columns j < P.
  if (masked) {
    if (j < H) {
      for (int g = 0; g < num_gates(p.cell); ++g) put(g * H + j, 0.f);
    }
    if (j < P) p.dhd[b * P + j] = p.dh[b * P + j];
    return;
  }
  const bool no_direct =
      p.cell == Cell::LSTM || p.cell == Cell::RNN_TANH || p.cell == Cell::RNN_RELU;
  if (j < P && no_direct) p.dhd[b * P + j] = 0.f;
  if (j >= H) return;
  float dH = p.projected ? p.dhfull[b * H + j] : p.dh[b * P + j];
  if (gy && !p.projected) dH += to_float(gy[j]);
  switch (p.cell) {
    case Cell::LSTM: {
      const float c_prev = p.first ? p.c0[b * H + j] : p.ws[(p.t_prev * B + b) * KH + 4 * H + j];
      float di, df, dg, do_, dc_prev;
      lstm_backward<float, M>(dH, p.dc[b * H + j], ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j],
                              ws[4 * H + j], c_prev, di, df, dg, do_, dc_prev);
      put(j, di);
      put(H + j, df);
      put(2 * H + j, dg);
      put(3 * H + j, do_);
      p.dc[b * H + j] = dc_prev;
      break;
    }
    case Cell::GRU: {
      float dxr, dxz, dxn, dhn, direct;
      gru_backward<float, M>(dH, ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j],
                             p.hprev[b * P + j], dxr, dxz, dxn, dhn, direct);
      dgh[j] = dxr;
      dgh[H + j] = dxz;
      dgh[2 * H + j] = dhn;
      dgx[j] = from_float<S>(dxr);
      dgx[H + j] = from_float<S>(dxz);
      dgx[2 * H + j] = from_float<S>(dxn);
      p.dhd[b * P + j] = direct;
      break;
    }
    case Cell::GRU_RESET_BEFORE: {
      float dn, dz, direct;
      gru_rb_backward_out<float, M>(dH, ws[H + j], ws[2 * H + j], p.hprev[b * P + j], dn, dz,
                                    direct);
      put(H + j, dz);
      put(2 * H + j, dn);
      p.dhd[b * P + j] = direct;
      break;
    }
    case Cell::RNN_TANH:
    case Cell::RNN_RELU:
      put(j, rnn_backward<float, M>(dH, ws[j], p.cell == Cell::RNN_RELU));
      break;
  }
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
