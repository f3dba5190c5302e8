// A cache of the large CPU buffers the ops allocate on every call: a recurrence's output, saved
// gates and states and gate gradients (tens of MiB in a training step), a scan's output and input
// gradients. glibc serves buffers that large from fresh mmap-ed pages, or from heap pages it
// hands back to the kernel when the top of the heap is freed (which it does depends on the
// heap's state), and the first touch of each such 4 KiB page costs a page fault that has the
// kernel zero it: in that state an LSTM training step (B = 32, T = 128, H = 256) took 16000
// faults, and the selective scan's ran at half its speed. This cache keeps freed buffers and
// gives them to the next call of the same size, the way the CUDA caching allocator does on a
// GPU, so that a training loop's steps after the first touch no new page.
//
// Buffers of kMinCachedBytes and more come from here, smaller ones from torch's CPU allocator.
// Freed buffers stay cached while the cached bytes stay within a limit (default
// kDefaultLimitBytes, settable); past it the least recently freed go back to the system. With
// the limit at 0 the cache is off: every buffer comes from torch's CPU allocator. Thread-safe.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace rnnkernels::cpu {

constexpr int64_t kMinCachedBytes = int64_t{1} << 20;
constexpr int64_t kDefaultLimitBytes = int64_t{256} << 20;

// at::empty(sizes, options) for a CPU tensor, its storage from the cache.
at::Tensor cached_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// The ops behind rnnkernels.cpu_cache_*: the bytes the cache holds (free buffers only); set the
// limit (negative: leave it) and return the previous one, releasing free buffers beyond the new
// limit; release every free buffer and return the bytes released.
int64_t cache_cached_bytes();
int64_t cache_set_limit(int64_t limit_bytes);
int64_t cache_empty();
// The op behind rnnkernels.keep_cpu_lane_buffers: whether the kernels' threads keep their
// freed lane buffers (lanes::FreedBuffers); returns the previous setting.
bool keep_lane_buffers(bool keep);

}  // namespace rnnkernels::cpu
