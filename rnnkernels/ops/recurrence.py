"""Functional API of the generic gated recurrence: lstm, gru, rnn over one layer and direction.

Every function takes time-major input x (T, B, I) and the layer's weights in torch.nn's layout,
computes the input projection for all steps as one GEMM (``x @ w_ih^T + b_ih``) and runs the
sequential part in the backend chosen by :mod:`rnnkernels._backend`. Autograd flows through the
input projection as usual and through the recurrence by the registered backward op.

Second order (``create_graph=True``, Hessian-vector products, gradient penalties): the first
order stays the fused backward op; a backward whose result must be differentiable recomputes the
recurrence with the plain-PyTorch reference and differentiates that (slower, any order).
torch.func: ``grad``, ``vjp``, ``jacrev`` and ``vmap`` (vmap rules on the ops: a vmapped
dimension on the inputs and states folds into the batch; per-sample weights loop).
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import (
    _backend,
    _kernels,  # noqa: F401  (loads the ops before the registrations below)
    _validate,
)
from ..reference import gru_recurrence, lstm_recurrence, rnn_recurrence
from . import _autograd
from ._autocast import autocast_promote
from ._autograd import batched, differentiable_vjp, fold, graph_needed, overload, unfold

LSTM, GRU, GRU_RESET_BEFORE, RNN_TANH, RNN_RELU = range(5)
NUM_GATES = {LSTM: 4, GRU: 3, GRU_RESET_BEFORE: 3, RNN_TANH: 1, RNN_RELU: 1}
CELL_NAMES = {LSTM: "LSTM", GRU: "GRU", GRU_RESET_BEFORE: "GRU (reset before)",
              RNN_TANH: "RNN (tanh)", RNN_RELU: "RNN (relu)"}


def workspace_units(cell: int, projected: bool) -> int:
    """Per-step values the forward keeps for the backward, in units of H (cells.h)."""
    if cell == LSTM:
        return 6 if projected else 5
    return 1 if cell in (RNN_TANH, RNN_RELU) else 4


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fake kernels and autograd

def _recurrence_fwd_fake(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save):
    T, B, GH = gx.shape
    H = GH // NUM_GATES[cell]
    P = h0.shape[1]
    acc = _acc_dtype(gx.dtype)
    y = gx.new_empty((T, B, P))
    h_n = gx.new_empty((B, P))
    c_n = gx.new_empty((B, H)) if cell == LSTM else gx.new_empty((0,))
    K = workspace_units(cell, w_hr is not None)
    hs = gx.new_empty((T + 1, B, P) if save else (0,), dtype=acc)
    ws = gx.new_empty((T, B, K * H) if save else (0,), dtype=acc)
    return y, h_n, c_n, hs, ws


def _recurrence_bwd_fake(grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws, cell,
                         reverse):
    T, B = ws.shape[0], ws.shape[1]
    GH, P = w_hh.shape
    H = GH // NUM_GATES[cell]
    return (w_hh.new_empty((T, B, GH)), w_hh.new_empty((B, P)),
            w_hh.new_empty((B, H)) if cell == LSTM else w_hh.new_empty((0,)),
            w_hh.new_empty((GH, P)), w_hh.new_empty((GH,)),
            w_hh.new_empty((P, H)) if w_hr is not None else w_hh.new_empty((0,)))


class _Projection(threading.local):
    """(gx, x, w_ih, b_ih) of the :func:`projected_recurrence` call in flight on this thread."""

    source: tuple | None = None


_projection = _Projection()


def _setup_context(ctx, inputs, output):
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save = inputs
    _, _, _, hs, ws = output
    ctx.cell, ctx.reverse, ctx.save = cell, reverse, save
    # Unused outputs (hs, ws, often h_n / c_n) get no gradient instead of materialised zeros:
    # the backward op takes them as optional.
    ctx.set_materialize_grads(False)
    # The differentiable backward needs gx. Saving it would keep (T, B, G*H) alive until the
    # backward; when gx is F.linear(x, w_ih, b_ih) of projected_recurrence, x, w_ih and b_ih,
    # which that linear's backward keeps anyway, are saved instead and gx is recomputed.
    source = _projection.source
    ctx.projected = source is not None and source[0] is gx
    gx_from = source[1:] if ctx.projected else (gx,)
    ctx.save_for_backward(*gx_from, h0, c0, w_hh, b_hh, w_hr, lengths, hs, ws)


def _backward_differentiable(ctx, inputs, lengths, grads):
    """First-order gradients that can be differentiated again: the reference recurrence (in
    the accumulation dtype, as the kernels compute) recomputed from the saved inputs."""
    dtype = inputs[0].dtype
    acc = _acc_dtype(dtype)

    def forward(*tensors):
        y, h, c = reference_recurrence(*(t if t is None else t.to(acc) for t in tensors),
                                       lengths, ctx.cell, ctx.reverse)
        return y.to(dtype), h.to(dtype), (None if c is None else c.to(dtype))

    return differentiable_vjp(forward, inputs, grads, ctx.needs_input_grad[:6])


def _vmap_forward(op):
    """vmap of a recurrence forward: a vmapped dimension on gx / h0 / c0 / lengths only folds
    into the batch dimension (one kernel call); per-sample weights run one call each."""

    def rule(info, in_dims, gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save):
        args = (gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save)
        if batched(in_dims, 3, 4, 5):
            return _autograd.vmap_by_loop(op, info, in_dims, *args)
        n = info.batch_size
        y, h_n, c_n, hs, ws = op(fold(gx, in_dims[0], 1, n), fold(h0, in_dims[1], 0, n),
                                 fold(c0, in_dims[2], 0, n), w_hh, b_hh, w_hr,
                                 fold(lengths, in_dims[6], 0, n), cell, reverse, save)
        lstm = cell == LSTM
        outs = (unfold(y, 1, n), unfold(h_n, 0, n), unfold(c_n, 0, n) if lstm else c_n,
                unfold(hs, 1, n) if save else hs, unfold(ws, 1, n) if save else ws)
        return outs, (1, 0, 0 if lstm else None, 1 if save else None, 1 if save else None)

    return rule


def register_recurrence(fwd_name: str, bwd_name: str) -> None:
    """Fake kernels, autograd and vmap rules of a pair of recurrence ops with the schemas of
    recurrence_fwd / recurrence_bwd (one pair per backend: C++, Triton).

    First order (``create_graph=False``, one ``torch.func.grad``): the fused backward op. When
    the gradients must be differentiable themselves (``create_graph=True``, grad of grad,
    Hessian-vector products), the backward recomputes the forward with the reference
    recurrence from the saved inputs and differentiates that: slower, any order. vmap of the
    backward op runs one call per sample, as its weight gradients sum over the batch."""
    torch.library.register_fake(fwd_name, _recurrence_fwd_fake)
    torch.library.register_fake(bwd_name, _recurrence_bwd_fake)
    fwd, bwd_op = overload(fwd_name), overload(bwd_name)

    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_hs, _grad_ws):
        if not ctx.save:
            raise RuntimeError(f"rnnkernels: {fwd_name} was called with save=False, so it kept "
                               "nothing to differentiate; call it with save=True when a "
                               "gradient is needed")
        *gx_from, h0, c0, w_hh, b_hh, w_hr, lengths, hs, ws = ctx.saved_tensors
        grad_c_n = grad_c_n if ctx.cell == LSTM else None
        if graph_needed(*gx_from, h0, c0, w_hh, b_hh, w_hr, grad_y, grad_h_n, grad_c_n):
            gx = F.linear(*gx_from) if ctx.projected else gx_from[0]
            grads = _backward_differentiable(ctx, (gx, h0, c0, w_hh, b_hh, w_hr), lengths,
                                             (grad_y, grad_h_n, grad_c_n))
            return (*grads, None, None, None, None)
        with torch.no_grad():  # the fused op has no autograd, and no graph is needed
            dgx, dh0, dc0, dw_hh, db_hh, dw_hr = bwd_op(
                grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws, ctx.cell,
                ctx.reverse)
        return (dgx, dh0, dc0 if ctx.cell == LSTM else None, dw_hh,
                db_hh if b_hh is not None else None, dw_hr if w_hr is not None else None, None,
                None, None, None)

    _autograd.register_autograd(fwd, backward, _setup_context)
    torch.library.register_vmap(fwd, _vmap_forward(fwd))
    torch.library.register_vmap(bwd_op, functools.partial(_autograd.vmap_by_loop, bwd_op))


register_recurrence("rnnkernels::recurrence_fwd", "rnnkernels::recurrence_bwd")


# ------------------------------------------------------------------ dispatch

def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the recurrence runs in: the autocast dtype inside an autocast region of x's
    device type (the recurrence is a matmul-bound op, autocast's lower-precision class), else
    x's dtype."""
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


