// Small GEMM for the per-step matmul of the persistent CPU recurrence: C (M x N) = A (M x K) @ B
// (K x N) [+ bias], with B packed once per op call and reused for every step.
//
// Why not ATen/MKL: the per-step product is small (M = batch, K and N a few hundred) and the
// same B (a thread's slice of W_hh) multiplies every step. A BLAS call repacks B on every call
// (a copy of the whole slice per step) and, inside the recurrence's thread team, meets nested
// threading; together that cost as much as the multiply-adds. Here B is packed once into
// column panels of kNR columns, K-major inside a panel and zero-padded, so the inner loop reads
// kNV full vectors of a panel per k and broadcasts one value of A per row; where the product is
// formed in parts over k, each part's rows are stored together (KLayout).
//
// Decomposition: panels outer (a panel, K * kNR values, stays in L2 while every row block of A
// passes over it), row blocks of at most kPanelRows rows inner; a block keeps kPanelRows * kNV
// accumulators in registers (24 of the 32 AVX-512 registers, 12 of AVX2's 16), the row blocks
// balanced (for_each_register_block). Memory traffic per call: B once per row block from L2 (or L3
// when a thread's slice exceeds its L2), A once per panel from L1/L2, C written once. Blocking k
// into L1-sized pieces, so that B is read from L2 once per call, measured slower at M = 32: the
// partial sums' loads and stores between pieces cost more than the re-reads they save.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "lanes.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace rnnkernels::cpu {

// Rows per register block of the packed products below.
constexpr int kPanelRows = 6;

// The loop nest of the packed products: f(std::integral_constant<int, MR>{}, p, n0, cols, m0)
// for every panel p (columns [n0, n0 + cols), kNR at most) and every row block (MR rows from
// m0) of M rows. Row blocks are balanced (M = 32 runs as 6,6,5,5,5,5, not 6,6,6,6,6,2).
template <int64_t kNR, typename F>
void for_each_register_block(int64_t M, int64_t N, const F& f) {
  const int64_t blocks = (M + kPanelRows - 1) / kPanelRows;
  const int64_t base = M / blocks, extra = M % blocks;
  for (int64_t p = 0; p * kNR < N; ++p) {
    const int64_t n0 = p * kNR, cols = std::min(kNR, N - n0);
    int64_t m0 = 0;
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t rows = base + (blk < extra ? 1 : 0);
      switch (rows) {
        case 1: f(std::integral_constant<int, 1>{}, p, n0, cols, m0); break;
        case 2: f(std::integral_constant<int, 2>{}, p, n0, cols, m0); break;
        case 3: f(std::integral_constant<int, 3>{}, p, n0, cols, m0); break;
        case 4: f(std::integral_constant<int, 4>{}, p, n0, cols, m0); break;
        case 5: f(std::integral_constant<int, 5>{}, p, n0, cols, m0); break;
        default: f(std::integral_constant<int, kPanelRows>{}, p, n0, cols, m0); break;
      }
      m0 += rows;
    }
  }
}

// Half-open ranges of k (rows of a packed B), at most kMaxRanges.
struct KRanges {
  static constexpr int kMaxRanges = 8;
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

// Where the rows of a packed B lie. The products that form a step's matmul in parts (a thread's
// own part of the state first, the others' once they have arrived) each read a set of k ranges
// (a group); the rows of a group are stored panel by panel ([panel][the group's ranges in
// order][k]), so that one part's product reads one run of memory. Stored panel by panel over all
// of K instead, a part read K / 2 rows of each panel and jumped to the next: at batch 1, where a
// step's product streams a quarter to half a MB of B from L2 at the core's load rate, that cost
// 25-60% more than one run (a standalone timing of the product, 512 columns by K = 256 in two
// parts of 128: 3.0-3.9 us per step in the panel-major layout, 2.5 in this one, as in one part).
// Rows are in units of `row` k values (1, or a k-pair for bfloat16 dot products).
class KLayout {
 public:
  // A run of rows k in [begin, end) (in rows): row k of panel p at offset + p * pstride +
  // (k - begin) * row_size values of the packed data.
  struct Segment {
    int64_t begin, end, offset, pstride;
  };
  // Pieces of a product's k ranges, each within one segment.
  static constexpr int kMaxPieces = 4 * KRanges::kMaxRanges;
  struct Piece {
    int64_t begin, end;
    const Segment* seg;
  };
  struct Pieces {
    Piece piece[kMaxPieces];
    int count = 0;
  };

