#include "onednn_matmul.h"

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#endif

#include "lanes.h"
#include "panel_matmul.h"
#include "workspace_cache.h"

namespace rnnkernels::cpu {

namespace {

// AMD family 1Ah (Zen 5) or later, from CPUID leaf 1 (base family 0Fh + extended family).
bool amd_full_width_avx512() {
#if defined(__x86_64__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (__get_cpuid(0, &eax, &ebx, &ecx, &edx) == 0) return false;
  const bool amd = ebx == 0x68747541 && edx == 0x69746e65 && ecx == 0x444d4163;  // AuthenticAMD
  if (!amd || __get_cpuid(1, &eax, &ebx, &ecx, &edx) == 0) return false;
  const unsigned base = (eax >> 8) & 0xF, extended = (eax >> 20) & 0xFF;
  return base == 0xF && base + extended >= 0x1A && __builtin_cpu_supports("avx512f");
#else
  return false;
#endif
}

// mkldnn::_linear_pointwise(X, W, B, attr, scalars, algorithm) = X W^T + B, the oneDNN matmul
// torch's CPU inductor backend calls; absent from a torch built without oneDNN.
using LinearPointwise = at::Tensor(const at::Tensor&, const at::Tensor&,
                                   const std::optional<at::Tensor>&, c10::string_view,
                                   c10::List<std::optional<at::Scalar>>,
                                   std::optional<c10::string_view>);

const c10::TypedOperatorHandle<LinearPointwise>* linear_pointwise() {
  static const std::optional<c10::TypedOperatorHandle<LinearPointwise>> op =
      []() -> std::optional<c10::TypedOperatorHandle<LinearPointwise>> {
    const auto handle = c10::Dispatcher::singleton().findOp({"mkldnn::_linear_pointwise", ""});
    if (!handle || !handle->hasKernelForDispatchKey(c10::DispatchKey::CPU)) return std::nullopt;
    try {
      return handle->typed<LinearPointwise>();
    } catch (const c10::Error&) {
      return std::nullopt;  // a torch whose signature of the op differs: at::mm instead
    }
  }();
  return op ? &*op : nullptr;
}

// xt (cols x rows, contiguous) = x^T of a contiguous float x (rows x cols): blocks of W rows of
// x become W-wide column blocks of x^T through the in-register tile transposes of lanes.h
// (an ATen copy of a transposed view, element by element, took several times as long).
void transpose_into(at::Tensor& xt, const at::Tensor& x) {
  const int64_t rows = x.size(0), cols = x.size(1);
  const float* src = x.data_ptr<float>();
  float* dst = xt.data_ptr<float>();
  constexpr int64_t W = lanes::Vec<float>::size();
  at::parallel_for(0, (rows + W - 1) / W, 16, [&](int64_t k0, int64_t k1) {
    lanes::transpose_blocks(dst, src, rows, cols, k0, k1);
  });
}

at::Tensor transposed(const at::Tensor& x) {
  at::Tensor xt = cached_empty({x.size(1), x.size(0)}, x.options());
  transpose_into(xt, x);
  return xt;
}

}  // namespace

bool onednn_matmul_preferred() {
  if (linear_pointwise() == nullptr) return false;
  const char* forced = std::getenv("RNNKERNELS_ONEDNN_MATMUL");
  if (forced != nullptr && (std::string(forced) == "0" || std::string(forced) == "1")) {
    return std::string(forced) == "1";
  }
  static const bool preferred = amd_full_width_avx512();
  return preferred;
}

void mm_tn_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  if (panel_mm_wanted(a.t(), b)) {
    panel_mm_out(out, a.t(), b, at::Tensor());
    return;
  }
  const bool f32 = out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                   b.scalar_type() == at::kFloat;
  if (!(f32 && out.is_cpu() && a.is_cpu() && b.is_cpu() && onednn_matmul_preferred())) {
    at::mm_out(out, a.t(), b);
    return;
  }
  // b^T a as X W^T with X = b^T (N, R) and W = a^T (M, R): oneDNN reads W as a transposed
  // view in place but copies a strided X into a contiguous one (an ATen strided copy, slower
  // than lanes.h's tile transposes), so X is transposed here; the (N, M) result is transposed
  // into out, the same way where out is contiguous.
  const at::Tensor x = b.is_contiguous() ? transposed(b) : b.t();
  const at::Tensor bt_a = linear_pointwise()->call(x, a.t(), std::nullopt, "none",
                                                   c10::List<std::optional<at::Scalar>>(),
                                                   std::nullopt);
  if (out.is_contiguous() && bt_a.is_contiguous()) {
    transpose_into(out, bt_a);
  } else {
    out.copy_(bt_a.t());
  }
}

at::Tensor mm_tn_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(0) == b.size(0),
              "rnnkernels: mm_tn: a (R, M) and b (R, N) must be matrices with as many rows");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "rnnkernels: mm_tn: a and b differ in dtype");
  at::Tensor out = at::empty({a.size(1), b.size(1)}, a.options());
  mm_tn_out(out, a, b);
  return out;
}

}  // namespace rnnkernels::cpu

// No tensor argument to dispatch on: the one kernel serves every device.
TORCH_LIBRARY_IMPL(rnnkernels, CompositeExplicitAutograd, m) {
  m.impl("onednn_matmul_preferred", &rnnkernels::cpu::onednn_matmul_preferred);
}

TORCH_LIBRARY_IMPL(rnnkernels, CPU, m) {
  m.impl("mm_tn", &rnnkernels::cpu::mm_tn_cpu);
}
