"""The correctness gate every contender passes before it is timed.

Each result is compared with the float64 expected value computed from the same (rounded) inputs.
Two measures, both relative to the size of the expected value: the norm-wise error
||got - expected|| / ||expected|| (what rounding over long sequences produces), and the largest
single deviation over max |expected| (what a few garbage elements, e.g. an out-of-bounds row,
produce). The thresholds are loose enough for the rounding of each dtype over the benchmark's
long sequences (and for TF32, which cuDNN uses for float32 RNNs by default) and far below what a
wrong kernel produces. They are the benchmark's, not the tests' (tests/conftest.py holds those).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

# Norm-wise relative error allowed, by (device type, dtype). bfloat16: the gain gradients of the
# layer-normalised cells sum T * B products of bfloat16 values that largely cancel; at the
# benchmark's shape (T = 128, B = 32) PyTorch's own bfloat16 loop is 5.0e-2 off the float64
# value there (and the fused LSTM 5.02e-2), while a wrong kernel is off by order 1.
REL_TOL = {
    ("cpu", torch.float64): 1e-9,
    ("cpu", torch.float32): 1e-4,
    ("cpu", torch.bfloat16): 1e-1,
    ("cpu", torch.float16): 1e-2,
    ("cuda", torch.float64): 1e-9,
    ("cuda", torch.float32): 5e-3,
    ("cuda", torch.bfloat16): 1e-1,
    ("cuda", torch.float16): 1e-2,
}
# The largest single deviation may be this many times the norm-wise tolerance (of max |expected|),
# and at most MAX_ELEMENT_ERR of it.
ELEMENT_FACTOR = 10.0
MAX_ELEMENT_ERR = 0.5


@dataclass
class Verdict:
    ok: bool
    err: float
    err_max: float
    reason: str = ""


def tolerance(device: str, dtype: torch.dtype) -> float:
    return REL_TOL[(device, dtype)]


def compare(names: Sequence[str], got: Sequence[Tensor], expected: Sequence[Tensor],
            tol: float) -> Verdict:
    """Check every result; the verdict carries the worst errors and the first failure found."""
    if len(got) != len(expected):
        return Verdict(False, float("inf"), float("inf"), f"returned {len(got)} results, "
                       f"expected {len(expected)} ({', '.join(names)})")
    worst, worst_max = 0.0, 0.0
    for name, g, e in zip(names, got, expected):
        if tuple(g.shape) != tuple(e.shape):
            return Verdict(False, float("inf"), float("inf"),
                           f"{name} has shape {tuple(g.shape)}, expected {tuple(e.shape)}")
        g = g.detach().to(device=e.device, dtype=torch.float64)
        if not torch.isfinite(g).all():
            return Verdict(False, float("inf"), float("inf"), f"{name} has non-finite values")
        scale = e.norm().item()
        peak = e.abs().max().item() if e.numel() else 0.0
        diff = g - e
        err = diff.norm().item() / scale if scale > 0 else diff.norm().item()
        err_max = diff.abs().max().item() / peak if peak > 0 else 0.0
        worst, worst_max = max(worst, err), max(worst_max, err_max)
        if err > tol:
            return Verdict(False, worst, worst_max,
                           f"{name}: relative error {err:.2e} > {tol:.0e}")
        element_tol = min(ELEMENT_FACTOR * tol, MAX_ELEMENT_ERR)
        if err_max > element_tol:
            return Verdict(False, worst, worst_max,
                           f"{name}: largest deviation {err_max:.2e} of max |expected| > "
                           f"{element_tol:.0e}")
    return Verdict(True, worst, worst_max)
