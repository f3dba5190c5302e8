"""Property tests: Hypothesis draws shapes, dtypes, flags and memory layouts for every op and
checks the public op against its float64 reference, every output and every gradient.

Two profiles: ``ci`` (a few derandomised examples per op, run by default) and ``slow`` (300 per
op, ``@pytest.mark.slow``: ``pytest -m slow tests/test_properties.py``). A counterexample that
either finds becomes a regular test at the end of this file."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator

import pytest
import torch
from conftest import assert_close
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_linear_scan import make_inputs as linear_scan_inputs
from test_recurrence_cpu import make_layer
from test_selective_scan import make_inputs as selective_scan_inputs

from rnnkernels import ops
from rnnkernels.ops import recurrence as R
from rnnkernels.ops.selective_scan import CHUNK_SIZE
from rnnkernels.reference import linear_scan_reference, selective_scan_reference

settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          database=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])

DTYPES = [torch.float64, torch.float32, torch.bfloat16]
LAYOUTS = ["contiguous", "strided", "transposed"]


def _with_layout(value: torch.Tensor, layout: str) -> torch.Tensor:
    """value's numbers in a tensor with the given memory layout, differentiable back to a leaf:
    "strided" is every other element of a twice-as-long last dimension, "transposed" keeps the
    first and last dimensions swapped in memory."""
    if layout == "strided":
        return torch.stack([value, value], -1).flatten(-2).requires_grad_()[..., ::2]
    if layout == "transposed" and value.dim() > 1:
        return value.transpose(0, -1).contiguous().requires_grad_().transpose(0, -1)
    return value.clone().requires_grad_()


def _compare(run: Callable, reference: Callable, values: dict[str, torch.Tensor | None],
             layouts: dict[str, str], dtype: torch.dtype, seed: int) -> None:
    """run(**inputs) against reference(**float64 inputs): every output, and the gradient of a
    random weighting of the outputs with respect to every input."""
    ours = {k: None if v is None else _with_layout(v, layouts.get(k, "contiguous"))
            for k, v in values.items()}
    exact = {k: None if v is None else v.double().requires_grad_() for k, v in values.items()}
    outs, refs = run(**ours), reference(**exact)
    g = torch.Generator().manual_seed(seed)
    weights = [torch.randn(r.shape, generator=g, dtype=torch.float64) for r in refs]
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_close(o, r, dtype, msg=f"output {i}")
    names = [k for k, v in ours.items() if v is not None]
    grads = torch.autograd.grad(sum((o.double() * w).sum() for o, w in zip(outs, weights)),
                                [ours[k] for k in names])
    grads_r = torch.autograd.grad(sum((r * w).sum() for r, w in zip(refs, weights)),
                                  [exact[k] for k in names])
    # Gradients of parameters sum over every step and row: a wider tolerance in low precision.
    scale = 1.0 if dtype == torch.float64 else 4.0
    for k, a, b in zip(names, grads, grads_r):
        assert a.dtype == values[k].dtype, k
        assert_close(a, b, dtype, msg=f"gradient of {k}", scale=scale)


@contextlib.contextmanager
def _env(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _chunk_size(size: int) -> Iterator[None]:
    previous = CHUNK_SIZE["cpu"]
    CHUNK_SIZE["cpu"] = size
    try:
        yield
    finally:
        CHUNK_SIZE["cpu"] = previous


# ------------------------------------------------------------------ the recurrences

@st.composite
def recurrence_cases(draw, op: str) -> dict:
    cell = {"lstm": R.LSTM,
            "gru": draw(st.sampled_from([R.GRU, R.GRU_RESET_BEFORE])),
            "rnn": draw(st.sampled_from([R.RNN_TANH, R.RNN_RELU]))}[op]
    H = draw(st.integers(1, 20))
    # The ReLU's derivative jumps at 0: in bfloat16 the rounding of a preactivation near 0 may
    # put it on the other side and switch a whole gradient path (the first slow run's
    # counterexample, see test_relu_rnn_counterexample_float32), so the ReLU RNN draws no bf16.
    dtypes = DTYPES[:2] if cell == R.RNN_RELU else DTYPES
    return {
        "cell": cell, "T": draw(st.integers(1, 12)), "B": draw(st.integers(1, 5)),
        "I": draw(st.integers(1, 7)), "H": H, "dtype": draw(st.sampled_from(dtypes)),
        "proj": draw(st.integers(0, H - 1)) if cell == R.LSTM else 0,
        "bias": draw(st.booleans()), "lengths": draw(st.booleans()),
        "reverse": draw(st.booleans()), "x_layout": draw(st.sampled_from(LAYOUTS)),
        "w_layout": draw(st.sampled_from(LAYOUTS)),
        "path": draw(st.sampled_from(["units", "rows", "batched"])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_recurrence(case: dict) -> None:
    torch.manual_seed(case["seed"])
    cell, T, B, dtype = case["cell"], case["T"], case["B"], case["dtype"]
    values = {k: None if v is None else v.detach()
              for k, v in make_layer(cell, T, B, case["I"], case["H"], dtype, case["proj"],
                                     case["bias"], requires_grad=False).items()}
    lengths = torch.randint(1, T + 1, (B,)) if case["lengths"] else None
    reverse = case["reverse"]

    def run(x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        kw = {"lengths": lengths, "reverse": reverse}
        if cell == R.LSTM:
            y, (h, c) = ops.lstm(x, (h0, c0), w_ih, w_hh, b_ih, b_hh, w_hr, **kw)
            return y, h, c
        if cell in (R.GRU, R.GRU_RESET_BEFORE):
            return ops.gru(x, h0, w_ih, w_hh, b_ih, b_hh, reset_after=cell == R.GRU, **kw)
        nonlinearity = "tanh" if cell == R.RNN_TANH else "relu"
        return ops.rnn(x, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity, **kw)

    def reference(**inputs):
        y, h, c = R.reference_layer(*inputs.values(), lengths, cell, reverse)
        return (y, h) if c is None else (y, h, c)

    layouts = {"x": case["x_layout"], "w_hh": case["w_layout"], "w_ih": case["w_layout"]}
    with _env("RNNKERNELS_CPU_RECURRENCE", case["path"]):
        _compare(run, reference, values, layouts, dtype, case["seed"])


# ------------------------------------------------------------------ the scans

@st.composite
def selective_scan_cases(draw) -> dict:
    dim = draw(st.integers(1, 20))
    dtype = draw(st.sampled_from(DTYPES))
    return {
        "batch": draw(st.integers(1, 3)), "dim": dim, "L": draw(st.integers(1, 80)),
        "N": draw(st.integers(1, 8)),
        "form": draw(st.sampled_from(["fixed", "variable", "grouped"])),
        "groups": draw(st.sampled_from([g for g in range(1, dim + 1) if dim % g == 0])),
        "D": draw(st.booleans()), "z": draw(st.booleans()), "delta_bias": draw(st.booleans()),
        "initial_state": draw(st.booleans()), "softplus": draw(st.booleans()),
        "dtype": dtype,
        "param_dtype": (draw(st.sampled_from([dtype, torch.float32]))
                        if dtype != torch.float64 else dtype),
        "chunk": draw(st.sampled_from([8, 64])),
        "layouts": {k: draw(st.sampled_from(LAYOUTS)) for k in ("u", "delta", "B", "C", "z")},
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _scan_call(fn: Callable, softplus: bool) -> Callable:
    """fn (selective_scan or its reference) with keyword inputs, returning (out, last_state)."""
    def call(u, delta, A, B, C, D, z, delta_bias, initial_state):
        return fn(u, delta, A, B, C, D, z, delta_bias, softplus, True,
                  initial_state=initial_state)
    return call


def check_selective_scan(case: dict) -> None:
    torch.manual_seed(case["seed"])
    values = selective_scan_inputs(
        batch=case["batch"], dim=case["dim"], L=case["L"], N=case["N"], form=case["form"],
        groups=case["groups"], D=case["D"], z=case["z"], delta_bias=case["delta_bias"],
        initial_state=case["initial_state"], dtype=case["dtype"],
        param_dtype=case["param_dtype"])
    softplus = case["softplus"]
    if not softplus:
        # delta is a step size: without the softplus inside the op it is drawn positive, else
        # exp(delta A) > 1 makes the state grow without bound and fp32 gradients lose relative
        # accuracy (the first slow run's counterexample, see
        # test_selective_scan_counterexample_growing_state).
        # So is delta_bias, added before it: a negative bias gave the slow profile the same
        # growing state (dim 6, L 62, fp32: the gradient of delta past the fp32 tolerance).
        for key in ("delta", "delta_bias"):
            if values.get(key) is not None:
                values[key] = torch.nn.functional.softplus(values[key].double()).to(
                    values[key].dtype)

    with _chunk_size(case["chunk"]):
        _compare(_scan_call(ops.selective_scan, softplus),
                 _scan_call(selective_scan_reference, softplus), values, case["layouts"],
                 case["dtype"], case["seed"])


@st.composite
def linear_scan_cases(draw) -> dict:
    return {
        "batch": draw(st.integers(1, 3)), "channels": draw(st.integers(1, 20)),
        "T": draw(st.integers(1, 80)), "initial_state": draw(st.booleans()),
        "dtype": draw(st.sampled_from(DTYPES)),
        "layouts": {k: draw(st.sampled_from(LAYOUTS)) for k in ("a", "b", "initial_state")},
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_linear_scan(case: dict) -> None:
    torch.manual_seed(case["seed"])
    a, b, h0 = linear_scan_inputs(case["batch"], case["channels"], case["T"], case["dtype"],
                                  case["initial_state"])

    def scan(fn):
        return lambda a, b, initial_state: (fn(a, b, initial_state),)

    _compare(scan(ops.linear_scan), scan(linear_scan_reference),
             {"a": a, "b": b, "initial_state": h0}, case["layouts"], case["dtype"], case["seed"])


PROPERTIES = {
    "lstm": (recurrence_cases("lstm"), check_recurrence),
    "gru": (recurrence_cases("gru"), check_recurrence),
    "rnn": (recurrence_cases("rnn"), check_recurrence),
    "selective_scan": (selective_scan_cases(), check_selective_scan),
    "linear_scan": (linear_scan_cases(), check_linear_scan),
}


def _property(op: str, profile: str) -> Callable[[], None]:
    strategy, check = PROPERTIES[op]
    return settings(settings.get_profile(profile))(given(strategy)(check))


@pytest.mark.parametrize("op", list(PROPERTIES))
def test_property_ci(op):
    _property(op, "ci")()


@pytest.mark.slow
@pytest.mark.parametrize("op", list(PROPERTIES))
def test_property_slow(op):
    _property(op, "slow")()


# ------------------------------------------------------------------ counterexamples

def test_relu_rnn_counterexample_float32():
    """Found by the slow profile in bfloat16 (a preactivation rounded across the ReLU's kink);
    in float32 the same case matches the reference in every gradient."""
    check_recurrence({"cell": R.RNN_RELU, "T": 11, "B": 2, "I": 3, "H": 4,
                      "dtype": torch.float32, "proj": 0, "bias": True, "lengths": False,
                      "reverse": True, "x_layout": "strided", "w_layout": "contiguous",
                      "path": "units", "seed": 0})


def test_selective_scan_counterexample_growing_state():
    """Found by the slow profile: negative delta without softplus (exp(delta A) > 1, a growing
    state; the gradient of delta reached -2.1e6) put fp32 gradients 1e-3 off relatively, past
    the fp32 tolerance. In float64 the op matches the reference in that regime, across chunks
    of 8."""
    torch.manual_seed(0)
    values = selective_scan_inputs(batch=1, dim=1, L=78, N=1, form="fixed", D=False, z=False,
                                   delta_bias=False, dtype=torch.float64)
    assert values["delta"].min() < 0
    with _chunk_size(8):
        _compare(_scan_call(ops.selective_scan, False),
                 _scan_call(selective_scan_reference, False), values, {}, torch.float64, 0)