  // rows: the rows of a panel; groups: ranges of rows that partition [0, rows) (empty: one
  // group of all rows); row_size: values per row of a panel.
  KLayout(int64_t rows, int64_t panels, int64_t row_size, const std::vector<KRanges>& groups) {
    int64_t offset = 0, covered = 0;
    auto add_group = [&](const KRanges& g) {
      int64_t len = 0;
      for (int r = 0; r < g.count; ++r) len += g.end[r] - g.begin[r];
      int64_t prefix = 0;
      for (int r = 0; r < g.count; ++r) {
        segs_.push_back({g.begin[r], g.end[r], offset + prefix * row_size, len * row_size});
        prefix += g.end[r] - g.begin[r];
      }
      offset += panels * len * row_size;
      covered += len;
    };
    if (groups.empty()) {
      KRanges all;
      all.add(0, rows);
      add_group(all);
    } else {
      for (const KRanges& g : groups) add_group(g);
    }
    std::sort(segs_.begin(), segs_.end(),
              [](const Segment& a, const Segment& b) { return a.begin < b.begin; });
    for (size_t i = 0; i < segs_.size(); ++i) {
      TORCH_INTERNAL_ASSERT(segs_[i].begin == (i == 0 ? 0 : segs_[i - 1].end),
                            "KLayout: the groups must partition the rows");
    }
    TORCH_INTERNAL_ASSERT(covered == rows && (rows == 0 || segs_.back().end == rows),
                          "KLayout: the groups must partition the rows");
  }

  const std::vector<Segment>& segments() const { return segs_; }

  // ks (in rows) split at segment boundaries, in ks's order.
  Pieces pieces(const KRanges& ks) const {
    Pieces out;
    for (int r = 0; r < ks.count; ++r) {
      for (const Segment& sg : segs_) {
        const int64_t b = std::max(ks.begin[r], sg.begin), e = std::min(ks.end[r], sg.end);
        if (b >= e) continue;
        TORCH_INTERNAL_ASSERT(out.count < kMaxPieces);
        out.piece[out.count++] = {b, e, &sg};
      }
    }
    return out;
  }

 private:
  std::vector<Segment> segs_;
};

template <typename T>
class PackedPanels {
 public:
  using V = at::vec::Vectorized<T>;
  // Vectors per panel row: a block's kPanelRows x kNV accumulators, kNV values of B and the
  // broadcast value of A fit the vector registers (AVX-512's 32: 6 x 4 + 4 + 1; AVX2's 16:
  // 6 x 2 + 2 + 1, where 6 x 4 spilled).
  static constexpr int64_t kNV = lanes::kVectorRegisters >= 32 ? 4 : 2;
  static constexpr int64_t kNR = kNV * V::size();   // columns per panel
  using Ranges = KRanges;

  // Columns [n0, n0 + count) of B as a strided view: B(k, n0 + j) = base[k * stride_k +
  // j * stride_n], with bias[j] added to column n0 + j of every row of C (bias null: none).
  // A thread's slice of W_hh is a few such runs (one per gate block). PackedPanels takes runs
  // with stride_k == 1 (rows of W) or stride_n == 1 (columns of W).
  struct Columns {
    int64_t n0, count;
    const T* base;
    int64_t stride_k, stride_n;
    const T* bias;
  };

