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
  m.def(
      "recurrence_fwd(Tensor gx, Tensor h0, Tensor? c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
      "Tensor? lengths, int cell, bool reverse, bool save) "
      "-> (Tensor y, Tensor h_n, Tensor c_n, Tensor hs, Tensor ws)");
  m.def(
      "recurrence_bwd(Tensor? grad_y, Tensor? grad_h_n, Tensor? grad_c_n, Tensor? c0, Tensor w_hh, "
      "Tensor? w_hr, Tensor? lengths, Tensor hs, Tensor ws, int cell, bool reverse) "
      "-> (Tensor grad_gx, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_hh, Tensor grad_b_hh, "
      "Tensor grad_w_hr)");

  // ---- scans (selective scan, linear scan): schemas below this line
}
