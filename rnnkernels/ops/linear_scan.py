"""Functional API of the first-order linear scan h_t = a_t * h_{t-1} + b_t, the recurrence of
diagonal linear state-space models, on the backend chosen by :mod:`rnnkernels._backend`.

Gradients of every order stay fused: the first order is the backward op, higher orders write the
gradients as linear scans of the forward op. torch.func ``grad``, ``vjp``, ``jacrev`` and
``vmap`` work (vmap folds the vmapped dimension into the batch: one kernel call)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _backend, _kernels, _validate
from ..reference import linear_scan_reference
from . import _autograd
from ._autocast import autocast_promote
from ._autograd import fold, graph_needed, overload, unfold

# ------------------------------------------------------------------ fake kernels and autograd


# Contiguous, as every kernel returns them (empty_like would keep the strides of a permuted a:
# a fake unlike the real output, which opcheck's stride check and torch.compile's graphs see).
@torch.library.register_fake("rnnkernels::linear_scan_fwd")
def _linear_scan_fwd_fake(a, b, initial_state):
    return a.new_empty(a.shape)


@torch.library.register_fake("rnnkernels::linear_scan_bwd")
def _linear_scan_bwd_fake(grad_h, a, h, initial_state):
    grad_h0 = a.new_empty((0,) if initial_state is None else initial_state.shape)
    return a.new_empty(a.shape), a.new_empty(a.shape), grad_h0


def _setup_context(ctx, inputs, output):
    a, _, initial_state = inputs
    ctx.save_for_backward(a, output, initial_state)


def _shift_back(a: Tensor) -> Tensor:
    """a_{t+1} at position t, 0 at the last step: the coefficients of the reverse-time scan."""
    return torch.cat([a[:, :, 1:], torch.zeros_like(a[:, :, :1])], dim=2)


def _backward_differentiable(fwd_op, grad_h, a, h, initial_state):
    """The gradients as linear scans themselves, differentiable to any order with every
    scan fused: grad_b_t = grad_h_t + a_{t+1} grad_b_{t+1} is the scan of the time-reversed
    (grad_h, a_{t+1}); grad_a_t = grad_b_t h_{t-1}; grad_h0 = a_0 grad_b_0."""
    grad_b = fwd_op(_shift_back(a).flip(2), grad_h.flip(2), None).flip(2)
    h0 = initial_state if initial_state is not None else torch.zeros_like(h[:, :, 0])
    h_prev = torch.cat([h0.unsqueeze(2), h[:, :, :-1]], dim=2)
    grad_h0 = None if initial_state is None else a[:, :, 0] * grad_b[:, :, 0]
    return grad_b * h_prev, grad_b, grad_h0


def _vmap_folded(op):
    """Every argument and output of the linear-scan ops is per row: the vmapped dimension
    folds into the batch dimension, one kernel call."""

    def rule(info, in_dims, *args):
        n = info.batch_size
        out = op(*(fold(t, d, 0, n) for t, d in zip(args, in_dims)))
        if isinstance(out, Tensor):
            return unfold(out, 0, n), 0
        return (tuple(unfold(t, 0, n) if t.numel() else t for t in out),
                tuple(0 if t.numel() else None for t in out))

    return rule


def register_autograd(fwd_op, bwd_op) -> None:
    """Registers the backward and vmap rules of a linear-scan op pair (C++ or Triton).

    First order (``create_graph=False``): the fused backward op. When the gradients must be
    differentiable themselves (``create_graph=True``, torch.func grad of grad), they are
    written as linear scans of the forward op (:func:`_backward_differentiable`), so every
    order stays fused."""
    fwd = overload(fwd_op)
    bwd = overload(bwd_op)

    def backward(ctx, grad_h):
        a, h, initial_state = ctx.saved_tensors
        if graph_needed(grad_h, a, h, initial_state):
            return _backward_differentiable(fwd, grad_h, a, h, initial_state)
        with torch.no_grad():  # the fused op has no autograd, and no graph is needed
            grad_a, grad_b, grad_h0 = bwd(grad_h, a, h, initial_state)
        return grad_a, grad_b, (None if initial_state is None else grad_h0)

    _autograd.register_autograd(fwd, backward, _setup_context)
    torch.library.register_vmap(fwd, _vmap_folded(fwd))
    torch.library.register_vmap(bwd, _vmap_folded(bwd))


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
    _validate.nonempty("a", a, [(1, "channel"), (2, "time step")])
    batch, channels, steps = a.shape
    _validate.tensor("b", b, shape=(batch, channels, steps), like=a)
    _validate.optional("initial_state", initial_state, shape=(batch, channels), like=a)
    backend = _backend.choose("linear_scan", a.device, a.dtype)
    if backend == "reference" or batch == 0:  # no batch row: nothing for a kernel to do
        return linear_scan_reference(a, b, initial_state)
    fwd = (_triton.linear_scan_fwd_triton if backend == "triton"
           else torch.ops.rnnkernels.linear_scan_fwd)
    return _autograd.call(fwd, _autograd.needs_grad(a, b, initial_state), a, b, initial_state)


__all__ = ["linear_scan"]
