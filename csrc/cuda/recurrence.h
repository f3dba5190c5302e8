// CUDA kernels of the generic gated recurrence (cells.h), framework-free: raw pointers, sizes and
// a stream. Layouts are those of the CPU kernels (csrc/cpu/recurrence.cpp), so one autograd serves
// both: gx (T, B, G*H) in the storage type, hs (T+1 or 2, B, P) fp32 state slots (StepOrder),
// ws (T, B, K*H) fp32 per-step values of the cell (workspace_units in cells.h), y (T, B, P).
// All pointers are contiguous in these shapes.
//
// Two paths:
//  - persistent (recurrence_persistent.cu): one cooperative kernel runs all T steps, each block
//    keeping its slice of W_hh in shared memory; cells with one matmul per step and no projection
//    (LSTM, GRU, tanh/ReLU RNN), when the slices fit on chip.
//  - batched (recurrence_step.cu): per step, the caller runs the matmul as one GEMM over the
//    batch and these kernels fuse the cell's pointwise work; every cell, every size.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_plan.h"
#include "rnnkernels/cells.h"

namespace rnnkernels::cuda {

// ------------------------------------------------------------------ batched path

// Forward phases of one step, in order; the caller's GEMMs go between them:
//   gh = h_{t-1} W^T + b (W: rows r, z only for the reset-before GRU), then Main;
//   reset-before GRU: ghv = vbuf W_hn^T + b_hn, then ResetBeforeOut;
//   projected LSTM: hout = hfull W_hr^T, then Projection.
enum class StepFwdPhase : int { Main = 0, ResetBeforeOut = 1, Projection = 2 };

struct RecurrenceStepFwdParams {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  StepFwdPhase phase = StepFwdPhase::Main;
  int64_t batch = 0, hidden = 0, out = 0;  // B, H, P
  int64_t t = 0;                           // time index of the step
  bool projected = false;
  const int64_t* lengths = nullptr;  // (B,) valid steps per row, or null
  const void* gx = nullptr;          // (T, B, G*H)
  const float* gh = nullptr;         // (B, gh_cols)
  int64_t gh_cols = 0;
  const float* ghv = nullptr;  // (B, H) reset-before GRU: v W_hn^T + b_hn
  const float* hin = nullptr;  // (B, P) state before the step
  float* hout = nullptr;       // (B, P) state after the step
  float* hfull = nullptr;      // (B, H) unprojected output of the projected LSTM
  float* c = nullptr;          // (B, H) LSTM cell state, updated in place
  float* vbuf = nullptr;       // (B, H) reset-before GRU: r * h_{t-1}
  float* ws = nullptr;         // (T, B, K*H) or null (no save)
  void* y = nullptr;           // (T, B, P)
};

// Backward phases of one step, in order:
//   projected LSTM: Projection, then dhfull = dh W_hr;
//   Main; reset-before GRU: dv = dgh[:, 2H:] W_hn, then ResetBeforeGates;
//   then dh = dhd + dgh_t W (rows r, z only for the reset-before GRU).
enum class StepBwdPhase : int { Projection = 0, Main = 1, ResetBeforeGates = 2 };

struct RecurrenceStepBwdParams {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  StepBwdPhase phase = StepBwdPhase::Main;
  int64_t batch = 0, hidden = 0, out = 0;
  int64_t t = 0, t_prev = 0;  // time of the step and of the step before it in the forward
  bool first = false;         // the first forward step (c_{t-1} is c0)
  bool projected = false;
  const int64_t* lengths = nullptr;
  const void* grad_y = nullptr;  // (T, B, P) or null
  const float* hprev = nullptr;  // (B, P) state before the step
  const float* c0 = nullptr;     // (B, H) LSTM
  const float* ws = nullptr;     // (T, B, K*H)
  float* dh = nullptr;           // (B, P) gradient w.r.t. the state after the step
  float* dc = nullptr;           // (B, H) LSTM, updated in place
  const float* dhfull = nullptr; // (B, H) projected LSTM: dh W_hr
  float* dhp = nullptr;          // (T, B, P) projected LSTM: dh of every step (for dW_hr)
  float* dhd = nullptr;          // (B, P) direct part of the gradient w.r.t. h_{t-1}
  const float* dv = nullptr;     // (B, H) reset-before GRU: dn W_hn
  float* dgh = nullptr;          // (T, B, G*H) gradients of the recurrent pre-activations
  void* dgx = nullptr;           // (T, B, G*H) gradients of gx; may alias dgh (fp32)
};

cudaError_t launch(const RecurrenceStepFwdParams& p, cudaStream_t stream);
cudaError_t launch(const RecurrenceStepBwdParams& p, cudaStream_t stream);

// ------------------------------------------------------------------ persistent path

struct PersistentFwdParams {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  StepOrder order{0, false, false};
  int64_t batch = 0, hidden = 0;  // B, H (= P)
  const int64_t* lengths = nullptr;
  const void* gx = nullptr;    // (T, B, G*H)
  const void* w = nullptr;     // (G*H, H) W_hh in the storage type
  const void* bias = nullptr;  // (G*H,) b_hh or null
  float* hs = nullptr;         // slots; slot_in(0) holds h0 on entry
  float* c = nullptr;          // (B, H) LSTM: c0 on entry, c_T on exit
  float* ws = nullptr;         // (T, B, K*H) or null
  void* y = nullptr;           // (T, B, H)
};

struct PersistentBwdParams {
  Cell cell = Cell::LSTM;
  DType dtype = DType::F32;
  StepOrder order{0, false, true};
  int64_t batch = 0, hidden = 0;
  const int64_t* lengths = nullptr;
  const void* grad_y = nullptr;  // (T, B, H) or null
  const void* w = nullptr;       // (G*H, H)
  const float* hs = nullptr;     // (T+1, B, H)
  const float* c0 = nullptr;     // (B, H) LSTM
  const float* ws = nullptr;     // (T, B, K*H)
  float* dh = nullptr;   // (B, H) grad of h_T on entry, of h0 on exit
  float* dc = nullptr;   // (B, H) LSTM: grad of c_T on entry, of c0 on exit
  float* dhd = nullptr;  // (B, H) scratch
  float* dgh = nullptr;  // (T, B, G*H)
  void* dgx = nullptr;   // (T, B, G*H); may alias dgh (fp32)
};

// Whether the persistent kernel takes the problem on the current device (cell, sizes, shared
// memory, co-residency of the grid); `plan` is what launch needs. A cudaError_t other than
// cudaSuccess is a runtime failure, not a "does not fit".
cudaError_t persistent_plan(const PersistentFwdParams& p, PersistentPlan& plan);
cudaError_t persistent_plan(const PersistentBwdParams& p, PersistentPlan& plan);
cudaError_t launch(const PersistentFwdParams& p, const PersistentPlan& plan, cudaStream_t stream);
cudaError_t launch(const PersistentBwdParams& p, const PersistentPlan& plan, cudaStream_t stream);

}  // namespace rnnkernels::cuda
