"""Functional API of the generic gated recurrence: lstm, gru, rnn over one layer and direction.

Every function takes time-major input x (T, B, I) and the layer's weights in torch.nn's layout,
computes the input projection for all steps as one GEMM (``x @ w_ih^T + b_ih``) and runs the
sequential part in the backend chosen by :mod:`rnnkernels._backend`. Autograd flows through the
input projection as usual and through the recurrence by the registered backward op. On the CPU
a call without gradients runs both in one fused op instead where one applies
(:func:`_inference_op`): a decoding step (one step of at most DECODE_ROWS rows) and inference
on a sequence of one row in float32, whose input projection (from 16 steps on) rides along with
the recurrent products (csrc/cpu/panel_gemm.h, RowProjection).

Second order (``create_graph=True``, Hessian-vector products, gradient penalties): the first
order stays the fused backward op; a backward whose result must be differentiable recomputes the
recurrence with the plain-PyTorch reference and differentiates that (slower, any order).
torch.func: ``grad``, ``vjp``, ``jacrev`` and ``vmap`` (vmap rules on the ops: a vmapped
dimension on the inputs and states folds into the batch; per-sample weights loop).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

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
from ._linear import linear

LSTM, GRU, GRU_RESET_BEFORE, RNN_TANH, RNN_RELU = range(5)
NUM_GATES = {LSTM: 4, GRU: 3, GRU_RESET_BEFORE: 3, RNN_TANH: 1, RNN_RELU: 1}
CELL_NAMES = {LSTM: "LSTM", GRU: "GRU", GRU_RESET_BEFORE: "GRU (reset before)",
              RNN_TANH: "RNN (tanh)", RNN_RELU: "RNN (relu)"}


def workspace_units(cell: int, projected: bool, layer_norm: bool = False) -> int:
    """Per-step values the forward keeps for the backward, in units of H (cells.h)."""
    if cell == LSTM:
        base = 6 if projected else 5
    else:
        base = 1 if cell in (RNN_TANH, RNN_RELU) else 4
    return base + (NUM_GATES[cell] if layer_norm else 0)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ------------------------------------------------------------------ fake kernels and autograd

def _recurrence_fwd_fake(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save,
                         w_peep=None, zoneout_mask=None, zoneout_mask_c=None, zoneout=0.0,
                         recurrent_dropout_mask=None, ln_weight_hh=None, ln_weight_c=None,
                         ln_bias_c=None):
    T, B, GH = gx.shape
    H = GH // NUM_GATES[cell]
    P = h0.shape[1]
    acc = _acc_dtype(gx.dtype)
    y = gx.new_empty((T, B, P))
    h_n = gx.new_empty((B, P))
    c_n = gx.new_empty((B, H)) if cell == LSTM else gx.new_empty((0,))
    K = workspace_units(cell, w_hr is not None, ln_weight_hh is not None)
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


@torch.library.register_fake("rnnkernels::cell_step")
def _cell_step_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell):
    B, H = h0.shape
    return (x.new_empty((1, B, H)), x.new_empty((B, H)),
            x.new_empty((B, H)) if cell == LSTM else x.new_empty((0,)))


@torch.library.register_fake("rnnkernels::recurrence_infer")
def _recurrence_infer_fake(x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell, reverse):
    B, H = h0.shape
    return (x.new_empty((x.shape[0], B, H)), x.new_empty((B, H)),
            x.new_empty((B, H)) if cell == LSTM else x.new_empty((0,)))


def _no_backward(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"rnnkernels::{name} runs a layer without gradients and has no "
                           "backward; a layer call that needs gradients runs the recurrence ops "
                           "(rnnkernels.ops.lstm / gru / rnn and the modules choose them)")
    return backward


# A direct call on tensors that require grad records a backward that says so, instead of
# outputs that silently carry no gradient.
for _name in ("cell_step", "recurrence_infer"):
    _autograd.register_autograd(f"rnnkernels::{_name}", _no_backward(_name),
                                lambda ctx, inputs, output: None)


class _Projection(threading.local):
    """(gx, x, w_ih, b_ih, ln_weight_ih, within, past) of the :func:`projected_recurrence`
    call in flight on this thread (within / past: its :func:`padded_steps`, or None)."""

    source: tuple | None = None


_projection = _Projection()


def _recurrence_bwd_options_fake(grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws,
                                 cell, reverse, w_peep=None, zoneout_mask=None,
                                 zoneout_mask_c=None, zoneout=0.0, recurrent_dropout_mask=None,
                                 ln_weight_hh=None, ln_weight_c=None, ln_bias_c=None):
    """The C++ backward op: the outputs of _recurrence_bwd_fake and the gradients of the cell
    options' parameters (w_peep, ln_weight_hh, ln_weight_c, ln_bias_c; (0,) when absent)."""
    grads = _recurrence_bwd_fake(grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws,
                                 cell, reverse)
    params = (w_peep, ln_weight_hh, ln_weight_c, ln_bias_c)
    return grads + tuple(w_hh.new_empty(p.shape if p is not None else (0,)) for p in params)


