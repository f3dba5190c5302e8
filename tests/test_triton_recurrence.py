"""Triton kernels of the generic recurrence against the float64 reference and the C++ op.

Under TRITON_INTERPRET=1 (CI) the kernels run on CPU tensors with ``use_backend("triton")``; each
path of ``rnnkernels.triton.recurrence`` that the interpreter can run is forced in turn: one
program, several programs (batch blocks; hidden blocks in the per-step path), one launch per
step. The ``cuda`` tests run the same checks compiled on a GPU at real sizes, plus the path
whose programs meet at a grid barrier, opcheck and torch.compile.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close

import rnnkernels
from rnnkernels import _backend, _kernels
from rnnkernels.ops import recurrence as R

interpreted = _kernels.triton_interpreted()
needs_interpreter = pytest.mark.skipif(
    not interpreted, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
if _kernels.triton_unsupported("recurrence", torch.float32) is not None:
    pytest.skip("Triton is not available", allow_module_level=True)

from rnnkernels.triton import recurrence as TR  # needs triton: checked above

# name: (cell, projected)
VARIANTS = {
    "lstm": (R.LSTM, False),
    "lstm_proj": (R.LSTM, True),
    "gru": (R.GRU, False),
    "gru_reset_before": (R.GRU_RESET_BEFORE, False),
    "rnn_tanh": (R.RNN_TANH, False),
    "rnn_relu": (R.RNN_RELU, False),
}
# (T, B, H, P of the projection, reverse, with lengths)
CASES = [
    (5, 3, 20, 7, True, True),
    (1, 1, 5, 3, False, False),
    (5, 3, 16, 5, False, True),
]
# name: (force_plan arguments, rows added to B so that a batch block of 16 leaves several)
PATHS = {
    "one_program": ({"path": "persistent"}, 0),
    "batch_blocks": ({"path": "persistent", "batch_block": 16}, 16),
    "per_step": ({"path": "step", "hidden_block": 16}, 0),
}
INPUTS = ("x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "w_hr")


def make_inputs(cell: int, T: int, B: int, H: int, P: int | None, device="cpu", I: int = 4,
                lengths: bool = False) -> tuple[dict, torch.Tensor | None]:
    """float64 layer inputs at torch.nn's init scale (randn instead of uniform), and lengths."""
    G = R.NUM_GATES[cell]
    Pe = P or H
    k = 1.0 / math.sqrt(H)
    f64 = {"dtype": torch.float64, "device": device}
    inputs = {
        "x": torch.randn(T, B, I, **f64),
        "h0": torch.randn(B, Pe, **f64) * 0.5,
        "c0": torch.randn(B, H, **f64) * 0.5 if cell == R.LSTM else None,
        "w_ih": torch.randn(G * H, I, **f64) * k,
        "w_hh": torch.randn(G * H, Pe, **f64) * k,
        "b_ih": torch.randn(G * H, **f64) * k,
        "b_hh": torch.randn(G * H, **f64) * k,
        "w_hr": torch.randn(Pe, H, **f64) * k if P else None,
    }
    lens = torch.randint(1, T + 1, (B,), device=device) if lengths else None
    if lens is not None:
        lens[0] = T
    return inputs, lens


def layer(cell: int, inp: dict, lengths, reverse: bool):
    """One layer through the public functional API (or the reference for float64)."""
    if inp["x"].dtype == torch.float64:
        return R.reference_layer(*(inp[n] for n in INPUTS), lengths, cell, reverse)
    args = (inp["x"],)
    kw = {"lengths": lengths, "reverse": reverse}
    if cell == R.LSTM:
        y, (h, c) = rnnkernels.ops.lstm(*args, (inp["h0"], inp["c0"]), inp["w_ih"], inp["w_hh"],
                                        inp["b_ih"], inp["b_hh"], inp["w_hr"], **kw)
        return y, h, c
    rest = (inp["h0"], inp["w_ih"], inp["w_hh"], inp["b_ih"], inp["b_hh"])
    if cell in (R.GRU, R.GRU_RESET_BEFORE):
        y, h = rnnkernels.ops.gru(*args, *rest, reset_after=cell == R.GRU, **kw)
    else:
        y, h = rnnkernels.ops.rnn(*args, *rest, nonlinearity="tanh" if cell == R.RNN_TANH
                                  else "relu", **kw)
    return y, h, None


