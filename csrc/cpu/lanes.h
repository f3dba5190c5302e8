// Lanes: moving a block of W rows of a (rows, L) tensor (row stride ld) to and from (L, W) lane
// layout (step t's values of the W rows as one vector), so that a scan over t runs one row per
// vector lane with no horizontal work. W x W tiles are transposed in registers; on AVX-512 and
// AVX2, whole float tiles take the 16 x 16 or 8 x 8 shuffle network, the rest (partial blocks
// and tails, other types) a generic tile with zero lanes. Shared by the CPU scan kernels and the
// transpose of onednn_matmul.cpp (transpose_blocks); also the scans' task scheduling
// (for_each_task).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <new>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

namespace rnnkernels::cpu::lanes {

template <typename T>
using Vec = at::vec::Vectorized<T>;

// Alignment of the kernels' lane buffers: a cache line.
inline constexpr std::align_val_t kBufferAlign{64};

// The lane buffers a thread has freed, kept for its next allocations of the same size, up to
// kLimitBytes a thread (the earliest kept go first; a larger buffer is freed). A kernel's calls at
// one shape allocate the same buffers on every call, each thread its own (the selective scan
// about 25 a thread, 64-byte aligned, up to 256 KB each at N = 16: aligned allocation takes
// glibc's slow path, and a large free consolidates and may trim its heap); kept, they come back
// in a few comparisons, still mapped: python -m bench.step_effect times the selective scan's
// training step with them kept and fresh (bench/results/cpu-2026-12-06-step-effect-buffers.md:
// fresh 1.02x the time at batch 2, dim 256, L 512, N 16, 1.12x at batch 1, dim 64, L 64). A
// thread's kept buffers are freed when it exits; a buffer freed after that (by a thread-local or
// static object destroyed later) goes straight back to the system. set_keeping(false)
// (rnnkernels.keep_cpu_lane_buffers) turns keeping off for every thread: buffers are then
// allocated and freed on every call, and those kept before stay with their threads until keeping
// is turned on again.
class FreedBuffers {
 public:
  static constexpr std::size_t kLimitBytes = std::size_t{4} << 20;

  // A kept buffer of exactly `bytes` (the most recently kept), or a new one.
  static void* take(std::size_t bytes) {
    FreedBuffers* kept = of_this_thread();
    return kept != nullptr ? kept->take_kept(bytes) : ::operator new(bytes, kBufferAlign);
  }
  // Keeps p, a buffer of `bytes` from take, for the calling thread's next takes.
  static void give(void* p, std::size_t bytes) {
    FreedBuffers* kept = of_this_thread();
    if (kept != nullptr) {
      kept->keep(p, bytes);
    } else {
      ::operator delete(p, kBufferAlign);
    }
  }
  // Whether threads keep their freed buffers (initially true); returns the previous setting.
  static bool set_keeping(bool keep) { return keeping_.exchange(keep, std::memory_order_relaxed); }

  FreedBuffers(const FreedBuffers&) = delete;
  FreedBuffers& operator=(const FreedBuffers&) = delete;

 private:
  struct Block {
    void* p;
    std::size_t bytes;
  };

  explicit FreedBuffers(bool* gone) : gone_(gone) {}
  ~FreedBuffers() {
    for (const Block& b : blocks_) ::operator delete(b.p, kBufferAlign);
    *gone_ = true;
  }

  // The calling thread's, or null while keeping is off or once it has been destroyed (the flag
  // is trivially destructible: readable to the end of the thread).
  static FreedBuffers* of_this_thread() {
    thread_local bool gone = false;
    if (gone || !keeping_.load(std::memory_order_relaxed)) return nullptr;
    thread_local FreedBuffers kept(&gone);
    return &kept;
  }

  void* take_kept(std::size_t bytes) {
    for (std::size_t i = blocks_.size(); i-- > 0;) {
      if (blocks_[i].bytes == bytes) {
        void* p = blocks_[i].p;
        blocks_.erase(blocks_.begin() + static_cast<std::ptrdiff_t>(i));
        held_ -= bytes;
        return p;
      }
    }
    return ::operator new(bytes, kBufferAlign);
  }

  void keep(void* p, std::size_t bytes) {
    if (bytes > kLimitBytes) {
      ::operator delete(p, kBufferAlign);
      return;
    }
    std::size_t evicted = 0;
    while (held_ + bytes > kLimitBytes) {
      held_ -= blocks_[evicted].bytes;
      ::operator delete(blocks_[evicted++].p, kBufferAlign);
    }
    blocks_.erase(blocks_.begin(), blocks_.begin() + static_cast<std::ptrdiff_t>(evicted));
    blocks_.push_back({p, bytes});
    held_ += bytes;
  }