# The trailing arguments of recurrence_fwd / recurrence_bwd after the base schema (the Triton
# ops have none): the cell options, in schema order.
_BASE_FWD_ARGS = 10
_OPTION_NAMES = ("w_peep", "zoneout_mask", "zoneout_mask_c", "zoneout", "recurrent_dropout_mask",
                 "ln_weight_hh", "ln_weight_c", "ln_bias_c")


def _setup_context(ctx, inputs, output):
    gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save = inputs[:_BASE_FWD_ARGS]
    options = inputs[_BASE_FWD_ARGS:]
    _, _, _, hs, ws = output
    # floats cannot be saved as tensors: they stay on ctx, in their argument positions
    ctx.option_floats = [o if isinstance(o, float) else None for o in options]
    options = [None if isinstance(o, float) else o for o in options]
    ctx.cell, ctx.reverse, ctx.save = cell, reverse, save
    # Unused outputs (hs, ws, often h_n / c_n) get no gradient instead of materialised zeros:
    # the backward op takes them as optional.
    ctx.set_materialize_grads(False)
    ctx.has_bias, ctx.has_proj = b_hh is not None, w_hr is not None
    ctx.num_options = len(options)
    # The differentiable backward needs gx. Saving it would keep (T, B, G*H) alive until the
    # backward; when gx is the input projection of projected_recurrence, x, w_ih, b_ih (and the
    # layer-norm gain), which that projection's backward keeps anyway, are saved instead and gx
    # is recomputed.
    source = _projection.source
    ctx.projected = source is not None and source[0] is gx
    gx_from = source[1:] if ctx.projected else (gx,)
    ctx.num_gx_from = len(gx_from)
    ctx.save_for_backward(*gx_from, h0, c0, w_hh, b_hh, w_hr, lengths, hs, ws, *options)


def _option_args(ctx, saved: list) -> list:
    """The cell-option arguments of the forward, from the saved tensors and ctx.option_floats."""
    return [f if f is not None else t for t, f in zip(saved, ctx.option_floats)]


# Positions, among the cell-option arguments, of those with a gradient (the parameters w_peep,
# ln_weight_hh, ln_weight_c, ln_bias_c), in the order of the backward op's extra outputs.
_OPTION_PARAMS = (0, 5, 6, 7)


def _option_grads(ctx, options: list, option_outputs: tuple) -> tuple:
    """Gradients of the cell-option arguments from the backward op's extra outputs (None for
    the masks, the zoneout probability and absent parameters)."""
    grads = [None] * ctx.num_options
    for k, grad in zip(_OPTION_PARAMS, option_outputs):
        if k < ctx.num_options and options[k] is not None:
            grads[k] = grad
    return tuple(grads)


def _option_kwargs(options: Sequence) -> dict:
    """The reference's keyword arguments of the cell-option arguments of the op (absent ones
    left out: each cell's reference takes only its own)."""
    return {name: value for name, value in zip(_OPTION_NAMES, options)
            if value is not None and not (name == "zoneout" and value == 0.0)}


def _backward_differentiable(ctx, inputs, options, lengths, grads):
    """First-order gradients that can be differentiated again: the reference recurrence (in
    the accumulation dtype, as the kernels compute) recomputed from the saved inputs, cell
    options included. Returns the gradients of inputs then of the options."""
    dtype = inputs[0].dtype
    acc = _acc_dtype(dtype)
    n = len(inputs)
    floats = ctx.option_floats

    def forward(*tensors):
        t = [x if x is None else x.to(acc) for x in tensors]
        opts = [f if f is not None else o for o, f in zip(t[n:], floats)]
        y, h, c = reference_recurrence(*t[:n], lengths, ctx.cell, ctx.reverse,
                                       **_option_kwargs(opts))
        return y.to(dtype), h.to(dtype), (None if c is None else c.to(dtype))

    tensor_options = [None if f is not None else o for o, f in zip(options, floats)]
    needs = list(ctx.needs_input_grad[:n]) + list(ctx.needs_input_grad[_BASE_FWD_ARGS:])
    return differentiable_vjp(forward, (*inputs, *tensor_options), grads, needs)