def outputs_and_grads(cell: int, inp: dict, lengths, reverse: bool):
    """The layer's outputs and the gradients of every input under a fixed random loss."""
    leaves = {n: t.detach().requires_grad_() for n, t in inp.items() if t is not None}
    outs = [o for o in layer(cell, {**inp, **leaves}, lengths, reverse) if o is not None]
    # Drawn in float64 by shape from their own generator: the same weights for every dtype.
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o)).sum()
               for o in outs)
    got = torch.autograd.grad(loss, list(leaves.values()))
    return outs, dict(zip(leaves, got))


def check_layer(cell: int, inp: dict, lengths, reverse: bool, dtype: torch.dtype,
                weight_scale: float = 1.0) -> None:
    """Outputs and every input gradient of the Triton layer in ``dtype`` against float64."""
    ref_outs, ref_grads = outputs_and_grads(cell, inp, lengths, reverse)
    low = {n: (t.to(dtype) if t is not None else None) for n, t in inp.items()}
    with rnnkernels.use_backend("triton"):
        outs, got = outputs_and_grads(cell, low, lengths, reverse)
    for name, o, r in zip(("y", "h_n", "c_n"), outs, ref_outs):
        assert o.dtype == dtype
        assert_close(o, r, dtype, msg=f"output {name}")
    for name, r in ref_grads.items():
        scale = weight_scale if name.startswith(("w_", "b_")) else 1.0
        assert_close(got[name], r, dtype, msg=f"gradient of {name}", scale=scale)


# ------------------------------------------------------------------ CI: the interpreter

@needs_interpreter
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}B{}H{}P{}{}{}".format(
    *c[:4], "rev" if c[4] else "", "len" if c[5] else ""))
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, case, path):
    cell, projected = VARIANTS[variant]
    T, B, H, P, reverse, with_lengths = case
    force, extra_rows = PATHS[path]
    inp, lengths = make_inputs(cell, T, B + extra_rows, H, P if projected else None,
                               lengths=with_lengths)
    with TR.force_plan(**force):
        check_layer(cell, inp, lengths, reverse, torch.float32)


@needs_interpreter
@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_ops_match_cpu_op(variant, path):
    """Forward op (with and without save) and backward op against the C++ op on the same
    inputs: the same outputs and the same saved hs / ws layouts, so either backward can take
    either forward's saves; the backward without some of its incoming gradients."""
    cell, projected = VARIANTS[variant]
    T, B, H = 4, 3, 20
    inp, lengths = make_inputs(cell, T, B, H, 7 if projected else None, lengths=True)
    f32 = {n: (t.float() if t is not None else None) for n, t in inp.items()}
    gx = torch.nn.functional.linear(f32["x"], f32["w_ih"], f32["b_ih"])
    args = (gx, f32["h0"], f32["c0"], f32["w_hh"], f32["b_hh"], f32["w_hr"], lengths, cell, True)
    with TR.force_plan(path, hidden_block=16):
        expected = torch.ops.rnnkernels.recurrence_fwd(*args, True)
        got = torch.ops.rnnkernels.recurrence_fwd_triton(*args, True)
        for name, g, e in zip(("y", "h_n", "c_n", "hs", "ws"), got, expected):
            assert g.shape == e.shape and g.dtype == e.dtype, name
            assert_close(g, e.double(), torch.float32, msg=name)
        inference = torch.ops.rnnkernels.recurrence_fwd_triton(*args, False)
        for name, g, e in zip(("y", "h_n", "c_n"), inference, got):
            torch.testing.assert_close(g, e, msg=name)
        assert inference[3].numel() == 0 and inference[4].numel() == 0

        hs, ws = expected[3], expected[4]
        grad_y = torch.randn_like(expected[0])
        grad_c = torch.randn_like(expected[2]) if cell == R.LSTM else None
        for grad_h in (torch.randn_like(expected[1]), None):
            bargs = (grad_y, grad_h, grad_c, f32["c0"], f32["w_hh"], f32["w_hr"], lengths, hs,
                     ws, cell, True)
            want = torch.ops.rnnkernels.recurrence_bwd(*bargs)
            have = torch.ops.rnnkernels.recurrence_bwd_triton(*bargs)
            for name, g, e in zip(("gx", "h0", "c0", "w_hh", "b_hh", "w_hr"), have, want):
                assert g.shape == e.shape and g.dtype == e.dtype, name
                assert_close(g, e.double(), torch.float32, msg=f"gradient of {name}")


