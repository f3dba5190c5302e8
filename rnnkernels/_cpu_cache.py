"""The cache of large CPU buffers behind the CPU ops (csrc/cpu/workspace_cache.h).

The CPU ops take their large buffers (outputs, the states and gates a recurrence's backward
reads, gate and input gradients) from a cache that keeps freed buffers for the next call of the same
size, as the CUDA caching allocator does on a GPU: without it, glibc gives buffers of that size
back to the kernel when freed, and every training step pays a page fault per 4 KiB to have them
zeroed again. Buffers under 1 MiB come from torch's allocator as usual. The cache holds at most
a limit of free bytes (256 MiB unless set), releasing the least recently freed beyond it.

The kernels' smaller scratch (per-thread lane buffers) is kept apart: each thread keeps the
buffers it frees, up to 4 MiB, for its next call (lanes::FreedBuffers in csrc/cpu/lanes.h);
:func:`keep_cpu_lane_buffers` turns that off and on.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (registers the ops)


def cpu_cache_bytes() -> int:
    """Bytes of freed buffers the CPU cache holds for reuse (buffers in use not counted)."""
    return int(torch.ops.rnnkernels.cpu_cache_bytes())


def set_cpu_cache_limit(nbytes: int) -> int:
    """Sets how many bytes of freed buffers the CPU cache may hold (0 turns the cache off: the
    ops' buffers then come from torch's allocator), releases those beyond it, and returns the
    previous limit."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int):
        raise TypeError(f"nbytes must be an int, got {type(nbytes).__name__}")
    if nbytes < 0:
        raise ValueError(f"nbytes must be >= 0, got {nbytes}")
    return int(torch.ops.rnnkernels.cpu_cache_set_limit(nbytes))


def empty_cpu_cache() -> int:
    """Releases every freed buffer the CPU cache holds to the system; returns the bytes
    released. Buffers still in use by tensors are untouched."""
    return int(torch.ops.rnnkernels.cpu_cache_empty())


def keep_cpu_lane_buffers(keep: bool) -> bool:
    """Sets whether the CPU kernels' threads keep the lane buffers they free for their next calls
    (on unless set; off, every call allocates and frees its own, as a memory checker wants), and
    returns the previous setting. Buffers kept before stay with their threads."""
    if not isinstance(keep, bool):
        raise TypeError(f"keep must be a bool, got {type(keep).__name__}")
    return bool(torch.ops.rnnkernels.cpu_keep_lane_buffers(keep))