def _vmap_forward(op):
    """vmap of a recurrence forward: a vmapped dimension on gx / h0 / c0 / lengths only folds
    into the batch dimension (one kernel call); per-sample weights, and any cell option, run
    one call per sample."""

    def rule(info, in_dims, *args):
        gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save = args[:_BASE_FWD_ARGS]
        options = args[_BASE_FWD_ARGS:]
        if batched(in_dims, 3, 4, 5) or any(isinstance(o, Tensor) for o in options):
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


def register_recurrence(fwd_name: str, bwd_name: str, cell_options: bool = False) -> None:
    """Fake kernels, autograd and vmap rules of a pair of recurrence ops with the schemas of
    recurrence_fwd / recurrence_bwd (one pair per backend: C++, Triton). cell_options: the ops
    take the cell options (the C++ ones: w_peep, zoneout_mask, zoneout_mask_c, zoneout,
    recurrent_dropout_mask, ln_weight_hh, ln_weight_c, ln_bias_c).

    First order (``create_graph=False``, one ``torch.func.grad``): the fused backward op. When
    the gradients must be differentiable themselves (``create_graph=True``, grad of grad,
    Hessian-vector products), the backward recomputes the forward with the reference
    recurrence from the saved inputs and differentiates that: slower, any order. vmap of the
    backward op runs one call per sample, as its weight gradients sum over the batch."""
    torch.library.register_fake(fwd_name, _recurrence_fwd_fake)
    torch.library.register_fake(bwd_name, _recurrence_bwd_options_fake if cell_options
                                else _recurrence_bwd_fake)
    fwd, bwd_op = overload(fwd_name), overload(bwd_name)

    def backward(ctx, grad_y, grad_h_n, grad_c_n, _grad_hs, _grad_ws):
        if not ctx.save:
            raise RuntimeError(f"rnnkernels: {fwd_name} was called with save=False, so it kept "
                               "nothing to differentiate; call it with save=True when a "
                               "gradient is needed")
        saved = ctx.saved_tensors
        k = ctx.num_gx_from
        gx_from = saved[:k]
        h0, c0, w_hh, b_hh, w_hr, lengths, hs, ws = saved[k:k + 8]
        options = _option_args(ctx, list(saved[k + 8:]))
        grad_c_n = grad_c_n if ctx.cell == LSTM else None
        params = [o for o in options if isinstance(o, Tensor)]
        if graph_needed(*gx_from, h0, c0, w_hh, b_hh, w_hr, *params, grad_y, grad_h_n,
                        grad_c_n):
            gx = _projection_from(*gx_from) if ctx.projected else gx_from[0]
            grads = _backward_differentiable(ctx, (gx, h0, c0, w_hh, b_hh, w_hr), options,
                                             lengths, (grad_y, grad_h_n, grad_c_n))
            return (*grads[:6], None, None, None, None, *grads[6:])
        with torch.no_grad():  # the fused op has no autograd, and no graph is needed
            dgx, dh0, dc0, dw_hh, db_hh, dw_hr, *option_outputs = bwd_op(
                grad_y, grad_h_n, grad_c_n, c0, w_hh, w_hr, lengths, hs, ws, ctx.cell,
                ctx.reverse, *options)
        return (dgx, dh0, dc0 if ctx.cell == LSTM else None, dw_hh,
                db_hh if ctx.has_bias else None, dw_hr if ctx.has_proj else None, None, None,
                None, None) + _option_grads(ctx, options, tuple(option_outputs))

    _autograd.register_autograd(fwd, backward, _setup_context)
    torch.library.register_vmap(fwd, _vmap_forward(fwd))
    torch.library.register_vmap(bwd_op, functools.partial(_autograd.vmap_by_loop, bwd_op))


register_recurrence("rnnkernels::recurrence_fwd", "rnnkernels::recurrence_bwd",
                    cell_options=True)


