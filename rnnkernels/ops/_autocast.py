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


def autocast_promote(*tensors: Tensor | None, states: tuple[Tensor | None, ...] = ()
                     ) -> tuple[Tensor | None, ...]:
    """Inside an autocast region of the first tensor's device type: the floating ``tensors``
    cast to the widest floating dtype among them, and the ``states`` (which do not choose the
    dtype: the kernels carry the state in float32 anyway) cast to that dtype. Outside one, the
    arguments unchanged; anything that is not a floating tensor is always left for the argument
    checks to report. Returns tensors + states."""
    everything = tensors + states
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return everything
    floating = [t.dtype for t in tensors if isinstance(t, Tensor) and t.is_floating_point()]
    if not floating:
        return everything
    dtype = functools.reduce(torch.promote_types, floating)
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() else t
                 for t in everything)


def autocast_input(t: object, like: Tensor) -> object:
    """A module's input ``t`` in its parameters' dtype (``like``'s) inside an autocast region of
    t's device, where an activation out of an autocast matmul meets fp32 parameters (as
    torch.nn.LSTM takes it there); the module's own ops then run under autocast's rules. ``t``
    unchanged outside one, or when it is not a floating tensor (for the checks to report)."""
    if (isinstance(t, Tensor) and t.is_floating_point() and like.is_floating_point()
            and t.dtype != like.dtype and torch.is_autocast_enabled(t.device.type)):
        return t.to(like.dtype)
    return t
