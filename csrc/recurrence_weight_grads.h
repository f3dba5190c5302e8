// The weight gradients of the recurrence, shared by the CPU and CUDA backward ops: after the
// sequential backward has produced the per-step gradients of the recurrent pre-activations,
// each weight gradient is one GEMM over all steps and rows (cpu::mm_tn_out: oneDNN or ATen's
// MKL on the CPU, cuBLAS on the GPU).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "cpu/onednn_matmul.h"
#include "rnnkernels/cells.h"

namespace rnnkernels {

// hs: (T+1, B, P) states (slot layout of csrc/cpu/recurrence.cpp); ws: (T, B, K*H) workspace;
// dgh: (T, B, G*H) gradients of gh = h W_hh^T + b_hh; dhp: (T, B, P) gradients of the projected
// state (projected LSTM only, else undefined); db: db_hh when the caller has summed dgh already,
// else undefined. Returns dW_hh, db_hh, dW_hr (empty (0,) without projection) in dtype out_type.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> recurrence_weight_grads(
    Cell cell, const at::Tensor& hs, const at::Tensor& ws, const at::Tensor& dgh,
    const at::Tensor& dhp, int64_t H, bool reverse, at::ScalarType out_type,
    const at::Tensor& db = at::Tensor()) {
  const int64_t T = ws.size(0), B = ws.size(1), P = hs.size(2), GH = dgh.size(2);
  const at::Tensor hp = hs.narrow(0, reverse ? 1 : 0, T).reshape({T * B, P});
  const at::Tensor dgh2 = dgh.view({T * B, GH});
  at::Tensor dw = at::empty({GH, P}, hs.options());
  if (cell == Cell::GRU_RESET_BEFORE) {
    // the n rows of W_hh multiply r * h_prev, kept in ws
    const at::Tensor v = ws.narrow(2, 3 * H, H).reshape({T * B, H});
    at::Tensor dw_rz = dw.narrow(0, 0, 2 * H), dw_n = dw.narrow(0, 2 * H, H);
    cpu::mm_tn_out(dw_rz, dgh2.narrow(1, 0, 2 * H), hp);
    cpu::mm_tn_out(dw_n, dgh2.narrow(1, 2 * H, H), v);
  } else {
    cpu::mm_tn_out(dw, dgh2, hp);
  }
  at::Tensor dw_hr = at::empty({0}, hs.options().dtype(out_type));
  if (dhp.defined()) {
    const at::Tensor hfull = ws.narrow(2, 5 * H, H).reshape({T * B, H});
    dw_hr = at::empty({P, H}, hs.options());
    cpu::mm_tn_out(dw_hr, dhp.view({T * B, P}), hfull);
    dw_hr = dw_hr.to(out_type);
  }
  return {dw.to(out_type), (db.defined() ? db : dgh2.sum(0)).to(out_type), dw_hr};
}

}  // namespace rnnkernels
