// Float32 matmuls of the CPU kernels that go through oneDNN where it is faster than ATen's
// at::mm (MKL's sgemm): MKL runs its AVX2 kernels on AMD CPUs, and from Zen 5 (family 1Ah) on,
// whose AVX-512 units are full width, oneDNN's AVX-512 kernels do twice the work per cycle
// (the weight gradients of a B = 32, T = 128, H = 256 LSTM's backward ran in a little over half
// MKL's time). On Zen 4 (AVX-512 in two 256-bit halves) the two measured even, and on Intel
// CPUs MKL runs AVX-512 itself: at::mm stays there. RNNKERNELS_ONEDNN_MATMUL=1 or 0 forces the
// choice (tests run both paths on any machine).
#pragma once

#include <ATen/ATen.h>

namespace rnnkernels::cpu {

// Whether float32 matmuls go through oneDNN on this CPU: oneDNN's matmul is there, and the
// environment override, else the CPU's vendor and family, asks for it.
bool onednn_matmul_preferred();

// out (M, N) = a^T b for a (R, M) and b (R, N): the weight gradients' reduction over R rows.
// Through our packed panels where they are wanted (panel_matmul.h), else through
// oneDNN as (b^T a)^T when preferred and every tensor is float32 on the CPU, else at::mm_out.
void mm_tn_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b);

}  // namespace rnnkernels::cpu