@needs_interpreter
@pytest.mark.parametrize(("variant", "dtype", "path"), [
    ("lstm_proj", torch.bfloat16, "persistent"),
    ("gru_reset_before", torch.float16, "step"),
])
def test_low_precision(variant, dtype, path):
    cell, projected = VARIANTS[variant]
    inp, lengths = make_inputs(cell, 5, 3, 20, 7 if projected else None, lengths=True)
    with TR.force_plan(path, hidden_block=16):
        check_layer(cell, inp, lengths, False, dtype, weight_scale=2.0)


@needs_interpreter
@pytest.mark.parametrize("variant", ["lstm_proj", "gru"])
def test_noncontiguous_inputs_and_gradients(variant):
    """Strided x and weights; y.sum() hands the backward an expanded (stride 0) grad_y."""
    cell, projected = VARIANTS[variant]
    inp, lengths = make_inputs(cell, 5, 3, 16, 5 if projected else None, lengths=True)
    strided = {n: (t.float().t().contiguous().t() if t is not None and t.dim() == 2 else t)
               for n, t in inp.items()}
    strided["x"] = inp["x"].float().transpose(0, 1).contiguous().transpose(0, 1)
    strided = {n: (t.float() if t is not None else None) for n, t in strided.items()}
    assert not strided["w_hh"].is_contiguous() and not strided["x"].is_contiguous()
    leaves = {n: t.detach().requires_grad_() for n, t in strided.items() if t is not None}
    ref = {n: t.detach().requires_grad_() for n, t in inp.items() if t is not None}
    with rnnkernels.use_backend("triton"), TR.force_plan("step", hidden_block=16):
        y = layer(cell, {**strided, **leaves}, lengths, False)[0]
        y.sum().backward()
    y_ref, _, _ = layer(cell, {**inp, **ref}, lengths, False)
    y_ref.sum().backward()
    assert_close(y, y_ref, torch.float32, msg="y")
    for name, leaf in leaves.items():
        assert_close(leaf.grad, ref[name].grad, torch.float32, msg=f"gradient of {name}")


@needs_interpreter
def test_dynamo_traces_fullgraph():
    """torch.compile(fullgraph=True) traces the layer, the Triton op and its autograd (backend
    "eager" runs the captured graph; Inductor needs a GPU: see the cuda tests)."""
    cell, _ = VARIANTS["gru_reset_before"]
    inp, _ = make_inputs(cell, 4, 3, 16, None)
    f32 = {n: (t.float() if t is not None else None) for n, t in inp.items()}

    def loss(w_hh):
        return layer(cell, {**f32, "w_hh": w_hh}, None, True)[0].square().sum()

    w_hh = f32["w_hh"].requires_grad_()
    with rnnkernels.use_backend("triton"):
        eager = loss(w_hh)
        (grad_eager,) = torch.autograd.grad(eager, w_hh)
        compiled = torch.compile(loss, fullgraph=True, backend="eager")(w_hh)
        (grad_compiled,) = torch.autograd.grad(compiled, w_hh)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(grad_compiled, grad_eager)


# (cell, projected, dtype, path, H, P, hidden_block, backward): the grid-barrier path with every
# phase, the fp32 product, the streamed weights.
SM90_KERNELS = [
    (R.LSTM, True, torch.bfloat16, "sync", 256, 128, 64, False),
    (R.GRU_RESET_BEFORE, False, torch.bfloat16, "sync", 128, 128, 32, True),
    (R.GRU, False, torch.float32, "persistent", 64, 64, None, True),
    (R.LSTM, True, torch.float16, "step", 256, 128, 32, False),
]


