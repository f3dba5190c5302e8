"""Functional API of the first-order linear scan h_t = a_t * h_{t-1} + b_t, the recurrence of
diagonal linear state-space models, on the backend chosen by :mod:`rnnkernels._backend`."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _kernels, _validate
from ..reference import linear_scan_reference
from ._autocast import autocast_promote

# ------------------------------------------------------------------ fake kernels and autograd


@torch.library.register_fake("rnnkernels::linear_scan_fwd")
def _linear_scan_fwd_fake(a, b, initial_state):
    return torch.empty_like(a)


@torch.library.register_fake("rnnkernels::linear_scan_bwd")
def _linear_scan_bwd_fake(grad_h, a, h, initial_state):
    grad_h0 = a.new_empty((0,)) if initial_state is None else torch.empty_like(initial_state)
    return torch.empty_like(a), torch.empty_like(a), grad_h0


def _setup_context(ctx, inputs, output):
    a, _, initial_state = inputs
    ctx.save_for_backward(a, output, initial_state)


def register_autograd(fwd_op, bwd_op) -> None:
    """Registers the backward of a linear-scan forward op (C++ or Triton) with its bwd op."""

    def backward(ctx, grad_h):
        a, h, initial_state = ctx.saved_tensors
        grad_a, grad_b, grad_h0 = bwd_op(grad_h, a, h, initial_state)
        return grad_a, grad_b, (None if initial_state is None else grad_h0)

    torch.library.register_autograd(fwd_op, backward, setup_context=_setup_context)


register_autograd("rnnkernels::linear_scan_fwd", torch.ops.rnnkernels.linear_scan_bwd)

if _kernels.triton_importable():
    from ..triton import linear_scan as _triton

    register_autograd(_triton.linear_scan_fwd_triton, _triton.linear_scan_bwd_triton)


# ------------------------------------------------------------------ dispatch

def linear_scan(a: Tensor, b: Tensor, initial_state: Tensor | None = None) -> Tensor:
    """h_t = a_t * h_{t-1} + b_t over time, h_{-1} = initial_state (zeros when None).

    a, b: (batch, channels, T); initial_state: (batch, channels); one floating dtype. Returns
    h (batch, channels, T) in that dtype; the state is carried in float32 (float64 for float64).
    Under ``torch.autocast`` the scan keeps its inputs' precision (memory-bound, no matmul): a
    and b are brought to the wider of their dtypes (autocast's "promote" rule), initial_state
    to that dtype too, and h has that dtype.
    """
    a, b, initial_state = autocast_promote(a, b, states=(initial_state,))
    _validate.tensor("a", a, ndim=3, floating=True)
    _validate.nonempty("a", a, [(0, "batch row"), (1, "channel"), (2, "time step")])
    batch, channels, steps = a.shape
    _validate.tensor("b", b, shape=(batch, channels, steps), like=a)
    _validate.optional("initial_state", initial_state, shape=(batch, channels), like=a)
    backend = _backend.choose("linear_scan", a.device, a.dtype)
    if backend == "reference":
        return linear_scan_reference(a, b, initial_state)
    if backend == "triton":
        return _triton.linear_scan_fwd_triton(a, b, initial_state)
    return torch.ops.rnnkernels.linear_scan_fwd(a, b, initial_state)


__all__ = ["linear_scan"]
