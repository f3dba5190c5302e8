// CPU kernels of the first-order linear scan h_t = a_t h_{t-1} + b_t over (batch, channels, T).
//
// Decomposition. The batch x channels rows are independent; a task owns a block of W of them
// (W = the SIMD width: 16 floats with AVX-512), one row per vector lane, and walks time in
// chunks of kChunk steps: the chunk's piece of each row is transposed into (step, lane) layout
// in an L1 buffer (lanes.h), the recurrence runs as one vector multiply-add per step, and the
// results are transposed back. Every row is read and written a cache line at a time, whatever
// T is: stepping the rows element by element instead touches W lines at a row stride of T
// values, which for T a multiple of 1024 all fall in one L1 set and evict each other, and
// outnumber the streams the hardware prefetchers follow; the next chunk's rows are prefetched
// into L2 in software instead. The state is kept in the accumulation type (float, or double for
// double) and rounded only when stored.
//
// Memory. The forward reads a and b once and writes h once; the backward reads grad_h, a and the
// forward's h once and writes grad_a and grad_b once: the memory-bound minimum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../given.h"
#include "lanes.h"
#include "workspace_cache.h"

namespace rnnkernels::cpu {

using at::Tensor;

namespace {

using lanes::gather_lanes;
using lanes::load_as;
using lanes::prefetch_rows;
using lanes::scatter_lanes;
using lanes::store_as;
using lanes::task_grain;
using lanes::Vec;

// Steps per chunk: the backward's three (kChunk, W) buffers take 12 KiB of L1 in float.
constexpr int64_t kChunk = 64;

void check_inputs(const Tensor& a, const Tensor& other, const char* name,
                  const std::optional<Tensor>& h0) {
  TORCH_CHECK(a.dim() == 3, "rnnkernels: linear_scan: a must be (batch, channels, T)");
  TORCH_CHECK(other.sizes() == a.sizes() && other.scalar_type() == a.scalar_type(),
              "rnnkernels: linear_scan: ", name, " must match a in shape and dtype");
  if (given(h0)) {
    TORCH_CHECK(h0->sizes() == a.sizes().slice(0, 2) && h0->scalar_type() == a.scalar_type(),
                "rnnkernels: linear_scan: initial_state must be (batch, channels) in a's dtype");
  }
}

// Rows r0 .. r0 + nc - 1 (nc <= W) of the forward; h0 null for a zero initial state.
template <typename S, typename T>
void forward_block(const S* a, const S* b, const S* h0, S* h, int64_t r0, int64_t nc,
                   int64_t T_) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  alignas(64) T abuf[kChunk * W];
  alignas(64) T hbuf[kChunk * W];
  V state = h0 != nullptr ? load_as<T>(h0 + r0, nc) : V(0);
  const int64_t off = r0 * T_;
  for (int64_t t0 = 0; t0 < T_; t0 += kChunk) {
    const int64_t len = std::min(kChunk, T_ - t0), next = t0 + len;
    if (next < T_) {
      prefetch_rows(a + off + next, T_, nc, std::min(kChunk, T_ - next));
      prefetch_rows(b + off + next, T_, nc, std::min(kChunk, T_ - next));
    }
    gather_lanes(abuf, a + off + t0, T_, nc, len);
    gather_lanes(hbuf, b + off + t0, T_, nc, len);
    for (int64_t i = 0; i < len; ++i) {
      state = at::vec::fmadd(V::loadu(abuf + i * W), state, V::loadu(hbuf + i * W));
      state.store(hbuf + i * W);
    }
    scatter_lanes(h + off + t0, T_, hbuf, nc, len);
  }
}

// dh_t = grad_h_t + a_{t+1} dh_{t+1}; grad_b_t = dh_t; grad_a_t = dh_t h_{t-1}; grad_h0 = a_0 dh_0.
// Rows r0 .. r0 + nc - 1, chunks in reverse; h0 null for a zero initial state, gh0 null when
// its gradient is not wanted.
template <typename S, typename T>
void backward_block(const S* gh, const S* a, const S* h, const S* h0, S* ga, S* gb, S* gh0,
                    int64_t r0, int64_t nc, int64_t T_) {
  using V = Vec<T>;
  constexpr int64_t W = V::size();
  alignas(64) T gbuf[kChunk * W];  // grad_h, then grad_b
  alignas(64) T abuf[kChunk * W];
  alignas(64) T pbuf[kChunk * W];  // h_{t-1}, then grad_a
  V carry(0);
  const int64_t off = r0 * T_;
  const int64_t last = (T_ - 1) / kChunk * kChunk;
  for (int64_t t0 = last; t0 >= 0; t0 -= kChunk) {
    const int64_t len = std::min(kChunk, T_ - t0);
    if (t0 > 0) {
      const int64_t prev = t0 - kChunk;
      prefetch_rows(gh + off + prev, T_, nc, kChunk);
      prefetch_rows(a + off + prev, T_, nc, kChunk);
      prefetch_rows(h + off + std::max<int64_t>(prev - 1, 0), T_, nc, kChunk);
    }
    gather_lanes(gbuf, gh + off + t0, T_, nc, len);
    gather_lanes(abuf, a + off + t0, T_, nc, len);
    if (t0 > 0) {
      gather_lanes(pbuf, h + off + t0 - 1, T_, nc, len);
    } else {
      (h0 != nullptr ? load_as<T>(h0 + r0, nc) : V(0)).store(pbuf);
      gather_lanes(pbuf + W, h + off, T_, nc, len - 1);
    }
    for (int64_t i = len - 1; i >= 0; --i) {
      const V dh = V::loadu(gbuf + i * W) + carry;
      dh.store(gbuf + i * W);
      (dh * V::loadu(pbuf + i * W)).store(pbuf + i * W);
      carry = V::loadu(abuf + i * W) * dh;
    }
    scatter_lanes(gb + off + t0, T_, gbuf, nc, len);
    scatter_lanes(ga + off + t0, T_, pbuf, nc, len);
  }
  if (gh0 != nullptr) store_as(gh0 + r0, carry, nc);
}

// Blocks of W rows over the threads (lanes::for_each_task), with enough elements per task that a
// small scan stays on the calling thread instead of paying for a parallel region.
template <typename T, typename F>
void for_row_blocks(int64_t rows, int64_t steps, const F& f) {
  constexpr int64_t W = Vec<T>::size();
  const int64_t blocks = (rows + W - 1) / W;
  lanes::for_each_task(
      blocks, task_grain(W * steps), [] { return 0; },
      [&](int, int64_t k) { f(k * W, std::min(W, rows - k * W)); });
}

Tensor linear_scan_fwd_cpu(const Tensor& a_in, const Tensor& b_in,
                           const std::optional<Tensor>& initial_state) {
  check_inputs(a_in, b_in, "b", initial_state);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor h0 = given(initial_state) ? initial_state->contiguous() : Tensor();
  const int64_t rows = a.size(0) * a.size(1), T_ = a.size(2);
  Tensor h = cached_empty(a.sizes(), a.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "linear_scan_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const S* h0_p = h0.defined() ? h0.data_ptr<S>() : nullptr;
    const S* a_p = a.data_ptr<S>();
    const S* b_p = b.data_ptr<S>();
    S* h_p = h.data_ptr<S>();
    for_row_blocks<T>(rows, T_, [&](int64_t r0, int64_t nc) {
      forward_block<S, T>(a_p, b_p, h0_p, h_p, r0, nc, T_);
    });
  });
  return h;
}

