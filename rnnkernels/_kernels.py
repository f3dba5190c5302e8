"""What each compiled or Triton kernel family can take: dtypes and availability."""

from __future__ import annotations

import functools
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
# Families whose Triton kernels exist (filled in by rnnkernels.triton when it imports).
TRITON_FAMILIES: set[str] = set()
# Families whose CUDA kernels are compiled into _C.
CUDA_FAMILIES: set[str] = set()


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
    if family not in TRITON_FAMILIES:
        return f"no Triton kernel for {family} yet"
    if dtype not in TRITON_DTYPES[family]:
        return f"the Triton kernel of {family} takes {dtype_names(TRITON_DTYPES[family])}, not {dtype}"
    return None


def cuda_unsupported(family: str, dtype: torch.dtype) -> str | None:
    if family not in CUDA_FAMILIES:
        return f"rnnkernels was built without CUDA kernels for {family}"
    return None
