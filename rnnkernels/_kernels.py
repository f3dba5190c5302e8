"""What each compiled or Triton kernel family can take: dtypes and availability."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from . import _C  # noqa: F401  (loads the library: registers the rnnkernels:: ops)

CPU_DTYPES = {
    "recurrence": (torch.float32, torch.float64, torch.bfloat16),
    "selective_scan": (torch.float32, torch.float64, torch.bfloat16),
    "linear_scan": (torch.float32, torch.float64, torch.bfloat16),
}
TRITON_DTYPES = {
    "recurrence": (torch.float32, torch.float16, torch.bfloat16),
    "selective_scan": (torch.float32, torch.float16, torch.bfloat16),
    "linear_scan": (torch.float32, torch.float16, torch.bfloat16),
}
# The forward op of each family: its CUDA kernel, when compiled into _C, registers on it.
FORWARD_OPS = {
    "recurrence": "rnnkernels::recurrence_fwd",
    "selective_scan": "rnnkernels::selective_scan_fwd",
    "linear_scan": "rnnkernels::linear_scan_fwd",
}

CUDA_DTYPES = TRITON_DTYPES


def dtype_names(dtypes: tuple[torch.dtype, ...]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_unsupported(family: str, dtype: torch.dtype) -> str | None:
    if not triton_importable():
        return "triton is not installed"
    if importlib.util.find_spec(f"rnnkernels.triton.{family}") is None:
        return f"no Triton kernel for {family}"
    if dtype not in TRITON_DTYPES[family]:
        names = dtype_names(TRITON_DTYPES[family])
        return f"the Triton kernel of {family} takes {names}, not {dtype}"
    return None


def cuda_unsupported(family: str, dtype: torch.dtype) -> str | None:
    if not torch._C._dispatch_has_kernel_for_dispatch_key(FORWARD_OPS[family], "CUDA"):
        return f"rnnkernels was built without CUDA kernels for {family}"
    if dtype not in CUDA_DTYPES[family]:
        return f"the CUDA kernel of {family} takes {dtype_names(CUDA_DTYPES[family])}, not {dtype}"
    return None
