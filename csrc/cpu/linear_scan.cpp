// CPU kernels of the first-order linear scan h_t = a_t h_{t-1} + b_t over (batch, channels, T).
//
// Decomposition. The batch x channels rows are independent; a task owns kRowsPerTask of them and
// walks time once, stepping all its rows at each t, so their independent recurrences overlap in
// the pipeline instead of one row's multiply-add chain setting the pace. The state is kept in the
// accumulation type (float, or double for double) and rounded only when stored.
//
// Memory. The forward reads a and b once and writes h once; the backward reads grad_h, a and the
// forward's h once and writes grad_a and grad_b once: the memory-bound minimum.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

namespace rnnkernels::cpu {

using at::Tensor;

namespace {

// Rows stepped together by one task: enough independent chains to hide the multiply-add latency.
constexpr int64_t kRowsPerTask = 8;

bool given(const std::optional<Tensor>& t) { return t.has_value() && t->defined(); }

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

template <typename S, typename T>
void forward_rows(const S* a, const S* b, const S* h0, S* h, int64_t r0, int64_t r1, int64_t T_) {
  T state[kRowsPerTask];
  const int64_t n = r1 - r0;
  for (int64_t i = 0; i < n; ++i) state[i] = h0 != nullptr ? static_cast<T>(h0[r0 + i]) : T(0);
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t at_ = (r0 + i) * T_ + t;
      state[i] = static_cast<T>(a[at_]) * state[i] + static_cast<T>(b[at_]);
      h[at_] = static_cast<S>(state[i]);
    }
  }
}

// dh_t = grad_h_t + a_{t+1} dh_{t+1}; grad_b_t = dh_t; grad_a_t = dh_t h_{t-1}; grad_h0 = a_0 dh_0.
template <typename S, typename T>
void backward_rows(const S* gh, const S* a, const S* h, const S* h0, S* ga, S* gb, S* gh0,
                   int64_t r0, int64_t r1, int64_t T_) {
  T carry[kRowsPerTask] = {};
  const int64_t n = r1 - r0;
  for (int64_t t = T_ - 1; t >= 0; --t) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t r = r0 + i, at_ = r * T_ + t;
      const T dh = static_cast<T>(gh[at_]) + carry[i];
      const T prev = t > 0 ? static_cast<T>(h[at_ - 1])
                           : (h0 != nullptr ? static_cast<T>(h0[r]) : T(0));
      gb[at_] = static_cast<S>(dh);
      ga[at_] = static_cast<S>(dh * prev);
      carry[i] = static_cast<T>(a[at_]) * dh;
    }
  }
  if (gh0 != nullptr) {
    for (int64_t i = 0; i < n; ++i) gh0[r0 + i] = static_cast<S>(carry[i]);
  }
}

// Row blocks over the threads, with enough steps per task (rows x T) that a small scan stays on
// the calling thread instead of paying for a parallel region.
template <typename F>
void for_row_blocks(int64_t rows, int64_t steps, const F& f) {
  const int64_t blocks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, kRowsPerTask * steps));
  at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      f(k * kRowsPerTask, std::min(rows, (k + 1) * kRowsPerTask));
    }
  });
}

Tensor linear_scan_fwd_cpu(const Tensor& a_in, const Tensor& b_in,
                           const std::optional<Tensor>& initial_state) {
  check_inputs(a_in, b_in, "b", initial_state);
  const Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const Tensor h0 = given(initial_state) ? initial_state->contiguous() : Tensor();
  const int64_t rows = a.size(0) * a.size(1), T_ = a.size(2);
  Tensor h = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "linear_scan_fwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const S* h0_p = h0.defined() ? h0.data_ptr<S>() : nullptr;
    for_row_blocks(rows, T_, [&](int64_t r0, int64_t r1) {
      forward_rows<S, T>(a.data_ptr<S>(), b.data_ptr<S>(), h0_p, h.data_ptr<S>(), r0, r1, T_);
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
  Tensor ga = at::empty_like(a), gb = at::empty_like(a);
  Tensor gh0 = h0.defined() ? at::empty_like(h0) : at::empty({0}, a.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, a.scalar_type(), "linear_scan_bwd_cpu", [&] {
    using S = scalar_t;
    using T = std::conditional_t<std::is_same_v<S, double>, double, float>;
    const S* h0_p = h0.defined() ? h0.data_ptr<S>() : nullptr;
    S* gh0_p = h0.defined() ? gh0.data_ptr<S>() : nullptr;
    for_row_blocks(rows, T_, [&](int64_t r0, int64_t r1) {
      backward_rows<S, T>(gh.data_ptr<S>(), a.data_ptr<S>(), h.data_ptr<S>(), h0_p,
                          ga.data_ptr<S>(), gb.data_ptr<S>(), gh0_p, r0, r1, T_);
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