def recurrence(gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
               w_hr: Tensor | None, lengths: Tensor | None, cell: int, reverse: bool,
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential part on a fast backend, from precomputed gx (T, B, G*H).

    Returns y (T, B, P), h_n (B, P) and c_n ((B, H) for the LSTM, else empty). Inside an
    autocast region every floating input is cast to the autocast dtype (state and accumulation
    stay fp32 inside the kernels)."""
    dtype = compute_dtype(gx)
    if dtype != gx.dtype or h0.dtype != dtype:
        gx, h0, c0, w_hh, b_hh, w_hr = (t if t is None else t.to(dtype)
                                        for t in (gx, h0, c0, w_hh, b_hh, w_hr))
    save = _needs_grad(gx, h0, c0, w_hh, b_hh, w_hr)
    if lengths is not None:
        lengths = lengths.to(device=gx.device, dtype=torch.int64)
    if backend == "triton":
        from ..triton.recurrence import recurrence_fwd_triton

        fwd = recurrence_fwd_triton
    else:
        fwd = torch.ops.rnnkernels.recurrence_fwd
    y, h_n, c_n, _, _ = fwd(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save)
    return y, h_n, c_n


def projected_recurrence(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, h0: Tensor,
                         c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
                         w_hr: Tensor | None, lengths: Tensor | None, cell: int, reverse: bool,
                         backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`recurrence` of gx = x W_ih^T + b_ih (x: (T, B, I), w_ih: (G*H, I)), whose
    autograd saves x, w_ih and b_ih instead of gx for second-order gradients (no memory beyond
    what the projection's backward keeps)."""
    gx = F.linear(x, w_ih, b_ih)
    if torch.compiler.is_compiling():
        # A compiled graph keeps what its traced backward reads, and that (first order) reads
        # no gx.
        return recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, backend)
    _projection.source = (gx, x, w_ih, b_ih)
    try:
        return recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, backend)
    finally:
        _projection.source = None


