"""References of the gated recurrences for one layer and one direction, time-major.

Each cell has two forms: ``*_reference`` from the layer input x, and ``*_recurrence`` from
its input projection gx = x W_ih^T + b_ih (T, B, G*H), the input of the recurrence kernels.
Shapes: x (T, B, I); h0 (B, P); c0 (B, H); w_ih (G*H, I); w_hh (G*H, P); biases (G*H,);
w_hr (P, H) (LSTM projection); lengths (B,) valid steps per row. Rows past their length keep
their state and output zeros, as a PackedSequence does; with reverse=True each row runs from its
last valid step down to step 0. Returns y (T, B, P) and the final states.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _steps(T: int, reverse: bool) -> range:
    return range(T - 1, -1, -1) if reverse else range(T)


def _valid(lengths: Tensor | None, t: int, like: Tensor) -> Tensor:
    """(B, 1) mask of rows whose step t is within their length."""
    if lengths is None:
        return torch.ones(like.shape[0], 1, dtype=torch.bool, device=like.device)
    return (t < lengths.to(like.device)).unsqueeze(1)


def _linear(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    out = x @ w.t()
    return out if b is None else out + b


def lstm_recurrence(gx: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor,
                    b_hh: Tensor | None = None, w_hr: Tensor | None = None,
                    lengths: Tensor | None = None, reverse: bool = False
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The LSTM from its input projection gx = x W_ih^T + b_ih (T, B, 4H): gates (i, f, g, o),
    optional projection of h."""
    h, c = h0, c0
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        gates = gx[t] + _linear(h, w_hh, b_hh)
        i, f, g, o = gates.chunk(4, dim=1)
        c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h_new = torch.sigmoid(o) * torch.tanh(c_new)
        if w_hr is not None:
            h_new = h_new @ w_hr.t()
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        c = torch.where(valid, c_new, c)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h, c


def gru_recurrence(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None = None,
                   reset_after: bool = True, lengths: Tensor | None = None,
                   reverse: bool = False) -> tuple[Tensor, Tensor]:
    """The GRU from its input projection gx (T, B, 3H): gates (r, z, n),
    h = (1 - z) * n + z * h_prev.

    reset_after=True is torch.nn.GRU / cuDNN: n = tanh(W_in x + b_in + r * (W_hn h + b_hn)).
    reset_after=False is Cho et al. 2014: n = tanh(W_in x + b_in + W_hn (r * h) + b_hn).
    """
    h = h0
    H = h0.shape[1]
    w_rz, w_n = w_hh[: 2 * H], w_hh[2 * H:]
    b_rz = None if b_hh is None else b_hh[: 2 * H]
    b_n = None if b_hh is None else b_hh[2 * H:]
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        xr, xz, xn = gx[t].chunk(3, dim=1)
        hr, hz = _linear(h, w_rz, b_rz).chunk(2, dim=1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        if reset_after:
            n = torch.tanh(xn + r * _linear(h, w_n, b_n))
        else:
            n = torch.tanh(xn + _linear(r * h, w_n, b_n))
        h_new = (1 - z) * n + z * h
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h


def rnn_recurrence(gx: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor | None = None,
                   nonlinearity: str = "tanh", lengths: Tensor | None = None,
                   reverse: bool = False) -> tuple[Tensor, Tensor]:
    """The Elman RNN from its input projection gx (T, B, H): h = act(gx + W_hh h + b_hh)."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu
    h = h0
    ys = [None] * gx.shape[0]
    for t in _steps(gx.shape[0], reverse):
        h_new = act(gx[t] + _linear(h, w_hh, b_hh))
        valid = _valid(lengths, t, gx[t])
        h = torch.where(valid, h_new, h)
        ys[t] = torch.where(valid, h_new, torch.zeros_like(h_new))
    return torch.stack(ys), h


def lstm_reference(x: Tensor, h0: Tensor, c0: Tensor, w_ih: Tensor, w_hh: Tensor,
                   b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                   w_hr: Tensor | None = None, lengths: Tensor | None = None,
                   reverse: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM as torch.nn.LSTM computes it: gates (i, f, g, o), optional projection of h."""
    return lstm_recurrence(_linear(x, w_ih, b_ih), h0, c0, w_hh, b_hh, w_hr, lengths, reverse)


def gru_reference(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                  reset_after: bool = True, lengths: Tensor | None = None,
                  reverse: bool = False) -> tuple[Tensor, Tensor]:
    """GRU as torch.nn.GRU computes it (reset_after=True) or Cho et al. 2014 (False); see
    :func:`gru_recurrence`."""
    return gru_recurrence(_linear(x, w_ih, b_ih), h0, w_hh, b_hh, reset_after, lengths, reverse)


def rnn_reference(x: Tensor, h0: Tensor, w_ih: Tensor, w_hh: Tensor,
                  b_ih: Tensor | None = None, b_hh: Tensor | None = None,
                  nonlinearity: str = "tanh", lengths: Tensor | None = None,
                  reverse: bool = False) -> tuple[Tensor, Tensor]:
    """Elman RNN: h = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu."""
    return rnn_recurrence(_linear(x, w_ih, b_ih), h0, w_hh, b_hh, nonlinearity, lengths,
                          reverse)
