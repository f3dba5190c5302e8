"""Shared test setup: tolerances by dtype (the only place they live), seeding, the cuda marker,
a private torch.compile cache."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch

# Inductor's on-disk caches (FX graph, AOTAutograd) key a compiled graph by the graph, not by our
# ops' fake kernels: after a change of an op's output shape, a cache in the shared default
# directory (/tmp/torchinductor_$USER) hands back code compiled for the old shape. Each test run
# compiles into its own directory instead (subprocesses inherit it), removed at exit.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rnnkernels-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

# Tolerances of a result in `dtype` against a float64 reference computed from the same inputs.
# Recurrences compound rounding over T steps; the low-precision entries allow for that at the
# test sizes (T <= 64).
TOLERANCES = {
    torch.float64: {"atol": 1e-9, "rtol": 1e-7},
    torch.float32: {"atol": 2e-5, "rtol": 2e-4},
    torch.float16: {"atol": 1e-2, "rtol": 1e-2},
    torch.bfloat16: {"atol": 6e-2, "rtol": 6e-2},
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None,
                 msg: str = "", scale: float = 1.0) -> None:
    """Compare ``actual`` (any dtype) to a float64 ``expected`` with ``dtype``'s tolerance.

    ``scale`` widens the tolerance for quantities that sum over many terms (weight gradients)."""
    t = tol(dtype or actual.dtype)
    torch.testing.assert_close(actual.detach().double().cpu(), expected.detach().double().cpu(),
                               atol=t["atol"] * scale, rtol=t["rtol"] * scale, msg=msg or None)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