def _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell):
    _validate.tensor("x", x, ndim=3, floating=True)
    _validate.nonempty("x", x, [(0, "time step"), (1, "batch row")])
    T, B, I = x.shape
    G = NUM_GATES[cell]
    _validate.tensor("w_ih", w_ih, shape=("G*H", I), like=x)
    if w_ih.shape[0] % G or w_ih.shape[0] == 0:
        raise ValueError(f"w_ih must have a positive multiple of {G} rows ({G} gates of the "
                         f"{CELL_NAMES[cell]}), got {w_ih.shape[0]}")
    H = w_ih.shape[0] // G
    P = w_hr.shape[0] if w_hr is not None else H
    if w_hr is not None:
        if cell != LSTM:
            raise ValueError("w_hr (projection) is supported for the LSTM only, "
                             f"not {CELL_NAMES[cell]}")
        _validate.tensor("w_hr", w_hr, shape=("P", H), like=x)
    _validate.tensor("w_hh", w_hh, shape=(G * H, P), like=x)
    _validate.optional("b_ih", b_ih, shape=(G * H,), like=x)
    _validate.optional("b_hh", b_hh, shape=(G * H,), like=x)
    _validate.tensor("h0", h0, shape=(B, P), like=x)
    if cell == LSTM:
        _validate.tensor("c0", c0, shape=(B, H), like=x)
    if lengths is not None:
        _validate.lengths("lengths", lengths, B, T)
    return H, P