def compile_for_sm90() -> None:
    """Compile SM90_KERNELS for sm_90 (no GPU needed: ptxas ships with triton) and check that a
    resident program's shared memory is what the plan budgets. Runs without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    for cell, proj, dtype, path, H, P, block, backward in SM90_KERNELS:
        BB, elem = 16, dtype.itemsize
        NH = math.ceil(H / (block or TR._block(H)))
        plan = TR.Plan(path, BB, block or TR._block(H), TR._block(math.ceil(P / NH)), 1, NH)
        flags = ({"REVERSE": True, "HAS_GY": True, "HAS_LEN": True, "DGX": True} if backward
                 else {"REVERSE": False, "SAVE": True, "HAS_BIAS": True, "HAS_LEN": True})
        meta = TR._meta(plan, H, P, cell, proj, dtype, backward, **flags)
        meta["PHASES"] = 7
        kernel = TR._bwd_kernel if backward else TR._fwd_kernel
        storage = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
        lowp = ("gy_ptr", "w_ptr", "wr_ptr", "dgx_ptr", "gx_ptr", "b_ptr", "y_ptr")
        signature = {
            name: "constexpr" if name in meta else
            ("*i64" if name == "len_ptr" else "*i32" if name == "bar_ptr" else
             storage if name in lowp else "*fp32") if name.endswith("_ptr") else "i32"
            for name in kernel.arg_names}
        compiled = triton.compile(ASTSource(kernel, signature, constexprs=meta),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": TR._num_warps(plan)})
        if path != "step":
            expected = TR._smem_bytes(H, P, cell, proj, BB, plan.BH, plan.BP, elem, backward)
            assert compiled.metadata.shared == expected, (cell, path, backward)
            assert expected <= TR._SMEM_BYTES


def test_gpu_kernels_compile_for_sm90():
    """The paths CI cannot run (the grid barrier) at least compile for the GPU, and the plan's
    shared-memory model holds, in a process without the interpreter."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("triton has no CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), str(here.parent), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run(
        [sys.executable, "-c", "import test_triton_recurrence as t; t.compile_for_sm90()"],
        check=False, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]


def test_cuda_tensors_choose_triton():
    """Without our CUDA kernels, CUDA tensors run the Triton kernels (no GPU needed to ask)."""
    cuda = torch.device("cuda")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        expected = "cuda" if _kernels.cuda_unsupported("recurrence", dtype) is None else "triton"
        assert _backend.choose("recurrence", cuda, dtype) == expected
    with rnnkernels.use_backend("triton"):
        assert _backend.choose("recurrence", cuda, torch.bfloat16) == "triton"


def test_plan_by_size():
    cpu = torch.device("cpu")
    small = TR._plan(3, 20, 20, R.LSTM, False, torch.float32, cpu, backward=False)
    assert (small.path, small.NB, small.NH) == ("persistent", 1, 1)
    assert small.BH >= 20 and small.BP >= 20
    large = TR._plan(100, 1000, 1000, R.GRU, False, torch.bfloat16, cpu, backward=True)
    assert large.path == "step" and large.NB * large.BB >= 100 and large.NH * large.BH >= 1000
    assert large.NH * large.BP >= 1000
    with TR.force_plan("step", hidden_block=16, batch_block=32):
        forced = TR._plan(40, 40, 7, R.LSTM, True, torch.float32, cpu, backward=False)
    assert (forced.path, forced.BB, forced.NB, forced.BH, forced.NH) == ("step", 32, 2, 16, 3)
    assert forced.NH * forced.BP >= 7


def test_force_plan_rejects_bad_arguments():
    with pytest.raises(ValueError, match="path must be one of"), TR.force_plan("fast"):
        pass
    with pytest.raises(ValueError, match="hidden_block must be a power of two"), \
            TR.force_plan("step", hidden_block=24):
        pass
    with pytest.raises(ValueError, match="batch_block must be a power of two"), \
            TR.force_plan("step", batch_block=8):
        pass
    if interpreted:
        with pytest.raises(ValueError, match="needs a GPU"), TR.force_plan("sync"):
            pass


