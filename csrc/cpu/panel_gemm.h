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
// 6,6,5,5,5,5, not 6,6,6,6,6,2). Memory traffic per call: B once per row block from L2 (or L3
// when a thread's slice exceeds its L2), A once per panel from L1/L2, C written once. Blocking k
// into L1-sized pieces, so that B is read from L2 once per call, measured slower at M = 32: the
// partial sums' loads and stores between pieces cost more than the re-reads they save.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace rnnkernels::cpu {

template <typename T>
class PackedPanels {
 public:
  using V = at::vec::Vectorized<T>;
  static constexpr int64_t kNV = 4;                 // vectors per panel row
  static constexpr int64_t kNR = kNV * V::size();   // columns per panel
  static constexpr int kMR = 6;                     // rows per register block

  // Columns [n0, n0 + count) of B as a strided view: B(k, n0 + j) = base[k * stride_k +
  // j * stride_n], with bias[j] added to column n0 + j of every row of C (bias null: none).
  // A thread's slice of W_hh is a few such runs (one per gate block).
  struct Columns {
    int64_t n0, count;
    const T* base;
    int64_t stride_k, stride_n;
    const T* bias;
  };

  // B (K x N) from column runs that cover [0, N) once. Runs with stride_k == 1 (rows of W as columns of B) are packed by 16 x 16 tile
  // transposes, runs with stride_n == 1 by row copies: packing costs about one pass over B,
  // which matters because it happens on every op call.
  PackedPanels(int64_t K, int64_t N, const std::vector<Columns>& runs)
      : K_(K), N_(N), panels_((N + kNR - 1) / kNR) {
    data_ = at::zeros({std::max<int64_t>(1, panels_ * K * kNR)},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* d = data_.data_ptr<T>();
    for (const Columns& r : runs) {
      for (int64_t j0 = 0; j0 < r.count;) {
        const int64_t n = r.n0 + j0, p = n / kNR;
        const int64_t cols = std::min(r.count - j0, (p + 1) * kNR - n);
        const T* src = r.base + j0 * r.stride_n;
        T* dst = d + p * K * kNR + (n - p * kNR);
        if (r.stride_k == 1) {
          at::vec::transpose_mxn<T>(src, r.stride_n, dst, kNR, static_cast<int>(cols),
                                    static_cast<int>(K));
        } else {
          for (int64_t k = 0; k < K; ++k) {
            for (int64_t j = 0; j < cols; ++j) dst[k * kNR + j] = src[k * r.stride_k + j * r.stride_n];
          }
        }
        j0 += cols;
      }
    }
    for (const Columns& r : runs) {
      if (r.bias == nullptr) continue;
      if (!bias_.defined()) bias_ = at::zeros({panels_ * kNR}, data_.options());
      std::copy(r.bias, r.bias + r.count, bias_.data_ptr<T>() + r.n0);
    }
  }

  // Half-open ranges of k, at most kMaxRanges.
  static constexpr int kMaxRanges = 8;
  struct Ranges {
    int64_t begin[kMaxRanges], end[kMaxRanges];
    int count = 0;
    void add(int64_t b, int64_t e) {
      TORCH_INTERNAL_ASSERT(count < kMaxRanges);
      if (e > b) {
        begin[count] = b;
        end[count++] = e;
      }
    }
  };

  // C[m * ldc + n] = sum over the k in ks of A[m * lda + k] * B(k, n) [+ bias(n)] for m < M,
  // n < N; with accumulate, added to C instead of replacing it (and without the bias), so that
  // a product can be formed in parts as their inputs become ready.
  // Out of line: inlined into a large caller, its register blocks lose their registers.
  C10_NOINLINE void multiply(int64_t M, const T* a, int64_t lda, T* c, int64_t ldc,
                             const Ranges& ks, bool accumulate) const {
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
        const T* bb = bias && !accumulate ? bias + n0 : nullptr;
        switch (rows) {
          case 1: block<1>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
          case 2: block<2>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
          case 3: block<3>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
          case 4: block<4>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
          case 5: block<5>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
          default: block<6>(ab, lda, pb, bb, cb, ldc, cols, ks, accumulate); break;
        }
        m0 += rows;
      }
    }
  }

 private:
  template <int MR>
  void block(const T* a, int64_t lda, const T* panel, const T* bias, T* c, int64_t ldc,
             int64_t cols, const Ranges& ks, bool accumulate) const {
    constexpr int64_t VS = V::size();
    V acc[MR][kNV];
    for (int64_t v = 0; v < kNV; ++v) {
      const int64_t n = std::min<int64_t>(VS, cols - v * VS);
      for (int m = 0; m < MR; ++m) {
        if (accumulate && n > 0) {
          acc[m][v] = V::loadu(c + m * ldc + v * VS, static_cast<int>(n));
        } else {
          acc[m][v] = bias ? V::loadu(bias + v * VS) : V(T(0));
        }
      }
    }
    for (int r = 0; r < ks.count; ++r) {
      for (int64_t k = ks.begin[r]; k < ks.end[r]; ++k) {
        const T* bk = panel + k * kNR;
        V b[kNV];
        for (int64_t v = 0; v < kNV; ++v) b[v] = V::loadu(bk + v * VS);
        for (int m = 0; m < MR; ++m) {
          const V av(a[m * lda + k]);
          for (int64_t v = 0; v < kNV; ++v) acc[m][v] = at::vec::fmadd(av, b[v], acc[m][v]);
        }
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
