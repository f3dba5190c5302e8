#include "panel_matmul.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <string>
#include <vector>

#include "lanes.h"
#include "panel_gemm.h"
#include "workspace_cache.h"

namespace rnnkernels::cpu {

namespace {

// Rows of A a task multiplies (8 register blocks of 6 rows on AVX2; its rows of C, at most 1024
// columns, fit L2) and rows of k per packed block of B (a panel's part of it, 256 rows of 16
// values on AVX2, stays in L1 while the task's register blocks pass over it).
constexpr int64_t kBlockRows = 48;
constexpr int64_t kBlockDepth = 256;
// Columns of B per packed block of a row-major A's product (with kBlockDepth k: 256 KB).
constexpr int64_t kBlockCols = 256;
// C's values are stored non-temporally (PackedPanels::multiply's stream) from lanes::kStreamBytes
// on: plain stores of 64-byte-aligned rows cost the product about a fifth of its time on the AMD
// EPYC Zen 2 (a standalone timing of x W^T, 4096 x 256 times 256 x 1024, two threads: 16.2-17.1
// ms with plain stores, 13.0-13.1 non-temporal, 14.2-14.5 with C's rows 16 bytes off their cache
// lines).

// A matrix's element (i, j) at p[i * si + j * sj], one of si and sj 1.
struct Strided {
  const float* p;
  int64_t si, sj;
};

// t's strides with a unit stride in one dimension, where t has one (a dimension of size 1 takes
// any stride).
std::optional<Strided> strided(const at::Tensor& t) {
  int64_t si = t.stride(0), sj = t.stride(1);
  if (t.size(1) == 1) sj = 1;
  if (t.size(0) == 1 && sj != 1) si = 1;
  if (si != 1 && sj != 1) return std::nullopt;
  return Strided{t.data_ptr<float>(), si, sj};
}

bool float_cpu_matrix(const at::Tensor& t) {
  return t.dim() == 2 && t.is_cpu() && t.scalar_type() == at::kFloat;
}

}  // namespace

bool panel_matmul_preferred() {
  const char* forced = std::getenv("RNNKERNELS_PANEL_MATMUL");
  if (forced != nullptr && (std::string(forced) == "0" || std::string(forced) == "1")) {
    return std::string(forced) == "1";
  }
#if defined(CPU_CAPABILITY_AVX2)
  return true;
#else
  return false;
#endif
}

bool panel_mm_takes(const at::Tensor& a, const at::Tensor& b) {
  return float_cpu_matrix(a) && float_cpu_matrix(b) && a.size(1) == b.size(0) &&
         strided(a).has_value() && strided(b).has_value();
}

namespace {

// B's rows [k0, k0 + kn) packed (with the bias when k0 = 0).
PackedPanels<float> pack_rows(const Strided& Bm, int64_t k0, int64_t kn, int64_t N,
                              const float* bias) {
  return PackedPanels<float>(kn, N, std::vector<PackedPanels<float>::Columns>{
                                        {0, N, Bm.p + k0 * Bm.si, Bm.si, Bm.sj, bias}});
}

// c (M x N, row-major) = A B + bias for a row-major A (A(m, k) = A.p[m * lda + k]): B packed
// once in blocks of kBlockDepth k by kBlockCols columns (in parallel over them), then tasks of
// kBlockRows rows of A, each column block in turn: its rows of C there (kBlockRows x
// kBlockCols) stay in L1 and L2 over the k blocks, and a packed block (256 KB) in L2.
void rows_times_packed(float* c, const float* a, int64_t lda, const Strided& Bm, int64_t M,
                       int64_t K, int64_t N, const float* bias) {
  const int64_t blocks_k = (K + kBlockDepth - 1) / kBlockDepth;
  const int64_t blocks_n = (N + kBlockCols - 1) / kBlockCols;
  // packed[i * blocks_n + l]: rows [i * kBlockDepth, ...) of column block l
  std::vector<std::optional<PackedPanels<float>>> packed(static_cast<size_t>(blocks_k * blocks_n));
  at::parallel_for(0, blocks_k * blocks_n, 1, [&](int64_t q0, int64_t q1) {
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t k0 = q / blocks_n * kBlockDepth, n0 = q % blocks_n * kBlockCols;
      const Strided block{Bm.p + n0 * Bm.sj, Bm.si, Bm.sj};
      packed[q].emplace(pack_rows(block, k0, std::min(kBlockDepth, K - k0),
                                  std::min(kBlockCols, N - n0),
                                  k0 == 0 && bias != nullptr ? bias + n0 : nullptr));
    }
  });
  // C's last values written past the caches where C is larger than lanes::kStreamBytes.
  const bool stream = lanes::stream_output(M * N * static_cast<int64_t>(sizeof(float)));
  at::parallel_for(0, (M + kBlockRows - 1) / kBlockRows, 1, [&](int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t m0 = j * kBlockRows, mn = std::min(kBlockRows, M - m0);
      for (int64_t l = 0; l < blocks_n; ++l) {
        for (int64_t i = 0; i < blocks_k; ++i) {
          const int64_t k0 = i * kBlockDepth;
          KRanges ks;
          ks.add(0, std::min(kBlockDepth, K - k0));
          packed[i * blocks_n + l]->multiply(mn, a + m0 * lda + k0, lda,
                                             c + m0 * N + l * kBlockCols, N, ks, i > 0,
                                             stream && i == blocks_k - 1);
        }
      }
    }
    if (stream) lanes::stream_fence();
  });
}

