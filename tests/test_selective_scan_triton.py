"""The Triton selective scan against the reference: under TRITON_INTERPRET=1 on CPU tensors
(small shapes: the interpreter runs programs one after another), and compiled on a GPU."""

from __future__ import annotations

import pytest
import torch
from test_selective_scan import (
    ARGS,
    check_against_reference,
    check_compile_matches_eager,
    check_one_output_unused,
    make_inputs,
)

import rnnkernels
from rnnkernels import _kernels
from rnnkernels.ops.selective_scan import CHUNK_SIZE

interpreted = pytest.mark.skipif(not _kernels.triton_interpreted(),
                                 reason="needs TRITON_INTERPRET=1 (set by tools/test.sh)")

CASES = [
    # (batch, dim, L, N, form, groups, D, z, delta_bias, softplus, initial_state)
    (1, 1, 1, 1, "fixed", 1, False, False, False, False, False),
    (2, 3, 9, 16, "variable", 1, True, True, True, True, True),
    (1, 6, 7, 5, "grouped", 3, True, False, True, True, False),
    (2, 3, 6, 4, "fixed", 1, False, True, False, False, True),
]


@interpreted
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_triton_interpreted_matches_reference(case, monkeypatch):
    batch, dim, L, N, form, groups, D, z, bias, softplus, x0 = case
    monkeypatch.setitem(CHUNK_SIZE, "triton", 4)
    inputs = make_inputs(batch, dim, L, N, form, groups, D, z, bias, x0, dtype=torch.float32)
    with rnnkernels.use_backend("triton"):
        check_against_reference(inputs, softplus)


@interpreted
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_interpreted_half_precision(dtype, monkeypatch):
    monkeypatch.setitem(CHUNK_SIZE, "triton", 4)
    inputs = make_inputs(batch=1, dim=4, L=6, N=8, initial_state=True, dtype=dtype,
                         param_dtype=torch.float32)
    with rnnkernels.use_backend("triton"):
        check_against_reference(inputs, dtype=dtype, grad_scale=4.0)


@interpreted
@pytest.mark.parametrize("used", ["out", "last_state"])
def test_triton_interpreted_one_output_unused(used, monkeypatch):
    monkeypatch.setitem(CHUNK_SIZE, "triton", 4)
    inputs = make_inputs(batch=2, dim=3, L=6, N=4, initial_state=True, dtype=torch.float32)
    with rnnkernels.use_backend("triton"):
        check_one_output_unused(inputs, used)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["fixed", "variable", "grouped"])
def test_triton_gpu_matches_reference(dtype, form):
    inputs = make_inputs(batch=2, dim=96, L=300, N=16, form=form, groups=4, initial_state=True,
                         dtype=dtype, param_dtype=torch.float32)
    inputs = {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}
    with rnnkernels.use_backend("triton"):
        check_against_reference(inputs, dtype=dtype, grad_scale=4.0)


@pytest.mark.cuda
def test_triton_gpu_opcheck_and_compile():
    from rnnkernels.triton import selective_scan as T

    inputs = make_inputs(batch=2, dim=8, L=40, N=16, initial_state=True, dtype=torch.float32)
    inputs = {k: v.cuda() for k, v in inputs.items()}
    args = [inputs[k] for k in ARGS[:8]]
    B, C = args[3].unsqueeze(1), args[4].unsqueeze(1)
    fwd = (*args[:3], B, C, *args[5:], True, inputs["initial_state"], 16, True)
    torch.library.opcheck(T.selective_scan_fwd_triton, fwd)
    out, last, ckpt = T.selective_scan_fwd_triton(*fwd)
    bwd = (torch.randn_like(out), torch.randn_like(last), *args[:3], B, C, *args[5:], True,
           inputs["initial_state"], ckpt, 16)
    torch.library.opcheck(T.selective_scan_bwd_triton, bwd)
    flat = (*args, True, inputs["initial_state"], 16, True)  # B, C as (batch, N, L)
    torch.library.opcheck(T.selective_scan_fwd_triton, flat)
    torch.library.opcheck(T.selective_scan_bwd_triton, (*bwd[:5], *args[3:], *bwd[10:]))

    check_compile_matches_eager(inputs, "triton")
