// Device helpers shared by the kernels: storage-type conversion, the math policy of the cells,
// warp reductions and the dtype dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "launch_plan.h"
#include "rnnkernels/cells.h"

namespace rnnkernels::cuda {

template <typename S>
__device__ __forceinline__ float to_float(S v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename S>
__device__ __forceinline__ S from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Math policy of the cells (cells.h) for 16-bit storage: the hardware approximations of exp and
// tanh (relative error about 2^-11, below half a unit of the 16-bit result). fp32 storage uses
// the accurate ScalarMath<float>, whose error fits the fp32 tolerances.
struct FastMath {
  static __device__ __forceinline__ float one() { return 1.f; }
  static __device__ __forceinline__ float zero() { return 0.f; }
  static __device__ __forceinline__ float sigmoid(float x) {
    return __fdividef(1.f, 1.f + __expf(-x));
  }
  static __device__ __forceinline__ float tanh_(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
  static __device__ __forceinline__ float relu(float x) { return x > 0.f ? x : 0.f; }
  static __device__ __forceinline__ float relu_grad(float y) { return y > 0.f ? 1.f : 0.f; }
};

template <typename S>
using CellMath = std::conditional_t<std::is_same_v<S, float>, ScalarMath<float>, FastMath>;

// Sum over aligned groups of `width` lanes (a power of two <= 32); every lane gets the sum.
// All 32 lanes of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int off = width >> 1; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Calls f with a value of the storage type of `d` (its type selects the template instance).
template <typename F>
cudaError_t dispatch_dtype(DType d, F&& f) {
  switch (d) {
    case DType::F32:
      return f(float{});
    case DType::F16:
      return f(__half{});
    case DType::BF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// Limits of the current device, for the planners of launch_plan.h.
inline cudaError_t device_limits(DeviceLimits& lim, int& major) {
  int dev = 0, smem = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&lim.sms, cudaDevAttrMultiProcessorCount, dev);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  }
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  }
  lim.smem_per_block = smem;
  constexpr int kPortableCluster = 8;
  lim.max_cluster = major >= 9 ? kPortableCluster : 0;
  return err;
}

}  // namespace rnnkernels::cuda
