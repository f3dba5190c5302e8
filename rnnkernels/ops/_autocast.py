"""How the ops behave inside a ``torch.autocast`` region.

The recurrences are matmul-bound: they run in the autocast dtype
(:func:`rnnkernels.ops.recurrence.compute_dtype`). The scans are memory-bound and do no matmul:
autocast's lower precision would save no arithmetic, so they follow autocast's "promote" rule
for ops of several inputs, as ``torch.cat`` or ``addcmul`` do: their floating inputs are brought
to the widest dtype among them, and the scan runs in that dtype with a float32 state and float32
accumulation inside the kernel (as ``mamba_ssm`` runs its scan in the dtype of its inputs).
Under autocast an input that comes out of an autocast matmul (bf16 / fp16) may thus meet one
that does not (fp32) without a dtype error.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


def autocast_promote(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """Inside an autocast region of the first tensor's device type, the floating tensors cast
    to the widest floating dtype among them; the arguments unchanged outside one (and anything
    that is not a floating tensor unchanged always, for the argument checks to report)."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    floating = [t.dtype for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not floating:
        return tensors
    dtype = functools.reduce(torch.promote_types, floating)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in tensors)
