// One hidden unit's pointwise work of the recurrence, for the cells with one matmul per step
// (LSTM, GRU reset-after, tanh/ReLU RNN), shared by the batched kernels (recurrence_step.cu) and
// the persistent ones (recurrence_persistent.cu): the cell math of cells.h plus the workspace
// layout (workspace_units) that the backward reads.
#pragma once

#include "device_utils.cuh"

namespace rnnkernels::cuda {

// Forward of unit j of one batch row. in(g) is the input-side pre-activation of gate g (gx),
// rec(g) the recurrent one (h_{t-1} W_hh^T + b_hh); c is the LSTM cell state, updated; ws the
// row's workspace (K*H) or null. Returns h (before the projection of a projected LSTM).
template <typename M, typename In, typename Rec>
__device__ __forceinline__ float unit_forward(Cell cell, bool projected, int64_t H, int64_t j,
                                              In in, Rec rec, float hprev, float* c, float* ws) {
  switch (cell) {
    case Cell::LSTM: {
      float i, f, g, o, c_new, h;
      lstm_forward<float, M>(in(0) + rec(0), in(1) + rec(1), in(2) + rec(2), in(3) + rec(3), *c,
                             i, f, g, o, c_new, h);
      *c = c_new;
      if (ws) {
        ws[j] = i;
        ws[H + j] = f;
        ws[2 * H + j] = g;
        ws[3 * H + j] = o;
        ws[4 * H + j] = c_new;
        if (projected) ws[5 * H + j] = h;
      }
      return h;
    }
    case Cell::GRU: {
      float r, z, n, h;
      const float hn = rec(2);
      gru_forward<float, M>(in(0), in(1), in(2), rec(0), rec(1), hn, hprev, r, z, n, h);
      if (ws) {
        ws[j] = r;
        ws[H + j] = z;
        ws[2 * H + j] = n;
        ws[3 * H + j] = hn;
      }
      return h;
    }
    default: {  // RNN_TANH, RNN_RELU
      const float h = rnn_forward<float, M>(in(0) + rec(0), cell == Cell::RNN_RELU);
      if (ws) ws[j] = h;
      return h;
    }
  }
}

// A batch row past its length at this step: its workspace holds zeros, except the LSTM's carried
// cell state, which the backward reads as the next step's c_{t-1}.
__device__ __forceinline__ void masked_workspace(Cell cell, bool projected, int64_t H, int64_t j,
                                                 float c, float* ws) {
  for (int k = 0; k < workspace_units(cell, projected); ++k) ws[k * H + j] = 0.f;
  if (cell == Cell::LSTM) ws[4 * H + j] = c;
}

// Backward of unit j of one batch row, given dH = dL/dh_t (incl. the output's gradient) and the
// row's workspace. put(g, dgh, dgx) stores gate g's gradients of the recurrent and of the input
// pre-activation (they differ for the GRU's n gate); dc is the LSTM's dL/dc, updated to
// dL/dc_{t-1}. Returns the part of dL/dh_{t-1} that does not pass through W_hh.
template <typename M, typename Put>
__device__ __forceinline__ float unit_backward(Cell cell, int64_t H, int64_t j, float dH,
                                               const float* ws, float c_prev, float hprev,
                                               float* dc, Put put) {
  switch (cell) {
    case Cell::LSTM: {
      float di, df, dg, do_, dc_prev;
      lstm_backward<float, M>(dH, *dc, ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j],
                              ws[4 * H + j], c_prev, di, df, dg, do_, dc_prev);
      put(0, di, di);
      put(1, df, df);
      put(2, dg, dg);
      put(3, do_, do_);
      *dc = dc_prev;
      return 0.f;
    }
    case Cell::GRU: {
      float dxr, dxz, dxn, dhn, direct;
      gru_backward<float, M>(dH, ws[j], ws[H + j], ws[2 * H + j], ws[3 * H + j], hprev, dxr,
                             dxz, dxn, dhn, direct);
      put(0, dxr, dxr);
      put(1, dxz, dxz);
      put(2, dhn, dxn);
      return direct;
    }
    default: {  // RNN_TANH, RNN_RELU
      const float d = rnn_backward<float, M>(dH, ws[j], cell == Cell::RNN_RELU);
      put(0, d, d);
      return 0.f;
    }
  }
}

}  // namespace rnnkernels::cuda
