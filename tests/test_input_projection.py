"""The recurrences' float32 CPU matmuls through our packed panels or oneDNN: the input projection
(rnnkernels.ops._linear.linear: F.linear's results and gradients, through the panels or oneDNN's
matmul where they take the call, F.linear elsewhere) and the C++ backward's weight gradients
(csrc/cpu/onednn_matmul.h, csrc/cpu/panel_matmul.h), each with the panels preferred
(RNNKERNELS_PANEL_MATMUL=1, as on CPUs without AVX-512), oneDNN preferred
(RNNKERNELS_ONEDNN_MATMUL=1, as on AMD Zen 5) and neither (MKL's weight gradients), whatever this
machine prefers."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import rnnkernels
from rnnkernels.ops import _linear

pytestmark = pytest.mark.skipif(not _linear._onednn_matmul_available(),
                                reason="this torch has no oneDNN matmul")


@pytest.fixture(params=["mkl", "onednn", "panel"],
                ids=["mkl-weight-grads", "onednn-preferred", "panel-preferred"])
def preferred(request, monkeypatch):
    """Runs a test with float32 matmuls preferring each: neither (MKL's weight gradients),
    oneDNN, our panels; returns which."""
    monkeypatch.setenv("RNNKERNELS_ONEDNN_MATMUL", "1" if request.param == "onednn" else "0")
    monkeypatch.setenv("RNNKERNELS_PANEL_MATMUL", "1" if request.param == "panel" else "0")
    assert _linear.onednn_preferred() == (request.param == "onednn")
    assert _linear.panel_preferred() == (request.param == "panel")
    return request.param


@pytest.fixture
def onednn_calls(monkeypatch, preferred):
    """The projection's matmuls that went past F.linear: to oneDNN, or to the panels where they
    are preferred (then none to oneDNN)."""
    calls = []
    for name in ("_onednn_linear", "_panel_matmul"):
        real = getattr(_linear, name)

        def counted(*args, real=real, name=name):
            assert (name == "_panel_matmul") == (preferred == "panel")
            calls.append(args[0].shape)
            return real(*args)

        monkeypatch.setattr(_linear, name, counted)
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
    assert len(onednn_calls) == 2  # forward and the input gradient (the weight's: mm_tn)
    want = torch.autograd.grad(ref, leaves, grad)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", ["no_grad", "inputs without grad"])
def test_inference_skips_autograd(mode, onednn_calls, monkeypatch):
    """Where no gradient is needed, oneDNN's matmul is called directly, not through the
    autograd.Function (whose round trip costs more than a small matmul), with F.linear's
    values."""
    x, w, b = (t.detach() for t in _inputs(_linear.MIN_ROWS))
    monkeypatch.setattr(_linear._Linear, "apply", None)  # calling it would fail
    if mode == "no_grad":
        x.requires_grad_()
        with torch.no_grad():
            out = _linear.linear(x, w, b)
    else:
        out = _linear.linear(x, w, b)
    assert onednn_calls and out.grad_fn is None
    torch.testing.assert_close(out, F.linear(x, w, b).detach(), rtol=1e-5, atol=1e-5)


def test_second_order_gradient(onednn_calls):
    """Against float64: the sums of the second order cancel, and float32 roundings of oneDNN's
    and MKL's summation orders differ by about 1e-4 of the largest values."""
    x, w, b = _inputs(_linear.MIN_ROWS)

    def grad_norm(fn, x, w, b):
        out = fn(x, w, b)
        (gx,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.square().sum(), [x, w, b])

    exact = [t.detach().double().requires_grad_() for t in (x, w, b)]
    for g, r in zip(grad_norm(_linear.linear, x, w, b), grad_norm(F.linear, *exact)):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4 * r.abs().max().item())
    assert onednn_calls


@pytest.mark.parametrize("shape", [(1, 1, 1), (37, 5, 3), (1030, 24, 51), (16, 16, 16),
                                   (1024, 1, 17), (2309, 50, 33)])
