"""Non-finite inputs and determinism: a NaN or Inf reaches exactly the outputs it touches (its
batch row, its step and the later ones) and nothing else, without a crash; results and gradients
are bitwise the same run to run; torch.use_deterministic_algorithms is honoured or refused."""

from __future__ import annotations

import pytest
import torch

import rnnkernels
from rnnkernels import ops
from rnnkernels.reference import linear_scan_reference, selective_scan_reference
from rnnkernels.reference.recurrence import gru_reference, lstm_reference, rnn_reference

RECURRENCES = ("lstm", "gru", "rnn")
OPS = (*RECURRENCES, "selective_scan", "linear_scan")
B, T, F, H, N = 3, 11, 4, 5, 3


def _params(op: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    if op in RECURRENCES:
        G = {"lstm": 4, "gru": 3, "rnn": 1}[op]
        shapes = [(G * H, F), (G * H, H), (G * H,), (G * H,)]
    elif op == "selective_scan":
        shapes = [(F, N), (F, N), (F, N), (F,), (B, F, T)]
    else:
        shapes = [(B, T, F)]
    params = [torch.randn(s, generator=g) * 0.5 for s in shapes]
    if op == "selective_scan":
        params[0] = -params[0].abs() - 0.2
    return [p.requires_grad_() for p in params]


def _run(op: str, seq: torch.Tensor, params: list[torch.Tensor], reference: bool = False
         ) -> torch.Tensor:
    """The op on seq (B, T, F), the output laid out (B, T, features)."""
    if op in RECURRENCES:
        x, h0 = seq.transpose(0, 1), torch.zeros(B, H)
        if op == "lstm":
            fn = lstm_reference if reference else ops.lstm
            hx = (h0, h0) if reference else ((h0, h0),)
            y = fn(x, *hx, *params)[0]
        else:
            fn = {"gru": gru_reference, "rnn": rnn_reference}[op] if reference else getattr(ops, op)
            y = fn(x, h0, *params)[0]
        return y.transpose(0, 1)
    u = seq.transpose(1, 2)
    if op == "selective_scan":
        A, Bm, Cm, D, delta = params
        fn = selective_scan_reference if reference else ops.selective_scan
        return fn(u, delta, A, Bm, Cm, D, delta_softplus=True).transpose(1, 2)
    a = torch.sigmoid(params[0]).transpose(1, 2)
    fn = linear_scan_reference if reference else ops.linear_scan
    return fn(a, u).transpose(1, 2)


def _touched(op: str, out: torch.Tensor, row: int, step: int, feature: int) -> torch.Tensor:
    """Mask of the outputs that input (row, step, feature) reaches: its row from its step on; in
    the scans only its own channel, in the recurrences every unit (through the matmuls)."""
    mask = torch.zeros(out.shape, dtype=torch.bool)
    if op in RECURRENCES:
        mask[row, step:] = True
    else:
        mask[row, step:, feature] = True
    return mask


@pytest.mark.parametrize("op", OPS)
def test_nan_reaches_its_row_and_later_steps_only(op):
    params = _params(op)
    seq = torch.randn(B, T, F).requires_grad_()
    poisoned = seq.detach().clone()
    poisoned[1, 4, 2] = float("nan")
    poisoned.requires_grad_()
    out = _run(op, poisoned, params)
    touched = _touched(op, out, 1, 4, 2)
    assert torch.isnan(out[touched]).all()
    assert torch.isfinite(out[~touched]).all()
    # The other rows' gradients stay finite and equal those without the NaN.
    others = torch.tensor([0, 2])
    (g,) = torch.autograd.grad(out[others].sum(), poisoned)
    (g_clean,) = torch.autograd.grad(_run(op, seq, params)[others].sum(), seq)
    torch.testing.assert_close(g[others], g_clean[others])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("value", [float("inf"), -float("inf")])
def test_inf_matches_the_reference(op, value):
    """An infinite input gives what the reference gives, inf / nan / saturated finite values
    alike (sigmoid and tanh saturate, so the recurrences may stay finite), and leaves the other
    rows finite."""
    params = _params(op)
    seq = torch.randn(B, T, F)
    seq[1, 4, 2] = value
    with torch.no_grad():
        out, ref = _run(op, seq, params), _run(op, seq, params, reference=True)
    torch.testing.assert_close(out, ref.to(out.dtype), equal_nan=True, atol=2e-5, rtol=2e-4)
    assert torch.isfinite(out[[0, 2]]).all()
    assert torch.isfinite(out[1, :4]).all()


def test_linear_scan_inf_stays_inf():
    a, b = torch.full((1, 2, 6), 0.5), torch.ones(1, 2, 6)
    b[0, 0, 2] = float("inf")
    h = ops.linear_scan(a, b)
    assert torch.isposinf(h[0, 0, 2:]).all()
    assert torch.isfinite(h[0, 0, :2]).all() and torch.isfinite(h[0, 1]).all()


@pytest.mark.parametrize("name", ["delta", "B", "C"])
def test_selective_scan_nan_in_time_varying_parameter(name):
    """A NaN in delta of one channel reaches that channel; in the shared B or C of a row at
    step t, every channel of that row from step t on (B) or at step t only (C: read out, not
    carried)."""
    u, delta = torch.randn(B, F, T), torch.rand(B, F, T)
    A, Bm, Cm = -torch.rand(F, N) - 0.2, torch.randn(B, N, T), torch.randn(B, N, T)
    args = {"delta": delta, "B": Bm, "C": Cm}
    if name == "delta":
        args["delta"][1, 2, 4] = float("nan")
    else:
        args[name][1, 0, 4] = float("nan")
    out = ops.selective_scan(u, args["delta"], A, args["B"], args["C"])
    touched = torch.zeros(out.shape, dtype=torch.bool)
    if name == "delta":
        touched[1, 2, 4:] = True
    elif name == "B":
        touched[1, :, 4:] = True
    else:
        touched[1, :, 4] = True
    assert torch.isnan(out[touched]).all()
    assert torch.isfinite(out[~touched]).all()


def _forward_backward(op: str):
    params = _params(op)
    seq = torch.randn(B, T, F).requires_grad_()
    out = _run(op, seq, params)
    grads = torch.autograd.grad((out * torch.linspace(-1, 1, out.shape[-1])).sum(),
                                [seq, *params])
    return [out, *grads]


@pytest.mark.parametrize("op", OPS)
def test_fp32_bitwise_deterministic_run_to_run(op):
    first = _forward_backward(op)
    torch.manual_seed(0)
    second = _forward_backward(op)
    for x, y in zip(first, second):
        assert torch.equal(x, y)


def test_cpu_ops_run_under_deterministic_algorithms():
    """The CPU kernels have no nondeterministic path: they run under the flag, and a Mamba
    block's training step gives the same bits as without it."""
    model = rnnkernels.nn.Mamba(8, d_state=4)
    x = torch.randn(2, 9, 8)

    def step():
        model.zero_grad()
        model(x).square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    free = step()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        strict = step()
    finally:
        torch.use_deterministic_algorithms(previous)
    for a, b in zip(free, strict):
        assert torch.equal(a, b)


def _scan_grads_cuda():
    """Gradients of a CUDA selective scan with fixed and time-varying B, C (no matmul, so no
    cuBLAS in the way of the flag)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    kw = {"device": "cuda", "generator": g}
    u, delta = torch.randn(4, 64, 300, **kw), torch.rand(4, 64, 300, **kw)
    A, Bm, Cm = -torch.rand(64, 16, **kw), torch.randn(64, 16, **kw), torch.randn(4, 16, 300, **kw)
    leaves = [t.requires_grad_() for t in (u, delta, A, Bm, Cm)]
    out = ops.selective_scan(*leaves, delta_softplus=True)
    return torch.autograd.grad(out.square().sum(), leaves)


@pytest.fixture
def deterministic(monkeypatch):
    """torch.use_deterministic_algorithms(True) for one test, with the cuBLAS workspace setting
    the flag asks for."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.cuda
def test_cuda_deterministic_flag_refuses_atomic_scan_backward(deterministic):
    """The CUDA selective-scan backward sums parameter gradients with atomics: refused with an
    error naming the op under the flag, a warning with warn_only."""
    with pytest.raises(RuntimeError, match="selective_scan_bwd"):
        _scan_grads_cuda()
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="selective_scan_bwd"):
        _scan_grads_cuda()


@pytest.mark.cuda
def test_cuda_deterministic_paths_are_bitwise_repeatable(deterministic):
    """The Triton scan backward (no atomics) and the recurrences run under the flag and repeat
    bit for bit."""
    with rnnkernels.use_backend("triton"):
        first, second = _scan_grads_cuda(), _scan_grads_cuda()
    lstm = rnnkernels.nn.LSTM(32, 64, num_layers=2).cuda()
    x = torch.randn(50, 8, 32, device="cuda")
    runs = []
    for _ in range(2):
        lstm.zero_grad()
        lstm(x)[0].square().sum().backward()
        runs.append([p.grad.clone() for p in lstm.parameters()])
    for a, b in [*zip(first, second), *zip(*runs)]:
        assert torch.equal(a, b)
