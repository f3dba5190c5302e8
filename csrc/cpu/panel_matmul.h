// Float32 CPU matmuls of the recurrences' largest products (the input projection over all
// steps, its input gradient, the weight gradients) on the packed panels and register blocks of
// panel_gemm.h instead of MKL's sgemm or oneDNN's matmul, where that is faster: on builds
// without AVX-512 (this build's kernels AVX2). On the 2-core AMD EPYC Zen 2, standalone timings
// of the LSTM's three products at B = 32, T = 128, hidden 256 (4096 x 256 times 256 x 1024 and
// the two gradients): oneDNN 15.8-16.8 ms, MKL 17.6-18.5 for the weight gradient, the panels
// 12.8-14.0; python -m bench.matmul_effect at hidden 256: the LSTM's training step 106 -> 89.9
// ms, the GRU's 76.9 -> 68.3, the RNN's 28.8 -> 25.4 (bench/results/cpu-2026-12-05-matmul.md;
// at hidden 128 and 512 faster too). With AVX-512 (Zen 4 and 5, Intel) the vendors' kernels
// stay, unmeasured against these (onednn_matmul.h chooses between them).
// RNNKERNELS_PANEL_MATMUL=1 or 0 forces the choice (the tests run both).
//
// Decomposition (panel_matmul.cpp): for a row-major A, B is packed once per call in blocks of
// 256 k by 256 columns (in parallel over the blocks), then the threads take blocks of 48 rows of
// A, each multiplying its rows by every packed block, column block by column block, its rows of
// C there staying in L2 over the k blocks. For a transposed A (a weight gradient's a^T b, the
// reduction over the rows of a and b) the threads split the rows reduced over instead: each
// transposes whole rows of a into a buffer and adds its product to a sum of its own, and the
// sums are added at the end.
#pragma once

#include <ATen/ATen.h>

namespace rnnkernels::cpu {

// Rows of a (M; for a weight gradient's a^T b, the rows reduced over) from which a product goes
// through the panels where they are preferred: packing B on every call cost more than the
// panels saved below that (python: rnnkernels.ops._linear.MIN_ROWS, the same number).
constexpr int64_t kMinPanelRows = 1024;
// Whether the recurrences' float32 CPU matmuls go through panel_mm_out.
bool panel_matmul_preferred();

// Whether panel_mm_out takes a (M, K) @ b (K, N): float32 CPU matrices, each with a unit stride
// in one of its dimensions (a contiguous matrix or the transposed view of one).
bool panel_mm_takes(const at::Tensor& a, const at::Tensor& b);

// Whether a @ b goes through panel_mm_out: the panels are preferred, take the operands, and
// a has kMinPanelRows rows (a transposed a: kMinPanelRows rows reduced over, K).
bool panel_mm_wanted(const at::Tensor& a, const at::Tensor& b);

// out (M, N) = a @ b [+ bias (N,), when defined], for operands panel_mm_takes.
void panel_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias);

}  // namespace rnnkernels::cpu
