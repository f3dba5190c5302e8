#include "workspace_cache.h"

#include "lanes.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <torch/library.h>

#include <atomic>
#include <list>
#include <mutex>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sys/mman.h>
#define RNNKERNELS_CACHE_MMAP 1
#endif

namespace rnnkernels::cpu {

namespace {

// Buffers are whole multiples of a huge page, mapped on their own: a freed buffer's pages never
// return to malloc's heap, and where the kernel has transparent huge pages on request, their
// first touch takes one fault per 2 MiB instead of one per 4 KiB.
constexpr size_t kGranule = size_t{2} << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

void* map_bytes(size_t bytes) {
#ifdef RNNKERNELS_CACHE_MMAP
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
#ifdef MADV_HUGEPAGE
  madvise(p, bytes, MADV_HUGEPAGE);  // a hint: where refused, 4 KiB pages serve as well
#endif
  return p;
#else
  return c10::alloc_cpu(bytes);
#endif
}

void unmap_bytes(void* p, size_t bytes) {
#ifdef RNNKERNELS_CACHE_MMAP
  munmap(p, bytes);
#else
  (void)bytes;
  c10::free_cpu(p);
#endif
}

class Cache {
 public:
  Block* take(size_t bytes) {
    Block* b = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest free buffer of at least this size and at most twice it (calls whose sizes
      // vary, as sequence lengths do, reuse each other's; pages a call does not touch cost no
      // memory), of those the most recently freed: the likeliest still in a CPU cache.
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        const size_t have = (*it)->bytes;
        const bool fits = have >= bytes && have / 2 <= bytes;
        if (fits && (best == free_.end() || have <= (*best)->bytes)) best = it;
      }
      if (best != free_.end()) {
        b = *best;
        free_.erase(best);
        cached_ -= b->bytes;
      }
    }
    if (b == nullptr) {
      void* p = map_bytes(bytes);
      if (p == nullptr) {
        // out of address space or memory: give back what is cached and try once more
        empty();
        p = map_bytes(bytes);
        TORCH_CHECK(p != nullptr, "rnnkernels: out of memory allocating ", bytes, " bytes");
      }
      b = new Block{p, bytes};
    }
    report(b, static_cast<int64_t>(b->bytes));
    return b;
  }

  void give_back(Block* b) {
    report(b, -static_cast<int64_t>(b->bytes));
    std::list<Block*> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(b);
      cached_ += b->bytes;
      trim_locked(limit_, released);
    }
    release(released);
  }

  bool enabled() const { return limit_.load(std::memory_order_relaxed) > 0; }
  void lock() { mutex_.lock(); }
  void unlock() { mutex_.unlock(); }

  int64_t cached() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(cached_);
  }

  int64_t set_limit(int64_t limit) {
    std::list<Block*> released;
    int64_t previous;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      previous = static_cast<int64_t>(limit_.load());
      if (limit >= 0) {
        limit_ = static_cast<size_t>(limit);
        trim_locked(limit_, released);
      }
    }
    release(released);
    return previous;
  }

  int64_t empty() {
    std::list<Block*> released;
    size_t before;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      before = cached_;
      trim_locked(0, released);
    }
    release(released);
    return static_cast<int64_t>(before);
  }

 private:
  // Moves the least recently freed buffers into `out` until the cache holds at most `limit`.
  void trim_locked(size_t limit, std::list<Block*>& out) {
    while (cached_ > limit) {
      cached_ -= free_.front()->bytes;
      out.splice(out.end(), free_, free_.begin());
    }
  }

  // Buffers handed out and returned, to torch's profiler when it records memory (as torch's
  // CPU allocator reports its own), with the bytes in use and those in use or cached.
  void report(const Block* b, int64_t delta) {
    const int64_t in_use = in_use_.fetch_add(delta, std::memory_order_relaxed) + delta;
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(b->ptr, delta, static_cast<size_t>(in_use),
                                       static_cast<size_t>(in_use + cached()),
                                       c10::Device(c10::DeviceType::CPU));
    }
  }

  static void release(std::list<Block*>& blocks) {
    for (Block* b : blocks) {
      unmap_bytes(b->ptr, b->bytes);
      delete b;
    }
  }

  std::mutex mutex_;
  std::list<Block*> free_;  // least recently freed first
  size_t cached_ = 0;
  std::atomic<int64_t> in_use_{0};
  std::atomic<size_t> limit_{static_cast<size_t>(kDefaultLimitBytes)};
};

Cache& cache();

#ifdef RNNKERNELS_CACHE_MMAP
// fork() with the mutex held by another thread would leave it locked forever in the child (a
// DataLoader worker forked while a training thread allocates): the forking thread takes it
// around the fork, and parent and child each release their copy.
void lock_for_fork() { cache().lock(); }
void unlock_after_fork() { cache().unlock(); }
#endif

// Never destroyed: tensors that outlive static destruction still free into it safely.
Cache& cache() {
  static Cache* c = [] {
    auto* created = new Cache();
#ifdef RNNKERNELS_CACHE_MMAP
    pthread_atfork(&lock_for_fork, &unlock_after_fork, &unlock_after_fork);
#endif
    return created;
  }();
  return *c;
}

void free_block(void* ctx) { cache().give_back(static_cast<Block*>(ctx)); }

class CacheAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    // Small buffers, and every buffer while the cache is off (limit 0), from torch's allocator.
    if (n < static_cast<size_t>(kMinCachedBytes) || !cache().enabled()) {
      return c10::GetCPUAllocator()->allocate(n);
    }
    const size_t bytes = (n + kGranule - 1) / kGranule * kGranule;
    Block* b = cache().take(bytes);
    return {b->ptr, b, &free_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

}  // namespace

at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  TORCH_INTERNAL_ASSERT(options.device().is_cpu());
  static CacheAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()),
                                   c10::MemoryFormat::Contiguous);
}

int64_t cache_cached_bytes() { return cache().cached(); }
int64_t cache_set_limit(int64_t limit_bytes) { return cache().set_limit(limit_bytes); }
int64_t cache_empty() { return cache().empty(); }
bool keep_lane_buffers(bool keep) { return lanes::FreedBuffers::set_keeping(keep); }

}  // namespace rnnkernels::cpu

// No tensor argument to dispatch on: the one kernel serves every device.
TORCH_LIBRARY_IMPL(rnnkernels, CompositeExplicitAutograd, m) {
  m.impl("cpu_cache_bytes", &rnnkernels::cpu::cache_cached_bytes);
  m.impl("cpu_cache_set_limit", &rnnkernels::cpu::cache_set_limit);
  m.impl("cpu_cache_empty", &rnnkernels::cpu::cache_empty);
  m.impl("cpu_keep_lane_buffers", &rnnkernels::cpu::keep_lane_buffers);
}
