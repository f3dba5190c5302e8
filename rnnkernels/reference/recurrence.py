"""References of the gated recurrences for one layer and one direction, time-major.

Each cell has two forms: ``*_reference`` from the layer input x, and ``*_recurrence`` from
its input projection gx = x W_ih^T + b_ih (T, B, G*H), the input of the recurrence kernels.
Shapes: x (T, B, I); h0 (B, P); c0 (B, H); w_ih (G*H, I); w_hh (G*H, P); biases (G*H,);
w_hr (P, H) (LSTM projection); lengths (B,) valid steps per row. Rows past their length keep
their state and output zeros, as a PackedSequence does; with reverse=True each row runs from its
last valid step down to step 0. Returns y (T, B, P) and the final states.

Cell options (keyword-only, off by default, and then the cells are exactly torch.nn's):
w_peep (3, H) peephole weights of the LSTM (Gers and Schmidhuber 2000: the i and f gates see
c_{t-1}, the o gate sees c_t, each through a diagonal weight).
zoneout (Krueger et al. 2016): every state unit keeps its previous value with weight d,
h_t = d * h_{t-1} + (1 - d) * h_new (and c alike for the LSTM); d is zoneout_mask[t] (T, B, P)
(zoneout_mask_c[t] (T, B, H) for c), 0/1 draws in training, or the float zoneout where no mask
is given (evaluation: the expectation). The output y is the zoned-out h; with a projection, h is
zoned out after it.
recurrent_dropout_mask (B, P): variational dropout (Gal and Ghahramani 2016): every recurrent
matmul sees h_{t-1} * mask, the same mask at every step; the cell's other uses of h_{t-1} (the
GRU's z * h_{t-1}) and the output see h itself.
Layer normalisation (LSTM and GRU with reset after, as haste's LayerNormLSTM / LayerNormGRU):
the input and the recurrent pre-activations are normalised separately over their G*H values with
their own gains ln_weight_ih, ln_weight_hh (G*H,), no shift, the biases added after:
gates = LN(x W_ih^T) * ln_weight_ih + b_ih + LN(h W_hh^T) * ln_weight_hh + b_hh; the LSTM's
output is h = o * tanh(LN(c_t) * ln_weight_c + ln_bias_c) (the state c_t itself is not
normalised). LN's epsilon is 1e-5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid(lengths: Tensor | None, t: int, like: Tensor) -> Tensor:
    """(B, 1) mask of rows whose step t is within their length."""
    if lengths is None:
        return torch.ones(like.shape[0], 1, dtype=torch.bool, device=like.device)
    return (t < lengths.to(like.device)).unsqueeze(1)


def _linear(x: Tensor, w: Tensor, b: Tensor | None, ln_weight: Tensor | None = None) -> Tensor:
    """x W^T + b, with the product layer-normalised (gain ln_weight) before b when given."""
    out = x @ w.t()
    if ln_weight is not None:
        out = F.layer_norm(out, (out.shape[-1],), ln_weight)
    return out if b is None else out + b


def _zoneout(prev: Tensor, new: Tensor, t: int, p: float, mask: Tensor | None) -> Tensor:
    """The zoned-out state of step t: d * prev + (1 - d) * new, d = mask[t] or p."""
    if mask is None and p == 0:
        return new
    d = mask[t] if mask is not None else p
    return d * prev + (1 - d) * new


def lstm_recurrence(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                    b_hh: Tensor | None = None, w_hr: Tensor | None = None,
                    lengths: Tensor | None = None, reverse: bool = False, *,
                    w_peep: Tensor | None = None, zoneout: float = 0.0,
                    zoneout_mask: Tensor | None = None, zoneout_mask_c: Tensor | None = None,
                    recurrent_dropout_mask: Tensor | None = None,
                    ln_weight_hh: Tensor | None = None, ln_weight_c: Tensor | None = None,
                    ln_bias_c: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM from its input projection gx = x W_ih^T + b_ih (T, B, 4H) (layer-normalised
    with ln_weight_ih before b_ih for the layer-norm LSTM): gates (i, f, g, o), optional
    projection of h; with w_peep, the peephole LSTM."""
    h, c = h0, c0
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        h_rec = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
        gates = gx[t] + _linear(h_rec, w_hh, b_hh, ln_weight_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        if w_peep is not None:
            i = i + w_peep[0] * c
            f = f + w_peep[1] * c
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        if w_peep is not None:
            o = o + w_peep[2] * c_new
        c_out = c_new
        if ln_weight_c is not None:
            c_out = F.layer_norm(c_new, (c_new.shape[-1],), ln_weight_c, ln_bias_c)
        h_new = torch.sigmoid(o) * torch.tanh(c_out)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        h_new = _zoneout(h, h_new, t, zoneout, zoneout_mask)
        c_new = _zoneout(c, c_new, t, zoneout, zoneout_mask_c)
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def gru_recurrence(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None = None,
                   reset_after: bool = True, lengths: Tensor | None = None,
                   reverse: bool = False, *, zoneout: float = 0.0,
                   zoneout_mask: Tensor | None = None,
                   recurrent_dropout_mask: Tensor | None = None,
                   ln_weight_hh: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The GRU from its input projection gx (T, B, 3H): gates (r, z, n),
    h = (1 - z) * n + z * h_prev.

    reset_after=True is torch.nn.GRU / cuDNN: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
    reset_after=False is Cho et al. 2014: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
    Layer normalisation needs reset_after=True (W_hh h is normalised as a whole).
    """
    if ln_weight_hh is not None and not reset_after:
        raise ValueError("layer normalisation of the GRU needs reset_after=True")
    h = h0
    H = h0.shape[1]
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        xr, xz, xn = gx[t].chunk(3, dim=1)
        h_rec = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
        if reset_after:
            hr, hz, hn = _linear(h_rec, w_hh, b_hh, ln_weight_hh).chunk(3, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + r * hn)
        else:
            b_rz = None if b_hh is None else b_hh[: 2 * H]
            b_n = None if b_hh is None else b_hh[2 * H:]
            hr, hz = _linear(h_rec, w_hh[: 2 * H], b_rz).chunk(2, dim=1)
            r = torch.sigmoid(xr + hr)
            z = torch.sigmoid(xz + hz)
            n = torch.tanh(xn + _linear(r * h_rec, w_hh[2 * H:], b_n))
        h_new = _zoneout(h, (1 - z) * n + z * h, t, zoneout, zoneout_mask)
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h


def rnn_recurrence(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None = None,
                   nonlinearity: str = "tanh", lengths: Tensor | None = None,
                   reverse: bool = False, *, zoneout: float = 0.0,
                   zoneout_mask: Tensor | None = None,
                   recurrent_dropout_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The Elman RNN from its input projection gx (T, B, H): h = act(gx + W_hh h + b_hh)."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        h_rec = h if recurrent_dropout_mask is None else h * recurrent_dropout_mask
        h_new = _zoneout(h, act(gx[t] + _linear(h_rec, w_hh, b_hh)), t, zoneout, zoneout_mask)
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h


def lstm_reference(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                   w_hr: Tensor | None = None, lengths: Tensor | None = None,
                   reverse: bool = False, *, ln_weight_ih: Tensor | None = None,
                   **options: object) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM as torch.nn.LSTM computes it (with the cell options of :func:`lstm_recurrence`)."""
    return lstm_recurrence(_linear(x, w_ih, b_ih, ln_weight_ih), h0, c0, w_hh, b_hh, w_hr,
                           lengths, reverse, **options)


def gru_reference(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                  reset_after: bool = True, lengths: Tensor | None = None,
                  reverse: bool = False, *, ln_weight_ih: Tensor | None = None,
                  **options: object) -> tuple[Tensor, Tensor]:
    """GRU as torch.nn.GRU computes it (reset_after=True) or Cho et al. 2014 (False); see
    :func:`gru_recurrence`."""
    return gru_recurrence(_linear(x, w_ih, b_ih, ln_weight_ih), h0, w_hh, b_hh, reset_after,
                          lengths, reverse, **options)


def rnn_reference(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                  nonlinearity: str = "tanh", lengths: Tensor | None = None,
                  reverse: bool = False, **options: object) -> tuple[Tensor, Tensor]:
    """Elman RNN: h = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""
    return rnn_recurrence(_linear(x, w_ih, b_ih), h0, w_hh, b_hh, nonlinearity, lengths,
                          reverse, **options)
