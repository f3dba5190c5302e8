"""The recurrences' input projection (rnnkernels.ops._linear.linear): F.linear's results and
gradients, through oneDNN's matmul where it takes the call, F.linear elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import rnnkernels
from rnnkernels.ops import _linear

pytestmark = pytest.mark.skipif(not _linear._onednn_matmul_available(),
                                reason="this torch has no oneDNN matmul")


@pytest.fixture
def onednn_calls(monkeypatch):
    calls = []
    real = _linear._onednn_linear

    def counted(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(_linear, "_onednn_linear", counted)
    return calls


def _inputs(rows, bias=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows // 4, 4, 37, generator=g).requires_grad_()
    w = torch.randn(51, 37, generator=g).requires_grad_()
    b = torch.randn(51, generator=g).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("bias", [True, False])
def test_matches_f_linear_with_gradients(bias, onednn_calls):
    x, w, b = _inputs(_linear.MIN_ROWS + 4, bias)
    out = _linear.linear(x, w, b)
    assert onednn_calls, "the oneDNN path was not taken"
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    leaves = [t for t in (x, w, b) if t is not None]
    got = torch.autograd.grad(out, leaves, grad)
    assert len(onednn_calls) == 2  # forward and the input gradient
    want = torch.autograd.grad(ref, leaves, grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


def test_second_order_gradient(onednn_calls):
    x, w, b = _inputs(_linear.MIN_ROWS)

    def grad_norm(fn):
        out = fn(x, w, b)
        (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, w, b])

    for g, r in zip(grad_norm(_linear.linear), grad_norm(F.linear)):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-3)
    assert onednn_calls


@pytest.mark.parametrize("case", ["few rows", "float64", "autocast", "vmap"])
def test_f_linear_elsewhere(case, onednn_calls):
    x, w, b = _inputs(_linear.MIN_ROWS if case != "few rows" else 8)
    if case == "float64":
        x, w, b = x.double(), w.double(), b.double()
    if case == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = _linear.linear(x, w, b)
        assert out.dtype == torch.bfloat16
    elif case == "vmap":
        out = torch.func.vmap(lambda xs: _linear.linear(xs, w, b))(x)
    else:
        out = _linear.linear(x, w, b)
    assert not onednn_calls
    torch.testing.assert_close(out.float(), F.linear(x, w, b).float(), rtol=2e-2, atol=2e-1)


def test_lstm_layer_with_many_rows_matches_torch(onednn_calls):
    """A module whose T * B reaches MIN_ROWS: torch.nn.LSTM's outputs and gradients."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(24, 16)
    ours = rnnkernels.nn.LSTM(24, 16)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(_linear.MIN_ROWS // 8, 8, 24, requires_grad=True)
    y, (h, c) = ours(x)
    assert onednn_calls
    y_ref, (h_ref, c_ref) = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, *ours.parameters()], grad)
    want = torch.autograd.grad(y_ref, [x, *ref.parameters()], grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)
