"""torch.autocast with every op and module: the dtype each runs in (the recurrences in the
autocast dtype, the scans in the widest dtype of their inputs, see rnnkernels/ops/_autocast.py),
results within the dtype's tolerance of float32, fp32 parameter gradients, GradScaler."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import assert_close

import rnnkernels
from rnnkernels import ops

CUDA_DTYPES = [torch.float16, torch.bfloat16]


def _recurrence_case(name: str, I: int = 8, H: int = 6):
    G = {"lstm": 4, "gru": 3, "rnn": 1}[name]
    params = [torch.randn(G * H, I) * 0.4, torch.randn(G * H, H) * 0.4, torch.randn(G * H) * 0.1,
              torch.randn(G * H) * 0.1]

    def run(x, params):
        B = x.shape[1]
        h0 = torch.full((B, H), 0.1, device=x.device)
        if name == "lstm":
            y, (h, c) = ops.lstm(x, (h0, h0.clone()), *params)
            return y, h, c
        y, h = getattr(ops, name)(x, h0, *params)
        return y, h

    return params, run


def _selective_scan_case(dim: int = 6, N: int = 4):
    params = [-torch.rand(dim, N) - 0.5, torch.randn(dim), torch.rand(dim) * 0.2]

    def run(x, params):
        # x (T, B, I) -> u, delta, z (B, dim, T) as an autocast Linear would hand them over.
        A, D, bias = params
        v = x.permute(1, 2, 0)
        u, delta, z = v[:, :dim], v[:, :dim] * 0.5, v[:, :dim].flip(1)
        Bm, Cm = v[:, :N] * 0.7, v[:, 1:N + 1]
        return ops.selective_scan(u, delta, A, Bm, Cm, D, z, bias, delta_softplus=True,
                                  return_last_state=True)

    return params, run


def _linear_scan_case(channels: int = 6):
    params = [torch.randn(channels)]

    def run(x, params):
        v = x.permute(1, 2, 0)[:, :channels]
        return (ops.linear_scan(torch.sigmoid(v), v, params[0].expand(v.shape[0], -1)),)

    return params, run


CASES = {"lstm": lambda: _recurrence_case("lstm"), "gru": lambda: _recurrence_case("gru"),
         "rnn": lambda: _recurrence_case("rnn"), "selective_scan": _selective_scan_case,
         "linear_scan": _linear_scan_case}

def _run_op(op: str, device: str, dtype: torch.dtype):
    """The op on activations out of a Linear, in float32 and under autocast; returns the outputs
    and the gradients of the Linear's weight and of the op's parameters, both ways."""
    params, run = CASES[op]()
    proj = torch.nn.Linear(5, 8).to(device)
    x = torch.randn(7, 3, 5, device=device)
    params = [p.to(device).requires_grad_() for p in params]
    results = []
    for autocast in (False, True):
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            outs = run(proj(x), params)
        loss = sum(o.float().sum() for o in outs)
        grads = torch.autograd.grad(loss, [proj.weight, *params])
        results.append((outs, grads))
    return results


@pytest.mark.parametrize("op", list(CASES))
def test_op_autocast_cpu_bfloat16(op):
    (outs32, grads32), (outs16, grads16) = _run_op(op, "cpu", torch.bfloat16)
    assert outs16[0].dtype == torch.bfloat16
    for o16, o32 in zip(outs16, outs32):
        assert_close(o16, o32.double(), torch.bfloat16)
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == torch.float32
        assert_close(g16, g32.double(), torch.bfloat16, scale=4)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("op", list(CASES))
def test_op_autocast_cuda(op, dtype):
    (outs32, grads32), (outs16, grads16) = _run_op(op, "cuda", dtype)
    assert outs16[0].dtype == dtype
    for o16, o32 in zip(outs16, outs32):
        assert_close(o16, o32.double(), dtype)
    for g16, g32 in zip(grads16, grads32):
        assert g16.dtype == torch.float32
        assert_close(g16, g32.double(), dtype, scale=4)


def test_scan_promotes_mixed_inputs_under_autocast():
    """fp32 u next to a bf16 delta: the scan runs in fp32 inside autocast (exactly as with an
    fp32 delta) and refuses the mix outside it."""
    u, delta = torch.randn(2, 4, 9), torch.rand(2, 4, 9).bfloat16()
    A, Bm, Cm = -torch.rand(4, 3), torch.randn(2, 3, 9), torch.randn(2, 3, 9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.selective_scan(u, delta, A, Bm, Cm)
        h = ops.linear_scan(delta, u)
    assert out.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(out, ops.selective_scan(u, delta.float(), A, Bm, Cm), rtol=0,
                               atol=0)
    torch.testing.assert_close(h, ops.linear_scan(delta.float(), u), rtol=0, atol=0)
    with pytest.raises(TypeError, match="delta must have dtype"):
        ops.selective_scan(u, delta, A, Bm, Cm)
    with pytest.raises(TypeError, match="b must have dtype"):
        ops.linear_scan(delta, u)


def _modules():
    nn = rnnkernels.nn
    return {
        "LSTM": lambda: nn.LSTM(8, 8, num_layers=2, batch_first=True),
        "GRU": lambda: nn.GRU(8, 8, batch_first=True, bidirectional=True),
        "RNN": lambda: nn.RNN(8, 8, batch_first=True),
        "Mamba": lambda: nn.Mamba(8, d_state=4),
        "LinearSSM-scan": lambda: nn.LinearSSM(8, 4, mode="scan"),
        "LinearSSM-conv": lambda: nn.LinearSSM(8, 4, mode="conv"),
        "LinearSSM-recurrent": lambda: nn.LinearSSM(8, 4, mode="recurrent"),
    }


class _Model(torch.nn.Module):
    """Linear -> module -> Linear: the module sees its input as an autocast matmul leaves it."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.inp, self.body, self.out = torch.nn.Linear(8, 8), module, torch.nn.Linear(16, 3)

    def forward(self, x):
        y = self.body(self.inp(x))
        y = y[0] if isinstance(y, tuple) else y
        return self.out(torch.cat([y, y], -1)[..., :16])


