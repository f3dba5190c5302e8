"""rnnkernels.nn.Mamba: mamba_ssm's parameter names, shapes and initialisation; the forward
against a transcription of mamba_ssm's forward on the reference scan; token-by-token decoding
equal to the full forward; compile; bad arguments."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from rnnkernels.nn import Mamba
from rnnkernels.reference import selective_scan_reference


def mamba_ssm_shapes(d_model, d_state=16, d_conv=4, expand=2, bias=False, conv_bias=True):
    """The state_dict of mamba_ssm.modules.mamba_simple.Mamba, written out from its __init__."""
    d_inner, dt_rank = expand * d_model, math.ceil(d_model / 16)
    shapes = {
        "A_log": (d_inner, d_state), "D": (d_inner,),
        "in_proj.weight": (2 * d_inner, d_model), "conv1d.weight": (d_inner, 1, d_conv),
        "x_proj.weight": (dt_rank + 2 * d_state, d_inner), "dt_proj.weight": (d_inner, dt_rank),
        "dt_proj.bias": (d_inner,), "out_proj.weight": (d_model, d_inner),
    }
    if conv_bias:
        shapes["conv1d.bias"] = (d_inner,)
    if bias:
        shapes["in_proj.bias"] = (2 * d_inner,)
        shapes["out_proj.bias"] = (d_model,)
    return shapes


class InferenceParams:
    """The two fields of mamba_ssm.utils.generation.InferenceParams that Mamba reads."""

    def __init__(self):
        self.key_value_memory_dict = {}
        self.seqlen_offset = 0


def reference_block(m: Mamba, h: torch.Tensor) -> torch.Tensor:
    """mamba_ssm's Mamba.forward (no fast path), transcribed on the reference scan."""
    L = h.shape[1]
    xz = F.linear(h, m.in_proj.weight, m.in_proj.bias).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=m.d_conv - 1,
                        groups=m.d_inner)[..., :L])
    dt, B, C = torch.split(F.linear(x.transpose(1, 2), m.x_proj.weight),
                           [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = F.linear(dt, m.dt_proj.weight).transpose(1, 2)
    y = selective_scan_reference(x, dt, -torch.exp(m.A_log.double()), B.transpose(1, 2),
                                 C.transpose(1, 2), m.D.double(), z, m.dt_proj.bias.double(),
                                 True)
    return F.linear(y.transpose(1, 2), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("bias,conv_bias", [(False, True), (True, False)])
def test_state_dict_names_and_shapes_match_mamba_ssm(bias, conv_bias):
    m = Mamba(24, d_state=8, d_conv=3, expand=2, bias=bias, conv_bias=conv_bias)
    shapes = mamba_ssm_shapes(24, 8, 3, 2, bias, conv_bias)
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == shapes
    theirs = {k: torch.randn(s) for k, s in shapes.items()}
    m.load_state_dict(theirs)
    for k, v in m.state_dict().items():
        assert torch.equal(v, theirs[k]), k


def test_constructor_takes_mamba_ssm_arguments_in_its_order():
    """mamba_ssm's Mamba(d_model, d_state, d_conv, expand, dt_rank, dt_min, dt_max, dt_init,
    dt_scale, dt_init_floor, conv_bias, bias, use_fast_path, layer_idx, device, dtype), written
    out from its __init__; use_fast_path=False (common in user code) builds the same block."""
    theirs = ["d_model", "d_state", "d_conv", "expand", "dt_rank", "dt_min", "dt_max", "dt_init",
              "dt_scale", "dt_init_floor", "conv_bias", "bias", "use_fast_path", "layer_idx",
              "device", "dtype"]
    params = inspect.signature(Mamba).parameters.values()
    assert [p.name for p in params] == theirs
    assert all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    torch.manual_seed(0)
    fast = Mamba(16, 4, 3, 2, "auto", 0.001, 0.1, "random", 1.0, 1e-4, True, False, True, 3)
    torch.manual_seed(0)
    slow = Mamba(16, d_state=4, d_conv=3, use_fast_path=False, layer_idx=3)
    assert (fast.use_fast_path, slow.use_fast_path, slow.layer_idx) == (True, False, 3)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(slow(x), fast(x), atol=0, rtol=0)


def test_initialisation_as_mamba_ssm():
    m = Mamba(32, d_state=12, dt_min=0.01, dt_max=0.2, dt_scale=2.0, dtype=torch.float64)
    assert m.d_inner == 64 and m.dt_rank == 2
    expected_A = torch.log(torch.arange(1, 13, dtype=torch.float32)).repeat(64, 1)
    assert m.A_log.dtype == torch.float32 and torch.equal(m.A_log, expected_A)
    assert m.D.dtype == torch.float32 and torch.equal(m.D, torch.ones(64))
    assert m.in_proj.weight.dtype == torch.float64
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.01 * (1 - 1e-9) and dt.max() <= 0.2 * (1 + 1e-9)
    assert m.dt_proj.weight.abs().max() <= 2.0 * 2 ** -0.5
    assert m.dt_proj.bias._no_reinit and m.A_log._no_weight_decay and m.D._no_weight_decay
    floor = F.softplus(Mamba(16, dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-3).dt_proj.bias)
    torch.testing.assert_close(floor, torch.full_like(floor, 1e-3))
    const = Mamba(16, dt_init="constant", dt_rank=4).dt_proj.weight
    assert torch.equal(const, torch.full_like(const, 0.5))


@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_reference_block(bias):
    m = Mamba(16, d_state=8, bias=bias, dtype=torch.float64)
    h = torch.randn(2, 13, 16, dtype=torch.float64, requires_grad=True)
    out = m(h)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [h, *m.parameters()])
    out_r = reference_block(m, h)
    grads_r = torch.autograd.grad((out_r * w).sum(), [h, *m.parameters()])
    assert_close(out, out_r)
    for (name, _), g, g_r in zip([("input", h), *m.named_parameters()], grads, grads_r):
        assert_close(g, g_r, msg=name)


def test_bfloat16_block_runs_with_float32_ssm_parameters():
    m = Mamba(16, d_state=4)
    h = torch.randn(2, 9, 16)
    expected = m(h)
    m_bf16 = Mamba(16, d_state=4, dtype=torch.bfloat16)
    m_bf16.load_state_dict(m.state_dict())
    assert m_bf16.A_log.dtype == torch.float32 and m_bf16.D.dtype == torch.float32
    out = m_bf16(h.bfloat16())
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert_close(out, expected.double(), torch.bfloat16, scale=2.0)
    assert m_bf16.A_log.grad.dtype == torch.float32


def test_step_decoding_equals_full_forward():
    m = Mamba(16, d_state=8, d_conv=3, dtype=torch.float64)
    h = torch.randn(2, 10, 16, dtype=torch.float64)
    with torch.no_grad():
        full = m(h)
        conv_state, ssm_state = m.allocate_inference_cache(2, 10)
        assert conv_state.shape == (2, 32, 3) and ssm_state.shape == (2, 32, 8)
        steps = [m.step(h[:, t : t + 1], conv_state, ssm_state)[0] for t in range(10)]
    torch.testing.assert_close(torch.cat(steps, 1), full)


def test_empty_batch():
    """batch = 0, as torch's layers take it: an empty output, zero parameter gradients, and
    an empty decoding step."""
    m = Mamba(16, d_state=8, dtype=torch.float64)
    h = torch.randn(0, 5, 16, dtype=torch.float64, requires_grad=True)
    y = m(h)
    assert y.shape == (0, 5, 16)
    grads = torch.autograd.grad(y.sum(), [h, *m.parameters()])
    assert grads[0].shape == h.shape and not any(g.any() for g in grads[1:])
    with torch.no_grad():
        conv_state, ssm_state = m.allocate_inference_cache(0, 5)
        assert m.step(h[:, :1], conv_state, ssm_state)[0].shape == (0, 1, 16)


@pytest.mark.parametrize("prefill", [2, 7])
def test_prefill_then_decode_with_inference_params(prefill):
    """A prompt shorter (2) and longer (7) than d_conv fills the cache, then one token a call."""
    m = Mamba(16, d_state=8, layer_idx=3, dtype=torch.float64)
    h = torch.randn(1, 11, 16, dtype=torch.float64)
    params = InferenceParams()
    with torch.no_grad():
        full = m(h)
        outs = [m(h[:, :prefill], inference_params=params)]
        for t in range(prefill, 11):
            params.seqlen_offset = t
            outs.append(m(h[:, t : t + 1], inference_params=params))
    assert set(params.key_value_memory_dict) == {3}
    torch.testing.assert_close(torch.cat(outs, 1), full)


def test_compile_fullgraph():
    m = Mamba(16, d_state=4)
    h = torch.randn(2, 7, 16)
    out = torch.compile(m, fullgraph=True, backend="aot_eager")(h)
    torch.testing.assert_close(out, m(h))


@pytest.mark.parametrize("kwargs,error,match", [
    ({"d_state": 257}, ValueError, "d_state must lie in"),
    ({"d_state": 0}, ValueError, "d_state must lie in"),
    ({"dt_init": "uniform"}, ValueError, "dt_init must be one of"),
    ({"d_conv": 0}, ValueError, "must be positive"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        Mamba(16, **kwargs)


def test_bad_call_arguments():
    m = Mamba(16, d_state=4)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        m(torch.randn(2, 5, 8))
    conv_state, ssm_state = m.allocate_inference_cache(2, 5)
    with pytest.raises(ValueError, match="hidden_states must have shape"):
        m.step(torch.randn(2, 2, 16), conv_state, ssm_state)
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        m.step(torch.randn(2, 1, 16), conv_state, ssm_state[:, :, :2])
    with pytest.raises(ValueError, match="needs layer_idx"):
        m(torch.randn(2, 5, 16), inference_params=InferenceParams())
