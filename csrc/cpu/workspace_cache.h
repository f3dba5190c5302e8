// A cache of the large CPU buffers the recurrence ops allocate on every call (the saved gates
// and states of the forward, the gate gradients of the backward: tens of MiB in a training
// step). glibc hands buffers that large out of fresh mmap-ed or trimmed heap pages, whose first
// touch costs a page fault each (a B = 32, T = 128, H = 256 LSTM training step took 16000 of them,
// a third of its time, whenever the heap's state had it give those pages back); this cache keeps
// freed buffers and gives them to the next call of the same size, the way the CUDA caching
// allocator does on a GPU, so that a training loop's steps after the first touch no new page.
//
// Buffers of kMinCachedBytes and more come from here, smaller ones from torch's CPU allocator.
// Freed buffers stay cached while the cached bytes stay within a limit (default
// kDefaultLimitBytes, settable); past it they go back to the system. Thread-safe.
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

}  // namespace rnnkernels::cpu
