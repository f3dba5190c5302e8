"""Scale: T = 100k on the CPU for the LSTM and both scans (forward and backward finite, equal to
short runs where causality says they must be, memory linear in T), and sizes where B*T*H passes
2^31 on a GPU (64-bit index arithmetic)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import rnnkernels
from rnnkernels import ops
from rnnkernels.reference import (
    linear_scan_reference,
    lstm_reference,
    selective_scan_reference,
)

LONG = 100_000
PREFIX = 300


def _saved_bytes(fn) -> tuple[object, int]:
    """fn()'s result and the bytes autograd saves for its backward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def _check_long_run(run, inputs: list[torch.Tensor], time_dim: int, reference) -> None:
    """run(*inputs) over LONG steps: finite; its first PREFIX steps equal run and reference on
    the first PREFIX steps; the gradient of those steps is the short run's on the prefix and
    exactly zero after it; autograd keeps memory linear in T (half the steps, half the bytes)."""
    inputs = [t.requires_grad_() for t in inputs]
    out, saved = _saved_bytes(lambda: run(*inputs))
    assert torch.isfinite(out).all()
    grads = torch.autograd.grad(out.square().sum(), inputs, retain_graph=True)
    assert all(torch.isfinite(g).all() for g in grads)

    def prefix(t: torch.Tensor, n: int = PREFIX) -> torch.Tensor:
        return t.narrow(time_dim, 0, n) if t.dim() > 2 else t

    short = [prefix(t).detach().requires_grad_() for t in inputs]
    out_short = run(*short)
    assert_close(prefix(out), out_short.double(), torch.float32)
    with torch.no_grad():
        assert_close(out_short, reference(*[t.double() for t in short]), torch.float32)

    sequence = inputs[0]
    (g_long,) = torch.autograd.grad(prefix(out).sum(), sequence)
    (g_short,) = torch.autograd.grad(out_short.sum(), short[0])
    assert_close(prefix(g_long), g_short.double(), torch.float32)
    assert torch.count_nonzero(g_long.narrow(time_dim, PREFIX, LONG - PREFIX)) == 0

    half = [prefix(t, LONG // 2).detach().clone().requires_grad_() for t in inputs]
    _, saved_half = _saved_bytes(lambda: run(*half))
    assert 1.9 < saved / saved_half < 2.1, (saved, saved_half)


def test_lstm_100k_steps():
    B, I, H = 2, 3, 8
    x = torch.randn(LONG, B, I)
    h0, c0 = torch.randn(B, H) * 0.1, torch.randn(B, H) * 0.1
    w_ih, w_hh = torch.randn(4 * H, I) * 0.5, torch.randn(4 * H, H) * 0.5
    b = torch.randn(4 * H) * 0.1

    def run(x, w_ih, w_hh, b):
        return ops.lstm(x, (h0, c0), w_ih, w_hh, b)[0]

    def reference(x, w_ih, w_hh, b):
        return lstm_reference(x, h0.double(), c0.double(), w_ih, w_hh, b)[0]

    _check_long_run(run, [x, w_ih, w_hh, b], 0, reference)


def test_selective_scan_100k_steps():
    batch, dim, N = 1, 16, 4
    u, delta = torch.randn(batch, dim, LONG), torch.randn(batch, dim, LONG) * 0.5
    Bm, Cm, z = torch.randn(batch, N, LONG), torch.randn(batch, N, LONG), torch.randn(batch, dim,
                                                                                      LONG)
    A, D, bias = -torch.rand(dim, N) - 0.1, torch.randn(dim), torch.rand(dim) * 0.1

    def run(u, delta, Bm, Cm, z):
        return ops.selective_scan(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True)

    def reference(u, delta, Bm, Cm, z):
        return selective_scan_reference(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True)

    _check_long_run(run, [u, delta, Bm, Cm, z], 2, reference)


def test_linear_scan_100k_steps():
    a, b = torch.rand(2, 8, LONG), torch.randn(2, 8, LONG)
    _check_long_run(lambda b, a: ops.linear_scan(a, b), [b, a], 2,
                    lambda b, a: linear_scan_reference(a, b))


def test_selective_scan_chunked_100k_equals_one_pass():
    """Two calls joined by last_state / initial_state at a step that is no multiple of the
    chunk size give the one-pass result over 100k steps."""
    batch, dim, N, cut = 1, 16, 4, 61_237
    u, delta = torch.randn(batch, dim, LONG), torch.rand(batch, dim, LONG) * 0.1
    A, Bm, Cm = -torch.rand(dim, N) - 0.1, torch.randn(batch, N, LONG), torch.randn(batch, N, LONG)
    whole, last = ops.selective_scan(u, delta, A, Bm, Cm, return_last_state=True)
    first, mid = ops.selective_scan(u[..., :cut], delta[..., :cut], A, Bm[..., :cut],
                                    Cm[..., :cut], return_last_state=True)
    second, end = ops.selective_scan(u[..., cut:], delta[..., cut:], A, Bm[..., cut:],
                                     Cm[..., cut:], return_last_state=True, initial_state=mid)
    assert_close(torch.cat([first, second], -1), whole.double(), torch.float32)
    assert_close(end, last.double(), torch.float32)


# ------------------------------------------------------------------ 2^31 elements, on a GPU

INT32_LIMIT = 2**31
GPU_BACKENDS = ["cuda", "triton"]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_linear_scan_past_int32_elements(backend):
    batch, channels, steps = 1, 2**16, 2**15 + 3
    assert batch * channels * steps > INT32_LIMIT
    a = torch.rand(batch, channels, steps, device="cuda", dtype=torch.float16)
    b = torch.randn(batch, channels, steps, device="cuda", dtype=torch.float16)
    with rnnkernels.use_backend(backend):
        h = ops.linear_scan(a, b)
        # The last channel, run alone, has only small offsets: the big run must agree with it.
        alone = ops.linear_scan(a[:, -1:], b[:, -1:])
    torch.testing.assert_close(h[:, -1:], alone, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_selective_scan_past_int32_elements(backend):
    batch, dim, N, L = 2, 2**14, 4, 2**16 + 5
    assert batch * dim * L > INT32_LIMIT
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    u, delta = torch.randn(batch, dim, L, **kw), torch.rand(batch, dim, L, **kw) * 0.1
    Bm, Cm = torch.randn(batch, N, L, **kw), torch.randn(batch, N, L, **kw)
    A = -torch.rand(dim, N, device="cuda") - 0.1
    u.requires_grad_()
    small_u = u[-1:, -16:].detach().requires_grad_()
    with rnnkernels.use_backend(backend):
        out = ops.selective_scan(u, delta, A, Bm, Cm)
        (du,) = torch.autograd.grad(out.float().sum(), u)
        small = ops.selective_scan(small_u, delta[-1:, -16:], A[-16:], Bm[-1:], Cm[-1:])
        (small_du,) = torch.autograd.grad(small.float().sum(), small_u)
    torch.testing.assert_close(out[-1:, -16:], small, rtol=0, atol=0)
    torch.testing.assert_close(du[-1:, -16:], small_du, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_lstm_past_int32_elements(backend):
    T, B, I, H = 8200, 1024, 16, 256
    assert T * B * H > INT32_LIMIT
    kw = {"device": "cuda", "dtype": torch.bfloat16}
    x = torch.randn(T, B, I, **kw)
    w_ih, w_hh = torch.randn(4 * H, I, **kw) * 0.2, torch.randn(4 * H, H, **kw) * 0.05
    h0 = torch.zeros(B, H, **kw)
    with torch.no_grad(), rnnkernels.use_backend(backend):
        y, (h, c) = ops.lstm(x, (h0, h0), w_ih, w_hh)
        y_row, (h_row, _) = ops.lstm(x[:, -1:], (h0[-1:], h0[-1:]), w_ih, w_hh)
    assert torch.isfinite(y).all()
    assert_close(y[:, -1:], y_row.double(), torch.bfloat16)
    assert_close(h[-1:], h_row.double(), torch.bfloat16)