def test_mm_tn(shape, preferred):
    """torch.ops.rnnkernels.mm_tn(a, b) = a^T b, with oneDNN preferred (our transpose of b:
    rows not a whole number of 16-row blocks, exactly one block), the panels preferred (from
    kMinPanelRows = 1024 rows: rows split over the threads in blocks of 256, the last partial,
    columns not a whole number of panels) and neither; opcheck."""
    R, M, N = shape
    g = torch.Generator().manual_seed(R)
    a = torch.randn(R, M, generator=g)
    b = torch.randn(R, N, generator=g)
    out = torch.ops.rnnkernels.mm_tn(a, b)
    assert out.shape == (M, N) and out.is_contiguous()
    # float32 sums of R products: rounding grows with R
    torch.testing.assert_close(out.double(), a.double().t() @ b.double(), rtol=1e-5,
                               atol=1e-4 * max(1.0, R / 1000))
    torch.library.opcheck(torch.ops.rnnkernels.mm_tn.default, (a, b))


@pytest.mark.parametrize("layout", ["nn", "nt", "tn", "tt"])
@pytest.mark.parametrize("shape", [(1024, 1, 1), (1031, 300, 37), (100, 1100, 24),
                                   (2100, 17, 1030), (5, 7, 3), (1024, 0, 9)])
@pytest.mark.parametrize("bias", [True, False])
def test_matmul(layout, shape, bias, preferred):
    """torch.ops.rnnkernels.matmul(a, b, bias) = a @ b + bias against float64, for a and b
    contiguous (n) or transposed views (t): with the panels preferred, through them from 1024
    rows of a, or for a transposed a from 1024 k (split over the threads; a's columns in blocks
    of 48, the last partial), k in blocks of 256 (the last partial), columns in blocks of 256
    and not a whole number of panels, k = 0; elsewhere through ATen; opcheck."""
    M, K, N = shape
    g = torch.Generator().manual_seed(M + K + N)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(K, N, generator=g)
    if layout[0] == "t":
        a = a.t().contiguous().t()
    if layout[1] == "t":
        b = b.t().contiguous().t()
    c = torch.randn(N, generator=g) if bias else None
    out = torch.ops.rnnkernels.matmul(a, b, c)
    want = a.double() @ b.double() + (c.double() if bias else 0)
    assert out.shape == (M, N) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4 * max(1.0, K / 1000))
    if shape == (1031, 300, 37):
        torch.library.opcheck(torch.ops.rnnkernels.matmul.default, (a, b, c))


def test_rows_threshold(onednn_calls, preferred):
    """From MIN_ROWS_PREFERRED rows through oneDNN where it is preferred, from MIN_ROWS
    elsewhere (the panels too)."""
    x, w, b = _inputs(_linear.MIN_ROWS_PREFERRED)
    torch.testing.assert_close(_linear.linear(x, w, b), F.linear(x, w, b), rtol=1e-5,
                               atol=1e-5)
    assert len(onednn_calls) == (1 if preferred == "onednn" else 0)


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


@pytest.mark.parametrize("kind", ["lstm-proj", "gru-reset-before", "rnn"])
def test_weight_gradients_match_reference(kind, preferred):
    """The backward's weight gradients (csrc/recurrence_weight_grads.h: W_hh, the reset-before
    GRU's split W_hh, the LSTM's projection W_hr) against the float64 module on the reference
    backend, with oneDNN preferred or not; enough rows for the oneDNN projection either way, and
    not a whole number of 16-row blocks for the transpose of the oneDNN weight gradient."""
    torch.manual_seed(0)
    if kind == "lstm-proj":
        ours = rnnkernels.nn.LSTM(24, 16, proj_size=9)
    elif kind == "gru-reset-before":
        ours = rnnkernels.nn.GRU(24, 16, reset_after=False)
    else:
        ours = rnnkernels.nn.RNN(24, 16)
    exact = copy.deepcopy(ours).double()
    x = torch.randn(_linear.MIN_ROWS // 8 + 1, 8, 24)
    grad = torch.randn_like(ours(x)[0])
    got = torch.autograd.grad(ours(x)[0], list(ours.parameters()), grad)
    with rnnkernels.use_backend("reference"):
        want = torch.autograd.grad(exact(x.double())[0], list(exact.parameters()), grad.double())
    for g, r in zip(got, want):
        assert g.is_contiguous()
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-4)