# ------------------------------------------------------------------ dispatch

def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the recurrence runs in: the autocast dtype inside an autocast region of x's
    device type (the recurrence is a matmul-bound op, autocast's lower-precision class), else
    x's dtype."""
    # Outside any autocast region (a decoding loop's every call) without reading x's device,
    # which costs a device object per call; Dynamo traces the general form.
    if not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled():
        return x.dtype
    device = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@dataclass(frozen=True)
class CellOptions:
    """The cell options of one layer and direction (all off by default).

    w_peep: (3, H) peephole weights of the LSTM's i, f, o gates.
    zoneout: probability that a state unit keeps its previous value; in training (and when
    :meth:`drawn` has drawn them) zoneout_mask (T, B, P) and, for the LSTM, zoneout_mask_c
    (T, B, H) hold the 0/1 draws, else the state is the expectation.
    recurrent_dropout: probability of dropping a unit of the state that W_hh multiplies, one
    mask per sequence (training only); recurrent_dropout_mask (B, P) holds it, scaled by
    1 / (1 - p), once drawn.
    ln_weight_ih, ln_weight_hh: (G*H,) gains of the layer normalisations of x W_ih^T and
    h W_hh^T (LSTM, GRU); ln_weight_c, ln_bias_c: (H,) of the LSTM's c_t in h = o * tanh(.).
    training: draw the random masks with torch's generator.
    """

    w_peep: Tensor | None = None
    zoneout: float = 0.0
    recurrent_dropout: float = 0.0
    training: bool = False
    zoneout_mask: Tensor | None = None
    zoneout_mask_c: Tensor | None = None
    recurrent_dropout_mask: Tensor | None = None
    ln_weight_ih: Tensor | None = None
    ln_weight_hh: Tensor | None = None
    ln_weight_c: Tensor | None = None
    ln_bias_c: Tensor | None = None

    def names(self) -> list[str]:
        """The options that change the layer, by their module argument names (recurrent
        dropout is the identity outside training)."""
        on = {"peephole": self.w_peep is not None, "zoneout": bool(self.zoneout),
              "recurrent_dropout": self.recurrent_dropout_mask is not None
              or bool(self.recurrent_dropout and self.training),
              "layer_norm": self.ln_weight_hh is not None}
        return [name for name, value in on.items() if value]

    def drawn(self, x: Tensor, P: int, H: int, cell: int) -> CellOptions:
        """These options with the random masks of a layer over x (T, B, I) drawn (training),
        in the order zoneout of h, of c, recurrent dropout."""
        if not self.training:
            return self
        T, B = x.shape[0], x.shape[1]
        dtype = compute_dtype(x)

        def draw(p: float, *shape: int) -> Tensor:  # fp32 uniforms: the same draws for any dtype
            return (torch.rand(shape, device=x.device) < p).to(dtype)

        options = self
        if self.zoneout and self.zoneout_mask is None:
            options = replace(options, zoneout_mask=draw(self.zoneout, T, B, P),
                              zoneout_mask_c=draw(self.zoneout, T, B, H) if cell == LSTM else None)
        p = self.recurrent_dropout
        if p and self.recurrent_dropout_mask is None:
            keep = 1 - draw(p, B, P)
            options = replace(options, recurrent_dropout_mask=keep / (1 - p))
        return options

    def op_args(self) -> tuple:
        """The trailing arguments of recurrence_fwd / recurrence_bwd."""
        return (self.w_peep, self.zoneout_mask, self.zoneout_mask_c, float(self.zoneout),
                self.recurrent_dropout_mask, self.ln_weight_hh, self.ln_weight_c, self.ln_bias_c)


NO_OPTIONS = CellOptions()


def recurrence(gx: Tensor, h0: Tensor, c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
               w_hr: Tensor | None, lengths: Tensor | None, cell: int, reverse: bool,
               backend: str, options: CellOptions = NO_OPTIONS) -> tuple[Tensor, Tensor, Tensor]:
    """The sequential part on a fast backend, from precomputed gx (T, B, G*H).

    Returns y (T, B, P), h_n (B, P) and c_n ((B, H) for the LSTM, else empty). Inside an
    autocast region every floating input is cast to the autocast dtype (state and accumulation
    stay fp32 inside the kernels). Cell options run on the C++ CPU kernels only (backend
    "cpu"); :func:`run_layer` sends them elsewhere to the reference."""
    named = options.names() if options is not NO_OPTIONS else []
    if named and backend != "cpu":
        raise ValueError(f"the {backend} recurrence kernel has no cell options "
                         f"({', '.join(named)}); use backend 'cpu' or the reference")
    extra = options.op_args() if named else ()
    dtype = compute_dtype(gx)
    if dtype != gx.dtype or h0.dtype != dtype:
        gx, h0, c0, w_hh, b_hh, w_hr = (t if t is None else t.to(dtype)
                                        for t in (gx, h0, c0, w_hh, b_hh, w_hr))
        extra = tuple(t.to(dtype) if isinstance(t, Tensor) else t for t in extra)
    save = _autograd.needs_grad(gx, h0, c0, w_hh, b_hh, w_hr, *extra)
    if lengths is not None:
        lengths = lengths.to(device=gx.device, dtype=torch.int64)
    if backend == "triton":
        from ..triton.recurrence import recurrence_fwd_triton

        fwd = recurrence_fwd_triton
    else:
        fwd = torch.ops.rnnkernels.recurrence_fwd
    args = (gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, save, *extra)
    y, h_n, c_n, _, _ = _autograd.call(fwd, save, *args)
    return y, h_n, c_n


# Share of a padded batch's (step, row) pairs, those within their row's length, below which
# the CPU layers project only those (padded_steps): the gather and scatter around the smaller
# matmuls cost about what a tenth of the matmuls saves.
PADDED_STEPS_MAX_SHARE = 0.9


def padded_steps(x: Tensor, lengths: Tensor | None, backend: str
                 ) -> tuple[Tensor, Tensor] | None:
    """For a padded batch x (T, B, I) on the CPU kernels in plain eager mode: the flat indices
    t * B + b of the (step, row) pairs within their row's length and of those past it, when the
    former are few enough (PADDED_STEPS_MAX_SHARE) for :func:`input_projection` to project
    only them; else None. The C++ kernels never read gx past a row's length."""
    if lengths is None or backend != "cpu" or not _autograd.plain_eager():
        return None
    T, B = x.shape[0], x.shape[1]
    within = (torch.arange(T).unsqueeze(1) < lengths.to("cpu").unsqueeze(0)).flatten()
    if int(within.sum()) >= PADDED_STEPS_MAX_SHARE * T * B:
        return None
    return (within.nonzero().squeeze(1).to(x.device),
            (~within).nonzero().squeeze(1).to(x.device))


def input_projection(x: Tensor, w_ih: Tensor, b_ih: Tensor | None,
                     ln_weight_ih: Tensor | None = None,
                     steps: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """gx = x W_ih^T + b_ih for all steps, layer-normalised (gain ln_weight_ih) before b_ih
    when ln_weight_ih is given. With ``steps`` (:func:`padded_steps`), only the (step, row)
    pairs within their row's length are projected, so that the matmul and its two gradient
    matmuls skip the padding (as cuDNN's packed layout does), and gx is zero past each length."""
    if steps is not None:
        within, past = steps
        T, B = x.shape[0], x.shape[1]
        g = input_projection(x.reshape(T * B, x.shape[-1]).index_select(0, within), w_ih, b_ih,
                             ln_weight_ih)
        gx = g.new_empty((T * B, g.shape[-1]))
        gx.index_copy_(0, within, g)
        gx.index_fill_(0, past, 0)
        return gx.view(T, B, g.shape[-1])
    if ln_weight_ih is None:
        return linear(x, w_ih, b_ih)
    gx = F.layer_norm(linear(x, w_ih), (w_ih.shape[0],), ln_weight_ih)
    return gx if b_ih is None else gx + b_ih


def _projection_from(x: Tensor, w_ih: Tensor, b_ih: Tensor | None,
                     ln_weight_ih: Tensor | None, within: Tensor | None,
                     past: Tensor | None) -> Tensor:
    """gx again from what projected_recurrence's autograd saved (_Projection.source)."""
    return input_projection(x, w_ih, b_ih, ln_weight_ih,
                            None if within is None else (within, past))


def projected_recurrence(x: Tensor, w_ih: Tensor, b_ih: Tensor | None, h0: Tensor,
                         c0: Tensor | None, w_hh: Tensor, b_hh: Tensor | None,
                         w_hr: Tensor | None, lengths: Tensor | None, cell: int, reverse: bool,
                         backend: str, options: CellOptions = NO_OPTIONS
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`recurrence` of gx = :func:`input_projection` of x (T, B, I), whose autograd saves
    x, w_ih, b_ih (and ln_weight_ih) instead of gx for second-order gradients (no memory beyond
    what the projection's backward keeps).

    In the cells whose input and recurrent pre-activations add in every gate (all but the
    reset-after GRU, whose b_hn is scaled by r), b_ih joins b_hh as the recurrence's one bias
    (b_ih + b_hh) instead of entering the projection: the backward then sums the gradient of
    the pre-activations, (T, B, G*H), over steps and rows once for both biases instead of
    twice (each sum a pass over all of it)."""
    if cell != GRU and b_ih is not None:
        b_hh = b_ih if b_hh is None else b_ih + b_hh
        b_ih = None
    steps = padded_steps(x, lengths, backend)
    gx = input_projection(x, w_ih, b_ih, options.ln_weight_ih, steps)
    if torch.compiler.is_compiling():
        # A compiled graph keeps what its traced backward reads, and that (first order) reads
        # no gx.
        return recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, backend, options)
    _projection.source = (gx, x, w_ih, b_ih, options.ln_weight_ih, *(steps or (None, None)))
    try:
        return recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, backend, options)
    finally:
        _projection.source = None


def _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell,
                 options: CellOptions = NO_OPTIONS):
    _validate.tensor("x", x, ndim=3, floating=True)
    _validate.nonempty("x", x, [(0, "time step")])
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
    _validate.optional("w_peep", options.w_peep, shape=(3, H), like=x)
    _validate.probability("zoneout", options.zoneout)
    _validate.probability("recurrent_dropout", options.recurrent_dropout)
    ln = {"ln_weight_ih": (options.ln_weight_ih, G * H),
          "ln_weight_hh": (options.ln_weight_hh, G * H)}
    if cell == LSTM:
        ln |= {"ln_weight_c": (options.ln_weight_c, H), "ln_bias_c": (options.ln_bias_c, H)}
    given = [name for name, (t, _) in ln.items() if t is not None]
    if given:
        if cell not in (LSTM, GRU):
            raise ValueError("layer normalisation is supported for the LSTM and the GRU with "
                             f"reset_after=True only, not {CELL_NAMES[cell]}")
        if len(given) != len(ln):
            raise ValueError(f"the layer-norm parameters {', '.join(ln)} must be given "
                             f"together, got only {', '.join(given)}")
        for name, (t, size) in ln.items():
            _validate.tensor(name, t, shape=(size,), like=x)
    return H, P


def reference_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse, **options):
    """The reference of the recurrence from gx for any cell, with the reference's cell-option
    keywords; returns (y, h_n, c_n or None)."""
    if cell == LSTM:
        return lstm_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, reverse, **options)
    if cell in (GRU, GRU_RESET_BEFORE):
        y, h = gru_recurrence(gx, h0, w_hh, b_hh, cell == GRU, lengths, reverse, **options)
    else:
        y, h = rnn_recurrence(gx, h0, w_hh, b_hh, "tanh" if cell == RNN_TANH else "relu",
                              lengths, reverse, **options)
    return y, h, None


def reference_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse,
                    options: CellOptions = NO_OPTIONS):
    """The reference of one layer for any cell; returns (y, h_n, c_n or None)."""
    gx = input_projection(x, w_ih, b_ih, options.ln_weight_ih)
    return reference_recurrence(gx, h0, c0, w_hh, b_hh, w_hr, lengths, cell, reverse,
                                **_option_kwargs(options.op_args()))


# Batch rows up to which one step without gradients runs as the fused cell_step op.
DECODE_ROWS = 4
# The fused inference ops and the dtypes they take (looked up once: torch.ops' attribute chain
# costs about a microsecond a call, and a decoding loop calls a layer once per token).
_CELL_STEP = torch.ops.rnnkernels.cell_step.default
_CELL_STEP_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
_RECURRENCE_INFER = torch.ops.rnnkernels.recurrence_infer.default
_RECURRENCE_INFER_DTYPES = (torch.float32,)


def _inference_op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, backend, options):
    """The fused op for a layer call that needs no gradient, in plain eager mode on the CPU
    kernels without projection, lengths, cell options or the reset-before GRU, or None:
    ``cell_step`` for one step (T = 1) of at most DECODE_ROWS rows in float32 / float64 /
    bfloat16 (a decoding loop's call: input projection, recurrent product and cell in one
    parallel region), ``recurrence_infer`` for more steps of one row in float32 (inference on a
    sequence: from 16 steps on, the input projection fused into the recurrence's steps)."""
    T, B = x.shape[0], x.shape[1]
    if T == 1 and B <= DECODE_ROWS:
        op, dtypes = _CELL_STEP, _CELL_STEP_DTYPES
    elif T > 1 and B == 1:
        op, dtypes = _RECURRENCE_INFER, _RECURRENCE_INFER_DTYPES
    else:
        return None
    dtype = x.dtype
    if (backend != "cpu" or w_hr is not None or lengths is not None
            or options is not NO_OPTIONS or cell == GRU_RESET_BEFORE or dtype not in dtypes):
        return None
    for t in (h0, c0, w_ih, w_hh, b_ih, b_hh):
        if t is not None and t.dtype != dtype:
            return None
    if (compute_dtype(x) != dtype or _autograd.needs_grad(x, h0, c0, w_ih, w_hh, b_ih, b_hh)
            or not _autograd.plain_eager()):
        return None
    return op


def run_layer(x: Tensor, h0: Tensor, c0: Tensor | None, w_ih: Tensor, w_hh: Tensor,
              b_ih: Tensor | None, b_hh: Tensor | None, w_hr: Tensor | None,
              lengths: Tensor | None, cell: int, reverse: bool, backend: str,
              options: CellOptions = NO_OPTIONS) -> tuple[Tensor, Tensor, Tensor | None]:
    """One layer and direction on ``backend`` (from :func:`rnnkernels._backend.choose`), inputs
    already checked. The Triton and CUDA kernels have no cell options: with one, the layer runs
    on the reference on the same device, with a warning. Random masks (training) are drawn
    here, before the backend runs, so every backend sees the same draws for a seed. Returns
    (y, h_n, c_n or None)."""
    if options is not NO_OPTIONS:
        options = options.drawn(x, h0.shape[1], w_hh.shape[0] // NUM_GATES[cell], cell)
    if options is not NO_OPTIONS and options.names() and backend in ("triton", "cuda"):
        _backend.warn_once(f"rnnkernels: the {backend} recurrence kernel has no "
                           f"{', '.join(options.names())}; using the PyTorch reference")
        backend = "reference"
    if backend == "reference" or x.shape[1] == 0:  # no batch row: nothing for a kernel to do
        return reference_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse,
                               options)
    op = _inference_op(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, backend, options)
    if op is not None:  # _inference_op found the call plain eager, with no gradient needed
        extra = () if op is _CELL_STEP else (reverse,)
        y, h_n, c_n = _autograd.below_autograd(op, x, h0, c0, w_ih, w_hh, b_ih, b_hh, cell,
                                               *extra)
        return y, h_n, (c_n if cell == LSTM else None)
    y, h_n, c_n = projected_recurrence(x, w_ih, b_ih, h0, c0 if cell == LSTM else None, w_hh,
                                       b_hh, w_hr, lengths, cell, reverse, backend, options)
    return y, h_n, (c_n if cell == LSTM else None)


def _layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse,
           options: CellOptions = NO_OPTIONS):
    # Under autocast, x from an autocast matmul may meet fp32 weights or states: one dtype for
    # the checks; the recurrence then runs in the autocast dtype (compute_dtype).
    x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = autocast_promote(x, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                                               w_hr)
    _check_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, options)
    backend = _backend.choose("recurrence", x.device, compute_dtype(x))
    return run_layer(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, cell, reverse, backend,
                     options)


def lstm(x: Tensor, hx: tuple[Tensor, Tensor], w_ih: Tensor, w_hh: Tensor,
         b_ih: Tensor | None = None, b_hh: Tensor | None = None, w_hr: Tensor | None = None, *,
         lengths: Tensor | None = None, reverse: bool = False, w_peep: Tensor | None = None,
         zoneout: float = 0.0, recurrent_dropout: float = 0.0, training: bool = True,
         ln_weight_ih: Tensor | None = None, ln_weight_hh: Tensor | None = None,
         ln_weight_c: Tensor | None = None, ln_bias_c: Tensor | None = None
         ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One LSTM layer, one direction.

    x: (T, B, I); hx = (h0 (B, P), c0 (B, H)); w_ih: (4H, I); w_hh: (4H, P); b_ih, b_hh: (4H,);
    w_hr: (P, H) projection (P = H without it); lengths: (B,) valid steps per row (rows past
    their length keep their state and output zeros). w_peep: (3, H) peephole weights (the i
    and f gates see c_{t-1}, the o gate c_t). zoneout: probability that a unit of h (after the
    projection) and of c keeps its previous value, drawn per step with torch's generator when
    training, else the expectation. recurrent_dropout: variational dropout of the state that
    W_hh multiplies, one mask per sequence drawn with torch's generator, training only.
    ln_weight_ih, ln_weight_hh (4H,), ln_weight_c, ln_bias_c (H,), all or none: layer
    normalisation (haste's LayerNormLSTM): gates = LN(x W_ih^T) * ln_weight_ih + b_ih +
    LN(h W_hh^T) * ln_weight_hh + b_hh, h = o * tanh(LN(c_t) * ln_weight_c + ln_bias_c).
    Returns y (T, B, P) and (h_n, c_n).
    """
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError("hx must be a tuple (h0, c0) for the LSTM")
    options = CellOptions(w_peep=w_peep, zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                          training=training, ln_weight_ih=ln_weight_ih,
                          ln_weight_hh=ln_weight_hh, ln_weight_c=ln_weight_c,
                          ln_bias_c=ln_bias_c)
    y, h, c = _layer(x, hx[0], hx[1], w_ih, w_hh, b_ih, b_hh, w_hr, lengths, LSTM, reverse,
                     options)
    return y, (h, c)


def gru(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, *, reset_after: bool = True, lengths: Tensor | None = None,
        reverse: bool = False, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
        training: bool = True, ln_weight_ih: Tensor | None = None,
        ln_weight_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One GRU layer, one direction.

    x: (T, B, I); h0: (B, H); w_ih: (3H, I); w_hh: (3H, H); b_ih, b_hh: (3H,).
    reset_after=True is torch.nn.GRU's cell; False is Cho et al. 2014 (reset applied to h before
    the recurrent matmul of the candidate). zoneout, recurrent_dropout: as in :func:`lstm` (with
    reset_after=False the candidate's matmul sees r * (h * mask)). ln_weight_ih, ln_weight_hh
    (3H,), both or none: layer normalisation (haste's LayerNormGRU, reset_after=True only):
    LN(x W_ih^T) * ln_weight_ih + b_ih and LN(h W_hh^T) * ln_weight_hh + b_hh replace the two
    projections. Returns y (T, B, H) and h_n (B, H).
    """
    cell = GRU if reset_after else GRU_RESET_BEFORE
    options = CellOptions(zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                          training=training, ln_weight_ih=ln_weight_ih, ln_weight_hh=ln_weight_hh)
    y, h, _ = _layer(x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, cell, reverse, options)
    return y, h


def rnn(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Tensor | None = None,
        b_hh: Tensor | None = None, *, nonlinearity: str = "tanh", lengths: Tensor | None = None,
        reverse: bool = False, zoneout: float = 0.0, recurrent_dropout: float = 0.0,
        training: bool = True) -> tuple[Tensor, Tensor]:
    """One Elman RNN layer, one direction: h = act(W_ih x + b_ih + W_hh h + b_hh).

    x: (T, B, I); h0: (B, H); w_ih: (H, I); w_hh: (H, H); b_ih, b_hh: (H,);
    nonlinearity: "tanh" or "relu"; zoneout, recurrent_dropout: as in :func:`lstm`. Returns
    y (T, B, H) and h_n (B, H).
    """
    _validate.choice("nonlinearity", nonlinearity, ("tanh", "relu"))
    cell = RNN_TANH if nonlinearity == "tanh" else RNN_RELU
    options = CellOptions(zoneout=zoneout, recurrent_dropout=recurrent_dropout,
                          training=training)
    y, h, _ = _layer(x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, cell, reverse, options)
    return y, h


__all__ = ["lstm", "gru", "rnn", "recurrence", "run_layer", "CellOptions", "LSTM", "GRU",
           "GRU_RESET_BEFORE", "RNN_TANH", "RNN_RELU"]
