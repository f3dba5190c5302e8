// Every op schema of the package, in one place. Implementations register per device:
// csrc/cpu/*.cpp (CPU), csrc/cuda_bind.cpp (CUDA), rnnkernels/triton/*.py (Triton, from Python).
#include <Python.h>
#include <torch/library.h>

// An empty Python module, so that `import rnnkernels._C` loads the library and with it the op
// registrations below (no pybind11 needed).
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(rnnkernels, m) {
  // ---- the generic gated recurrence (cell: see csrc/include/rnnkernels/cells.h, enum Cell)
  // gx: (T, B, G*H) input projections incl. b_ih; h0: (B, P); c0: (B, H) for the LSTM;
  // w_hh: (G*H, P); b_hh: (G*H,); w_hr: (P, H) projection (LSTM only); lengths: (B,) int64.
  // y: (T, B, P); h_n: (B, P); c_n: (B, H) or (0,); hs: (T+1, B, P) states; ws: (T, B, K*H).
  // hs and ws are what the backward needs, empty (0,) when save is false.
  // Cell options, absent by default (the Triton ops keep the schemas without them):
  //   w_peep: (3, H) peephole weights of the LSTM's i, f, o gates (grad_w_peep is (0,) without);
  //   zoneout_mask: (T, B, P), zoneout_mask_c: (T, B, H) (LSTM): per step and unit, the weight
  //   with which the state keeps its previous value (training: 0/1 draws); a state without
  //   draws uses the float zoneout (evaluation: the zoneout probability). y is the zoned-out h;
  //   recurrent_dropout_mask: (B, P) variational dropout of the state that W_hh multiplies
  //   (0 or 1 / (1 - p) per row and unit, the same at every step; Gal and Ghahramani 2016);
  //   ln_weight_hh: (G*H) layer normalisation of h W_hh^T (b_hh added after it; LSTM and GRU),
  //   ln_weight_c, ln_bias_c: (H) of the LSTM's c_t inside h = o * tanh(.); ws then also holds
  //   the raw h W_hh^T (workspace_units). The gradients of absent options are empty (0,).
  m.def(
      "recurrence_fwd(Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
      "Tensor? lengths, int cell, bool reverse, bool save, Tensor? w_peep=None, "
      "Tensor? zoneout_mask=None, Tensor? zoneout_mask_c=None, float zoneout=0.0, "
      "Tensor? recurrent_dropout_mask=None, Tensor? ln_weight_hh=None, Tensor? ln_weight_c=None, "
      "Tensor? ln_bias_c=None) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor hs, Tensor ws)");
  m.def(
      "recurrence_bwd(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor? c0, Tensor w_hh, "
      "Tensor? w_hr, Tensor? lengths, Tensor hs, Tensor ws, int cell, bool reverse, "
      "Tensor? w_peep=None, Tensor? zoneout_mask=None, Tensor? zoneout_mask_c=None, "
      "float zoneout=0.0, Tensor? recurrent_dropout_mask=None, Tensor? ln_weight_hh=None, "
      "Tensor? ln_weight_c=None, Tensor? ln_bias_c=None) "
      "-> (Tensor grad_gx, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_b_hh, "
      "Tensor grad_w_hr, Tensor grad_w_peep, Tensor grad_ln_weight_hh, Tensor grad_ln_weight_c, "
      "Tensor grad_ln_bias_c)");

  // ---- one step (T = 1) of a small batch without gradients, the input projection fused in (a
  // decoding loop's call; CPU): x (1, B, I) with B <= 4, h0 and c0 (B, H), w_ih (G*H, I), w_hh
  // (G*H, H), b_ih, b_hh (G*H,), one dtype (float32, float64 or bfloat16); cell as above but
  // not the reset-before GRU. y (1, B, H) (x and y as a layer's, so that the caller forms no
  // views: each costs a decoding loop about 2 us per token) equals h_n (separate tensors); c_n
  // is empty but for the LSTM.
  m.def(
      "cell_step(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, int cell) -> (Tensor y, Tensor h_n, Tensor c_n)");

  // ---- a layer's forward without gradients from its input (inference on a sequence; CPU):
  // x (T, B, I), h0 and c0 (B, H), w_ih (G*H, I), w_hh (G*H, H), b_ih, b_hh (G*H,), one dtype
  // (float32, float64 or bfloat16); cell as above but not the reset-before GRU. y (T, B, H);
  // c_n is empty but for the LSTM. At batch 1 in float32 from 16 steps on the input projection
  // is fused into the recurrence's steps.
  m.def(
      "recurrence_infer(Tensor x, Tensor h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, int cell, bool reverse) -> (Tensor y, Tensor h_n, Tensor c_n)");

  // ---- selective scan (Mamba semantics), per (batch, channel) with state size N:
  //   x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t,  y_t = C_t . x_t + D * u_t,
  //   out = y * silu(z) when z is given; delta = softplus(delta + delta_bias) when asked.
  // u, delta, z: (batch, dim, L); A: (dim, N) real; B, C: (dim, N) fixed or (batch, G, N, L)
  // grouped (variable B/C are G = 1; dim % G == 0; the CPU and Triton kernels also take them
  // as (batch, N, L)); D, delta_bias: (dim,);
  // initial_state, last_state: (batch, dim, N) fp32. checkpoints: (batch, dim, ceil(L/chunk_size)
  // * N) fp32 states at chunk starts (N values per chunk, chunk after chunk), from which the
  // backward recomputes the states chunk by chunk; empty (0,) when save is false. One dimension
  // for chunks and states: a dimension of its own, of size 1 for L <= chunk_size, made
  // torch.export guard on it (L <= chunk_size or above) when the length is symbolic. Gradients of
  // absent optional inputs come back empty (0,).
  m.def(
      "selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, int chunk_size, "
      "bool save) -> (Tensor out, Tensor last_state, Tensor checkpoints)");
  m.def(
      "selective_scan_bwd(Tensor grad_out, Tensor? grad_last_state, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus, Tensor? initial_state, Tensor checkpoints, int chunk_size) "
      "-> (Tensor grad_u, Tensor grad_delta, Tensor grad_A, Tensor grad_B, Tensor grad_C, "
      "Tensor grad_D, Tensor grad_z, Tensor grad_delta_bias, Tensor grad_initial_state)");

  // The forward with the backward recorded by a C++ autograd node (csrc/selective_scan_autograd
  // .cpp; CompositeImplicitAutograd over the two ops above): what rnnkernels.ops.selective_scan
  // calls in plain eager mode when a gradient is needed.
  m.def(
      "selective_scan_autograd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C, Tensor? D, "
      "Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? initial_state, "
      "int chunk_size) -> (Tensor out, Tensor last_state)");
  // First-order gradients that can be differentiated again (create_graph=True): the reference
  // scan differentiated; implemented in Python (rnnkernels/ops/selective_scan.py,
  // CompositeImplicitAutograd). needs: per input (u, delta, A, B, C, D, z, delta_bias,
  // initial_state) whether its gradient is wanted; the others, and those of absent inputs,
  // come back empty (0,).
  m.def(
      "selective_scan_vjp(Tensor? grad_out, Tensor? grad_last_state, Tensor u, Tensor delta, "
      "Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, Tensor? delta_bias, "
      "bool delta_softplus, Tensor? initial_state, bool[9] needs) "
      "-> (Tensor grad_u, Tensor grad_delta, Tensor grad_A, Tensor grad_B, Tensor grad_C, "
      "Tensor grad_D, Tensor grad_z, Tensor grad_delta_bias, Tensor grad_initial_state)");

  // ---- linear scan h_t = a_t * h_{t-1} + b_t over (batch, channels, T); h0: (batch, channels).
  m.def("linear_scan_fwd(Tensor a, Tensor b, Tensor? initial_state) -> Tensor h");
  m.def(
      "linear_scan_bwd(Tensor grad_h, Tensor a, Tensor h, Tensor? initial_state) "
      "-> (Tensor grad_a, Tensor grad_b, Tensor grad_initial_state)");

  // ---- whether float32 CPU matmuls of the recurrences go through oneDNN on this machine
  // (csrc/cpu/onednn_matmul.h); the Python input projection follows the C++ kernels' choice.
  m.def("onednn_matmul_preferred() -> bool");
  m.def("cpu_cache_bytes() -> int");
  m.def("cpu_cache_set_limit(int limit_bytes) -> int");
  m.def("cpu_cache_empty() -> int");
  // whether the CPU kernels' threads keep their freed lane buffers for their next calls
  // (lanes::FreedBuffers in csrc/cpu/lanes.h); returns the previous setting.
  m.def("cpu_keep_lane_buffers(bool keep) -> bool");
  // a^T b for a (R, M) and b (R, N) of one dtype on the CPU: a weight gradient's reduction over
  // R rows (the input projection's, from Python), through oneDNN where it is preferred.
  m.def("mm_tn(Tensor a, Tensor b) -> Tensor");
  // ---- whether they go through our packed panels instead (csrc/cpu/panel_matmul.h), and
  // a @ b [+ bias] on the CPU through them where preferred (the input projection and its input
  // gradient, from Python), else ATen.
  m.def("panel_matmul_preferred() -> bool");
  m.def("matmul(Tensor a, Tensor b, Tensor? bias=None) -> Tensor");
}
