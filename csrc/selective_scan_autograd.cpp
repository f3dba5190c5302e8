// The selective scan's forward with its backward recorded by a C++ autograd node: the op
// selective_scan_autograd (CompositeImplicitAutograd, so any device whose kernels implement
// selective_scan_fwd / _bwd), which rnnkernels.ops.selective_scan calls in plain eager mode when
// a gradient is needed. A training step then leaves Python only in the forward's argument checks:
// the engine runs the backward node in C++ and calls the backward op straight below autograd.
// The Python autograd.Function it replaces there (rnnkernels/ops/_autograd.py: apply,
// setup_context, the backward's Python, the round trips between the engine and Python) is a fixed
// cost per call: python -m bench.step_effect times the step both ways (bench/results/
// cpu-2026-12-06-step-effect.md). torch.func transforms, forward-mode AD and torch.compile keep
// the op's Python Autograd kernel (rnnkernels/ops/selective_scan.py), which this node does not
// replace.
//
// A backward whose result must be differentiable (create_graph=True) calls selective_scan_vjp,
// implemented in Python: the reference scan recomputed and differentiated, as the Python
// backward does.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace rnnkernels {

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Opt = std::optional<Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Positions of the Function's inputs (as selective_scan_fwd's arguments) and of the saved ones.
enum Input { kU, kDelta, kA, kB, kC, kD, kZ, kDeltaBias, kSoftplus, kInitial, kChunk, kInputs };
enum Saved { sU, sDelta, sA, sB, sC, sD, sZ, sDeltaBias, sInitial, sCheckpoints };

std::tuple<Tensor, Tensor, Tensor> forward_op(const Tensor& u, const Tensor& delta,
                                              const Tensor& A, const Tensor& B, const Tensor& C,
                                              const Opt& D, const Opt& z, const Opt& delta_bias,
                                              bool softplus, const Opt& x0, int64_t chunk) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnkernels::selective_scan_fwd", "")
          .typed<std::tuple<Tensor, Tensor, Tensor>(
              const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
              const Opt&, const Opt&, const Opt&, bool, const Opt&, int64_t, bool)>();
  return op.call(u, delta, A, B, C, D, z, delta_bias, softplus, x0, chunk, true);
}

Grads backward_op(const Tensor& grad_out, const Opt& grad_last, const Tensor& u,
                  const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
                  const Opt& D, const Opt& z, const Opt& delta_bias, bool softplus, const Opt& x0,
                  const Tensor& checkpoints, int64_t chunk) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnkernels::selective_scan_bwd", "")
          .typed<Grads(const Tensor&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&, bool,
                       const Opt&, const Tensor&, int64_t)>();
  return op.call(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, softplus, x0,
                 checkpoints, chunk);
}

Grads vjp_op(const Opt& grad_out, const Opt& grad_last, const Tensor& u, const Tensor& delta,
             const Tensor& A, const Tensor& B, const Tensor& C, const Opt& D, const Opt& z,
             const Opt& delta_bias, bool softplus, const Opt& x0, std::array<bool, 9> needs) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("rnnkernels::selective_scan_vjp", "")
          .typed<Grads(const Opt&, const Opt&, const Tensor&, const Tensor&, const Tensor&,
                       const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&, bool,
                       const Opt&, std::array<bool, 9>)>();
  return op.call(grad_out, grad_last, u, delta, A, B, C, D, z, delta_bias, softplus, x0, needs);
}

Opt optional(const Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }

}  // namespace

