// CUDA kernels of the selective scan (Mamba semantics, csrc/ops.cpp) and of the linear scan,
// framework-free: raw pointers, sizes, strides and a stream. Sequence tensors are (batch, dim, L)
// with unit stride along L; outputs are contiguous. All state and accumulation is fp32.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "launch_plan.h"

namespace rnnkernels::cuda {

// A (batch, dim, L) tensor in the storage type, unit stride along L.
struct ScanSeq {
  const void* ptr = nullptr;
  int64_t batch_stride = 0, dim_stride = 0;
};

// B or C of the selective scan: fixed (dim, N) fp32 contiguous when groups == 0, else
// (batch, groups, N, L) in the storage type with unit stride along L.
struct ScanGrouped {
  const void* ptr = nullptr;
  int groups = 0;
  int64_t batch_stride = 0, group_stride = 0, state_stride = 0;
};

struct SelectiveScanInputs {
  DType dtype = DType::F32;
  int64_t batch = 0, dim = 0, length = 0;
  int n_state = 0;
  int64_t chunk_size = 0, n_chunks = 0;  // checkpoints at the start of every chunk
  ScanSeq u, delta, z;                   // z.ptr null: no gate
  const float* A = nullptr;              // (dim, N)
  ScanGrouped B, C;
  const float* D = nullptr;              // (dim,) or null
  const float* delta_bias = nullptr;     // (dim,) or null
  bool delta_softplus = false;
  const float* initial_state = nullptr;  // (batch, dim, N) or null (zeros)
};

struct SelectiveScanFwdParams {
  SelectiveScanInputs in;
  void* out = nullptr;           // (batch, dim, L)
  float* last_state = nullptr;   // (batch, dim, N)
  float* checkpoints = nullptr;  // (batch, dim, n_chunks, N) or null (no save)
};

// Gradients: du, ddelta, dz in the storage type (dz only with z); the others fp32 accumulators
// that the kernel adds into (atomics across blocks), so the caller zeroes them: dA (dim, N);
// dB, dC (dim, N) fixed or (batch, groups, N, L) variable; dD, ddelta_bias (dim,) or null;
// dinitial_state (batch, dim, N) written, not added.
struct SelectiveScanBwdParams {
  SelectiveScanInputs in;
  const void* grad_out = nullptr;         // (batch, dim, L) contiguous
  const float* grad_last_state = nullptr; // (batch, dim, N) or null
  const float* checkpoints = nullptr;     // (batch, dim, n_chunks, N)
  void* du = nullptr;
  void* ddelta = nullptr;
  void* dz = nullptr;
  float* dA = nullptr;
  float* dB = nullptr;
  float* dC = nullptr;
  float* dD = nullptr;
  float* ddelta_bias = nullptr;
  float* dinitial_state = nullptr;
};

// cudaErrorInvalidConfiguration when N > kMaxStates or the chunk's tiles do not fit in shared
// memory (launch_plan.h); the plan is the caller's to check first with selective_scan_fits.
cudaError_t launch(const SelectiveScanFwdParams& p, cudaStream_t stream);
cudaError_t launch(const SelectiveScanBwdParams& p, cudaStream_t stream);
// Whether launch can take these inputs on the current device.
cudaError_t selective_scan_fits(const SelectiveScanInputs& in, bool backward, bool& fits);

// Linear scan h_t = a_t * h_{t-1} + b_t over (batch, channels, L).
struct LinearScanFwdParams {
  DType dtype = DType::F32;
  int64_t batch = 0, channels = 0, length = 0;
  ScanSeq a, b;
  const float* initial_state = nullptr;  // (batch, channels) or null (zeros)
  void* h = nullptr;                     // (batch, channels, L) contiguous
};

struct LinearScanBwdParams {
  DType dtype = DType::F32;
  int64_t batch = 0, channels = 0, length = 0;
  ScanSeq a, h, grad_h;
  const float* initial_state = nullptr;
  void* da = nullptr;               // (batch, channels, L) contiguous
  void* db = nullptr;               // (batch, channels, L) contiguous
  float* dinitial_state = nullptr;  // (batch, channels) or null
};

cudaError_t launch(const LinearScanFwdParams& p, cudaStream_t stream);
cudaError_t launch(const LinearScanBwdParams& p, cudaStream_t stream);

}  // namespace rnnkernels::cuda