def reference_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse):
    """The reference of the recurrence from gx for any cell; returns (y, h_n, c_n or None)."""
    if cell == LSTM:
        return lstm_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse)
    if cell in (GRU, GRU_RESET_BEFORE):
        y, h = gru_recurrence(gx, h0, w_hh, b_hh, cell == GRU, lengths, reverse)
    else:
        y, h = rnn_recurrence(gx, h0, w_hh, b_hh, "tanh" if cell == RNN_TANH else "relu",
                              lengths, reverse)
    return y, h, None


def reference_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse):
    """The reference of one layer for any cell; returns (y, h_n, c_n or None)."""
    return reference_recurrence(F.linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, w_hr, lengths, cell,
                                reverse)


def _layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse):
    # Under autocast, x from an autocast matmul may meet fp32 weights or states: one dtype for
    # the checks; the recurrence then runs in the autocast dtype (compute_dtype).
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = autocast_promote(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                               w_hr)
    _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell)
    backend = _backend.choose("recurrence", x.device, compute_dtype(x))
    if backend == "reference":
        return reference_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse)
    y, h_n, c_n = projected_recurrence(x, w_ih, b_ih, h0, c0 if cell == LSTM else None, w_hh,
                                       b_hh, w_hr, lengths, cell, reverse, backend)
    return y, h_n, (c_n if cell == LSTM else None)


def lstm(x: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None, *,
         lengths: Tensor | None = None, reverse: bool = False
         ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer, one direction.

    x: (T, B, I); hx = (h0 (B, P), c0 (B, H)); w_ih: (4H, I); w_hh: (4H, P); b_ih, b_hh: (4H,);
    w_hr: (P, H) projection (P = H without it); lengths: (B,) valid steps per row (rows past
    their length keep their state and output zeros). Returns y (T, B, P) and (h_n, c_n).
    """
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError("hx must be a tuple (h0, c0) for the LSTM")
    y, h, c = _layer(x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, w_hr, lengths, LSTM, reverse)
    return y, (h, c)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, *, reset_after: bool = True, lengths: Tensor | None = None,
        reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction.

    x: (T, B, I); h0: (B, H); w_ih: (3H, I); w_hh: (3H, H); b_ih, b_hh: (3H,).
    reset_after=True is torch.nn.GRU's cell; False is Cho et al. 2014 (reset applied to h before
    the recurrent matmul of the candidate). Returns y (T, B, H) and h_n (B, H).
    """
    cell = GRU if reset_after else GRU_RESET_BEFORE
    y, h, _ = _layer(x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, cell, reverse)
    return y, h


def rnn(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, *, nonlinearity: str = "tanh", lengths: Tensor | None = None,
        reverse: bool = False) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer, one direction: h = act(W_ih x + b_ih + W_hh h + b_hh).

    x: (T, B, I); h0: (B, H); w_ih: (H, I); w_hh: (H, H); b_ih, b_hh: (H,);
    nonlinearity: "tanh" or "relu". Returns y (T, B, H) and h_n (B, H).
    """
    _validate.choice("nonlinearity", nonlinearity, ("tanh", "relu"))
    cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    y, h, _ = _layer(x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, cell, reverse)
    return y, h


__all__ = ["lstm", "gru", "rnn", "recurrence", "LSTM", "GRU", "GRU_RESET_BEFORE", "RNN_TANH",
           "RNN_RELU"]
