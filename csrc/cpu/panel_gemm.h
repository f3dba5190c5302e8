// Small GEMM for the per-step matmul of the persistent CPU recurrence: C (M x N) = A (M x K) @ B
// (K x N) [+ bias], with B packed once per op call and reused for every step.
//
// Why not ATen/MKL: the per-step product is small (M = batch, K and N a few hundred) and the
// same B (a thread's slice of W_hh) multiplies every step. A BLAS call repacks B on every call
// (a copy of the whole slice per step) and, inside the recurrence's thread team, meets nested
// threading; together that cost as much as the multiply-adds. Here B is packed once into
// column panels of kNR columns, K-major inside a panel and zero-padded, so the inner loop reads
// kNV full vectors of a panel per k and broadcasts one value of A per row.
//
// Decomposition: panels outer (a panel, K * kNR values, stays in L2 while every row block of A
// passes over it), row blocks of at most kMR rows inner; a block keeps kMR * kNV accumulators
// in registers (24 of the 32 AVX-512 registers). Row blocks are balanced (M = 32 runs as
// 6,6,5,5,5,5, not 6,6,6,6,6,2). Memory traffic per call: B once from L2 (or L3 when a thread's
// slice exceeds its L2), A once per panel from L1/L2, C written once.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace rnnkernels::cpu {

template <typename T>
class PackedPanels {
 public:
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t kNV = 4;                 // vectors per panel row
  static constexpr int64_t kNR = kNV * V::size();   // columns per panel
  static constexpr int kMR = 6;                     // rows per register block

  // B(k, n) = value(k, n) for k < K, n < N; bias(n) when has_bias (added to every row of C).
  template <typename F, typename G>
  PackedPanels(int64_t K, int64_t N, const F& value, bool has_bias, const G& bias)
      : K_(K), N_(N), panels_((N + kNR - 1) / kNR) {
    data_ = at::empty({std::max<int64_t>(1, panels_ * K * kNR)},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* d = data_.data_ptr<T>();
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t n0 = p * kNR, n1 = std::min(N, n0 + kNR);
      for (int64_t k = 0; k < K; ++k) {
        T* row = d + (p * K + k) * kNR;
        for (int64_t n = n0; n < n1; ++n) row[n - n0] = value(k, n);
        std::fill(row + (n1 - n0), row + kNR, T(0));  // padding columns multiply to zero
      }
    }
    if (has_bias) {
      bias_ = at::zeros({panels_ * kNR}, data_.options());
      T* b = bias_.data_ptr<T>();
      for (int64_t n = 0; n < N; ++n) b[n] = bias(n);
    }
  }

  // C[m * ldc + n] = sum_k A[m * lda + k] * B(k, n) [+ bias(n)] for m < M, n < N.
  // Out of line: inlined into a large caller, its register blocks lose their registers.
  C10_NOINLINE void multiply(int64_t M, const T* a, int64_t lda, T* c,
                             int64_t ldc) const {
    if (M <= 0 || N_ <= 0) return;
    const int64_t blocks = (M + kMR - 1) / kMR;
    const int64_t base = M / blocks, extra = M % blocks;
    const T* d = data_.data_ptr<T>();
    const T* bias = bias_.defined() ? bias_.data_ptr<T>() : nullptr;
    for (int64_t p = 0; p < panels_; ++p) {
      const int64_t n0 = p * kNR;
      const int64_t cols = std::min(kNR, N_ - n0);
      int64_t m0 = 0;
      for (int64_t blk = 0; blk < blocks; ++blk) {
        const int64_t rows = base + (blk < extra ? 1 : 0);
        const T* ab = a + m0 * lda;
        T* cb = c + m0 * ldc + n0;
        const T* pb = d + p * K_ * kNR;
        const T* bb = bias ? bias + n0 : nullptr;
        switch (rows) {
          case 1: block<1>(ab, lda, pb, bb, cb, ldc, cols); break;
          case 2: block<2>(ab, lda, pb, bb, cb, ldc, cols); break;
          case 3: block<3>(ab, lda, pb, bb, cb, ldc, cols); break;
          case 4: block<4>(ab, lda, pb, bb, cb, ldc, cols); break;
          case 5: block<5>(ab, lda, pb, bb, cb, ldc, cols); break;
          default: block<6>(ab, lda, pb, bb, cb, ldc, cols); break;
        }
        m0 += rows;
      }
    }
  }

 private:
  template <int MR>
  void block(const T* a, int64_t lda, const T* panel, const T* bias, T* c, int64_t ldc,
             int64_t cols) const {
    constexpr int64_t VS = V::size();
    V acc[MR][kNV];
    for (int64_t v = 0; v < kNV; ++v) {
      const V init = bias ? V::loadu(bias + v * VS) : V(T(0));
      for (int m = 0; m < MR; ++m) acc[m][v] = init;
    }
    for (int64_t k = 0; k < K_; ++k) {
      const T* bk = panel + k * kNR;
      V b[kNV];
      for (int64_t v = 0; v < kNV; ++v) b[v] = V::loadu(bk + v * VS);
      for (int m = 0; m < MR; ++m) {
        const V av(a[m * lda + k]);
        for (int64_t v = 0; v < kNV; ++v) acc[m][v] = at::vec::fmadd(av, b[v], acc[m][v]);
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int64_t v = 0; v < kNV; ++v) {
        const int64_t n = std::min<int64_t>(VS, cols - v * VS);
        if (n <= 0) break;
        if (n == VS) {
          acc[m][v].store(c + m * ldc + v * VS);
        } else {
          acc[m][v].store(c + m * ldc + v * VS, static_cast<int>(n));
        }
      }
    }
  }

  int64_t K_, N_, panels_;
  at::Tensor data_, bias_;
};

}  // namespace rnnkernels::cpu
