"""LinearSSM: the recurrence, the scan and the FFT convolution compute the same function."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

from rnnkernels.nn import LinearSSM


def make(channels=5, state=7, dtype=torch.float64, **kwargs) -> LinearSSM:
    m = LinearSSM(channels, state, dtype=dtype, **kwargs)
    with torch.no_grad():
        # Random, not the structured init, so every parameter matters; dt spread wide so some
        # channels forget within a few steps and others remember the whole sequence.
        m.log_neg_A.add_(0.3 * torch.randn_like(m.log_neg_A))
        m.B.normal_()
        m.log_dt.uniform_(-5.0, 0.0)
    return m


def grads(m: LinearSSM, u: torch.Tensor, mode: str, g: torch.Tensor):
    u = u.detach().requires_grad_()
    y, state = m(u, mode=mode, return_state=True)
    # Drawn in float64 by shape (randn_like follows strides, which differ between the modes), so
    # every mode and dtype gets the same values.
    gs = torch.randn(state.shape, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(1)).to(state.dtype)
    params = list(m.parameters())
    out = torch.autograd.grad((y * g).sum() + (state * gs).sum(), [u, *params])
    return y, state, out


def explicit_kernel(m: LinearSSM, L: int) -> torch.Tensor:
    """K_l = C . (Ab^l * Bb), with Ab and Bb from the matrix exponential of the ZOH system."""
    A = -torch.exp(m.log_neg_A)
    dt = torch.exp(m.log_dt)
    H, N = A.shape
    K = torch.empty(H, L, dtype=A.dtype)
    for h in range(H):
        # exp([[A dt, B dt], [0, 0]]) = [[Ab, Bb], [0, 1]]: ZOH without the diagonal shortcut.
        M = torch.zeros(N + 1, N + 1, dtype=A.dtype)
        M[:N, :N] = torch.diag(A[h]) * dt[h]
        M[:N, N] = m.B[h] * dt[h]
        E = torch.linalg.matrix_exp(M)
        Ab, Bb = E[:N, :N], E[:N, N]
        x = Bb
        for t in range(L):
            K[h, t] = m.C[h] @ x
            x = Ab @ x
    return K


@pytest.mark.parametrize("L", [1, 2, 37, 64])
@pytest.mark.parametrize("batch", [1, 3])
def test_recurrent_equals_conv_forward_and_backward(L, batch):
    m = make()
    u = torch.randn(batch, L, m.channels, dtype=torch.float64)
    g = torch.randn(batch, L, m.channels, dtype=torch.float64)
    y_r, s_r, d_r = grads(m, u, "recurrent", g)
    y_c, s_c, d_c = grads(m, u, "conv", g)
    assert_close(y_c, y_r)
    assert_close(s_c, s_r)
    for name, a, b in zip(["u"] + [n for n, _ in m.named_parameters()], d_c, d_r):
        assert_close(a, b, msg=f"gradient of {name}")


@pytest.mark.parametrize("mode", ["recurrent", "scan", "conv"])
def test_empty_batch(mode):
    """batch = 0 in every mode (the FFT of the conv mode refuses an empty batch: the scan runs
    instead): empty output and state, zero parameter gradients."""
    m = make()
    u = torch.randn(0, 6, 5, dtype=torch.float64)
    y, state, out = grads(m, u, mode, torch.randn_like(u))
    assert y.shape == (0, 6, 5) and state.shape == (0, 5, 7)
    assert out[0].shape == u.shape and not any(g.any() for g in out[1:])


def test_kernel_is_the_impulse_response_of_the_zoh_system():
    m = make(channels=3, state=4)
    with torch.no_grad():
        assert_close(m.kernel(20), explicit_kernel(m, 20))
        impulse = torch.zeros(1, 20, 3, dtype=torch.float64)
        impulse[:, 0] = 1.0
        y = m(impulse, mode="recurrent") - m.D * impulse
        assert_close(y[0].t(), explicit_kernel(m, 20))


def test_float32_conv_matches_float64_recurrence():
    m = make(dtype=torch.float32)
    m64 = make()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    u = torch.randn(2, 200, m.channels)
    with torch.no_grad():
        # The FFT's rounding grows with log L, so allow ten times float32's recurrence tolerance.
        assert_close(m(u, mode="conv"), m64(u.double(), mode="recurrent"), torch.float32,
                     scale=10)


def test_step_continues_a_prefix():
    m = make()
    u = torch.randn(2, 30, m.channels, dtype=torch.float64)
    with torch.no_grad():
        full = m(u, mode="recurrent")
        y, state = m(u[:, :20], mode="conv", return_state=True)
        steps = []
        for t in range(20, 30):
            y_t, state = m.step(u[:, t], state)
            steps.append(y_t)
    assert_close(y, full[:, :20])
    assert_close(torch.stack(steps, 1), full[:, 20:])


def test_gradcheck_conv():
    m = make(channels=2, state=3)
    u = torch.randn(2, 9, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: m(x, mode="conv", return_state=True),
                                    (u, *m.parameters()))


def test_default_init_is_s4d_real_and_stable():
    m = LinearSSM(4, 6)
    A = -torch.exp(m.log_neg_A)
    torch.testing.assert_close(A, -torch.arange(1.0, 7.0).expand(4, 6))
    Ab, _ = m.discretize()
    assert bool(((Ab > 0) & (Ab < 1)).all())
    dt = torch.exp(m.log_dt)
    assert bool(((dt >= 1e-3 * 0.999) & (dt <= 1e-1 * 1.001)).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scan_equals_recurrent_forward_and_backward(dtype):
    m = make(dtype=dtype)
    m64 = make()
    m64.load_state_dict({k: v.double() for k, v in m.state_dict().items()})
    u = torch.randn(3, 41, m.channels, dtype=dtype)
    g = torch.randn(3, 41, m.channels, dtype=dtype)
    y_s, s_s, d_s = grads(m, u, "scan", g)
    y_r, s_r, d_r = grads(m64, u.double(), "recurrent", g.double())
    assert_close(y_s, y_r, dtype)
    assert_close(s_s, s_r, dtype)
    for name, a, b in zip(["u"] + [n for n, _ in m.named_parameters()], d_s, d_r):
        assert_close(a, b, dtype, msg=f"gradient of {name}", scale=10)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda m: m(torch.randn(2, 4)), ValueError, "u must have 3 dimensions"),
    (lambda m: m(torch.randn(2, 4, 3, dtype=torch.float64)), ValueError, r"\(batch, L, 5\)"),
    (lambda m: m(torch.randn(2, 0, 5, dtype=torch.float64)), ValueError, "time step"),
    (lambda m: m(torch.randn(2, 4, 5)), TypeError, "dtype"),
    (lambda m: m(torch.ones(2, 4, 5, dtype=torch.int64)), TypeError, "floating"),
    (lambda m: m(torch.randn(2, 4, 5, dtype=torch.float64), mode="fft"), ValueError, "mode"),
    (lambda m: m.step(torch.randn(2, 5, dtype=torch.float64), torch.zeros(2, 5, 6,
                      dtype=torch.float64)), ValueError, "state"),
    (lambda m: LinearSSM(0), ValueError, "channels"),
    (lambda m: LinearSSM(3, 4, mode="loop"), ValueError, "mode"),
    (lambda m: LinearSSM(3, 4, dt_min=0.1, dt_max=0.01), ValueError, "dt_min"),
])
def test_bad_input(bad, exc, match):
    m = make()
    with pytest.raises(exc, match=match):
        bad(m)