  static inline std::atomic<bool> keeping_{true};
  bool* gone_;
  std::vector<Block> blocks_;
  std::size_t held_ = 0;
};

// Allocator of cache-line-aligned storage for the kernels' lane buffers, through the calling
// thread's FreedBuffers. std::vector's default (malloc: 16-byte alignment) made every 64-byte
// vector load and store of a buffer straddle two cache lines; in a standalone timing of the
// selective scan's backward recurrence on L1-resident buffers, 16-byte-offset buffers took 19-24
// cycles per step and state vector, 64-byte-aligned ones 13-15.
template <typename T>
struct CacheAligned {
  using value_type = T;
  CacheAligned() = default;
  template <typename U>
  CacheAligned(const CacheAligned<U>&) {}  // NOLINT: allocators convert implicitly
  T* allocate(std::size_t n) { return static_cast<T*>(FreedBuffers::take(n * sizeof(T))); }
  void deallocate(T* p, std::size_t n) { FreedBuffers::give(p, n * sizeof(T)); }
  // Elements are default-initialised: numbers are left as the allocation found them, not
  // zeroed (std::allocator's value-initialisation). Every buffer is written before it is read
  // (the whole test suite passed with every new float and double element set to NaN), and the
  // zeroing cost a memset of each thread's buffers on every call (about 450 KB for a selective
  // scan backward's).
  template <typename U>
  void construct(U* p) {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
  template <typename U>
  bool operator==(const CacheAligned<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheAligned<U>&) const { return false; }
};

// A kernel's per-task buffer of lanes (or of any values that vector loads and stores touch).
// Not zeroed on construction (see CacheAligned::construct): fill it where zeros are needed.
template <typename T>
using Buffer = std::vector<T, CacheAligned<T>>;

// Put before a loop over a register block kept as a small array of vectors (the selective scan's
// states of a pass): the loop fully unrolled. Without it GCC 12 kept a copy of such arrays on
// the stack and stored to it at every step (the scan's reverse pass two vectors per state and
// step, its recomputation one), although the loops ended up unrolled; with it the arrays stay
// in registers, and the scan's training step ran faster (alternating processes against the
// build before).
#define RNNKERNELS_UNROLL _Pragma("GCC unroll 16")

// Vector registers of the instruction set the kernels are compiled for: register blocks (the
// packed products' accumulators, the selective scan's states per pass) are sized by it.
constexpr int kVectorRegisters =
#if defined(CPU_CAPABILITY_AVX512)
    32;
#else
    16;
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// The shuffles of the float tile transposes below, overloaded by register width.
C10_ALWAYS_INLINE __m256 unpacklo(__m256 a, __m256 b) { return _mm256_unpacklo_ps(a, b); }
C10_ALWAYS_INLINE __m256 unpackhi(__m256 a, __m256 b) { return _mm256_unpackhi_ps(a, b); }
template <int kImm>
C10_ALWAYS_INLINE __m256 shuffle_within_lanes(__m256 a, __m256 b) {
  return _mm256_shuffle_ps(a, b, kImm);
}
#if defined(CPU_CAPABILITY_AVX512)
C10_ALWAYS_INLINE __m512 unpacklo(__m512 a, __m512 b) { return _mm512_unpacklo_ps(a, b); }
C10_ALWAYS_INLINE __m512 unpackhi(__m512 a, __m512 b) { return _mm512_unpackhi_ps(a, b); }
template <int kImm>
C10_ALWAYS_INLINE __m512 shuffle_within_lanes(__m512 a, __m512 b) {
  return _mm512_shuffle_ps(a, b, kImm);
}
#endif

// The first two rounds of an in-register transpose of a kRows x kRows float tile (row i =
// r[i], R: __m512 or __m256): unpack pairs of rows, then shuffle within 128-bit lanes. After
// them, r[4 i + j], 128-bit lane k, holds rows 4 i .. 4 i + 3 of column 4 k + j; the 128-bit
// lanes are left to exchange.
template <int kRows, typename R>
C10_ALWAYS_INLINE void transpose_within_lanes(R* r) {
  R b[kRows];
  for (int i = 0; i < kRows / 2; ++i) {
    b[2 * i] = unpacklo(r[2 * i], r[2 * i + 1]);
    b[2 * i + 1] = unpackhi(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < kRows / 4; ++i) {
    r[4 * i] = shuffle_within_lanes<0x44>(b[4 * i], b[4 * i + 2]);
    r[4 * i + 1] = shuffle_within_lanes<0xEE>(b[4 * i], b[4 * i + 2]);
    r[4 * i + 2] = shuffle_within_lanes<0x44>(b[4 * i + 1], b[4 * i + 3]);
    r[4 * i + 3] = shuffle_within_lanes<0xEE>(b[4 * i + 1], b[4 * i + 3]);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16 x 16 float tile (row i = r[i]): transpose_within_lanes, then two
// rounds of 128-bit lane shuffles; 64 shuffles, no memory.
C10_ALWAYS_INLINE void transpose16(__m512* r) {
  transpose_within_lanes<16>(r);
  __m512 b[16];
  for (int j = 0; j < 4; ++j) {
    b[j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0x88);
    b[4 + j] = _mm512_shuffle_f32x4(r[j], r[4 + j], 0xDD);
    b[8 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0x88);
    b[12 + j] = _mm512_shuffle_f32x4(r[8 + j], r[12 + j], 0xDD);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0x88);
    r[4 + j] = _mm512_shuffle_f32x4(b[4 + j], b[12 + j], 0x88);
    r[8 + j] = _mm512_shuffle_f32x4(b[j], b[8 + j], 0xDD);
    r[12 + j] = _mm512_shuffle_f32x4(b[4 + j], b[12 + j], 0xDD);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
// In-register transpose of an 8 x 8 float tile (row i = r[i]): transpose_within_lanes, then one
// round of 128-bit lane swaps; 24 shuffles (the generic tile's interleaves take 48).
C10_ALWAYS_INLINE void transpose8(__m256* r) {
  transpose_within_lanes<8>(r);
  __m256 b[8];
  for (int j = 0; j < 4; ++j) {
    b[j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x20);
    b[4 + j] = _mm256_permute2f128_ps(r[j], r[4 + j], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = b[i];
}
#endif

// In-register transpose of a W x W tile held as W vectors (row i = r[i]): log2(W) rounds of
// perfect shuffles, each interleaving row i with row i + W / 2.
template <typename T>
void transpose_tile(Vec<T>* r) {
  constexpr int64_t W = Vec<T>::size();
  Vec<T> next[W];
  for (int64_t round = 1; round < W; round *= 2) {
    for (int64_t i = 0; i < W / 2; ++i) {
      std::tie(next[2 * i], next[2 * i + 1]) = at::vec::interleave2(r[i], r[i + W / 2]);
    }
    std::copy(next, next + W, r);
  }
}

// The first n values of p as a vector (zero past n), converted to T. bfloat16 to float on
// AVX-512 and AVX2 is one widening and a shift (exact), not a loop over the values: the
// recurrences' bfloat16 products and pointwise passes and the scans' bfloat16 gathers read
// through it.
template <typename T, typename S>
Vec<T> load_as(const S* p, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    return Vec<T>::loadu(p, n);
  } else {
#if defined(CPU_CAPABILITY_AVX512)
    if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
      const __m256i bits =
          n == Vec<T>::size() ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                              : _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
#elif defined(CPU_CAPABILITY_AVX2)
    if constexpr (std::is_same_v<S, c10::BFloat16> && std::is_same_v<T, float>) {
      __m128i bits = _mm_setzero_si128();
      if (n == Vec<T>::size()) {
        bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      } else {
        std::memcpy(&bits, p, static_cast<size_t>(n) * sizeof(S));
      }
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
    }
#endif
    T buf[Vec<T>::size()] = {};
    for (int64_t k = 0; k < n; ++k) buf[k] = static_cast<T>(p[k]);
    return Vec<T>::loadu(buf);
  }
}

template <typename S, typename T>
void store_as(S* p, const Vec<T>& v, int64_t n) {
  if constexpr (std::is_same_v<S, T>) {
    v.store(p, n);
  } else {
    T buf[Vec<T>::size()];
    v.store(buf);
    for (int64_t k = 0; k < n; ++k) p[k] = static_cast<S>(buf[k]);
  }
}

// Whole W x W tiles of float on AVX-512 and AVX2 (the common case: every block but a group's
// last, every W steps but a chunk's last) go through transpose16 / transpose8 with plain loads
// and stores; the rest through the generic tile with zero lanes and partial rows.
template <typename T, typename S>
constexpr bool kFastTiles =
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
    std::is_same_v<T, float> && std::is_same_v<S, float>;
#else
    false;
#endif

// A whole float tile (r: W rows) transposed by the instruction set's network (kFastTiles).
C10_ALWAYS_INLINE void transpose_float_tile(Vec<float>* r) {
#if defined(CPU_CAPABILITY_AVX512)
  __m512 x[16];
  for (int i = 0; i < 16; ++i) x[i] = r[i];
  transpose16(x);
  for (int i = 0; i < 16; ++i) r[i] = x[i];
#elif defined(CPU_CAPABILITY_AVX2)
  __m256 x[8];
  for (int i = 0; i < 8; ++i) x[i] = r[i];
  transpose8(x);
  for (int i = 0; i < 8; ++i) r[i] = x[i];
#else
  transpose_tile(r);
#endif
}

// dst (len x W, row stride ldd): lane j < nc is row j of src (row stride ld, len values). With
// ldd = W (a lane buffer) lanes past nc are zero; with a wider ldd (dst a column block of a
// larger matrix: a transpose) they are left alone.
template <typename T, typename S>
void gather_lanes(T* dst, const S* src, int64_t ld, int64_t nc, int64_t len,
                  int64_t ldd = Vec<T>::size()) {
  constexpr int64_t W = Vec<T>::size();
  int64_t t0 = 0;
  if constexpr (kFastTiles<T, S>) {
    for (; nc == W && t0 + W <= len; t0 += W) {
      Vec<T> r[W];
      for (int64_t j = 0; j < W; ++j) r[j] = Vec<T>::loadu(src + j * ld + t0);
      transpose_float_tile(r);
      for (int64_t i = 0; i < W; ++i) r[i].store(dst + (t0 + i) * ldd);
    }
  }
  for (; t0 < len; t0 += W) {
    const int64_t n = std::min(W, len - t0);
    Vec<T> r[W];
    for (int64_t j = 0; j < W; ++j) r[j] = j < nc ? load_as<T>(src + j * ld + t0, n) : Vec<T>(0);
    transpose_tile(r);
    const int64_t stored = ldd == W ? W : nc;  // in a strided dst, lanes past nc are not ours
    for (int64_t i = 0; i < n; ++i) r[i].store(dst + (t0 + i) * ldd, static_cast<int>(stored));
  }
}

// Row blocks [k0, k1) (W rows each) of src (rows x cols, row stride cols) transposed into
// dst = src^T (cols x rows, row stride rows), converted to T: each block of W rows becomes a
// W-wide column block of dst (gather_lanes with dst's row stride).
template <typename T, typename S>
void transpose_blocks(T* dst, const S* src, int64_t rows, int64_t cols, int64_t k0, int64_t k1) {
  constexpr int64_t W = Vec<T>::size();
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t r0 = k * W;
    gather_lanes(dst + r0, src + r0 * cols, cols, std::min(W, rows - r0), cols, rows);
  }
}

// v stored at p (aligned to the vector's size) with a non-temporal store where the instruction
// set has one for T (float and double on AVX-512 and AVX2), else a plain one. The caller calls
// stream_fence before other threads read what it stored.
template <typename T>
C10_ALWAYS_INLINE void stream_store(T* p, const Vec<T>& v) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
  if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
#endif
  v.store(p);
}

// Orders the non-temporal stores before it (stream_store) before the stores after it.
C10_ALWAYS_INLINE void stream_fence() {
#if defined(__x86_64__)
  _mm_sfence();
#endif
}

// Size of an output from which a kernel stores its values non-temporally (stream_store): such an
// output does not stay in cache for its reader anyway, and plain stores read every line before
// writing it and evict what the caches held (panel_matmul.cpp says what it saved there; python -m
// bench.step_effect times the selective scan with and without).
constexpr int64_t kStreamBytes = int64_t{1} << 20;

// Whether a kernel stores an output of this many bytes non-temporally: from kStreamBytes on, or
// as RNNKERNELS_CPU_STREAM=1 or 0 forces (read on every call; python -m bench.step_effect times
// the selective scan both ways).
inline bool stream_output(int64_t bytes) {
  const char* forced = std::getenv("RNNKERNELS_CPU_STREAM");
  if (forced != nullptr && (std::strcmp(forced, "0") == 0 || std::strcmp(forced, "1") == 0)) {
    return forced[0] == '1';
  }
  return bytes >= kStreamBytes;
}

// Rows j < nc of dst (row stride ld, len values) = lane j of src (len x W). With stream, whole
// tiles whose rows start on a vector's alignment are stored non-temporally (stream_store; the
// caller calls stream_fence).
template <typename S, typename T>
void scatter_lanes(S* dst, int64_t ld, const T* src, int64_t nc, int64_t len,
                   bool stream = false) {
  constexpr int64_t W = Vec<T>::size();
  int64_t t0 = 0;
  if constexpr (kFastTiles<T, S>) {
    constexpr int64_t kAlign = sizeof(Vec<T>);
    stream = stream && (ld * static_cast<int64_t>(sizeof(S))) % kAlign == 0;
    for (; nc == W && t0 + W <= len; t0 += W) {
      Vec<T> r[W];
      for (int64_t i = 0; i < W; ++i) r[i] = Vec<T>::loadu(src + (t0 + i) * W);
      transpose_float_tile(r);
      if (stream && reinterpret_cast<uintptr_t>(dst + t0) % kAlign == 0) {
        for (int64_t j = 0; j < W; ++j) stream_store(dst + j * ld + t0, r[j]);
      } else {
        for (int64_t j = 0; j < W; ++j) r[j].store(dst + j * ld + t0);
      }
    }
  }
  for (; t0 < len; t0 += W) {
    const int64_t n = std::min(W, len - t0);
    Vec<T> r[W];
    for (int64_t i = 0; i < W; ++i) r[i] = i < n ? Vec<T>::loadu(src + (t0 + i) * W) : Vec<T>(0);
    transpose_tile(r);
    for (int64_t j = 0; j < nc; ++j) store_as(dst + j * ld + t0, r[j], n);
  }
}

// Work (lane x step updates: x N states in the selective scan) a scan task must carry before
// it gets a thread of its own: a parallel region per call (per chunk in the selective scan's
// backward) costs more than a tiny scan, and on a busy machine a region waits for a
// descheduled thread.
constexpr int64_t kMinTaskWork = int64_t{1} << 15;

// at::parallel_for's grain for tasks of work_per_task each: at least kMinTaskWork per thread.
inline int64_t task_grain(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinTaskWork / std::max<int64_t>(1, work_per_task));
}

// Runs f(work, i) for every task i in [0, n) on at::parallel_for's threads (as many as the first
// `sized` tasks, n by default, keep busy at grain tasks a thread: tasks past them are short
// follow-ups that do not call for a thread of their own), handing the tasks out one at a time
// from a shared counter instead of in equal contiguous ranges, so that a core that runs slower (a
// busy neighbour on a shared machine) takes fewer of them. work = make_work(), once per thread:
// its buffers. Which thread runs a task does not change the task's results.
template <typename MakeWork, typename F>
void for_each_task(int64_t n, int64_t grain, const MakeWork& make_work, const F& f,
                   int64_t sized = -1) {
  if (n <= 0) return;
  std::atomic<int64_t> next{0};
  const int64_t busy = sized < 0 ? n : std::max<int64_t>(sized, 1);
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), (busy + grain - 1) / grain);
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto work = make_work();
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed)) {
      f(work, i);
    }
  });
}

// A pause in a spin-wait loop (x86 pause: the core yields to its sibling and saves power).
C10_ALWAYS_INLINE void spin_pause() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// A prefetch of p's cache line into L2 (prefetcht1). As inline asm, because GCC counts a
// function whose body is only __builtin_prefetch as free of side effects and deletes its calls.
C10_ALWAYS_INLINE void prefetch_l2(const void* p) {
#if defined(__x86_64__)
  asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p)));
#else
  __builtin_prefetch(p, 0, 2);
#endif
}

// Asks for the rows j < nc of src (row stride ld, len values from each) to be brought into
// L2: the next gather's rows, 16 short pieces in as many pages, which the hardware prefetchers
// do not foresee (the backward walks the chunks in reverse) and which otherwise arrive at L3
// or memory latency, a row at a time.
template <typename S>
void prefetch_rows(const S* src, int64_t ld, int64_t nc, int64_t len) {
  constexpr int64_t kLine = 64 / sizeof(S);
  for (int64_t j = 0; j < nc; ++j) {
    for (int64_t t = 0; t < len; t += kLine) {
      prefetch_l2(src + j * ld + t);
    }
  }
}

}  // namespace rnnkernels::cpu::lanes
