// Argument checks of the recurrence ops, shared by the CPU and CUDA bindings. The Python API
// validates its arguments with named errors before any op runs; the ops themselves are public
// (torch.ops.rnnkernels.recurrence_fwd / _bwd), and their kernels index every tensor by the
// sizes they read from gx (forward) or ws (backward), so a tensor of other sizes would be read
// past its end. Each op refuses such arguments here, before it allocates or launches anything.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "given.h"
#include "rnnkernels/cells.h"

namespace rnnkernels::checks {

// t: the sizes `sizes`, a floating dtype, like's device.
inline void expect(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                   const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == sizes, "rnnkernels: ", op, ": ", name, " must have shape ", sizes,
              ", got ", t.sizes());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "rnnkernels: ", op, ": ", name,
              " must have a floating dtype, got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "rnnkernels: ", op, ": ", name, " must be on ",
              like.device(), ", got ", t.device());
}

inline void expect(const char* op, const char* name, const std::optional<at::Tensor>& t,
                   at::IntArrayRef sizes, const at::Tensor& like) {
  if (given(t)) expect(op, name, *t, sizes, like);
}

// The sizes of one recurrence: T steps, B rows, H hidden units, P state width (H, or the
// projection's size), G gates.
struct Sizes {
  int64_t T, B, H, P, G;
};

// The cell-option arguments of both ops (each absent one nullopt).
struct CellOptionArgs {
  const std::optional<at::Tensor>& w_peep;
  const std::optional<at::Tensor>& zoneout_mask;
  const std::optional<at::Tensor>& zoneout_mask_c;
  const std::optional<at::Tensor>& recurrent_dropout_mask;
  const std::optional<at::Tensor>& ln_weight_hh;
  const std::optional<at::Tensor>& ln_weight_c;
  const std::optional<at::Tensor>& ln_bias_c;
};

// The arguments both ops take besides their own: c0, w_hh, w_hr, lengths and the cell options.
inline void check_common(const char* op, const Sizes& s, Cell cell, const at::Tensor& like,
                         const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                         const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& lengths, const CellOptionArgs& o) {
  TORCH_CHECK(!given(w_hr) || cell == Cell::LSTM, "rnnkernels: ", op,
              ": w_hr (the projection) is an LSTM option");
  TORCH_CHECK(given(w_hr) || s.P == s.H, "rnnkernels: ", op, ": the state has ", s.P,
              " units but the cell ", s.H, "; a narrower state needs w_hr (P, H)");
  TORCH_CHECK(cell != Cell::LSTM || given(c0), "rnnkernels: ", op, ": the LSTM needs c0 (B, H)");
  if (cell == Cell::LSTM) expect(op, "c0", c0, {s.B, s.H}, like);
  expect(op, "w_hh", w_hh, {s.G * s.H, s.P}, like);
  expect(op, "w_hr", w_hr, {s.P, s.H}, like);
  if (given(lengths)) {
    TORCH_CHECK(lengths->sizes() == at::IntArrayRef({s.B}) && lengths->scalar_type() == at::kLong &&
                    lengths->device() == like.device(),
                "rnnkernels: ", op, ": lengths must be int64 of shape (", s.B, ",) on ",
                like.device(), ", got ", lengths->scalar_type(), " of shape ", lengths->sizes(),
                " on ", lengths->device());
  }
  expect(op, "w_peep", o.w_peep, {3, s.H}, like);
  expect(op, "zoneout_mask", o.zoneout_mask, {s.T, s.B, s.P}, like);
  expect(op, "zoneout_mask_c", o.zoneout_mask_c, {s.T, s.B, s.H}, like);
  expect(op, "recurrent_dropout_mask", o.recurrent_dropout_mask, {s.B, s.P}, like);
  expect(op, "ln_weight_hh", o.ln_weight_hh, {s.G * s.H}, like);
  expect(op, "ln_weight_c", o.ln_weight_c, {s.H}, like);
  expect(op, "ln_bias_c", o.ln_bias_c, {s.H}, like);
}