# ------------------------------------------------------------------ GPU: compiled, real sizes

CUDA_PATHS = {
    "one_program": ({"path": "persistent"}, 64),
    "grid_barrier": ({"path": "sync", "hidden_block": 32}, 256),
    "grid_barrier_batch_blocks": ({"path": "sync", "hidden_block": 32, "batch_block": 16}, 256),
    "per_step": ({"path": "step"}, 256),
    "automatic": ({}, 768),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", CUDA_PATHS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_matches_reference(variant, path, dtype):
    cell, projected = VARIANTS[variant]
    force, H = CUDA_PATHS[path]
    B = 40 if "batch_blocks" in path else 16
    inp, lengths = make_inputs(cell, 64, B, H, H // 2 if projected else None, device="cuda",
                               I=32, lengths=True)
    ctx = TR.force_plan(**force) if force else contextlib.nullcontext()
    with ctx:
        check_layer(cell, inp, lengths, path in ("per_step", "grid_barrier_batch_blocks"), dtype,
                    weight_scale=4.0)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["lstm_proj", "gru_reset_before"])
def test_cuda_batch_one_inference(variant):
    cell, projected = VARIANTS[variant]
    inp, _ = make_inputs(cell, 128, 1, 768, 256 if projected else None, device="cuda", I=32)
    ref = layer(cell, inp, None, False)
    low = {n: (t.bfloat16() if t is not None else None) for n, t in inp.items()}
    with torch.no_grad(), rnnkernels.use_backend("triton"):
        got = layer(cell, low, None, False)
    for o, r in zip(got, ref):
        if r is not None:
            assert_close(o, r, torch.bfloat16)


@pytest.mark.cuda
@pytest.mark.parametrize("path", ["persistent", "step"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_cuda_opcheck(variant, path):
    cell, projected = VARIANTS[variant]
    inp, lengths = make_inputs(cell, 6, 5, 32, 16 if projected else None, device="cuda",
                               lengths=True)
    f32 = {n: (t.float() if t is not None else None) for n, t in inp.items()}
    gx = torch.nn.functional.linear(f32["x"], f32["w_ih"], f32["b_ih"]).requires_grad_()
    w_hh = f32["w_hh"].requires_grad_()
    args = (gx, f32["h0"], f32["c0"], w_hh, f32["b_hh"], f32["w_hr"], lengths, cell, False, True)
    with TR.force_plan(path, hidden_block=16):
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_fwd_triton, args)
        _, _, _, hs, ws = torch.ops.rnnkernels.recurrence_fwd_triton(*args)
        grad_y = torch.randn(6, 5, f32["h0"].shape[1], device="cuda")
        bargs = (grad_y, None, None, f32["c0"], f32["w_hh"].detach(), f32["w_hr"], lengths,
                 hs.detach(), ws.detach(), cell, False)
        torch.library.opcheck(torch.ops.rnnkernels.recurrence_bwd_triton, bargs)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["lstm_proj", "gru_reset_before", "rnn_relu"])
def test_cuda_compile_fullgraph(variant):
    cell, projected = VARIANTS[variant]
    # No lengths: their validation reads their values, which fullgraph cannot trace.
    inp, _ = make_inputs(cell, 16, 8, 64, 32 if projected else None, device="cuda")
    f32 = {n: (t.float() if t is not None else None) for n, t in inp.items()}

    def step(tensors):
        outs = [o for o in layer(cell, tensors, None, False) if o is not None]
        return sum(o.square().sum() for o in outs)

    def grads(fn):
        leaves = {n: t.detach().requires_grad_() for n, t in f32.items() if t is not None}
        loss = fn({**f32, **leaves})
        return [loss, *torch.autograd.grad(loss, list(leaves.values()))]

    with rnnkernels.use_backend("triton"):
        eager = grads(step)
        compiled = grads(torch.compile(step, fullgraph=True))
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, atol=1e-5, rtol=1e-4)