  // B (K x N) from column runs that cover [0, N) once, with its k ranges laid out for the
  // products over `groups` (KLayout; empty: one group). Runs with stride_k == 1 (rows of W as
  // columns of B) are packed by 16 x 16 tile transposes in registers (lanes::gather_lanes),
  // runs with stride_n == 1 by row copies: packing costs about one pass over B, which matters
  // because it happens on every op call (at::vec::transpose_mxn, whose tiles take their sizes at
  // run time, packed a 512 KB float slice in 100-200 us on the AMD EPYC Zen 4, the tiles here in
  // 30-55 us: 5-10% of a batch-1 LSTM inference call of 256 steps).
  PackedPanels(int64_t K, int64_t N, const std::vector<Columns>& runs,
               const std::vector<Ranges>& groups = {})
      : K_(K), N_(N), panels_((N + kNR - 1) / kNR), layout_(K, panels_, kNR, groups) {
    // Every value is written below but the padding columns of a last partial panel: only
    // those are cleared (clearing all of a 512 KB slice cost about 28 us per call).
    data_ = at::empty({std::max<int64_t>(1, panels_ * K * kNR)},
                      at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    T* d = data_.data_ptr<T>();
    if (N % kNR != 0) {
      for (const KLayout::Segment& sg : layout_.segments()) {
        T* last = d + sg.offset + (panels_ - 1) * sg.pstride;
        std::fill(last, last + (sg.end - sg.begin) * kNR, T(0));
      }
    }
    for (const Columns& r : runs) {
      TORCH_INTERNAL_ASSERT(r.stride_k == 1 || r.stride_n == 1);
      for (int64_t j0 = 0; j0 < r.count;) {
        const int64_t n = r.n0 + j0, p = n / kNR;
        const int64_t cols = std::min(r.count - j0, (p + 1) * kNR - n);
        for (const KLayout::Segment& sg : layout_.segments()) {
          const T* src = r.base + j0 * r.stride_n + sg.begin * r.stride_k;
          T* dst = d + sg.offset + p * sg.pstride + (n - p * kNR);
          const int64_t rows = sg.end - sg.begin;
          if (r.stride_k == 1) {
            for (int64_t c = 0; c < cols; c += V::size()) {
              lanes::gather_lanes(dst + c, src + c * r.stride_n, r.stride_n,
                                  std::min<int64_t>(V::size(), cols - c), rows, kNR);
            }
          } else {
            for (int64_t k = 0; k < rows; ++k) {
              std::copy(src + k * r.stride_k, src + k * r.stride_k + cols, dst + k * kNR);
            }
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
    d_ = data_.data_ptr<T>();
    bias_p_ = bias_.defined() ? bias_.data_ptr<T>() : nullptr;
  }

  // The packed data, for products formed outside this class (RowProjection): panel p's row k
  // of segment sg at data() + sg.offset + p * sg.pstride + (k - sg.begin) * kNR; bias() holds
  // panels() * kNR values (zero-padded), or is null.
  const T* data() const { return d_; }
  const T* bias() const { return bias_p_; }
  const KLayout& layout() const { return layout_; }
  int64_t panels() const { return panels_; }
  int64_t cols() const { return N_; }

  // C[m * ldc + n] = sum over the k in ks of A[m * lda + k] * B(k, n) [+ bias(n)] for m < M,
  // n < N; with accumulate, added to C instead of replacing it (and without the bias), so that
  // a product can be formed in parts as their inputs become ready. With stream, C's whole
  // aligned vectors are written with non-temporal stores (for a C that is large and read by no
  // one soon: panel_matmul.h; the caller fences).
  // Out of line: inlined into a large caller, its register blocks lose their registers.
  C10_NOINLINE void multiply(int64_t M, const T* a, int64_t lda, T* c, int64_t ldc,
                             const Ranges& ks, bool accumulate, bool stream = false) const {
    if (M <= 0 || N_ <= 0) return;
    const T* d = d_;
    const T* bias = bias_p_;
    const KLayout::Pieces pieces = layout_.pieces(ks);
    for_each_register_block<kNR>(M, N_, [&](auto mr, int64_t p, int64_t n0, int64_t cols,
                                            int64_t m0) {
      block<decltype(mr)::value>(a + m0 * lda, lda, d, p, bias && !accumulate ? bias + n0 : nullptr,
                                 c + m0 * ldc + n0, ldc, cols, pieces, accumulate, stream);
    });
  }

 private:
  // Independent multiply-add chains a register block keeps at least, where the registers allow:
  // a multiply-add waits 4 to 5 cycles for its accumulator and a core starts two a cycle. A block
  // of few rows (one; up to three on AVX2) holds fewer than that many accumulators, and its
  // product ran at the chains' latency (an AVX2 row of 2 vectors: two multiply-adds per 5
  // cycles); it adds consecutive k into kSets sets of accumulators in turn, summed at the end.
  static constexpr int64_t kMinChains = 8;

  template <int MR>
  void block(const T* a, int64_t lda, const T* d, int64_t p, const T* bias, T* c, int64_t ldc,
             int64_t cols, const KLayout::Pieces& pieces, bool accumulate, bool stream) const {
    constexpr int64_t VS = V::size();
    constexpr int64_t kSets = std::clamp<int64_t>((kMinChains + MR * kNV - 1) / (MR * kNV), 1, 4);
    V acc[kSets][MR][kNV];
    for (int64_t v = 0; v < kNV; ++v) {
      const int64_t n = std::min<int64_t>(VS, cols - v * VS);
      for (int m = 0; m < MR; ++m) {
        if (accumulate && n > 0) {
          acc[0][m][v] = V::loadu(c + m * ldc + v * VS, static_cast<int>(n));
        } else {
          acc[0][m][v] = bias ? V::loadu(bias + v * VS) : V(T(0));
        }
        for (int64_t j = 1; j < kSets; ++j) acc[j][m][v] = V(T(0));
      }
    }
    // The product of row k of the panel (at bk) into accumulator set j.
    auto row = [&](int64_t j, int64_t k, const T* bk) C10_ALWAYS_INLINE_ATTRIBUTE {
      V b[kNV];
      for (int64_t v = 0; v < kNV; ++v) b[v] = V::loadu(bk + v * VS);
      for (int m = 0; m < MR; ++m) {
        const V av(a[m * lda + k]);
        for (int64_t v = 0; v < kNV; ++v) acc[j][m][v] = at::vec::fmadd(av, b[v], acc[j][m][v]);
      }
    };
    for (int r = 0; r < pieces.count; ++r) {
      const KLayout::Piece& pc = pieces.piece[r];
      const T* bk = d + pc.seg->offset + p * pc.seg->pstride + (pc.begin - pc.seg->begin) * kNR;
      int64_t k = pc.begin;
      for (; k + kSets <= pc.end; k += kSets, bk += kSets * kNR) {
        for (int64_t j = 0; j < kSets; ++j) row(j, k + j, bk + j * kNR);
      }
      for (; k < pc.end; ++k, bk += kNR) row(0, k, bk);
    }
    for (int64_t j = 1; j < kSets; ++j) {
      for (int m = 0; m < MR; ++m) {
        for (int64_t v = 0; v < kNV; ++v) acc[0][m][v] = acc[0][m][v] + acc[j][m][v];
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int64_t v = 0; v < kNV; ++v) {
        const int64_t n = std::min<int64_t>(VS, cols - v * VS);
        if (n <= 0) break;
        T* out = c + m * ldc + v * VS;
        if (n == VS && stream && reinterpret_cast<uintptr_t>(out) % sizeof(V) == 0) {
          lanes::stream_store(out, acc[0][m][v]);
        } else if (n == VS) {
          acc[0][m][v].store(out);
        } else {
          acc[0][m][v].store(out, static_cast<int>(n));
        }
      }
    }
  }

  int64_t K_, N_, panels_;
  KLayout layout_;
  at::Tensor data_, bias_;
  // data_'s and bias_'s pointers (bias: null when undefined), taken once: a data_ptr call checks
  // the dtype and the storage, and batch-1 inference multiplies twice per step of a few
  // microseconds.
  const T* d_ = nullptr;
  const T* bias_p_ = nullptr;
};

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__)
// The mask of the first n of 16 float lanes (n clamped to [0, 16]).
inline __mmask16 lane_mask(int64_t n) {
  return static_cast<__mmask16>((1u << std::clamp<int64_t>(n, 0, 16)) - 1);
}

// The vector operations RowProjection is written in, on raw intrinsic types (see there why).
struct ProjectionIsa {
  using R = __m512;
  static constexpr int W = 16;
  static C10_ALWAYS_INLINE R zero() { return _mm512_setzero_ps(); }
  static C10_ALWAYS_INLINE R set1(float v) { return _mm512_set1_ps(v); }
  static C10_ALWAYS_INLINE R load(const float* p) { return _mm512_loadu_ps(p); }
  static C10_ALWAYS_INLINE R load(const float* p, int64_t n) {
    return _mm512_maskz_loadu_ps(lane_mask(n), p);
  }
  static C10_ALWAYS_INLINE void store(float* p, R v) { _mm512_storeu_ps(p, v); }
  static C10_ALWAYS_INLINE void store(float* p, R v, int64_t n) {
    _mm512_mask_storeu_ps(p, lane_mask(n), v);
  }
  static C10_ALWAYS_INLINE R fmadd(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static C10_ALWAYS_INLINE R add(R a, R b) { return _mm512_add_ps(a, b); }
};
#elif defined(CPU_CAPABILITY_AVX2) && defined(__x86_64__)
// Loads and stores of n lanes are masked only for n < 8: vmaskmovps is slow on AMD's cores, and
// plain loads and stores of the full panels made batch-1 inference faster in an in-process A/B
// on a Zen 2.
struct ProjectionIsa {
  using R = __m256;
  static constexpr int W = 8;
  // The mask of the first n of 8 lanes (all bits set in a lane below n).
  static C10_ALWAYS_INLINE __m256i mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(std::clamp<int64_t>(n, 0, 8))),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  static C10_ALWAYS_INLINE R zero() { return _mm256_setzero_ps(); }
  static C10_ALWAYS_INLINE R set1(float v) { return _mm256_set1_ps(v); }
  static C10_ALWAYS_INLINE R load(const float* p) { return _mm256_loadu_ps(p); }
  static C10_ALWAYS_INLINE R load(const float* p, int64_t n) {
    return n >= W ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask(n));
  }
  static C10_ALWAYS_INLINE void store(float* p, R v) { _mm256_storeu_ps(p, v); }
  static C10_ALWAYS_INLINE void store(float* p, R v, int64_t n) {
    if (n >= W) {
      _mm256_storeu_ps(p, v);
    } else {
      _mm256_maskstore_ps(p, mask(n), v);
    }
  }
  static C10_ALWAYS_INLINE R fmadd(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static C10_ALWAYS_INLINE R add(R a, R b) { return _mm256_add_ps(a, b); }
};
#endif

#if (defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)) && defined(__x86_64__)
#define RNNKERNELS_FUSED_INPUT 1
// The input projection of batch-1 inference in float32, x_t W^T + b for a thread's columns of
// W's rows, computed one block of kSteps steps ahead in small pieces (units) that ride along
// with the recurrent products of the steps before (multiply_row, one unit per 4 k of the
// product). Why: at batch 1 such a product streams the thread's slice of W_hh from L2 and
// leaves the multiply-add units about half idle, while the projection of a block of rows is
// bound by multiply-adds with its operands in L1; interleaved, the projection runs in the
// stream's shadow (a standalone timing on the AMD EPYC Zen 4 measured, 512 columns, K = I = 256,
// one thread: the batch-1 product alone 4.8 us per step, with its share of the projection
// interleaved 5.4, one after the other 7.1). A unit is one k of kRows rows of the block by
// kVecs vectors (W columns each) of W's columns: kRows * kVecs multiply-adds of the x values of
// the rows, held transposed (xt_[k * kSteps + r]) in L1, and a row of a PackedPanels of W's
// columns. The units run row block by row block for one vector group, then the next group, so
// that a block reads each row of W once from memory (the row blocks after the first find it in
// L1) and W passes through the caches once per kSteps steps. Written in intrinsics
// (ProjectionIsa): the unit's sums must stay in registers across the product's loop, which GCC
// did not manage with at::vec::Vectorized. They, a panel row's two sets of kNV accumulators and
// the operands fit the registers: on AVX-512 units of 16 rows by one vector, blocks of 16 steps
// (16 sums + 8 + 3 of 32 registers); on AVX2 4 rows by a panel's 2 vectors, blocks of 32 steps
// (8 + 4 + 4 of 16), where units of 8 rows by one vector, 8 steps a block, read 9 values per 8
// multiply-adds against 6 and the whole W every 8 steps (see FusedInput in recurrence.cpp).
class RowProjection {
 public:
  using Panels = PackedPanels<float>;
  using Isa = ProjectionIsa;
  using R = Isa::R;
  static constexpr int W = Isa::W;
  // A unit's shape (see above): kRows rows by kVecs vectors of W's columns, of a block of kSteps
  // rows.
#if defined(CPU_CAPABILITY_AVX512)
  static constexpr int kRows = W, kVecs = 1, kSteps = W;
#else
  static constexpr int kRows = 4, kVecs = static_cast<int>(Panels::kNV), kSteps = 32;
#endif
  static constexpr int kSums = kRows * kVecs;
  // Sequences from this many steps on are projected in the team (see recurrence_infer_cpu).
  static constexpr int kMinSteps = W;
  static_assert(kSteps % kRows == 0 && kSteps % W == 0 && Panels::kNV % kVecs == 0);

  // W's columns and bias as for PackedPanels (K = I, N columns); dest[j]: the offset of column
  // j in a row of the output.
  RowProjection(int64_t K, int64_t N, const std::vector<Panels::Columns>& runs,
                std::vector<int64_t> dest)
      : K_(K), N_(N), groups_((N + kVecs * W - 1) / (kVecs * W)), w_(K, N, runs),
        dest_(std::move(dest)), xt_(static_cast<size_t>(K * kSteps)),
        acc_(static_cast<size_t>(kSums * W)) {
    static_assert(Panels::V::size() == W);
    TORCH_INTERNAL_ASSERT(static_cast<int64_t>(dest_.size()) == N);
    for (int64_t vp = 0; vp * W < N; ++vp) {
      const int64_t n = std::min<int64_t>(W, N - vp * W);
      bool run = true;
      for (int64_t c = 1; c < n; ++c) run = run && dest_[vp * W + c] == dest_[vp * W] + c;
      contiguous_.push_back(run);
    }
  }

  // Units of the block begun last, and those of it still to run.
  int64_t units_per_block() const { return groups_ * row_blocks_ * K_; }
  int64_t units_left() const {
    return count_ == 0 ? 0 : ((groups_ - vg_) * row_blocks_ - rb_) * K_ - k_;
  }

  // Begins a block of count <= kSteps rows: x row r at x + r * ldx (ldx may be negative); row r
  // of the result goes to out + r * ldo (at the columns dest).
  void begin_block(const float* x, int64_t ldx, int count, float* out, int64_t ldo) {
    if (count < kSteps) std::fill(xt_.begin(), xt_.end(), 0.f);
    for (int r0 = 0; r0 < count; r0 += W) {
      lanes::gather_lanes(xt_.data() + r0, x + r0 * ldx, ldx, std::min(W, count - r0), K_,
                          kSteps);
    }
    std::fill(acc_.begin(), acc_.end(), 0.f);
    count_ = count;
    row_blocks_ = (count + kRows - 1) / kRows;
    out_ = out;
    ldo_ = ldo;
    vg_ = 0;
    rb_ = 0;
    k_ = 0;
  }

  // n units on their own.
  void run(int64_t n) {
    n = std::min(n, units_left());
    R s[kSums];
    load(s);
    for (; n > 0; --n) {
      unit(s, w_row(), x_col());
      if (++k_ == K_) finish(s);
    }
    store(s);
  }

  // w.multiply(1, a, ., c, ., ks, accumulate) with up to n units interleaved, one per 4 k of
  // the product; returns the units run.
  C10_NOINLINE int64_t multiply_row(const Panels& w, const float* a, float* c, const KRanges& ks,
                                    bool accumulate, int64_t n) {
    constexpr int64_t kNR = Panels::kNR, kNV = Panels::kNV;
    static_assert(kNR == kNV * W);
    n = std::min(n, units_left());
    const int64_t total = n;
    const KLayout::Pieces pieces = w.layout().pieces(ks);
    const float* d = w.data();
    const float* bias = accumulate ? nullptr : w.bias();
    R s[kSums];
    load(s);
    const float* sx = x_col();
    const float* sx_end = xt_.data() + K_ * kSteps + rb_ * kRows;
    const float* sw = w_row();
    for (int64_t p = 0; p < w.panels(); ++p) {
      const int64_t cols = std::min(kNR, w.cols() - p * kNR);
      // Two sets of accumulators, even and odd k (see PackedPanels::kMinChains).
      R acc[2][kNV];
      for (int64_t v = 0; v < kNV; ++v) {
        acc[0][v] = accumulate ? Isa::load(c + p * kNR + v * W, cols - v * W)
                               : (bias ? Isa::load(bias + p * kNR + v * W) : Isa::zero());
        acc[1][v] = Isa::zero();
      }
      // The product of row k of the panel (at bk) into set j.
      auto row = [&](int j, int64_t k, const float* bk) C10_ALWAYS_INLINE_ATTRIBUTE {
        const R av = Isa::set1(a[k]);
        for (int64_t v = 0; v < kNV; ++v) {
          acc[j][v] = Isa::fmadd(av, Isa::load(bk + v * W), acc[j][v]);
        }
      };
      for (int r = 0; r < pieces.count; ++r) {
        const KLayout::Piece& pc = pieces.piece[r];
        const float* bk =
            d + pc.seg->offset + p * pc.seg->pstride + (pc.begin - pc.seg->begin) * kNR;
        int64_t k = pc.begin;
        for (; n > 0 && k + 4 <= pc.end; k += 4, bk += 4 * kNR, --n) {
          for (int q = 0; q < 4; ++q) row(q % 2, k + q, bk + q * kNR);
          unit(s, sw, sx);
          sw += kNR;
          sx += kSteps;
          if (sx == sx_end) {
            finish(s);
            sw = w_row();
            sx = x_col();
            sx_end = xt_.data() + K_ * kSteps + rb_ * kRows;
          }
        }
        for (; k + 2 <= pc.end; k += 2, bk += 2 * kNR) {
          row(0, k, bk);
          row(1, k + 1, bk + kNR);
        }
        if (k < pc.end) row(0, k, bk);
      }
      for (int64_t v = 0; v < kNV; ++v) {
        Isa::store(c + p * kNR + v * W, Isa::add(acc[0][v], acc[1][v]), cols - v * W);
      }
    }
    k_ = (sx - (xt_.data() + rb_ * kRows)) / kSteps;
    store(s);
    return total - n;
  }

 private:
  static constexpr int64_t kGroupsPerPanel = Panels::kNV / kVecs;

  // Row k_ of W's vector group vg_ (kVecs vectors of a panel row).
  const float* w_row() const {
    constexpr int64_t kNR = Panels::kNR;
    return w_.data() + (vg_ / kGroupsPerPanel) * K_ * kNR + k_ * kNR +
           (vg_ % kGroupsPerPanel) * kVecs * W;
  }
  // The x values of row block rb_'s rows at k_.
  const float* x_col() const { return xt_.data() + k_ * kSteps + rb_ * kRows; }
  static C10_ALWAYS_INLINE void unit(R (&s)[kSums], const float* sw, const float* sx) {
    R wv[kVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kVecs; ++v) wv[v] = Isa::load(sw + v * W);
#pragma GCC unroll 16
    for (int r = 0; r < kRows; ++r) {
      const R xv = Isa::set1(sx[r]);
#pragma GCC unroll 4
      for (int v = 0; v < kVecs; ++v) s[r * kVecs + v] = Isa::fmadd(xv, wv[v], s[r * kVecs + v]);
    }
  }
  C10_ALWAYS_INLINE void load(R (&s)[kSums]) const {
#pragma GCC unroll 16
    for (int i = 0; i < kSums; ++i) s[i] = Isa::load(acc_.data() + i * W);
  }
  C10_ALWAYS_INLINE void store(const R (&s)[kSums]) {
#pragma GCC unroll 16
    for (int i = 0; i < kSums; ++i) Isa::store(acc_.data() + i * W, s[i]);
  }
  // The unit (vg_, rb_) is complete (s its sums): its rows (+ bias) to the output (flush), s
  // zeroed, on to the next row block, or the next vector group after the last.
  C10_ALWAYS_INLINE void finish(R (&s)[kSums]) {
    store(s);
    flush();
#pragma GCC unroll 16
    for (int i = 0; i < kSums; ++i) s[i] = Isa::zero();
    k_ = 0;
    if (++rb_ == row_blocks_) {
      rb_ = 0;
      ++vg_;
    }
  }
  void flush() {
    const float* bias = w_.bias();
    const int rows = std::min(kRows, count_ - static_cast<int>(rb_) * kRows);
    for (int v = 0; v < kVecs; ++v) {
      const int64_t vp = vg_ * kVecs + v, j0 = vp * W, n = std::min<int64_t>(W, N_ - j0);
      if (n <= 0) break;
      const R b = bias ? Isa::load(bias + j0) : Isa::zero();
      for (int r = 0; r < rows; ++r) {
        float* row = out_ + (rb_ * kRows + r) * ldo_;
        const R val = Isa::add(Isa::load(acc_.data() + (r * kVecs + v) * W), b);
        if (contiguous_[vp]) {
          Isa::store(row + dest_[j0], val, n);
        } else {
          float tmp[W];
          Isa::store(tmp, val);
          for (int64_t c = 0; c < n; ++c) row[dest_[j0 + c]] = tmp[c];
        }
      }
    }
  }

  int64_t K_, N_, groups_;
  Panels w_;
  std::vector<int64_t> dest_;
  std::vector<bool> contiguous_;
  lanes::Buffer<float> xt_;
  std::vector<float> acc_;
  int count_ = 0;
  float* out_ = nullptr;
  int64_t ldo_ = 0, row_blocks_ = 0, vg_ = 0, rb_ = 0, k_ = 0;
};
#endif

#if defined(CPU_CAPABILITY_AVX512) && defined(__x86_64__)
#define RNNKERNELS_BF16_DOT 1
#define RNNKERNELS_BF16_TARGET __attribute__((target("avx512bf16,avx512f,avx512bw,avx512vl")))

// Whether this CPU has AVX-512's bfloat16 dot products (vdpbf16ps), unless
// RNNKERNELS_BF16_DOT=0 turns them off (the tests run both).
inline bool bf16_dot_available() {
  const char* env = std::getenv("RNNKERNELS_BF16_DOT");
  if (env != nullptr && std::string(env) == "0") return false;
  return __builtin_cpu_supports("avx512bf16");
}

// PackedPanels for a bfloat16 B (weights stored in bfloat16; given here as their exact float
// values), multiplied by a float A rounded to bfloat16, with float accumulation: vdpbf16ps adds
// two products per lane, so a k-pair of a panel row takes the instructions a single k takes in
// float, and B takes half the bytes (the persistent recurrence's W_hh slice: half the L2
// stream of batch-1 inference). Panels of kNR columns hold k-pairs: B(2p, n) and B(2p + 1, n)
// side by side, K padded to even with zeros. A is rounded into a per-object buffer, the k
// ranges a call reads at a time (a step's own part before the others' state has arrived).
class PackedPanelsBF16 {
 public:
  static constexpr int64_t kNV = 4;           // float accumulator vectors per panel row
  static constexpr int64_t kNR = kNV * 16;    // columns per panel
  using Columns = PackedPanels<float>::Columns;
  using Ranges = PackedPanels<float>::Ranges;

  // As PackedPanels, with groups of k ranges that start at even k (and end at even k or K).
  PackedPanelsBF16(int64_t K, int64_t N, int64_t M, const std::vector<Columns>& runs,
                   const std::vector<Ranges>& groups = {})
      : K_(K), Kp_((K + 1) / 2), N_(N), panels_((N + kNR - 1) / kNR), M_(M),
        layout_(Kp_, panels_, kNR * 2, pair_groups(groups)) {
    const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
    data_ = at::zeros({std::max<int64_t>(1, panels_ * Kp_ * kNR * 2)}, bf16);
    c10::BFloat16* d = data_.data_ptr<c10::BFloat16>();
    for (const Columns& r : runs) {
      for (int64_t j = 0; j < r.count;) {
        const int64_t n = r.n0 + j, p = n / kNR, col = n - p * kNR;
        // Whole tiles of 16 columns that are rows of W: 16 x 16 k-pairs at a time (pack_tiles);
        // the rest value by value.
        const bool tile = r.stride_k == 1 && col % 16 == 0 && j + 16 <= r.count;
        const int64_t width = tile ? 16 : 1;
        for (const KLayout::Segment& sg : layout_.segments()) {
          c10::BFloat16* dst = d + sg.offset + p * sg.pstride + col * 2;
          const int64_t kb = 2 * sg.begin, ke = std::min(K, 2 * sg.end);
          const int64_t k0 =
              kb + (tile ? pack_tiles(r.base + j * r.stride_n + kb, r.stride_n, ke - kb, dst) : 0);
          for (int64_t i = 0; i < width; ++i) {
            for (int64_t k = k0; k < ke; ++k) {
              dst[((k - kb) / 2 * kNR + i) * 2 + (k & 1)] =
                  c10::BFloat16(r.base[k * r.stride_k + (j + i) * r.stride_n]);
            }
          }
        }
        j += width;
      }
      if (r.bias != nullptr) {
        if (!bias_.defined()) bias_ = at::zeros({panels_ * kNR}, at::kFloat);
        std::copy(r.bias, r.bias + r.count, bias_.data_ptr<float>() + r.n0);
      }
    }
    a_ = at::zeros({std::max<int64_t>(1, M * Kp_ * 2)}, bf16);
    d_ = reinterpret_cast<const uint16_t*>(data_.data_ptr<c10::BFloat16>());
    bias_p_ = bias_.defined() ? bias_.data_ptr<float>() : nullptr;
    a_p_ = reinterpret_cast<uint16_t*>(a_.data_ptr<c10::BFloat16>());
  }

  // Columns [col, col + 16) of a run of panel rows from 16 rows of W (src, row stride ld,
  // contiguous in k, len values of k): per 32 values of k, each row's 32 floats rounded to 16
  // bfloat16 pairs (one vector of 32-bit pairs), the 16 x 16 tile of pairs transposed in
  // registers and stored as 16 rows of the panel. Returns the k up to which it packed (a
  // multiple of 32); the caller packs the rest.
  RNNKERNELS_BF16_TARGET static int64_t pack_tiles(const float* src, int64_t ld, int64_t len,
                                                   c10::BFloat16* dst) {
    int64_t k = 0;
    for (; k + 32 <= len; k += 32) {
      __m512 t[16];
      for (int i = 0; i < 16; ++i) {
        const float* row = src + i * ld + k;
        t[i] = (__m512)_mm512_cvtne2ps_pbh(_mm512_loadu_ps(row + 16), _mm512_loadu_ps(row));
      }
      lanes::transpose16(t);
      for (int q = 0; q < 16; ++q) _mm512_storeu_ps(dst + (k / 2 + q) * kNR * 2, t[q]);
    }
    return k;
  }

  // As PackedPanels::multiply, A (M x K, row stride lda) float: the columns of A in ks are
  // rounded to bfloat16 first (ranges start at even k; an odd end takes the zero padding).
  RNNKERNELS_BF16_TARGET C10_NOINLINE void multiply(int64_t M, const float* a, int64_t lda,
                                                    float* c, int64_t ldc, const Ranges& ks,
                                                    bool accumulate) {
    if (M <= 0 || N_ <= 0) return;
    TORCH_INTERNAL_ASSERT(M <= M_);
    uint16_t* ab = a_p_;
    const int64_t lda2 = Kp_ * 2;
    for (int r = 0; r < ks.count; ++r) {
      TORCH_INTERNAL_ASSERT(ks.begin[r] % 2 == 0 && (ks.end[r] % 2 == 0 || ks.end[r] == K_));
      for (int64_t m = 0; m < M; ++m) {
        for (int64_t k = ks.begin[r]; k < ks.end[r]; k += 16) {
          const __mmask16 mask = lane_mask(ks.end[r] - k);
          const __m512 v = _mm512_maskz_loadu_ps(mask, a + m * lda + k);
          _mm256_mask_storeu_epi16(ab + m * lda2 + k, mask,
                                   (__m256i)_mm512_cvtneps_pbh(v));
        }
      }
    }
    const uint16_t* d = d_;
    const float* bias = bias_p_;
    const KLayout::Pieces pieces = layout_.pieces(pairs(ks));
    for_each_register_block<kNR>(M, N_, [&](auto mr, int64_t p, int64_t n0, int64_t cols,
                                            int64_t m0) RNNKERNELS_BF16_TARGET {
      block<decltype(mr)::value>(ab + m0 * lda2, lda2, d, p,
                                 bias && !accumulate ? bias + n0 : nullptr, c + m0 * ldc + n0,
                                 ldc, cols, pieces, accumulate);
    });
  }

 private:
  // Ranges of k as ranges of k-pairs.
  static Ranges pairs(const Ranges& ks) {
    Ranges out;
    for (int r = 0; r < ks.count; ++r) out.add(ks.begin[r] / 2, (ks.end[r] + 1) / 2);
    return out;
  }
  static std::vector<Ranges> pair_groups(const std::vector<Ranges>& groups) {
    std::vector<Ranges> out;
    for (const Ranges& g : groups) out.push_back(pairs(g));
    return out;
  }

  template <int MR>
  RNNKERNELS_BF16_TARGET C10_ALWAYS_INLINE void block(const uint16_t* a, int64_t lda,
                                                      const uint16_t* d, int64_t p,
                                                      const float* bias, float* c, int64_t ldc,
                                                      int64_t cols, const KLayout::Pieces& pieces,
                                                      bool accumulate) const {
    __m512 acc[MR][kNV];
    for (int64_t v = 0; v < kNV; ++v) {
      const __mmask16 mask = lane_mask(cols - v * 16);
      for (int m = 0; m < MR; ++m) {
        if (accumulate) {
          acc[m][v] = _mm512_maskz_loadu_ps(mask, c + m * ldc + v * 16);
        } else {
          acc[m][v] = bias ? _mm512_loadu_ps(bias + v * 16) : _mm512_setzero_ps();
        }
      }
    }
    for (int r = 0; r < pieces.count; ++r) {
      const KLayout::Piece& pc = pieces.piece[r];
      const uint16_t* bk =
          d + pc.seg->offset + p * pc.seg->pstride + (pc.begin - pc.seg->begin) * kNR * 2;
      for (int64_t kp = pc.begin; kp < pc.end; ++kp, bk += kNR * 2) {
        __m512i b[kNV];
        for (int64_t v = 0; v < kNV; ++v) b[v] = _mm512_loadu_si512(bk + v * 32);
        for (int m = 0; m < MR; ++m) {
          int32_t pair;
          std::memcpy(&pair, a + m * lda + kp * 2, sizeof(pair));
          const __m512i av = _mm512_set1_epi32(pair);
          for (int64_t v = 0; v < kNV; ++v) {
            acc[m][v] = _mm512_dpbf16_ps(acc[m][v], (__m512bh)av, (__m512bh)b[v]);
          }
        }
      }
    }
    for (int m = 0; m < MR; ++m) {
      for (int64_t v = 0; v < kNV; ++v) {
        if (cols <= v * 16) break;
        _mm512_mask_storeu_ps(c + m * ldc + v * 16, lane_mask(cols - v * 16), acc[m][v]);
      }
    }
  }

  int64_t K_, Kp_, N_, panels_, M_;
  KLayout layout_;
  at::Tensor data_, bias_, a_;
  const uint16_t* d_ = nullptr;  // the tensors' pointers, taken once (see PackedPanels)
  const float* bias_p_ = nullptr;
  uint16_t* a_p_ = nullptr;
};
#endif

}  // namespace rnnkernels::cpu
