// CUDA implementations of the rnnkernels:: ops (schemas: csrc/ops.cpp): tensors become the Params
// of the framework-free kernels in csrc/cuda/, the step GEMMs of the batched recurrence and the
// weight-gradient GEMMs are ATen calls (cuBLAS). Outputs have the layouts and dtypes of the CPU
// kernels (csrc/cpu/), so the fake kernels and the autograd in rnnkernels/ops/ serve both.
// Built only when torch has CUDA (setup.py); user-facing argument checks happen in Python first.
//
// RNNKERNELS_CUDA_RECURRENCE=batched makes the recurrence skip the persistent kernel for the
// batched path (per step one GEMM and one fused pointwise kernel), as RNNKERNELS_CPU_RECURRENCE
// does on the CPU; the tests use it to run both paths on the same shapes. Otherwise the
// persistent kernel runs whenever persistent_plan admits the problem.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "cuda/recurrence.h"
#include "recurrence_checks.h"
#include "recurrence_weight_grads.h"
#include "cuda/scan.h"

namespace rnnkernels::cuda_bind {

using at::Tensor;
using cuda::DType;

namespace {

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::F32;
    case at::kHalf:
      return DType::F16;
    case at::kBFloat16:
      return DType::BF16;
    default:
      TORCH_CHECK(false, "rnnkernels: the CUDA kernels take float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return DType::F32;
}

void check(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rnnkernels: ", what, ": ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

// The CUDA recurrence kernels implement no cell option (peephole, zoneout, recurrent dropout,
// layer norm):
// rnnkernels.ops runs the reference on the GPU instead, so only a direct call of the op gets
// here with one.
void check_no_cell_options(std::initializer_list<const std::optional<Tensor>*> tensors,
                           double zoneout) {
  bool any = zoneout != 0;
  for (const auto* t : tensors) any = any || given(*t);
  TORCH_CHECK(!any,
              "rnnkernels: the CUDA recurrence kernel has no cell options (peephole, zoneout, "
              "recurrent dropout, layer norm); rnnkernels.ops and rnnkernels.nn fall back to the "
              "reference for them");
}

Tensor f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// A fresh fp32 copy, for buffers the kernels update in place.
Tensor f32_copy(const Tensor& t) { return t.to(at::kFloat, false, true).contiguous(); }

// `value` (ref's sizes and dtype) with the strides of torch.empty_like(ref), which is what the
// fake kernels of the scans (rnnkernels/ops/) give these outputs; the kernels write contiguous.
Tensor strided_like(const Tensor& ref, const Tensor& value) {
  if (value.strides() == ref.strides()) return value;  // the usual case: both contiguous
  return at::empty_like(ref).copy_(value);
}

bool persistent_allowed() {
  const char* mode = std::getenv("RNNKERNELS_CUDA_RECURRENCE");
  return mode == nullptr || std::strcmp(mode, "batched") != 0;
}

// ================================================================== recurrence

void batched_forward(cuda::RecurrenceStepFwdParams sp, const cuda::StepOrder& order,
                      const Tensor& hs, const Tensor& w_hh, const std::optional<Tensor>& b_hh,
                      const std::optional<Tensor>& w_hr) {
  const int64_t B = sp.batch, H = sp.hidden;
  const bool split = sp.cell == Cell::GRU_RESET_BEFORE;
  const Tensor w = f32(w_hh);
  const Tensor bias = given(b_hh) ? f32(*b_hh) : Tensor();
  const Tensor w1 = split ? w.narrow(0, 0, 2 * H) : w;
  const Tensor b1 = bias.defined() && split ? bias.narrow(0, 0, 2 * H) : bias;
  const Tensor w2 = split ? w.narrow(0, 2 * H, H) : Tensor();
  const Tensor b2 = bias.defined() && split ? bias.narrow(0, 2 * H, H) : Tensor();
  const Tensor whr = sp.projected ? f32(*w_hr) : Tensor();
  const auto opts = hs.options();
  Tensor gh = at::empty({B, w1.size(0)}, opts);
  Tensor vbuf = split ? at::empty({B, H}, opts) : Tensor();
  Tensor ghv = split ? at::empty({B, H}, opts) : Tensor();
  Tensor hfull = sp.projected ? at::empty({B, H}, opts) : Tensor();
  sp.gh = gh.data_ptr<float>();
  sp.gh_cols = gh.size(1);
  sp.ghv = split ? ghv.data_ptr<float>() : nullptr;
  sp.vbuf = split ? vbuf.data_ptr<float>() : nullptr;
  sp.hfull = sp.projected ? hfull.data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream();
  for (int64_t s = 0; s < order.steps; ++s) {
    Tensor hin = hs.select(0, order.slot_in(s));
    Tensor hout = hs.select(0, order.slot_out(s));
    sp.t = order.time(s);
    sp.hin = hin.data_ptr<float>();
    sp.hout = hout.data_ptr<float>();
    if (b1.defined()) {
      at::addmm_out(gh, b1, hin, w1.t());
    } else {
      at::mm_out(gh, hin, w1.t());
    }
    sp.phase = cuda::StepFwdPhase::Main;
    check(cuda::launch(sp, stream), "recurrence forward step");
    if (split) {
      if (b2.defined()) {
        at::addmm_out(ghv, b2, vbuf, w2.t());
      } else {
        at::mm_out(ghv, vbuf, w2.t());
      }
      sp.phase = cuda::StepFwdPhase::ResetBeforeOut;
      check(cuda::launch(sp, stream), "recurrence forward step");
    }
    if (sp.projected) {
      at::mm_out(hout, hfull, whr.t());
      sp.phase = cuda::StepFwdPhase::Projection;
      check(cuda::launch(sp, stream), "recurrence forward step");
    }
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> recurrence_fwd_cuda(
    const Tensor& gx_in, const Tensor& h0, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& b_hh, const std::optional<Tensor>& w_hr,
    const std::optional<Tensor>& lengths_opt, int64_t cell_id, bool reverse, bool save,
    const std::optional<Tensor>& w_peep, const std::optional<Tensor>& zoneout_mask,
    const std::optional<Tensor>& zoneout_mask_c, double zoneout,
    const std::optional<Tensor>& recurrent_dropout_mask,
    const std::optional<Tensor>& ln_weight_hh, const std::optional<Tensor>& ln_weight_c,
    const std::optional<Tensor>& ln_bias_c) {
  checks::check_recurrence_fwd(gx_in, h0, c0, w_hh, b_hh, w_hr, lengths_opt, cell_id,
                               {w_peep, zoneout_mask, zoneout_mask_c, recurrent_dropout_mask,
                                ln_weight_hh, ln_weight_c, ln_bias_c});
  check_no_cell_options(
      {&w_peep, &zoneout_mask, &zoneout_mask_c, &recurrent_dropout_mask, &ln_weight_hh,
       &ln_weight_c, &ln_bias_c},
      zoneout);
  const c10::cuda::CUDAGuard guard(gx_in.device());
  const Cell cell = static_cast<Cell>(cell_id);
  const Tensor gx = gx_in.contiguous();
  const int64_t T = gx.size(0), B = gx.size(1), P = h0.size(1);
  const int64_t H = gx.size(2) / num_gates(cell);
  const bool projected = given(w_hr);
  const auto f32_opts = gx.options().dtype(at::kFloat);
  const Tensor lengths = given(lengths_opt) ? lengths_opt->contiguous() : Tensor();
  const int64_t K = workspace_units(cell, projected);

  Tensor y = at::empty({T, B, P}, gx.options());
  Tensor hs = at::empty({save ? T + 1 : 2, B, P}, f32_opts);
  Tensor ws = save ? at::empty({T, B, K * H}, f32_opts) : at::empty({0}, f32_opts);
  const cuda::StepOrder order{T, reverse, save};
  hs.select(0, order.slot_in(0)).copy_(h0);
  Tensor c = cell == Cell::LSTM ? f32_copy(*c0) : Tensor();

  bool done = false;
  if (persistent_allowed() && !projected) {
    cuda::PersistentFwdParams pp;
    pp.cell = cell;
    pp.dtype = dtype_of(gx);
    pp.order = order;
    pp.batch = B;
    pp.hidden = H;
    pp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    const Tensor w = w_hh.to(gx.scalar_type()).contiguous();
    const Tensor bias = given(b_hh) ? b_hh->to(gx.scalar_type()).contiguous() : Tensor();
    pp.gx = gx.data_ptr();
    pp.w = w.data_ptr();
    pp.bias = bias.defined() ? bias.data_ptr() : nullptr;
    pp.hs = hs.data_ptr<float>();
    pp.c = c.defined() ? c.data_ptr<float>() : nullptr;
    pp.ws = save ? ws.data_ptr<float>() : nullptr;
    pp.y = y.data_ptr();
    cuda::PersistentPlan plan;
    check(cuda::persistent_plan(pp, plan), "persistent recurrence plan");
    if (plan.fits) {
      check(cuda::launch(pp, plan, current_stream()), "persistent recurrence forward");
      done = true;
    }
  }
  if (!done) {
    cuda::RecurrenceStepFwdParams sp;
    sp.cell = cell;
    sp.dtype = dtype_of(gx);
    sp.batch = B;
    sp.hidden = H;
    sp.out = P;
    sp.projected = projected;
    sp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    sp.gx = gx.data_ptr();
    sp.c = c.defined() ? c.data_ptr<float>() : nullptr;
    sp.ws = save ? ws.data_ptr<float>() : nullptr;
    sp.y = y.data_ptr();
    batched_forward(sp, order, hs, w_hh, b_hh, w_hr);
  }

  Tensor h_n = hs.select(0, order.slot_out(T - 1)).to(gx.scalar_type(), false, true);
  Tensor c_n = cell == Cell::LSTM ? c.to(gx.scalar_type()) : at::empty({0}, gx.options());
  if (!save) hs = at::empty({0}, f32_opts);
  return {y, h_n, c_n, hs, ws};
}

void batched_backward(cuda::RecurrenceStepBwdParams sp, const cuda::StepOrder& order,
                       const Tensor& hs, const Tensor& w_hh, const std::optional<Tensor>& w_hr,
                       Tensor& dh, Tensor& dgh, Tensor& dhp) {
  const int64_t B = sp.batch, H = sp.hidden, P = sp.out;
  const bool split = sp.cell == Cell::GRU_RESET_BEFORE;
  const Tensor w = f32(w_hh);
  const Tensor w_rec = split ? w.narrow(0, 0, 2 * H) : w;
  const Tensor w_n = split ? w.narrow(0, 2 * H, H) : Tensor();
  const Tensor whr = sp.projected ? f32(*w_hr) : Tensor();
  const auto opts = hs.options();
  Tensor dhd = at::empty({B, P}, opts);
  Tensor dhfull = sp.projected ? at::empty({B, H}, opts) : Tensor();
  Tensor dv = split ? at::empty({B, H}, opts) : Tensor();
  sp.dhd = dhd.data_ptr<float>();
  sp.dhfull = sp.projected ? dhfull.data_ptr<float>() : nullptr;
  sp.dhp = sp.projected ? dhp.data_ptr<float>() : nullptr;
  sp.dv = split ? dv.data_ptr<float>() : nullptr;
  const cudaStream_t stream = current_stream();
  for (int64_t s = order.steps - 1; s >= 0; --s) {
    sp.t = order.time(s);
    sp.first = s == 0;
    sp.t_prev = order.time_before(s);
    sp.hprev = hs.select(0, order.slot_in(s)).data_ptr<float>();
    if (sp.projected) {
      sp.phase = cuda::StepBwdPhase::Projection;
      check(cuda::launch(sp, stream), "recurrence backward step");
      at::mm_out(dhfull, dh, whr);
    }
    sp.phase = cuda::StepBwdPhase::Main;
    check(cuda::launch(sp, stream), "recurrence backward step");
    const Tensor dgh_t = dgh.select(0, sp.t);
    if (split) {
      at::mm_out(dv, dgh_t.narrow(1, 2 * H, H), w_n);
      sp.phase = cuda::StepBwdPhase::ResetBeforeGates;
      check(cuda::launch(sp, stream), "recurrence backward step");
    }
    at::addmm_out(dh, dhd, split ? dgh_t.narrow(1, 0, 2 * H) : dgh_t, w_rec);
  }
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
recurrence_bwd_cuda(
    const std::optional<Tensor>& grad_y_opt, const std::optional<Tensor>& grad_hn,
    const std::optional<Tensor>& grad_cn, const std::optional<Tensor>& c0, const Tensor& w_hh,
    const std::optional<Tensor>& w_hr, const std::optional<Tensor>& lengths_opt,
    const Tensor& hs_in, const Tensor& ws_in, int64_t cell_id, bool reverse,
    const std::optional<Tensor>& w_peep, const std::optional<Tensor>& zoneout_mask,
    const std::optional<Tensor>& zoneout_mask_c, double zoneout,
    const std::optional<Tensor>& recurrent_dropout_mask,
    const std::optional<Tensor>& ln_weight_hh, const std::optional<Tensor>& ln_weight_c,
    const std::optional<Tensor>& ln_bias_c) {
  checks::check_recurrence_bwd(grad_y_opt, grad_hn, grad_cn, c0, w_hh, w_hr, lengths_opt, hs_in,
                               ws_in, cell_id,
                               {w_peep, zoneout_mask, zoneout_mask_c, recurrent_dropout_mask,
                                ln_weight_hh, ln_weight_c, ln_bias_c});
  check_no_cell_options(
      {&w_peep, &zoneout_mask, &zoneout_mask_c, &recurrent_dropout_mask, &ln_weight_hh,
       &ln_weight_c, &ln_bias_c},
      zoneout);
  const c10::cuda::CUDAGuard guard(w_hh.device());
  const Cell cell = static_cast<Cell>(cell_id);
  const Tensor hs = hs_in.contiguous(), ws = ws_in.contiguous();
  const int64_t T = ws.size(0), B = ws.size(1), P = hs.size(2);
  const int64_t GH = w_hh.size(0), H = GH / num_gates(cell);
  const bool projected = given(w_hr);
  const auto st = w_hh.scalar_type();
  const auto f32_opts = hs.options();
  const Tensor lengths = given(lengths_opt) ? lengths_opt->contiguous() : Tensor();
  const Tensor grad_y = given(grad_y_opt) ? grad_y_opt->to(st).contiguous() : Tensor();
  Tensor dh = given(grad_hn) ? f32_copy(*grad_hn) : at::zeros({B, P}, f32_opts);
  Tensor dc;
  if (cell == Cell::LSTM) dc = given(grad_cn) ? f32_copy(*grad_cn) : at::zeros({B, H}, f32_opts);
  Tensor dgx = at::empty({T, B, GH}, ws.options().dtype(st));
  Tensor dgh = (st == at::kFloat && cell != Cell::GRU) ? dgx : at::empty({T, B, GH}, f32_opts);
  Tensor dhp = projected ? at::empty({T, B, P}, f32_opts) : Tensor();
  const Tensor c0f = cell == Cell::LSTM ? f32(*c0) : Tensor();
  const cuda::StepOrder order{T, reverse, true};

  bool done = false;
  if (persistent_allowed() && !projected) {
    Tensor dhd = at::empty({B, H}, f32_opts);
    const Tensor w = w_hh.contiguous();
    cuda::PersistentBwdParams pp;
    pp.cell = cell;
    pp.dtype = dtype_of(w_hh);
    pp.order = order;
    pp.batch = B;
    pp.hidden = H;
    pp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    pp.grad_y = grad_y.defined() ? grad_y.data_ptr() : nullptr;
    pp.w = w.data_ptr();
    pp.hs = hs.data_ptr<float>();
    pp.c0 = c0f.defined() ? c0f.data_ptr<float>() : nullptr;
    pp.ws = ws.data_ptr<float>();
    pp.dh = dh.data_ptr<float>();
    pp.dc = dc.defined() ? dc.data_ptr<float>() : nullptr;
    pp.dhd = dhd.data_ptr<float>();
    pp.dgh = dgh.data_ptr<float>();
    pp.dgx = dgx.data_ptr();
    cuda::PersistentPlan plan;
    check(cuda::persistent_plan(pp, plan), "persistent recurrence plan");
    if (plan.fits) {
      check(cuda::launch(pp, plan, current_stream()), "persistent recurrence backward");
      done = true;
    }
  }
  if (!done) {
    cuda::RecurrenceStepBwdParams sp;
    sp.cell = cell;
    sp.dtype = dtype_of(w_hh);
    sp.batch = B;
    sp.hidden = H;
    sp.out = P;
    sp.projected = projected;
    sp.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
    sp.grad_y = grad_y.defined() ? grad_y.data_ptr() : nullptr;
    sp.c0 = c0f.defined() ? c0f.data_ptr<float>() : nullptr;
    sp.ws = ws.data_ptr<float>();
    sp.dh = dh.data_ptr<float>();
    sp.dc = dc.defined() ? dc.data_ptr<float>() : nullptr;
    sp.dgh = dgh.data_ptr<float>();
    sp.dgx = dgx.data_ptr();
    batched_backward(sp, order, hs, w_hh, w_hr, dh, dgh, dhp);
  }

  auto [dw, db, dw_hr] = recurrence_weight_grads(cell, hs, ws, dgh, projected ? dhp : Tensor(), H,
                                                 reverse, st);
  Tensor dc0 = cell == Cell::LSTM ? dc.to(st) : at::empty({0}, w_hh.options());
  // the options' gradients: distinct empty tensors (outputs of an op must not alias)
  const auto none = [&] { return at::empty({0}, w_hh.options()); };
  return {dgx, dh.to(st), dc0, dw, db, dw_hr, none(), none(), none(), none()};
}

// ================================================================== selective scan

// Unit stride along the last dimension, in the storage dtype of u.
Tensor seq_layout(const Tensor& t, at::ScalarType dtype) {
  const Tensor r = t.to(dtype);
  return r.stride(-1) == 1 ? r : r.contiguous();
}

cuda::ScanSeq scan_seq(const Tensor& t) {
  cuda::ScanSeq s;
  s.ptr = t.defined() ? t.data_ptr() : nullptr;
  if (t.defined()) {
    s.batch_stride = t.stride(0);
    s.dim_stride = t.stride(1);
  }
  return s;
}

// B or C: fixed (dim, N) as fp32, or variable (batch, G, N, L) in u's dtype. `keep` holds the
// converted tensor alive.
cuda::ScanGrouped scan_grouped(const Tensor& t, at::ScalarType dtype, Tensor& keep) {
  cuda::ScanGrouped g;
  if (t.dim() == 2) {
    keep = f32(t);
  } else {
    keep = seq_layout(t, dtype);
    g.groups = static_cast<int>(keep.size(1));
    g.batch_stride = keep.stride(0);
    g.group_stride = keep.stride(1);
    g.state_stride = keep.stride(2);
  }
  g.ptr = keep.data_ptr();
  return g;
}

// The inputs shared by the forward and the backward; `keep` holds converted tensors alive.
cuda::SelectiveScanInputs scan_inputs(const Tensor& u, const Tensor& delta, const Tensor& A,
                                      const Tensor& B, const Tensor& C,
                                      const std::optional<Tensor>& D,
                                      const std::optional<Tensor>& z,
                                      const std::optional<Tensor>& delta_bias, bool softplus,
                                      const std::optional<Tensor>& initial_state,
                                      int64_t chunk_size, std::vector<Tensor>& keep) {
  TORCH_CHECK(chunk_size > 0, "rnnkernels: chunk_size must be positive, got ", chunk_size);
  TORCH_CHECK(u.numel() > 0, "rnnkernels: the CUDA selective scan needs at least one batch row, "
              "channel and time step, got u of shape ", u.sizes());
  TORCH_CHECK(u.size(0) <= 65535, "rnnkernels: the CUDA selective scan takes at most 65535 batch "
              "rows, got ", u.size(0));
  const auto dtype = u.scalar_type();
  cuda::SelectiveScanInputs in;
  in.dtype = dtype_of(u);
  in.batch = u.size(0);
  in.dim = u.size(1);
  in.length = u.size(2);
  in.n_state = static_cast<int>(A.size(1));
  in.chunk_size = chunk_size;
  in.n_chunks = (in.length + chunk_size - 1) / chunk_size;
  keep.push_back(seq_layout(u, dtype));
  in.u = scan_seq(keep.back());
  keep.push_back(seq_layout(delta, dtype));
  in.delta = scan_seq(keep.back());
  if (given(z)) {
    keep.push_back(seq_layout(*z, dtype));
    in.z = scan_seq(keep.back());
  }
  keep.push_back(f32(A));
  in.A = keep.back().data_ptr<float>();
  keep.emplace_back();
  in.B = scan_grouped(B, dtype, keep.back());
  keep.emplace_back();
  in.C = scan_grouped(C, dtype, keep.back());
  if (given(D)) {
    keep.push_back(f32(*D));
    in.D = keep.back().data_ptr<float>();
  }
  if (given(delta_bias)) {
    keep.push_back(f32(*delta_bias));
    in.delta_bias = keep.back().data_ptr<float>();
  }
  in.delta_softplus = softplus;
  if (given(initial_state)) {
    keep.push_back(f32(*initial_state));
    in.initial_state = keep.back().data_ptr<float>();
  }
  return in;
}

void check_scan_fits(const cuda::SelectiveScanInputs& in, bool backward) {
  bool fits = false;
  check(cuda::selective_scan_fits(in, backward, fits), "selective scan plan");
  TORCH_CHECK(fits, "rnnkernels: the CUDA selective scan takes at most ", cuda::kMaxStates,
              " states per channel and a chunk_size whose states fit in shared memory; got N = ",
              in.n_state, ", chunk_size = ", in.chunk_size);
}

std::tuple<Tensor, Tensor, Tensor> selective_scan_fwd_cuda(
    const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B, const Tensor& C,
    const std::optional<Tensor>& D, const std::optional<Tensor>& z,
    const std::optional<Tensor>& delta_bias, bool delta_softplus,
    const std::optional<Tensor>& initial_state, int64_t chunk_size, bool save) {
  const c10::cuda::CUDAGuard guard(u.device());
  std::vector<Tensor> keep;
  cuda::SelectiveScanFwdParams p;
  p.in = scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                     chunk_size, keep);
  const auto f32_opts = u.options().dtype(at::kFloat);
  const int64_t batch = p.in.batch, dim = p.in.dim, N = p.in.n_state;
  Tensor out = at::empty({batch, dim, p.in.length}, u.options());
  Tensor last = at::empty({batch, dim, N}, f32_opts);
  Tensor ckpt = save ? at::empty({batch, dim, p.in.n_chunks * N}, f32_opts)
                     : at::empty({0}, f32_opts);
  check_scan_fits(p.in, false);
  p.out = out.data_ptr();
  p.last_state = last.data_ptr<float>();
  p.checkpoints = save ? ckpt.data_ptr<float>() : nullptr;
  check(cuda::launch(p, current_stream()), "selective scan forward");
  return {out, last, ckpt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
selective_scan_bwd_cuda(const Tensor& grad_out, const std::optional<Tensor>& grad_last_state,
                        const Tensor& u, const Tensor& delta, const Tensor& A, const Tensor& B,
                        const Tensor& C, const std::optional<Tensor>& D,
                        const std::optional<Tensor>& z, const std::optional<Tensor>& delta_bias,
                        bool delta_softplus, const std::optional<Tensor>& initial_state,
                        const Tensor& checkpoints, int64_t chunk_size) {
  // The parameter gradients are summed across blocks with fp32 atomics, in no fixed order:
  // under torch.use_deterministic_algorithms(True) this raises (warns with warn_only).
  at::globalContext().alertNotDeterministic(
      "rnnkernels::selective_scan_bwd on CUDA (fp32 atomic adds); the Triton backend "
      "(rnnkernels.use_backend(\"triton\")) has a deterministic backward");
  const c10::cuda::CUDAGuard guard(u.device());
  std::vector<Tensor> keep;
  cuda::SelectiveScanBwdParams p;
  p.in = scan_inputs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                     chunk_size, keep);
  const auto f32_opts = u.options().dtype(at::kFloat);
  const int64_t batch = p.in.batch, dim = p.in.dim, L = p.in.length, N = p.in.n_state;
  TORCH_CHECK(grad_out.sizes() == u.sizes(), "rnnkernels: selective_scan_bwd: grad_out must "
              "match u, (batch, dim, L) = ", u.sizes(), ", got ", grad_out.sizes());
  TORCH_CHECK(!given(grad_last_state) ||
                  grad_last_state->sizes() == at::IntArrayRef({batch, dim, N}),
              "rnnkernels: selective_scan_bwd: grad_last_state must be (batch, dim, N) = (",
              batch, ", ", dim, ", ", N, ")");
  const Tensor gout = grad_out.to(u.scalar_type()).contiguous();
  const Tensor glast = given(grad_last_state) ? f32(*grad_last_state) : Tensor();
  const Tensor ckpt = checkpoints.contiguous();
  TORCH_CHECK(ckpt.numel() == batch * dim * p.in.n_chunks * N && ckpt.scalar_type() == at::kFloat,
              "rnnkernels: selective_scan_bwd needs the fp32 checkpoints of a forward run with "
              "save=True and the same chunk_size");
  Tensor du = at::empty({batch, dim, L}, u.options());
  Tensor ddelta = at::empty({batch, dim, L}, u.options());
  Tensor dz = given(z) ? at::empty({batch, dim, L}, u.options()) : at::empty({0}, u.options());
  Tensor dA = at::zeros({dim, N}, f32_opts);
  Tensor dB = at::zeros(B.sizes(), f32_opts);
  Tensor dC = at::zeros(C.sizes(), f32_opts);
  Tensor dD = given(D) ? at::zeros({dim}, f32_opts) : Tensor();
  Tensor dbias = given(delta_bias) ? at::zeros({dim}, f32_opts) : Tensor();
  Tensor dinit = at::empty({batch, dim, N}, f32_opts);
  check_scan_fits(p.in, true);
  p.grad_out = gout.data_ptr();
  p.grad_last_state = glast.defined() ? glast.data_ptr<float>() : nullptr;
  p.checkpoints = ckpt.data_ptr<float>();
  p.du = du.data_ptr();
  p.ddelta = ddelta.data_ptr();
  p.dz = given(z) ? dz.data_ptr() : nullptr;
  p.dA = dA.data_ptr<float>();
  p.dB = dB.data_ptr<float>();
  p.dC = dC.data_ptr<float>();
  p.dD = dD.defined() ? dD.data_ptr<float>() : nullptr;
  p.ddelta_bias = dbias.defined() ? dbias.data_ptr<float>() : nullptr;
  p.dinitial_state = dinit.data_ptr<float>();
  check(cuda::launch(p, current_stream()), "selective scan backward");
  // Gradients of absent inputs: empty, each its own tensor (outputs must not alias).
  auto none = [&] { return at::empty({0}, u.options()); };
  return {strided_like(u, du),
          strided_like(delta, ddelta),
          strided_like(A, dA.to(A.scalar_type())),
          strided_like(B, dB.to(B.scalar_type())),
          strided_like(C, dC.to(C.scalar_type())),
          given(D) ? strided_like(*D, dD.to(D->scalar_type())) : none(),
          given(z) ? strided_like(*z, dz) : dz,
          given(delta_bias) ? strided_like(*delta_bias, dbias.to(delta_bias->scalar_type()))
                            : none(),
          given(initial_state)
              ? strided_like(*initial_state, dinit.to(initial_state->scalar_type()))
              : none()};
}

// ================================================================== linear scan

Tensor linear_scan_fwd_cuda(const Tensor& a, const Tensor& b,
                            const std::optional<Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(a.device());
  const auto dtype = a.scalar_type();
  const Tensor a2 = seq_layout(a, dtype), b2 = seq_layout(b, dtype);
  const Tensor h0 = given(initial_state) ? f32(*initial_state) : Tensor();
  TORCH_CHECK(a.numel() > 0, "rnnkernels: the CUDA linear scan needs at least one batch row, "
              "channel and time step, got a of shape ", a.sizes());
  Tensor h = at::empty({a.size(0), a.size(1), a.size(2)}, a.options());
  cuda::LinearScanFwdParams p;
  p.dtype = dtype_of(a);
  p.batch = a.size(0);
  p.channels = a.size(1);
  p.length = a.size(2);
  p.a = scan_seq(a2);
  p.b = scan_seq(b2);
  p.initial_state = h0.defined() ? h0.data_ptr<float>() : nullptr;
  p.h = h.data_ptr();
  check(cuda::launch(p, current_stream()), "linear scan forward");
  return strided_like(a, h);
}

std::tuple<Tensor, Tensor, Tensor> linear_scan_bwd_cuda(
    const Tensor& grad_h, const Tensor& a, const Tensor& h,
    const std::optional<Tensor>& initial_state) {
  const c10::cuda::CUDAGuard guard(a.device());
  const auto dtype = a.scalar_type();
  const Tensor a2 = seq_layout(a, dtype), h2 = seq_layout(h, dtype), g2 = seq_layout(grad_h, dtype);
  const Tensor h0 = given(initial_state) ? f32(*initial_state) : Tensor();
  Tensor da = at::empty({a.size(0), a.size(1), a.size(2)}, a.options());
  Tensor db = at::empty_like(da);
  Tensor dh0 = given(initial_state)
                   ? at::empty({a.size(0), a.size(1)}, a.options().dtype(at::kFloat))
                   : Tensor();
  TORCH_CHECK(a.numel() > 0, "rnnkernels: the CUDA linear scan needs at least one batch row, "
              "channel and time step, got a of shape ", a.sizes());
  {
    cuda::LinearScanBwdParams p;
    p.dtype = dtype_of(a);
    p.batch = a.size(0);
    p.channels = a.size(1);
    p.length = a.size(2);
    p.a = scan_seq(a2);
    p.h = scan_seq(h2);
    p.grad_h = scan_seq(g2);
    p.initial_state = h0.defined() ? h0.data_ptr<float>() : nullptr;
    p.da = da.data_ptr();
    p.db = db.data_ptr();
    p.dinitial_state = dh0.defined() ? dh0.data_ptr<float>() : nullptr;
    check(cuda::launch(p, current_stream()), "linear scan backward");
  }
  Tensor grad_h0 = dh0.defined()
                       ? strided_like(*initial_state, dh0.to(initial_state->scalar_type()))
                       : at::empty({0}, a.options());
  return {strided_like(a, da), strided_like(a, db), grad_h0};
}

}  // namespace

TORCH_LIBRARY_IMPL(rnnkernels, CUDA, m) {
  m.impl("recurrence_fwd", &recurrence_fwd_cuda);
  m.impl("recurrence_bwd", &recurrence_bwd_cuda);
  m.impl("selective_scan_fwd", &selective_scan_fwd_cuda);
  m.impl("selective_scan_bwd", &selective_scan_bwd_cuda);
  m.impl("linear_scan_fwd", &linear_scan_fwd_cuda);
  m.impl("linear_scan_bwd", &linear_scan_bwd_cuda);
}

}  // namespace rnnkernels::cuda_bind