std::tuple<Tensor, Tensor, Tensor> linear_scan_bwd_cpu(
    const Tensor& grad_h_in, const Tensor& a_in, const Tensor& h_in,
    const std::optional<Tensor>& initial_state) {
  check_inputs(a_in, grad_h_in, "grad_h", initial_state);
  check_inputs(a_in, h_in, "h", initial_state);
  const Tensor gh = grad_h_in.contiguous(), a = a_in.contiguous(), h = h_in.contiguous();
  const Tensor h0 = given(initial_state) ? initial_state->contiguous() : Tensor();
  const int64_t rows = a.size(0) * a.size(1), T_ = a.size(2);
  Tensor ga = cached_empty(a.sizes(), a.options()), gb = cached_empty(a.sizes(), a.options());
  Tensor gh0 = h0.defined() ? at::empty_like(h0) : at::empty({0}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "linear_scan_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const S* h0_p = h0.defined() ? h0.data_ptr<S>() : nullptr;
    S* gh0_p = h0.defined() ? gh0.data_ptr<S>() : nullptr;
    const S* gh_p = gh.data_ptr<S>();
    const S* a_p = a.data_ptr<S>();
    const S* h_p = h.data_ptr<S>();
    S* ga_p = ga.data_ptr<S>();
    S* gb_p = gb.data_ptr<S>();
    for_row_blocks<T>(rows, T_, [&](int64_t r0, int64_t nc) {
      backward_block<S, T>(gh_p, a_p, h_p, h0_p, ga_p, gb_p, gh0_p, r0, nc, T_);
    });
  });
  return {ga, gb, gh0};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("linear_scan_fwd", &linear_scan_fwd_cpu);
  m.impl("linear_scan_bwd", &linear_scan_bwd_cpu);
}

}  // namespace rnnkernels::cpu