def _run_module(name: str, device: str, dtype: torch.dtype):
    model = _Model(_modules()[name]()).to(device)
    x = torch.randn(3, 10, 8, device=device)
    results = []
    for autocast in (False, True):
        model.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            y = model(x)
        y.float().square().mean().backward()
        results.append((y, {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.parametrize("name", list(_modules()))
def test_module_autocast_cpu_bfloat16(name):
    (y32, g32), (y16, g16) = _run_module(name, "cpu", torch.bfloat16)
    assert y16.dtype == torch.bfloat16
    assert_close(y16, y32.double(), torch.bfloat16)
    for n in g32:
        assert g16[n].dtype == torch.float32, n
        assert_close(g16[n], g32[n].double(), torch.bfloat16, scale=4, msg=n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
@pytest.mark.parametrize("name", list(_modules()))
def test_module_autocast_cuda(name, dtype):
    (y32, g32), (y16, g16) = _run_module(name, "cuda", dtype)
    assert y16.dtype == dtype
    assert_close(y16, y32.double(), dtype)
    for n in g32:
        assert_close(g16[n], g32[n].double(), dtype, scale=4, msg=n)


def test_rnn_state_from_autocast_region():
    """An encoder's bf16 h_n handed to a decoder inside autocast (seq2seq) is taken, as
    torch.nn.LSTM takes it."""
    enc, dec = rnnkernels.nn.LSTM(4, 6), rnnkernels.nn.LSTM(4, 6)
    x = torch.randn(5, 2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, state = enc(torch.nn.functional.linear(x, torch.eye(4)))
        assert state[0].dtype == torch.bfloat16
        y, _ = dec(x, state)
    _, state32 = enc(x)
    assert_close(y, dec(x, state32)[0].double(), torch.bfloat16)


def _scaler_model(device: str) -> torch.nn.Module:
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = rnnkernels.nn.LSTM(6, 8, batch_first=True)
            self.gru = rnnkernels.nn.GRU(8, 8, batch_first=True)
            self.mamba = rnnkernels.nn.Mamba(8, d_state=4)
            self.head = torch.nn.Linear(8, 1)

        def forward(self, x):
            y = self.gru(self.lstm(x)[0])[0]
            return self.head(self.mamba(y)).mean()

    return Net().to(device)


def _scaled_grads(device: str, dtype: torch.dtype):
    """Gradients in fp32, and under autocast with a GradScaler, unscaled, with the scaler's
    count of infs. The scale is the largest power of two that keeps every scaled fp32
    gradient below 2^12, 16 times under the fp16 maximum: where fp32 does not overflow."""
    model = _scaler_model(device)
    x = torch.randn(4, 12, 6, device=device)
    model(x).backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    largest = max(g.abs().max().item() for g in ref.values())
    model.zero_grad()
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** math.floor(math.log2(2**12 / largest)))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.autocast(device, dtype=dtype):
        loss = model(x)
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    found_inf = sum(v.item() for v in scaler._found_inf_per_device(opt).values())
    return ref, {n: p.grad for n, p in model.named_parameters()}, found_inf


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_grad_scaler_cpu(dtype):
    """On the CPU fp16 runs on the reference path (the C++ kernels take fp32/fp64/bf16), bf16 on
    the kernels; either way the scaled gradients stay finite and match fp32."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="rnnkernels: no fast kernel")
        ref, grads, found_inf = _scaled_grads("cpu", dtype)
    assert found_inf == 0
    for n in ref:
        assert torch.isfinite(grads[n]).all(), n
        assert_close(grads[n], ref[n].double(), dtype, scale=4, msg=n)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", CUDA_DTYPES)
def test_grad_scaler_cuda(dtype):
    ref, grads, found_inf = _scaled_grads("cuda", dtype)
    assert found_inf == 0
    for n in ref:
        assert_close(grads[n], ref[n].double(), dtype, scale=4, msg=n)