// Out of the anonymous namespace: the node's name (grad_fn.name()) is the Function's.
struct SelectiveScanFunction : public torch::autograd::Function<SelectiveScanFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& u, const Tensor& delta,
                               const Tensor& A, const Tensor& B, const Tensor& C, const Opt& D,
                               const Opt& z, const Opt& delta_bias, bool softplus, const Opt& x0,
                               int64_t chunk) {
    // Straight to the device's kernel: the op's Autograd kernel (Python) has nothing to record.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, last, checkpoints] =
        forward_op(u, delta, A, B, C, D, z, delta_bias, softplus, x0, chunk);
    ctx->save_for_backward({u, delta, A, B, C, D.value_or(Tensor()), z.value_or(Tensor()),
                            delta_bias.value_or(Tensor()), x0.value_or(Tensor()), checkpoints});
    ctx->saved_data["softplus"] = softplus;
    ctx->saved_data["chunk"] = chunk;
    // An unused output gets no gradient instead of materialised zeros (the backward op takes
    // grad_last_state as optional).
    ctx->set_materialize_grads(false);
    return {out, last};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const bool softplus = ctx->saved_data["softplus"].toBool();
    const Tensor &grad_out = grads[0], &grad_last = grads[1];
    // Per argument, whether it is a tensor input of the node and needs a gradient (the node's
    // edges are its tensor inputs: an absent optional argument has none).
    const std::array<bool, kInputs> is_tensor = {true,           true,           true,
                                                 true,           true,           s[sD].defined(),
                                                 s[sZ].defined(), s[sDeltaBias].defined(), false,
                                                 s[sInitial].defined(), false};
    std::array<bool, kInputs> needs{};
    for (int i = 0, edge = 0; i < kInputs; ++i) {
      if (is_tensor[i]) needs[i] = ctx->needs_input_grad(edge++);
    }
    Grads g;
    if (graph_needed(s, grads)) {
      const std::array<bool, 9> vjp_needs = {needs[kU], needs[kDelta], needs[kA],
                                             needs[kB], needs[kC],     needs[kD],
                                             needs[kZ], needs[kDeltaBias], needs[kInitial]};
      g = vjp_op(optional(grad_out), optional(grad_last), s[sU], s[sDelta], s[sA], s[sB], s[sC],
                 optional(s[sD]), optional(s[sZ]), optional(s[sDeltaBias]), softplus,
                 optional(s[sInitial]), vjp_needs);
    } else {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      g = backward_op(grad_out.defined() ? grad_out : at::zeros_like(s[sU]), optional(grad_last),
                      s[sU], s[sDelta], s[sA], s[sB], s[sC], optional(s[sD]), optional(s[sZ]),
                      optional(s[sDeltaBias]), softplus, optional(s[sInitial]),
                      s[sCheckpoints], ctx->saved_data["chunk"].toInt());
    }
    const std::array<Tensor, kInputs> all = {
        std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), std::get<4>(g),
        std::get<5>(g), std::get<6>(g), std::get<7>(g), Tensor(),       std::get<8>(g),
        Tensor()};
    variable_list out(kInputs);
    for (int i = 0; i < kInputs; ++i) {
      if (needs[i]) out[i] = all[i];
    }
    return out;
  }

  // Whether the gradients must form a differentiable graph: create_graph=True (grad mode on in
  // the backward) and something to differentiate, as rnnkernels.ops._autograd.graph_needed
  // decides for plain autograd.
  static bool graph_needed(const variable_list& saved, const variable_list& grads) {
    if (!at::GradMode::is_enabled()) return false;
    auto requires = [](const Tensor& t) { return t.defined() && t.requires_grad(); };
    for (int i = sU; i <= sInitial; ++i) {
      if (requires(saved[i])) return true;
    }
    return requires(grads[0]) || requires(grads[1]);
  }
};

std::tuple<Tensor, Tensor> selective_scan_autograd(const Tensor& u, const Tensor& delta,
                                                   const Tensor& A, const Tensor& B,
                                                   const Tensor& C, const Opt& D, const Opt& z,
                                                   const Opt& delta_bias, bool delta_softplus,
                                                   const Opt& initial_state, int64_t chunk_size) {
  variable_list r = SelectiveScanFunction::apply(u, delta, A, B, C, D, z, delta_bias,
                                                 delta_softplus, initial_state, chunk_size);
  return {r[0], r[1]};
}

TORCH_LIBRARY_IMPL(rnnkernels, CompositeImplicitAutograd, m) {
  m.impl("selective_scan_autograd", &selective_scan_autograd);
}

}  // namespace rnnkernels