// c (M x N, row-major) = A B for A given transposed (A(m, k) = A.p[k * lda + m]: the weight
// gradients' a^T b, a reduction over k = the rows of a and b). The threads split k: each packs
// its blocks of B and, per block, transposes kBlockRows columns of its rows of A at a time into a
// row-major buffer that stays in L1 (transposed whole rows at a time into an M x 256 buffer,
// the scattered writes ran the product at about MKL's speed, and slower at hidden 512; read in
// place, a register block's rows of one k share a cache line, and the block's A spanned too
// many lines to stay in L1 across the panels: about half the speed), multiplies it into its
// own (M x N) sum; the sums are added at the end, in a fixed order (the split, and so the float
// roundings, follows the number of threads).
void transposed_times_rows(at::Tensor& c, const float* a, int64_t lda, const Strided& Bm,
                           int64_t M, int64_t K, int64_t N) {
  const int64_t blocks_k = (K + kBlockDepth - 1) / kBlockDepth;
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), blocks_k);
  // Part p's sum: c for p = 0, else row p - 1 of sums.
  at::Tensor sums = at::empty({std::max<int64_t>(parts - 1, 0), M, N}, c.options());
  float* c_p = c.data_ptr<float>();
  float* sums_p = sums.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    constexpr int64_t W = lanes::Vec<float>::size();
    lanes::Buffer<float> rows(static_cast<size_t>(kBlockRows * kBlockDepth));
    for (int64_t p = p0; p < p1; ++p) {
      float* sum = p == 0 ? c_p : sums_p + (p - 1) * M * N;
      const int64_t i0 = blocks_k * p / parts, i1 = blocks_k * (p + 1) / parts;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t k0 = i * kBlockDepth, kn = std::min(kBlockDepth, K - k0);
        const PackedPanels<float> packed = pack_rows(Bm, k0, kn, N, nullptr);
        KRanges ks;
        ks.add(0, kn);
        for (int64_t m0 = 0; m0 < M; m0 += kBlockRows) {
          const int64_t mn = std::min(kBlockRows, M - m0);
          for (int64_t k = 0; k < kn; k += W) {  // rows[m * kn + k] = A(m0 + m, k0 + k)
            lanes::gather_lanes(rows.data() + k, a + (k0 + k) * lda + m0, lda,
                                std::min(W, kn - k), mn, kn);
          }
          packed.multiply(mn, rows.data(), kn, sum + m0 * N, N, ks, i > i0);
        }
      }
    }
  });
  if (parts > 1) {
    at::parallel_for(0, M, std::max<int64_t>(1, 4096 / std::max<int64_t>(N, 1)),
                     [&](int64_t m0, int64_t m1) {
      using V = lanes::Vec<float>;
      for (int64_t p = 1; p < parts; ++p) {
        at::vec::map2([](V x, V y) { return x + y; }, c_p + m0 * N, c_p + m0 * N,
                      sums_p + ((p - 1) * M + m0) * N, (m1 - m0) * N);
      }
    });
  }
}

}  // namespace

bool panel_mm_wanted(const at::Tensor& a, const at::Tensor& b) {
  if (!panel_matmul_preferred() || !panel_mm_takes(a, b)) return false;
  const int64_t M = a.size(0), K = a.size(1);
  return (strided(a)->sj == 1 ? M : K) >= kMinPanelRows;
}

void panel_mm_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b,
                  const at::Tensor& bias) {
  TORCH_INTERNAL_ASSERT(panel_mm_takes(a, b));
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  at::Tensor c = out.is_contiguous() ? out : at::empty({M, N}, a.options());
  const at::Tensor bias_c = bias.defined() ? bias.contiguous() : bias;
  if (M > 0 && N > 0 && K == 0) {
    if (bias_c.defined()) {
      c.copy_(bias_c.expand({M, N}));
    } else {
      c.zero_();
    }
  } else if (M > 0 && N > 0) {
    const Strided A = *strided(a), Bm = *strided(b);
    if (A.sj == 1) {
      rows_times_packed(c.data_ptr<float>(), A.p, A.si, Bm, M, K, N,
                        bias_c.defined() ? bias_c.data_ptr<float>() : nullptr);
    } else {
      transposed_times_rows(c, A.p, A.sj, Bm, M, K, N);
      if (bias_c.defined()) c.add_(bias_c);
    }
  }
  if (!c.is_same(out)) out.copy_(c);
}

namespace {

// The op behind rnnkernels.ops._linear: a @ b + bias through the panels where they are wanted
// (panel_mm_wanted), else ATen (MKL).
at::Tensor matmul_cpu(const at::Tensor& a, const at::Tensor& b,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0),
              "rnnkernels: matmul: a (M, K) and b (K, N) must be matrices with matching K");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == b.size(1)),
              "rnnkernels: matmul: bias must be (N,)");
  const bool with_bias = bias.has_value() && bias->defined();
  if (panel_mm_wanted(a, b) && (!with_bias || bias->scalar_type() == at::kFloat)) {
    at::Tensor out = cached_empty({a.size(0), b.size(1)}, a.options());
    panel_mm_out(out, a, b, with_bias ? *bias : at::Tensor());
    return out;
  }
  return with_bias ? at::addmm(*bias, a, b) : at::mm(a, b);
}

}  // namespace

}  // namespace rnnkernels::cpu

// No tensor argument to dispatch on: the one kernel serves every device.
TORCH_LIBRARY_IMPL(rnnkernels, CompositeExplicitAutograd, m) {
  m.impl("panel_matmul_preferred", &rnnkernels::cpu::panel_matmul_preferred);
}

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("matmul", &rnnkernels::cpu::matmul_cpu);
}