inline Cell checked_cell(const char* op, int64_t cell_id) {
  TORCH_CHECK(cell_id >= 0 && cell_id <= 4, "rnnkernels: ", op, ": unknown cell ", cell_id);
  return static_cast<Cell>(cell_id);
}

// recurrence_fwd: gx (T, B, G*H) and h0 (B, P) set the sizes the rest must have.
inline void check_recurrence_fwd(const at::Tensor& gx, const at::Tensor& h0,
                                 const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                                 const std::optional<at::Tensor>& b_hh,
                                 const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& lengths, int64_t cell_id,
                                 const CellOptionArgs& options) {
  constexpr const char* op = "recurrence_fwd";
  const Cell cell = checked_cell(op, cell_id);
  const int64_t G = num_gates(cell);
  TORCH_CHECK(gx.dim() == 3 && gx.size(2) > 0 && gx.size(2) % G == 0, "rnnkernels: ", op,
              ": gx must be (T, B, G*H) with G = ", G, " gates for this cell and H >= 1, got ",
              gx.sizes());
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == gx.size(1), "rnnkernels: ", op,
              ": h0 must be (B, P) with B = ", gx.size(1), " (gx's rows), got ", h0.sizes());
  const Sizes s{gx.size(0), gx.size(1), gx.size(2) / G, h0.size(1), G};
  expect(op, "h0", h0, {s.B, s.P}, gx);
  expect(op, "b_hh", b_hh, {s.G * s.H}, gx);
  check_common(op, s, cell, gx, c0, w_hh, w_hr, lengths, options);
}

// recurrence_bwd: ws (T, B, K*H), w_hh (G*H, P) and the forward's hs (T+1, B, P) set the sizes.
inline void check_recurrence_bwd(const std::optional<at::Tensor>& grad_y,
                                 const std::optional<at::Tensor>& grad_h_n,
                                 const std::optional<at::Tensor>& grad_c_n,
                                 const std::optional<at::Tensor>& c0, const at::Tensor& w_hh,
                                 const std::optional<at::Tensor>& w_hr,
                                 const std::optional<at::Tensor>& lengths, const at::Tensor& hs,
                                 const at::Tensor& ws, int64_t cell_id,
                                 const CellOptionArgs& options) {
  constexpr const char* op = "recurrence_bwd";
  const Cell cell = checked_cell(op, cell_id);
  const int64_t G = num_gates(cell);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) > 0 && w_hh.size(0) % G == 0, "rnnkernels: ", op,
              ": w_hh must be (G*H, P) with G = ", G, " gates for this cell, got ", w_hh.sizes());
  TORCH_CHECK(ws.dim() == 3 && hs.dim() == 3, "rnnkernels: ", op,
              ": hs and ws must be the forward's (T+1, B, P) and (T, B, K*H), got ", hs.sizes(),
              " and ", ws.sizes());
  const Sizes s{ws.size(0), ws.size(1), w_hh.size(0) / G, w_hh.size(1), G};
  check_common(op, s, cell, ws, c0, w_hh, w_hr, lengths, options);
  const int64_t K = workspace_units(cell, given(w_hr), given(options.ln_weight_hh));
  expect(op, "ws", ws, {s.T, s.B, K * s.H}, ws);
  expect(op, "hs", hs, {s.T + 1, s.B, s.P}, ws);
  TORCH_CHECK(hs.scalar_type() == ws.scalar_type(), "rnnkernels: ", op,
              ": hs and ws must have one dtype, got ", hs.scalar_type(), " and ",
              ws.scalar_type());
  expect(op, "grad_y", grad_y, {s.T, s.B, s.P}, ws);
  expect(op, "grad_h_n", grad_h_n, {s.B, s.P}, ws);
  if (cell == Cell::LSTM) expect(op, "grad_c_n", grad_c_n, {s.B, s.H}, ws);
}

}  // namespace rnnkernels::checks
