"""The references against torch.nn (copied weights, float64): they define "correct"."""

import pytest
import torch
from torch import nn

from rnnkernels.reference import gru_reference, lstm_reference, rnn_reference

T, B, I, H = 6, 3, 5, 7


def _weights(module, suffix="_l0"):
    kinds = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [getattr(module, f"{k}{suffix}") for k in kinds]


@pytest.mark.parametrize("proj", [0, 4])
@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_reference_matches_torch(proj, reverse):
    m = nn.LSTM(I, H, proj_size=proj, bidirectional=reverse, dtype=torch.float64)
    P = proj or H
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(2 if reverse else 1, B, P, dtype=torch.float64)
    c0 = torch.randn(2 if reverse else 1, B, H, dtype=torch.float64)
    y, (h, c) = m(x, (h0, c0))
    k = 1 if reverse else 0
    suffix = "_l0_reverse" if reverse else "_l0"
    w_hr = getattr(m, f"weight_hr{suffix}") if proj else None
    ry, rh, rc = lstm_reference(x, h0[k], c0[k], *_weights(m, suffix), w_hr=w_hr, reverse=reverse)
    torch.testing.assert_close(ry, y[..., k * P:(k + 1) * P], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rh, h[k], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rc, c[k], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mode", ["GRU", "RNN_TANH", "RNN_RELU"])
def test_gru_rnn_reference_matches_torch(mode):
    if mode == "GRU":
        m = nn.GRU(I, H, dtype=torch.float64)
    else:
        m = nn.RNN(I, H, nonlinearity=mode[4:].lower(), dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    h0 = torch.randn(1, B, H, dtype=torch.float64)
    y, h = m(x, h0)
    if mode == "GRU":
        ry, rh = gru_reference(x, h0[0], *_weights(m))
    else:
        ry, rh = rnn_reference(x, h0[0], *_weights(m), nonlinearity=mode[4:].lower())
    torch.testing.assert_close(ry, y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(rh, h[0], atol=1e-12, rtol=1e-10)


def test_lengths_match_packed_sequence():
    m = nn.LSTM(I, H, bidirectional=True, dtype=torch.float64)
    x = torch.randn(T, B, I, dtype=torch.float64)
    lengths = torch.tensor([4, T, 1])
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    y, (h, c) = m(packed)
    y, _ = nn.utils.rnn.pad_packed_sequence(y, total_length=T)
    zeros = torch.zeros(B, H, dtype=torch.float64)
    for k, suffix in enumerate(["_l0", "_l0_reverse"]):
        ry, rh, rc = lstm_reference(x, zeros, zeros, *_weights(m, suffix), lengths=lengths,
                                    reverse=k == 1)
        torch.testing.assert_close(ry, y[..., k * H:(k + 1) * H], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(rh, h[k], atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(rc, c[k], atol=1e-12, rtol=1e-10)


def test_gru_reset_before_hand_computed_step():
    """One step of the Cho 2014 GRU written out by hand."""
    x = torch.randn(1, B, I, dtype=torch.float64)
    h0 = torch.randn(B, H, dtype=torch.float64)
    w_ih = torch.randn(3 * H, I, dtype=torch.float64)
    w_hh = torch.randn(3 * H, H, dtype=torch.float64)
    b_ih, b_hh = torch.randn(3 * H, dtype=torch.float64), torch.randn(3 * H, dtype=torch.float64)
    _, h1 = gru_reference(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after=False)
    W = torch.cat([w_ih, w_hh], dim=1)  # acts on [x, h]
    xr = x[0]
    r = torch.sigmoid(torch.cat([xr, h0], 1) @ W[:H].t() + b_ih[:H] + b_hh[:H])
    z = torch.sigmoid(torch.cat([xr, h0], 1) @ W[H:2 * H].t() + b_ih[H:2 * H] + b_hh[H:2 * H])
    n = torch.tanh(torch.cat([xr, r * h0], 1) @ W[2 * H:].t() + b_ih[2 * H:] + b_hh[2 * H:])
    torch.testing.assert_close(h1, (1 - z) * n + z * h0, atol=1e-12, rtol=1e-10)


def test_gru_reset_before_reference_gradcheck():
    args = [torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(12, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(12, 4, dtype=torch.float64, requires_grad=True),
            torch.randn(12, dtype=torch.float64, requires_grad=True),
            torch.randn(12, dtype=torch.float64, requires_grad=True)]
    torch.autograd.gradcheck(lambda *a: gru_reference(*a, reset_after=False), args)
